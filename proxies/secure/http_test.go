package secure

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/proxies/seal"
)

const storeHost = "blob.store.example.test"

// store is the remote of the secure HTTP tests: a net/http server on
// loopback that keeps what is PUT under its path and serves it back with
// http.ServeContent (ranges, conditional requests, HEAD), recording every
// request body as received.
type store struct {
	*remoteListener
	srv *http.Server

	mu      sync.Mutex
	objects map[string][]byte
	bodies  [][]byte // every request body, as received
	reqs    []*http.Request
}

func newStore(t testing.TB, tlsCert *tls.Certificate) *store {
	s := &store{objects: map[string][]byte{}}
	s.srv = &http.Server{Handler: s, ErrorLog: log.New(io.Discard, "", 0)}
	var cfg *tls.Config
	if tlsCert != nil {
		cfg = &tls.Config{Certificates: []tls.Certificate{*tlsCert}}
	}
	ch := make(chan net.Conn)
	s.remoteListener = listenRemote(t, func(c net.Conn) {
		if cfg != nil {
			c = tls.Server(c, cfg)
		}
		ch <- c
	})
	go s.srv.Serve(&chanListener{ch: ch, addr: s.ln.Addr()})
	t.Cleanup(func() { s.srv.Close() })
	return s
}

// chanListener hands http.Server the connections remoteListener accepted.
type chanListener struct {
	ch   chan net.Conn
	addr net.Addr
	once sync.Once
	done chan struct{}
}

func (l *chanListener) Accept() (net.Conn, error) {
	l.once.Do(func() { l.done = make(chan struct{}) })
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { l.done = make(chan struct{}) })
	select {
	case <-l.done:
	default:
		close(l.done)
	}
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }

func (s *store) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	s.mu.Lock()
	s.bodies = append(s.bodies, body)
	s.reqs = append(s.reqs, r)
	s.mu.Unlock()
	switch {
	case r.URL.Path == "/error":
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, "<html>"+canary+" not found</html>")
		return
	case r.URL.Path == "/echo":
		w.Write(body)
		return
	case r.URL.Path == "/gzip":
		w.Header().Set("Content-Encoding", "gzip")
		w.Write([]byte("\x1f\x8b..."))
		return
	}
	switch r.Method {
	case http.MethodPut:
		s.mu.Lock()
		s.objects[r.URL.Path] = body
		s.mu.Unlock()
		w.WriteHeader(http.StatusCreated)
	case http.MethodGet, http.MethodHead:
		s.mu.Lock()
		obj, ok := s.objects[r.URL.Path]
		s.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("ETag", fmt.Sprintf(`"%d-%x"`, len(obj), obj[len(obj)-4:]))
		w.Header().Set("Content-Type", "application/octet-stream")
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(obj))
	default:
		w.WriteHeader(http.StatusMethodNotAllowed)
	}
}

func (s *store) object(path string) []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.objects[path])
}

func (s *store) put(path string, b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.objects[path] = b
}

// received is everything the store was sent in request bodies.
func (s *store) received() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Join(s.bodies, nil)
}

func (s *store) requests() []*http.Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slicesClone(s.reqs)
}

func slicesClone[T any](s []T) []T { return append([]T(nil), s...) }

// sandbox is an HTTP client whose every connection is a flow through its
// own secure HTTP proxy instance, to the store.
type sandbox struct {
	t      testing.TB
	proxy  *HTTP
	rule   string
	keys   proxies.KeySource
	dst    netip.AddrPort
	hosts  []string
	rep    *reporter
	ctx    context.Context
	client *http.Client

	mu      sync.Mutex
	results []chan proxies.Result
	conns   []*net.TCPConn
}

