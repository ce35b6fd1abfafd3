package secure

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/proxies/seal"
)

const canary = "CANARY-patient-4711-"

// tcpRule is a secure TCP rule named db under key testKeyID.
func tcpRule(extra string) (ruleName string, secure string) {
	return "db", `{keyID: ` + testKeyID + `, protocol: tcp` + extra + `}`
}

// loopRemote is the other end of a secure TCP flow: a service that holds
// the data key, opens the sandbox's stream (the rule's out context) and
// answers with its own object (the in context). Its answer is what reply
// makes of each message; it records every byte it received.
type loopRemote struct {
	*remoteListener
	keys    *memKeys
	version int // key version it seals its answers with
	out, in string
	reply   func(msg []byte) []byte

	mu      sync.Mutex
	raw     bytes.Buffer
	headers []seal.Header
	errs    []error
}

func newLoopRemote(t testing.TB, keys *memKeys, version int, reply func([]byte) []byte) *loopRemote {
	r := &loopRemote{keys: keys, version: version, reply: reply}
	r.out, r.in = Contexts("db")
	r.remoteListener = listenRemote(t, r.handle)
	return r
}

// newTLSLoopRemote is an echoing loopRemote behind TLS with cert.
func newTLSLoopRemote(t testing.TB, keys *memKeys, cert tls.Certificate) *loopRemote {
	r := &loopRemote{keys: keys, version: 1, reply: echo}
	r.out, r.in = Contexts("db")
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	r.remoteListener = listenRemote(t, func(c net.Conn) { r.handle(tls.Server(c, cfg)) })
	return r
}

func tlsKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	return tls.LoadX509KeyPair(certFile, keyFile)
}

// echo answers every message with itself.
func echo(msg []byte) []byte { return msg }

type teeReader struct {
	r  io.Reader
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (t *teeReader) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	t.mu.Lock()
	t.w.Write(p[:n])
	t.mu.Unlock()
	return n, err
}

func (r *loopRemote) handle(c net.Conn) {
	defer c.Close()
	o := seal.NewOpener(&teeReader{r: c, mu: &r.mu, w: &r.raw}, r.keys.keyFunc, seal.WithContext(r.out))
	k, err := r.keys.Version(testKeyID, r.version)
	if err != nil {
		panic(err)
	}
	s, err := seal.NewSealer(c, seal.SealConfig{Key: k.Key, KeyID: testKeyID, KeyVersion: r.version, Context: r.in, Interactive: true})
	if err != nil {
		panic(err)
	}
	if h, err := o.Header(); err == nil {
		r.mu.Lock()
		r.headers = append(r.headers, h)
		r.mu.Unlock()
	}
	buf := make([]byte, 64<<10)
	for {
		n, err := o.Read(buf)
		if n > 0 {
			if _, werr := s.Write(r.reply(buf[:n])); werr != nil {
				return
			}
			if werr := s.Flush(); werr != nil {
				return
			}
		}
		if err == io.EOF {
			if s.Close() == nil {
				_ = closeWrite(c)
				_, _ = io.Copy(io.Discard, c)
			}
			return
		}
		if err != nil {
			r.mu.Lock()
			r.errs = append(r.errs, err)
			r.mu.Unlock()
			reset(c)
			return
		}
	}
}

func (r *loopRemote) received() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.raw.Bytes())
}

// exchange writes data from the sandbox, half-closes, and reads the
// sandbox's side to its end.
func exchange(t *testing.T, sb *net.TCPConn, data []byte) ([]byte, error) {
	t.Helper()
	werr := make(chan error, 1)
	go func() {
		_, err := sb.Write(data)
		if err == nil {
			err = sb.CloseWrite()
		}
		werr <- err
	}()
	got, err := readAll(sb)
	if e := <-werr; e != nil && err == nil {
		err = e
	}
	return got, err
}

