package extension

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

// Every wait in these tests is for an event (a message, a result, a line
// on a pipe, a process exit), bounded by waitLimit so that a broken build
// fails instead of hanging.
const waitLimit = 15 * time.Second

// recorder is a proxies.Reporter that keeps what it was told.
type recorder struct {
	mu      sync.Mutex
	out, in int64
	denials []proxies.Denial
}

func (r *recorder) Bytes(out, in int64) {
	r.mu.Lock()
	r.out += out
	r.in += in
	r.mu.Unlock()
}

func (r *recorder) Deny(d proxies.Denial) {
	r.mu.Lock()
	r.denials = append(r.denials, d)
	r.mu.Unlock()
}

func (r *recorder) bytes() (out, in int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.out, r.in
}

func (r *recorder) denied() []proxies.Denial {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]proxies.Denial(nil), r.denials...)
}

// testRule is an open rule served by the extension called name.
func testRule(name string) *policy.Rule {
	return &policy.Rule{
		ID: 1, Name: "api", Mode: policy.ModeOpen, Path: "spec.egress[0]",
		Spec: &policy.EgressRule{Name: "api", Mode: "open", Open: &policy.OpenSpec{Protocol: name}},
	}
}

// newProxy is a Proxy for an extension at path, logging to t.
func newProxy(t *testing.T, path string) *Proxy {
	p := &Proxy{Name: "requestlog", Path: path, Logger: testutil.Logger(t), AnswerTimeout: 5 * time.Second}
	t.Cleanup(func() { p.Close() })
	return p
}

// sandbox stands for the sandbox and the firewall's transparent listener:
// a flow is a loopback connection whose accepted end goes to ServeStream.
type sandbox struct {
	t  *testing.T
	ln *net.TCPListener
}

func newSandbox(t *testing.T) *sandbox {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &sandbox{t: t, ln: ln}
}

// flowRun is one flow being served.
type flowRun struct {
	client *net.TCPConn // the sandbox's end
	rec    *recorder
	cancel context.CancelCauseFunc
	res    chan proxies.Result
}

// start opens a flow to dst (its original destination) and serves it
// with p on a goroutine.
func (s *sandbox) start(p *Proxy, dst netip.AddrPort) *flowRun {
	t := s.t
	t.Helper()
	client, err := net.DialTCP("tcp", nil, s.ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	accepted, err := s.ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	t.Cleanup(func() { cancel(nil) })
	fr := &flowRun{client: client, rec: &recorder{}, cancel: cancel, res: make(chan proxies.Result, 1)}
	f := &proxies.Flow{
		Sandbox: "sandbox-1", Rule: testRule(p.Name),
		Src: client.LocalAddr().(*net.TCPAddr).AddrPort(), Dst: dst,
		Hosts:  []string{"upstream.example.test"},
		Report: fr.rec,
	}
	go func() { fr.res <- p.ServeStream(ctx, accepted, f) }()
	return fr
}

// result waits for ServeStream's result.
func (fr *flowRun) result(t *testing.T) proxies.Result {
	t.Helper()
	select {
	case r := <-fr.res:
		return r
	case <-time.After(waitLimit):
		t.Fatal("ServeStream did not return")
		return proxies.Result{}
	}
}

// expectReset checks that the sandbox's connection was reset.
func expectReset(t *testing.T, c *net.TCPConn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(waitLimit))
	n, err := c.Read(make([]byte, 1))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("sandbox's connection: read %d bytes, %v; want a reset", n, err)
	}
}

// expectRefused checks a result of a flow the extension did not take.
func expectRefused(t *testing.T, r proxies.Result, reason string, cause error) {
	t.Helper()
	var fe *FlowError
	if r.End != proxies.EndError || !errors.As(r.Err, &fe) {
		t.Fatalf("result %+v; want EndError with a *FlowError", r)
	}
	if fe.Reason != reason || !errors.Is(r.Err, cause) {
		t.Fatalf("result error %q (reason %q); want reason %q and %v", r.Err, fe.Reason, reason, cause)
	}
}