func newSandbox(t testing.TB, ruleSpec string, keys proxies.KeySource, dst netip.AddrPort) *sandbox {
	sb := &sandbox{t: t, proxy: &HTTP{Logger: testutil.Logger(t)}, rule: ruleSpec, keys: keys, dst: dst, hosts: []string{storeHost}, rep: &reporter{}, ctx: context.Background()}
	sb.client = &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			rule := compileRule(t, "blob-store", sb.rule)
			cfg, err := sb.proxy.Configure(rule)
			if err != nil {
				return nil, err
			}
			c, proxied := sandboxPair(t)
			done := make(chan proxies.Result, 1)
			f := &proxies.Flow{Sandbox: "sb", Rule: rule, Config: cfg, Dst: sb.dst, Hosts: sb.hosts, Keys: sb.keys, Report: sb.rep}
			go func() { done <- sb.proxy.ServeStream(sb.ctx, proxied, f) }()
			sb.mu.Lock()
			sb.results = append(sb.results, done)
			sb.conns = append(sb.conns, c)
			sb.mu.Unlock()
			return c, nil
		},
		DisableCompression: true,
	}}
	return sb
}

func (sb *sandbox) url(path string) string {
	return "http://" + storeHost + ":" + strconv.Itoa(int(sb.dst.Port())) + path
}

func (sb *sandbox) do(method, path string, body []byte, hdr ...string) (*http.Response, []byte, error) {
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, sb.url(path), r)
	if err != nil {
		sb.t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := sb.client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	return resp, got, err
}

// close ends the sandbox's connections and returns how its flows ended.
func (sb *sandbox) close() []proxies.Result {
	sb.client.CloseIdleConnections()
	sb.mu.Lock()
	defer sb.mu.Unlock()
	var out []proxies.Result
	for _, c := range sb.conns {
		c.Close()
	}
	for _, ch := range sb.results {
		select {
		case r := <-ch:
			out = append(out, r)
		case <-time.After(10 * time.Second):
			sb.t.Fatal("a flow did not end")
		}
	}
	return out
}

const httpRule = `{keyID: ` + testKeyID + `, protocol: http}`

// TestHTTPClosedLoop: an object PUT by one sandbox comes back whole to
// another sandbox with the same key (its own proxy instance); the store
// holds only ciphertext, of exactly the sealed size.
func TestHTTPClosedLoop(t *testing.T) {
	seg := seal.DefaultSegmentSize
	large := 32 << 20
	if testing.Short() {
		large = 4 << 20
	}
	keys := newKeys().add(testKeyID, 1, 0x42)
	st := newStore(t, nil)
	writer := newSandbox(t, httpRule, keys, st.addr())
	reader := newSandbox(t, httpRule, keys, st.addr())
	out, _ := Contexts("blob-store")
	layout, _ := (&seal.SealConfig{Key: make([]byte, 32), KeyID: testKeyID, KeyVersion: 1, Context: out}).Layout()
	for _, size := range []int{0, 1, seg - 1, seg, seg + 1, 3*seg + 17, large} {
		t.Run(strconv.Itoa(size), func(t *testing.T) {
			data := pattern(size, canary)
			path := fmt.Sprintf("/objects/%d", size)
			resp, _, err := writer.do(http.MethodPut, path, data)
			if err != nil || resp.StatusCode != http.StatusCreated {
				t.Fatalf("PUT: %v %v", resp, err)
			}
			stored := st.object(path)
			if int64(len(stored)) != layout.SealedSize(int64(size)) {
				t.Fatalf("the store holds %d bytes, want the sealed size %d", len(stored), layout.SealedSize(int64(size)))
			}
			if h, _, err := seal.ParseHeader(stored); err != nil || h.Context != "rule=blob-store dir=out" || h.KeyID != testKeyID || h.Interactive {
				t.Fatalf("stored header %+v, %v", h, err)
			}
			resp, got, err := reader.do(http.MethodGet, path, nil)
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("GET: %v %v", resp, err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("GET returned %d bytes, PUT %d", len(got), len(data))
			}
			if resp.ContentLength != int64(size) {
				t.Fatalf("GET Content-Length %d, want %d", resp.ContentLength, size)
			}
		})
	}
	if bytes.Contains(st.received(), []byte(canary)) {
		t.Fatal("the store received the plaintext canary")
	}
	for _, sb := range []*sandbox{writer, reader} {
		sb.rep.wantDenial(t)
		for _, r := range sb.close() {
			if r.End != proxies.EndClosed {
				t.Fatalf("a flow ended %+v", r)
			}
		}
	}
	if out, in := writer.rep.bytes(); out < int64(large) || in == 0 {
		t.Fatalf("the writer's flows reported %d bytes out, %d in", out, in)
	}
}

