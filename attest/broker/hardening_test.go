package broker_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/broker"
	"github.com/cleanwall/cleanwall/attest/broker/client"
	"github.com/cleanwall/cleanwall/attest/simulated"
)

// flood sends n challenge requests from workers concurrent clients over
// kept-alive connections; every tenth names a key the broker does not have
// and every twentieth is not JSON. It returns how many were answered 200.
func flood(t *testing.T, e *env, n, workers int) (issued int64) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: e.pool},
		MaxIdleConnsPerHost: workers,
	}, Timeout: 30 * time.Second}
	defer hc.CloseIdleConnections()
	var next, ok atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				i := next.Add(1)
				if i > int64(n) {
					return
				}
				body := `{"keyID":"` + keyID + `"}`
				switch {
				case i%20 == 0:
					body = `{"keyID":`
				case i%10 == 0:
					body = fmt.Sprintf(`{"keyID":"guess-%d"}`, i)
				}
				resp, err := hc.Post(e.url+"/v1/challenge", "application/json", strings.NewReader(body))
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					ok.Add(1)
				}
			}
		})
	}
	wg.Wait()
	return ok.Load()
}

func heapAlloc() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// TestChallengeFlood is the review's finding: 10,000 unauthenticated
// challenges in 8 s locked every node out for a minute and wrote 10,000
// audit lines. Now they cost no state: a legitimate client is released a
// key during and right after the flood, the audit log grows by a few tally
// records, and replayed and expired sessions are still refused.
func TestChallengeFlood(t *testing.T) {
	const n, workers = 12000, 8
	e := startBroker(t, envOptions{allowSimulated: true, quiet: true})
	legit := client.New(e.url, e.pool, newSim(t, nil))
	before := e.records()
	heapBefore := heapAlloc()

	start := time.Now()
	var during error
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, during = legit.Release(context.Background(), keyID)
	}()
	issued := flood(t, e, n, workers)
	elapsed := time.Since(start)
	<-done
	heapAfter := heapAlloc()
	if during != nil {
		t.Fatalf("release during the flood: %v", during)
	}
	if want := int64(n - n/10); issued != want {
		t.Fatalf("%d challenges issued, want %d (every one for a configured key)", issued, want)
	}
	// Followed by a successful release.
	k, err := legit.Release(context.Background(), keyID)
	if err != nil {
		t.Fatalf("release after the flood: %v", err)
	}
	if !bytes.Equal(k.Bytes, storedKey(t, e, keyID).Bytes) {
		t.Fatal("wrong key released")
	}
	if got := e.srv.UsedSessions(); got != 2 {
		t.Fatalf("%d used sessions kept, want the 2 released (a challenge stores nothing)", got)
	}
	t.Logf("flood: %d challenges from %d clients in %v: %.0f challenges/s; heap %+.1f MiB after vs before (GC'd)",
		n, workers, elapsed.Round(time.Millisecond), float64(n)/elapsed.Seconds(), (float64(heapAfter)-float64(heapBefore))/(1<<20))

	// The audit log: a few tally records, whose counts add up.
	if err := e.srv.FlushAudit(); err != nil {
		t.Fatal(err)
	}
	recs := e.records()[len(before):]
	var challenges, tallies, granted int
	refused := map[string]int{}
	for _, r := range recs {
		switch r.Kind {
		case broker.KindChallenge:
			tallies++
			var c int
			fmt.Sscan(field(r, "challenges"), &c)
			challenges += c
			for code, v := range r.Fields["refused"].(map[string]any) {
				var k int
				fmt.Sscan(fmt.Sprint(v), &k)
				refused[code] += k
			}
			if reqs := r.Fields["requesters"].(map[string]any); len(reqs) != 1 || reqs["127.0.0.1"] == nil {
				t.Errorf("tally requesters %v, want 127.0.0.1 only", reqs)
			}
		case broker.KindRelease:
			if field(r, "decision") == "granted" {
				granted++
			}
		}
	}
	info, _ := os.Stat(e.auditPath)
	t.Logf("audit log: %d records for the flood (%d tallies), %d bytes in all", len(recs), tallies, info.Size())
	if challenges != n+2 || refused["unknown-key"] != n/10-n/20 || refused["bad-request"] != n/20 || granted != 2 {
		t.Fatalf("tallies count %d challenges (want %d), refused %v, %d granted", challenges, n+2, refused, granted)
	}
	if len(recs) > 10 {
		t.Fatalf("%d audit records for one flood: the challenges are not aggregated", len(recs))
	}

	// Replay protection still holds, with its reasons.
	a := newSim(t, nil)
	kem, _ := attest.KEM(attest.KEMX25519)
	priv, _ := kem.GenerateKey()
	pub := priv.PublicKey().Bytes()
	ch := challenge(t, e, keyID)
	body := releaseBody(t, a, ch, keyID, pub, pub)
	if _, er := e.post("/v1/release", body, &attest.ReleaseResponse{}); er != nil {
		t.Fatalf("release: %+v", er)
	}
	status, er := e.post("/v1/release", body, nil)
	wantRefusal(t, e, status, er, attest.CodeNonceReplayed, "already used")
	stale := challenge(t, e, keyID)
	e.clock.advance(61 * time.Second)
	status, er = e.post("/v1/release", releaseBody(t, a, stale, keyID, pub, pub), nil)
	wantRefusal(t, e, status, er, attest.CodeNonceExpired, "expired")
}

