// Package metrics holds cleanwalld's Prometheus metrics: the flows and
// bytes of the proxies (with the series of each label set cached, so a
// flow hashes no labels), the deny events and watchdog repairs, and the
// collector that reads the datapath's per-CPU counters and the nftables
// wall's at scrape time. Labels stay low-cardinality: sandbox (container
// ID), rule name, mode, verdict, reason, result.
package metrics

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

// Metrics are the daemon's metrics and their registry.
type Metrics struct {
	Registry    *prometheus.Registry
	Sandboxes   prometheus.Gauge
	flows       *prometheus.CounterVec
	activeFlows *prometheus.GaugeVec
	bytes       *prometheus.CounterVec
	DenyEvents  *prometheus.CounterVec
	Repairs     *prometheus.CounterVec
	// Admission times the parts of admissions (op "add") and teardowns
	// (op "del"): runtime/enforce's phases plus the daemon's own
	// ("resolve", "keys", "total").
	Admission *prometheus.HistogramVec
	// KeyReleases counts data key releases by result (released, refused).
	KeyReleases *prometheus.CounterVec

	// flowSets caches the children of each (sandbox, rule, mode) label
	// set (flowKey -> *FlowSet). An entry lives as long as the series it
	// points to: the vecs never delete a series today; whatever starts
	// deleting a sandbox's series must drop its entries here too.
	flowSets sync.Map
	refusals sync.Map // refusalKey -> prometheus.Counter
}

// ObservePhase records one timed part of an admission or teardown.
func (m *Metrics) ObservePhase(op, phase string, d time.Duration) {
	m.Admission.WithLabelValues(op, phase).Observe(d.Seconds())
}

// New registers the metrics (and Go's and the process's) in a new
// registry; src, when set, is read at scrape time for the datapath's.
func New(src DatapathSource) *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		Sandboxes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cleanwall_sandboxes", Help: "Sandboxes attached and enforced.",
		}),
		flows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_proxy_flows_total",
			Help: "Flows seen by the proxies, by result (accepted, closed, refusal reasons).",
		}, []string{"sandbox", "rule", "mode", "result"}),
		activeFlows: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cleanwall_proxy_active_flows", Help: "Flows currently proxied.",
		}, []string{"sandbox", "rule", "mode"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_proxy_bytes_total", Help: "Bytes proxied, by direction (out: sandbox to destination).",
		}, []string{"sandbox", "rule", "mode", "direction"}),
		DenyEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_deny_events_total", Help: "Deny events read from the datapath ring buffer.",
		}, []string{"reason"}),
		Repairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_repairs_total",
			Help: "What the watchdog found missing and put back (attachment, bridge-attachment, wall, node-wall, port-isolation, map-pin).",
		}, []string{"what"}),
		Admission: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "cleanwall_admission_phase_seconds",
			Help:    "Time spent in each part of a sandbox admission (op=add) or teardown (op=del), as the daemon sees it.",
			Buckets: []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2},
		}, []string{"op", "phase"}),
		KeyReleases: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_key_releases_total",
			Help: "Data key releases asked of the key broker, by result (released; refused: refused or unreachable).",
		}, []string{"result"}),
	}
	m.Registry.MustRegister(m.Sandboxes, m.flows, m.activeFlows, m.bytes, m.DenyEvents, m.Repairs, m.Admission, m.KeyReleases,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// Series alerts count with increase() exist from the start at 0: a
	// series whose first sample is already 1 shows no increase.
	for _, what := range []string{"attachment", "bridge-attachment", "wall", "node-wall", "port-isolation", "map-pin"} {
		m.Repairs.WithLabelValues(what)
	}
	for _, result := range []string{"released", "refused"} {
		m.KeyReleases.WithLabelValues(result)
	}
	if src != nil {
		m.Registry.MustRegister(&datapathCollector{src: src})
	}
	return m
}

type flowKey struct{ sandbox, rule, mode string }

func keyOf(sandbox string, rule *policy.Rule) flowKey {
	k := flowKey{"unknown", "none", "none"}
	if sandbox != "" {
		k.sandbox = sandbox
	}
	if rule != nil {
		k.rule, k.mode = rule.Name, rule.Mode.String()
	}
	return k
}

// ends are the results a flow ends with, in a fixed order.
var ends = [...]proxies.End{proxies.EndClosed, proxies.EndBudget, proxies.EndIdle, proxies.EndRevoked, proxies.EndError}

func endIndex(e proxies.End) int {
	for i, x := range ends {
		if x == e {
			return i
		}
	}
	return len(ends) - 1 // an unknown end is an error
}

// FlowSet are the series of one (sandbox, rule, mode) that every flow of
// it updates.
type FlowSet struct {
	m                 *Metrics
	key               flowKey
	Accepted          prometheus.Counter
	Active            prometheus.Gauge
	BytesOut, BytesIn prometheus.Counter
	// results are created on first use, so that only results that
	// happened are exported.
	results [len(ends)]atomic.Pointer[prometheus.Counter]
}

// Flows returns the cached series of a sandbox's (container ID) rule.
func (m *Metrics) Flows(sandbox string, rule *policy.Rule) *FlowSet {
	k := keyOf(sandbox, rule)
	if fs, ok := m.flowSets.Load(k); ok {
		return fs.(*FlowSet)
	}
	fs := &FlowSet{m: m, key: k,
		Accepted: m.flows.WithLabelValues(k.sandbox, k.rule, k.mode, "accepted"),
		Active:   m.activeFlows.WithLabelValues(k.sandbox, k.rule, k.mode),
		BytesOut: m.bytes.WithLabelValues(k.sandbox, k.rule, k.mode, "out"),
		BytesIn:  m.bytes.WithLabelValues(k.sandbox, k.rule, k.mode, "in"),
	}
	got, _ := m.flowSets.LoadOrStore(k, fs)
	return got.(*FlowSet)
}