// TestHTTPChunkedUpload: a body of unknown length is sealed in chunks and
// comes back whole.
func TestHTTPChunkedUpload(t *testing.T) {
	keys := newKeys().add(testKeyID, 1, 0x42)
	st := newStore(t, nil)
	sb := newSandbox(t, httpRule, keys, st.addr())
	data := pattern(200_000, canary)
	req, _ := http.NewRequest(http.MethodPut, sb.url("/chunked"), io.MultiReader(bytes.NewReader(data[:1000]), bytes.NewReader(data[1000:])))
	req.ContentLength = -1
	resp, err := sb.client.Do(req)
	if err != nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("PUT: %v %v", resp, err)
	}
	resp.Body.Close()
	if reqs := st.requests(); len(reqs) != 1 || len(reqs[0].TransferEncoding) != 1 || reqs[0].TransferEncoding[0] != "chunked" {
		t.Fatalf("the store got %d requests, the first with Transfer-Encoding %v", len(reqs), reqs[0].TransferEncoding)
	}
	resp, got, err := sb.do(http.MethodGet, "/chunked", nil)
	if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(got, data) {
		t.Fatalf("GET: %v, %d bytes, %v", resp, len(got), err)
	}
	if bytes.Contains(st.received(), []byte(canary)) {
		t.Fatal("the store received the plaintext canary")
	}
}

// TestHTTPRanges: a single range maps to the object's segments; several
// ranges are ignored (the whole object, 200); a range past the end is
// 416 with the plaintext size.
func TestHTTPRanges(t *testing.T) {
	seg := seal.DefaultSegmentSize
	keys := newKeys().add(testKeyID, 1, 0x42)
	st := newStore(t, nil)
	sb := newSandbox(t, httpRule, keys, st.addr())
	data := pattern(5*seg+123, canary)
	small := pattern(300, canary)
	for path, b := range map[string][]byte{"/big": data, "/small": small} {
		if resp, _, err := sb.do(http.MethodPut, path, b); err != nil || resp.StatusCode != http.StatusCreated {
			t.Fatalf("PUT: %v %v", resp, err)
		}
	}
	n := int64(len(data))
	for _, tc := range []struct {
		path, rng string
		from, to  int64 // the plaintext bytes [from, to] expected
	}{
		{"/big", "bytes=0-0", 0, 0},
		{"/big", "bytes=10-99", 10, 99},
		{"/big", fmt.Sprintf("bytes=%d-%d", seg-1, seg), int64(seg - 1), int64(seg)},
		{"/big", fmt.Sprintf("bytes=%d-", 2*seg), int64(2 * seg), n - 1},
		{"/big", fmt.Sprintf("bytes=%d-%d", seg+5, 4*seg+9), int64(seg + 5), int64(4*seg + 9)},
		{"/big", "bytes=-200", n - 200, n - 1},
		{"/big", fmt.Sprintf("bytes=%d-%d", n-10, n+1000), n - 10, n - 1},
		{"/big", "bytes=-" + strconv.FormatInt(n+5, 10), 0, n - 1},
		{"/small", "bytes=5-9", 5, 9},
		{"/small", "bytes=-1", 299, 299},
	} {
		t.Run(tc.path+" "+tc.rng, func(t *testing.T) {
			obj := data
			if tc.path == "/small" {
				obj = small
			}
			before := len(st.requests())
			resp, got, err := sb.do(http.MethodGet, tc.path, nil, "Range", tc.rng)
			if err != nil || resp.StatusCode != http.StatusPartialContent {
				t.Fatalf("GET: %v %v", resp, err)
			}
			if !bytes.Equal(got, obj[tc.from:tc.to+1]) {
				t.Fatalf("got %d bytes, not plaintext bytes %d-%d", len(got), tc.from, tc.to)
			}
			if want := fmt.Sprintf("bytes %d-%d/%d", tc.from, tc.to, len(obj)); resp.Header.Get("Content-Range") != want {
				t.Fatalf("Content-Range %q, want %q", resp.Header.Get("Content-Range"), want)
			}
			reqs := st.requests()[before:]
			if want := 2; tc.path == "/small" {
				if len(reqs) != 1 {
					t.Fatalf("the store got %d requests for a small object's range, want 1", len(reqs))
				}
			} else if len(reqs) != want || reqs[1].Header.Get("If-Match") == "" {
				t.Fatalf("the store got %d requests (If-Match on the second: %q), want %d", len(reqs), reqs[len(reqs)-1].Header.Get("If-Match"), want)
			}
		})
	}
	t.Run("several ranges", func(t *testing.T) {
		resp, got, err := sb.do(http.MethodGet, "/big", nil, "Range", "bytes=0-1,5-6")
		if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(got, data) {
			t.Fatalf("GET: %v, %d bytes, %v", resp, len(got), err)
		}
	})
	t.Run("past the end", func(t *testing.T) {
		resp, got, err := sb.do(http.MethodGet, "/big", nil, "Range", fmt.Sprintf("bytes=%d-", n))
		if err != nil || resp.StatusCode != http.StatusRequestedRangeNotSatisfiable || len(got) != 0 {
			t.Fatalf("GET: %v, %q, %v", resp, got, err)
		}
		if want := fmt.Sprintf("bytes */%d", n); resp.Header.Get("Content-Range") != want {
			t.Fatalf("Content-Range %q, want %q", resp.Header.Get("Content-Range"), want)
		}
	})
	t.Run("tampered frame in the range", func(t *testing.T) {
		obj := st.object("/big")
		obj[len(obj)-30] ^= 1 // in the final segment
		st.put("/tampered", obj)
		for _, rng := range []string{"bytes=-100", fmt.Sprintf("bytes=%d-", 3*seg)} {
			sb.rep.mu.Lock()
			sb.rep.denials = nil
			sb.rep.mu.Unlock()
			resp, got, err := sb.do(http.MethodGet, "/tampered", nil, "Range", rng)
			if rng == "bytes=-100" {
				// The one segment fails before anything went out.
				if err != nil || resp.StatusCode != http.StatusBadGateway || resp.Header.Get("Cleanwall-Reason") != ReasonSealOpenFailed || len(got) != 0 {
					t.Fatalf("GET %s: %v, %d bytes, %v", rng, resp, len(got), err)
				}
			} else if !isReset(err) || len(got) > 2*seg-1 || !bytes.Equal(got, data[3*seg:3*seg+len(got)]) {
				// Segments 3 and 4 verified and went out (but for the byte
				// held back); the tampered final one never does: a reset.
				t.Fatalf("GET %s: read %d bytes, %v; want at most %d verified ones and a reset", rng, len(got), err, 2*seg-1)
			}
			sb.rep.wantDenial(t, ReasonSealOpenFailed)
		}
	})
}

