package extension

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/proxies"
)

// dst is the original destination of the flows that never reach one.
var dst = netip.MustParseAddrPort("192.0.2.10:443")

// The flow message carries the flow's metadata, and its descriptor is the
// sandbox's connection itself.
func TestFlowMessage(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "x.sock")
	x := newFake(t, sock)
	p := newProxy(t, sock)
	fr := newSandbox(t).start(p, netip.MustParseAddrPort("[::ffff:192.0.2.10]:443"))
	fc := x.acceptHello(true)
	m, id, c := fc.recvFlow()
	want := fmt.Sprintf(`map[dst:map[ip:192.0.2.10 port:443] hosts:[upstream.example.test] hosts_truncated:false id:%d mode:open protocol:requestlog rule:api sandbox:sandbox-1 src:map[ip:127.0.0.1 port:%d] type:flow version:1]`,
		id, fr.client.LocalAddr().(*net.TCPAddr).Port)
	if got := fmt.Sprint(m); got != want {
		t.Fatalf("flow message\n%s\nwant\n%s", got, want)
	}
	if c.RemoteAddr().String() != fr.client.LocalAddr().String() {
		t.Fatalf("descriptor's peer is %s; want the sandbox's %s", c.RemoteAddr(), fr.client.LocalAddr())
	}
	fc.sendJSON(map[string]any{"type": "accept", "id": id})
	// The proxy closed its copy: the flow is the extension's alone.
	if _, err := c.Write([]byte("from the extension")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len("from the extension"))
	fr.client.SetReadDeadline(time.Now().Add(waitLimit))
	if _, err := io.ReadFull(fr.client, got); err != nil {
		t.Fatal(err)
	}
	c.Close() // the extension owns it, and closes it
	fr.client.SetReadDeadline(time.Now().Add(waitLimit))
	if n, err := fr.client.Read(got); err != io.EOF {
		t.Fatalf("after the extension closed the flow: read %d, %v; want EOF (nobody else may hold it)", n, err)
	}
	fc.sendJSON(map[string]any{"type": "end", "id": id, "result": "closed"})
	if r := fr.result(t); r.End != proxies.EndClosed || r.Err != nil {
		t.Fatalf("result %+v", r)
	}
}

// Hosts that do not fit in a message are dropped, and the message says so.
func TestFlowMessageHostsBounded(t *testing.T) {
	var hosts []string
	for i := range 100 {
		hosts = append(hosts, fmt.Sprintf("h%03d.%s.example.test", i, strings.Repeat("a", 200)))
	}
	b, err := encodeFlow(flowOut{Type: typeFlow, Version: Version, ID: 1, Hosts: hosts})
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > MaxMessage || !strings.Contains(string(b), `"hosts_truncated":true`) || !strings.Contains(string(b), hosts[0]) {
		t.Fatalf("%d bytes: %.200s", len(b), b)
	}
}

// Nothing listening at the path, or a socket file nobody listens on: the
// flow is reset at once, as extension-unavailable.
func TestExtensionNotRunning(t *testing.T) {
	for _, tc := range []struct {
		name string
		prep func(path string)
	}{
		{"no-socket", func(string) {}},
		{"stale-socket", func(path string) {
			// A socket bound but not listening, as a dead extension leaves it.
			fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(fd)
			if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "x.sock")
			tc.prep(sock)
			p := newProxy(t, sock)
			fr := newSandbox(t).start(p, dst)
			expectReset(t, fr.client)
			expectRefused(t, fr.result(t), ReasonUnavailable, ErrNotListening)
			expectDenial(t, fr.rec, proxies.Denial{Reason: ReasonUnavailable, Detail: "not-listening"})
		})
	}
}

