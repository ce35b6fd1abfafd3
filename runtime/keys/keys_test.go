package keys

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/attest/broker/client"
	"github.com/cleanwall/cleanwall/attest/simulated"
	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/runtime/api"
)

// These tests run the ring over a fake broker (the Releaser) and a
// simulated attester, on a clock of their own: no root, no network.

const brokerURL = "https://broker.test"

// t0 is when every test starts on the ring's clock.
var t0 = time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)

// clock is the ring's time; the refresh goroutine reads it too.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

// call is one release request the broker received.
type call struct{ keyID, policy string }

// broker is a fake key broker: it releases version n of a key as the
// bytes keyBytes(id, policy, n), valid for validity, unless refuse says
// otherwise.
type broker struct {
	mu       sync.Mutex
	calls    []call
	version  map[call]int
	validity time.Duration
	clock    *clock
	// refuse, when it returns an error, refuses the release with it.
	refuse func(keyID, policy string) error
	// same keeps releasing the current version instead of a new one.
	same bool
	// nodeKeys are the node keys the requests carried, in order.
	nodeKeys [][]byte
}

// keyBytes is the 32-byte key the fake broker releases: distinct per key
// id, policy and version, so a test can tell which one it was handed.
func keyBytes(id, policy string, version int) []byte {
	b := bytes.Repeat([]byte{0}, 32)
	copy(b, fmt.Sprintf("%s/%.8s/v%d", id, policy, version))
	return b
}

func (b *broker) ReleaseWith(ctx context.Context, keyID string, o client.ReleaseOptions) (client.Key, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	c := call{keyID, o.PolicySHA256}
	b.calls = append(b.calls, c)
	b.nodeKeys = append(b.nodeKeys, o.NodeKey)
	if b.refuse != nil {
		if err := b.refuse(keyID, o.PolicySHA256); err != nil {
			return client.Key{}, err
		}
	}
	if b.version == nil {
		b.version = map[call]int{}
	}
	if !b.same || b.version[c] == 0 {
		b.version[c]++
	}
	v := b.version[c]
	// Fresh bytes on every release, as the real client decrypts them.
	return client.Key{ID: keyID, Version: v, Bytes: keyBytes(keyID, o.PolicySHA256, v),
		NotAfter: b.clock.now().Add(b.validity), Evidence: client.EvidenceInfo{TEE: "snp", Simulated: true}}, nil
}

func (b *broker) received() []call {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]call(nil), b.calls...)
}

// record is one audit record.
type record struct {
	kind   string
	fields map[string]any
}

type auditLog struct {
	mu      sync.Mutex
	records []record
}

func (a *auditLog) add(kind string, fields map[string]any) {
	a.mu.Lock()
	a.records = append(a.records, record{kind, fields})
	a.mu.Unlock()
}

func (a *auditLog) of(kind string) []record {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []record
	for _, r := range a.records {
		if r.kind == kind {
			out = append(out, r)
		}
	}
	return out
}

type env struct {
	ring   *Ring
	broker *broker
	audit  *auditLog
	clock  *clock
	att    *simulated.Attester
}

func newEnv(t *testing.T) *env {
	t.Helper()
	att, err := simulated.New(simulated.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	c := &clock{t: t0}
	b := &broker{validity: time.Hour, clock: c}
	a := &auditLog{}
	r := NewWith(brokerURL, att, b, testutil.Logger(t), a.add)
	r.now = c.now
	return &env{ring: r, broker: b, audit: a, clock: c, att: att}
}

func compile(t *testing.T, doc string) *policy.Compiled {
	t.Helper()
	p, err := policy.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	c, err := policy.Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

const openOnly = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: open-only}
spec:
  egress:
    - name: results
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}]
      mode: open
`

// securePolicy has an open rule, then secure rules naming keyIDs in order
// (spec.egress[1], [2], …). Policies of different names hash differently.
func securePolicy(name string, keyIDs ...string) string {
	doc := `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: ` + name + `}
spec:
  egress:
    - name: results
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}]
      mode: open
`
	for i, id := range keyIDs {
		doc += fmt.Sprintf(`    - name: sealed-%d
      to: [{cidr: 198.51.100.%d/32}]
      ports: [{port: 443}]
      mode: secure
      secure: {keyID: %s, protocol: tcp}
