package adversarial

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/cleanwall/cleanwall/tests/harness"
)

// wallState reads, in the node namespace, whether sandbox id's wall chain
// is there and what its drop counter holds.
func wallState(t *testing.T, env *harness.Env, id uint32) (chain bool, drops uint64) {
	t.Helper()
	err := env.InNode(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyNetdev)
		if err != nil {
			return err
		}
		for _, ch := range chains {
			if strings.HasPrefix(ch.Name, fmt.Sprintf("sb_%d_", id)) {
				chain = true
			}
		}
		tables, err := c.ListTablesOfFamily(nftables.TableFamilyNetdev)
		if err != nil {
			return err
		}
		for _, tb := range tables {
			objs, err := c.GetObjects(tb)
			if err != nil {
				return err
			}
			for _, o := range objs {
				if co, ok := o.(*nftables.CounterObj); ok && co.Name == fmt.Sprintf("drops_%d", id) {
					drops += co.Packets
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return chain, drops
}

// TestNothingLeavesBetweenDELs: a runtime's CNI DEL runs the chain
// backwards, so cleanwall-cni's DEL (the daemon tears the sandbox down)
// comes while ptp's interface is still there, and the sandbox's processes
// may still be running. In that window the interface used to forward
// whatever it was sent: nothing of cleanwall was left on it. Now its wall
// chain stays, dropping and counting, until the interface is gone; then
// it goes too.
func TestNothingLeavesBetweenDELs(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	targets := env.NewEscapeTargets()
	sb := env.MustAddSandbox("delwin", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
	d.RoundTrip(t, sb)
	info, err := d.Client().Get(harness.Ctx(), sb.ContainerID, "")
	if err != nil {
		t.Fatal(err)
	}
	before := len(targets.Allowed.Conns())

	// cleanwall-cni's DEL alone: what the daemon does for it.
	if err := d.Client().Delete(harness.Ctx(), sb.ContainerID, sb.IfName); err != nil {
		t.Fatal(err)
	}
	chain, drops := wallState(t, env, info.DatapathID)
	if !chain {
		t.Fatal("the sandbox's wall chain went with cleanwall-cni's DEL, before its interface")
	}
	targets.Attempt(t, sb)
	targets.AssertNothingEscaped(t, sb, before)
	if _, after := wallState(t, env, info.DatapathID); after <= drops {
		t.Errorf("the attempts were not counted by the wall (%d before, %d after)", drops, after)
	}

	// The rest of the chain's DEL removes the interface; the chain follows
	// at the watchdog's next round (1 s).
	if err := sb.Del(); err != nil {
		t.Fatal(err)
	}
	if !harness.Eventually(5*time.Second, func() bool { c, _ := wallState(t, env, info.DatapathID); return !c }) {
		t.Fatalf("the wall chain of sandbox %d outlived its interface by 5 s\n%s", info.DatapathID, d.Log())
	}
}
