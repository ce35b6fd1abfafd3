package kernel

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/cleanwall/cleanwall/runtime/enforce"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// NFTWall is the second enforcement layer, one that does not depend on BPF:
// if the datapath programs are ever gone (pins removed, a detach with
// bpftool, a bug), nothing a sandbox sends may leave the node or reach a
// node service. It is made of nftables rules in the node namespace:
//
//	table netdev cleanwall_<table>
//	  counter drops_<id>
//	  chain sb_<id>_<ifname> { type filter hook ingress device <ifname> priority -500; policy drop;
//	    meta mark & 0xffffff00 == <redirect mark> accept   # the datapath redirected it
//	    meta protocol arp accept                           # the gateway must resolve
//	    <ICMPv6 RS/NS/NA, hop limit 255, to link-local, ff02::/16 or the gateway> accept
//	    counter name drops_<id> drop
//	  }
//	table inet cleanwall_<table>
//	  counter unassigned
//	  chain redirected { type filter hook input priority -310; policy accept;
//	    meta mark & 0xffffff00 == <redirect mark> socket transparent 1 accept
//	    meta mark & 0xffffff00 == <redirect mark> counter name unassigned drop
//	  }
//	  chain redirected_forward { type filter hook forward priority -310; policy accept;
//	    meta mark & 0xffffff00 == <redirect mark> counter name unassigned drop
//	  }
//
// The netdev ingress hook runs right after tc ingress, on the sandbox's
// host-side interface itself (a ptp veth or a bridge port alike), and sees
// the mark the datapath set. The inet chains make sure a redirected packet
// is delivered to one of our (transparent) proxy sockets and nothing else:
// were the bridge device's program gone, a marked packet would otherwise be
// routed to the local table and reach any node service on its port; were
// the fwmark rule gone, it would be forwarded. They hook input and forward,
// not prerouting: with br_netfilter, prerouting runs for bridged frames
// before the bridge device's program has assigned the socket.
//
// The table name carries the daemon's routing table number, so each
// runtime in a node namespace (cleanwalld, every `cleanwall run`) owns its
// own tables. Every rule carries a tag in its user data, so a check
// compares what the kernel holds with what this build writes.
type NFTWall struct {
	name         string
	redirectMark uint32

	// chains remembers the chain names AddSandbox wrote per sandbox id,
	// so that RemoveSandbox deletes them without listing every chain of
	// the table (a dump that grows with the node's sandboxes). After a
	// restart it is empty and RemoveSandbox lists.
	mu     sync.Mutex
	chains map[uint32]map[string]bool
}

var _ enforce.Wall = (*NFTWall)(nil)

// NewNFTWall is the wall of the runtime whose routing table is table and
// redirect mark redirectMark.
func NewNFTWall(table int, redirectMark uint32) *NFTWall {
	return &NFTWall{name: WallTableName(table), redirectMark: redirectMark}
}

// WallTableName is the nftables table name of a runtime's wall.
func WallTableName(table int) string { return "cleanwall_" + strconv.Itoa(table) }

// Name is the wall's table name (in both families).
func (w *NFTWall) Name() string { return w.name }

const (
	wallNetdevPriority = -500
	wallInetPriority   = -310
	wallInetChain      = "redirected"
	wallForwardChain   = "redirected_forward"
	wallUnassigned     = "unassigned"
	wallTagPrefix      = "cleanwall:"
)

func (w *NFTWall) netdev() *nftables.Table {
	return &nftables.Table{Name: w.name, Family: nftables.TableFamilyNetdev}
}

func (w *NFTWall) inet() *nftables.Table {
	return &nftables.Table{Name: w.name, Family: nftables.TableFamilyINet}
}

func nftConn() (*nftables.Conn, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	return c, nil
}

// markIs loads the skb mark into register 1 and compares its redirect part.
func (w *NFTWall) markIs() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(RedirectMask), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(w.redirectMark)},
	}
}

func accept() *expr.Verdict { return &expr.Verdict{Kind: expr.VerdictAccept} }

