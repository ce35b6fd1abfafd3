package bpf

import (
	"errors"
	"fmt"
	"math"

	"github.com/cilium/ebpf"
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

// SetFlowRate writes sandbox id's budget, full; a PerSecond of 0 or less
// removes it (no limit).
func (d *Datapath) SetFlowRate(id uint32, r FlowRate) error {
	if r.PerSecond <= 0 || math.IsInf(r.PerSecond, 0) || math.IsNaN(r.PerSecond) {
		return d.DeleteFlowRate(id)
	}
	cost := uint64(math.Max(1, 1e9/r.PerSecond))
	burst := math.Max(1, r.Burst)
	v := datapathFlowRate{CostNs: cost, CapNs: uint64(burst * float64(cost))}
	v.CreditNs = v.CapNs
	if err := d.objs.CwFlowRate.Put(datapathFlowRateKey{SandboxId: id}, v); err != nil {
		return fmt.Errorf("writing the new-flow budget of sandbox %d: %w", id, err)
	}
	return nil
}

// FlowRateOf reads a sandbox's budget back (ok false: none, no limit).
func (d *Datapath) FlowRateOf(id uint32) (FlowRate, bool, error) {
	var v datapathFlowRate
	err := d.objs.CwFlowRate.Lookup(datapathFlowRateKey{SandboxId: id}, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return FlowRate{}, false, nil
	}
	if err != nil || v.CostNs == 0 {
		return FlowRate{}, false, err
	}
	return FlowRate{PerSecond: 1e9 / float64(v.CostNs), Burst: float64(v.CapNs) / float64(v.CostNs)}, true, nil
}

// DeleteFlowRate removes a sandbox's budget; missing is fine.
func (d *Datapath) DeleteFlowRate(id uint32) error {
	err := d.objs.CwFlowRate.Delete(datapathFlowRateKey{SandboxId: id})
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("deleting the new-flow budget of sandbox %d: %w", id, err)
	}
	return nil
}

// FlowRateIDs lists the sandboxes with a budget (for orphan sweeps).
func (d *Datapath) FlowRateIDs() []uint32 {
	var out []uint32
	var k datapathFlowRateKey
	var v datapathFlowRate
	it := d.objs.CwFlowRate.Iterate()
	for it.Next(&k, &v) {
		out = append(out, k.SandboxId)
	}
	return out
}
