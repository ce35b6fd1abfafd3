package harness

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/runtime/api"
)

// Daemon is a cleanwalld process running in the node namespace.
type Daemon struct {
	env         *Env
	Launch      Launch
	Socket      string
	PinRoot     string
	StateDir    string
	PolicyDir   string
	MetricsAddr string
	Args        []string
	cmd         *exec.Cmd
	done        chan struct{}
	logMu       sync.Mutex
	logBuf      strings.Builder
}

// Launch is how the harness starts cleanwalld in the node namespace.
type Launch int

const (
	// LaunchEnterNetns forks from a thread inside the node namespace: the
	// daemon shares the test's (the host's) mount namespace.
	LaunchEnterNetns Launch = iota
	// LaunchIPNetnsExec runs `ip netns exec NODE cleanwalld ...`: a private
	// mount namespace in which /sys is remounted and /sys/fs/bpf is gone.
	LaunchIPNetnsExec
	// LaunchOwnMountNS runs `unshare -m --propagation private nsenter
	// --net=NODE cleanwalld ...`: a private copy of the host's mounts.
	LaunchOwnMountNS
)

func (l Launch) String() string {
	return [...]string{"netns", "ip-netns-exec", "own-mount-namespace"}[l]
}

// DaemonOptions tune StartDaemonWith.
type DaemonOptions struct {
	Launch Launch
	// PinRoot overrides the pin root (default: a bpffs the harness mounts
	// in the test's scratch directory). A path under /sys/fs/bpf is on the
	// host's bpffs (mounted when missing) and removed in cleanup.
	PinRoot string
	// Args are extra daemon flags.
	Args []string
}

// StartDaemon starts cleanwalld in the node namespace with its own socket,
// bpffs pin root and state directory, and waits until it is ready.
func (e *Env) StartDaemon(extra ...string) *Daemon {
	e.T.Helper()
	return e.StartDaemonWith(DaemonOptions{Args: extra})
}

// NewDaemon prepares a daemon (directories, pin root) without starting it.
func (e *Env) NewDaemon(o DaemonOptions) *Daemon {
	e.T.Helper()
	d := &Daemon{
		env:         e,
		Launch:      o.Launch,
		Socket:      filepath.Join(e.Dir, "cleanwalld.sock"),
		PinRoot:     filepath.Join(e.Dir, "bpf"),
		StateDir:    filepath.Join(e.Dir, "state"),
		PolicyDir:   filepath.Join(e.Dir, "policies"),
		MetricsAddr: "127.0.0.1:9464",
		Args:        o.Args,
	}
	if err := os.MkdirAll(d.PolicyDir, 0o755); err != nil {
		e.T.Fatal(err)
	}
	if o.PinRoot != "" {
		d.PinRoot = o.PinRoot
		if err := EnsureHostBPFFS(); err != nil {
			e.T.Fatal(err)
		}
		// Unpinning the links detaches them: only after the daemon is gone.
		e.onCleanup(func() { _ = os.RemoveAll(d.PinRoot) })
		return d
	}
	// The pin root is its own bpffs: unmount it when the test ends (after
	// the daemon is gone: cleanups run last-in first-out).
	if err := bpf.EnsureBPFFS(d.PinRoot); err != nil {
		e.T.Fatal(err)
	}
	e.onCleanup(func() { _ = unix.Unmount(d.PinRoot, unix.MNT_DETACH) })
	return d
}

// StartDaemonWith starts a daemon as o says and waits until it is ready.
func (e *Env) StartDaemonWith(o DaemonOptions) *Daemon {
	e.T.Helper()
	d := e.NewDaemon(o)
	d.Start()
	e.onCleanup(d.Stop)
	return d
}

// EnsureHostBPFFS mounts a bpffs at /sys/fs/bpf in the test's (the host's)
// mount namespace when there is none, as every systemd host has at boot.
func EnsureHostBPFFS() error { return bpf.EnsureBPFFS("/sys/fs/bpf") }

// Start (re)starts the daemon process and waits until it is ready.
func (d *Daemon) Start() {
	t := d.env.T
	t.Helper()
	if err := d.TryStart(); err != nil {
		t.Fatal(err)
	}
}