func TestTCPRoundTrip(t *testing.T) {
	seg := seal.DefaultSegmentSize
	large := 32 << 20
	if testing.Short() {
		large = 8 << 20
	}
	keys := newKeys().add(testKeyID, 1, 0x42)
	remote := newLoopRemote(t, keys, 1, echo)
	name, spec := tcpRule("")
	rule := compileRule(t, name, spec)
	for _, size := range []int{0, 1, seg - 1, seg, seg + 1, large} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			data := pattern(size, canary)
			sb, s := serve(t, context.Background(), testTCP(t), rule, keys, remote.addr())
			got, err := exchange(t, sb, data)
			if err != nil {
				t.Fatalf("sandbox: %v", err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("sandbox got %d bytes back, sent %d (equal: %v)", len(got), len(data), bytes.Equal(got, data))
			}
			res := s.wait(t)
			if res.End != proxies.EndClosed || res.Err != nil {
				t.Fatalf("result %+v", res)
			}
			if out, in := s.rep.bytes(); out != int64(size) || in != int64(size) {
				t.Fatalf("reported %d out, %d in; want %d both", out, in, size)
			}
			s.rep.wantDenial(t)
		})
	}
	raw := remote.received()
	if bytes.Contains(raw, []byte(canary)) {
		t.Fatal("the remote received the plaintext canary")
	}
	if len(raw) < large {
		t.Fatalf("the remote received %d bytes", len(raw))
	}
}

// TestTCPInteractive: a request reaches the remote, and its answer the
// sandbox, while both connections stay open (each read is a segment).
func TestTCPInteractive(t *testing.T) {
	keys := newKeys().add(testKeyID, 1, 0x42)
	remote := newLoopRemote(t, keys, 1, func(m []byte) []byte { return append([]byte("re: "), m...) })
	name, spec := tcpRule("")
	sb, s := serve(t, context.Background(), testTCP(t), compileRule(t, name, spec), keys, remote.addr())
	for i := range 3 {
		msg := fmt.Sprintf("SELECT %d;", i)
		if _, err := sb.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4+len(msg))
		_ = sb.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(sb, buf); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if string(buf) != "re: "+msg {
			t.Fatalf("got %q", buf)
		}
	}
	sb.CloseWrite()
	if rest, err := readAll(sb); err != nil || len(rest) != 0 {
		t.Fatalf("after the half-close: %q, %v", rest, err)
	}
	if res := s.wait(t); res.End != proxies.EndClosed {
		t.Fatalf("result %+v", res)
	}
}

// TestTCPReflectedStreamRefused: a remote that sends the sandbox's own
// sealed stream back gets nothing through: it carries the out context.
func TestTCPReflectedStreamRefused(t *testing.T) {
	keys := newKeys().add(testKeyID, 1, 0x42)
	remote := listenRemote(t, func(c net.Conn) {
		defer c.Close()
		_, _ = io.Copy(c, c)
	})
	name, spec := tcpRule("")
	sb, s := serve(t, context.Background(), testTCP(t), compileRule(t, name, spec), keys, remote.addr())
	got, err := exchange(t, sb, []byte(canary+"reflect me"))
	if len(got) != 0 {
		t.Fatalf("the sandbox read %q", got)
	}
	if !isReset(err) {
		t.Fatalf("the sandbox's connection ended with %v, want a reset", err)
	}
	res := s.wait(t)
	if res.End != proxies.EndError || !errors.Is(res.Err, seal.ErrRefused) {
		t.Fatalf("result %+v", res)
	}
	s.rep.wantDenial(t, ReasonSealOpenFailed)
}

