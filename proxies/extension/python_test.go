package extension

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/proxies"
)

// The example extension (examples/extensions/requestlog.py) serves a flow
// end to end: the sandbox's bytes reach the destination unchanged, the
// answer comes back after the sandbox's half-close, each request line is
// logged, and the bytes and the end are reported.
func TestPythonExtensionForwardsAndLogs(t *testing.T) {
	dir := t.TempDir()
	sock, logFile := filepath.Join(dir, "requestlog.sock"), filepath.Join(dir, "requests.log")
	startPython(t, sock, logFile)
	const response = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
	up := newUpstream(t, respondAtEOF(response))
	p := newProxy(t, sock)
	sb := newSandbox(t)

	// Bodies that look like requests must not be logged as requests.
	body, chunk := "GET /not-a-request HTTP/1.1", "DELETE /inside HTTP/1.1\r\n\r\n"
	requests := fmt.Sprintf("POST /v1/results HTTP/1.1\r\nHost: upstream.example.test\r\nContent-Length: %d\r\n\r\n%s", len(body), body) +
		"PUT /v1/chunks/7 HTTP/1.1\r\nHost: upstream.example.test\r\nTransfer-Encoding: chunked\r\n\r\n" +
		fmt.Sprintf("%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n", len(chunk), chunk) +
		"GET /v1/status?verbose=1 HTTP/1.1\r\nHost: upstream.example.test\r\n\r\n"
	fr := sb.start(p, up.addr())
	if _, err := fr.client.Write([]byte(requests)); err != nil {
		t.Fatal(err)
	}
	fr.client.CloseWrite() // half-close: the answer still has to come back
	fr.client.SetReadDeadline(time.Now().Add(waitLimit))
	got, err := io.ReadAll(fr.client)
	if err != nil || string(got) != response {
		t.Fatalf("sandbox got %q, %v; want %q", got, err, response)
	}
	select {
	case b := <-up.got:
		if string(b) != requests {
			t.Fatalf("upstream got %q; want %q", b, requests)
		}
	case <-time.After(waitLimit):
		t.Fatal("upstream got nothing")
	}

	r := fr.result(t)
	if r.End != proxies.EndClosed || r.Err != nil {
		t.Fatalf("result %+v; want closed", r)
	}
	if out, in := fr.rec.bytes(); out != int64(len(requests)) || in != int64(len(response)) {
		t.Fatalf("bytes reported out %d in %d; want %d and %d", out, in, len(requests), len(response))
	}
	if d := fr.rec.denied(); len(d) != 0 {
		t.Fatalf("denials %+v", d)
	}

	// The log was written before the bytes went upstream.
	log, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(string(log)), "\n") {
		if !strings.Contains(l, "sandbox=sandbox-1 rule=api") || !strings.Contains(l, "dst="+up.addr().String()) || !strings.Contains(l, "hosts=upstream.example.test") {
			t.Errorf("log line without the flow's metadata: %s", l)
		}
		_, q, _ := strings.Cut(l, " \"")
		lines = append(lines, strings.TrimSuffix(q, "\""))
	}
	want := []string{"POST /v1/results HTTP/1.1", "PUT /v1/chunks/7 HTTP/1.1", "GET /v1/status?verbose=1 HTTP/1.1"}
	if fmt.Sprint(lines) != fmt.Sprint(want) {
		t.Fatalf("request lines logged:\n%s\nwant %q (and nothing from bodies)", log, want)
	}
}

// An extension that refuses a flow (the example over its --max-flows)
// has it reset, with its reason in the result.
func TestPythonExtensionRefuses(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "requestlog.sock")
	startPython(t, "--max-flows", "0", sock)
	p := newProxy(t, sock)
	fr := newSandbox(t).start(p, newUpstream(t, echo).addr())
	expectReset(t, fr.client)
	expectRefused(t, fr.result(t), "extension-refused:busy", ErrRefused)
	expectDenial(t, fr.rec, proxies.Denial{Reason: "extension-refused:busy"})
}

