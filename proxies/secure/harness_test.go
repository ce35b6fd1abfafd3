package secure

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/proxies/seal"
)

const testKeyID = "egress-dek"

// memKeys is an in-memory KeySource: versions of each key id, the highest
// one current.
type memKeys struct {
	mu   sync.Mutex
	keys map[string]map[int][]byte
}

func newKeys() *memKeys { return &memKeys{keys: map[string]map[int][]byte{}} }

// add holds version v of key id, derived from seed.
func (m *memKeys) add(id string, v int, seed byte) *memKeys {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.keys[id] == nil {
		m.keys[id] = map[int][]byte{}
	}
	m.keys[id][v] = bytes.Repeat([]byte{seed}, seal.KeySize)
	return m
}

func (m *memKeys) Current(id string) (proxies.DataKey, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	best := -1
	for v := range m.keys[id] {
		best = max(best, v)
	}
	if best < 0 {
		return proxies.DataKey{}, proxies.ErrNoKey
	}
	return proxies.DataKey{ID: id, Version: best, Key: m.keys[id][best]}, nil
}

func (m *memKeys) Version(id string, v int) (proxies.DataKey, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k, ok := m.keys[id][v]
	if !ok {
		return proxies.DataKey{}, proxies.ErrNoKey
	}
	return proxies.DataKey{ID: id, Version: v, Key: k}, nil
}

// keyFunc opens with any held version of any key (the remote's view: it
// holds the data key too).
func (m *memKeys) keyFunc(id string, v int) ([]byte, error) {
	k, err := m.Version(id, v)
	return k.Key, err
}

// failingKeys is a KeySource whose every call fails with err.
type failingKeys struct{ err error }

func (k failingKeys) Current(string) (proxies.DataKey, error)      { return proxies.DataKey{}, k.err }
func (k failingKeys) Version(string, int) (proxies.DataKey, error) { return proxies.DataKey{}, k.err }

// reporter records what a proxy reports.
type reporter struct {
	mu       sync.Mutex
	out, in  int64
	denials  []proxies.Denial
	bytesSet bool
}

func (r *reporter) Bytes(out, in int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.out += out
	r.in += in
	r.bytesSet = true
}

func (r *reporter) Deny(d proxies.Denial) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.denials = append(r.denials, d)
}

func (r *reporter) reasons() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, d := range r.denials {
		out = append(out, d.Reason)
	}
	return out
}

func (r *reporter) bytes() (int64, int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.out, r.in
}

// wantDenial fails t unless exactly the given reasons were reported.
func (r *reporter) wantDenial(t *testing.T, reasons ...string) {
	t.Helper()
	got := r.reasons()
	if strings.Join(got, ",") != strings.Join(reasons, ",") {
		t.Fatalf("denials %q, want %q (%+v)", got, reasons, r.denials)
	}
}

// compileRule compiles a one-rule policy and returns its rule.
func compileRule(t testing.TB, name, secure string) *policy.Rule {
	t.Helper()
	doc := fmt.Sprintf(`apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: test}
spec:
  egress:
    - name: %s
      to: [{cidr: 127.0.0.1/32}]
      ports: [{port: 80}]
      mode: secure
      secure: %s
`, name, secure)
	p, err := policy.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	c, err := policy.Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	return c.Rules[0]
}

// remoteListener is a loopback listener standing for the remote: it
// counts the connections it accepted and hands them to handle.
type remoteListener struct {
	ln       net.Listener
	mu       sync.Mutex
	accepted int
	wg       sync.WaitGroup
}

func listenRemote(t testing.TB, handle func(net.Conn)) *remoteListener {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &remoteListener{ln: ln}
	t.Cleanup(func() { ln.Close(); r.wg.Wait() })
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			r.mu.Lock()
			r.accepted++
			r.mu.Unlock()
			r.wg.Add(1)
			go func() {
				defer r.wg.Done()
				handle(c)
			}()
		}
	}()
	return r
}

func (r *remoteListener) addr() netip.AddrPort { return r.ln.Addr().(*net.TCPAddr).AddrPort() }

func (r *remoteListener) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.accepted
}

// sandboxPair is a loopback connection: the sandbox's end, and the end the
// proxy is handed (its local address standing for the original
// destination).
func sandboxPair(t testing.TB) (sandbox, proxied *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	s, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { s.Close(); r.c.Close() })
	return s.(*net.TCPConn), r.c.(*net.TCPConn)
}

// served runs a proxy's ServeStream in the background.
type served struct {
	done chan proxies.Result
	rep  *reporter
}

func (s *served) wait(t testing.TB) proxies.Result {
	t.Helper()
	select {
	case r := <-s.done:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("ServeStream did not return")
	}
	return proxies.Result{}
}

// serve configures rule on p and serves one flow from a new sandbox
// connection to dst; it returns the sandbox's end.
func serve(t testing.TB, ctx context.Context, p proxies.StreamProxy, rule *policy.Rule, keys proxies.KeySource, dst netip.AddrPort, hosts ...string) (*net.TCPConn, *served) {
	t.Helper()
	cfg, err := p.Configure(rule)
	if err != nil {
		t.Fatal(err)
	}
	sb, proxied := sandboxPair(t)
	s := &served{done: make(chan proxies.Result, 1), rep: &reporter{}}
	if len(hosts) == 0 {
		hosts = []string{dst.Addr().String()}
	}
	f := &proxies.Flow{Sandbox: "sb-test", Rule: rule, Config: cfg, Src: sb.LocalAddr().(*net.TCPAddr).AddrPort(), Dst: dst, Hosts: hosts, Keys: keys, Report: s.rep}
	go func() { s.done <- p.ServeStream(ctx, proxied, f) }()
	return sb, s
}

// isReset reports whether err is what reading a reset connection gives.
func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET)
}

// readAll reads c to its end and reports what ended it.
func readAll(c net.Conn) ([]byte, error) {
	_ = c.SetReadDeadline(time.Now().Add(time.Minute))
	b, err := io.ReadAll(c)
	return b, err
}

// pattern is n bytes of a pattern that starts with canary.
func pattern(n int, canary string) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/251)
	}
	copy(b, canary)
	return b
}
