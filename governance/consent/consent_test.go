package consent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/internal/testutil"
)

// service is a consent service on TLS whose answer the test sets, and
// which records the requests it got.
type service struct {
	srv    *httptest.Server
	mu     sync.Mutex
	answer func(w http.ResponseWriter, r *Request)
	reqs   []Request
	n      atomic.Int64
}

func newService(t *testing.T) *service {
	s := &service{answer: reply(200, `{"decision":"allow","ttlSeconds":30}`)}
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != Path || r.Header.Get("Content-Type") != "application/json" {
			http.Error(w, "bad request line", http.StatusTeapot)
			return
		}
		var req Request
		body, _ := io.ReadAll(r.Body)
		dec := json.NewDecoder(strings.NewReader(string(body)))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusTeapot)
			return
		}
		s.n.Add(1)
		s.mu.Lock()
		s.reqs = append(s.reqs, req)
		answer := s.answer
		s.mu.Unlock()
		answer(w, &req)
	}))
	s.srv.StartTLS()
	t.Cleanup(s.srv.Close)
	return s
}

func (s *service) set(f func(w http.ResponseWriter, r *Request)) {
	s.mu.Lock()
	s.answer = f
	s.mu.Unlock()
}

func (s *service) requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.reqs...)
}

func reply(status int, body string) func(http.ResponseWriter, *Request) {
	return func(w http.ResponseWriter, _ *Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_, _ = io.WriteString(w, body)
	}
}

func (s *service) roots() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(s.srv.Certificate())
	return p
}

func (s *service) client(t *testing.T, timeout time.Duration) *Client {
	t.Helper()
	c, err := NewClient(Config{URL: s.srv.URL, Roots: s.roots(), Timeout: timeout, Node: "node-1"})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var execReq = Request{Kind: KindExecute, Sandbox: "sb1", Policy: "p", PolicySHA256: strings.Repeat("ab", 32)}

func egressReq(rule string) Request {
	return Request{Kind: KindEgress, Sandbox: "sb1", Policy: "p", PolicySHA256: strings.Repeat("ab", 32), Rule: rule, Destination: "198.51.100.10:443"}
}

func TestAskSendsTheProtocolsBody(t *testing.T) {
	s := newService(t)
	s.set(reply(200, `{"decision":"allow","ttlSeconds":12,"reason":"ok by policy","extra":"optional fields are fine"}`))
	d := s.client(t, time.Second).Ask(context.Background(), egressReq("api"))
	if !d.Allow || d.TTL != 12*time.Second || d.Reason != "ok by policy" || d.Cause != "" {
		t.Fatalf("got %+v", d)
	}
	got := s.requests()
	want := egressReq("api")
	want.Node = "node-1"
	if len(got) != 1 || got[0] != want {
		t.Fatalf("service got %+v, want %+v", got, want)
	}
	// execute carries no rule or destination fields at all.
	s.client(t, time.Second).Ask(context.Background(), execReq)
	raw, _ := json.Marshal(execReq)
	if strings.Contains(string(raw), "rule") || strings.Contains(string(raw), "destination") {
		t.Fatalf("execute request %s", raw)
	}
}

// Every way an answer can fail is a deny naming its cause; the service's
// own deny has no cause.
func TestAskDenies(t *testing.T) {
	s := newService(t)
	cases := []struct {
		name   string
		answer func(http.ResponseWriter, *Request)
		cause  string
	}{
		{"deny", reply(200, `{"decision":"deny","ttlSeconds":5,"reason":"revoked"}`), ""},
		{"500", reply(500, `{"decision":"allow"}`), CauseStatus},
		{"403", reply(403, `{"decision":"allow"}`), CauseStatus},
		{"redirect", func(w http.ResponseWriter, _ *Request) {
			w.Header().Set("Location", Path+"/elsewhere")
			w.WriteHeader(http.StatusFound)
		}, CauseStatus},
		{"garbage", reply(200, `<html>allow</html>`), CauseMalformed},
		{"empty", reply(200, ``), CauseMalformed},
		{"no decision", reply(200, `{"ttlSeconds":5}`), CauseMalformed},
		{"unknown decision", reply(200, `{"decision":"Allow"}`), CauseMalformed},
		{"decision not a string", reply(200, `{"decision":true}`), CauseMalformed},
		{"trailing data", reply(200, `{"decision":"allow"} {"decision":"allow"}`), CauseMalformed},
		{"key case", reply(200, `{"Decision":"allow"}`), CauseMalformed},
		{"decision twice", reply(200, `{"decision":"deny","decision":"allow"}`), CauseMalformed},
		{"not an object", reply(200, `["allow"]`), CauseMalformed},
		{"reason not a string", reply(200, `{"decision":"allow","reason":5}`), CauseMalformed},
		{"negative ttl", reply(200, `{"decision":"allow","ttlSeconds":-1}`), CauseMalformed},
		{"ttl not a number", reply(200, `{"decision":"allow","ttlSeconds":"30"}`), CauseMalformed},
		{"huge", reply(200, `{"decision":"allow","reason":"`+strings.Repeat("x", maxBody)+`"}`), CauseMalformed},
		{"slow", func(w http.ResponseWriter, _ *Request) {
			time.Sleep(600 * time.Millisecond)
			reply(200, `{"decision":"allow"}`)(w, nil)
		}, CauseTimeout},
	}
	c := s.client(t, 300*time.Millisecond)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s.set(tc.answer)
			start := time.Now()
			d := c.Ask(context.Background(), execReq)
			if d.Allow || d.Cause != tc.cause {
				t.Fatalf("got %+v (%s), want deny with cause %q", d, d, tc.cause)
			}
			if tc.cause != "" && d.TTL != DefaultFailureTTL {
				t.Errorf("a failure is cached %v, want %v", d.TTL, DefaultFailureTTL)
			}
			if el := time.Since(start); el > 500*time.Millisecond {
				t.Errorf("took %v: past the 300ms timeout", el)
			}
		})
	}
}