// An extension that does not answer in time has the flow reset, even
// though it holds the descriptor, and is told so.
func TestExtensionTooSlow(t *testing.T) {
	t.Run("flow", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "x.sock")
		x := newFake(t, sock)
		p := newProxy(t, sock)
		p.AnswerTimeout = 300 * time.Millisecond
		fr := newSandbox(t).start(p, dst)
		fc := x.acceptHello(true)
		_, id, held := fc.recvFlow()
		expectReset(t, fr.client)
		expectRefused(t, fr.result(t), ReasonUnavailable, ErrTimeout)
		expectDenial(t, fr.rec, proxies.Denial{Reason: ReasonUnavailable, Detail: "timeout"})
		if m := fc.recv(); m["type"] != "close" || m["id"] != float64(id) || m["reason"] != "timeout" {
			t.Fatalf("after the timeout the proxy sent %v; want close/timeout", m)
		}
		// The extension's copy is a dead connection now.
		held.SetReadDeadline(time.Now().Add(waitLimit))
		if _, err := held.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("extension's copy: %v; want ECONNRESET", err)
		}
		// A late answer is no violation: the connection stays and serves.
		fc.sendJSON(map[string]any{"type": "accept", "id": id})
		fr2 := newSandbox(t).start(p, dst)
		_, id2, _ := fc.recvFlow()
		fc.sendJSON(map[string]any{"type": "refuse", "id": id2, "reason": "checked"})
		expectRefused(t, fr2.result(t), "extension-refused:checked", ErrRefused)
	})
	t.Run("hello", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "x.sock")
		x := newFake(t, sock)
		p := newProxy(t, sock)
		p.AnswerTimeout = 300 * time.Millisecond
		fr := newSandbox(t).start(p, dst)
		fc := x.accept() // and never answers
		expectReset(t, fr.client)
		expectRefused(t, fr.result(t), ReasonUnavailable, ErrTimeout)
		fc.expectEOF()
	})
}