// TryStart (re)starts the daemon process and waits until it is ready, or
// returns an error with its log when it exits during the start.
func (d *Daemon) TryStart() error {
	args := append([]string{
		"--socket", d.Socket, "--bpf-root", d.PinRoot, "--state-dir", d.StateDir,
		"--policy-dir", d.PolicyDir, "--metrics-addr", d.MetricsAddr, "--log-level", "debug",
	}, d.Args...)
	bin := filepath.Join(d.env.Bin, "cleanwalld")
	var cmd *exec.Cmd
	switch d.Launch {
	case LaunchIPNetnsExec:
		cmd = exec.Command("ip", append([]string{"netns", "exec", filepath.Base(d.env.Node), bin}, args...)...)
	case LaunchOwnMountNS:
		cmd = exec.Command("unshare", append([]string{"--mount", "--propagation", "private", "nsenter", "--net=" + d.env.Node, bin}, args...)...)
	default:
		cmd = exec.Command(bin, args...)
	}
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	// No Pdeathsig: it fires when the forking *thread* exits, and namespace
	// helpers retire locked threads on purpose. Cleanup stops the daemon.
	var err error
	if d.Launch == LaunchEnterNetns {
		err = netns.Do(d.env.Node, cmd.Start)
	} else {
		err = cmd.Start() // ip and nsenter enter the namespace, then exec the daemon
	}
	if err != nil {
		return fmt.Errorf("starting cleanwalld: %v", err)
	}
	d.cmd = cmd
	d.done = make(chan struct{})
	go func() {
		s := bufio.NewScanner(pr)
		s.Buffer(make([]byte, 64<<10), 1<<20)
		for s.Scan() {
			d.logMu.Lock()
			d.logBuf.WriteString(s.Text() + "\n")
			d.logMu.Unlock()
		}
	}()
	go func() {
		_ = cmd.Wait()
		pw.Close()
		close(d.done)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		st, err := d.Client().Status(ctx)
		cancel()
		if err == nil && st.Ready {
			return nil
		}
		select {
		case <-d.done:
			return &StartError{Log: d.Log()}
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cleanwalld not ready after 30s (%v):\n%s", err, d.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// StartError is a daemon that exited during its start.
type StartError struct{ Log string }

func (e *StartError) Error() string { return "cleanwalld exited during start:\n" + e.Log }

// Exited reports whether the daemon process has exited.
func (d *Daemon) Exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// Pid is the daemon process's pid.
func (d *Daemon) Pid() int { return d.cmd.Process.Pid }

// Log returns everything the daemon printed.
func (d *Daemon) Log() string {
	d.logMu.Lock()
	defer d.logMu.Unlock()
	return d.logBuf.String()
}

// Client returns an API client for the daemon.
func (d *Daemon) Client() *api.Client { return api.NewClient(d.Socket) }

// Kill sends SIGKILL and waits for the process to be gone.
func (d *Daemon) Kill() {
	if d.cmd == nil || d.cmd.Process == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.done
}

// Stop sends SIGTERM and waits (SIGKILL after 10 s).
func (d *Daemon) Stop() {
	if d.cmd == nil || d.cmd.Process == nil {
		return
	}
	select {
	case <-d.done:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		d.Kill()
	}
	if t, ok := d.env.T.(*testing.T); ok && t.Failed() {
		t.Logf("cleanwalld log:\n%s", d.Log())
	}
}

// NodeDialer dials from the node namespace: http.Transport dials on its own
// goroutines, so the namespace must be entered inside the dial itself.
func (e *Env) NodeDialer() func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := e.InNode(func() (err error) {
			c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
}

// Pinned opens the daemon's pinned maps directly (works while it is dead).
func (d *Daemon) Pinned() *bpf.Datapath {
	d.env.T.Helper()
	dp, err := bpf.OpenPinned(d.PinRoot)
	if err != nil {
		d.env.T.Fatal(err)
	}
	d.env.T.Cleanup(func() { dp.Close() })
	return dp
}

// Metrics scrapes the daemon's /metrics (from inside the node namespace).
func (d *Daemon) Metrics() (string, error) {
	// No keep-alive: a client per scrape would leave a connection behind
	// each time (and a soak counts the daemon's descriptors).
	c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: d.env.NodeDialer(), DisableKeepAlives: true}}
	resp, err := c.Get("http://" + d.MetricsAddr + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// samples returns the values of every sample of name whose line contains
// every label pair given ("key=\"value\"").
func samples(metrics, name string, labels ...string) []float64 {
	var out []float64
	for _, line := range strings.Split(metrics, "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, l := range labels {
			if !strings.Contains(line, l) {
				ok = false
				break
			}
		}
		var v float64
		if _, err := fmt.Sscan(line[strings.LastIndex(line, " ")+1:], &v); ok && err == nil {
			out = append(out, v)
		}
	}
	return out
}

// MetricValue returns the value of the first matching sample.
func MetricValue(metrics, name string, labels ...string) (float64, bool) {
	if s := samples(metrics, name, labels...); len(s) > 0 {
		return s[0], true
	}
	return 0, false
}

// MetricSum sums every matching sample.
func MetricSum(metrics, name string, labels ...string) float64 {
	var sum float64
	for _, v := range samples(metrics, name, labels...) {
		sum += v
	}
	return sum
}

// Grep returns the lines of s that contain sub (metrics, logs).
func Grep(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
