package broker_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/broker"
	"github.com/cleanwall/cleanwall/attest/broker/client"
	"github.com/cleanwall/cleanwall/attest/broker/keystore"
	"github.com/cleanwall/cleanwall/attest/simulated"
	"github.com/cleanwall/cleanwall/attest/snp"
	"github.com/cleanwall/cleanwall/governance/audit"
)

func storedKey(t *testing.T, e *env, id string) keystore.Version {
	t.Helper()
	cfg, err := broker.LoadConfig(e.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	master, _ := keystore.LoadMasterKey(cfg.KeyStore.MasterKeyFile)
	ks, err := keystore.Open(cfg.KeyStore.Dir, master)
	if err != nil {
		t.Fatal(err)
	}
	v, err := ks.Latest(id)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestReleaseEndToEnd(t *testing.T) {
	e := startBroker(t, envOptions{allowSimulated: true})
	want := storedKey(t, e, keyID)
	for _, kem := range []uint16{attest.KEMX25519, attest.KEMMLKEM768X25519} {
		t.Run(fmt.Sprintf("kem 0x%04x", kem), func(t *testing.T) {
			c := client.New(e.url, e.pool, newSim(t, nil))
			c.KEMID = kem
			k, err := c.Release(context.Background(), keyID)
			if err != nil {
				t.Fatal(err)
			}
			if k.ID != keyID || k.Version != 1 || !bytes.Equal(k.Bytes, want.Bytes) {
				t.Fatalf("released %s v%d %x, want v1 %x", k.ID, k.Version, k.Bytes, want.Bytes)
			}
			if !k.Evidence.Simulated || k.Evidence.TEE != "snp" || k.Evidence.Session == "" {
				t.Fatalf("evidence info %+v", k.Evidence)
			}
			if d := time.Until(k.NotAfter); d < 59*time.Minute || d > 61*time.Minute {
				t.Fatalf("notAfter %v from now, want 1h", d)
			}
			r := e.lastRecord(broker.KindRelease)
			for name, want := range map[string]string{
				"decision": "granted", "keyID": keyID, "version": "1", "simulated": "true", "simulatedAllowed": "true",
				"session": k.Evidence.Session, "kemID": fmt.Sprint(kem), "policyEntry": "0", "tee": "snp",
				"measurement": fmt.Sprintf("%x", simulated.DefaultConfig().Measurement),
			} {
				if got := field(r, name); got != want {
					t.Errorf("audit %s = %s, want %s", name, got, want)
				}
			}
			if !strings.HasPrefix(field(r, "requester"), "127.0.0.1:") {
				t.Errorf("audit requester = %s", field(r, "requester"))
			}
		})
	}
	if r := e.records()[0]; r.Kind != broker.KindStart || field(r, "simulatedAllowed") != "true" {
		t.Fatalf("first audit record %+v", r)
	}
}

// refusedRelease asserts that c's release is refused with code, with the
// detail mentioning detail, and that the audit log recorded the refusal.
func refusedRelease(t *testing.T, e *env, c *client.Client, key string, code attest.Code, detail string) {
	t.Helper()
	_, err := c.Release(context.Background(), key)
	var r *attest.Refusal
	if !errors.As(err, &r) || !errors.Is(err, code) {
		t.Fatalf("Release = %v, want refusal %s", err, code)
	}
	if !strings.Contains(r.Detail, detail) || r.Status != code.HTTPStatus() {
		t.Fatalf("refusal %s (status %d): detail %q does not mention %q", r.Code, r.Status, r.Detail, detail)
	}
	if code == attest.CodeUnknownKey {
		// Refused at the challenge: counted in the challenge tally.
		if err := e.srv.FlushAudit(); err != nil {
			t.Fatal(err)
		}
		rec := e.lastRecord(broker.KindChallenge)
		if field(rec, "refused") != "map[unknown-key:1]" {
			t.Fatalf("challenge tally %+v does not count the refusal %s", rec.Fields, code)
		}
		return
	}
	rec := e.lastRecord(broker.KindRelease)
	if field(rec, "decision") != "refused" || field(rec, "code") != string(code) || field(rec, "detail") != r.Detail {
		t.Fatalf("audit record %+v does not record the refusal %s", rec.Fields, code)
	}
}

func TestReleaseRefusals(t *testing.T) {
	e := startBroker(t, envOptions{allowSimulated: true, anyOf: policyFor(simulated.DefaultConfig())})
	untrusted, err := simulated.NewUntrusted(simulated.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		attester attest.Attester
		key      string
		code     attest.Code
		detail   string
	}{
		{"wrong measurement", newSim(t, func(c *simulated.Config) { c.Measurement[47] ^= 0xff }), keyID, attest.CodeMeasurementNotAllowed, "measurement"},
		{"debug guest policy", newSim(t, func(c *simulated.Config) { c.Debug = true }), keyID, attest.CodeDebugNotAllowed, "debugging"},
		{"tcb below minimum", newSim(t, func(c *simulated.Config) { c.TCB.SNP = 7 }), keyID, attest.CodeTCBTooLow, "below the minimum"},
		{"firmware too old", newSim(t, func(c *simulated.Config) { c.Firmware.Minor = 54 }), keyID, attest.CodeFirmwareTooOld, "1.54 is older than 1.55"},
		{"wrong host data", newSim(t, func(c *simulated.Config) { c.HostData[0] ^= 1 }), keyID, attest.CodeHostDataMismatch, "host data"},
		{"vmpl", newSim(t, func(c *simulated.Config) { c.VMPL = 2 }), keyID, attest.CodeVMPLNotAllowed, "VMPL 2, want 0"},
		{"tampered report byte", mutatingAttester{newSim(t, nil), func(ev []byte) []byte {
			ev[0x1A0] ^= 0x80 // CHIP_ID, inside the signed part
			return ev
		}}, keyID, attest.CodeSignatureInvalid, "signature"},
		{"untrusted chain", untrusted, keyID, attest.CodeUntrustedRoot, "trusted"},
		{"malformed evidence", mutatingAttester{newSim(t, nil), func(ev []byte) []byte { return ev[:snp.ReportSize+10] }}, keyID, attest.CodeEvidenceMalformed, "terminating entry"},
		{"unknown key", newSim(t, nil), "no-such-key", attest.CodeUnknownKey, "no-such-key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			refusedRelease(t, e, client.New(e.url, e.pool, tc.attester), tc.key, tc.code, tc.detail)
		})
	}
}

func TestChipNotAllowed(t *testing.T) {
	c := simulated.DefaultConfig()
	other := strings.Repeat("ab", 64)
	anyOf := strings.Replace(policyFor(c), "allowedChipIDs: []", `allowedChipIDs: ["`+other+`"]`, 1)
	e := startBroker(t, envOptions{allowSimulated: true, anyOf: anyOf})
	refusedRelease(t, e, client.New(e.url, e.pool, newSim(t, nil)), keyID, attest.CodeChipNotAllowed, "chip")
}

func TestSeveralEntriesFailDifferently(t *testing.T) {
	c := simulated.DefaultConfig()
	wrongMeasurement := c
	wrongMeasurement.Measurement[0] ^= 1
	wrongHost := c
	wrongHost.HostData[0] ^= 1
	e := startBroker(t, envOptions{allowSimulated: true, anyOf: policyFor(wrongMeasurement) + policyFor(wrongHost)})
	refusedRelease(t, e, client.New(e.url, e.pool, newSim(t, nil)), keyID, attest.CodePolicyNotSatisfied,
		"(measurement-not-allowed) | anyOf[1]: host data")
}

func TestSimulatedNotAllowed(t *testing.T) {
	e := startBroker(t, envOptions{allowSimulated: false})
	refusedRelease(t, e, client.New(e.url, e.pool, newSim(t, nil)), keyID, attest.CodeSimulatedNotAllowed, "does not allow simulated")
	if r := e.lastRecord(broker.KindRelease); field(r, "simulatedAllowed") != "false" || field(r, "simulated") != "true" {
		t.Fatalf("audit record %+v", r.Fields)
	}
}

func challenge(t *testing.T, e *env, key string) attest.ChallengeResponse {
	t.Helper()
	var ch attest.ChallengeResponse
	if status, er := e.post("/v1/challenge", mustJSON(attest.ChallengeRequest{KeyID: key}), &ch); er != nil {
		t.Fatalf("challenge: %d %+v", status, er)
	}
	return ch
}

// releaseBody builds a release request for session ch with evidence bound to boundPub, sending sentPub.
func releaseBody(t *testing.T, a attest.Attester, ch attest.ChallengeResponse, key string, boundPub, sentPub []byte) []byte {
	t.Helper()
	rd := attest.ReportData(ch.Nonce, attest.KEMX25519, boundPub, key)
	ev, err := a.Evidence(context.Background(), rd)
	if err != nil {
		t.Fatal(err)
	}
	return mustJSON(attest.ReleaseRequest{Session: ch.Session, KeyID: key, TEE: "snp", Evidence: ev, KEMID: attest.KEMX25519, PublicKey: sentPub})
}

func wantRefusal(t *testing.T, e *env, status int, er *attest.ErrorResponse, code attest.Code, detail string) {
	t.Helper()
	if er == nil || er.Error != code || status != code.HTTPStatus() || !strings.Contains(er.Detail, detail) {
		t.Fatalf("got %d %+v, want %s mentioning %q", status, er, code, detail)
	}
	kind := broker.KindRelease
	if rec := e.lastRecord(kind); field(rec, "code") != string(code) || field(rec, "decision") != "refused" {
		t.Fatalf("audit record %+v, want refused %s", rec.Fields, code)
	}
}

func TestReplayAndSubstitution(t *testing.T) {
	e := startBroker(t, envOptions{allowSimulated: true})
	a := newSim(t, nil)
	kem, _ := attest.KEM(attest.KEMX25519)
	priv, _ := kem.GenerateKey()
	pub := priv.PublicKey().Bytes()

	t.Run("granted once, then replayed", func(t *testing.T) {
		ch := challenge(t, e, keyID)
		body := releaseBody(t, a, ch, keyID, pub, pub)
		var rel attest.ReleaseResponse
		if _, er := e.post("/v1/release", body, &rel); er != nil {
			t.Fatalf("release: %+v", er)
		}
		rd := attest.ReportData(ch.Nonce, attest.KEMX25519, pub, keyID)
		key, err := attest.OpenKey(priv, rd, rel.Sealed)
		if err != nil || !bytes.Equal(key, storedKey(t, e, keyID).Bytes) {
			t.Fatalf("opening with the ephemeral key: %v", err)
		}
		// The sealed key is useless to anyone without the ephemeral private key.
		stranger, _ := kem.GenerateKey()
		if _, err := attest.OpenKey(stranger, rd, rel.Sealed); err == nil {
			t.Fatal("sealed key opened with another private key")
		}
		if bytes.Contains(mustJSON(rel), key) {
			t.Fatal("key bytes in the clear in the response")
		}
		status, er := e.post("/v1/release", body, nil)
		wantRefusal(t, e, status, er, attest.CodeNonceReplayed, "already used")
	})
	t.Run("expired", func(t *testing.T) {
		ch := challenge(t, e, keyID)
		e.clock.advance(61 * time.Second)
		status, er := e.post("/v1/release", releaseBody(t, a, ch, keyID, pub, pub), nil)
		wantRefusal(t, e, status, er, attest.CodeNonceExpired, "expired")
	})
	t.Run("unknown session", func(t *testing.T) {
		ch := challenge(t, e, keyID)
		ch.Session = "forged-session"
		status, er := e.post("/v1/release", releaseBody(t, a, ch, keyID, pub, pub), nil)
		wantRefusal(t, e, status, er, attest.CodeNonceUnknown, "not a session this broker issued")
		// A session whose expiry or key index was changed: its MAC no longer holds.
		raw, _ := base64.RawURLEncoding.DecodeString(challenge(t, e, keyID).Session)
		raw[8]++ // the expiry's last byte
		ch.Session = base64.RawURLEncoding.EncodeToString(raw)
		status, er = e.post("/v1/release", releaseBody(t, a, ch, keyID, pub, pub), nil)
		wantRefusal(t, e, status, er, attest.CodeNonceUnknown, "not a session this broker issued")
	})
	t.Run("refused for unverifiable evidence, the session stays usable", func(t *testing.T) {
		ch := challenge(t, e, keyID)
		u, err := simulated.NewUntrusted(simulated.DefaultConfig())
		if err != nil {
			t.Fatal(err)
		}
		status, er := e.post("/v1/release", releaseBody(t, u, ch, keyID, pub, pub), nil)
		wantRefusal(t, e, status, er, attest.CodeUntrustedRoot, "trusted")
		var rel attest.ReleaseResponse
		if _, er := e.post("/v1/release", releaseBody(t, a, ch, keyID, pub, pub), &rel); er != nil {
			t.Fatalf("the session was spent by evidence that did not verify: %+v", er)
		}
		status, er = e.post("/v1/release", releaseBody(t, a, ch, keyID, pub, pub), nil)
		wantRefusal(t, e, status, er, attest.CodeNonceReplayed, "already used")
	})
	t.Run("replayed after expiry", func(t *testing.T) {
		ch := challenge(t, e, keyID)
		body := releaseBody(t, a, ch, keyID, pub, pub)
		if _, er := e.post("/v1/release", body, &attest.ReleaseResponse{}); er != nil {
			t.Fatalf("release: %+v", er)
		}
		e.clock.advance(61 * time.Second)
		status, er := e.post("/v1/release", body, nil)
		wantRefusal(t, e, status, er, attest.CodeNonceExpired, "expired")
	})
	t.Run("swapped public key", func(t *testing.T) {
		// Evidence bound to the attester's key, sent with the attacker's.
		attacker, _ := kem.GenerateKey()
		ch := challenge(t, e, keyID)
		status, er := e.post("/v1/release", releaseBody(t, a, ch, keyID, pub, attacker.PublicKey().Bytes()), nil)
		wantRefusal(t, e, status, er, attest.CodeReportDataMismatch, "does not bind")
	})
	t.Run("evidence bound to another nonce", func(t *testing.T) {
		old := challenge(t, e, keyID)
		ch := challenge(t, e, keyID)
		body := releaseBody(t, a, old, keyID, pub, pub)
		var req attest.ReleaseRequest
		req, _ = attest.DecodeReleaseRequest(body)
		req.Session = ch.Session
		status, er := e.post("/v1/release", mustJSON(req), nil)
		wantRefusal(t, e, status, er, attest.CodeReportDataMismatch, "does not bind")
	})
	t.Run("evidence bound to another key id", func(t *testing.T) {
		ch := challenge(t, e, "other-key")
		rd := attest.ReportData(ch.Nonce, attest.KEMX25519, pub, keyID)
		ev, _ := a.Evidence(context.Background(), rd)
		body := mustJSON(attest.ReleaseRequest{Session: ch.Session, KeyID: "other-key", TEE: "snp", Evidence: ev, KEMID: attest.KEMX25519, PublicKey: pub})
		status, er := e.post("/v1/release", body, nil)
		wantRefusal(t, e, status, er, attest.CodeReportDataMismatch, "does not bind")
	})
	t.Run("session of another key", func(t *testing.T) {
		ch := challenge(t, e, "other-key")
		status, er := e.post("/v1/release", releaseBody(t, a, ch, keyID, pub, pub), nil)
		wantRefusal(t, e, status, er, attest.CodeBadRequest, `issued for key "other-key"`)
	})
}

func TestBadRequests(t *testing.T) {
	e := startBroker(t, envOptions{allowSimulated: true})
	for _, tc := range []struct {
		name, path, body, detail string
		status                   int
	}{
		{"malformed json", "/v1/release", `{"session":`, "request body", 400},
		{"unknown member", "/v1/release", `{"session":"s","keyID":"egress-dek","tee":"snp","evidence":"AA==","kemID":32,"publicKey":"AA==","admin":true}`, `unknown member "admin"`, 400},
		{"unknown member in challenge", "/v1/challenge", `{"keyID":"egress-dek","nonce":"x"}`, `unknown member "nonce"`, 400},
		{"bad public key", "/v1/release", `{"session":"s","keyID":"egress-dek","tee":"snp","evidence":"AA==","kemID":32,"publicKey":"AA=="}`, "not a KEM 0x0020 public key", 400},
		{"other tee", "/v1/release", `{"session":"s","keyID":"egress-dek","tee":"tdx","evidence":"AA==","kemID":32,"publicKey":"AA=="}`, `only "snp"`, 400},
		{"too large", "/v1/release", `{"session":"` + strings.Repeat("x", attest.MaxRequestBytes) + `"}`, "exceeds", 413},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, er := e.post(tc.path, []byte(tc.body), nil)
			if er == nil || er.Error != attest.CodeBadRequest || status != tc.status || !strings.Contains(er.Detail, tc.detail) {
				t.Fatalf("got %d %+v, want %d bad-request mentioning %q", status, er, tc.status, tc.detail)
			}
		})
	}
	resp, err := e.httpClient().Get(e.url + "/v1/release")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("GET: %d", resp.StatusCode)
	}
	if rec := e.lastRecord(broker.KindRelease); field(rec, "code") != "bad-request" {
		t.Fatalf("bad request not audited: %+v", rec.Fields)
	}
}

