package httpproxy

import (
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"
)

// Reason is the stable code of a refusal. It is sent to the sandbox in the
// Cleanwall-Reason response header, passed to OnDeny and used as the reason
// metric label, so the set is closed and small.
type Reason string

// Refusals decided by the egress rule (policy).
const (
	ReasonMethod          Reason = "method"           // no rule allows the method
	ReasonPath            Reason = "path"             // no rule allows the method and path
	ReasonContentType     Reason = "content-type"     // no rule allows the body's media type
	ReasonContentEncoding Reason = "content-encoding" // a Content-Encoding the proxy cannot decode, while patterns apply
	ReasonCharset         Reason = "charset"          // a charset the proxy cannot decode, while patterns apply
	ReasonUndecodableBody Reason = "undecodable-body" // a body that is not what its Content-Encoding says, while patterns apply
	ReasonBodyTooLarge    Reason = "body-too-large"   // body above maxBodyBytes
	ReasonBodyPattern     Reason = "body-pattern"     // the decoded body matches a denyBodyPatterns or denyPatterns entry
	ReasonPathPattern     Reason = "path-pattern"     // the path matches a denyPatterns entry
	ReasonQueryPattern    Reason = "query-pattern"    // the query matches a denyPatterns entry
	ReasonHeaderPattern   Reason = "header-pattern"   // a header field's name or value matches a denyPatterns entry
	ReasonUpgrade         Reason = "upgrade"          // Upgrade to a protocol not in AllowUpgrade
	ReasonConnect         Reason = "connect"          // CONNECT tunnels are never inspected, so never allowed
	ReasonHostMismatch    Reason = "host-mismatch"    // Host (or absolute-form authority) does not name the flow's destination
	ReasonExpect          Reason = "expect"           // Expect other than 100-continue
)

// Refusals of requests that are malformed, ambiguous or beyond the proxy's
// limits: whatever the rule says, these never reach an upstream.
const (
	ReasonBadRequestLine      Reason = "bad-request-line"
	ReasonHTTPVersion         Reason = "http-version" // HTTP/0.9, HTTP/2 preface, anything but 1.0 and 1.1
	ReasonBadTarget           Reason = "bad-target"   // request-target syntax, fragment, backslash, userinfo, scheme
	ReasonBadPath             Reason = "bad-path"     // path not in normal form: dot segments, empty segments, risky escapes
	ReasonBadHeader           Reason = "bad-header"   // field syntax: bytes, whitespace before colon, obs-fold, duplicates
	ReasonBareLF              Reason = "bare-lf"      // a line not ended by CRLF, or a lone CR
	ReasonBadHost             Reason = "bad-host"     // Host missing, repeated, empty or malformed
	ReasonBadContentLength    Reason = "bad-content-length"
	ReasonCLAndTE             Reason = "content-length-and-transfer-encoding"
	ReasonBadTransferEncoding Reason = "bad-transfer-encoding" // repeated, or in an HTTP/1.0 request
	ReasonTransferEncoding    Reason = "transfer-encoding"     // anything but exactly "chunked"
	ReasonBadChunk            Reason = "bad-chunk"             // chunk size, extension or delimiter
	ReasonTrailer             Reason = "trailer"               // trailer fields would bypass inspection
	ReasonHeaderTooLarge      Reason = "header-too-large"
	ReasonTooManyHeaders      Reason = "too-many-headers"
	ReasonHoldLimit           Reason = "body-over-hold-limit"         // body must be held for inspection but exceeds Limits.MaxHeldBodyBytes
	ReasonDecodedHoldLimit    Reason = "decoded-body-over-hold-limit" // the body decompresses to more than Limits.MaxHeldBodyBytes (a zip bomb)
	ReasonProxyBusy           Reason = "proxy-busy"                   // Limits.MaxHeldTotalBytes exhausted
)

// Failures that are not decisions about the request.
const (
	ReasonTimeout             Reason = "timeout"
	ReasonClientGone          Reason = "client-gone" // the sandbox closed mid-exchange (nothing is sent)
	ReasonUpstreamUnreachable Reason = "upstream-unreachable"
	ReasonUpstreamTimeout     Reason = "upstream-timeout"
	ReasonBadUpstreamResponse Reason = "bad-upstream-response"
)

// Decision label values.
const (
	decisionAllow = "allow"
	decisionDeny  = "deny"
	decisionError = "error"
)

// reasonNone is the reason label of allowed requests.
const reasonNone = "none"

type reasonInfo struct {
	status int
	// keepable: the refusal says nothing about the framing of the stream, so
	// the connection may carry further requests (if the refused request's body
	// was consumed or absent).
	keepable bool
	// failure: not a decision about the request (decision="error", no OnDeny).
	failure bool
}

