package e2e

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// Faults: what happens to a sandbox's enforcement when what keeps it is
// removed under a running daemon, and across restarts. The attacks on it
// (a crash in a private mount namespace, programs removed with the
// watchdog held back) are in tests/adversarial.

// TestWatchdogRepairs: what is removed under a running daemon is put back
// within the watchdog's interval (1 s by default): the program, the link
// and map pins, the sandbox's nftables chain, bridge port isolation.
func TestWatchdogRepairs(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	env.TCPServer("198.51.100.10:8080")
	sb := env.MustAddSandbox("heal", harness.SandboxOptions{Chain: harness.ChainBridge, Policy: policyOpen, NoIPv6: true})
	d.RoundTrip(t, sb)
	info, err := d.Client().Get(harness.Ctx(), sb.ContainerID, "")
	if err != nil {
		t.Fatal(err)
	}

	harness.Detachers["pins-removed"](t, d)
	err = env.InNode(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyNetdev)
		if err != nil {
			return err
		}
		for _, ch := range chains {
			if strings.HasPrefix(ch.Name, fmt.Sprintf("sb_%d_", info.DatapathID)) {
				c.DelChain(ch)
			}
		}
		if err := c.Flush(); err != nil {
			return err
		}
		l, err := netlink.LinkByName(sb.HostVeth())
		if err != nil {
			return err
		}
		return netlink.LinkSetIsolated(l, false)
	})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if !harness.Eventually(5*time.Second, func() bool { return sb.Check() == nil }) {
		t.Fatalf("not repaired within 5 s: CHECK says %v\n%s", sb.Check(), d.Log())
	}
	t.Logf("repaired %v after the removal", time.Since(start).Round(time.Millisecond))
	for _, m := range []string{bpf.MapRules, bpf.MapSandboxes, bpf.MapCounters} {
		if _, err := os.Stat(filepath.Join(d.PinRoot, "maps", m)); err != nil {
			t.Errorf("map pin %s not restored: %v", m, err)
		}
	}
	metrics, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	for _, what := range []string{"attachment", "wall", "port-isolation", "map-pin"} {
		if v, _ := harness.MetricValue(metrics, "cleanwall_repairs_total", `what="`+what+`"`); v < 1 {
			t.Errorf("cleanwall_repairs_total{what=%q} = %v", what, v)
		}
	}
	if n := env.TCXPrograms(t, sb.HostVeth()); n != 1 {
		t.Errorf("%d programs on the sandbox's interface, want 1", n)
	}
	d.RoundTrip(t, sb)
}

// TestTwentyRestarts: 20 restarts in a row (SIGTERM and SIGKILL in turn)
// while the sandbox keeps trying: no duplicate links, the allowed flow
// recovers after each, and nothing passes meanwhile.
func TestTwentyRestarts(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	targets := env.NewEscapeTargets()
	sb := env.MustAddSandbox("restarts", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
	d.RoundTrip(t, sb)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // a sandbox that keeps trying the denied port and UDP
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if c, err := sb.Dial("tcp4", "198.51.100.10:8081", 200*time.Millisecond); err == nil {
				c.Close()
			}
			_ = sb.Do(func() error {
				c, err := net.Dial("udp4", "198.51.100.10:8080")
				if err == nil {
					_, _ = c.Write([]byte("x"))
					c.Close()
				}
				return nil
			})
		}
	}()
	for i := 0; i < 20; i++ {
		if i%2 == 0 {
			d.Kill()
		} else {
			d.Stop()
		}
		if err := d.TryStart(); err != nil {
			t.Fatalf("restart %d: %v", i+1, err)
		}
		d.RoundTrip(t, sb)
	}
	close(stop)
	wg.Wait()
	if n := env.TCXPrograms(t, sb.HostVeth()); n != 1 {
		t.Errorf("%d programs attached to the sandbox's interface after 20 restarts, want 1", n)
	}
	// Every connection the allowed server saw came from the proxy.
	for _, c := range targets.Allowed.Conns() {
		if c.From.Addr() != harness.NodeRemoteIP {
			t.Errorf("the allowed server saw a connection from %v", c.From)
		}
	}
	targets.AssertNothingEscaped(t, sb, len(targets.Allowed.Conns()))
}
