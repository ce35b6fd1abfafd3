package daemon

import (
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/cleanwall/cleanwall/policy"
)

// metrics are the daemon's Prometheus metrics. Labels stay low-cardinality:
// sandbox (container ID), rule name, mode, verdict, reason, result.
type metrics struct {
	reg         *prometheus.Registry
	sandboxes   prometheus.Gauge
	flows       *prometheus.CounterVec
	activeFlows *prometheus.GaugeVec
	bytes       *prometheus.CounterVec
	denyEvents  *prometheus.CounterVec
	repairs     *prometheus.CounterVec

	// flowSets caches the children of each (sandbox, rule, mode) label
	// set (flowKey -> *flowMetrics), so that a flow hashes no labels. An
	// entry lives as long as the series it points to: the vecs never
	// delete a series today; whatever starts deleting a sandbox's series
	// must drop its entries here too.
	flowSets sync.Map
	refusals sync.Map // refusalKey -> prometheus.Counter
}

type flowKey struct{ sandbox, rule, mode string }

// flowResult is how a proxied flow ended (the result label).
type flowResult int

const (
	resultClosed flowResult = iota
	resultBudgetExceeded
	resultIdle
	resultPolicyClosed
	resultError
	numFlowResults
)

var flowResultNames = [numFlowResults]string{"closed", "budget-exceeded", "idle", "policy-closed", "error"}

func (r flowResult) String() string { return flowResultNames[r] }

// flowMetrics are the series of one label set that every flow updates.
type flowMetrics struct {
	m                 *metrics
	key               flowKey
	accepted          prometheus.Counter
	active            prometheus.Gauge
	bytesOut, bytesIn prometheus.Counter
	// results are created on first use, so that only results that
	// happened are exported (as without the cache).
	results [numFlowResults]atomic.Pointer[prometheus.Counter]
}

// flowSet returns the cached series of a flow's labels.
func (m *metrics) flowSet(sb *sandbox, rule *policy.Rule) *flowMetrics {
	k := flowKeyOf(sb, rule)
	if fm, ok := m.flowSets.Load(k); ok {
		return fm.(*flowMetrics)
	}
	fm := &flowMetrics{m: m, key: k,
		accepted: m.flows.WithLabelValues(k.sandbox, k.rule, k.mode, "accepted"),
		active:   m.activeFlows.WithLabelValues(k.sandbox, k.rule, k.mode),
		bytesOut: m.bytes.WithLabelValues(k.sandbox, k.rule, k.mode, "out"),
		bytesIn:  m.bytes.WithLabelValues(k.sandbox, k.rule, k.mode, "in"),
	}
	got, _ := m.flowSets.LoadOrStore(k, fm)
	return got.(*flowMetrics)
}

// refusalKey is a refused flow's label set.
type refusalKey struct {
	flowKey
	reason string
}

// refusal returns the counter of refusals of this label set, cached like
// flowSet's: a sandbox can make refusals as fast as it sends packets.
func (m *metrics) refusal(sb *sandbox, rule *policy.Rule, reason string) prometheus.Counter {
	k := refusalKey{flowKeyOf(sb, rule), reason}
	if c, ok := m.refusals.Load(k); ok {
		return c.(prometheus.Counter)
	}
	c := m.flows.WithLabelValues(k.sandbox, k.rule, k.mode, reason)
	got, _ := m.refusals.LoadOrStore(k, c)
	return got.(prometheus.Counter)
}

// ended counts a flow's result.
func (fm *flowMetrics) ended(r flowResult) {
	c := fm.results[r].Load()
	if c == nil {
		nc := fm.m.flows.WithLabelValues(fm.key.sandbox, fm.key.rule, fm.key.mode, r.String())
		fm.results[r].CompareAndSwap(nil, &nc)
		c = fm.results[r].Load()
	}
	(*c).Inc()
}

func newMetrics(d *Daemon) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		sandboxes: prometheus.NewGauge(prometheus.GaugeOpts{
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
		denyEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_deny_events_total", Help: "Deny events read from the datapath ring buffer.",
		}, []string{"reason"}),
	}
	m.repairs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cleanwall_repairs_total",
		Help: "What the watchdog found missing and put back (attachment, bridge-attachment, wall, node-wall, port-isolation, map-pin).",
	}, []string{"what"})
	m.reg.MustRegister(m.sandboxes, m.flows, m.activeFlows, m.bytes, m.denyEvents, m.repairs,
		&datapathCollector{d: d},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func flowKeyOf(sb *sandbox, rule *policy.Rule) flowKey {
	k := flowKey{"unknown", "none", "none"}
	if sb != nil {
		k.sandbox = sb.rec.ContainerID
	}
	if rule != nil {
		k.rule, k.mode = rule.Name, rule.Mode.String()
	}
	return k
}

// datapathCollector reads the per-CPU BPF counters at scrape time.
type datapathCollector struct{ d *Daemon }

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
	ch <- descPackets
	ch <- descBytes
	ch <- descFlows
	ch <- descRules
	ch <- descRuleCapacity
	ch <- descWallDrops
	ch <- descWallUnassigned
}

func (c *datapathCollector) Collect(ch chan<- prometheus.Metric) {
	d := c.d
	if d.dp == nil {
		return
	}
	type owner struct {
		name     string
		compiled *policy.Compiled
	}
	owners := map[uint32]owner{}
	d.mu.RLock()
	for _, s := range d.sandboxes {
		s.mu.Lock()
		owners[s.rec.DatapathID] = owner{s.rec.ContainerID, s.compiled}
		ch <- prometheus.MustNewConstMetric(descRules, prometheus.GaugeValue, float64(len(s.entries)), s.rec.ContainerID)
		s.mu.Unlock()
	}
	d.mu.RUnlock()
	ch <- prometheus.MustNewConstMetric(descRuleCapacity, prometheus.GaugeValue, float64(d.dp.RuleCapacity()))
	if wc, err := d.wall.counts(); err == nil {
		for id, n := range wc.sandboxes {
			name := fmt.Sprintf("datapath-%d", id)
			if o, ok := owners[id]; ok {
				name = o.name
			}
			ch <- prometheus.MustNewConstMetric(descWallDrops, prometheus.CounterValue, float64(n), name)
		}
		ch <- prometheus.MustNewConstMetric(descWallUnassigned, prometheus.CounterValue, float64(wc.unassigned))
	}
	counters, err := d.dp.Counters()
	if err != nil {
		return
	}
	for k, v := range counters {
		o, ok := owners[k.SandboxID]
		name, rule := o.name, ""
		if !ok {
			name = "unknown"
			if k.SandboxID != 0 {
				name = fmt.Sprintf("datapath-%d", k.SandboxID)
			}
		} else if r := o.compiled.Rule(k.RuleID); r != nil {
			rule = r.Name
		}
		labels := []string{name, rule, k.Verdict.String(), k.Reason.String()}
		ch <- prometheus.MustNewConstMetric(descPackets, prometheus.CounterValue, float64(v.Packets), labels...)
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(v.Bytes), labels...)
		ch <- prometheus.MustNewConstMetric(descFlows, prometheus.CounterValue, float64(v.Flows), labels...)
	}
}
