package bpf

import (
	"errors"
	"fmt"
	"math"
	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Map names of the new-flow budgets.
const (
	MapFlowRate = "cw_flow_rate"
	MapUDPFlows = "cw_udp_flows"
)

// FlowRate is a sandbox's budget of new flows (TCP SYNs and new UDP flows
// to its rules' destinations): PerSecond sustained, Burst at once. Flows
// over it are dropped in the datapath (reason flow-limit) before they cost
// a proxy anything.
type FlowRate struct {
	PerSecond float64
	Burst     float64
}

// Budget kinds (enum budget_kind in datapath.h).
const (
	budgetFlows  = 0 // new TCP and UDP flows to the rules' destinations, DNS over TCP
	budgetDNS    = 1 // DNS datagrams
	budgetEvents = 2 // deny events reported
)

// SetFlowRate writes sandbox id's budget of new flows, full; a PerSecond
// of 0 or less removes it (no limit).
func (d *Datapath) SetFlowRate(id uint32, r FlowRate) error { return d.setBudget(id, budgetFlows, r) }

// SetDNSRate writes sandbox id's budget of DNS datagrams (UDP port 53, any
// destination), dropped over it as dns-limit; 0 or less removes it.
func (d *Datapath) SetDNSRate(id uint32, r FlowRate) error { return d.setBudget(id, budgetDNS, r) }

// SetEventRate writes sandbox id's budget of deny events: drops beyond it
// are counted but not reported on the ring buffer; 0 or less removes it.
func (d *Datapath) SetEventRate(id uint32, r FlowRate) error { return d.setBudget(id, budgetEvents, r) }

func (d *Datapath) setBudget(id, kind uint32, r FlowRate) error {
	k := datapathFlowRateKey{SandboxId: id, Kind: kind}
	if r.PerSecond <= 0 || math.IsInf(r.PerSecond, 0) || math.IsNaN(r.PerSecond) {
		err := d.objs.CwFlowRate.Delete(k)
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("deleting a budget of sandbox %d: %w", id, err)
		}
		return nil
	}
	cost := uint64(math.Max(1, 1e9/r.PerSecond))
	burst := math.Max(1, r.Burst)
	v := datapathFlowRate{CostNs: cost, CapNs: uint64(burst * float64(cost))}
	v.CreditNs = v.CapNs
	if err := d.objs.CwFlowRate.Put(k, v); err != nil {
		return fmt.Errorf("writing a budget of sandbox %d: %w", id, err)
	}
	return nil
}

// FlowRateOf reads a sandbox's budget of new flows back (ok false: none).
func (d *Datapath) FlowRateOf(id uint32) (FlowRate, bool, error) { return d.budget(id, budgetFlows) }

// DNSRateOf reads a sandbox's budget of DNS datagrams back.
func (d *Datapath) DNSRateOf(id uint32) (FlowRate, bool, error) { return d.budget(id, budgetDNS) }

// EventRateOf reads a sandbox's budget of deny events back.
func (d *Datapath) EventRateOf(id uint32) (FlowRate, bool, error) { return d.budget(id, budgetEvents) }

func (d *Datapath) budget(id, kind uint32) (FlowRate, bool, error) {
	var v datapathFlowRate
	err := d.objs.CwFlowRate.Lookup(datapathFlowRateKey{SandboxId: id, Kind: kind}, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return FlowRate{}, false, nil
	}
	if err != nil || v.CostNs == 0 {
		return FlowRate{}, false, err
	}
	return FlowRate{PerSecond: 1e9 / float64(v.CostNs), Burst: float64(v.CapNs) / float64(v.CostNs)}, true, nil
}

// DeleteFlowRate removes every budget of a sandbox; missing is fine.
func (d *Datapath) DeleteFlowRate(id uint32) error {
	var errs []error
	for _, kind := range []uint32{budgetFlows, budgetDNS, budgetEvents} {
		err := d.objs.CwFlowRate.Delete(datapathFlowRateKey{SandboxId: id, Kind: kind})
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("deleting a budget of sandbox %d: %w", id, err))
		}
	}
	return errors.Join(errs...)
}

// FlowRateIDs lists the sandboxes with a budget (for orphan sweeps).
func (d *Datapath) FlowRateIDs() []uint32 {
	seen := map[uint32]bool{}
	var out []uint32
	var k datapathFlowRateKey
	var v datapathFlowRate
	it := d.objs.CwFlowRate.Iterate()
	for it.Next(&k, &v) {
		if !seen[k.SandboxId] {
			seen[k.SandboxId] = true
			out = append(out, k.SandboxId)
		}
	}
	return out
}

func udpFlowKey(id uint32, src, dst netip.AddrPort) datapathUdpFlowKey {
	k := datapathUdpFlowKey{SandboxId: id, Family: 4, Sport: src.Port(), Dport: dst.Port()}
	if src.Addr().Is6() && !src.Addr().Is4In6() {
		k.Family = 6
	}
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	if k.Family == 4 {
		a, b := s.As4(), d.As4()
		copy(k.Saddr[:], a[:])
		copy(k.Daddr[:], b[:])
	} else {
		k.Saddr, k.Daddr = s.As16(), d.As16()
	}
	return k
}

// NoteUDPFlow tells the datapath that a proxy holds the UDP flow src->dst
// of sandbox id: its datagrams take nothing from the budget of new flows.
func (d *Datapath) NoteUDPFlow(id uint32, src, dst netip.AddrPort) error {
	v := datapathUdpFlow{SinceNs: uint64(monotonicNow())}
	if err := d.objs.CwUdpFlows.Put(udpFlowKey(id, src, dst), v); err != nil {
		return fmt.Errorf("noting UDP flow %v->%v: %w", src, dst, err)
	}
	return nil
}

// ForgetUDPFlow ends what NoteUDPFlow started; missing is fine.
func (d *Datapath) ForgetUDPFlow(id uint32, src, dst netip.AddrPort) error {
	err := d.objs.CwUdpFlows.Delete(udpFlowKey(id, src, dst))
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("forgetting UDP flow %v->%v: %w", src, dst, err)
	}
	return nil
}

func monotonicNow() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}
