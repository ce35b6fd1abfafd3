package trusted

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/proxies/seal/hpke"
)

// store is the customer's remote of a trusted HTTP rule: it records each
// request's head, whether its raw body held the canary, and what the body
// opened to with the customer's private key (length and SHA-256); it
// answers 200 with "len=N sha=X" of the opened body.
type store struct {
	ln   net.Listener
	priv *hpke.PrivateKey
	mu   sync.Mutex
	reqs []storedRequest
}

type storedRequest struct {
	method, path    string
	sealed          string // its Cleanwall-Sealed field
	contentLength   int64
	chunked         bool
	rawLen          int64
	rawHasCanary    bool
	openedLen       int64
	openedSHA       string
	openErr         error
	tls             *tls.ConnectionState
	contentType     string
	forwardedDigest string
}

func startStore(t testing.TB, priv *hpke.PrivateKey, tlsCfg *tls.Config) *store {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &store{ln: ln, priv: priv}
	if tlsCfg != nil {
		ln = tls.NewListener(ln, tlsCfg)
	}
	srv := &http.Server{Handler: http.HandlerFunc(s.handle), ErrorLog: nil}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return s
}

func (s *store) addr() netip.AddrPort { return s.ln.Addr().(*net.TCPAddr).AddrPort() }

func (s *store) setKey(priv *hpke.PrivateKey) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.priv = priv
}

func (s *store) handle(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	priv := s.priv
	s.mu.Unlock()
	rec := storedRequest{method: r.Method, path: r.URL.Path, sealed: r.Header.Get(SealedHeader), contentLength: r.ContentLength,
		chunked: len(r.TransferEncoding) > 0, tls: r.TLS, contentType: r.Header.Get("Content-Type"), forwardedDigest: r.Header.Get("Content-Digest")}
	raw := &canaryScanner{r: r.Body}
	h := sha256.New()
	if rec.sealed != "" {
		rec.openedLen, rec.openErr = io.Copy(h, hpke.NewOpener(raw, priv, Context("partner")))
	} else {
		rec.openedLen, _ = io.Copy(h, raw)
	}
	io.Copy(io.Discard, raw)
	rec.rawLen, rec.rawHasCanary = raw.n, raw.found
	rec.openedSHA = hex.EncodeToString(h.Sum(nil))
	s.mu.Lock()
	s.reqs = append(s.reqs, rec)
	s.mu.Unlock()
	reply := fmt.Sprintf("len=%d sha=%s", rec.openedLen, rec.openedSHA)
	if r.URL.Query().Get("chunked") != "" {
		w.Write([]byte(reply[:5]))
		w.(http.Flusher).Flush()
		w.Write([]byte(reply[5:]))
		return
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(reply)))
	w.Header().Set("X-Store", "kept")
	w.Write([]byte(reply))
}

func (s *store) requests() []storedRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]storedRequest(nil), s.reqs...)
}

// canaryScanner counts what it reads and looks for the canary across
// read boundaries, holding len(canary) bytes.
type canaryScanner struct {
	r     io.Reader
	n     int64
	tail  []byte
	found bool
}

func (c *canaryScanner) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.n += int64(n)
		buf := append(c.tail, p[:n]...)
		if bytes.Contains(buf, []byte(canary)) {
			c.found = true
		}
		c.tail = append(c.tail[:0], buf[max(0, len(buf)-len(canary)):]...)
	}
	return n, err
}

// body is n bytes of a pattern that starts with the canary (when it fits)
// and repeats it every 4 KiB.
type body struct {
	n, off int64
}

func (b *body) Read(p []byte) (int, error) {
	if b.off >= b.n {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), b.n-b.off)]
	for i := range p {
		o := b.off + int64(i)
		if r := o % 4096; r < int64(len(canary)) {
			p[i] = canary[r]
		} else {
			p[i] = byte(o*7 + o/251)
		}
	}
	b.off += int64(len(p))
	return len(p), nil
}

func bodySHA(n int64) string {
	h := sha256.New()
	io.Copy(h, &body{n: n})
	return hex.EncodeToString(h.Sum(nil))
}

// hostOf is the Host a sandbox names st by.
func hostOf(st *store) string { return fmt.Sprintf("%s:%d", serverName, st.addr().Port()) }

