package daemon

import (
	"fmt"

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
	m.reg.MustRegister(m.sandboxes, m.flows, m.activeFlows, m.bytes, m.denyEvents,
		&datapathCollector{d: d},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) flowLabels(sb *sandbox, rule *policy.Rule) []string {
	s, r, mode := "unknown", "none", "none"
	if sb != nil {
		s = sb.rec.ContainerID
	}
	if rule != nil {
		r, mode = rule.Name, rule.Mode.String()
	}
	return []string{s, r, mode}
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
)

func (c *datapathCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descPackets
	ch <- descBytes
	ch <- descFlows
	ch <- descRules
	ch <- descRuleCapacity
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
