// Package keys holds the data keys that secure-mode rules and volumes
// (spec.volumes) name, released by a key broker (docs/keybroker.md) to
// this node's attested evidence. A key is released for one egress policy (its hash bound into the
// evidence, §5) and held for that policy only: a sandbox under another
// policy gets its own release, which a broker that binds the key to its
// egress policies may refuse. Keys live in memory only, are released
// again before they expire, and older versions are kept (for opening what
// they sealed) until they expire themselves.
package keys

import (
	"context"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/broker/client"
	"github.com/cleanwall/cleanwall/attest/snp"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/runtime/api"
)

// BrokerConfig connects the daemon to a key broker.
type BrokerConfig struct {
	URL      string
	Roots    *x509.CertPool // nil: the system roots
	Attester attest.Attester
	// NodeKey is the public key that signs the node's audit checkpoints
	// (governance/audit); every release binds it (docs/keybroker.md §7).
	// Nil: releases bind no node key.
	NodeKey ed25519.PublicKey
}

// Audit record kinds written by the ring.
const (
	AuditRelease = "key.release"
	AuditRefuse  = "key.release.refused"
)

// Releaser releases one key for one policy (client.Client.ReleaseWith).
type Releaser interface {
	ReleaseWith(ctx context.Context, keyID string, o client.ReleaseOptions) (client.Key, error)
}

// Ring holds released data keys.
type Ring struct {
	url      string
	attester attest.Attester
	rel      Releaser
	log      *slog.Logger
	audit    func(kind string, fields map[string]any)
	now      func() time.Time

	// OnLapse, when set, is told when the current version of a key held
	// for a policy expired without being released again: the flows that
	// seal with it must end (their sandboxes' new flows are refused until
	// a release succeeds). It is called from the refresher, without locks.
	OnLapse func(keyID, policySHA256 string)

	// AuditErr, when set (before Start), records a granted release and
	// returns once the record is durable; an error withholds the key (the
	// release counts as failed): no record, no key. Without it, audit
	// records releases and a failure to record does not stop them.
	AuditErr func(kind string, fields map[string]any) error

	// NodeKey, when set (before Start), is sent with every release and
	// bound into its evidence, so the broker's release record ties this
	// node's audit log to the attestation (docs/keybroker.md §7).
	NodeKey ed25519.PublicKey

	mu          sync.Mutex
	keys        map[heldKey]*held
	measurement string
	lastRelease time.Time
	lastError   string
}

// heldKey is a key as released for one policy.
type heldKey struct{ id, policy string }

type held struct {
	current    proxies.DataKey
	older      []version // previous versions, newest first
	releasedAt time.Time
	notAfter   time.Time
	lastError  string
	lapsed     bool // OnLapse was told
}

type version struct {
	key      proxies.DataKey
	notAfter time.Time
}

// maxOlderVersions bounds the previous versions kept per key.
const maxOlderVersions = 4

// New returns a ring that releases from cfg's broker. audit records
// releases and refusals (nil: none).
func New(cfg BrokerConfig, log *slog.Logger, audit func(kind string, fields map[string]any)) *Ring {
	r := NewWith(cfg.URL, cfg.Attester, client.New(cfg.URL, cfg.Roots, cfg.Attester), log, audit)
	r.NodeKey = cfg.NodeKey
	return r
}

// NewWith returns a ring over any Releaser (tests).
func NewWith(url string, a attest.Attester, rel Releaser, log *slog.Logger, audit func(kind string, fields map[string]any)) *Ring {
	if log == nil {
		log = slog.Default()
	}
	if audit == nil {
		audit = func(string, map[string]any) {}
	}
	return &Ring{url: url, attester: a, rel: rel, log: log, audit: audit, now: time.Now, keys: map[heldKey]*held{}}
}

// Start records what the broker will see (the measurement of this node's
// evidence) and re-releases keys before they expire until ctx is done,
// when every key is wiped.
func (k *Ring) Start(ctx context.Context) error {
	ev, err := k.attester.Evidence(ctx, [64]byte{})
	if err != nil {
		return fmt.Errorf("obtaining attestation evidence: %w", err)
	}
	if p, err := snp.Parse(ev); err == nil {
		k.measurement = hex.EncodeToString(p.Measurement())
	}
	if k.attester.Simulated() {
		k.log.Warn("SIMULATED attestation: this node is not a TEE; its evidence is signed with go-sev-guest's test-only AMD chain and only a broker configured with allowSimulatedTEE releases keys to it")
	}
	go k.refresh(ctx)
	return nil
}

// need is one key a policy names, with the first place naming it (for
// messages).
type need struct {
	id   string
	path string // spec.egress[i] or spec.volumes[i].keyID
	name string // the rule's or the volume's name
	what string // what needs it: "secure mode" or "volume"
}