// sandboxRules are the rules of one sandbox's chain, in order.
func (w *NFTWall) sandboxRules(s enforce.WallSandbox) [][]expr.Any {
	nd := func(dst ...expr.Any) []expr.Any {
		r := []expr.Any{
			&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0x86, 0xdd}},
			// next header ICMPv6 (no extension header), hop limit 255
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 6, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6, 255}},
			// router solicitation, neighbour solicitation or advertisement
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
			&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{133}, ToData: []byte{136}},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{134}},
		}
		return append(append(r, dst...), accept())
	}
	rules := [][]expr.Any{
		append(w.markIs(), accept()),
		{
			&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0x08, 0x06}},
			accept(),
		},
		// to a link-local unicast address (never forwarded)
		nd(&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 24, Len: 2},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 2, Mask: []byte{0xff, 0xc0}, Xor: []byte{0, 0}},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0xfe, 0x80}}),
		// to a link-local multicast group (all routers, solicited-node)
		nd(&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 24, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0xff, 0x02}}),
	}
	for _, gw := range s.Gateway {
		if gw.Is6() && !gw.Is4In6() {
			b := gw.As16()
			rules = append(rules, nd(&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 24, Len: 16},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b[:]}))
		}
	}
	rules = append(rules, []expr.Any{
		&expr.Objref{Type: int(nftables.ObjTypeCounter), Name: dropsCounter(s.ID)},
		&expr.Verdict{Kind: expr.VerdictDrop},
	})
	return rules
}

func dropsCounter(id uint32) string { return fmt.Sprintf("drops_%d", id) }

func (w *NFTWall) unassignedDrop() []expr.Any {
	return append(w.markIs(),
		&expr.Objref{Type: int(nftables.ObjTypeCounter), Name: wallUnassigned},
		&expr.Verdict{Kind: expr.VerdictDrop})
}

func (w *NFTWall) inetRules() [][]expr.Any {
	return [][]expr.Any{
		append(w.markIs(),
			&expr.Socket{Key: expr.SocketKeyTransparent, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{1}},
			accept()),
		w.unassignedDrop(),
	}
}

func (w *NFTWall) forwardRules() [][]expr.Any { return [][]expr.Any{w.unassignedDrop()} }

// tag is the user data of rule i of a chain: it names the rule set this
// build writes, so a check can tell a modified chain.
func tag(chain string, i int, rule []expr.Any) []byte {
	h := sha256.New()
	fmt.Fprintf(h, "%s/%d", chain, i)
	for _, e := range rule {
		fmt.Fprintf(h, "/%T%+v", e, e)
	}
	return []byte(wallTagPrefix + hex.EncodeToString(h.Sum(nil)[:12]))
}

// nodeChains are the node-wide chains with their rules.
func (w *NFTWall) nodeChains() []struct {
	chain *nftables.Chain
	rules [][]expr.Any
} {
	mk := func(name string, hook *nftables.ChainHook) *nftables.Chain {
		return &nftables.Chain{Name: name, Table: w.inet(), Type: nftables.ChainTypeFilter,
			Hooknum: hook, Priority: nftables.ChainPriorityRef(wallInetPriority)}
	}
	return []struct {
		chain *nftables.Chain
		rules [][]expr.Any
	}{
		{mk(wallInetChain, nftables.ChainHookInput), w.inetRules()},
		{mk(wallForwardChain, nftables.ChainHookForward), w.forwardRules()},
	}
}

func (w *NFTWall) sandboxChain(s enforce.WallSandbox) *nftables.Chain {
	drop := nftables.ChainPolicyDrop
	return &nftables.Chain{Name: enforce.ChainName(s), Table: w.netdev(), Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookIngress, Priority: nftables.ChainPriorityRef(wallNetdevPriority),
		Device: s.Ifname, Policy: &drop}
}