// Ended counts a flow's result.
func (fs *FlowSet) Ended(e proxies.End) {
	i := endIndex(e)
	c := fs.results[i].Load()
	if c == nil {
		nc := fs.m.flows.WithLabelValues(fs.key.sandbox, fs.key.rule, fs.key.mode, string(ends[i]))
		fs.results[i].CompareAndSwap(nil, &nc)
		c = fs.results[i].Load()
	}
	(*c).Inc()
}

type refusalKey struct {
	flowKey
	reason string
}

// Refusal returns the counter of refusals of this label set, cached like
// Flows': a sandbox can make refusals as fast as it sends packets.
func (m *Metrics) Refusal(sandbox string, rule *policy.Rule, reason string) prometheus.Counter {
	k := refusalKey{keyOf(sandbox, rule), reason}
	if c, ok := m.refusals.Load(k); ok {
		return c.(prometheus.Counter)
	}
	c := m.flows.WithLabelValues(k.sandbox, k.rule, k.mode, reason)
	got, _ := m.refusals.LoadOrStore(k, c)
	return got.(prometheus.Counter)
}

// DatapathSource is what the datapath collector reads at scrape time.
type DatapathSource interface {
	Counters() (map[bpf.CounterKey]bpf.CounterValue, error)
	RuleCapacity() int
	// Owners names the sandboxes by datapath id: container ID, compiled
	// policy (for rule names) and the active generation's entry count.
	Owners() map[uint32]Owner
	// WallDrops are the nftables wall's drops by datapath id (ok false:
	// unreadable).
	WallDrops() (bySandbox map[uint32]uint64, unassigned uint64, ok bool)
}

// Owner is one sandbox as the collector labels it.
type Owner struct {
	Name     string
	Compiled *policy.Compiled
	Rules    int
}

// datapathCollector reads the per-CPU BPF counters at scrape time.
type datapathCollector struct{ src DatapathSource }

var (
	descPackets = prometheus.NewDesc("cleanwall_datapath_packets_total",
		"Packets the sandbox datapath decided on, by verdict (redirect, drop, pass) and reason.",
		[]string{"sandbox", "rule", "verdict", "reason"}, nil)
	descBytes = prometheus.NewDesc("cleanwall_datapath_bytes_total",
		"Bytes the sandbox datapath decided on.", []string{"sandbox", "rule", "verdict", "reason"}, nil)
	descFlows = prometheus.NewDesc("cleanwall_datapath_flows_total",
		"New flows (TCP SYN, every dropped packet, every UDP datagram) by verdict and reason.",
		[]string{"sandbox", "rule", "verdict", "reason"}, nil)
	descRules = prometheus.NewDesc("cleanwall_datapath_rules",
		"Rule entries of the sandbox's active generation.", []string{"sandbox"}, nil)
	descRuleCapacity = prometheus.NewDesc("cleanwall_datapath_rule_capacity",
		"Size of the rule map (entries across all sandboxes).", nil, nil)
	descWallDrops = prometheus.NewDesc("cleanwall_wall_drops_total",
		"Packets the nftables wall dropped on a sandbox's interface: traffic the datapath program did not redirect (only when a program is missing).",
		[]string{"sandbox"}, nil)
	descWallUnassigned = prometheus.NewDesc("cleanwall_wall_unassigned_drops_total",
		"Redirected packets the nftables wall dropped because no cleanwall proxy socket was assigned to them.", nil, nil)
)

func (c *datapathCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPackets, descBytes, descFlows, descRules, descRuleCapacity, descWallDrops, descWallUnassigned} {
		ch <- d
	}
}

func (c *datapathCollector) Collect(ch chan<- prometheus.Metric) {
	owners := c.src.Owners()
	for _, o := range owners {
		ch <- prometheus.MustNewConstMetric(descRules, prometheus.GaugeValue, float64(o.Rules), o.Name)
	}
	ch <- prometheus.MustNewConstMetric(descRuleCapacity, prometheus.GaugeValue, float64(c.src.RuleCapacity()))
	name := func(id uint32) (string, Owner, bool) {
		o, ok := owners[id]
		switch {
		case ok:
			return o.Name, o, true
		case id == 0:
			return "unknown", o, false
		}
		return fmt.Sprintf("datapath-%d", id), o, false
	}
	if drops, unassigned, ok := c.src.WallDrops(); ok {
		for id, n := range drops {
			n2, _, _ := name(id)
			ch <- prometheus.MustNewConstMetric(descWallDrops, prometheus.CounterValue, float64(n), n2)
		}
		ch <- prometheus.MustNewConstMetric(descWallUnassigned, prometheus.CounterValue, float64(unassigned))
	}
	counters, err := c.src.Counters()
	if err != nil {
		return
	}
	for k, v := range counters {
		sandbox, o, ok := name(k.SandboxID)
		rule := ""
		if ok && o.Compiled != nil {
			if r := o.Compiled.Rule(k.RuleID); r != nil {
				rule = r.Name
			}
		}
		labels := []string{sandbox, rule, k.Verdict.String(), k.Reason.String()}
		ch <- prometheus.MustNewConstMetric(descPackets, prometheus.CounterValue, float64(v.Packets), labels...)
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(v.Bytes), labels...)
		ch <- prometheus.MustNewConstMetric(descFlows, prometheus.CounterValue, float64(v.Flows), labels...)
	}
}