// needed lists the key ids a policy's secure rules and volumes name, each
// once (the first place naming it), sorted by id.
func needed(c *policy.Compiled) []need {
	seen := map[string]bool{}
	var out []need
	add := func(n need) {
		if !seen[n.id] {
			seen[n.id] = true
			out = append(out, n)
		}
	}
	for _, r := range c.Rules {
		if r.Mode == policy.ModeSecure && r.Spec.Secure != nil {
			add(need{id: r.Spec.Secure.KeyID, path: r.Path, name: r.Name, what: "secure mode"})
		}
	}
	if c.Policy != nil {
		for i, v := range c.Policy.Spec.Volumes {
			add(need{id: v.KeyID, path: fmt.Sprintf("spec.volumes[%d].keyID", i), name: v.Name, what: "volume " + v.Name})
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].id < out[j].id })
	return out
}

// Ensure makes sure every key c's secure rules and volumes name is held
// for c; a sandbox is not admitted (and a policy not applied) otherwise. A
// nil ring (no key broker) refuses any policy that needs a key.
func (k *Ring) Ensure(ctx context.Context, c *policy.Compiled) error {
	for _, n := range needed(c) {
		if k == nil {
			return &api.Error{Field: "policy", Message: fmt.Sprintf("%s (%s): %s needs key %q from a key broker, and cleanwalld runs without one (--keybroker)", n.path, n.name, n.what, n.id)}
		}
		if _, err := k.get(ctx, heldKey{n.id, c.Hash}); err != nil {
			return &api.Error{Field: "policy", Message: fmt.Sprintf("%s (%s): key %q not released: %v", n.path, n.name, n.id, err)}
		}
	}
	return nil
}

// VolumeKey returns a copy of the current version of key id as released
// for c (Ensure first): the key a volume of c is opened with. The copy is
// the volume's own: the ring wipes its versions when they expire, and a
// mounted volume keeps its key until it is unmounted.
func (k *Ring) VolumeKey(c *policy.Compiled, id string) (proxies.DataKey, error) {
	if k == nil {
		return proxies.DataKey{}, fmt.Errorf("%w: %s (no key broker)", proxies.ErrNoKey, id)
	}
	dk, err := k.For(c).Current(id)
	if err != nil {
		return proxies.DataKey{}, err
	}
	dk.Key = append([]byte(nil), dk.Key...)
	return dk, nil
}

// For is the KeySource of the flows of sandboxes under c: the keys
// released for c only.
func (k *Ring) For(c *policy.Compiled) proxies.KeySource {
	return source{k, c.Hash}
}

type source struct {
	k      *Ring
	policy string
}

// Current returns the newest unexpired version of key id.
func (s source) Current(id string) (proxies.DataKey, error) {
	s.k.mu.Lock()
	defer s.k.mu.Unlock()
	h := s.k.keys[heldKey{id, s.policy}]
	if h == nil || !s.k.now().Before(h.notAfter) {
		return proxies.DataKey{}, fmt.Errorf("%w: %s", proxies.ErrNoKey, id)
	}
	return h.current, nil
}

// Version returns version v of key id, the current one or a previous one
// that has not expired.
func (s source) Version(id string, v int) (proxies.DataKey, error) {
	s.k.mu.Lock()
	defer s.k.mu.Unlock()
	h := s.k.keys[heldKey{id, s.policy}]
	now := s.k.now()
	if h != nil {
		if h.current.Version == v && now.Before(h.notAfter) {
			return h.current, nil
		}
		for _, o := range h.older {
			if o.key.Version == v && now.Before(o.notAfter) {
				return o.key, nil
			}
		}
	}
	return proxies.DataKey{}, fmt.Errorf("%w: %s version %d", proxies.ErrNoKey, id, v)
}

// get returns a held, unexpired key, releasing it when needed.
func (k *Ring) get(ctx context.Context, hk heldKey) (proxies.DataKey, error) {
	k.mu.Lock()
	h := k.keys[hk]
	k.mu.Unlock()
	if h != nil && k.now().Before(h.notAfter) {
		return h.current, nil
	}
	return k.release(ctx, hk)
}