// When the extension dies, the flows it holds end (the kernel closes its
// descriptors, the proxy sees its control connection go), new flows are
// reset as extension-unavailable, and once it is back new flows work
// again without anyone telling the proxy.
func TestPythonExtensionKilledThenRestarted(t *testing.T) {
	dir := t.TempDir()
	sock, logFile := filepath.Join(dir, "requestlog.sock"), filepath.Join(dir, "requests.log")
	x := startPython(t, sock, logFile)
	up := newUpstream(t, echo)
	p := newProxy(t, sock)
	sb := newSandbox(t)

	roundTrip := func(fr *flowRun, msg string) error {
		if _, err := fr.client.Write([]byte(msg)); err != nil {
			return err
		}
		fr.client.SetReadDeadline(time.Now().Add(waitLimit))
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(fr.client, got); err != nil {
			return err
		}
		if string(got) != msg {
			return fmt.Errorf("echo %q, want %q", got, msg)
		}
		return nil
	}

	// Flows open through the extension.
	var open []*flowRun
	for i := range 3 {
		fr := sb.start(p, up.addr())
		if err := roundTrip(fr, fmt.Sprintf("GET /open/%d HTTP/1.1\r\n\r\n", i)); err != nil {
			t.Fatalf("flow %d before the kill: %v", i, err)
		}
		open = append(open, fr)
	}
	ctl := p.liveControl()
	x.kill()

	for i, fr := range open {
		r := fr.result(t)
		if r.End != proxies.EndError || !errors.Is(r.Err, ErrLost) {
			t.Fatalf("flow %d: result %+v; want an error wrapping ErrLost", i, r)
		}
		fr.client.SetReadDeadline(time.Now().Add(waitLimit))
		if _, err := fr.client.Read(make([]byte, 1)); err != io.EOF && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("flow %d: the sandbox's connection is still open after the extension died (%v)", i, err)
		}
	}
	select {
	case <-ctl.readerDone:
	case <-time.After(waitLimit):
		t.Fatal("the dead connection's reader goroutine is still running")
	}

	// New flows while it is down.
	for range 2 {
		fr := sb.start(p, up.addr())
		expectReset(t, fr.client)
		expectRefused(t, fr.result(t), ReasonUnavailable, ErrNotListening)
		expectDenial(t, fr.rec, proxies.Denial{Reason: ReasonUnavailable, Detail: "not-listening"})
	}

	// Back again (on the same path; it replaces the dead one's socket).
	startPython(t, sock, logFile)
	fr := sb.start(p, up.addr())
	if err := roundTrip(fr, "GET /after-restart HTTP/1.1\r\n\r\n"); err != nil {
		t.Fatalf("flow after the restart: %v", err)
	}
	fr.client.CloseWrite()
	if r := fr.result(t); r.End != proxies.EndClosed {
		t.Fatalf("result %+v", r)
	}
	log, _ := os.ReadFile(logFile)
	if !strings.Contains(string(log), `"GET /after-restart HTTP/1.1"`) {
		t.Fatalf("log after the restart:\n%s", log)
	}
	if n := p.flowsInFlight(); n != 0 {
		t.Fatalf("%d flows still counted in flight", n)
	}
}

// An IPv6 original destination reaches the extension as such, and the
// example connects to it.
func TestPythonExtensionIPv6Destination(t *testing.T) {
	dir := t.TempDir()
	sock, logFile := filepath.Join(dir, "requestlog.sock"), filepath.Join(dir, "requests.log")
	startPython(t, sock, logFile)
	up := newUpstreamAt(t, net.IPv6loopback, respondAtEOF("HTTP/1.1 204 No Content\r\n\r\n"))
	p := newProxy(t, sock)
	fr := newSandbox(t).start(p, up.addr())
	const req = "HEAD /v6 HTTP/1.1\r\nHost: [::1]\r\n\r\n"
	fr.client.Write([]byte(req))
	fr.client.CloseWrite()
	fr.client.SetReadDeadline(time.Now().Add(waitLimit))
	if got, err := io.ReadAll(fr.client); err != nil || string(got) != "HTTP/1.1 204 No Content\r\n\r\n" {
		t.Fatalf("sandbox got %q, %v", got, err)
	}
	if r := fr.result(t); r.End != proxies.EndClosed {
		t.Fatalf("result %+v", r)
	}
	log, _ := os.ReadFile(logFile)
	if !strings.Contains(string(log), "dst=[::1]:"+fmt.Sprint(up.addr().Port())+" ") || !strings.Contains(string(log), `"HEAD /v6 HTTP/1.1"`) {
		t.Fatalf("log:\n%s", log)
	}
}