func TestAskTransportFailures(t *testing.T) {
	s := newService(t)
	// A service whose certificate the client does not trust (another CA).
	dir := t.TempDir()
	testutil.TestCA(t, dir, "other")
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "other.pem"), filepath.Join(dir, "other.key"))
	if err != nil {
		t.Fatal(err)
	}
	other := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, `{"decision":"allow"}`)
	}))
	other.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	other.StartTLS()
	defer other.Close()
	c, err := NewClient(Config{URL: other.URL, Roots: s.roots(), Timeout: time.Second, Node: "n"})
	if err != nil {
		t.Fatal(err)
	}
	if d := c.Ask(context.Background(), execReq); d.Allow || d.Cause != CauseTLS {
		t.Fatalf("untrusted certificate: %+v", d)
	}
	// A plain HTTP server behind an https URL: the handshake fails.
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, `{"decision":"allow"}`)
	}))
	defer plain.Close()
	c, _ = NewClient(Config{URL: strings.Replace(plain.URL, "http:", "https:", 1), Roots: s.roots(), Timeout: time.Second, Node: "n"})
	if d := c.Ask(context.Background(), execReq); d.Allow || d.Cause != CauseTLS {
		t.Fatalf("plain HTTP server: %+v", d)
	}
	// Nobody listening.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := l.Addr().String()
	l.Close()
	c, _ = NewClient(Config{URL: "https://" + addr, Roots: s.roots(), Timeout: time.Second, Node: "n"})
	if d := c.Ask(context.Background(), execReq); d.Allow || d.Cause != CauseUnreachable {
		t.Fatalf("nobody listening: %+v", d)
	}
	// A listener that accepts and never answers: the handshake times out.
	l, _ = net.Listen("tcp", "127.0.0.1:0")
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	c, _ = NewClient(Config{URL: "https://" + l.Addr().String(), Roots: s.roots(), Timeout: 200 * time.Millisecond, Node: "n"})
	if d := c.Ask(context.Background(), execReq); d.Allow || d.Cause != CauseTimeout {
		t.Fatalf("silent listener: %+v", d)
	}
}