// reasons is the status table; doc.go shows it to users.
var reasons = map[Reason]reasonInfo{
	ReasonMethod:          {status: http.StatusForbidden, keepable: true},
	ReasonPath:            {status: http.StatusForbidden, keepable: true},
	ReasonContentType:     {status: http.StatusForbidden, keepable: true},
	ReasonContentEncoding: {status: http.StatusForbidden, keepable: true},
	ReasonCharset:         {status: http.StatusForbidden, keepable: true},
	ReasonUndecodableBody: {status: http.StatusForbidden, keepable: true},
	ReasonBodyTooLarge:    {status: http.StatusForbidden, keepable: true},
	ReasonBodyPattern:     {status: http.StatusForbidden, keepable: true},
	ReasonPathPattern:     {status: http.StatusForbidden, keepable: true},
	ReasonQueryPattern:    {status: http.StatusForbidden, keepable: true},
	ReasonHeaderPattern:   {status: http.StatusForbidden, keepable: true},
	ReasonUpgrade:         {status: http.StatusForbidden, keepable: true},
	ReasonConnect:         {status: http.StatusForbidden},
	ReasonHostMismatch:    {status: http.StatusMisdirectedRequest, keepable: true},
	ReasonExpect:          {status: http.StatusExpectationFailed, keepable: true},

	ReasonBadRequestLine:      {status: http.StatusBadRequest},
	ReasonHTTPVersion:         {status: http.StatusHTTPVersionNotSupported},
	ReasonBadTarget:           {status: http.StatusBadRequest},
	ReasonBadPath:             {status: http.StatusBadRequest},
	ReasonBadHeader:           {status: http.StatusBadRequest},
	ReasonBareLF:              {status: http.StatusBadRequest},
	ReasonBadHost:             {status: http.StatusBadRequest},
	ReasonBadContentLength:    {status: http.StatusBadRequest},
	ReasonCLAndTE:             {status: http.StatusBadRequest},
	ReasonBadTransferEncoding: {status: http.StatusBadRequest},
	ReasonTransferEncoding:    {status: http.StatusNotImplemented},
	ReasonBadChunk:            {status: http.StatusBadRequest},
	ReasonTrailer:             {status: http.StatusBadRequest},
	ReasonHeaderTooLarge:      {status: http.StatusRequestHeaderFieldsTooLarge},
	ReasonTooManyHeaders:      {status: http.StatusRequestHeaderFieldsTooLarge},
	ReasonHoldLimit:           {status: http.StatusRequestEntityTooLarge},
	ReasonDecodedHoldLimit:    {status: http.StatusRequestEntityTooLarge},
	ReasonProxyBusy:           {status: http.StatusServiceUnavailable, failure: true},

	ReasonTimeout:             {status: http.StatusRequestTimeout, failure: true},
	ReasonClientGone:          {status: http.StatusBadRequest, failure: true},
	ReasonUpstreamUnreachable: {status: http.StatusBadGateway, failure: true},
	ReasonUpstreamTimeout:     {status: http.StatusGatewayTimeout, failure: true},
	ReasonBadUpstreamResponse: {status: http.StatusBadGateway, failure: true},
}

// Status is the HTTP status the sandbox receives for r.
func (r Reason) Status() int { return reasons[r].status }

// Denial describes one refused request, for the audit trail.
type Denial struct {
	Reason Reason
	Status int
	// Method is the request method, truncated to maxDenialMethod bytes; empty
	// when the request line could not be parsed, or when a deny pattern
	// matches it.
	Method string
	// Path is the request target's path (never the query), as sent,
	// truncated to maxDenialPath bytes; empty when it could not be parsed,
	// and withheld (empty) when a deny pattern matches it: the audit trail
	// must not keep the data a pattern stops.
	Path string
}

const (
	maxDenialMethod = 32
	maxDenialPath   = 256
)

// refusal is the error that carries a Reason through the parser and the
// checks; detail is for the log only, never sent to the sandbox.
type refusal struct {
	reason Reason
	detail string
}

func (e *refusal) Error() string { return fmt.Sprintf("refused (%s): %s", e.reason, e.detail) }

// refuse makes a refusal. The detail keeps the format's own words and its
// numbers (limits, counts, pattern indexes); every other argument (a field
// name or value, a token, a byte, an error that may quote them) is what
// the sandbox sent, and the detail says "(withheld)" in its place: logs,
// flow errors and metrics never carry request bytes (docs/telemetry.md).
func refuse(r Reason, format string, args ...any) *refusal {
	for i, a := range args {
		switch a.(type) {
		case int, int64, uint64, time.Duration:
		default:
			args[i] = withheld{}
		}
	}
	return &refusal{reason: r, detail: fmt.Sprintf(format, args...)}
}

// withheld stands for a sandbox-controlled argument of a refusal's detail,
// whatever the verb.
type withheld struct{}

func (withheld) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, "(withheld)") }

// SafeMethod is m when it is a method a policy can name (or another
// standard one), else "other": a method is a token the sandbox chooses, and
// an unknown one could carry its data into a log or an audit record.
func SafeMethod(m string) string {
	switch m {
	case "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE", "":
		return m
	}
	return "other"
}

// appendRefusal appends the response sent for a refusal: the status, the
// reason header, and a short plain-text body (omitted for HEAD).
func appendRefusal(b []byte, r Reason, head, keepAlive bool) []byte {
	status := r.Status()
	body := "cleanwall refused this request: " + string(r) + "\n"
	b = append(b, "HTTP/1.1 "...)
	b = strconv.AppendInt(b, int64(status), 10)
	b = append(b, ' ')
	b = append(b, http.StatusText(status)...)
	b = append(b, "\r\nCleanwall-Reason: "...)
	b = append(b, r...)
	b = append(b, "\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: "...)
	b = strconv.AppendInt(b, int64(len(body)), 10)
	if !keepAlive {
		b = append(b, "\r\nConnection: close"...)
	}
	b = append(b, "\r\n\r\n"...)
	if !head {
		b = append(b, body...)
	}
	return b
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}
