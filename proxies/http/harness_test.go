package httpproxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/prometheus/client_golang/prometheus"
)

// testHost is the fqdn the test flows were "resolved" from.
const testHost = "api.example.test"

// ssn is the deny pattern of the policy example.
var ssn = regexp.MustCompile(`\b\d{3}-\d{2}-\d{4}\b`)

// policyRules mirrors the results-api rule of docs/policy.md.
func policyRules() *Rules {
	return &Rules{
		Rules: []RequestRule{{
			Methods:      []string{"GET", "POST", "HEAD"},
			Paths:        []string{"/v1/results", "/v1/results/*"},
			ContentTypes: []string{"application/json"},
		}},
		MaxBodyBytes:     1 << 20,
		DenyBodyPatterns: []*regexp.Regexp{ssn},
	}
}

// recorded is one request as the upstream's net/http server saw it.
type recorded struct {
	Method, RequestURI, Host string
	TransferEncoding         []string
	Header                   http.Header
	Body                     []byte // nil for /v1/upload, which only hashes
	BodyLen                  int64
	BodyCRC                  uint32
}

// upstream is a real net/http server on 127.0.0.1 that records every
// connection, every byte read from and written to it, and every request.
type upstream struct {
	ln   net.Listener
	srv  *http.Server
	port uint16

	mu     sync.Mutex
	conns  int
	in     bytes.Buffer // bytes received, up to rawCap
	inN    int64        // bytes received, all of them
	out    bytes.Buffer // bytes sent, up to rawCap
	rawCap int
	reqs   []recorded
	quiet  bool // count, but keep no request records (benchmarks)
	open   []net.Conn
}

// closeConns closes the upstream's side of every connection, as an idle
// timeout would.
func (u *upstream) closeConns() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, c := range u.open {
		_ = c.Close()
	}
	u.open = nil
}

func newUpstream(t testing.TB) *upstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &upstream{ln: ln, port: uint16(ln.Addr().(*net.TCPAddr).Port), rawCap: 4 << 20}
	u.srv = &http.Server{Handler: http.HandlerFunc(u.serveHTTP), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = u.srv.Serve(recordingListener{ln, u}) }()
	t.Cleanup(func() { _ = u.srv.Close() })
	return u
}

func (u *upstream) serveHTTP(w http.ResponseWriter, r *http.Request) {
	rec := recorded{Method: r.Method, RequestURI: r.RequestURI, Host: r.Host, TransferEncoding: r.TransferEncoding, Header: r.Header.Clone()}
	h := crc32.NewIEEE()
	var body io.Writer = h
	var buf bytes.Buffer
	if !strings.HasPrefix(r.URL.Path, "/v1/upload") {
		body = io.MultiWriter(h, &buf)
	}
	n, err := io.Copy(body, r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	rec.BodyLen, rec.BodyCRC = n, h.Sum32()
	if buf.Len() > 0 {
		rec.Body = buf.Bytes()
	}
	u.mu.Lock()
	if !u.quiet {
		u.reqs = append(u.reqs, rec)
	}
	u.mu.Unlock()
	if strings.HasPrefix(r.URL.Path, "/v1/slow") {
		time.Sleep(50 * time.Millisecond) // the sandbox's next bytes arrive meanwhile
	}

	switch {
	case strings.HasPrefix(r.URL.Path, "/v1/results/download"):
		size, _ := strconv.Atoi(r.URL.Query().Get("size"))
		w.Header().Set("Content-Length", strconv.Itoa(size))
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = io.Copy(w, io.LimitReader(newPattern(7), int64(size)))
	case strings.HasPrefix(r.URL.Path, "/v1/results/stream"):
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 5 {
			fmt.Fprintf(w, "data: event %d\n\n", i)
			w.(http.Flusher).Flush()
		}
	default:
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Upstream", "yes")
		fmt.Fprintf(w, `{"method":%q,"uri":%q,"len":%d,"crc":%d}`, r.Method, r.RequestURI, n, rec.BodyCRC)
	}
}

// requests returns what the upstream received so far.
func (u *upstream) requests() []recorded {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]recorded(nil), u.reqs...)
}

func (u *upstream) rawIn() string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.in.String()
}

func (u *upstream) rawOut() string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.out.String()
}

// assertNothing fails unless the upstream saw no connection, no byte and no
// request.
func (u *upstream) assertNothing(t testing.TB) {
	t.Helper()
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.conns != 0 || u.inN != 0 || len(u.reqs) != 0 {
		t.Fatalf("upstream saw %d connections, %d bytes (%q), %d requests; want none", u.conns, u.inN, truncate(u.in.String(), 200), len(u.reqs))
	}
}

type recordingListener struct {
	net.Listener
	u *upstream
}

func (l recordingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.u.mu.Lock()
	l.u.conns++
	l.u.open = append(l.u.open, c)
	l.u.mu.Unlock()
	return &recordingConn{Conn: c, u: l.u}, nil
}

type recordingConn struct {
	net.Conn
	u *upstream
}

func (c *recordingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.u.mu.Lock()
		c.u.inN += int64(n)
		if c.u.in.Len() < c.u.rawCap {
			c.u.in.Write(p[:min(n, c.u.rawCap-c.u.in.Len())])
		}
		c.u.mu.Unlock()
	}
	return n, err
}