`, i, 20+i, id)
	}
	return doc
}

func TestEnsureWithoutSecureRules(t *testing.T) {
	v := newEnv(t)
	c := compile(t, openOnly)
	if err := v.ring.Ensure(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	var none *Ring
	if err := none.Ensure(context.Background(), c); err != nil {
		t.Fatalf("a node without a key broker refused a policy without secure rules: %v", err)
	}
	if calls := v.broker.received(); len(calls) != 0 {
		t.Fatalf("released %v for a policy without secure rules", calls)
	}
	if st := v.ring.Status(); len(st.Keys) != 0 || st.LastRelease != nil {
		t.Fatalf("status %+v", st)
	}
}

// Without a key broker, a policy with a secure rule is refused, naming
// the rule and the flag to set.
func TestNilRingRefusesSecurePolicy(t *testing.T) {
	var none *Ring
	err := none.Ensure(context.Background(), compile(t, securePolicy("p", "k1")))
	var ae *api.Error
	if !errors.As(err, &ae) {
		t.Fatalf("Ensure on a nil ring: %v", err)
	}
	for _, want := range []string{"spec.egress[1]", "sealed-0", `"k1"`, "--keybroker"} {
		if !strings.Contains(ae.Message, want) {
			t.Errorf("refusal %q does not name %s", ae.Message, want)
		}
	}
	if ae.Field != "policy" {
		t.Errorf("field %q", ae.Field)
	}
	if st := none.Status(); st.Configured {
		t.Fatalf("a nil ring says it is configured: %+v", st)
	}
}

// A key is released once per policy, bound to the compiled policy's hash,
// and handed to that policy's flows.
func TestEnsureReleasesOncePerPolicy(t *testing.T) {
	v := newEnv(t)
	c := compile(t, securePolicy("p", "k2", "k1", "k1"))
	for range 3 {
		if err := v.ring.Ensure(context.Background(), c); err != nil {
			t.Fatal(err)
		}
	}
	want := []call{{"k1", c.Hash}, {"k2", c.Hash}}
	if got := v.broker.received(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("releases %v, want %v", got, want)
	}
	if len(c.Hash) != 64 {
		t.Fatalf("the policy hash %q is not 64 hex characters", c.Hash)
	}
	for _, id := range []string{"k1", "k2"} {
		k, err := v.ring.For(c).Current(id)
		if err != nil {
			t.Fatal(err)
		}
		if k.ID != id || k.Version != 1 || !bytes.Equal(k.Key, keyBytes(id, c.Hash, 1)) {
			t.Fatalf("Current(%s) = %+v", id, k)
		}
	}
	recs := v.audit.of(AuditRelease)
	if len(recs) != 2 {
		t.Fatalf("%d release audit records, want 2", len(recs))
	}
	f := recs[0].fields
	if f["key"] != "k1" || f["policySHA256"] != c.Hash || f["version"] != 1 || f["broker"] != brokerURL || f["simulated"] != true {
		t.Fatalf("audit record %v", f)
	}
	if _, err := v.ring.For(c).Current("k3"); !errors.Is(err, proxies.ErrNoKey) {
		t.Fatalf("a key the policy does not name: %v", err)
	}
}

// Two policies naming the same key get a release each, and the flows of
// one never see the other's key.
func TestKeysAreHeldPerPolicy(t *testing.T) {
	v := newEnv(t)
	a, b := compile(t, securePolicy("a", "k1")), compile(t, securePolicy("b", "k1"))
	if a.Hash == b.Hash {
		t.Fatal("the two policies hash alike")
	}
	// The broker releases k1 for policy a only.
	v.broker.refuse = func(id, policy string) error {
		if policy != a.Hash {
			return errors.New("egress-policy-not-allowed")
		}
		return nil
	}
	if err := v.ring.Ensure(context.Background(), a); err != nil {
		t.Fatal(err)
	}
	if err := v.ring.Ensure(context.Background(), b); err == nil {
		t.Fatal("policy b was admitted with a key released for policy a")
	}
	if _, err := v.ring.For(b).Current("k1"); !errors.Is(err, proxies.ErrNoKey) {
		t.Fatalf("policy b's flows got policy a's key: %v", err)
	}
	if _, err := v.ring.For(b).Version("k1", 1); !errors.Is(err, proxies.ErrNoKey) {
		t.Fatalf("policy b's flows can open with policy a's key: %v", err)
	}
	// Released for both: each gets its own.
	v.broker.refuse = nil
	if err := v.ring.Ensure(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	want := []call{{"k1", a.Hash}, {"k1", b.Hash}, {"k1", b.Hash}}
	if got := v.broker.received(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("releases %v, want %v", got, want)
	}
	ka, _ := v.ring.For(a).Current("k1")
	kb, _ := v.ring.For(b).Current("k1")
	if !bytes.Equal(ka.Key, keyBytes("k1", a.Hash, 1)) || !bytes.Equal(kb.Key, keyBytes("k1", b.Hash, 1)) {
		t.Fatalf("policy a holds %q, policy b %q", ka.Key, kb.Key)
	}
}

// A refusal names the rule and the broker's reason, is audited, and shows
// in the status until a release succeeds.
func TestRefusedRelease(t *testing.T) {
	v := newEnv(t)
	c := compile(t, securePolicy("p", "k1"))
	v.broker.refuse = func(string, string) error { return errors.New("key release refused: measurement-not-allowed") }
	err := v.ring.Ensure(context.Background(), c)
	var ae *api.Error
	if !errors.As(err, &ae) {
		t.Fatalf("Ensure: %v", err)
	}
	for _, want := range []string{"spec.egress[1]", `"k1"`, "measurement-not-allowed"} {
		if !strings.Contains(ae.Message, want) {
			t.Errorf("refusal %q does not name %s", ae.Message, want)
		}
	}
	recs := v.audit.of(AuditRefuse)
	if len(recs) != 1 {
		t.Fatalf("%d refusal audit records", len(recs))
	}
	if f := recs[0].fields; f["key"] != "k1" || f["policySHA256"] != c.Hash || !strings.Contains(fmt.Sprint(f["error"]), "measurement-not-allowed") || f["simulated"] != true {
		t.Fatalf("refusal audit record %v", f)
	}
	if len(v.audit.of(AuditRelease)) != 0 {
		t.Fatal("a refusal was audited as a release")
	}
	if st := v.ring.Status(); !strings.Contains(st.LastError, "measurement-not-allowed") || len(st.Keys) != 0 {
		t.Fatalf("status after a refusal: %+v", st)
	}
	v.broker.refuse = nil
	if err := v.ring.Ensure(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	if st := v.ring.Status(); st.LastError != "" || st.LastRelease == nil || !st.LastRelease.Equal(t0) {
		t.Fatalf("status after a release: %+v", st)
	}
	// A held key the broker then refuses to release again keeps its
	// version (until it expires) and shows the refusal.
	v.broker.refuse = func(string, string) error { return errors.New("key-revoked") }
	if _, err := v.ring.release(context.Background(), heldKey{"k1", c.Hash}); err == nil {
		t.Fatal("the refusal was not returned")
	}
	st := v.ring.Status()
	if len(st.Keys) != 1 || st.Keys[0].LastError != "key-revoked" || st.LastError != "key-revoked" {
		t.Fatalf("status after a refused re-release: %+v", st)
	}
	if k, err := v.ring.For(c).Current("k1"); err != nil || k.Version != 1 {
		t.Fatalf("the held version after a refused re-release: %+v %v", k, err)
	}
}

// Rotation: a new version becomes current, older ones still open until
// their own expiry, and expired ones are gone and wiped.
func TestRotationAndExpiry(t *testing.T) {
	v := newEnv(t)
	c := compile(t, securePolicy("p", "k1"))
	src := v.ring.For(c)
	if err := v.ring.Ensure(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	v1, _ := src.Current("k1")

	// Not due before the last tenth of its validity (6 of 60 minutes).
	v.clock.set(t0.Add(53 * time.Minute))
	if due, lapsed := v.ring.expire(); len(due) != 0 || len(lapsed) != 0 {
		t.Fatalf("due %v, lapsed %v at 53 of 60 minutes", due, lapsed)
	}
	v.clock.set(t0.Add(55 * time.Minute))
	due, _ := v.ring.expire()
	if len(due) != 1 || due[0] != (heldKey{"k1", c.Hash}) {
		t.Fatalf("due %v at 55 of 60 minutes", due)
	}
	if _, err := v.ring.release(context.Background(), due[0]); err != nil {
		t.Fatal(err)
	}
	cur, err := src.Current("k1")
	if err != nil || cur.Version != 2 || !bytes.Equal(cur.Key, keyBytes("k1", c.Hash, 2)) {
		t.Fatalf("current after the rotation: %+v %v", cur, err)
	}
	if old, err := src.Version("k1", 1); err != nil || !bytes.Equal(old.Key, keyBytes("k1", c.Hash, 1)) {
		t.Fatalf("version 1 before its expiry: %+v %v", old, err)
	}
	if k, err := src.Version("k1", 2); err != nil || k.Version != 2 {
		t.Fatalf("version 2: %+v %v", k, err)
	}
	if _, err := src.Version("k1", 3); !errors.Is(err, proxies.ErrNoKey) {
		t.Fatalf("a version never released: %v", err)
	}

	// Version 1 expires at t0+1h: gone, and its bytes zeroed.
	v.clock.set(t0.Add(time.Hour))
	if _, err := src.Version("k1", 1); !errors.Is(err, proxies.ErrNoKey) {
		t.Fatalf("version 1 at its expiry: %v", err)
	}
	if due, lapsed := v.ring.expire(); len(due) != 0 || len(lapsed) != 0 {
		t.Fatalf("version 2 due (%v) or lapsed (%v) right after its release", due, lapsed)
	}
	if !allZero(v1.Key) {
		t.Fatalf("expired version 1 not wiped: %q", v1.Key)
	}
	if k, err := src.Current("k1"); err != nil || k.Version != 2 {
		t.Fatalf("current after version 1 expired: %+v %v", k, err)
	}

	// Version 2 (released at 55 min) expires at 1h55: nothing is held.
	v2, _ := src.Current("k1")
	v.clock.set(t0.Add(115 * time.Minute))
	if _, err := src.Current("k1"); !errors.Is(err, proxies.ErrNoKey) {
		t.Fatalf("current at its expiry: %v", err)
	}
	if _, err := src.Version("k1", 2); !errors.Is(err, proxies.ErrNoKey) {
		t.Fatalf("version 2 at its expiry: %v", err)
	}
	due, lapsed := v.ring.expire()
	if len(due) != 1 {
		t.Fatalf("an expired key is not due for release: %v", due)
	}
	if len(lapsed) != 1 || lapsed[0] != (heldKey{"k1", c.Hash}) {
		t.Fatalf("the lapse of the current version was not reported: %v", lapsed)
	}
	if !allZero(v2.Key) {
		t.Fatalf("expired version 2 not wiped: %q", v2.Key)
	}
	if st := v.ring.Status(); len(st.Keys) != 0 {
		t.Fatalf("expired keys listed: %+v", st.Keys)
	}
	// The next admission releases it again.
	if err := v.ring.Ensure(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	if k, err := src.Current("k1"); err != nil || k.Version != 3 {
		t.Fatalf("current after a new release: %+v %v", k, err)
	}
}

// An expired current version with an older one still valid: Ensure
// releases again instead of admitting with a key flows cannot use.
func TestEnsureReleasesAnExpiredKey(t *testing.T) {
	v := newEnv(t)
	c := compile(t, securePolicy("p", "k1"))
	if err := v.ring.Ensure(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	v.clock.set(t0.Add(time.Hour))
	if err := v.ring.Ensure(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	if n := len(v.broker.received()); n != 2 {
		t.Fatalf("%d releases, want a second one after the expiry", n)
	}
	if k, err := v.ring.For(c).Current("k1"); err != nil || k.Version != 2 {
		t.Fatalf("current: %+v %v", k, err)
	}
}

// At most maxOlderVersions previous versions are kept; the ones dropped
// are wiped.
func TestOlderVersionsAreBounded(t *testing.T) {
	v := newEnv(t)
	c := compile(t, securePolicy("p", "k1"))
	src := v.ring.For(c)
	hk := heldKey{"k1", c.Hash}
	var first proxies.DataKey
	for i := range maxOlderVersions + 2 {
		if _, err := v.ring.release(context.Background(), hk); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first, _ = src.Current("k1")
		}
	}
	newest := maxOlderVersions + 2
	if k, _ := src.Current("k1"); k.Version != newest {
		t.Fatalf("current version %d, want %d", k.Version, newest)
	}
	for ver := 1; ver <= newest; ver++ {
		_, err := src.Version("k1", ver)
		if kept := ver > newest-1-maxOlderVersions; kept != (err == nil) {
			t.Errorf("version %d: %v (kept: %v)", ver, err, kept)
		}
	}
	if !allZero(first.Key) {
		t.Fatalf("a dropped version was not wiped: %q", first.Key)
	}
}

// Releasing the version already held again (the broker had not rotated)
// extends it; a flow that took the key just before must still hold it.
func TestReleaseOfTheSameVersion(t *testing.T) {
	v := newEnv(t)
	v.broker.same = true
	c := compile(t, securePolicy("p", "k1"))
	src := v.ring.For(c)
	if err := v.ring.Ensure(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	inFlight, _ := src.Current("k1")
	v.clock.set(t0.Add(55 * time.Minute))
	if _, err := v.ring.release(context.Background(), heldKey{"k1", c.Hash}); err != nil {
		t.Fatal(err)
	}
	want := keyBytes("k1", c.Hash, 1)
	if !bytes.Equal(inFlight.Key, want) {
		t.Fatalf("a flow's key was overwritten by the re-release of its version: %q", inFlight.Key)
	}
	v.clock.set(t0.Add(90 * time.Minute)) // past the first NotAfter
	k, err := src.Current("k1")
	if err != nil || k.Version != 1 || !bytes.Equal(k.Key, want) {
		t.Fatalf("current after re-release: %+v %v", k, err)
	}
	if st := v.ring.Status(); len(st.Keys) != 1 || !st.Keys[0].NotAfter.Equal(t0.Add(115*time.Minute)) {
		t.Fatalf("status %+v", st.Keys)
	}
}

// Status lists what is held, sorted by key id and policy, never the
// bytes, and says the evidence is simulated.
func TestStatus(t *testing.T) {
	v := newEnv(t)
	a, b := compile(t, securePolicy("a", "k2", "k1")), compile(t, securePolicy("b", "k1"))
	if err := v.ring.Ensure(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	v.clock.set(t0.Add(time.Minute))
	if err := v.ring.Ensure(context.Background(), a); err != nil {
		t.Fatal(err)
	}
	st := v.ring.Status()
	if !st.Configured || st.Broker != brokerURL || !st.Simulated || !strings.Contains(st.Evidence, "SIMULATED") {
		t.Fatalf("status %+v", st)
	}
	if st.LastRelease == nil || !st.LastRelease.Equal(t0.Add(time.Minute)) {
		t.Fatalf("last release %v", st.LastRelease)
	}
	lo, hi := a.Hash, b.Hash
	if lo > hi {
		lo, hi = hi, lo
	}
	var got []string
	for _, k := range st.Keys {
		got = append(got, k.ID+"@"+k.PolicySHA256)
		if k.Version != 1 || !k.NotAfter.Equal(k.ReleasedAt.Add(time.Hour)) {
			t.Errorf("held key %+v", k)
		}
	}
	want := []string{"k1@" + lo, "k1@" + hi, "k2@" + a.Hash}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("keys %v, want %v", got, want)
	}
	if !st.Keys[2].ReleasedAt.Equal(t0.Add(time.Minute)) {
		t.Fatalf("k2 released at %v", st.Keys[2].ReleasedAt)
	}
}

// Start records the evidence's measurement, releases keys again before
// they expire, and wipes every key when its context ends.
func TestStartRefreshesAndWipes(t *testing.T) {
	v := newEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := v.ring.Start(ctx); err != nil {
		t.Fatal(err)
	}
	m := v.att.Config().Measurement
	if st := v.ring.Status(); st.Measurement != hex.EncodeToString(m[:]) {
		t.Fatalf("measurement %q", st.Measurement)
	}
	c := compile(t, securePolicy("p", "k1"))
	src := v.ring.For(c)
	if err := v.ring.Ensure(ctx, c); err != nil {
		t.Fatal(err)
	}
	if recs := v.audit.of(AuditRelease); len(recs) != 1 || recs[0].fields["measurement"] != hex.EncodeToString(m[:]) {
		t.Fatalf("release audit records %v", recs)
	}
	v1, _ := src.Current("k1")
	// Within the last tenth of its validity: the next tick (every RefreshInterval)
	// releases version 2.
	v.clock.set(t0.Add(55 * time.Minute))
	deadline := time.Now().Add(15 * time.Second)
	for len(v.broker.received()) < 2 {
		if time.Now().After(deadline) {
			t.Fatal("the key was not released again before its expiry")
		}
		time.Sleep(50 * time.Millisecond)
	}
	waitFor(t, func() bool { k, _ := src.Current("k1"); return k.Version == 2 }, "version 2 current")
	v2, _ := src.Current("k1")
	cancel()
	waitFor(t, func() bool { return len(v.ring.Status().Keys) == 0 }, "keys gone after the context ended")
	if _, err := src.Current("k1"); !errors.Is(err, proxies.ErrNoKey) {
		t.Fatalf("a key after the wipe: %v", err)
	}
	if !allZero(v1.Key) || !allZero(v2.Key) {
		t.Fatalf("keys not wiped: %q %q", v1.Key, v2.Key)
	}
}

func TestStartWithoutEvidence(t *testing.T) {
	v := newEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // the simulated attester refuses evidence for an ended context
	if err := v.ring.Start(ctx); err == nil || !errors.Is(err, context.Canceled) {
		t.Fatalf("Start without evidence: %v", err)
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return len(b) > 0
}