// rawExchange sends a raw request on a new flow and returns the raw
// response the sandbox read, and how its connection ended.
func rawExchange(t *testing.T, sb *sandbox, request string) (string, error) {
	t.Helper()
	c, err := sb.client.Transport.(*http.Transport).DialContext(context.Background(), "tcp", "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, request); err != nil {
		return "", err
	}
	b, err := readAll(c)
	return string(b), err
}

// TestHTTPRefusedResponses: what the remote sends that is not a sealed
// object of this rule never reaches the sandbox as plaintext.
func TestHTTPRefusedResponses(t *testing.T) {
	keys := newKeys().add(testKeyID, 1, 0x42).add("other", 1, 0x43)
	st := newStore(t, nil)
	sb := newSandbox(t, httpRule, keys, st.addr())
	seg := seal.DefaultSegmentSize
	// The canary is in the last segment: what may reach the sandbox of a
	// bad object is its verified segments before the bad one.
	data := pattern(3*seg, "")
	copy(data[2*seg+10:], canary)
	if resp, _, err := sb.do(http.MethodPut, "/good", data); err != nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("PUT: %v %v", resp, err)
	}
	good := st.object("/good")
	out, _ := Contexts("blob-store")
	k := keys.keys[testKeyID][1]
	sealAs := func(c seal.SealConfig) []byte {
		b, err := seal.Seal(data, c)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	flip := func(b []byte, at int) []byte {
		b = bytes.Clone(b)
		b[at] ^= 1
		return b
	}
	hdrSize := len(good) - int(seal.Layout{SegmentSize: int64(seg)}.SealedSize(int64(len(data))))
	st.put("/tampered-first", flip(good, hdrSize+100))
	st.put("/tampered-last", flip(good, len(good)-100))
	st.put("/tampered-header", flip(good, 20))
	st.put("/truncated", good[:len(good)-seg-24])
	st.put("/other-rule", sealAs(seal.SealConfig{Key: k, KeyID: testKeyID, KeyVersion: 1, Context: "rule=other dir=out"}))
	st.put("/other-key", sealAs(seal.SealConfig{Key: keys.keys["other"][1], KeyID: "other", KeyVersion: 1, Context: out}))
	st.put("/wrong-key", sealAs(seal.SealConfig{Key: keys.keys["other"][1], KeyID: testKeyID, KeyVersion: 1, Context: out}))
	st.put("/plain", []byte(canary+" plaintext object"))

	for _, tc := range []struct {
		path       string
		status     int    // what the sandbox gets; 0: a reset after the head
		maxPlain   int    // plaintext bytes it may read (verified segments before the bad one)
		reason     string // the Cleanwall-Reason header, if any
		wantDenial string
	}{
		{"/error", http.StatusNotFound, 0, ReasonUnsealedBody, ReasonUnsealedBody},
		{"/plain", http.StatusOK, 0, ReasonUnsealedBody, ReasonUnsealedBody},
		{"/gzip", http.StatusBadGateway, 0, ReasonContentEncoding, ReasonContentEncoding},
		{"/tampered-header", http.StatusBadGateway, 0, ReasonSealOpenFailed, ReasonSealOpenFailed},
		{"/other-rule", http.StatusBadGateway, 0, ReasonSealOpenFailed, ReasonSealOpenFailed},
		{"/other-key", http.StatusBadGateway, 0, ReasonSealOpenFailed, ReasonSealOpenFailed},
		{"/wrong-key", http.StatusBadGateway, 0, ReasonSealOpenFailed, ReasonSealOpenFailed},
		{"/truncated", 0, 2*seg - 1, "", ReasonSealOpenFailed},                                    // cut at a segment boundary: its length is an object's
		{"/tampered-first", http.StatusBadGateway, 0, ReasonSealOpenFailed, ReasonSealOpenFailed}, // nothing went out yet
		{"/tampered-last", 0, 2 * seg, "", ReasonSealOpenFailed},
	} {
		t.Run(tc.path, func(t *testing.T) {
			sb.rep.mu.Lock()
			sb.rep.denials = nil
			sb.rep.mu.Unlock()
			raw, err := rawExchange(t, sb, "GET "+tc.path+" HTTP/1.1\r\nHost: "+storeHost+":"+strconv.Itoa(int(st.addr().Port()))+"\r\nConnection: close\r\n\r\n")
			if bytes.Contains([]byte(raw), []byte(canary)) {
				t.Fatalf("the sandbox read plaintext it must not: %q", truncate(raw, 200))
			}
			head, body, _ := strings.Cut(raw, "\r\n\r\n")
			if tc.status == 0 {
				if !isReset(err) {
					t.Fatalf("the connection ended with %v, want a reset (head %q)", err, head)
				}
				if len(body) > tc.maxPlain || !bytes.Equal([]byte(body), data[:len(body)]) {
					t.Fatalf("the sandbox read %d body bytes, at most %d verified ones allowed", len(body), tc.maxPlain)
				}
			} else {
				resp, perr := http.ReadResponse(bufio.NewReader(strings.NewReader(raw)), nil)
				if perr != nil || err != nil {
					t.Fatalf("response %q: %v, connection %v", truncate(raw, 200), perr, err)
				}
				if resp.StatusCode != tc.status || resp.Header.Get("Cleanwall-Reason") != tc.reason || body != "" {
					t.Fatalf("got %d %q with %d body bytes, want %d %q and none", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"), len(body), tc.status, tc.reason)
				}
			}
			sb.rep.wantDenial(t, tc.wantDenial)
		})
	}
}

// TestHTTPEchoedBodyOpens: a remote that answers with the request body
// sends back an object of the rule: it opens (an HTTP object is meant to
// come back, unlike a TCP stream).
func TestHTTPEchoedBodyOpens(t *testing.T) {
	keys := newKeys().add(testKeyID, 1, 0x42)
	st := newStore(t, nil)
	sb := newSandbox(t, httpRule, keys, st.addr())
	resp, got, err := sb.do(http.MethodPost, "/echo", []byte(canary))
	if err != nil || resp.StatusCode != http.StatusOK || string(got) != canary {
		t.Fatalf("POST /echo: %v %q %v", resp, got, err)
	}
}

// TestHTTPRequestRefusals: requests the proxy refuses never reach the
// remote.
func TestHTTPRequestRefusals(t *testing.T) {
	keys := newKeys().add(testKeyID, 1, 0x42)
	st := newStore(t, nil)
	sb := newSandbox(t, httpRule, keys, st.addr())
	host := storeHost + ":" + strconv.Itoa(int(st.addr().Port()))
	for _, tc := range []struct {
		name, request, reason string
		status                int
	}{
		{"host mismatch", "GET /x HTTP/1.1\r\nHost: other.example.test\r\n\r\n", ReasonHostMismatch, 421},
		{"no host", "GET /x HTTP/1.0\r\n\r\n", ReasonHostMismatch, 421},
		{"connect", "CONNECT " + host + " HTTP/1.1\r\nHost: " + host + "\r\n\r\n", ReasonConnect, 403},
		{"upgrade", "GET /x HTTP/1.1\r\nHost: " + host + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", ReasonUpgrade, 403},
		{"expect", "PUT /x HTTP/1.1\r\nHost: " + host + "\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\nx", ReasonExpect, 417},
		{"content-encoding", "PUT /x HTTP/1.1\r\nHost: " + host + "\r\nContent-Encoding: gzip\r\nContent-Length: 1\r\n\r\nx", ReasonContentEncoding, 415},
		{"malformed", "GET /x HTTP/1.1\r\nHost: " + host + "\r\nBad Field: x\r\n\r\n", ReasonBadRequest, 400},
		{"http/2", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", ReasonHTTPVersion, 505},
		{"huge head", "GET /x HTTP/1.1\r\nHost: " + host + "\r\nX: " + strings.Repeat("a", 40<<10) + "\r\n\r\n", ReasonHeaderTooLarge, 431},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sb.rep.mu.Lock()
			sb.rep.denials = nil
			sb.rep.mu.Unlock()
			raw, _ := rawExchange(t, sb, tc.request)
			resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(raw)), nil)
			if err != nil {
				t.Fatalf("response %q: %v", raw, err)
			}
			if resp.StatusCode != tc.status || resp.Header.Get("Cleanwall-Reason") != tc.reason {
				t.Fatalf("got %d %q, want %d %q", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"), tc.status, tc.reason)
			}
			sb.rep.wantDenial(t, tc.reason)
		})
	}
	if n := st.count(); n != 0 {
		t.Fatalf("the store accepted %d connections", n)
	}
}