// TestUsedSessionsBounded: the replay protection has bounded memory, and
// when it is full the broker refuses releases instead of forgetting a used
// session; expired sessions make room.
func TestUsedSessionsBounded(t *testing.T) {
	e := startBroker(t, envOptions{allowSimulated: true, extra: "challenges: {maxUsed: 2, ttl: 10s}\n"})
	a := newSim(t, nil)
	kem, _ := attest.KEM(attest.KEMX25519)
	priv, _ := kem.GenerateKey()
	pub := priv.PublicKey().Bytes()
	var first []byte
	for i := range 2 {
		ch := challenge(t, e, keyID)
		body := releaseBody(t, a, ch, keyID, pub, pub)
		if _, er := e.post("/v1/release", body, &attest.ReleaseResponse{}); er != nil {
			t.Fatalf("release %d: %+v", i, er)
		}
		if i == 0 {
			first = body
		}
	}
	// Full: a valid release is refused as unavailable, with Retry-After.
	ch := challenge(t, e, keyID)
	resp, err := e.httpClient().Post(e.url+"/v1/release", "application/json", bytes.NewReader(releaseBody(t, a, ch, keyID, pub, pub)))
	if err != nil {
		t.Fatal(err)
	}
	data, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(data), `"unavailable"`) || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("third release: %d %s (Retry-After %q)", resp.StatusCode, data, resp.Header.Get("Retry-After"))
	}
	if rec := e.lastRecord(broker.KindRelease); field(rec, "code") != "unavailable" {
		t.Fatalf("refusal not audited: %+v", rec.Fields)
	}
	// The used sessions are not forgotten.
	status, er := e.post("/v1/release", first, nil)
	wantRefusal(t, e, status, er, attest.CodeNonceReplayed, "already used")
	// Once they expire there is room again.
	e.clock.advance(11 * time.Second)
	if _, err := client.New(e.url, e.pool, a).Release(context.Background(), keyID); err != nil {
		t.Fatalf("release after the used sessions expired: %v", err)
	}
	if got := e.srv.UsedSessions(); got != 1 {
		t.Fatalf("%d used sessions kept, want 1", got)
	}
}

// TestSessionsDoNotSurviveARestart: the MAC key is drawn at start, so a
// session of the previous process (whose used set is gone) is unknown.
func TestSessionsDoNotSurviveARestart(t *testing.T) {
	e := startBroker(t, envOptions{allowSimulated: true})
	ch := challenge(t, e, keyID)
	e.stop()
	e2 := startBroker(t, envOptions{allowSimulated: true, dir: e.dir})
	kem, _ := attest.KEM(attest.KEMX25519)
	priv, _ := kem.GenerateKey()
	pub := priv.PublicKey().Bytes()
	status, er := e2.post("/v1/release", releaseBody(t, newSim(t, nil), ch, keyID, pub, pub), nil)
	wantRefusal(t, e2, status, er, attest.CodeNonceUnknown, "before it restarted")
}

// TestChallengesNeedTheAuditLog: when the tally cannot be written, no
// challenge is issued (a decision that cannot be audited is not made).
func TestChallengesNeedTheAuditLog(t *testing.T) {
	e := startBroker(t, envOptions{allowSimulated: true, extra: "challenges: {auditInterval: 1s}\n"})
	challenge(t, e, keyID)
	e.closeAudit()
	e.clock.advance(2 * time.Second)
	status, er := e.post("/v1/challenge", mustJSON(attest.ChallengeRequest{KeyID: keyID}), nil)
	if status != http.StatusInternalServerError || er == nil || er.Error != attest.CodeInternal {
		t.Fatalf("challenge with a closed audit log: %d %+v", status, er)
	}
}

// TestEveryProductLineReleased: simulated evidence of Milan, Genoa and
// Turin chips, signed with a VCEK or a VLEK, is released a key.
func TestEveryProductLineReleased(t *testing.T) {
	e := startBroker(t, envOptions{allowSimulated: true})
	for _, product := range simulated.Products {
		for _, vlek := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s vlek=%v", product, vlek), func(t *testing.T) {
				a := newSim(t, func(c *simulated.Config) { c.Product, c.VLEK = product, vlek })
				k, err := client.New(e.url, e.pool, a).Release(context.Background(), keyID)
				if err != nil {
					t.Fatal(err)
				}
				if !k.Evidence.Simulated || k.Version != 1 {
					t.Fatalf("key %+v", k)
				}
				if r := e.lastRecord(broker.KindRelease); field(r, "decision") != "granted" || field(r, "simulated") != "true" {
					t.Fatalf("audit %+v", r.Fields)
				}
			})
		}
	}
}

