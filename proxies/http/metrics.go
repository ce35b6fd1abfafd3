package httpproxy

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the proxy's Prometheus series. Labels are bounded: sandbox id,
// egress rule name, decision (allow, deny, error) and reason (a Reason, or
// "none" for allowed requests); never paths, hosts or payload.
type Metrics struct {
	requests *prometheus.CounterVec
	bytesOut *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

// NewMetrics creates the metrics and registers them with reg (nil: not
// registered).
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_http_requests_total",
			Help: "HTTP requests from sandboxes in open mode, by decision and reason.",
		}, []string{"sandbox", "rule", "decision", "reason"}),
		bytesOut: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_http_request_bytes_out_total",
			Help: "Request bytes (heads and bodies, and upgraded streams) forwarded to upstreams.",
		}, []string{"sandbox", "rule"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "cleanwall_http_request_duration_seconds",
			Help: "From a request head read to its response relayed or its refusal sent.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5,
				1, 2.5, 5, 10, 30, 60},
		}, []string{"sandbox", "rule", "decision"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.requests, m.bytesOut, m.duration} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("registering http proxy metrics: %w", err)
			}
		}
	}
	return m, nil
}

// DeleteSandbox drops every series of a sandbox that is gone.
func (m *Metrics) DeleteSandbox(sandbox string) {
	l := prometheus.Labels{"sandbox": sandbox}
	m.requests.DeletePartialMatch(l)
	m.bytesOut.DeletePartialMatch(l)
	m.duration.DeletePartialMatch(l)
}

// flowMetrics is one connection's view of Metrics; the zero value (no
// Metrics) records nothing.
type flowMetrics struct {
	m             *Metrics
	sandbox, rule string
	bytesOut      prometheus.Counter
	// allowed and allowedDuration are the series of allowed requests,
	// looked up at the first one: most requests of a connection are.
	allowed         prometheus.Counter
	allowedDuration prometheus.Observer
}

func newFlowMetrics(m *Metrics, f Flow) flowMetrics {
	if m == nil {
		return flowMetrics{}
	}
	return flowMetrics{m: m, sandbox: f.Sandbox, rule: f.Rule, bytesOut: m.bytesOut.WithLabelValues(f.Sandbox, f.Rule)}
}

func (fm *flowMetrics) request(decision, reason string, d time.Duration) {
	if fm.m == nil {
		return
	}
	if decision == decisionAllow && reason == reasonNone {
		if fm.allowed == nil {
			fm.allowed = fm.m.requests.WithLabelValues(fm.sandbox, fm.rule, decision, reason)
			fm.allowedDuration = fm.m.duration.WithLabelValues(fm.sandbox, fm.rule, decision)
		}
		fm.allowed.Inc()
		fm.allowedDuration.Observe(d.Seconds())
		return
	}
	fm.m.requests.WithLabelValues(fm.sandbox, fm.rule, decision, reason).Inc()
	fm.m.duration.WithLabelValues(fm.sandbox, fm.rule, decision).Observe(d.Seconds())
}

func (fm *flowMetrics) sent(n int64) {
	if fm.m != nil && n > 0 {
		fm.bytesOut.Add(float64(n))
	}
}