// TestHTTPHeaders: what secure mode forwards and what it drops, both ways.
func TestHTTPHeaders(t *testing.T) {
	keys := newKeys().add(testKeyID, 1, 0x42)
	st := newStore(t, nil)
	sb := newSandbox(t, httpRule, keys, st.addr())
	resp, _, err := sb.do(http.MethodPut, "/h", []byte("body"), "Content-Md5", "abc", "Digest", "sha-256=x", "X-Meta", "kept", "Accept-Encoding", "gzip", "Content-Type", "application/octet-stream")
	if err != nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("PUT: %v %v", resp, err)
	}
	r := st.requests()[0]
	for k, want := range map[string]string{"Content-Md5": "", "Digest": "", "X-Meta": "kept", "Accept-Encoding": "identity", "Content-Type": "application/octet-stream"} {
		if got := r.Header.Get(k); got != want {
			t.Errorf("the store got %s %q, want %q", k, got, want)
		}
	}
	resp, got, err := sb.do(http.MethodHead, "/h", nil)
	if err != nil || resp.StatusCode != http.StatusOK || len(got) != 0 || resp.ContentLength != -1 || resp.Header.Get("Etag") == "" {
		t.Fatalf("HEAD: %v, Content-Length %d, ETag %q, %v", resp.Status, resp.ContentLength, resp.Header.Get("Etag"), err)
	}
}