func TestNewClientRefuses(t *testing.T) {
	for _, cfg := range []Config{
		{URL: "http://127.0.0.1:1"},
		{URL: "127.0.0.1:1"},
		{URL: "https://127.0.0.1:1/?x=1"},
		{URL: "https://u:p@127.0.0.1:1/"},
		{URL: "https://127.0.0.1:1", CAFile: "/nonexistent/ca.pem"},
		{URL: "https://127.0.0.1:1", Timeout: -time.Second},
	} {
		if _, err := NewClient(cfg); err == nil {
			t.Errorf("%+v accepted", cfg)
		}
	}
}

func TestTTLClamp(t *testing.T) {
	s := newService(t)
	c := s.client(t, time.Second)
	for body, want := range map[string]time.Duration{
		`{"decision":"allow"}`:                     DefaultTTL,
		`{"decision":"allow","ttlSeconds":null}`:   DefaultTTL,
		`{"decision":"allow","ttlSeconds":0}`:      MinTTL,
		`{"decision":"allow","ttlSeconds":7}`:      7 * time.Second,
		`{"decision":"deny","ttlSeconds":3600}`:    time.Hour,
		`{"decision":"deny","ttlSeconds":86400}`:   MaxTTL,
		`{"decision":"allow","ttlSeconds":1e300}`:  MaxTTL,
		`{"decision":"allow","ttlSeconds":2.5}`:    2500 * time.Millisecond,
		`{"decision":"allow","ttlSeconds":0.0001}`: MinTTL,
	} {
		s.set(reply(200, body))
		if d := c.Ask(context.Background(), execReq); d.Cause != "" || d.TTL != want {
			t.Errorf("%s: %+v, want ttl %v", body, d, want)
		}
	}
}

// counter records what a cache reports.
type counter struct {
	mu     sync.Mutex
	fresh  []Decision
	cached int
	denied []Request
}

func (c *counter) hook(cache *Cache) {
	cache.Observe = func(_ Request, d Decision, src Source) {
		c.mu.Lock()
		defer c.mu.Unlock()
		if src == SourceFresh {
			c.fresh = append(c.fresh, d)
		} else {
			c.cached++
		}
	}
	cache.Denied = func(r Request, _ Decision) {
		c.mu.Lock()
		c.denied = append(c.denied, r)
		c.mu.Unlock()
	}
}

func (c *counter) counts() (fresh, cached, denied int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.fresh), c.cached, len(c.denied)
}

func newCache(t *testing.T, s *service, timeout time.Duration) (*Cache, *counter) {
	ctx, cancel := context.WithCancel(context.Background())
	cache := NewCache(ctx, s.client(t, timeout))
	t.Cleanup(func() { cancel(); cache.Close() })
	var cnt counter
	cnt.hook(cache)
	return cache, &cnt
}

// Concurrent first flows share one call; later ones are answered from
// the cache; each decision is counted once, fresh or cached.
func TestCacheSingleflight(t *testing.T) {
	s := newService(t)
	release := make(chan struct{})
	s.set(func(w http.ResponseWriter, _ *Request) {
		<-release
		reply(200, `{"decision":"allow","ttlSeconds":60}`)(w, nil)
	})
	cache, cnt := newCache(t, s, 5*time.Second)
	var wg sync.WaitGroup
	var allowed atomic.Int64
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if cache.Check(context.Background(), egressReq("api")).Allow {
				allowed.Add(1)
			}
		}()
	}
	// Every checker is waiting once the single call reached the service.
	deadline := time.Now().Add(5 * time.Second)
	for s.n.Load() < 1 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // let the other checkers pile up on the call (more would only make it stricter)
	close(release)
	wg.Wait()
	if allowed.Load() != 20 || s.n.Load() != 1 {
		t.Fatalf("%d allowed, %d requests to the service; want 20 and 1", allowed.Load(), s.n.Load())
	}
	for range 5 {
		cache.Check(context.Background(), egressReq("api"))
	}
	if s.n.Load() != 1 {
		t.Fatalf("cached answers asked again: %d requests", s.n.Load())
	}
	if fresh, cached, _ := cnt.counts(); fresh != 1 || cached != 24 {
		t.Fatalf("counted %d fresh, %d cached; want 1 and 24", fresh, cached)
	}
	// Another rule, another question.
	cache.Check(context.Background(), egressReq("other"))
	if s.n.Load() != 2 {
		t.Fatalf("another rule was answered by the first's answer: %d requests", s.n.Load())
	}
}