// expectDenial checks the deny event of a refused flow.
func expectDenial(t *testing.T, rec *recorder, want proxies.Denial) {
	t.Helper()
	got := rec.denied()
	if len(got) != 1 || got[0] != want {
		t.Fatalf("denials %+v; want [%+v]", got, want)
	}
}

// upstream is a "remote" server on loopback.
type upstream struct {
	ln  *net.TCPListener
	got chan []byte // what each connection received, at its EOF
}

// newUpstream serves each connection on 127.0.0.1 with serve on a
// goroutine.
func newUpstream(t *testing.T, serve func(c *net.TCPConn, u *upstream)) *upstream {
	return newUpstreamAt(t, net.IPv4(127, 0, 0, 1), serve)
}

func newUpstreamAt(t *testing.T, ip net.IP, serve func(c *net.TCPConn, u *upstream)) *upstream {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: ip})
	if err != nil {
		t.Fatal(err)
	}
	u := &upstream{ln: ln, got: make(chan []byte, 16)}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				serve(c, u)
			}()
		}
	}()
	return u
}

func (u *upstream) addr() netip.AddrPort { return u.ln.Addr().(*net.TCPAddr).AddrPort() }

// respondAtEOF reads the whole request stream (until the sandbox's
// half-close), then answers.
func respondAtEOF(response string) func(*net.TCPConn, *upstream) {
	return func(c *net.TCPConn, u *upstream) {
		b, err := io.ReadAll(c)
		if err != nil {
			return
		}
		u.got <- b
		c.Write([]byte(response))
	}
}

// echo sends back what it reads.
func echo(c *net.TCPConn, _ *upstream) { io.Copy(c, c) }

// pythonExt is the example extension, run by Debian's Python.
type pythonExt struct {
	cmd      *exec.Cmd
	exited   chan struct{} // closed once stderr reached EOF and Wait returned
	stopOnce sync.Once
}

const python = "/usr/bin/python3"

// startPython runs examples/extensions/requestlog.py with args (options,
// the socket, the log file) and waits until it listens.
func startPython(t *testing.T, args ...string) *pythonExt {
	t.Helper()
	if _, err := os.Stat(python); err != nil {
		testutil.Skip(t, "needs Debian's "+python+" for the example extension")
	}
	script, err := filepath.Abs("../../examples/extensions/requestlog.py")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(python, append([]string{script}, args...)...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	x := &pythonExt{cmd: cmd, exited: make(chan struct{})}
	ready := make(chan struct{})
	go func() {
		defer close(x.exited)
		s := bufio.NewScanner(stderr)
		for s.Scan() {
			t.Log("python: " + s.Text())
			if strings.HasPrefix(s.Text(), "requestlog: listening on ") {
				close(ready)
			}
		}
		cmd.Wait()
	}()
	t.Cleanup(x.kill)
	select {
	case <-ready:
	case <-x.exited:
		t.Fatal("the example extension exited before listening")
	case <-time.After(waitLimit):
		t.Fatal("the example extension did not start listening")
	}
	return x
}

// kill SIGKILLs the extension and waits until it is gone.
func (x *pythonExt) kill() {
	x.stopOnce.Do(func() { x.cmd.Process.Kill() })
	<-x.exited
}

// fakeExt is an extension written in the test, for the failures the
// example never makes.
type fakeExt struct {
	t     *testing.T
	ln    *net.UnixListener
	conns chan *net.UnixConn
}

func newFake(t *testing.T, path string) *fakeExt {
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	x := &fakeExt{t: t, ln: ln, conns: make(chan *net.UnixConn, 8)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			x.conns <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		close(x.conns)
		for c := range x.conns {
			c.Close()
		}
	})
	return x
}