// TestHTTPNoKey: without the key the sandbox's connection is reset and
// the store never sees a connection; a key that goes away between two
// requests resets the connection at the second.
func TestHTTPNoKey(t *testing.T) {
	for _, tc := range []struct {
		name string
		keys proxies.KeySource
	}{
		{"not held", newKeys().add("other", 1, 0x43)},
		{"key source fails", failingKeys{errors.New("broker unreachable")}},
		{"no key source", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := newStore(t, nil)
			sb := newSandbox(t, httpRule, tc.keys, st.addr())
			resp, _, err := sb.do(http.MethodPut, "/x", []byte(canary))
			if err == nil || !isReset(err) {
				t.Fatalf("PUT: %v, %v; want a reset", resp, err)
			}
			sb.rep.wantDenial(t, ReasonNoKey)
			for _, r := range sb.close() {
				if r.End != proxies.EndError || r.Err == nil {
					t.Fatalf("result %+v", r)
				}
			}
			time.Sleep(50 * time.Millisecond)
			if n := st.count(); n != 0 {
				t.Fatalf("the store accepted %d connections", n)
			}
		})
	}
	t.Run("key gone between requests", func(t *testing.T) {
		keys := newKeys().add(testKeyID, 1, 0x42)
		st := newStore(t, nil)
		sb := newSandbox(t, httpRule, keys, st.addr())
		if resp, _, err := sb.do(http.MethodPut, "/x", []byte("first")); err != nil || resp.StatusCode != http.StatusCreated {
			t.Fatalf("PUT: %v %v", resp, err)
		}
		keys.mu.Lock()
		delete(keys.keys, testKeyID)
		keys.mu.Unlock()
		before := len(st.requests())
		if _, _, err := sb.do(http.MethodPut, "/y", []byte(canary)); err == nil {
			t.Fatal("the second PUT went through without a key")
		}
		if len(st.requests()) != before || bytes.Contains(st.received(), []byte(canary)) {
			t.Fatal("the store got the second request")
		}
		sb.rep.wantDenial(t, ReasonNoKey)
	})
}

