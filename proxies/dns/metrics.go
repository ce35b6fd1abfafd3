package dnsproxy

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the proxy's Prometheus metrics. Labels are the sandbox id, the
// decision, the deny reason and the upstream transport: all bounded sets.
// A nil *Metrics records nothing.
type Metrics struct {
	queries  *prometheus.CounterVec
	denies   *prometheus.CounterVec
	learnt   *prometheus.CounterVec
	upstream *prometheus.HistogramVec
	entries  prometheus.Gauge
}

// NewMetrics creates the proxy's metrics and registers them with reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		queries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_dns_queries_total",
			Help: "DNS queries from sandboxes by decision (forwarded, cached, refused, rate_limited, malformed, upstream_error).",
		}, []string{"sandbox", "decision"}),
		denies: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_dns_denies_total",
			Help: "DNS queries answered without forwarding, or dropped, by reason.",
		}, []string{"sandbox", "reason"}),
		learnt: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_dns_learned_total",
			Help: "Name-to-addresses reports for fqdn egress rules.",
		}, []string{"sandbox"}),
		upstream: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "cleanwall_dns_upstream_duration_seconds",
			Help:    "Duration of exchanges with upstream resolvers, failed ones included.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"transport"}),
		entries: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cleanwall_dns_cache_entries",
			Help: "Upstream answers held in the DNS cache.",
		}),
	}
	for _, c := range []prometheus.Collector{m.queries, m.denies, m.learnt, m.upstream, m.entries} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering dns proxy metrics: %w", err)
		}
	}
	return m, nil
}

// sandboxCounters are one sandbox's query counters, looked up once so that
// the hot path does not hash label values.
type sandboxCounters map[Decision]prometheus.Counter

var allDecisions = []Decision{DecisionForwarded, DecisionCached, DecisionRefused,
	DecisionRateLimited, DecisionMalformed, DecisionUpstreamError}

func (m *Metrics) countersFor(sandbox string) sandboxCounters {
	if m == nil {
		return nil
	}
	c := make(sandboxCounters, len(allDecisions))
	for _, d := range allDecisions {
		c[d] = m.queries.WithLabelValues(sandbox, string(d))
	}
	return c
}

func (m *Metrics) query(c sandboxCounters, sandbox string, d Decision) {
	if m == nil {
		return
	}
	if c != nil {
		c[d].Inc()
		return
	}
	m.queries.WithLabelValues(sandbox, string(d)).Inc()
}

func (m *Metrics) deny(sandbox string, r Reason) {
	if m != nil {
		m.denies.WithLabelValues(sandbox, string(r)).Inc()
	}
}

func (m *Metrics) learn(sandbox string) {
	if m != nil {
		m.learnt.WithLabelValues(sandbox).Inc()
	}
}

func (m *Metrics) observeUpstream(tcp bool, seconds float64) {
	if m == nil {
		return
	}
	t := "udp"
	if tcp {
		t = "tcp"
	}
	m.upstream.WithLabelValues(t).Observe(seconds)
}

func (m *Metrics) cacheSize(n int) {
	if m != nil {
		m.entries.Set(float64(n))
	}
}

// forget drops a removed sandbox's series, keeping label cardinality bounded
// by the live sandboxes.
func (m *Metrics) forget(sandbox string) {
	if m == nil {
		return
	}
	l := prometheus.Labels{"sandbox": sandbox}
	m.queries.DeletePartialMatch(l)
	m.denies.DeletePartialMatch(l)
	m.learnt.DeletePartialMatch(l)
}