// TestTCPRefusedInbound: what the remote sends back that is not an
// authentic, whole inbound object reaches the sandbox only as far as its
// verified segments go, and the connection is reset.
func TestTCPRefusedInbound(t *testing.T) {
	keys := newKeys().add(testKeyID, 1, 0x42).add("other", 1, 0x43)
	_, in := Contexts("db")
	first, second := []byte("first segment, verified; "), []byte(canary+"second segment, tampered")
	sealed := func(c seal.SealConfig, flip bool, final bool) []byte {
		var w bytes.Buffer
		s, err := seal.NewSealer(&w, c)
		if err != nil {
			t.Fatal(err)
		}
		s.Write(first)
		s.Flush()
		n := w.Len()
		s.Write(second)
		s.Flush()
		if final {
			s.Close()
		}
		b := w.Bytes()
		if flip {
			b[n+8+3] ^= 0x01 // a ciphertext byte of the second segment
		}
		return b
	}
	k := keys.keys[testKeyID][1]
	good := seal.SealConfig{Key: k, KeyID: testKeyID, KeyVersion: 1, Context: in, Interactive: true}
	cases := []struct {
		name    string
		send    []byte
		want    string // what the sandbox may read
		wantErr error
	}{
		{"tampered", sealed(good, true, true), string(first), seal.ErrAuth},
		{"truncated", sealed(good, false, false), string(first) + string(second), seal.ErrTruncated},
		{"extended", append(sealed(good, false, true), "trailing"...), string(first) + string(second), seal.ErrTrailingData},
		{"plaintext", []byte("HTTP/1.1 200 OK\r\n\r\n" + canary), "", seal.ErrNotSealed},
		{"other key id", sealed(seal.SealConfig{Key: keys.keys["other"][1], KeyID: "other", KeyVersion: 1, Context: in, Interactive: true}, false, true), "", seal.ErrRefused},
		{"wrong key", sealed(seal.SealConfig{Key: keys.keys["other"][1], KeyID: testKeyID, KeyVersion: 1, Context: in, Interactive: true}, false, true), "", seal.ErrCommitment},
		{"another rule", sealed(seal.SealConfig{Key: k, KeyID: testKeyID, KeyVersion: 1, Context: "rule=other dir=in", Interactive: true}, false, true), "", seal.ErrRefused},
		{"nothing", nil, "", seal.ErrTruncated},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			remote := listenRemote(t, func(c net.Conn) {
				defer c.Close()
				c.Write(tc.send)
				c.(*net.TCPConn).CloseWrite()
				_, _ = io.Copy(io.Discard, c)
			})
			name, spec := tcpRule("")
			sb, s := serve(t, context.Background(), testTCP(t), compileRule(t, name, spec), keys, remote.addr())
			got, err := readAll(sb)
			if string(got) != tc.want {
				t.Fatalf("the sandbox read %q, want %q", got, tc.want)
			}
			if bytes.Contains(got, []byte(canary)) && tc.name == "tampered" {
				t.Fatal("the tampered segment reached the sandbox")
			}
			if !isReset(err) {
				t.Fatalf("the sandbox's connection ended with %v, want a reset", err)
			}
			res := s.wait(t)
			if res.End != proxies.EndError || !errors.Is(res.Err, tc.wantErr) {
				t.Fatalf("result %+v, want an error matching %v", res, tc.wantErr)
			}
			s.rep.wantDenial(t, ReasonSealOpenFailed)
			if _, in := s.rep.bytes(); in != int64(len(tc.want)) {
				t.Fatalf("reported %d bytes in, want %d", in, len(tc.want))
			}
		})
	}
}

// TestTCPNoKey: without the key the sandbox's connection is reset and the
// remote never sees a connection.
func TestTCPNoKey(t *testing.T) {
	for _, tc := range []struct {
		name string
		keys proxies.KeySource
	}{
		{"not held", newKeys().add("other", 1, 0x43)},
		{"key source fails", failingKeys{errors.New("broker unreachable")}},
		{"no key source", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			remote := listenRemote(t, func(c net.Conn) { c.Close() })
			name, spec := tcpRule("")
			sb, s := serve(t, context.Background(), testTCP(t), compileRule(t, name, spec), tc.keys, remote.addr())
			// The reset shows in the write or, if the write came first, in
			// the read (a socket reports its error once).
			_, werr := sb.Write([]byte(canary))
			got, err := readAll(sb)
			if len(got) != 0 || !(isReset(err) || isReset(werr)) {
				t.Fatalf("the sandbox read %q, %v (write: %v); want a reset", got, err, werr)
			}
			res := s.wait(t)
			if reason, _ := proxies.RefusalOf(res.Err); res.End != proxies.EndError || reason != ReasonNoKey {
				t.Fatalf("result %+v: want a refusal counted as %s", res, ReasonNoKey)
			}
			s.rep.wantDenial(t, ReasonNoKey)
			time.Sleep(50 * time.Millisecond)
			if n := remote.count(); n != 0 {
				t.Fatalf("the remote accepted %d connections", n)
			}
		})
	}
}

// TestTCPRevocation: a canceled context resets both connections mid-flow.
func TestTCPRevocation(t *testing.T) {
	keys := newKeys().add(testKeyID, 1, 0x42)
	remote := newLoopRemote(t, keys, 1, echo)
	name, spec := tcpRule("")
	ctx, cancel := context.WithCancelCause(context.Background())
	sb, s := serve(t, ctx, testTCP(t), compileRule(t, name, spec), keys, remote.addr())
	if _, err := sb.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	_ = sb.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(sb, buf); err != nil {
		t.Fatal(err)
	}
	revoked := errors.New("key revoked")
	cancel(revoked)
	res := s.wait(t)
	if res.End != proxies.EndRevoked || !errors.Is(res.Err, revoked) {
		t.Fatalf("result %+v", res)
	}
	if got, err := readAll(sb); len(got) != 0 || !isReset(err) {
		t.Fatalf("after revocation the sandbox read %q, %v; want a reset", got, err)
	}
	if out, in := s.rep.bytes(); out != 5 || in != 5 {
		t.Fatalf("reported %d out, %d in", out, in)
	}
}