// Install creates the tables and the node-wide chain (idempotently: the
// chain's rules are replaced in the same transaction).
func (w *NFTWall) Install() error {
	c, err := nftConn()
	if err != nil {
		return err
	}
	c.AddTable(w.netdev())
	c.AddTable(w.inet())
	c.AddObj(&nftables.CounterObj{Table: w.inet(), Name: wallUnassigned})
	for _, nc := range w.nodeChains() {
		ch := c.AddChain(nc.chain)
		c.FlushChain(ch)
		for i, r := range nc.rules {
			c.AddRule(&nftables.Rule{Table: w.inet(), Chain: ch, Exprs: r, UserData: tag(ch.Name, i, r)})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("installing the nftables wall %s: %w", w.name, err)
	}
	return nil
}

// AddSandbox installs (or replaces, atomically) a sandbox's chain.
func (w *NFTWall) AddSandbox(s enforce.WallSandbox) error {
	c, err := nftConn()
	if err != nil {
		return err
	}
	c.AddTable(w.netdev())
	c.AddObj(&nftables.CounterObj{Table: w.netdev(), Name: dropsCounter(s.ID)})
	ch := c.AddChain(w.sandboxChain(s))
	c.FlushChain(ch)
	for i, r := range w.sandboxRules(s) {
		c.AddRule(&nftables.Rule{Table: w.netdev(), Chain: ch, Exprs: r, UserData: tag(ch.Name, i, r)})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("installing the nftables wall of %s: %w", s.Ifname, err)
	}
	w.mu.Lock()
	if w.chains == nil {
		w.chains = map[uint32]map[string]bool{}
	}
	if w.chains[s.ID] == nil {
		w.chains[s.ID] = map[string]bool{}
	}
	w.chains[s.ID][ch.Name] = true
	w.mu.Unlock()
	return nil
}

// RemoveSandbox deletes a sandbox's chain and counter; missing is fine.
// When this wall wrote the chains it knows their names and deletes them
// and the counter in one transaction (one commit: the kernel unhooks
// the chains once); otherwise, or when something was already gone, it
// lists the table's chains and deletes what is there.
func (w *NFTWall) RemoveSandbox(id uint32) error {
	w.mu.Lock()
	known := w.chains[id]
	delete(w.chains, id)
	w.mu.Unlock()
	if len(known) > 0 {
		c, err := nftConn()
		if err != nil {
			return err
		}
		for name := range known {
			c.DelChain(&nftables.Chain{Name: name, Table: w.netdev()})
		}
		c.DeleteObject(&nftables.CounterObj{Table: w.netdev(), Name: dropsCounter(id)})
		if err := c.Flush(); err == nil {
			return nil
		} else if !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("removing the nftables wall of sandbox %d: %w", id, err)
		}
		// Something was gone already (the transaction did nothing).
	}
	return w.removeListed(id)
}

// removeListed is RemoveSandbox by listing the table's chains.
func (w *NFTWall) removeListed(id uint32) error {
	chains, err := w.SandboxChains()
	if err != nil {
		return err
	}
	c, err := nftConn()
	if err != nil {
		return err
	}
	n := 0
	for name, cid := range chains {
		if cid == id {
			c.DelChain(&nftables.Chain{Name: name, Table: w.netdev()})
			n++
		}
	}
	if n > 0 {
		if err := c.Flush(); err != nil {
			return fmt.Errorf("removing the nftables wall of sandbox %d: %w", id, err)
		}
	}
	// The counter goes once nothing refers to it.
	c.DeleteObject(&nftables.CounterObj{Table: w.netdev(), Name: dropsCounter(id)})
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("removing the wall counter of sandbox %d: %w", id, err)
	}
	return nil
}

// SandboxChains lists the sandbox chains of the netdev table by name, with
// the sandbox id each belongs to.
func (w *NFTWall) SandboxChains() (map[string]uint32, error) {
	c, err := nftConn()
	if err != nil {
		return nil, err
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyNetdev)
	if err != nil {
		return nil, fmt.Errorf("listing nftables chains: %w", err)
	}
	out := map[string]uint32{}
	for _, ch := range chains {
		if ch.Table == nil || ch.Table.Name != w.name {
			continue
		}
		if id, _, ok := enforce.ChainParts(ch.Name); ok {
			out[ch.Name] = id
		}
	}
	return out, nil
}