// accept takes the next control connection and reads the proxy's hello.
func (x *fakeExt) accept() *fakeConn {
	t := x.t
	t.Helper()
	select {
	case c := <-x.conns:
		t.Cleanup(func() { c.Close() })
		fc := &fakeConn{t: t, uc: c}
		if m := fc.recv(); m["type"] != "hello" || m["version"] != 1.0 || m["extension"] != "requestlog" || m["max_message"] != float64(MaxMessage) {
			t.Fatalf("proxy's hello: %v", m)
		}
		return fc
	case <-time.After(waitLimit):
		t.Fatal("the proxy did not connect")
		return nil
	}
}

// acceptHello takes the next control connection and answers its hello.
func (x *fakeExt) acceptHello(reportsEnd bool) *fakeConn {
	x.t.Helper()
	fc := x.accept()
	fc.sendJSON(map[string]any{"type": "hello", "version": 1, "reports_end": reportsEnd})
	return fc
}

// fakeConn is the fake's end of a control connection.
type fakeConn struct {
	t  *testing.T
	uc *net.UnixConn
}

// recvRaw reads one message and the descriptors that came with it.
func (fc *fakeConn) recvRaw() ([]byte, []int) {
	t := fc.t
	t.Helper()
	buf := make([]byte, MaxMessage+1)
	oob := make([]byte, unix.CmsgSpace(4*4))
	fc.uc.SetReadDeadline(time.Now().Add(waitLimit))
	n, oobn, flags, _, err := fc.uc.ReadMsgUnix(buf, oob)
	if err != nil {
		t.Fatalf("fake extension: reading: %v", err)
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || n > MaxMessage {
		t.Fatalf("fake extension: message over %d bytes", MaxMessage)
	}
	var fds []int
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range msgs {
			more, err := unix.ParseUnixRights(&m)
			if err != nil {
				t.Fatal(err)
			}
			fds = append(fds, more...)
		}
	}
	return buf[:n], fds
}

// recv reads one message that carries no descriptor.
func (fc *fakeConn) recv() map[string]any {
	fc.t.Helper()
	b, fds := fc.recvRaw()
	if len(fds) != 0 {
		fc.t.Fatalf("message %s came with descriptors", b)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		fc.t.Fatalf("message %q: %v", b, err)
	}
	return m
}

// recvFlow reads a flow message and its descriptor, as a connection.
func (fc *fakeConn) recvFlow() (map[string]any, uint64, *net.TCPConn) {
	t := fc.t
	t.Helper()
	b, fds := fc.recvRaw()
	if len(fds) != 1 {
		t.Fatalf("flow message %s came with %d descriptors", b, len(fds))
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil || m["type"] != "flow" {
		t.Fatalf("want a flow message, got %q (%v)", b, err)
	}
	f := os.NewFile(uintptr(fds[0]), "flow")
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return m, uint64(m["id"].(float64)), nc.(*net.TCPConn)
}

// expectEOF checks that the proxy closed the control connection.
func (fc *fakeConn) expectEOF() {
	t := fc.t
	t.Helper()
	fc.uc.SetReadDeadline(time.Now().Add(waitLimit))
	// EOF, or ECONNRESET when the proxy closed with messages unread.
	n, _, _, _, err := fc.uc.ReadMsgUnix(make([]byte, MaxMessage), nil)
	if err == nil && n != 0 || err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("control connection: read %d bytes, %v; want it closed by the proxy", n, err)
	}
}

func (fc *fakeConn) send(msg string) {
	fc.t.Helper()
	if _, err := fc.uc.Write([]byte(msg)); err != nil {
		fc.t.Fatalf("fake extension: sending %s: %v", msg, err)
	}
}

func (fc *fakeConn) sendJSON(m map[string]any) {
	fc.t.Helper()
	b, err := json.Marshal(m)
	if err != nil {
		fc.t.Fatal(err)
	}
	fc.send(string(b))
}

// liveControl is the proxy's control connection (nil when none).
func (p *Proxy) liveControl() *control {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ctl
}

// flowsInFlight is what counts against MaxFlows.
func (p *Proxy) flowsInFlight() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.inFlight
}
