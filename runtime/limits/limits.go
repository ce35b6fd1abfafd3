// Package limits holds what bounds one sandbox's share of the node: the
// per-sandbox limits (concurrent TCP and UDP flows, DNS queries in flight,
// the new-flow rate), their lowering by a policy's spec.limits, the
// per-sandbox counting of flows against them, the node-wide descriptor
// budget of flows, and the kernel budgets the datapath enforces for the
// rates. It touches no socket and no map: the daemon's packages do.
package limits

import (
	"errors"
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

// Default are cleanwalld's per-sandbox limits.
var Default = Limits{TCPFlows: 1024, UDPFlows: 256, NewFlowsPerSecond: 1000, DNSInFlight: 64}

func (l *Limits) SetDefaults() {
	if l.TCPFlows == 0 {
		l.TCPFlows = Default.TCPFlows
	}
	if l.UDPFlows == 0 {
		l.UDPFlows = Default.UDPFlows
	}
	if l.NewFlowsPerSecond == 0 {
		l.NewFlowsPerSecond = Default.NewFlowsPerSecond
	}
	if l.DNSInFlight == 0 {
		l.DNSInFlight = Default.DNSInFlight
	}
}

// Effective lowers the daemon's limits by a policy's spec.limits.
func Effective(daemon Limits, c *policy.Compiled) Limits {
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

// Kind is what a sandbox's flow takes of its limits.
type Kind int

const (
	TCP Kind = iota
	UDP
	DNS
	numKinds
)

// fdsPerFlow is what a flow of each kind may hold in descriptors: a TCP
// flow two sockets and, while it splices, a pipe; a UDP flow its upstream
// socket and a reply socket; a DNS query an upstream and a reply socket.
var fdsPerFlow = [numKinds]int64{TCP: 4, UDP: 2, DNS: 2}

// Refusal reasons of the limits (the result label of
// cleanwall_proxy_flows_total).
const (
	ReasonFlowLimit     = "flow-limit"      // over one of the sandbox's limits
	ReasonNodeFlowLimit = "node-flow-limit" // the node's descriptor budget is spent
)

// Limiter holds one sandbox's limits and what it uses of them.
type Limiter struct {
	lim    atomic.Pointer[Limits]
	active [numKinds]atomic.Int64
}

// DNSShedFactor: DNS datagrams beyond this multiple of the DNS proxy's
// rate limit are dropped in the datapath (reason dns-limit): a flood far
// above that limit would otherwise be answered REFUSED one query at a time
// at the daemon's expense. The client retries.
const DNSShedFactor = 4

// NewLimiter returns a limiter holding no flows under limits l.
func NewLimiter(l Limits) *Limiter {
	f := &Limiter{}
	f.Set(l)
	return f
}

// Set changes the limits (a policy apply); flows above a lowered limit
// stay, new ones wait until the sandbox is below it.
func (f *Limiter) Set(l Limits) { f.lim.Store(&l) }

// Get returns the limits in force.
func (f *Limiter) Get() Limits { return *f.lim.Load() }

// Active is the number of flows of kind k the sandbox holds.
func (f *Limiter) Active(k Kind) int64 { return f.active[k].Load() }

func burst(rate float64) float64 { return 2 * rate }

// DNSBudget is the datapath's budget of DNS datagrams for a DNS proxy
// rate of qps (negative: none).
func DNSBudget(qps float64) bpf.FlowRate {
	if qps < 0 {
		return bpf.FlowRate{}
	}
	return bpf.FlowRate{PerSecond: DNSShedFactor * qps, Burst: burst(DNSShedFactor * qps)}
}

// FlowRate is the datapath's new-flow budget of limits l: the rate is
// enforced in the kernel (bpf.FlowRate), where a flood costs nothing but
// the drop. A negative rate is no budget.
func FlowRate(l Limits) bpf.FlowRate {
	if l.NewFlowsPerSecond < 0 {
		return bpf.FlowRate{}
	}
	return bpf.FlowRate{PerSecond: l.NewFlowsPerSecond, Burst: burst(l.NewFlowsPerSecond)}
}

// Node is the node-wide share of descriptors flows may hold: the
// process's limit less a reserve for the API, the audit log, the metrics
// endpoint, listeners and maps, so that no flood of flows can keep the
// daemon from serving CNI ADD and DEL.
type Node struct {
	Max  int64
	used atomic.Int64
}

// ReservedFDs are kept for everything but flows.
const ReservedFDs = 512

func (b *Node) take(n int64) bool {
	if b == nil || b.Max <= 0 {
		return true
	}
	if b.used.Add(n) > b.Max {
		b.used.Add(-n)
		return false
	}
	return true
}

func (b *Node) give(n int64) {
	if b != nil && b.Max > 0 {
		b.used.Add(-n)
	}
}

// RaiseNoFile raises the process's descriptor limit as far as it may
// (the hard limit, and the hard limit itself up to fs.nr_open when the
// process has CAP_SYS_RESOURCE) and returns the flows' budget.
func RaiseNoFile() (limit uint64, budget *Node, err error) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return 0, &Node{}, err
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
	max := int64(rl.Cur) - ReservedFDs
	if rl.Cur == unix.RLIM_INFINITY || rl.Cur > math.MaxInt64/2 {
		max = 0 // unlimited
	} else if max < int64(rl.Cur)/2 {
		max = int64(rl.Cur) / 2 // a small limit: keep half for the rest
	}
	return rl.Cur, &Node{Max: max}, nil
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

// EventBudget is the datapath's budget of deny events per sandbox: a
// sandbox dropping packets as fast as it can must not make the daemon read
// (and log, audit, publish) as many events. The counters stay exact.
func EventBudget(perSecond float64) bpf.FlowRate {
	if perSecond < 0 {
		return bpf.FlowRate{}
	}
	return bpf.FlowRate{PerSecond: perSecond, Burst: burst(perSecond)}
}

// Admit takes one flow of kind k, or says which limit refuses it. A taken
// flow is given back with done (once; more calls do nothing).
func (f *Limiter) Admit(k Kind, node *Node) (done func(), refusal string) {
	l := f.lim.Load()
	max := [numKinds]int{TCP: l.TCPFlows, UDP: l.UDPFlows, DNS: l.DNSInFlight}[k]
	if n := f.active[k].Add(1); max >= 0 && n > int64(max) {
		f.active[k].Add(-1)
		return nil, ReasonFlowLimit
	}
	if !node.take(fdsPerFlow[k]) {
		f.active[k].Add(-1)
		return nil, ReasonNodeFlowLimit
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			f.active[k].Add(-1)
			node.give(fdsPerFlow[k])
		})
	}, ""
}