// TestTCPIdle: a flow on which nothing moves is reset after IdleTimeout.
func TestTCPIdle(t *testing.T) {
	keys := newKeys().add(testKeyID, 1, 0x42)
	remote := newLoopRemote(t, keys, 1, echo)
	name, spec := tcpRule("")
	sb, s := serve(t, context.Background(), &TCP{IdleTimeout: 100 * time.Millisecond, Logger: testutil.Logger(t)}, compileRule(t, name, spec), keys, remote.addr())
	if res := s.wait(t); res.End != proxies.EndIdle {
		t.Fatalf("result %+v", res)
	}
	if _, err := readAll(sb); !isReset(err) {
		t.Fatalf("the sandbox's connection ended with %v, want a reset", err)
	}
}

// TestTCPKeyVersions: the outbound stream is sealed under the current
// version; an inbound stream sealed under an older one still opens.
func TestTCPKeyVersions(t *testing.T) {
	keys := newKeys().add(testKeyID, 1, 0x42).add(testKeyID, 2, 0x44)
	remote := newLoopRemote(t, keys, 1, echo)
	name, spec := tcpRule("")
	sb, s := serve(t, context.Background(), testTCP(t), compileRule(t, name, spec), keys, remote.addr())
	got, err := exchange(t, sb, []byte("rotated"))
	if err != nil || string(got) != "rotated" {
		t.Fatalf("got %q, %v", got, err)
	}
	s.wait(t)
	remote.mu.Lock()
	defer remote.mu.Unlock()
	if len(remote.headers) != 1 || remote.headers[0].KeyVersion != 2 || remote.headers[0].Context != "rule=db dir=out" {
		t.Fatalf("the remote saw headers %+v, want key version 2, context rule=db dir=out", remote.headers)
	}
}

// TestTCPUpstreamTLS: upstreamTLS's CA and pins decide whether the flow
// connects; a remote that fails them gets no application data.
func TestTCPUpstreamTLS(t *testing.T) {
	dir := t.TempDir()
	testutil.TestCA(t, dir, "remote")
	cert, err := tlsKeyPair(filepath.Join(dir, "remote.pem"), filepath.Join(dir, "remote.key"))
	if err != nil {
		t.Fatal(err)
	}
	leafPin := sha256.Sum256(cert.Leaf.RawSubjectPublicKeyInfo)
	good := base64.StdEncoding.EncodeToString(leafPin[:])
	bad := base64.StdEncoding.EncodeToString(make([]byte, 32))
	keys := newKeys().add(testKeyID, 1, 0x42)
	caFile := filepath.Join(dir, "ca.pem")
	for _, tc := range []struct {
		name, tls string
		ok        bool
	}{
		{"ca", `caFile: ` + caFile, true},
		{"pin only", `spkiSHA256: ["` + good + `"]`, true},
		{"ca and pin", `caFile: ` + caFile + `, spkiSHA256: ["` + good + `"]`, true},
		{"wrong pin", `spkiSHA256: ["` + bad + `"]`, false},
		{"ca and wrong pin", `caFile: ` + caFile + `, spkiSHA256: ["` + bad + `"]`, false},
		{"wrong name", `caFile: ` + caFile + `, serverName: other.example.test`, false},
		{"system roots", ``, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			remote := newTLSLoopRemote(t, keys, cert)
			name, spec := tcpRule(", upstreamTLS: {" + tc.tls + "}")
			sb, s := serve(t, context.Background(), testTCP(t), compileRule(t, name, spec), keys, remote.addr())
			got, err := exchange(t, sb, []byte(canary))
			res := s.wait(t)
			if tc.ok {
				if err != nil || string(got) != canary || res.End != proxies.EndClosed {
					t.Fatalf("got %q, %v, result %+v", got, err, res)
				}
				s.rep.wantDenial(t)
				return
			}
			if len(got) != 0 || !isReset(err) || res.End != proxies.EndError {
				t.Fatalf("got %q, %v, result %+v; want a reset", got, err, res)
			}
			s.rep.wantDenial(t, ReasonUpstreamTLS)
			if raw := remote.received(); len(raw) != 0 {
				t.Fatalf("the remote received %d bytes of application data", len(raw))
			}
		})
	}
}

// testTCP is the proxy under test, logging to t.
func testTCP(t testing.TB) *TCP { return &TCP{Logger: testutil.Logger(t)} }
