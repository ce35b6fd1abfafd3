package metrics

import "github.com/prometheus/client_golang/prometheus"

// Consent are the consent metrics (runtime/daemon/consent.go): every
// decision, cached or fresh, and the causes of the denies the service did
// not give itself.
type Consent struct {
	decisions *prometheus.CounterVec
	failures  *prometheus.CounterVec
}

// NewConsent registers the consent metrics in reg.
func NewConsent(reg prometheus.Registerer) (*Consent, error) {
	c := &Consent{
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_consent_decisions_total",
			Help: "Consent decisions by kind (execute, egress), decision (allow, deny) and source (fresh: the service was asked; cached).",
		}, []string{"kind", "decision", "source"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cleanwall_consent_failures_total",
			Help: "Fresh consent decisions that are denies because the service failed, by cause (unreachable, timeout, tls, status, malformed).",
		}, []string{"cause"}),
	}
	for _, col := range []prometheus.Collector{c.decisions, c.failures} {
		if err := reg.Register(col); err != nil {
			return nil, err
		}
	}
	// Every series exists from the start at 0: increase() and rate() (and
	// so the alerts of deploy/prometheus) see a series' first count only
	// after a sample before it.
	for _, kind := range []string{"execute", "egress"} {
		for _, decision := range []string{"allow", "deny"} {
			for _, source := range []string{"fresh", "cached"} {
				c.decisions.WithLabelValues(kind, decision, source)
			}
		}
	}
	for _, cause := range []string{"unreachable", "timeout", "tls", "status", "malformed"} {
		c.failures.WithLabelValues(cause)
	}
	return c, nil
}

// Decision counts one decision.
func (c *Consent) Decision(kind, decision, source string) {
	if c != nil {
		c.decisions.WithLabelValues(kind, decision, source).Inc()
	}
}

// Failure counts a deny that stands for a failure.
func (c *Consent) Failure(cause string) {
	if c != nil {
		c.failures.WithLabelValues(cause).Inc()
	}
}