// A first flow waits at most the timeout, then it is denied.
func TestCacheFirstAnswerBoundedByTimeout(t *testing.T) {
	s := newService(t)
	s.set(func(w http.ResponseWriter, _ *Request) {
		time.Sleep(2 * time.Second)
		reply(200, `{"decision":"allow"}`)(w, nil)
	})
	cache, _ := newCache(t, s, 200*time.Millisecond)
	start := time.Now()
	d := cache.Check(context.Background(), execReq)
	if d.Allow || d.Cause != CauseTimeout {
		t.Fatalf("got %+v", d)
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("the first flow waited %v", el)
	}
}

// An answer is re-asked in the background before it expires, with no
// flow asking; a flip to deny is reported without a flow asking.
func TestCacheReasksBeforeExpiry(t *testing.T) {
	s := newService(t)
	s.set(reply(200, `{"decision":"allow","ttlSeconds":1}`))
	// A 500 ms timeout: the re-ask starts at 0.5 s, leaving half a second
	// of margin before the 1 s expiry on a loaded machine.
	cache, cnt := newCache(t, s, 500*time.Millisecond)
	if d := cache.Check(context.Background(), egressReq("api")); !d.Allow {
		t.Fatalf("got %+v", d)
	}
	s.set(reply(200, `{"decision":"deny","ttlSeconds":1,"reason":"revoked"}`))
	start := time.Now()
	deadline := start.Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if _, _, denied := cnt.counts(); denied > 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	_, _, denied := cnt.counts()
	if denied == 0 {
		t.Fatal("the flip to deny was never reported")
	}
	// Re-asked one timeout before the 1 s expiry: the deny is in before it.
	if el := time.Since(start); el > time.Second {
		t.Errorf("the re-ask's deny came %v after the allow (ttl 1s)", el)
	}
	if d, ok := cache.Peek(KeyOf(egressReq("api"))); !ok || d.Allow || d.Reason != "revoked" {
		t.Fatalf("cached now: %+v %v", d, ok)
	}
	if fresh, cached, _ := cnt.counts(); fresh < 2 || cached != 0 {
		t.Fatalf("counted %d fresh, %d cached", fresh, cached)
	}
	// A deny is re-asked too: an allow comes back without a flow asking.
	s.set(reply(200, `{"decision":"allow","ttlSeconds":30}`))
	ok := false
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if d, live := cache.Peek(KeyOf(egressReq("api"))); live && d.Allow {
			ok = true
			break
		}
	}
	if !ok {
		t.Fatal("the deny was not re-asked")
	}
}

// Refresh drops the answers now, asks again, and has handed every deny to
// Denied when it returns; other sandboxes keep theirs.
func TestCacheRefresh(t *testing.T) {
	s := newService(t)
	cache, cnt := newCache(t, s, time.Second)
	other := execReq
	other.Sandbox = "sb2"
	for _, r := range []Request{execReq, egressReq("api"), other} {
		if d := cache.Check(context.Background(), r); !d.Allow {
			t.Fatalf("%+v", d)
		}
	}
	s.set(reply(200, `{"decision":"deny","ttlSeconds":60,"reason":"revoked"}`))
	res := cache.Refresh(context.Background(), "sb1")
	if len(res) != 2 {
		t.Fatalf("refreshed %d answers, want sb1's 2", len(res))
	}
	for _, r := range res {
		if r.Decision.Allow || r.Request.Sandbox != "sb1" {
			t.Fatalf("%+v", r)
		}
	}
	if _, _, denied := cnt.counts(); denied != 2 {
		t.Fatalf("Denied told %d times when Refresh returned, want 2", denied)
	}
	if d := cache.Check(context.Background(), execReq); d.Allow {
		t.Fatal("sb1 still allowed after the refresh")
	}
	if d, ok := cache.Peek(KeyOf(other)); !ok || !d.Allow {
		t.Fatal("sb2's answer was dropped by sb1's refresh")
	}
	if n := s.n.Load(); n != 5 {
		t.Fatalf("%d requests, want 3 + 2", n)
	}
	// Refresh of everything.
	if res := cache.Refresh(context.Background(), ""); len(res) != 3 {
		t.Fatalf("refresh all: %d answers", len(res))
	}
}