func hpkeKey(t testing.TB, suite hpke.Suite) *hpke.PrivateKey {
	t.Helper()
	k, err := hpke.GenerateKey(suite)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// send sends one request of n body bytes (chunked: without a length) on
// sb and reads the response.
func send(t testing.TB, br *bufio.Reader, sb net.Conn, host, method, target string, n int64, chunked bool, extra string) (*http.Response, string) {
	t.Helper()
	_ = sb.SetDeadline(time.Now().Add(60 * time.Second))
	head := method + " " + target + " HTTP/1.1\r\nHost: " + host + "\r\nContent-Type: application/json\r\nContent-Digest: sha-256=:x:\r\n" + extra
	w := bufio.NewWriterSize(sb, 64<<10)
	switch {
	case n < 0:
		w.WriteString(head + "\r\n")
	case chunked:
		w.WriteString(head + "Transfer-Encoding: chunked\r\n\r\n")
		cw := newChunked(w)
		io.Copy(cw, &body{n: n})
		w.WriteString("0\r\n\r\n")
	default:
		w.WriteString(head + "Content-Length: " + strconv.FormatInt(n, 10) + "\r\n\r\n")
		io.Copy(w, &body{n: n})
	}
	errc := make(chan error, 1)
	go func() { errc <- w.Flush() }()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("%s %s: no response: %v (writing: %v)", method, target, err, <-errc)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the response body: %v", err)
	}
	<-errc
	return resp, string(b)
}

type chunkedWriter struct{ w *bufio.Writer }

func newChunked(w *bufio.Writer) io.Writer { return chunkedWriter{w} }

func (c chunkedWriter) Write(p []byte) (int, error) {
	fmt.Fprintf(c.w, "%x\r\n", len(p))
	c.w.Write(p)
	c.w.WriteString("\r\n")
	return len(p), nil
}

func hpkeRuleYAML(t testing.TB, dir string, priv *hpke.PrivateKey, tlsFields string) string {
	file := writeFile(t, dir, "partner.hpke.pub", priv.Public().Marshal())
	if tlsFields == "" {
		return `{hpke: {publicKeyFile: ` + file + `}}`
	}
	return `{hpke: {publicKeyFile: ` + file + `}, tls: {` + tlsFields + `}}`
}

// TestHTTPSealedBodies: request bodies of every size that matters reach
// the remote sealed to the customer's key, opening to exactly what the
// sandbox sent, with Content-Length the sealed size (or chunked as the
// sandbox's was) and Cleanwall-Sealed set; the remote never sees the
// canary; responses come back as the remote sent them; on one connection.
func TestHTTPSealedBodies(t *testing.T) {
	for _, suite := range []hpke.Suite{hpke.SuiteXWing, hpke.SuiteX25519} {
		t.Run(suite.String(), func(t *testing.T) {
			priv := hpkeKey(t, suite)
			st := startStore(t, priv, nil)
			p := &HTTP{Logger: testLog(t)}
			rule := compile(t, hpkeRuleYAML(t, t.TempDir(), priv, ""))
			sb, s := serveFlow(t, context.Background(), p, rule, configureOK(t, p, rule), st.addr(), serverName)
			br := bufio.NewReader(sb)
			type req struct {
				n       int64
				chunked bool
			}
			cs := int64(hpke.ChunkSize)
			reqs := []req{{0, false}, {1, false}, {cs - 1, false}, {cs, false}, {cs + 1, false}, {3*cs + 17, false},
				{0, true}, {1, true}, {cs + 1, true}, {1 << 20, true}}
			for i, r := range reqs {
				target := "/v1/upload/" + strconv.Itoa(i)
				if i%2 == 1 {
					target += "?chunked=1"
				}
				resp, got := send(t, br, sb, hostOf(st), "PUT", target, r.n, r.chunked, "")
				want := fmt.Sprintf("len=%d sha=%s", r.n, bodySHA(r.n))
				if resp.StatusCode != 200 || got != want {
					t.Fatalf("%d bytes (chunked %v): %d %q, want 200 %q", r.n, r.chunked, resp.StatusCode, got, want)
				}
				rec := st.requests()[i]
				if rec.openErr != nil || rec.sealed != SealedValue || rec.rawHasCanary {
					t.Fatalf("%d bytes: the store got %+v", r.n, rec)
				}
				if r.chunked != rec.chunked || (!r.chunked && rec.contentLength != hpke.SealedSize(r.n, priv.Public())) || rec.rawLen != hpke.SealedSize(r.n, priv.Public()) {
					t.Fatalf("%d bytes: framing %+v, want %d sealed bytes", r.n, rec, hpke.SealedSize(r.n, priv.Public()))
				}
				if rec.contentType != "application/json" || rec.forwardedDigest != "" {
					t.Errorf("fields: Content-Type %q, Content-Digest %q", rec.contentType, rec.forwardedDigest)
				}
			}
			// A request without a body is not sealed.
			resp, got := send(t, br, sb, hostOf(st), "GET", "/v1/results", -1, false, "")
			rec := st.requests()[len(reqs)]
			if resp.StatusCode != 200 || rec.sealed != "" || rec.rawLen != 0 || got != "len=0 sha="+bodySHA(0) {
				t.Errorf("GET: %d %q, stored %+v", resp.StatusCode, got, rec)
			}
			if resp.Header.Get("X-Store") != "kept" {
				t.Errorf("the response's fields did not pass: %v", resp.Header)
			}
			sb.Close()
			if res := s.wait(t); res.End != proxies.EndClosed {
				t.Errorf("result %+v", res)
			}
			if d, out, in := s.rep.get(); len(d) != 0 || out == 0 || in == 0 {
				t.Errorf("denials %+v, bytes %d/%d", d, out, in)
			}
		})
	}
}

