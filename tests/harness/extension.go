package harness

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/internal/testutil"
)

// Python is the interpreter the example extension runs under (Debian's).
const Python = "/usr/bin/python3"

// Extension is the example extension (examples/extensions/requestlog.py)
// running in the node namespace: an extension connects to its flows'
// destinations itself, from where it runs, and only the node reaches the
// remote namespace. Its socket is a file, so cleanwalld reaches it from any
// network namespace.
type Extension struct {
	Socket  string // where it listens (SOCK_SEQPACKET)
	LogFile string // where it writes request lines
	cmd     *exec.Cmd
	exited  chan struct{}
	stderr  testutil.SyncBuffer
	once    sync.Once
}

// StartRequestLog starts requestlog.py on socket, logging request lines to
// logFile, with extra options before them (e.g. "--max-flows", "0"), and
// waits until it prints that it listens. Cleanup kills it.
func (e *Env) StartRequestLog(socket, logFile string, extra ...string) *Extension {
	e.T.Helper()
	if _, err := os.Stat(Python); err != nil {
		testutil.Skip(e.T, "needs Debian's "+Python+" for the example extension")
	}
	root, err := moduleRoot()
	if err != nil {
		e.T.Fatal(err)
	}
	args := append(append([]string{filepath.Join(root, "examples", "extensions", "requestlog.py")}, extra...), socket, logFile)
	cmd := exec.Command(Python, args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		e.T.Fatal(err)
	}
	// Forked from a thread in the node namespace, like the daemon (no
	// Pdeathsig: see TryStart).
	if err := netns.Do(e.Node, cmd.Start); err != nil {
		e.T.Fatalf("starting the example extension: %v", err)
	}
	x := &Extension{Socket: socket, LogFile: logFile, cmd: cmd, exited: make(chan struct{})}
	e.onCleanup(x.Kill)
	ready := make(chan struct{})
	go func() {
		defer close(x.exited)
		s := bufio.NewScanner(stderr)
		listening := false
		for s.Scan() {
			fmt.Fprintln(&x.stderr, s.Text())
			if !listening && strings.HasPrefix(s.Text(), "requestlog: listening on ") {
				listening = true
				close(ready)
			}
		}
		_ = cmd.Wait()
	}()
	select {
	case <-ready:
	case <-x.exited:
		e.T.Fatalf("the example extension exited before listening:\n%s", x.Stderr())
	case <-time.After(10 * time.Second):
		e.T.Fatalf("the example extension did not listen within 10 s:\n%s", x.Stderr())
	}
	return x
}

// Kill SIGKILLs the extension and waits until it is gone: the kernel has
// closed every descriptor it held (the flows handed to it, its control
// connections) when Kill returns. The socket file stays behind, as after a
// crash.
func (x *Extension) Kill() {
	x.once.Do(func() { _ = x.cmd.Process.Kill() })
	<-x.exited
}

// Stderr is what the extension printed on standard error (its start and
// its problems with control connections).
func (x *Extension) Stderr() string { return x.stderr.String() }

// Requests returns the request lines logged so far, one log line each.
func (x *Extension) Requests() string {
	b, _ := os.ReadFile(x.LogFile)
	return string(b)
}