// checkRules compares a chain's rules with what this build writes.
func checkRules(c *nftables.Conn, ch *nftables.Chain, want [][]expr.Any) error {
	got, err := c.GetRules(ch.Table, ch)
	if err != nil {
		return fmt.Errorf("reading chain %s: %w", ch.Name, err)
	}
	if len(got) != len(want) {
		return fmt.Errorf("chain %s has %d rules, want %d", ch.Name, len(got), len(want))
	}
	for i, r := range got {
		if !bytes.Equal(r.UserData, tag(ch.Name, i, want[i])) {
			return fmt.Errorf("chain %s: rule %d is not cleanwall's", ch.Name, i)
		}
	}
	return nil
}

// CheckSandbox verifies a sandbox's chain: present, bound to ingress with
// policy drop, and holding exactly our rules.
func (w *NFTWall) CheckSandbox(s enforce.WallSandbox) error {
	c, err := nftConn()
	if err != nil {
		return err
	}
	want := w.sandboxChain(s)
	got, err := c.ListChain(w.netdev(), want.Name)
	if err != nil {
		return fmt.Errorf("nftables wall: no chain %s in table netdev %s: %w", want.Name, w.name, err)
	}
	if got.Hooknum == nil || *got.Hooknum != *want.Hooknum || got.Policy == nil || *got.Policy != nftables.ChainPolicyDrop {
		return fmt.Errorf("nftables wall: chain %s is not an ingress chain with policy drop", want.Name)
	}
	return checkRules(c, want, w.sandboxRules(s))
}

// CheckNode verifies the node-wide chain.
func (w *NFTWall) CheckNode() error {
	c, err := nftConn()
	if err != nil {
		return err
	}
	for _, nc := range w.nodeChains() {
		got, err := c.ListChain(w.inet(), nc.chain.Name)
		if err != nil {
			return fmt.Errorf("nftables wall: no chain %s in table inet %s: %w", nc.chain.Name, w.name, err)
		}
		if got.Hooknum == nil || *got.Hooknum != *nc.chain.Hooknum {
			return fmt.Errorf("nftables wall: chain %s is not on its hook", nc.chain.Name)
		}
		if err := checkRules(c, nc.chain, nc.rules); err != nil {
			return err
		}
	}
	return nil
}

// Counts reads the wall's drop counters.
func (w *NFTWall) Counts() (enforce.WallCounts, error) {
	out := enforce.WallCounts{Sandboxes: map[uint32]uint64{}}
	c, err := nftConn()
	if err != nil {
		return out, err
	}
	for _, t := range []*nftables.Table{w.netdev(), w.inet()} {
		objs, err := c.GetObjects(t)
		if err != nil {
			return out, fmt.Errorf("reading nftables counters: %w", err)
		}
		for _, o := range objs {
			co, ok := o.(*nftables.CounterObj)
			if !ok {
				continue
			}
			if co.Name == wallUnassigned {
				out.Unassigned += co.Packets
			} else if s, ok := strings.CutPrefix(co.Name, "drops_"); ok {
				if id, err := strconv.ParseUint(s, 10, 32); err == nil {
					out.Sandboxes[uint32(id)] += co.Packets
				}
			}
		}
	}
	return out, nil
}

// Present reports whether either table exists.
func (w *NFTWall) Present() (bool, error) {
	c, err := nftConn()
	if err != nil {
		return false, err
	}
	tables, err := c.ListTables()
	if err != nil {
		return false, fmt.Errorf("listing nftables tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == w.name && (t.Family == nftables.TableFamilyNetdev || t.Family == nftables.TableFamilyINet) {
			return true, nil
		}
	}
	return false, nil
}

// Remove deletes both tables (uninstall of a runtime that owns its node
// namespace alone, or the leftovers of a dead one). Missing is fine.
func (w *NFTWall) Remove() error {
	c, err := nftConn()
	if err != nil {
		return err
	}
	var errs []error
	for _, t := range []*nftables.Table{w.netdev(), w.inet()} {
		c.DelTable(t)
		if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("deleting nftables table %s: %w", t.Name, err))
		}
	}
	return errors.Join(errs...)
}
