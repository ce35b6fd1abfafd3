//go:build bench

package bench

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// The connect protocol: the client sends request, the server answers
// response, the client closes. Fixed sizes, so each side reads exactly.
var (
	request  = []byte("cleanwall bench\n")
	response = []byte("ok cleanwall  \n\n")
)

// serverEnv makes the test binary serve the connect protocol instead of
// running tests (see TestMain): the server gets a process of its own, so
// that it does not share a Go runtime (and its Ps) with the clients.
const serverEnv = "CLEANWALL_BENCH_CONNECT_SERVER"

// startConnectServer runs the connect server in the remote namespace.
func startConnectServer(t *testing.T, env *harness.Env, addr netip.AddrPort) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := nsCommand(env.Remote, self, "-test.run=^$")
	cmd.Env = append(os.Environ(), serverEnv+"="+addr.String())
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("connect server: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill() // the server we started, by its pid
		_ = cmd.Wait()
	})
	if err := waitListening(env.Remote, int(addr.Port()), 10*time.Second); err != nil {
		t.Fatalf("connect server: %v: %s", err, stderr.String())
	}
}

// serveConnect is the server process: request in, response out, then
// wait for the client's close (the client closes first, so TIME_WAIT
// stays on the client side as with a real client).
func serveConnect(addr string) error {
	l, err := net.Listen("tcp4", addr)
	if err != nil {
		return err
	}
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			buf := make([]byte, len(request))
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			if _, err := c.Write(response); err != nil {
				return
			}
			_, _ = io.Copy(io.Discard, c)
		}()
	}
}

// connectResult is one round of one side.
type connectResult struct {
	Conns    int
	Errors   int
	Elapsed  time.Duration
	Lat      []time.Duration // sorted
	FirstErr error
}

func (r connectResult) rate() float64 { return float64(r.Conns) / r.Elapsed.Seconds() }

func (r connectResult) p(q float64) float64 {
	return float64(percentile(r.Lat, q)) / float64(time.Microsecond)
}

// connectRound opens n connections from the sandbox namespace with
// workers concurrent clients. Each client is an OS thread in the
// namespace making blocking syscalls (no Go netpoller in the measured
// path): socket, connect, write the request, read the response, close.
// A connection's latency is the time from socket() to close() returning.
func connectRound(nsPath string, dst netip.AddrPort, n, workers int) (connectResult, error) {
	sa := &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}
	lat := make([]time.Duration, n)
	errs := make([]error, n)
	start := make(chan struct{})
	var ready, done sync.WaitGroup
	var setupErr error
	var mu sync.Mutex
	for w := range workers {
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			signalled := false
			err := netns.Do(nsPath, func() error {
				buf := make([]byte, len(response))
				signalled = true
				ready.Done()
				<-start
				for i := w; i < n; i += workers {
					t0 := time.Now()
					errs[i] = oneConnection(sa, buf)
					lat[i] = time.Since(t0)
				}
				return nil
			})
			if err != nil {
				mu.Lock()
				setupErr = err
				mu.Unlock()
				if !signalled {
					ready.Done()
				}
			}
		}()
	}
	ready.Wait()
	t0 := time.Now()
	close(start)
	done.Wait()
	elapsed := time.Since(t0)
	if setupErr != nil {
		return connectResult{}, setupErr
	}
	res := connectResult{Conns: n, Elapsed: elapsed}
	for i, err := range errs {
		if err != nil {
			res.Errors++
			if res.FirstErr == nil {
				res.FirstErr = err
			}
			continue
		}
		res.Lat = append(res.Lat, lat[i])
	}
	slices.Sort(res.Lat)
	return res, nil
}

var ioTimeout = unix.Timeval{Sec: 5}

func oneConnection(sa *unix.SockaddrInet4, buf []byte) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer func() {
		if fd >= 0 {
			unix.Close(fd)
		}
	}()
	// Timeouts bound a connect or read that would otherwise hang the run.
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &ioTimeout)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &ioTimeout)
	if err := connect(fd, sa); err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	for {
		_, err := unix.Write(fd, request)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("write: %w", err)
		}
		break
	}
	for got := 0; got < len(buf); {
		m, err := unix.Read(fd, buf[got:])
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
		if m == 0 {
			return fmt.Errorf("read: %w", io.ErrUnexpectedEOF)
		}
		got += m
	}
	err = unix.Close(fd)
	fd = -1
	return err
}

// connect is a blocking connect(2) that survives signals: with a send
// timeout set, the kernel does not restart an interrupted connect, which
// then completes in the background; wait for it and read its result.
func connect(fd int, sa unix.Sockaddr) error {
	err := unix.Connect(fd, sa)
	if !errors.Is(err, unix.EINTR) {
		return err
	}
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	for {
		n, err := unix.Poll(pfd, int(ioTimeout.Sec*1000))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return unix.ETIMEDOUT
		}
		break
	}
	soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return err
	}
	if soErr != 0 {
		return unix.Errno(soErr)
	}
	return nil
}

