package kernel

import (
	"fmt"
	"os"
	"testing"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/runtime/enforce"
)

// wallNS runs fn in a fresh network namespace holding an interface per
// name.
func wallNS(t *testing.T, ifnames []string, fn func() error) {
	t.Helper()
	testutil.RequireRoot(t)
	name := fmt.Sprintf("cwwall-%d", os.Getpid())
	path, err := netns.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netns.Delete(name) })
	if err := netns.Do(path, func() error {
		for _, n := range ifnames {
			// veth, not dummy: this kernel has no dummy driver.
			if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: n}, PeerName: n + "p"}); err != nil {
				return err
			}
		}
		return fn()
	}); err != nil {
		t.Fatal(err)
	}
}

// objects lists the netdev table's chain and counter names.
func objects(w *NFTWall) (chains, counters map[string]bool, err error) {
	c, err := nftConn()
	if err != nil {
		return nil, nil, err
	}
	chains, counters = map[string]bool{}, map[string]bool{}
	got, err := w.SandboxChains()
	if err != nil {
		return nil, nil, err
	}
	for n := range got {
		chains[n] = true
	}
	objs, err := c.GetObjects(w.netdev())
	if err != nil {
		return nil, nil, err
	}
	for _, o := range objs {
		if co, ok := o.(*nftables.CounterObj); ok {
			counters[co.Name] = true
		}
	}
	return chains, counters, nil
}

// RemoveSandbox removes exactly the sandbox's chain and counter: from the
// names it wrote (one transaction), after a restart by listing, and when
// a part is gone already.
func TestWallRemoveSandbox(t *testing.T) {
	wallNS(t, []string{"cwa", "cwb", "cwc"}, func() error {
		w := NewNFTWall(4242, 0x0c1e0000)
		if err := w.Install(); err != nil {
			return err
		}
		for i, n := range []string{"cwa", "cwb", "cwc"} {
			if err := w.AddSandbox(enforce.WallSandbox{ID: uint32(i + 1), Ifname: n}); err != nil {
				return err
			}
		}
		check := func(step string, wantChains ...string) error {
			chains, counters, err := objects(w)
			if err != nil {
				return err
			}
			if len(chains) != len(wantChains) || len(counters) != len(wantChains) {
				return fmt.Errorf("%s: chains %v counters %v, want %v", step, chains, counters, wantChains)
			}
			for _, c := range wantChains {
				var id uint32
				var ifn string
				if _, err := fmt.Sscanf(c, "%d %s", &id, &ifn); err != nil {
					return err
				}
				if !chains[enforce.ChainName(enforce.WallSandbox{ID: id, Ifname: ifn})] || !counters[dropsCounter(id)] {
					return fmt.Errorf("%s: sandbox %d's chain or counter is gone (chains %v counters %v)", step, id, chains, counters)
				}
			}
			return nil
		}
		if err := check("installed", "1 cwa", "2 cwb", "3 cwc"); err != nil {
			return err
		}
		// Known names: one transaction.
		if err := w.RemoveSandbox(2); err != nil {
			return err
		}
		if err := check("known", "1 cwa", "3 cwc"); err != nil {
			return err
		}
		// A restarted daemon's wall knows nothing: it lists.
		fresh := NewNFTWall(4242, 0x0c1e0000)
		if err := fresh.RemoveSandbox(3); err != nil {
			return err
		}
		if err := check("listed", "1 cwa"); err != nil {
			return err
		}
		// The chain was removed behind the wall's back: the counter still goes.
		c, err := nftConn()
		if err != nil {
			return err
		}
		c.DelChain(&nftables.Chain{Name: enforce.ChainName(enforce.WallSandbox{ID: 1, Ifname: "cwa"}), Table: w.netdev()})
		if err := c.Flush(); err != nil {
			return err
		}
		if err := w.RemoveSandbox(1); err != nil {
			return err
		}
		if err := check("half gone"); err != nil {
			return err
		}
		// Removing what is not there is fine.
		return w.RemoveSandbox(9)
	})
}