func (k *Ring) release(ctx context.Context, hk heldKey) (proxies.DataKey, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	key, err := k.rel.ReleaseWith(ctx, hk.id, client.ReleaseOptions{PolicySHA256: hk.policy, NodeKey: k.NodeKey})
	if err == nil && k.AuditErr != nil {
		// Recorded before the key is held or handed to anyone.
		if aerr := k.AuditErr(AuditRelease, k.releaseRecord(hk, key)); aerr != nil {
			clear(key.Bytes)
			err = fmt.Errorf("key released but its audit record could not be written, so it is not used: %w", aerr)
		}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if err != nil {
		k.lastError = err.Error()
		if h := k.keys[hk]; h != nil {
			h.lastError = err.Error()
		}
		k.log.Warn("key release refused", "key", hk.id, "policy", hk.policy, "error", err)
		k.audit(AuditRefuse, k.withNodeKey(map[string]any{"key": hk.id, "policySHA256": hk.policy, "broker": k.url, "simulated": k.attester.Simulated(), "error": err.Error()}))
		return proxies.DataKey{}, err
	}
	now := k.now()
	dk := proxies.DataKey{ID: hk.id, Version: key.Version, Key: key.Bytes}
	h := &held{current: dk, releasedAt: now, notAfter: key.NotAfter}
	if old := k.keys[hk]; old != nil {
		if old.current.Version != dk.Version {
			h.older = append([]version{{old.current, old.notAfter}}, old.older...)
		} else {
			// The same version again (its bytes never change at the broker):
			// keep the bytes flows were handed, since wiping them would zero
			// a key a flow may be about to seal with, and wipe the new copy.
			clear(dk.Key)
			dk.Key = old.current.Key
			h.current = dk
			h.older = old.older
		}
		for len(h.older) > maxOlderVersions {
			clear(h.older[len(h.older)-1].key.Key)
			h.older = h.older[:len(h.older)-1]
		}
	}
	k.keys[hk] = h
	k.lastRelease, k.lastError = now, ""
	k.log.Info("key released", "key", hk.id, "version", key.Version, "policy", hk.policy, "not_after", key.NotAfter, "simulated", key.Evidence.Simulated)
	if k.AuditErr == nil {
		k.audit(AuditRelease, k.releaseRecord(hk, key))
	}
	return dk, nil
}

// releaseRecord is the audit record of a granted release.
func (k *Ring) releaseRecord(hk heldKey, key client.Key) map[string]any {
	return k.withNodeKey(map[string]any{"key": hk.id, "version": key.Version, "policySHA256": hk.policy, "broker": k.url,
		"notAfter": key.NotAfter.Format(time.RFC3339), "simulated": key.Evidence.Simulated, "measurement": k.measurement,
		"reportData": hex.EncodeToString(key.Evidence.ReportData[:])})
}

// withNodeKey adds the node key a release bound (base64, as the broker's
// record names it) to an audit record.
func (k *Ring) withNodeKey(fields map[string]any) map[string]any {
	if k.NodeKey != nil {
		fields["nodeKey"] = base64.StdEncoding.EncodeToString(k.NodeKey)
	}
	return fields
}

// RefreshInterval is how often the ring looks for keys due for release
// and for lapsed ones: a key that expired without a new release stops
// sealing open flows within about this long.
const RefreshInterval = time.Second

// refresh re-attests before keys expire; a key the broker no longer
// releases is dropped at its expiry (its secure flows are then refused).
func (k *Ring) refresh(ctx context.Context) {
	t := time.NewTicker(RefreshInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			k.wipe()
			return
		case <-t.C:
		}
		due, lapsed := k.expire()
		for _, hk := range due {
			_, _ = k.release(ctx, hk)
		}
		for _, hk := range lapsed {
			if k.OnLapse != nil {
				k.OnLapse(hk.id, hk.policy)
			}
		}
	}
}

// expire drops expired keys and versions and lists the keys due for
// release again (within a tenth of their validity, at least 30 s), and the
// keys whose current version lapsed since the last call (each once, until
// a release renews it).
func (k *Ring) expire() (due, lapsed []heldKey) {
	now := k.now()
	k.mu.Lock()
	defer k.mu.Unlock()
	for hk, h := range k.keys {
		margin := max(h.notAfter.Sub(h.releasedAt)/10, 30*time.Second)
		if now.After(h.notAfter.Add(-margin)) {
			due = append(due, hk)
		}
		kept := h.older[:0]
		for _, o := range h.older {
			if now.Before(o.notAfter) {
				kept = append(kept, o)
			} else {
				clear(o.key.Key)
			}
		}
		h.older = kept
		if !now.Before(h.notAfter) && !h.lapsed {
			h.lapsed = true
			lapsed = append(lapsed, hk)
		}
		if !now.Before(h.notAfter) && len(h.older) == 0 {
			clear(h.current.Key)
			delete(k.keys, hk)
		}
	}
	return due, lapsed
}

func (k *Ring) wipe() {
	k.mu.Lock()
	defer k.mu.Unlock()
	for hk, h := range k.keys {
		clear(h.current.Key)
		for _, o := range h.older {
			clear(o.key.Key)
		}
		delete(k.keys, hk)
	}
}

// Status is what `cleanwall attest status` shows.
func (k *Ring) Status() api.AttestStatus {
	if k == nil {
		return api.AttestStatus{Configured: false}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	st := api.AttestStatus{
		Configured: true, Broker: k.url, Evidence: k.attester.TEE(), Simulated: k.attester.Simulated(),
		Measurement: k.measurement, LastError: k.lastError,
	}
	if k.attester.Simulated() {
		st.Evidence += " (SIMULATED: not a TEE)"
	}
	if !k.lastRelease.IsZero() {
		t := k.lastRelease
		st.LastRelease = &t
	}
	for hk, h := range k.keys {
		st.Keys = append(st.Keys, api.HeldKey{ID: hk.id, Version: h.current.Version, PolicySHA256: hk.policy,
			ReleasedAt: h.releasedAt, NotAfter: h.notAfter, LastError: h.lastError})
	}
	sort.Slice(st.Keys, func(i, j int) bool {
		if st.Keys[i].ID != st.Keys[j].ID {
			return st.Keys[i].ID < st.Keys[j].ID
		}
		return st.Keys[i].PolicySHA256 < st.Keys[j].PolicySHA256
	})
	return st
}