// benchConnect compares connection setup direct and through cleanwall:
// one sequential client (latency, and its rate) and four concurrent
// clients (rate) per round, the sides alternating.
func benchConnect(t *testing.T, top *topology, rep *Report) {
	n := *flagConns
	const workers = 4
	rate1 := rep.addRow(&Comparison{Scenario: "connect+req+close rate, 1 client", Unit: "conn/s", Baseline: "direct", Cleanwall: "cleanwall"})
	rateN := rep.addRow(&Comparison{Scenario: fmt.Sprintf("connect+req+close rate, %d clients", workers), Unit: "conn/s", Baseline: "direct", Cleanwall: "cleanwall"})
	p50 := rep.addRow(&Comparison{Scenario: "connect+req+close latency p50", Unit: "µs", LowerBetter: true, Baseline: "direct", Cleanwall: "cleanwall", ShowAdded: true})
	p99 := rep.addRow(&Comparison{Scenario: "connect+req+close latency p99", Unit: "µs", LowerBetter: true, Baseline: "direct", Cleanwall: "cleanwall",
		Target: "+<200 µs", Check: addedBelow(200), ShowAdded: true})
	dst := netip.AddrPortFrom(remoteServer, connectPort)
	sb := map[string]*harness.Sandbox{"baseline": top.direct, "cleanwall": top.cw}

	// Warm up both paths (ARP, route and socket caches, the proxy's goroutines).
	for _, side := range []string{"baseline", "cleanwall"} {
		if r, err := connectRound(sb[side].NS, dst, 200, 1); err != nil || r.Errors > 0 {
			t.Fatalf("warm-up %s: %v %v", side, err, r.FirstErr)
		}
	}
	perf := newPerfRecorder(t, top.daemon)
	for r := range rounds(5) {
		for _, side := range order(r) {
			if side == "cleanwall" {
				perf.start(fmt.Sprintf("connect-round%d", r))
			}
			cpu := takeCPU(top.pid)
			res, err := connectRound(sb[side].NS, dst, n, 1)
			if side == "cleanwall" {
				perf.stop()
			}
			if err != nil {
				t.Fatal(err)
			}
			if res.Errors > 0 {
				t.Errorf("%s round %d: %d of %d connections failed (first: %v)", side, r, res.Errors, n, res.FirstErr)
			}
			extra := cpu.extra(top.pid, map[string]float64{"conns": float64(n), "errors": float64(res.Errors), "p90us": res.p(90), "p999us": res.p(99.9), "maxus": res.p(100)})
			rate1.Add(r, side, res.rate(), extra)
			p50.Add(r, side, res.p(50), nil)
			p99.Add(r, side, res.p(99), nil)
			t.Logf("round %d %-9s 1 client: %6.0f conn/s p50 %5.0f µs p99 %5.0f µs errors %d (cleanwalld %.0f%% cpu, host steal %.0f%%)",
				r, side, res.rate(), res.p(50), res.p(99), res.Errors, extra["daemonCPUPercent"], extra["hostStealPercent"])
		}
		for _, side := range order(r) {
			cpu := takeCPU(top.pid)
			res, err := connectRound(sb[side].NS, dst, n, workers)
			if err != nil {
				t.Fatal(err)
			}
			if res.Errors > 0 {
				t.Errorf("%s round %d (%d clients): %d of %d connections failed (first: %v)", side, r, workers, res.Errors, n, res.FirstErr)
			}
			rateN.Add(r, side, res.rate(), cpu.extra(top.pid, map[string]float64{"p50us": res.p(50), "p99us": res.p(99), "errors": float64(res.Errors)}))
			t.Logf("round %d %-9s %d clients: %6.0f conn/s p50 %5.0f µs p99 %5.0f µs", r, side, workers, res.rate(), res.p(50), res.p(99))
		}
	}
}

// perfRecorder samples cleanwalld's stacks (user and kernel) with
// perf(1) while the cleanwall side of a scenario runs, when -perf names a
// directory; otherwise its methods do nothing.
type perfRecorder struct {
	t   *testing.T
	pid int
	dir string
	cmd *exec.Cmd
}

func newPerfRecorder(t *testing.T, d *harness.Daemon) *perfRecorder {
	dir := *flagPerf
	if dir == "" {
		return nil
	}
	if _, err := exec.LookPath("perf"); err != nil {
		t.Fatalf("-perf needs perf(1): apt-get install -y linux-perf")
	}
	pid, err := daemonPID(d)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return &perfRecorder{t: t, pid: pid, dir: dir}
}

func (p *perfRecorder) start(name string) {
	if p == nil {
		return
	}
	out := filepath.Join(p.dir, name+".perf.data")
	p.cmd = exec.Command("perf", "record", "-q", "-F", "999", "-g", "-p", strconv.Itoa(p.pid), "-o", out)
	if err := p.cmd.Start(); err != nil {
		p.t.Fatalf("perf record: %v", err)
	}
	time.Sleep(300 * time.Millisecond) // perf attaches asynchronously
}

func (p *perfRecorder) stop() {
	if p == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGINT)
	_ = p.cmd.Wait()
	p.t.Logf("perf: %s (perf report -i <file> --no-children)", p.cmd.Args[len(p.cmd.Args)-1])
}

// daemonPID is the cleanwalld process of d.
func daemonPID(d *harness.Daemon) (int, error) { return d.Pid(), nil }
