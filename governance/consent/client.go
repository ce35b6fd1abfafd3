// Package consent is the daemon's side of the consent protocol
// (shared/GOVERNANCE.md, docs/consent.md): a Client that asks a
// customer-run consent service over HTTPS whether a sandbox may run
// (kind execute) or a rule's data may leave it (kind egress), and a Cache
// of its answers that asks each question once (concurrent first askers
// share one call), re-asks in the background before an answer expires,
// and tells its owner when an answer turns to deny.
//
// Fail closed: anything but a 200 with a well-formed body is a deny, and
// the Decision says which failure it was (Cause).
package consent

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"
)

// Kind is what consent is asked for.
type Kind string

const (
	KindExecute Kind = "execute" // may the sandbox run
	KindEgress  Kind = "egress"  // may a rule's flows leave the sandbox
)

// Protocol bounds.
const (
	DefaultTimeout = 2 * time.Second
	DefaultTTL     = 30 * time.Second // an allow or deny without ttlSeconds
	MaxTTL         = time.Hour        // longer answers are cached this long
	MinTTL         = time.Second      // shorter answers (ttlSeconds 0) too
	// DefaultFailureTTL is how long a deny that no service gave (the
	// service unreachable, slow, broken) stands before it is asked again.
	DefaultFailureTTL = 5 * time.Second
	// maxBody bounds a response body.
	maxBody = 64 << 10
	// Path is the protocol's endpoint, appended to the configured URL.
	Path = "/v1/consent"
)

// Causes of a deny the service did not give.
const (
	CauseUnreachable = "unreachable" // no connection (refused, no route, DNS)
	CauseTimeout     = "timeout"     // no answer within the timeout
	CauseTLS         = "tls"         // the handshake failed (unknown CA, wrong name, ...)
	CauseStatus      = "status"      // an answer other than 200
	CauseMalformed   = "malformed"   // a 200 whose body is not a decision
)

// Request is the body of a consent request (shared/GOVERNANCE.md).
type Request struct {
	Kind         Kind   `json:"kind"`
	Sandbox      string `json:"sandbox"`
	Policy       string `json:"policy"`
	PolicySHA256 string `json:"policySHA256"`
	Rule         string `json:"rule,omitempty"`        // egress only
	Destination  string `json:"destination,omitempty"` // egress only: ip:port of the first flow
	Node         string `json:"node"`
}

// Decision is an answer: the service's, or a deny standing for a failure.
type Decision struct {
	Allow bool
	// TTL is how long the answer may be cached (clamped to [MinTTL, MaxTTL]).
	TTL time.Duration
	// Reason is the service's reason, or what failed.
	Reason string
	// Cause is empty for the service's own answer, else one of the Cause
	// constants (the decision is then a deny).
	Cause string
	// At is when the answer arrived.
	At time.Time
}

// String is "allow", "deny" (the service's) or "deny (cause)".
func (d Decision) String() string {
	switch {
	case d.Allow:
		return "allow"
	case d.Cause != "":
		return "deny (" + d.Cause + ")"
	}
	return "deny"
}

// Word is "allow" or "deny" (a metric label).
func (d Decision) Word() string {
	if d.Allow {
		return "allow"
	}
	return "deny"
}

// Config configures a Client.
type Config struct {
	// URL is the service's base URL: https only.
	URL string
	// CAFile is a PEM file of the CAs the service's certificate chains to;
	// Roots, when set, is used instead. Neither: the system roots.
	CAFile string
	Roots  *x509.CertPool
	// Timeout bounds one request, connection and body included
	// (default DefaultTimeout).
	Timeout time.Duration
	// Node names this node in requests (default: the hostname).
	Node string
}

// Client asks the consent service.
type Client struct {
	url     string
	timeout time.Duration
	node    string
	http    *http.Client
}

// NewClient checks cfg and returns a client. Nothing is contacted.
func NewClient(cfg Config) (*Client, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("--consent-url %q: not an absolute URL", cfg.URL)
	}
	if u.Scheme != "https" {
		return nil, fmt.Errorf("--consent-url %q: must be https (consent answers are only trusted over TLS)", cfg.URL)
	}
	if u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return nil, fmt.Errorf("--consent-url %q: no query, fragment or user info", cfg.URL)
	}
	roots := cfg.Roots
	if roots == nil && cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("--consent-ca: %w", err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--consent-ca %s: no PEM certificate in it", cfg.CAFile)
		}
	}
	if cfg.Timeout < 0 {
		return nil, fmt.Errorf("--consent-timeout %v: must not be negative", cfg.Timeout)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Node == "" {
		if cfg.Node, err = os.Hostname(); err != nil {
			return nil, fmt.Errorf("consent: naming this node: %w", err)
		}
	}
	tr := &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
		DialContext:         (&net.Dialer{KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout: cfg.Timeout,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     90 * time.Second,
		ForceAttemptHTTP2:   true,
		Proxy:               nil, // the service is reached directly, never through an environment proxy
	}
	return &Client{
		url:     strings.TrimRight(u.String(), "/") + Path,
		timeout: cfg.Timeout,
		node:    cfg.Node,
		http: &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse // a redirect is an answer other than 200: deny
		}},
	}, nil
}

