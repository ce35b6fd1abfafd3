package postgres

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the proxy's Prometheus metrics. Labels are the rule, the
// listed query's name ("builtin" for transaction control, SET and SHOW;
// "-" for a statement that matched none), the decision and the reason:
// all bounded by the policy. A nil *Metrics records nothing.
type Metrics struct {
	statements *prometheus.CounterVec
	rows       *prometheus.CounterVec
	withheld   *prometheus.CounterVec
	bytes      *prometheus.CounterVec
}

// NewMetrics creates the proxy's metrics and registers them with reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		statements: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_postgres_statements_total",
			Help: "Statements from sandboxes by rule, query name, decision (allowed, refused, upstream_error) and refusal reason.",
		}, []string{"rule", "query", "decision", "reason"}),
		rows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_postgres_rows_returned_total",
			Help: "Result rows returned to sandboxes.",
		}, []string{"rule", "query"}),
		withheld: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_postgres_rows_withheld_total",
			Help: "Result rows withheld by rows.minCount.",
		}, []string{"rule", "query"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_postgres_bytes_returned_total",
			Help: "Bytes the proxy sent to sandboxes (protocol messages, results included).",
		}, []string{"rule"}),
	}
	for _, c := range []prometheus.Collector{m.statements, m.rows, m.withheld, m.bytes} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering postgres proxy metrics: %w", err)
		}
	}
	return m, nil
}

// statement counts one statement; reason "" means allowed,
// "upstream-error" that the server failed it.
func (m *Metrics) statement(rule, query, reason string) {
	if m == nil {
		return
	}
	decision := "refused"
	switch reason {
	case "":
		decision = "allowed"
	case "upstream-error":
		decision, reason = "upstream_error", ""
	}
	m.statements.WithLabelValues(rule, query, decision, reason).Inc()
}

func (m *Metrics) rowsOut(rule, query string, rows, withheld int64) {
	if m == nil {
		return
	}
	m.rows.WithLabelValues(rule, query).Add(float64(rows))
	if withheld > 0 {
		m.withheld.WithLabelValues(rule, query).Add(float64(withheld))
	}
}

func (m *Metrics) bytesOut(rule string, n int64) {
	if m == nil || n <= 0 {
		return
	}
	m.bytes.WithLabelValues(rule).Add(float64(n))
}