func TestConcurrentReleases(t *testing.T) {
	e := startBroker(t, envOptions{allowSimulated: true})
	c := client.New(e.url, e.pool, newSim(t, nil))
	const n = 32
	var wg sync.WaitGroup
	keys := make([]client.Key, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() { keys[i], errs[i] = c.Release(context.Background(), keyID) })
	}
	wg.Wait()
	sessions, bindings := map[string]bool{}, map[[64]byte]bool{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("release %d: %v", i, errs[i])
		}
		if !bytes.Equal(keys[i].Bytes, keys[0].Bytes) {
			t.Fatal("releases disagree on the key")
		}
		sessions[keys[i].Evidence.Session] = true
		bindings[keys[i].Evidence.ReportData] = true
	}
	if len(sessions) != n || len(bindings) != n {
		t.Fatalf("%d distinct sessions and %d distinct report data for %d releases", len(sessions), len(bindings), n)
	}
	if err := e.srv.FlushAudit(); err != nil {
		t.Fatal(err)
	}
	challenges := 0
	for _, r := range e.records() {
		if r.Kind == broker.KindChallenge {
			var c int
			fmt.Sscan(field(r, "challenges"), &c)
			challenges += c
		}
	}
	if challenges != n {
		t.Fatalf("%d challenges counted in the audit log for %d releases", challenges, n)
	}
	granted := 0
	for _, r := range e.records() {
		if r.Kind == broker.KindRelease && field(r, "decision") == "granted" {
			granted++
		}
	}
	if granted != n {
		t.Fatalf("%d granted releases audited, want %d", granted, n)
	}
}