// TestHTTPRevocation: a canceled context resets the sandbox's connection
// in the middle of a response body.
func TestHTTPRevocation(t *testing.T) {
	keys := newKeys().add(testKeyID, 1, 0x42)
	st := newStore(t, nil)
	sb := newSandbox(t, httpRule, keys, st.addr())
	data := pattern(8<<20, canary)
	if resp, _, err := sb.do(http.MethodPut, "/big", data); err != nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("PUT: %v %v", resp, err)
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	reader := newSandbox(t, httpRule, keys, st.addr())
	reader.ctx = ctx
	req, _ := http.NewRequest(http.MethodGet, reader.url("/big"), nil)
	resp, err := reader.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1000)
	if _, err := io.ReadFull(resp.Body, buf); err != nil {
		t.Fatal(err)
	}
	revoked := errors.New("key revoked")
	cancel(revoked)
	n, err := io.Copy(io.Discard, resp.Body)
	if err == nil || int64(len(buf))+n >= int64(len(data)) {
		t.Fatalf("after revocation the sandbox read %d more bytes, ending with %v", n, err)
	}
	for _, r := range reader.close() {
		if r.End != proxies.EndRevoked || !errors.Is(r.Err, revoked) {
			t.Fatalf("result %+v", r)
		}
	}
}

