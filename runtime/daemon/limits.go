package daemon

import (
	"errors"
	"fmt"
	"math"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/policy"
)

// Limits bound what one sandbox may take of the node's proxies, so that one
// sandbox cannot starve the others or the daemon's API. Over a concurrency
// limit, a new flow is refused (TCP: reset; UDP: its datagram dropped; DNS:
// no answer, the client retries); over the rate, the datapath drops it; both
// are counted as reason "flow-limit". Established flows and other
// sandboxes are unaffected. A zero field takes the default, a
// negative one means unlimited; a policy's spec.limits can only lower them.
type Limits struct {
	// TCPFlows: concurrent TCP flows (open tcp and http rules).
	TCPFlows int
	// UDPFlows: concurrent UDP flows of open rules.
	UDPFlows int
	// NewFlowsPerSecond: new TCP and UDP flows per second (a token bucket
	// holding twice the rate).
	// The datapath enforces it (a SYN or a new UDP flow over it is dropped
	// in the kernel, reason flow-limit), so that a flood costs the proxies
	// nothing.
	NewFlowsPerSecond float64
	// DNSInFlight: DNS queries over UDP being answered at once (DNS over
	// TCP has its own per-sandbox connection limit in the DNS proxy).
	DNSInFlight int
}

// DefaultLimits are cleanwalld's per-sandbox limits.
var DefaultLimits = Limits{TCPFlows: 1024, UDPFlows: 256, NewFlowsPerSecond: 1000, DNSInFlight: 64}

func (l *Limits) setDefaults() {
	if l.TCPFlows == 0 {
		l.TCPFlows = DefaultLimits.TCPFlows
	}
	if l.UDPFlows == 0 {
		l.UDPFlows = DefaultLimits.UDPFlows
	}
	if l.NewFlowsPerSecond == 0 {
		l.NewFlowsPerSecond = DefaultLimits.NewFlowsPerSecond
	}
	if l.DNSInFlight == 0 {
		l.DNSInFlight = DefaultLimits.DNSInFlight
	}
}

// effectiveLimits lowers the daemon's limits by a policy's spec.limits.
func effectiveLimits(daemon Limits, c *policy.Compiled) Limits {
	out := daemon
	var spec *policy.LimitsSpec
	if c != nil && c.Policy != nil {
		spec = c.Policy.Spec.Limits
	}
	if spec == nil {
		return out
	}
	lower := func(d int, p *int) int {
		if p == nil || (d > 0 && d <= *p) {
			return d
		}
		return *p
	}
	out.TCPFlows = lower(out.TCPFlows, spec.TCPFlows)
	out.UDPFlows = lower(out.UDPFlows, spec.UDPFlows)
	out.DNSInFlight = lower(out.DNSInFlight, spec.DNSQueriesInFlight)
	if p := spec.NewFlowsPerSecond; p != nil && (out.NewFlowsPerSecond < 0 || float64(*p) < out.NewFlowsPerSecond) {
		out.NewFlowsPerSecond = float64(*p)
	}
	return out
}

// flowKind is what a sandbox's flow takes of its limits.
type flowKind int

const (
	flowTCP flowKind = iota
	flowUDP
	flowDNS
	numFlowKinds
)

// fdsPerFlow is what a flow of each kind may hold in descriptors: a TCP
// flow two sockets and, while it splices, a pipe; a UDP flow its upstream
// socket and a reply socket; a DNS query an upstream and a reply socket.
var fdsPerFlow = [numFlowKinds]int64{flowTCP: 4, flowUDP: 2, flowDNS: 2}

// Refusal reasons of the limits (the result label of
// cleanwall_proxy_flows_total).
const (
	reasonFlowLimit     = "flow-limit"      // over one of the sandbox's limits
	reasonNodeFlowLimit = "node-flow-limit" // the node's descriptor budget is spent
)

// flowLimiter holds one sandbox's limits and what it uses of them.
type flowLimiter struct {
	lim    atomic.Pointer[Limits]
	active [numFlowKinds]atomic.Int64
}

// dnsShedFactor: DNS datagrams beyond this multiple of the DNS proxy's
// rate limit are dropped in the datapath (reason dns-limit): a flood far
// above that limit would otherwise be answered REFUSED one query at a time
// at the daemon's expense. The client retries.
const dnsShedFactor = 4

func newFlowLimiter(l Limits) *flowLimiter {
	f := &flowLimiter{}
	f.set(l)
	return f
}

// set changes the limits (a policy apply); flows above a lowered limit
// stay, new ones wait until the sandbox is below it.
func (f *flowLimiter) set(l Limits) { f.lim.Store(&l) }

func burst(rate float64) float64 { return 2 * rate }

// dnsBudget is the datapath's budget of DNS datagrams for a DNS proxy
// rate of qps (negative: none).
func dnsBudget(qps float64) bpf.FlowRate {
	if qps < 0 {
		return bpf.FlowRate{}
	}
	return bpf.FlowRate{PerSecond: dnsShedFactor * qps, Burst: burst(dnsShedFactor * qps)}
}

