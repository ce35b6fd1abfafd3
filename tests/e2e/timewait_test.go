package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// policyTimeWait allows the two servers of the time-wait tests.
const policyTimeWait = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: timewait}
spec:
  egress:
    - name: closers
      to: [{cidr: 198.51.100.10/32}, {cidr: "2001:db8:100::10/128"}]
      ports: [{port: 8090}, {port: 8091}]
      mode: open
`

// closingServer runs in the remote namespace and closes every connection
// first, so the proxy's sandbox-side socket of each flow ends in TIME_WAIT.
// With lines set it reads one line, records it under the connection's
// index, answers "got:<line>" and closes; otherwise it closes at once.
type closingServer struct {
	mu    sync.Mutex
	lines []string // per accepted connection, in accept order
}

func startClosingServer(t *testing.T, env *harness.Env, addr string, lines bool) *closingServer {
	t.Helper()
	var l net.Listener
	if err := env.InRemote(func() (err error) {
		l, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	s := &closingServer{}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			i := len(s.lines)
			s.lines = append(s.lines, "")
			s.mu.Unlock()
			if !lines {
				c.Close()
				continue
			}
			go func() {
				defer c.Close()
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil {
					return
				}
				s.mu.Lock()
				s.lines[i] = line
				s.mu.Unlock()
				fmt.Fprintf(c, "got:%s", line)
			}()
		}
	}()
	return s
}

func (s *closingServer) received() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.lines...)
}

// dialFromPort connects from a fixed source port (SO_REUSEADDR, as a busy
// client reusing its ports does). While the sandbox's previous socket of
// the same 4-tuple is still closing, connect answers EADDRNOTAVAIL: that
// is the sandbox's own kernel, so wait for it; the timeout applies to the
// connect that the kernel let out.
func dialFromPort(sb *harness.Sandbox, src, dst netip.AddrPort, timeout time.Duration) (net.Conn, time.Duration, error) {
	network := "tcp4"
	if dst.Addr().Is6() {
		network = "tcp6"
	}
	d := net.Dialer{
		LocalAddr: net.TCPAddrFromAddrPort(src),
		Timeout:   timeout,
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
			})
			return errors.Join(err, serr)
		},
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var c net.Conn
		start := time.Now()
		err := sb.Do(func() (err error) {
			c, err = d.DialContext(context.Background(), network, dst.String())
			return err
		})
		if (errors.Is(err, unix.EADDRNOTAVAIL) || errors.Is(err, unix.EADDRINUSE)) && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
			continue
		}
		return c, time.Since(start), err
	}
}

// TestTimeWaitReuse: a sandbox reuses one source port for sequential
// connections to a server that closes first. The proxy's socket of the
// previous flow sits in TIME_WAIT on that 4-tuple (checked before every
// reconnect); the sandbox's next SYN must still start a new flow at once
// (as without cleanwall: the server's TIME_WAIT accepts a new SYN), over a
// ptp and a bridge attachment, IPv4 and IPv6; and the new flow's data must
// reach the new upstream connection only.
func TestTimeWaitReuse(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	closer4 := startClosingServer(t, env, netip.AddrPortFrom(harness.RemoteIP, 8090).String(), false)
	liner4 := startClosingServer(t, env, netip.AddrPortFrom(harness.RemoteIP, 8091).String(), true)
	closer6 := startClosingServer(t, env, netip.AddrPortFrom(harness.RemoteIP6, 8090).String(), false)
	liner6 := startClosingServer(t, env, netip.AddrPortFrom(harness.RemoteIP6, 8091).String(), true)
	for _, chain := range []harness.Chain{harness.ChainPTP, harness.ChainBridge} {
		sb := env.MustAddSandbox("tw-"+string(chain), harness.SandboxOptions{Chain: chain, Policy: policyTimeWait})
		for _, fam := range []struct {
			name          string
			src, remote   netip.Addr
			closer, liner *closingServer
		}{{"ipv4", sb.IP, harness.RemoteIP, closer4, liner4}, {"ipv6", sb.IP6, harness.RemoteIP6, closer6, liner6}} {
			t.Run(string(chain)+"/"+fam.name, func(t *testing.T) {
				if !fam.src.IsValid() {
					t.Fatal("sandbox has no address of this family")
				}
				noSocket := counter(t, d, sb, "drop", bpf.ReasonNoSocket.String(), "")
				timeWait := counter(t, d, sb, "drop", bpf.ReasonTimeWait.String(), "")

				t.Run("accept-and-close", func(t *testing.T) {
					src := netip.AddrPortFrom(fam.src, 41000)
					dst := netip.AddrPortFrom(fam.remote, 8090)
					const rounds = 20
					accepted := len(fam.closer.received())
					var slowest time.Duration
					for i := 0; i < rounds; i++ {
						if i > 0 {
							waitTimeWait(t, env, dst, src)
						}
						c, took, err := dialFromPort(sb, src, dst, time.Second)
						if err != nil {
							t.Fatalf("connect %d from %v: %v after %v\n%s\n%s", i, src, err, took, countersString(t, d, sb), nodeSockets(env))
						}
						slowest = max(slowest, took)
						// The server closes first: wait for its FIN, then close.
						_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
						if _, err := io.Copy(io.Discard, c); err != nil {
							t.Fatalf("connect %d: waiting for the server's close: %v", i, err)
						}
						c.Close()
					}
					t.Logf("%d connects from %v, each meeting the proxy's TIME_WAIT socket of the previous one: slowest %v", rounds, src, slowest)
					if n := len(fam.closer.received()) - accepted; n != rounds {
						t.Fatalf("server accepted %d connections, want %d", n, rounds)
					}
				})

				t.Run("data-reaches-the-new-flow", func(t *testing.T) {
					src := netip.AddrPortFrom(fam.src, 41001)
					dst := netip.AddrPortFrom(fam.remote, 8091)
					const rounds = 10
					first := len(fam.liner.received())
					for i := 0; i < rounds; i++ {
						if i > 0 {
							waitTimeWait(t, env, dst, src)
						}
						c, took, err := dialFromPort(sb, src, dst, time.Second)
						if err != nil {
							t.Fatalf("connect %d from %v: %v after %v\n%s\n%s", i, src, err, took, countersString(t, d, sb), nodeSockets(env))
						}
						msg := fmt.Sprintf("%s-flow-%d\n", sb.Name, i)
						if _, err := io.WriteString(c, msg); err != nil {
							t.Fatalf("flow %d: write: %v", i, err)
						}
						_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
						got, err := io.ReadAll(c)
						if err != nil || string(got) != "got:"+msg {
							t.Fatalf("flow %d: answer %q (%v), want %q", i, got, err, "got:"+msg)
						}
						c.Close()
					}
					lines := fam.liner.received()[first:]
					if len(lines) != rounds {
						t.Fatalf("server accepted %d connections, want %d: %q", len(lines), rounds, lines)
					}
					for i, l := range lines {
						if want := fmt.Sprintf("%s-flow-%d\n", sb.Name, i); l != want {
							t.Fatalf("upstream connection %d received %q, want %q (all: %q)", i, l, want, lines)
						}
					}
				})

				if n := counter(t, d, sb, "drop", bpf.ReasonNoSocket.String(), ""); n != noSocket {
					t.Errorf("%d no-socket drops while reusing 4-tuples: %s", n-noSocket, countersString(t, d, sb))
				}
				if n := counter(t, d, sb, "drop", bpf.ReasonTimeWait.String(), ""); n != timeWait {
					t.Errorf("%d time-wait drops: %s", n-timeWait, countersString(t, d, sb))
				}
			})
		}
	}
}

// waitTimeWait waits until the node namespace holds a TIME_WAIT socket of
// the proxy for the flow (local = the original destination, peer = the
// sandbox): the state the next connect must get through.
func waitTimeWait(t *testing.T, env *harness.Env, local, peer netip.AddrPort) {
	t.Helper()
	want := fmt.Sprintf("%s %s", local, peer)
	ok := harness.Eventually(2*time.Second, func() bool {
		var out []byte
		_ = env.InNode(func() error {
			out, _ = exec.Command("ss", "-Htan", "state", "time-wait").CombinedOutput()
			return nil
		})
		for _, line := range strings.Split(string(out), "\n") {
			if strings.Join(strings.Fields(line)[min(2, len(strings.Fields(line))):], " ") == want {
				return true
			}
		}
		return false
	})
	if !ok {
		t.Fatalf("no TIME_WAIT socket %s in the node namespace:\n%s", want, nodeSockets(env))
	}
}

// nodeSockets lists the node namespace's TCP sockets (for failure messages).
func nodeSockets(env *harness.Env) string {
	var out []byte
	_ = env.InNode(func() error {
		out, _ = exec.Command("ss", "-tan").CombinedOutput()
		return nil
	})
	return string(out)
}