// A refresh supersedes a call in flight: its late answer is not stored.
func TestCacheRefreshSupersedes(t *testing.T) {
	s := newService(t)
	first := make(chan struct{})
	var calls atomic.Int64
	s.set(func(w http.ResponseWriter, _ *Request) {
		if calls.Add(1) == 1 {
			<-first
			reply(200, `{"decision":"allow","ttlSeconds":60}`)(w, nil)
			return
		}
		reply(200, `{"decision":"deny","ttlSeconds":60}`)(w, nil)
	})
	cache, _ := newCache(t, s, 5*time.Second)
	go cache.Check(context.Background(), execReq)
	for calls.Load() < 1 {
		time.Sleep(5 * time.Millisecond)
	}
	res := cache.Refresh(context.Background(), "sb1")
	if len(res) != 1 || res[0].Decision.Allow {
		t.Fatalf("%+v", res)
	}
	close(first)
	time.Sleep(100 * time.Millisecond)
	if d, ok := cache.Peek(KeyOf(execReq)); !ok || d.Allow {
		t.Fatalf("the superseded allow replaced the refresh's deny: %+v", d)
	}
}

// Forget stops an answer's re-asks; a changed policy is another question.
func TestCacheForget(t *testing.T) {
	s := newService(t)
	s.set(reply(200, `{"decision":"allow","ttlSeconds":1}`))
	cache, _ := newCache(t, s, 200*time.Millisecond)
	cache.Check(context.Background(), execReq)
	changed := execReq
	changed.PolicySHA256 = strings.Repeat("cd", 32)
	cache.Check(context.Background(), changed)
	if s.n.Load() != 2 {
		t.Fatalf("a new policy version was answered from the old one's answer")
	}
	cache.Forget("sb1", func(k Key) bool { return k.PolicySHA256 != changed.PolicySHA256 })
	if keys := cache.Keys(); len(keys) != 1 || keys[0].PolicySHA256 != changed.PolicySHA256 {
		t.Fatalf("keys after forget: %+v", keys)
	}
	cache.Forget("sb1", nil)
	n := s.n.Load()
	time.Sleep(1500 * time.Millisecond)
	if s.n.Load() != n {
		t.Fatalf("forgotten answers were re-asked: %d requests after", s.n.Load()-n)
	}
}

// An answer Keep no longer wants is dropped at its re-ask, not asked.
func TestCacheKeep(t *testing.T) {
	s := newService(t)
	s.set(reply(200, `{"decision":"allow","ttlSeconds":1}`))
	cache, _ := newCache(t, s, 200*time.Millisecond)
	var keep atomic.Bool
	keep.Store(true)
	cache.Keep = func(Key) bool { return keep.Load() }
	cache.Check(context.Background(), execReq)
	deadline := time.Now().Add(3 * time.Second)
	for s.n.Load() < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if s.n.Load() < 2 {
		t.Fatal("a kept answer was not re-asked")
	}
	keep.Store(false)
	deadline = time.Now().Add(3 * time.Second)
	for len(cache.Keys()) > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if len(cache.Keys()) != 0 {
		t.Fatal("an answer Keep refused is still cached")
	}
	n := s.n.Load()
	time.Sleep(1200 * time.Millisecond)
	if s.n.Load() != n {
		t.Fatal("a dropped answer was re-asked")
	}
}

// The cost a flow pays for a cached answer (what the flow path adds for a
// sandbox that needs consent, twice: execute and egress).
func BenchmarkCheckCached(b *testing.B) {
	c := NewCache(context.Background(), stubAsker{})
	req := egressReq("api")
	c.Check(context.Background(), req)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if !c.Check(context.Background(), req).Allow {
				b.Fatal("deny")
			}
		}
	})
}

type stubAsker struct{}

func (stubAsker) Ask(context.Context, Request) Decision {
	return Decision{Allow: true, TTL: time.Hour, At: time.Now()}
}
func (stubAsker) Timeout() time.Duration { return time.Second }