// Timeout is the bound of one request.
func (c *Client) Timeout() time.Duration { return c.timeout }

// Node is the node name the client sends.
func (c *Client) Node() string { return c.node }

// Ask asks once, within the timeout, and never fails: a failure is a deny
// naming its cause. req.Node is filled in when empty.
func (c *Client) Ask(ctx context.Context, req Request) Decision {
	if req.Node == "" {
		req.Node = c.node
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	body, err := json.Marshal(req)
	if err != nil {
		return failure(CauseMalformed, "encoding the request: "+err.Error())
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(body))
	if err != nil {
		return failure(CauseUnreachable, err.Error())
	}
	hr.Header.Set("Content-Type", "application/json")
	hr.Header.Set("Accept", "application/json")
	resp, err := c.http.Do(hr)
	if err != nil {
		return failure(classify(ctx, err), err.Error())
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxBody+1))
	if err != nil {
		return failure(classify(ctx, err), "reading the answer: "+err.Error())
	}
	if resp.StatusCode != http.StatusOK {
		return failure(CauseStatus, fmt.Sprintf("the consent service answered %s", resp.Status))
	}
	if len(data) > maxBody {
		return failure(CauseMalformed, fmt.Sprintf("the answer is over %d bytes", maxBody))
	}
	return parse(data)
}

// parse reads a 200's body: one JSON object whose keys are matched
// exactly (no key twice); unknown keys are allowed (the protocol may grow
// optional fields).
func parse(data []byte) Decision {
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return failure(CauseMalformed, "the answer is not a JSON object")
	}
	fields := map[string]json.RawMessage{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return failure(CauseMalformed, "the answer is not a JSON object: "+err.Error())
		}
		key, _ := tok.(string)
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return failure(CauseMalformed, "the answer is not a JSON object: "+err.Error())
		}
		if _, dup := fields[key]; dup {
			return failure(CauseMalformed, fmt.Sprintf("%.40q given twice in the answer", key))
		}
		fields[key] = raw
	}
	if _, err := dec.Token(); err != nil {
		return failure(CauseMalformed, "the answer is not a JSON object: "+err.Error())
	}
	if _, err := dec.Token(); err != io.EOF {
		return failure(CauseMalformed, "trailing data after the answer's JSON object")
	}
	var decision string
	if raw, ok := fields["decision"]; !ok || json.Unmarshal(raw, &decision) != nil {
		return failure(CauseMalformed, "the answer has no decision string")
	}
	d := Decision{TTL: DefaultTTL, At: time.Now()}
	switch decision {
	case "allow":
		d.Allow = true
	case "deny":
	default:
		return failure(CauseMalformed, fmt.Sprintf("unknown decision %.40q", decision))
	}
	if raw, ok := fields["ttlSeconds"]; ok && string(raw) != "null" {
		var n float64
		if err := json.Unmarshal(raw, &n); err != nil {
			return failure(CauseMalformed, "ttlSeconds is not a number")
		}
		if n < 0 {
			return failure(CauseMalformed, "ttlSeconds is negative")
		}
		d.TTL = ClampTTL(time.Duration(min(n, MaxTTL.Seconds()) * float64(time.Second)))
	}
	if raw, ok := fields["reason"]; ok && string(raw) != "null" {
		if err := json.Unmarshal(raw, &d.Reason); err != nil {
			return failure(CauseMalformed, "reason is not a string")
		}
	}
	return d
}

// ClampTTL bounds a TTL to [MinTTL, MaxTTL].
func ClampTTL(ttl time.Duration) time.Duration {
	return min(max(ttl, MinTTL), MaxTTL)
}

func failure(cause, reason string) Decision {
	return Decision{Cause: cause, Reason: reason, TTL: DefaultFailureTTL, At: time.Now()}
}

// classify names the cause of a transport error.
func classify(ctx context.Context, err error) string {
	var (
		unknownCA *x509.UnknownAuthorityError
		hostname  x509.HostnameError
		invalid   x509.CertificateInvalidError
		verify    *tls.CertificateVerificationError
		alert     tls.AlertError
		header    tls.RecordHeaderError
		netErr    net.Error
	)
	switch {
	case errors.As(err, &unknownCA), errors.As(err, &hostname), errors.As(err, &invalid),
		errors.As(err, &verify), errors.As(err, &alert), errors.As(err, &header):
		return CauseTLS
	case errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil:
		return CauseTimeout
	case errors.As(err, &netErr) && netErr.Timeout():
		return CauseTimeout
	case strings.Contains(err.Error(), "tls: "), strings.Contains(err.Error(), "HTTP response to HTTPS client"):
		return CauseTLS
	}
	return CauseUnreachable
}
