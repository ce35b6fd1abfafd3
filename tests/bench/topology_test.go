//go:build bench

package bench

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// Ports of the remote servers.
const (
	iperfPort   = 5201
	connectPort = 8080
)

// topology is one harness environment with two sandboxes on the same node
// and address range:
//
//	direct    ptp + host-local only: the node forwards to the remote
//	cleanwall ptp + host-local + cleanwall-cni: every flow goes through
//	          cleanwalld's open-mode L4 proxy
//
// and the remote servers both talk to (iperf3 and the connect server).
type topology struct {
	env    *harness.Env
	daemon *harness.Daemon
	direct *harness.Sandbox
	cw     *harness.Sandbox
	pid    int // cleanwalld's
	notes  []string
}

// clientSysctls widen the ephemeral port range and let connect() reuse
// TIME_WAIT ports, in every namespace that opens thousands of short
// connections (the sandboxes, and the node where the proxy dials
// upstream): otherwise later rounds pay for the TIME_WAIT sockets of
// earlier ones, on each side differently.
var clientSysctls = map[string]string{
	"net/ipv4/ip_local_port_range": "1024 65000",
	"net/ipv4/tcp_tw_reuse":        "1",
}

func setSysctls(nsPath string, kv map[string]string) error {
	return netns.Do(nsPath, func() error {
		for k, v := range kv {
			if err := os.WriteFile(filepath.Join("/proc/sys", k), []byte(v), 0o644); err != nil {
				return fmt.Errorf("sysctl %s: %w", k, err)
			}
		}
		return nil
	})
}

// startDaemon starts cleanwalld at log level info: at debug it logs a line
// per flow, which the connect scenario would then measure.
func startDaemon(env *harness.Env) *harness.Daemon {
	return env.StartDaemon("--log-level", "info", "--flow-rate", strconv.Itoa(benchFlowRate))
}

func newTopology(t *testing.T) *topology {
	env := harness.New(t)
	top := &topology{env: env, daemon: startDaemon(env)}
	pol := policyYAML("bench", []netip.Prefix{netip.PrefixFrom(remoteServer, 32)}, connectPort, iperfPort)
	var err error
	if top.direct, err = env.AddSandbox("direct", harness.SandboxOptions{Direct: true, NoIPv6: true}); err != nil {
		t.Fatalf("direct sandbox: %v", err)
	}
	top.cw = env.MustAddSandbox("cw", harness.SandboxOptions{NoIPv6: true, Policy: string(pol)})
	for _, ns := range []string{top.direct.NS, top.cw.NS, env.Node} {
		if err := setSysctls(ns, clientSysctls); err != nil {
			t.Fatal(err)
		}
	}
	startConnectServer(t, env, netip.AddrPortFrom(remoteServer, connectPort))
	if top.pid, err = daemonPID(top.daemon); err != nil {
		t.Fatal(err)
	}
	// Both paths must work before anything is measured, and only the
	// cleanwall one may show the proxy's address to the server.
	for _, s := range []*harness.Sandbox{top.direct, top.cw} {
		if err := checkPath(s, netip.AddrPortFrom(remoteServer, connectPort)); err != nil {
			t.Fatalf("sandbox %s cannot reach the connect server: %v", s.Name, err)
		}
	}
	top.notes = append(top.notes, fmt.Sprintf("topology: direct sandbox %v (no cleanwall-cni), cleanwall sandbox %v, remote %v; client namespaces use %v",
		top.direct.IP, top.cw.IP, remoteServer, clientSysctls))
	return top
}

// nsName is the name `ip netns exec` knows a harness namespace by.
func nsName(path string) string { return filepath.Base(path) }

// checkPath makes one request from the sandbox.
func checkPath(s *harness.Sandbox, dst netip.AddrPort) error {
	c, err := s.Dial("tcp4", dst.String(), 3*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write(request); err != nil {
		return err
	}
	buf := make([]byte, len(response))
	if _, err := ioReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != string(response) {
		return fmt.Errorf("unexpected answer %q", buf)
	}
	return nil
}

func ioReadFull(c net.Conn, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := c.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// nsCommand runs a command inside a named namespace.
func nsCommand(nsPath string, name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", nsName(nsPath), name}, args...)...)
}

// waitListening polls ss in a namespace until a TCP port listens.
func waitListening(nsPath string, port int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		out, _ := nsCommand(nsPath, "ss", "-Hltn", fmt.Sprintf("sport = :%d", port)).Output()
		if strings.Contains(string(out), "LISTEN") {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing listens on port %d after %v", port, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// cpuSnap is the machine's CPU time (/proc/stat, all CPUs) and one
// process's (/proc/<pid>/stat), in clock ticks; and the process's on-CPU
// time in nanoseconds and context switches, summed over its threads
// (/proc/<pid>/task/*/schedstat and status): per connection, a tick is
// too coarse, and on a virtual machine a switch is a cost of its own.
type cpuSnap struct {
	at                       time.Time
	total, idle, steal, proc uint64
	runNs, switches          uint64
}

// clockTicks is USER_HZ, 100 on every Linux architecture we build for.
const clockTicks = 100

func takeCPU(pid int) cpuSnap {
	s := cpuSnap{at: time.Now()}
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		line, _, _ := strings.Cut(string(b), "\n")
		for i, f := range strings.Fields(line)[1:] {
			v, _ := strconv.ParseUint(f, 10, 64)
			if i < 8 { // user nice system idle iowait irq softirq steal (guest time is inside user)
				s.total += v
			}
			switch i {
			case 3, 4:
				s.idle += v
			case 7:
				s.steal = v
			}
		}
	}
	if pid > 0 {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			// Fields after the command name, which ends at the last ')'.
			rest := strings.Fields(string(b)[strings.LastIndexByte(string(b), ')')+1:])
			if len(rest) > 12 {
				u, _ := strconv.ParseUint(rest[11], 10, 64)
				k, _ := strconv.ParseUint(rest[12], 10, 64)
				s.proc = u + k
			}
		}
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", pid))
		for _, task := range tasks {
			if b, err := os.ReadFile(task + "/schedstat"); err == nil {
				if f := strings.Fields(string(b)); len(f) > 0 {
					v, _ := strconv.ParseUint(f[0], 10, 64)
					s.runNs += v
				}
			}
			if b, err := os.ReadFile(task + "/status"); err == nil {
				for _, line := range strings.Split(string(b), "\n") {
					k, v, _ := strings.Cut(line, ":")
					if k == "voluntary_ctxt_switches" || k == "nonvoluntary_ctxt_switches" {
						n, _ := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
						s.switches += n
					}
				}
			}
		}
	}
	return s
}

// cpuExtra describes the interval since s: host busy and steal time in
// percent of all CPUs, and the process's CPU in percent of one CPU.
func (s cpuSnap) extra(pid int, into map[string]float64) map[string]float64 {
	e := takeCPU(pid)
	if into == nil {
		into = map[string]float64{}
	}
	if dt := float64(e.total - s.total); dt > 0 {
		into["hostBusyPercent"] = 100 * (dt - float64(e.idle-s.idle)) / dt
		into["hostStealPercent"] = 100 * float64(e.steal-s.steal) / dt
	}
	if pid > 0 {
		into["daemonCPUPercent"] = 100 * float64(e.proc-s.proc) / clockTicks / e.at.Sub(s.at).Seconds()
		into["daemonRunNs"] = float64(e.runNs - s.runNs)
		into["daemonSwitches"] = float64(e.switches - s.switches)
	}
	return into
}