// writeBudgets writes a sandbox's kernel budgets for limits l.
func (d *Daemon) writeBudgets(id uint32, l Limits) error {
	if err := d.dp.SetFlowRate(id, flowRate(l)); err != nil {
		return err
	}
	if err := d.dp.SetDNSRate(id, dnsBudget(d.dnsRate())); err != nil {
		return err
	}
	return d.dp.SetEventRate(id, eventBudget(d.cfg.DenyEventsPerSecond))
}

// eventBudget is the datapath's budget of deny events per sandbox: a
// sandbox dropping packets as fast as it can must not make the daemon read
// (and log, audit, publish) as many events. The counters stay exact.
func eventBudget(perSecond float64) bpf.FlowRate {
	if perSecond < 0 {
		return bpf.FlowRate{}
	}
	return bpf.FlowRate{PerSecond: perSecond, Burst: burst(perSecond)}
}

// checkBudgets compares a sandbox's kernel budgets with limits l.
func (d *Daemon) checkBudgets(id uint32, l Limits) error {
	for _, b := range []struct {
		what string
		want bpf.FlowRate
		read func(uint32) (bpf.FlowRate, bool, error)
	}{{"new-flow", flowRate(l), d.dp.FlowRateOf}, {"DNS", dnsBudget(d.dnsRate()), d.dp.DNSRateOf},
		{"deny-event", eventBudget(d.cfg.DenyEventsPerSecond), d.dp.EventRateOf}} {
		got, ok, err := b.read(id)
		if err != nil {
			return err
		}
		want := b.want
		if ok != (want.PerSecond > 0) || (ok && (math.Abs(got.PerSecond-want.PerSecond) > want.PerSecond/1000 || math.Abs(got.Burst-want.Burst) > 1)) {
			return fmt.Errorf("%s budget differs: have %+v, want %+v", b.what, got, want)
		}
	}
	return nil
}

// admit takes one flow of kind k, or says which limit refuses it. A taken
// flow is given back with done.
func (f *flowLimiter) admit(k flowKind, node *fdBudget) (done func(), refusal string) {
	l := f.lim.Load()
	max := [numFlowKinds]int{flowTCP: l.TCPFlows, flowUDP: l.UDPFlows, flowDNS: l.DNSInFlight}[k]
	if n := f.active[k].Add(1); max >= 0 && n > int64(max) {
		f.active[k].Add(-1)
		return nil, reasonFlowLimit
	}
	if !node.take(fdsPerFlow[k]) {
		f.active[k].Add(-1)
		return nil, reasonNodeFlowLimit
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			f.active[k].Add(-1)
			node.give(fdsPerFlow[k])
		})
	}, ""
}

// flowRate is the datapath's new-flow budget of limits l: the rate is
// enforced in the kernel (bpf.FlowRate), where a flood costs nothing but
// the drop. A negative rate is no budget.
func flowRate(l Limits) bpf.FlowRate {
	if l.NewFlowsPerSecond < 0 {
		return bpf.FlowRate{}
	}
	return bpf.FlowRate{PerSecond: l.NewFlowsPerSecond, Burst: burst(l.NewFlowsPerSecond)}
}

// fdBudget is the node-wide share of descriptors flows may hold: the
// process's limit less a reserve for the API, the audit log, the metrics
// endpoint, listeners and maps, so that no flood of flows can keep the
// daemon from serving CNI ADD and DEL.
type fdBudget struct {
	max  int64
	used atomic.Int64
}

// reservedFDs are kept for everything but flows.
const reservedFDs = 512

func (b *fdBudget) take(n int64) bool {
	if b == nil || b.max <= 0 {
		return true
	}
	if b.used.Add(n) > b.max {
		b.used.Add(-n)
		return false
	}
	return true
}

func (b *fdBudget) give(n int64) {
	if b != nil && b.max > 0 {
		b.used.Add(-n)
	}
}

// raiseNoFile raises the process's descriptor limit as far as it may
// (the hard limit, and the hard limit itself up to fs.nr_open when the
// process has CAP_SYS_RESOURCE) and returns the flows' budget.
func raiseNoFile() (limit uint64, budget *fdBudget, err error) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return 0, &fdBudget{}, err
	}
	if nrOpen, err := readUint("/proc/sys/fs/nr_open"); err == nil && nrOpen > rl.Max {
		want := unix.Rlimit{Cur: nrOpen, Max: nrOpen}
		if unix.Setrlimit(unix.RLIMIT_NOFILE, &want) == nil {
			rl = want
		}
	}
	if rl.Cur < rl.Max {
		want := unix.Rlimit{Cur: rl.Max, Max: rl.Max}
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &want); err == nil {
			rl = want
		}
	}
	max := int64(rl.Cur) - reservedFDs
	if rl.Cur == unix.RLIM_INFINITY || rl.Cur > math.MaxInt64/2 {
		max = 0 // unlimited
	} else if max < int64(rl.Cur)/2 {
		max = int64(rl.Cur) / 2 // a small limit: keep half for the rest
	}
	return rl.Cur, &fdBudget{max: max}, nil
}

func readUint(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	var v uint64
	for _, c := range b {
		if c == '\n' {
			break
		}
		if c < '0' || c > '9' {
			return 0, errors.New("not a number")
		}
		v = v*10 + uint64(c-'0')
	}
	return v, nil
}