// TestSimulatedProductLineNotConfigured: a broker that trusts some product
// lines' simulated roots refuses the others with a reason that names them.
func TestSimulatedProductLineNotConfigured(t *testing.T) {
	e := startBroker(t, envOptions{allowSimulated: true, extra: "simulatedProductLines: [Milan]\n"})
	if _, err := client.New(e.url, e.pool, newSim(t, nil)).Release(context.Background(), keyID); err != nil {
		t.Fatalf("Milan: %v", err)
	}
	for _, product := range []string{"Genoa-B1", "Turin-B0"} {
		line, _ := simulated.ProductLine(product)
		a := newSim(t, func(c *simulated.Config) { c.Product = product })
		refusedRelease(t, e, client.New(e.url, e.pool, a), keyID, attest.CodeUntrustedRoot,
			fmt.Sprintf(`simulated evidence from a chip of product line %q: this broker trusts the simulated roots of Milan only`, line))
	}
	if r := e.records()[0]; field(r, "simulatedProductLines") != "[Milan]" {
		t.Fatalf("start record %+v", r.Fields)
	}
}

// TestEgressPolicyBinding is docs/keybroker.md §5: a key whose release
// policy lists egressPolicies opens only for a request that names one of
// them; a key without the list opens for any.
func TestEgressPolicyBinding(t *testing.T) {
	approved := strings.Repeat("a1", 32)
	other := strings.Repeat("b2", 32)
	anyOf := policyFor(simulated.DefaultConfig()) + "\n          egressPolicies: [\"" + strings.Repeat("ff", 32) + "\", \"" + strings.ToUpper(approved) + "\"]"
	e := startBroker(t, envOptions{allowSimulated: true, anyOf: anyOf})
	c := client.New(e.url, e.pool, newSim(t, nil))

	k, err := c.ReleaseWith(context.Background(), keyID, client.ReleaseOptions{PolicySHA256: approved})
	if err != nil {
		t.Fatalf("listed policy: %v", err)
	}
	if !bytes.Equal(k.Bytes, storedKey(t, e, keyID).Bytes) || k.Evidence.PolicySHA256 != approved {
		t.Fatalf("key %+v", k)
	}
	if r := e.lastRecord(broker.KindRelease); field(r, "decision") != "granted" || field(r, "policySHA256") != approved {
		t.Fatalf("audit %+v", r.Fields)
	}

	_, err = c.ReleaseWith(context.Background(), keyID, client.ReleaseOptions{PolicySHA256: other})
	var ref *attest.Refusal
	if !errors.As(err, &ref) || ref.Code != attest.CodeEgressPolicyNotAllowed || ref.Status != http.StatusForbidden ||
		!strings.Contains(ref.Detail, "egress policy "+other+" is not one of the 2 allowed") {
		t.Fatalf("unlisted policy: %v", err)
	}
	if r := e.lastRecord(broker.KindRelease); field(r, "code") != "egress-policy-not-allowed" || field(r, "policySHA256") != other || field(r, "detail") != ref.Detail {
		t.Fatalf("refusal not audited: %+v", r.Fields)
	}
	refusedRelease(t, e, c, keyID, attest.CodeEgressPolicyNotAllowed, "names no egress policy")

	// No list: any policy, or none.
	for _, h := range []string{"", approved, other} {
		if _, err := c.ReleaseWith(context.Background(), "other-key", client.ReleaseOptions{PolicySHA256: h}); err != nil {
			t.Fatalf("unbound key with policy %q: %v", h, err)
		}
	}

	// The hash is bound into the evidence: naming a listed hash in a
	// request whose evidence bound another (or none) does not open the key.
	a := newSim(t, nil)
	kem, _ := attest.KEM(attest.KEMX25519)
	priv, _ := kem.GenerateKey()
	pub := priv.PublicKey().Bytes()
	otherHash, _ := hex.DecodeString(other)
	for name, bound := range map[string][]byte{"another policy": otherHash, "no policy": nil} {
		ch := challenge(t, e, keyID)
		ev, err := a.Evidence(context.Background(), attest.ReportDataWithPolicy(ch.Nonce, attest.KEMX25519, pub, keyID, bound))
		if err != nil {
			t.Fatal(err)
		}
		body := mustJSON(attest.ReleaseRequest{Session: ch.Session, KeyID: keyID, TEE: "snp", Evidence: ev, KEMID: attest.KEMX25519, PublicKey: pub, PolicySHA256: approved})
		status, er := e.post("/v1/release", body, nil)
		t.Run(name, func(t *testing.T) { wantRefusal(t, e, status, er, attest.CodeReportDataMismatch, "does not bind") })
	}

	// A malformed hash is a bad request, audited.
	ch := challenge(t, e, keyID)
	body := strings.Replace(string(releaseBody(t, a, ch, keyID, pub, pub)), `}`, `,"policySHA256":"`+approved[:60]+`"}`, 1)
	status, er := e.post("/v1/release", []byte(body), nil)
	wantRefusal(t, e, status, er, attest.CodeBadRequest, "policySHA256: malformed egress policy hash")
}
