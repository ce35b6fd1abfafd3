package daemon

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/internal/testutil"

	"github.com/cleanwall/cleanwall/runtime/api"
)

const consentPolicy = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: governed}
spec:
  governance: {consent: required}
  egress:
    - name: results
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}]
      mode: open
`

// A policy that needs consent is refused, naming the missing flag, by a
// daemon without --consent-url, at ADD and at apply; others are not.
func TestConsentRequiredWithoutService(t *testing.T) {
	td := startTest(t, Config{})
	_, err := td.client.Add(ctx(), td.request("a", 2, consentPolicy))
	var ae *api.Error
	if err == nil || !strings.Contains(err.Error(), "no --consent-url") || !errorsAs(err, &ae) || ae.Field != "policy" {
		t.Fatalf("ADD: %v", err)
	}
	if m, _ := td.dp.Sandboxes(); len(m) != 0 {
		t.Fatalf("%d datapath sandboxes after the refused ADD", len(m))
	}
	if _, err := td.client.Add(ctx(), td.request("b", 3, openPolicy)); err != nil {
		t.Fatal(err)
	}
	if _, err := td.client.ApplyPolicy(ctx(), "c-b", "eth0", api.ApplyRequest{Policy: []byte(consentPolicy)}); err == nil || !strings.Contains(err.Error(), "no --consent-url") {
		t.Fatalf("apply: %v", err)
	}
	if _, err := td.client.ConsentRefresh(ctx(), ""); err == nil || !strings.Contains(err.Error(), "no --consent-url") {
		t.Fatalf("refresh: %v", err)
	}
}

func errorsAs(err error, target **api.Error) bool {
	e, ok := err.(*api.Error)
	if ok {
		*target = e
	}
	return ok
}

// consentStub is a consent service that allows what is in allow.
type consentStub struct {
	srv    *httptest.Server
	caFile string
	mu     sync.Mutex
	allow  map[string]bool // kind/policy/rule
	reqs   []map[string]string
}

func newConsentStub(t *testing.T) *consentStub {
	s := &consentStub{allow: map[string]bool{}}
	s.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req map[string]string
		_ = json.NewDecoder(r.Body).Decode(&req)
		s.mu.Lock()
		s.reqs = append(s.reqs, req)
		ok := s.allow[req["kind"]+"/"+req["policy"]+"/"+req["rule"]]
		s.mu.Unlock()
		if ok {
			_, _ = w.Write([]byte(`{"decision":"allow","ttlSeconds":3600}`))
		} else {
			_, _ = w.Write([]byte(`{"decision":"deny","ttlSeconds":3600,"reason":"not granted"}`))
		}
	}))
	t.Cleanup(s.srv.Close)
	s.caFile = filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(s.caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.srv.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *consentStub) set(key string, ok bool) {
	s.mu.Lock()
	s.allow[key] = ok
	s.mu.Unlock()
}

func (s *consentStub) requests() []map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]map[string]string(nil), s.reqs...)
}

func startConsentTest(t *testing.T, s *consentStub) *testDaemon {
	td := startTest(t, Config{ConsentURL: s.srv.URL, ConsentCA: s.caFile})
	if err := td.consent.start(td.ctx); err != nil {
		t.Fatal(err)
	}
	return td
}

// execute is asked at ADD with the policy file's hash: a deny refuses the
// ADD naming the service's reason and leaves nothing; an allow admits.
// Deleting the sandbox forgets its answers.
func TestConsentAtAdmission(t *testing.T) {
	s := newConsentStub(t)
	td := startConsentTest(t, s)
	_, err := td.client.Add(ctx(), td.request("a", 2, consentPolicy))
	if err == nil || !strings.Contains(err.Error(), `consent: denied (execute, policy "governed")`) || !strings.Contains(err.Error(), "not granted") {
		t.Fatalf("ADD without consent: %v", err)
	}
	if m, _ := td.dp.Sandboxes(); len(m) != 0 {
		t.Fatalf("%d datapath sandboxes after the refused ADD", len(m))
	}
	if keys := td.consent.cache.Keys(); len(keys) != 0 {
		t.Fatalf("a refused ADD's answers are kept: %+v", keys)
	}
	s.set("execute/governed/", true)
	if _, err := td.client.Add(ctx(), td.request("a", 2, consentPolicy)); err != nil {
		t.Fatal(err)
	}
	reqs := s.requests()
	last := reqs[len(reqs)-1]
	if last["kind"] != "execute" || last["sandbox"] != "c-a" || last["policySHA256"] != policySHA256([]byte(consentPolicy)) || last["node"] == "" {
		t.Fatalf("request %+v", last)
	}
	if keys := td.consent.cache.Keys(); len(keys) != 1 {
		t.Fatalf("cached answers: %+v", keys)
	}
	// Refresh asks again (one answer: execute) and reports it.
	res, err := td.client.ConsentRefresh(ctx(), "c-a")
	if err != nil || len(res.Answers) != 1 || res.Answers[0].Decision != "allow" || res.Answers[0].Kind != "execute" {
		t.Fatalf("refresh: %+v %v", res, err)
	}
	if _, err := td.client.ConsentRefresh(ctx(), "c-none"); err == nil || !strings.Contains(err.Error(), "no sandbox c-none") {
		t.Fatalf("refresh of an unknown sandbox: %v", err)
	}
	// A new policy version is a new question: not granted, the apply is refused.
	changed := strings.Replace(consentPolicy, "name: governed", "name: governed2", 1)
	if _, err := td.client.ApplyPolicy(ctx(), "c-a", "eth0", api.ApplyRequest{Policy: []byte(changed)}); err == nil || !strings.Contains(err.Error(), "consent: denied") {
		t.Fatalf("apply without consent: %v", err)
	}
	if err := td.client.Delete(ctx(), "c-a", "eth0"); err != nil {
		t.Fatal(err)
	}
	if keys := td.consent.cache.Keys(); len(keys) != 0 {
		t.Fatalf("a deleted sandbox's answers are kept: %+v", keys)
	}
}

// After a restart, execute is asked again for the re-adopted sandboxes
// whose policy needs consent, before any flow asks.
func TestConsentAskedAfterRestart(t *testing.T) {
	s := newConsentStub(t)
	s.set("execute/governed/", true)
	td := startConsentTest(t, s)
	if _, err := td.client.Add(ctx(), td.request("r", 6, consentPolicy)); err != nil {
		t.Fatal(err)
	}
	if _, err := td.client.Add(ctx(), td.request("o", 7, openPolicy)); err != nil {
		t.Fatal(err)
	}
	td.Close()
	before := len(s.requests())
	cfg := td.cfg
	cfg.Logger = testutil.Logger(t)
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.audit = &auditor{log: d.log}
	defer d.Close()
	if err := d.wire(td.dp, td.links, td.wall); err != nil {
		t.Fatal(err)
	}
	if err := d.consent.start(d.ctx); err != nil {
		t.Fatal(err)
	}
	if err := d.reconcile(); err != nil {
		t.Fatal(err)
	}
	d.consent.adopted()
	deadline := time.Now().Add(5 * time.Second)
	for len(s.requests()) == before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	reqs := s.requests()[before:]
	if len(reqs) != 1 || reqs[0]["kind"] != "execute" || reqs[0]["sandbox"] != "c-r" {
		t.Fatalf("requests after the restart: %+v (want execute for c-r only)", reqs)
	}
}