// TestHTTPLargeBody: 50 MiB go through sealed, streamed: the process's
// heap stays far below the body's size.
func TestHTTPLargeBody(t *testing.T) {
	if testing.Short() {
		t.Skip("50 MiB")
	}
	priv := hpkeKey(t, hpke.SuiteXWing)
	st := startStore(t, priv, nil)
	p := &HTTP{Logger: testLog(t)}
	rule := compile(t, hpkeRuleYAML(t, t.TempDir(), priv, ""))
	sb, s := serveFlow(t, context.Background(), p, rule, configureOK(t, p, rule), st.addr(), serverName)
	var peak atomic.Uint64
	stop := make(chan struct{})
	done := make(chan struct{})
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapAlloc
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapAlloc > peak.Load() {
				peak.Store(ms.HeapAlloc)
			}
		}
	}()
	const n = 50 << 20
	resp, got := send(t, bufio.NewReader(sb), sb, hostOf(st), "PUT", "/v1/big", n, false, "")
	close(stop)
	<-done
	if want := fmt.Sprintf("len=%d sha=%s", n, bodySHA(n)); resp.StatusCode != 200 || got != want {
		t.Fatalf("%d %q, want %q", resp.StatusCode, got, want)
	}
	if rec := st.requests()[0]; rec.rawHasCanary || rec.contentLength != hpke.SealedSize(n, priv.Public()) {
		t.Fatalf("stored %+v", rec)
	}
	grew := int64(peak.Load()) - int64(base)
	t.Logf("heap grew by at most %d KiB while 50 MiB went through", grew>>10)
	if grew > 16<<20 {
		t.Errorf("the heap grew by %d MiB for a 50 MiB body: not streamed", grew>>20)
	}
	sb.Close()
	s.wait(t)
}

