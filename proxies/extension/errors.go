package extension

import (
	"errors"
	"fmt"
)

// Reasons a flow is refused, for Denial.Reason and FlowError.Reason.
const (
	// ReasonUnavailable: the extension did not take the flow (not
	// listening, no answer in time, a protocol violation, over its flows
	// limit, its connection lost before it answered, the proxy closed).
	ReasonUnavailable = "extension-unavailable"
	// ReasonRefusedPrefix is followed by the extension's own reason (a
	// token: 1-64 bytes of a-z, 0-9, '.', '_', '-').
	ReasonRefusedPrefix = "extension-refused:"
)

// ErrUnavailable is wrapped by every error that means the extension did
// not (or no longer) serve a flow; the ones below say which case it was.
var ErrUnavailable = errors.New("extension unavailable")

var (
	// ErrNotListening: nothing accepted a connection at the extension's
	// path (or the proxy is backing off after that happened).
	ErrNotListening = fmt.Errorf("%w: not listening", ErrUnavailable)
	// ErrTimeout: no answer (hello, or the flow's accept or refuse) within
	// AnswerTimeout.
	ErrTimeout = fmt.Errorf("%w: no answer in time", ErrUnavailable)
	// ErrProtocol: the extension broke the wire protocol; the proxy
	// dropped its control connection.
	ErrProtocol = fmt.Errorf("%w: protocol violation", ErrUnavailable)
	// ErrBusy: MaxFlows flows of this extension are in flight.
	ErrBusy = fmt.Errorf("%w: too many flows in flight", ErrUnavailable)
	// ErrLost: the control connection ended (the extension exited, or a
	// close message could not be delivered).
	ErrLost = fmt.Errorf("%w: control connection lost", ErrUnavailable)
	// ErrClosed: the proxy was closed.
	ErrClosed = fmt.Errorf("%w: proxy closed", ErrUnavailable)
)

// ErrRefused is wrapped by the error of a flow the extension refused.
var ErrRefused = errors.New("extension refused the flow")

// FlowError is Result.Err of a flow the extension did not take: the
// connection was reset, and Reason says why in the words of the flows
// metric and the audit record.
type FlowError struct {
	// Reason is ReasonUnavailable, or ReasonRefusedPrefix followed by the
	// extension's reason.
	Reason string
	// Err wraps one of the errors above.
	Err error
}

func (e *FlowError) Error() string { return e.Reason + ": " + e.Err.Error() }
func (e *FlowError) Unwrap() error { return e.Err }

// causes are the Denial.Detail of each kind of unavailability: a bounded
// token, never the underlying error's text.
var causes = []struct {
	err   error
	token string
}{
	{ErrNotListening, "not-listening"},
	{ErrTimeout, "timeout"},
	{ErrProtocol, "protocol"},
	{ErrBusy, "busy"},
	{ErrLost, "connection-lost"},
	{ErrClosed, "proxy-closed"},
}

// causeToken names err's case for Denial.Detail.
func causeToken(err error) string {
	for _, c := range causes {
		if errors.Is(err, c.err) {
			return c.token
		}
	}
	return "error"
}

// RefusalReason makes a FlowError a proxies.Refused: the firewall counts
// the flow under Reason.
func (e *FlowError) RefusalReason() string { return e.Reason }