// Anything outside the protocol drops the control connection and resets
// the flow it concerned; the next flow gets a new connection.
func TestProtocolViolation(t *testing.T) {
	for _, tc := range []struct {
		name  string
		reply func(fc *fakeConn, id uint64)
		hello string // replaces the hello when set
	}{
		{name: "not-json", reply: func(fc *fakeConn, id uint64) { fc.send("accept " + fmt.Sprint(id)) }},
		{name: "json-not-object", reply: func(fc *fakeConn, id uint64) { fc.send(`["accept"]`) }},
		{name: "unknown-type", reply: func(fc *fakeConn, id uint64) { fc.send(fmt.Sprintf(`{"type":"welcome","id":%d}`, id)) }},
		{name: "no-id", reply: func(fc *fakeConn, id uint64) { fc.send(`{"type":"accept"}`) }},
		{name: "id-not-integer", reply: func(fc *fakeConn, id uint64) { fc.send(fmt.Sprintf(`{"type":"accept","id":%d.5}`, id)) }},
		{name: "id-never-sent", reply: func(fc *fakeConn, id uint64) { fc.send(fmt.Sprintf(`{"type":"accept","id":%d}`, id+1000)) }},
		{name: "bytes-before-accept", reply: func(fc *fakeConn, id uint64) {
			fc.send(fmt.Sprintf(`{"type":"bytes","id":%d,"out":1,"in":0}`, id))
		}},
		{name: "refuse-reason-not-token", reply: func(fc *fakeConn, id uint64) {
			fc.send(fmt.Sprintf(`{"type":"refuse","id":%d,"reason":"Not Allowed"}`, id))
		}},
		{name: "refuse-reason-too-long", reply: func(fc *fakeConn, id uint64) {
			fc.send(fmt.Sprintf(`{"type":"refuse","id":%d,"reason":"%s"}`, id, strings.Repeat("a", 65)))
		}},
		{name: "oversized", reply: func(fc *fakeConn, id uint64) {
			fc.send(fmt.Sprintf(`{"type":"accept","id":%d,"pad":"%s"}`, id, strings.Repeat("x", MaxMessage)))
		}},
		{name: "second-hello", reply: func(fc *fakeConn, id uint64) { fc.send(`{"type":"hello","version":1}`) }},
		{name: "not-utf8", reply: func(fc *fakeConn, id uint64) {
			fc.send(fmt.Sprintf("{\"type\":\"accept\",\"id\":%d,\"x\":\"\xff\"}", id))
		}},
		{name: "descriptor", reply: func(fc *fakeConn, id uint64) { sendWithPipe(t, fc, fmt.Sprintf(`{"type":"accept","id":%d}`, id)) }},
		{name: "hello-version", hello: `{"type":"hello","version":2}`},
		{name: "hello-missing", hello: `{"type":"accept","id":1}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "x.sock")
			x := newFake(t, sock)
			p := newProxy(t, sock)
			sb := newSandbox(t)
			fr := sb.start(p, dst)
			var fc *fakeConn
			if tc.hello != "" {
				fc = x.accept()
				fc.send(tc.hello)
			} else {
				fc = x.acceptHello(true)
				_, id, _ := fc.recvFlow()
				tc.reply(fc, id)
			}
			expectReset(t, fr.client)
			expectRefused(t, fr.result(t), ReasonUnavailable, ErrProtocol)
			expectDenial(t, fr.rec, proxies.Denial{Reason: ReasonUnavailable, Detail: "protocol"})
			fc.expectEOF()

			// A well-behaved extension is served again, on a new connection.
			fr = sb.start(p, dst)
			fc = x.acceptHello(true)
			_, id, _ := fc.recvFlow()
			fc.sendJSON(map[string]any{"type": "accept", "id": id})
			fc.sendJSON(map[string]any{"type": "end", "id": id, "result": "closed"})
			if r := fr.result(t); r.End != proxies.EndClosed {
				t.Fatalf("flow after the violation: %+v", r)
			}
		})
	}
}

// sendWithPipe sends msg with a pipe's write end attached, closes the
// fake's copy, and checks (once the proxy has dropped the connection) that
// the proxy closed the copy it received: the read end sees EOF.
func sendWithPipe(t *testing.T, fc *fakeConn, msg string) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, _, err := fc.uc.WriteMsgUnix([]byte(msg), unix.UnixRights(int(w.Fd())), nil); err != nil {
		t.Fatal(err)
	}
	w.Close()
	r.SetReadDeadline(time.Now().Add(waitLimit))
	if n, err := r.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("pipe read %d, %v: the proxy kept a descriptor the extension sent", n, err)
	}
}

// A refusal resets the flow and names the extension's reason.
func TestRefused(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "x.sock")
	x := newFake(t, sock)
	p := newProxy(t, sock)
	fr := newSandbox(t).start(p, dst)
	fc := x.acceptHello(true)
	_, id, held := fc.recvFlow()
	held.Close()
	fc.sendJSON(map[string]any{"type": "refuse", "id": id, "reason": "no-route"})
	expectReset(t, fr.client)
	expectRefused(t, fr.result(t), "extension-refused:no-route", ErrRefused)
	expectDenial(t, fr.rec, proxies.Denial{Reason: "extension-refused:no-route"})
}

// Bytes, deny events and the end come from the extension's messages, with
// their free text bounded; messages about a flow that ended are ignored.
func TestReportsFromExtension(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "x.sock")
	x := newFake(t, sock)
	p := newProxy(t, sock)
	sb := newSandbox(t)
	fr := sb.start(p, dst)
	fc := x.acceptHello(true)
	_, id, _ := fc.recvFlow()
	fc.sendJSON(map[string]any{"type": "accept", "id": id})
	fc.sendJSON(map[string]any{"type": "bytes", "id": id, "out": 10, "in": 20})
	fc.sendJSON(map[string]any{"type": "bytes", "id": id, "out": 5, "in": 0})
	long := "/" + strings.Repeat("p", 400)
	fc.sendJSON(map[string]any{"type": "deny", "id": id, "reason": "method", "status": 405, "method": "TRACE", "path": long, "detail": "x", "extra": "ignored"})
	fc.sendJSON(map[string]any{"type": "end", "id": id, "result": "error", "error": "upstream " + strings.Repeat("gone ", 100)})
	r := fr.result(t)
	if r.End != proxies.EndError || r.Err == nil || !strings.HasPrefix(r.Err.Error(), "extension requestlog: upstream gone") || len(r.Err.Error()) > 300 {
		t.Fatalf("result %+v", r)
	}
	if out, in := fr.rec.bytes(); out != 15 || in != 20 {
		t.Fatalf("bytes out %d in %d; want 15 and 20", out, in)
	}
	expectDenial(t, fr.rec, proxies.Denial{Reason: "method", Status: 405, Method: "TRACE", Path: long[:maxPath], Detail: "x"})

	// Late messages for the ended flow change nothing, and the connection
	// stays up.
	fc.sendJSON(map[string]any{"type": "bytes", "id": id, "out": 1, "in": 1})
	for _, tc := range []struct {
		result string
		end    proxies.End
	}{{"closed", proxies.EndClosed}, {"idle", proxies.EndIdle}, {"budget-exceeded", proxies.EndBudget}} {
		fr := sb.start(p, dst)
		_, id, _ := fc.recvFlow()
		fc.sendJSON(map[string]any{"type": "accept", "id": id})
		fc.sendJSON(map[string]any{"type": "end", "id": id, "result": tc.result})
		if r := fr.result(t); r.End != tc.end || r.Err != nil {
			t.Fatalf("end %s: result %+v", tc.result, r)
		}
	}
	if out, in := fr.rec.bytes(); out != 15 || in != 20 {
		t.Fatalf("bytes after the end: out %d in %d", out, in)
	}
}

// A flow whose context is done (the policy no longer allows it) is closed:
// the extension is told, ServeStream returns at once.
func TestRevoked(t *testing.T) {
	for _, stage := range []string{"accepted", "pending"} {
		t.Run(stage, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "x.sock")
			x := newFake(t, sock)
			p := newProxy(t, sock)
			fr := newSandbox(t).start(p, dst)
			fc := x.acceptHello(true)
			_, id, held := fc.recvFlow()
			if stage == "accepted" {
				fc.sendJSON(map[string]any{"type": "accept", "id": id})
				// Wait until the flow is the extension's (data flows through it).
				held.Write([]byte("x"))
				fr.client.SetReadDeadline(time.Now().Add(waitLimit))
				if _, err := io.ReadFull(fr.client, make([]byte, 1)); err != nil {
					t.Fatal(err)
				}
			}
			revoked := errors.New("policy changed")
			fr.cancel(revoked)
			if m := fc.recv(); m["type"] != "close" || m["id"] != float64(id) || m["reason"] != "revoked" {
				t.Fatalf("proxy sent %v; want close/revoked", m)
			}
			if r := fr.result(t); r.End != proxies.EndRevoked || !errors.Is(r.Err, revoked) {
				t.Fatalf("result %+v", r)
			}
			if stage == "pending" {
				expectReset(t, fr.client)
			}
		})
	}
}

// MaxFlows bounds the flows in flight: one more is reset as busy.
func TestMaxFlows(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "x.sock")
	x := newFake(t, sock)
	p := newProxy(t, sock)
	p.MaxFlows = 2
	sb := newSandbox(t)
	fc := (*fakeConn)(nil)
	var ids []uint64
	var runs []*flowRun
	for i := range 2 {
		runs = append(runs, sb.start(p, dst))
		if i == 0 {
			fc = x.acceptHello(true)
		}
		_, id, _ := fc.recvFlow()
		fc.sendJSON(map[string]any{"type": "accept", "id": id})
		ids = append(ids, id)
	}
	fr := sb.start(p, dst)
	expectReset(t, fr.client)
	expectRefused(t, fr.result(t), ReasonUnavailable, ErrBusy)
	expectDenial(t, fr.rec, proxies.Denial{Reason: ReasonUnavailable, Detail: "busy"})

	// One ends: there is room again.
	fc.sendJSON(map[string]any{"type": "end", "id": ids[0], "result": "closed"})
	runs[0].result(t) // returned: no longer in flight
	fr = sb.start(p, dst)
	_, id, _ := fc.recvFlow()
	fc.sendJSON(map[string]any{"type": "refuse", "id": id, "reason": "seen"})
	expectRefused(t, fr.result(t), "extension-refused:seen", ErrRefused)
}

// An extension that does not report ends has the flow to itself once it
// accepts: ServeStream returns, and the flow goes on.
func TestWithoutEnds(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "x.sock")
	x := newFake(t, sock)
	p := newProxy(t, sock)
	fr := newSandbox(t).start(p, dst)
	fc := x.acceptHello(false)
	_, id, held := fc.recvFlow()
	fc.sendJSON(map[string]any{"type": "accept", "id": id})
	if r := fr.result(t); r.End != proxies.EndClosed || r.Err != nil {
		t.Fatalf("result %+v", r)
	}
	if p.flowsInFlight() != 0 {
		t.Fatal("flow still counted")
	}
	fc.sendJSON(map[string]any{"type": "bytes", "id": id, "out": 1, "in": 1}) // ignored, no violation
	if _, err := held.Write([]byte("still open")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len("still open"))
	fr.client.SetReadDeadline(time.Now().Add(waitLimit))
	if _, err := io.ReadFull(fr.client, got); err != nil {
		t.Fatal(err)
	}
	if out, in := fr.rec.bytes(); out != 0 || in != 0 {
		t.Fatalf("bytes reported after ServeStream returned: %d %d", out, in)
	}
}

// When the extension dies with flows open, every ServeStream returns, the
// reader goroutine ends and no descriptor is left behind.
func TestExtensionDiesMidFlow(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "x.sock")
	x := newFake(t, sock)
	p := newProxy(t, sock)
	sb := newSandbox(t)
	before := openFDs(t)

	var runs []*flowRun
	var held []*net.TCPConn
	fc := (*fakeConn)(nil)
	for i := range 5 {
		runs = append(runs, sb.start(p, dst))
		if i == 0 {
			fc = x.acceptHello(true)
		}
		_, id, c := fc.recvFlow()
		held = append(held, c)
		if i < 4 {
			fc.sendJSON(map[string]any{"type": "accept", "id": id})
		} // the last one is still waiting for its answer
	}
	ctl := p.liveControl()
	// The extension dies: its descriptors close.
	fc.uc.Close()
	for _, c := range held {
		c.Close()
	}
	for i, fr := range runs {
		r := fr.result(t)
		if i < 4 {
			if r.End != proxies.EndError || !errors.Is(r.Err, ErrLost) {
				t.Fatalf("flow %d: %+v", i, r)
			}
		} else {
			expectRefused(t, r, ReasonUnavailable, ErrLost)
			expectReset(t, fr.client)
		}
		fr.client.Close()
	}
	<-ctl.readerDone
	if p.flowsInFlight() != 0 {
		t.Fatal("flows still counted")
	}
	if after := openFDs(t); after != before {
		t.Fatalf("%d descriptors open before the flows, %d after", before, after)
	}
}

// openFDs counts the test process's descriptors.
func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// Close ends the flows in flight and refuses new ones.
func TestClose(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "x.sock")
	x := newFake(t, sock)
	p := newProxy(t, sock)
	sb := newSandbox(t)
	fr := sb.start(p, dst)
	fc := x.acceptHello(true)
	_, id, _ := fc.recvFlow()
	fc.sendJSON(map[string]any{"type": "accept", "id": id})
	p.Close()
	// Whether the accept was read first or not, the flow ends as closed.
	if r := fr.result(t); r.End != proxies.EndError || !errors.Is(r.Err, ErrClosed) {
		t.Fatalf("result %+v", r)
	}
	fc.expectEOF()
	fr = sb.start(p, dst)
	expectReset(t, fr.client)
	expectRefused(t, fr.result(t), ReasonUnavailable, ErrClosed)
	if err := p.Connect(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Connect after Close: %v", err)
	}
}