func TestRestartKeepsKeysAndRotationIncrements(t *testing.T) {
	e := startBroker(t, envOptions{allowSimulated: true})
	a := newSim(t, nil)
	k1, err := client.New(e.url, e.pool, a).Release(context.Background(), keyID)
	if err != nil {
		t.Fatal(err)
	}
	e.stop()

	e2 := startBroker(t, envOptions{allowSimulated: true, dir: e.dir})
	k2, err := client.New(e2.url, e2.pool, a).Release(context.Background(), keyID)
	if err != nil {
		t.Fatal(err)
	}
	if k2.Version != 1 || !bytes.Equal(k1.Bytes, k2.Bytes) {
		t.Fatalf("after restart: v%d, same bytes %v", k2.Version, bytes.Equal(k1.Bytes, k2.Bytes))
	}
	// Rotate while the broker runs (as `key create` does from another process), then reload.
	cfg, _ := broker.LoadConfig(e2.cfgPath)
	master, _ := keystore.LoadMasterKey(cfg.KeyStore.MasterKeyFile)
	ks, _ := keystore.Open(cfg.KeyStore.Dir, master)
	if v, err := ks.Create(keyID); err != nil || v != 2 {
		t.Fatalf("rotate: %d %v", v, err)
	}
	if err := e2.srv.ReloadKeys(); err != nil {
		t.Fatal(err)
	}
	k3, err := client.New(e2.url, e2.pool, a).Release(context.Background(), keyID)
	if err != nil {
		t.Fatal(err)
	}
	if k3.Version != 2 || bytes.Equal(k3.Bytes, k1.Bytes) {
		t.Fatalf("after rotation: v%d", k3.Version)
	}
	e2.stop()

	// The audit chain ran across both runs and verifies; a tampered line is named.
	data, err := os.ReadFile(e2.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := audit.Verify(bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(string(data), "\n")
	starts, granted := 0, -1
	for i, l := range lines {
		if strings.Contains(l, `"kind":"keybroker.start"`) {
			starts++
		}
		if granted < 0 && strings.Contains(l, `"decision":"granted"`) {
			granted = i
		}
	}
	if starts != 2 || granted < 0 {
		t.Fatalf("%d start records, want 2; first granted release on line %d", starts, granted)
	}
	lines[granted] = strings.Replace(lines[granted], `"decision":"granted"`, `"decision":"refused"`, 1)
	err = audit.Verify(strings.NewReader(strings.Join(lines, "")))
	var broken *audit.BrokenError
	if !errors.As(err, &broken) || broken.Seq != uint64(granted+1) {
		t.Fatalf("tampered record %d: %v", granted+1, err)
	}
}

func TestBrokerStartErrors(t *testing.T) {
	e := startBroker(t, envOptions{allowSimulated: true})
	e.stop()
	cfg, err := broker.LoadConfig(e.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	// A configured key with no version in the store.
	os.RemoveAll(filepath.Join(cfg.KeyStore.Dir, "other-key"))
	_, err = broker.Open(cfg, nil)
	if err == nil || !strings.Contains(err.Error(), `key "other-key" has no version`) || !strings.Contains(err.Error(), "key create") {
		t.Fatalf("Open = %v", err)
	}
}
