package dispatch

import (
	"context"
	"net/netip"
)

// RefuseConsent refuses a flow of a sandbox whose policy needs consent
// (spec.governance.consent: required) when the consent service denied the
// sandbox (execute) or the flow's rule (egress), or did not answer.
const RefuseConsent Refusal = "consent-denied"

// RefuseConsentPending drops a UDP flow's first datagram while its first
// consent answer is asked for: the datagram path never waits (the sender
// retries; the answer is cached by then).
const RefuseConsentPending Refusal = "consent-pending"

// Consent is asked about each decided flow of a sandbox. The flow is
// registered with its sandbox before it is asked, so a deny that arrives
// while it waits closes it like the sandbox's other flows.
type Consent interface {
	// Admit reports whether the flow may run; it may wait for a first
	// answer, at most the consent timeout (TCP: on the flow's own
	// goroutine). ctx is the flow's: a revocation ends the wait.
	Admit(ctx context.Context, dec *Decision, dst netip.AddrPort) bool
	// Cached answers without waiting: known false while the first answer
	// is asked for in the background.
	Cached(dec *Decision, dst netip.AddrPort) (allow, known bool)
}

// consentAdmits asks Consent about a registered TCP flow.
func (d *Dispatcher) consentAdmits(ctx context.Context, dec *Decision, dst netip.AddrPort) bool {
	return d.Consent == nil || d.Consent.Admit(ctx, dec, dst)
}

// consentRefusal asks Consent about a UDP flow without waiting: "" lets
// it run.
func (d *Dispatcher) consentRefusal(dec *Decision, dst netip.AddrPort) Refusal {
	if d.Consent == nil {
		return ""
	}
	switch allow, known := d.Consent.Cached(dec, dst); {
	case !known:
		return RefuseConsentPending
	case !allow:
		return RefuseConsent
	}
	return ""
}
