package daemon

import (
	"context"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/broker/client"
	"github.com/cleanwall/cleanwall/attest/snp"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/runtime/api"
)

// KeyBrokerConfig connects the daemon to a key broker (KEYBROKER.md). The
// data keys that secure-mode rules name are released to this node's
// attested evidence before a sandbox that needs them is admitted, held in
// memory only, and released again before they expire.
type KeyBrokerConfig struct {
	URL      string
	Roots    *x509.CertPool // nil: the system roots
	Attester attest.Attester
}

// keyring holds released data keys, in memory only.
type keyring struct {
	d        *Daemon
	url      string
	client   *client.Client
	attester attest.Attester

	mu          sync.Mutex
	keys        map[string]*heldKey
	measurement string
	lastRelease time.Time
	lastError   string
}

type heldKey struct {
	id         string
	version    int
	bytes      []byte
	releasedAt time.Time
	notAfter   time.Time
	lastError  string
}

func newKeyring(d *Daemon, cfg *KeyBrokerConfig) *keyring {
	return &keyring{
		d: d, url: cfg.URL, attester: cfg.Attester,
		client: client.New(cfg.URL, cfg.Roots, cfg.Attester),
		keys:   map[string]*heldKey{},
	}
}

// start records what the broker will see (the measurement of this
// node's evidence) and starts the refresher.
func (k *keyring) start(ctx context.Context) error {
	ev, err := k.attester.Evidence(ctx, [64]byte{})
	if err != nil {
		return fmt.Errorf("obtaining attestation evidence: %w", err)
	}
	if p, err := snp.Parse(ev); err == nil {
		k.measurement = hex.EncodeToString(p.Measurement())
	}
	if k.attester.Simulated() {
		k.d.log.Warn("SIMULATED attestation: this node is not a TEE; its evidence is signed with go-sev-guest's test-only AMD chain and only a broker configured with allowSimulatedTEE releases keys to it")
	}
	k.d.goBackground(k.refresh)
	return nil
}

// secureKeyIDs lists the key ids a policy's secure rules need.
func secureKeyIDs(c *policy.Compiled) map[string]*policy.Rule {
	out := map[string]*policy.Rule{}
	for _, r := range c.Rules {
		if r.Mode == policy.ModeSecure && r.Spec.Secure != nil {
			if _, ok := out[r.Spec.Secure.KeyID]; !ok {
				out[r.Spec.Secure.KeyID] = r
			}
		}
	}
	return out
}

// ensureKeys makes sure every key a policy's secure rules name is held;
// a sandbox is not admitted (and a policy not applied) otherwise.
func (d *Daemon) ensureKeys(ctx context.Context, c *policy.Compiled) error {
	need := secureKeyIDs(c)
	if len(need) == 0 {
		return nil
	}
	if d.keys == nil {
		for id, r := range need {
			return &api.Error{Field: "policy", Message: fmt.Sprintf("%s (%s): secure mode needs key %q from a key broker, and cleanwalld runs without one (--keybroker)", r.Path, r.Name, id)}
		}
	}
	ids := make([]string, 0, len(need))
	for id := range need {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		if _, err := d.keys.get(ctx, id); err != nil {
			r := need[id]
			return &api.Error{Field: "policy", Message: fmt.Sprintf("%s (%s): key %q not released: %v", r.Path, r.Name, id, err)}
		}
	}
	return nil
}

// get returns a held, unexpired key, releasing it when needed.
func (k *keyring) get(ctx context.Context, id string) (*heldKey, error) {
	k.mu.Lock()
	h := k.keys[id]
	k.mu.Unlock()
	if h != nil && time.Now().Before(h.notAfter) {
		return h, nil
	}
	return k.release(ctx, id)
}

func (k *keyring) release(ctx context.Context, id string) (*heldKey, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	key, err := k.client.Release(ctx, id)
	k.mu.Lock()
	defer k.mu.Unlock()
	if err != nil {
		k.lastError = err.Error()
		if h := k.keys[id]; h != nil {
			h.lastError = err.Error()
		}
		k.d.log.Warn("key release refused", "key", id, "error", err)
		k.d.audit.record(auditKeyRefuse, map[string]any{"key": id, "broker": k.url, "simulated": k.attester.Simulated(), "error": err.Error()})
		return nil, err
	}
	h := &heldKey{id: id, version: key.Version, bytes: key.Bytes, releasedAt: time.Now(), notAfter: key.NotAfter}
	if old := k.keys[id]; old != nil {
		clear(old.bytes)
	}
	k.keys[id] = h
	k.lastRelease, k.lastError = h.releasedAt, ""
	k.d.log.Info("key released", "key", id, "version", key.Version, "not_after", key.NotAfter, "simulated", key.Evidence.Simulated)
	k.d.audit.record(auditKeyRelease, map[string]any{"key": id, "version": key.Version, "broker": k.url,
		"notAfter": key.NotAfter.Format(time.RFC3339), "simulated": key.Evidence.Simulated, "measurement": k.measurement})
	return h, nil
}

// refresh re-attests before keys expire; a key the broker no longer
// releases is dropped at its expiry (its secure flows then drop).
func (k *keyring) refresh() {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-k.d.ctx.Done():
			k.mu.Lock()
			for _, h := range k.keys {
				clear(h.bytes)
			}
			k.mu.Unlock()
			return
		case <-t.C:
		}
		now := time.Now()
		var due []string
		k.mu.Lock()
		for id, h := range k.keys {
			validity := h.notAfter.Sub(h.releasedAt)
			margin := max(validity/10, 30*time.Second)
			if now.After(h.notAfter.Add(-margin)) {
				due = append(due, id)
			}
			if now.After(h.notAfter) {
				clear(h.bytes)
				delete(k.keys, id)
			}
		}
		k.mu.Unlock()
		for _, id := range due {
			_, _ = k.release(k.d.ctx, id)
		}
	}
}

// Key returns a held key's bytes and version (for the secure-mode proxy).
func (k *keyring) Key(id string) ([]byte, int, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	h := k.keys[id]
	if h == nil || time.Now().After(h.notAfter) {
		return nil, 0, false
	}
	return h.bytes, h.version, true
}

func (k *keyring) status() api.AttestStatus {
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
	for _, h := range k.keys {
		st.Keys = append(st.Keys, api.HeldKey{ID: h.id, Version: h.version, ReleasedAt: h.releasedAt, NotAfter: h.notAfter, LastError: h.lastError})
	}
	sort.Slice(st.Keys, func(i, j int) bool { return st.Keys[i].ID < st.Keys[j].ID })
	return st
}

func (d *Daemon) handleAttest(w http.ResponseWriter, _ *http.Request) {
	if d.keys == nil {
		writeJSON(w, http.StatusOK, api.AttestStatus{Configured: false})
		return
	}
	writeJSON(w, http.StatusOK, d.keys.status())
}