// TestHTTPWithTLS: hpke and tls at once: the body is sealed inside TLS
// 1.3 to the pinned remote; a remote that fails tls.* is refused as in
// the TCP proxy (502 naming the reason, a denial, the flow counted under
// it), before the remote read anything.
func TestHTTPWithTLS(t *testing.T) {
	k := newPKI(t)
	priv := hpkeKey(t, hpke.SuiteXWing)
	st := startStore(t, priv, serverConfig(k.server, nil))
	p := &HTTP{Logger: testLog(t)}
	rule := compile(t, hpkeRuleYAML(t, t.TempDir(), priv, `serverName: `+serverName+`, spkiSHA256: ["`+k.server.pin()+`"]`))
	sb, s := serveFlow(t, context.Background(), p, rule, configureOK(t, p, rule), st.addr(), serverName)
	resp, got := send(t, bufio.NewReader(sb), sb, hostOf(st), "POST", "/v1/results", 1000, false, "")
	if want := fmt.Sprintf("len=1000 sha=%s", bodySHA(1000)); resp.StatusCode != 200 || got != want {
		t.Fatalf("%d %q", resp.StatusCode, got)
	}
	rec := st.requests()[0]
	if rec.tls == nil || rec.tls.Version != tls.VersionTLS13 || rec.tls.CurveID != tls.X25519MLKEM768 || rec.tls.ServerName != serverName || rec.rawHasCanary {
		t.Fatalf("stored %+v (tls %+v)", rec, rec.tls)
	}
	sb.Close()
	s.wait(t)

	wrong := compile(t, hpkeRuleYAML(t, t.TempDir(), priv, `serverName: `+serverName+`, spkiSHA256: ["`+k.client.pin()+`"]`))
	sb, s = serveFlow(t, context.Background(), p, wrong, configureOK(t, p, wrong), st.addr(), serverName)
	resp, _ = send(t, bufio.NewReader(sb), sb, hostOf(st), "POST", "/v1/results", 1000, false, "")
	if resp.StatusCode != 502 || resp.Header.Get("Cleanwall-Reason") != ReasonPin {
		t.Fatalf("wrong pin: %d %q", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"))
	}
	res := s.wait(t)
	if reason, _ := proxies.RefusalOf(res.Err); reason != ReasonPin {
		t.Errorf("result %+v", res)
	}
	if d, _, _ := s.rep.get(); len(d) != 1 || d[0].Reason != ReasonPin || d[0].Status != 502 || d[0].Path != "/v1/results" {
		t.Errorf("denials %+v", d)
	}
	if n := len(st.requests()); n != 1 {
		t.Errorf("the remote's application got %d requests, want 1", n)
	}
}

// TestHTTPRefusals: requests the proxy answers itself, reported, with
// nothing sent to the remote.
func TestHTTPRefusals(t *testing.T) {
	priv := hpkeKey(t, hpke.SuiteX25519)
	st := startStore(t, priv, nil)
	p := &HTTP{Logger: testLog(t)}
	rule := compile(t, hpkeRuleYAML(t, t.TempDir(), priv, ""))
	for _, tc := range []struct {
		name, raw string
		status    int
		reason    string
	}{
		{"host", "POST / HTTP/1.1\r\nHost: elsewhere.test\r\nContent-Length: 3\r\n\r\nabc", 421, ReasonHostMismatch},
		{"upgrade", "GET / HTTP/1.1\r\nHost: " + serverName + "\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", 403, ReasonUpgrade},
		{"connect", "CONNECT " + serverName + ":443 HTTP/1.1\r\nHost: " + serverName + ":443\r\n\r\n", 403, ReasonConnect},
		{"content-encoding", "POST / HTTP/1.1\r\nHost: " + serverName + "\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc", 415, ReasonContentEncoding},
		{"expect", "POST / HTTP/1.1\r\nHost: " + serverName + "\r\nExpect: magic\r\nContent-Length: 3\r\n\r\nabc", 417, ReasonExpect},
		{"cl and te", "POST / HTTP/1.1\r\nHost: " + serverName + "\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400, ReasonBadRequest},
		{"http/2", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, ReasonHTTPVersion},
		{"head too large", "GET / HTTP/1.1\r\nHost: " + serverName + "\r\nX: " + strings.Repeat("a", 40<<10) + "\r\n\r\n", 431, ReasonHeaderTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sb, s := serveFlow(t, context.Background(), p, rule, configureOK(t, p, rule), st.addr(), serverName)
			raw := strings.ReplaceAll(tc.raw, "Host: "+serverName+"\r\n", "Host: "+hostOf(st)+"\r\n")
			_ = sb.SetDeadline(time.Now().Add(10 * time.Second))
			go io.WriteString(sb, raw)
			resp, err := http.ReadResponse(bufio.NewReader(sb), nil)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != tc.status || resp.Header.Get("Cleanwall-Reason") != tc.reason {
				t.Fatalf("%d %q, want %d %s", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"), tc.status, tc.reason)
			}
			s.wait(t)
			if d, _, _ := s.rep.get(); len(d) != 1 || d[0].Reason != tc.reason {
				t.Errorf("denials %+v", d)
			}
			if n := len(st.requests()); n != 0 {
				t.Errorf("the remote got %d requests", n)
			}
		})
	}
}

// TestHTTPKeyReload: a public key file replaced on disk seals the next
// body to the new key; one that no longer parses refuses bodies
// (hpke-key) rather than sealing to the withdrawn key.
func TestHTTPKeyReload(t *testing.T) {
	old, next := hpkeKey(t, hpke.SuiteXWing), hpkeKey(t, hpke.SuiteXWing)
	st := startStore(t, old, nil)
	dir := t.TempDir()
	p := &HTTP{Logger: testLog(t), ReloadInterval: time.Nanosecond}
	rule := compile(t, hpkeRuleYAML(t, dir, old, ""))
	cfg := configureOK(t, p, rule)
	put := func() (*http.Response, string) {
		sb, s := serveFlow(t, context.Background(), p, rule, cfg, st.addr(), serverName)
		resp, got := send(t, bufio.NewReader(sb), sb, hostOf(st), "PUT", "/x", 100, false, "")
		sb.Close()
		s.wait(t)
		return resp, got
	}
	want := fmt.Sprintf("len=100 sha=%s", bodySHA(100))
	if resp, got := put(); resp.StatusCode != 200 || got != want {
		t.Fatalf("%d %q", resp.StatusCode, got)
	}
	writeFile(t, dir, "partner.hpke.pub", next.Public().Marshal())
	st.setKey(next)
	if resp, got := put(); resp.StatusCode != 200 || got != want {
		t.Fatalf("after the rotation: %d %q (%+v)", resp.StatusCode, got, st.requests()[1])
	}
	writeFile(t, dir, "partner.hpke.pub", []byte("withdrawn"))
	if resp, _ := put(); resp.StatusCode != 500 || resp.Header.Get("Cleanwall-Reason") != ReasonHPKEKey {
		t.Fatalf("with a broken key file: %d %q", resp.StatusCode, resp.Header.Get("Cleanwall-Reason"))
	}
	if n := len(st.requests()); n != 2 {
		t.Errorf("the remote got %d requests, want 2", n)
	}
}

// TestHTTPEarlyAnswer: a remote that answers before it read the body (a
// refusal of its own) and stops reading gets its answer to the sandbox
// within the grace the proxy gives the body; the rest of the body never
// reaches it as a whole sealed body, and the sandbox's connection ends
// (what it sends next could not be told from the rest of its body).
func TestHTTPEarlyAnswer(t *testing.T) {
	priv := hpkeKey(t, hpke.SuiteX25519)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!")
		c.(*net.TCPConn).CloseWrite()
		time.Sleep(1500 * time.Millisecond) // reads nothing meanwhile
		n, _ := io.Copy(io.Discard, br)
		got <- n
	}()
	st := &store{ln: ln}
	p := &HTTP{Logger: testLog(t)}
	rule := compile(t, hpkeRuleYAML(t, t.TempDir(), priv, ""))
	sb, s := serveFlow(t, context.Background(), p, rule, configureOK(t, p, rule), st.addr(), serverName)
	const n = 8 << 20
	resp, body := send(t, bufio.NewReader(sb), sb, hostOf(st), "PUT", "/big", n, false, "")
	if resp.StatusCode != 413 || body != "big!" || !resp.Close {
		t.Fatalf("%d %q close=%v", resp.StatusCode, body, resp.Close)
	}
	s.wait(t)
	select {
	case m := <-got:
		if m >= hpke.SealedSize(n, priv.Public()) {
			t.Errorf("the remote read %d bytes: the whole sealed body", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the remote's connection did not end")
	}
}

// TestHTTPRevocation: a done ctx resets both connections mid-body.
func TestHTTPRevocation(t *testing.T) {
	priv := hpkeKey(t, hpke.SuiteX25519)
	st := startStore(t, priv, nil)
	p := &HTTP{Logger: testLog(t)}
	rule := compile(t, hpkeRuleYAML(t, t.TempDir(), priv, ""))
	ctx, cancel := context.WithCancel(context.Background())
	sb, s := serveFlow(t, ctx, p, rule, configureOK(t, p, rule), st.addr(), serverName)
	_ = sb.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(sb, "PUT /x HTTP/1.1\r\nHost: %s\r\nContent-Length: 1000000\r\n\r\n%s", hostOf(st), canary)
	time.Sleep(100 * time.Millisecond)
	cancel()
	if res := s.wait(t); res.End != proxies.EndRevoked {
		t.Errorf("result %+v", res)
	}
	if _, err := io.ReadAll(sb); err == nil {
		t.Error("the sandbox's connection ended cleanly")
	}
	time.Sleep(100 * time.Millisecond)
	for _, r := range st.requests() {
		if r.openErr == nil {
			t.Errorf("the remote holds a body that opens: %+v", r)
		}
	}
}