// TestHTTPUpstreamTLS: secure.upstreamTLS verifies the store.
func TestHTTPUpstreamTLS(t *testing.T) {
	dir := t.TempDir()
	testutil.TestCA(t, dir, "store")
	cert, err := tlsKeyPair(filepath.Join(dir, "store.pem"), filepath.Join(dir, "store.key"))
	if err != nil {
		t.Fatal(err)
	}
	keys := newKeys().add(testKeyID, 1, 0x42)
	st := newStore(t, &cert)
	for _, tc := range []struct {
		name, tls string
		ok        bool
	}{
		{"ca", `caFile: ` + filepath.Join(dir, "ca.pem"), true},
		{"system roots", ``, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sb := newSandbox(t, `{keyID: `+testKeyID+`, protocol: http, upstreamTLS: {`+tc.tls+`}}`, keys, st.addr())
			sb.hosts = []string{"127.0.0.1"}
			url := "http://127.0.0.1:" + strconv.Itoa(int(st.addr().Port())) + "/tls"
			req, _ := http.NewRequest(http.MethodPut, url, strings.NewReader(canary))
			resp, err := sb.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if tc.ok {
				if resp.StatusCode != http.StatusCreated {
					t.Fatalf("PUT: %v", resp.Status)
				}
				sb.rep.wantDenial(t)
				return
			}
			if resp.StatusCode != http.StatusBadGateway || resp.Header.Get("Cleanwall-Reason") != ReasonUpstreamTLS {
				t.Fatalf("PUT: %v %q", resp.Status, resp.Header.Get("Cleanwall-Reason"))
			}
			sb.rep.wantDenial(t, ReasonUpstreamTLS)
		})
	}
	if bytes.Contains(st.received(), []byte(canary)) {
		t.Fatal("the store received the plaintext canary")
	}
}

// TestHTTPExpectContinue: the proxy answers 100-continue itself and the
// remote gets no Expect.
func TestHTTPExpectContinue(t *testing.T) {
	keys := newKeys().add(testKeyID, 1, 0x42)
	st := newStore(t, nil)
	sb := newSandbox(t, httpRule, keys, st.addr())
	c, err := sb.client.Transport.(*http.Transport).DialContext(context.Background(), "tcp", "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	host := storeHost + ":" + strconv.Itoa(int(st.addr().Port()))
	io.WriteString(c, "PUT /e HTTP/1.1\r\nHost: "+host+"\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
	br := bufio.NewReader(c)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := br.ReadString('\n')
	if err != nil || line != "HTTP/1.1 100 Continue\r\n" {
		t.Fatalf("first line %q, %v", line, err)
	}
	if blank, _ := br.ReadString('\n'); blank != "\r\n" {
		t.Fatalf("after 100 Continue: %q", blank)
	}
	io.WriteString(c, "hello")
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("response %v, %v", resp, err)
	}
	r := st.requests()[0]
	if r.Header.Get("Expect") != "" {
		t.Fatalf("the store got Expect %q", r.Header.Get("Expect"))
	}
	if got, err := seal.Open(st.object("/e"), keys.keyFunc); err != nil || string(got) != "hello" {
		t.Fatalf("the stored object opens to %q, %v", got, err)
	}
}

// TestHTTPCutBodyIsNoObject: a request body the sandbox does not finish
// never reaches the remote as a whole object.
func TestHTTPCutBodyIsNoObject(t *testing.T) {
	keys := newKeys().add(testKeyID, 1, 0x42)
	st := newStore(t, nil)
	sb := newSandbox(t, httpRule, keys, st.addr())
	c, err := sb.client.Transport.(*http.Transport).DialContext(context.Background(), "tcp", "")
	if err != nil {
		t.Fatal(err)
	}
	host := storeHost + ":" + strconv.Itoa(int(st.addr().Port()))
	body := pattern(300_000, canary)
	io.WriteString(c, "PUT /cut HTTP/1.1\r\nHost: "+host+"\r\nContent-Length: "+strconv.Itoa(len(body))+"\r\n\r\n")
	c.Write(body[:len(body)/2])
	time.Sleep(100 * time.Millisecond) // the first segments go out
	c.Close()
	for _, r := range sb.close() {
		if r.End != proxies.EndError {
			t.Fatalf("result %+v", r)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(st.requests()) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	got := st.object("/cut")
	if len(got) == 0 {
		t.Fatal("the store saw none of the body (the test wants a cut one)")
	}
	if _, err := seal.Open(got, keys.keyFunc); !errors.Is(err, seal.ErrTruncated) {
		t.Fatalf("what the store received opens with %v, want it truncated", err)
	}
	if bytes.Contains(st.received(), []byte(canary)) {
		t.Fatal("the store received the plaintext canary")
	}
}