// Write records before writing: once the bytes are on the wire, the test
// may already compare them.
func (c *recordingConn) Write(p []byte) (int, error) {
	c.u.mu.Lock()
	if c.u.out.Len() < c.u.rawCap {
		c.u.out.Write(p[:min(len(p), c.u.rawCap-c.u.out.Len())])
	}
	c.u.mu.Unlock()
	return c.Conn.Write(p)
}

// harness runs a Proxy on 127.0.0.1 in front of one upstream. Every
// connection accepted is served as a flow to the upstream's address, as if
// the datapath had redirected it there.
type harness struct {
	up      *upstream
	addr    string // the proxy listener
	dst     netip.AddrPort
	proxy   *Proxy
	reg     *prometheus.Registry
	flow    Flow
	wrap    func(net.Conn) net.Conn // applied to accepted connections
	mu      sync.Mutex
	denials []Denial
	errs    []error
	done    sync.WaitGroup
}

type harnessOption func(*harness)

func withLimits(l Limits) harnessOption { return func(h *harness) { h.proxy.Limits = l } }

func withDst(dst netip.AddrPort) harnessOption { return func(h *harness) { h.flow.Dst = dst } }

// withWrappedConns hides the *net.TCPConn of both of the proxy's
// connections behind a wrapper, as the daemon's byte budget does: the proxy
// then reads them through their Read.
func withWrappedConns() harnessOption {
	return func(h *harness) {
		h.wrap = func(c net.Conn) net.Conn { return wrappedConn{c} }
		h.proxy.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return wrappedConn{c}, nil
		}
	}
}

type wrappedConn struct{ net.Conn }

// eachIO runs test with raw I/O on and off (Proxy.PlainIO): the proxy must
// behave the same either way. Every harness the test makes takes mode.
func eachIO(t *testing.T, test func(t *testing.T, mode harnessOption)) {
	t.Helper()
	for _, plain := range []bool{false, true} {
		name := "raw"
		if plain {
			name = "plain"
		}
		t.Run(name, func(t *testing.T) { test(t, func(h *harness) { h.proxy.PlainIO = plain }) })
	}
}

func newHarness(t testing.TB, rules *Rules, opts ...harnessOption) *harness {
	t.Helper()
	up := newUpstream(t)
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{up: up, reg: reg}
	h.dst = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), up.port)
	h.flow = Flow{Sandbox: "sb-1", Rule: "results-api", Dst: h.dst, Hosts: []string{testHost}}
	h.proxy = &Proxy{
		Logger:  testutil.Logger(t),
		Metrics: m,
		OnDeny: func(f Flow, d Denial) {
			h.mu.Lock()
			h.denials = append(h.denials, d)
			h.mu.Unlock()
		},
	}
	if _, ok := t.(*testing.B); ok {
		h.proxy.Logger = nil // quiet: slog.Default at Info, and benchmarks refuse nothing
	}
	for _, o := range opts {
		o(h)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.addr = ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if h.wrap != nil {
				c = h.wrap(c)
			}
			h.done.Add(1)
			go func() {
				defer h.done.Done()
				if err := h.proxy.ServeConn(ctx, c, h.flow, rules); err != nil {
					h.mu.Lock()
					h.errs = append(h.errs, err)
					h.mu.Unlock()
				}
			}()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		cancel()
		h.done.Wait()
	})
	return h
}

// hostport is the Host value a sandbox client sends for the flow.
func (h *harness) hostport() string { return testHost + ":" + strconv.Itoa(int(h.up.port)) }

// url builds a URL whose host is the flow's fqdn; the client dials the proxy.
func (h *harness) url(path string) string { return "http://" + h.hostport() + path }

// client returns an HTTP client whose every connection goes to the proxy,
// as the datapath redirect would make it.
func (h *harness) client() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", h.addr)
		},
		DisableCompression:    true,
		ExpectContinueTimeout: 5 * time.Second,
	}}
}

func (h *harness) lastDenials() []Denial {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]Denial(nil), h.denials...)
}

// rawExchange writes raw request bytes on a new connection to the proxy and
// reads one response (for a request with method).
func (h *harness) rawExchange(t testing.TB, raw string) (*http.Response, []byte, net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", h.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, body := readResponseT(t, br, "GET")
	return resp, body, c, br
}

func readResponseT(t testing.TB, br *bufio.Reader, method string) (*http.Response, []byte) {
	t.Helper()
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("reading response: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading response body: %v", err)
	}
	return resp, body
}

// closedByPeer reports whether the proxy closed the connection (EOF or
// reset) within a second, with nothing more to read.
func closedByPeer(c net.Conn, br *bufio.Reader) bool {
	_ = c.SetReadDeadline(time.Now().Add(time.Second))
	_, err := br.ReadByte()
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

// pattern is a deterministic, endless, not very compressible byte stream.
type pattern struct{ x uint64 }

func newPattern(seed uint64) *pattern { return &pattern{x: seed*0x9e3779b97f4a7c15 + 1} }

func (p *pattern) Read(b []byte) (int, error) {
	for i := 0; i < len(b); i += 8 {
		p.x ^= p.x << 13
		p.x ^= p.x >> 7
		p.x ^= p.x << 17
		for k, x := 0, p.x; k < 8 && i+k < len(b); k, x = k+1, x>>8 {
			b[i+k] = 'a' + byte(x&15) // letters only: never an SSN
		}
	}
	return len(b), nil
}
