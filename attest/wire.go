package attest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"
)

// Code is a refusal code of the release protocol, sent as the "error" member
// of a refusal. A Code is an error so that callers can write
// errors.Is(err, attest.CodeNonceExpired).
type Code string

// The refusal codes of docs/keybroker.md §3. Each names one reason.
const (
	CodeBadRequest            Code = "bad-request"
	CodeUnknownKey            Code = "unknown-key"
	CodeNonceUnknown          Code = "nonce-unknown"
	CodeNonceExpired          Code = "nonce-expired"
	CodeNonceReplayed         Code = "nonce-replayed"
	CodeEvidenceMalformed     Code = "evidence-malformed"
	CodeSignatureInvalid      Code = "signature-invalid"
	CodeUntrustedRoot         Code = "untrusted-root"
	CodeSimulatedNotAllowed   Code = "simulated-not-allowed"
	CodeReportDataMismatch    Code = "report-data-mismatch"
	CodeMeasurementNotAllowed Code = "measurement-not-allowed"
	CodeHostDataMismatch      Code = "host-data-mismatch"
	CodeDebugNotAllowed       Code = "debug-not-allowed"
	CodeTCBTooLow             Code = "tcb-too-low"
	CodeFirmwareTooOld        Code = "firmware-too-old"
	CodeChipNotAllowed        Code = "chip-not-allowed"
	CodeVMPLNotAllowed        Code = "vmpl-not-allowed"
	CodePolicyNotSatisfied    Code = "policy-not-satisfied"
	// CodeEgressPolicyNotAllowed is the refusal of docs/keybroker.md §5: the key's
	// release policy lists egressPolicies and the request's policySHA256 is
	// missing or not one of them.
	CodeEgressPolicyNotAllowed Code = "egress-policy-not-allowed"
)

// Codes the broker sends with a 5xx status. They are not refusals of the
// protocol (docs/keybroker.md lists only 4xx refusals): the request may succeed
// when retried.
const (
	// CodeUnavailable (503): the broker's set of used sessions is full (it
	// refuses releases rather than forget a used session before it expires).
	CodeUnavailable Code = "unavailable"
	// CodeInternal (500): the broker failed, e.g. it could not write its audit log.
	CodeInternal Code = "internal"
)

// Codes lists every refusal code of the protocol: the 18 of §3, then the
// one of §5.
var Codes = []Code{
	CodeBadRequest, CodeUnknownKey, CodeNonceUnknown, CodeNonceExpired, CodeNonceReplayed,
	CodeEvidenceMalformed, CodeSignatureInvalid, CodeUntrustedRoot, CodeSimulatedNotAllowed,
	CodeReportDataMismatch, CodeMeasurementNotAllowed, CodeHostDataMismatch, CodeDebugNotAllowed,
	CodeTCBTooLow, CodeFirmwareTooOld, CodeChipNotAllowed, CodeVMPLNotAllowed, CodePolicyNotSatisfied,
	CodeEgressPolicyNotAllowed,
}

func (c Code) Error() string { return "key release refused: " + string(c) }

// HTTPStatus is the status the broker answers with for c.
func (c Code) HTTPStatus() int {
	switch c {
	case CodeBadRequest, CodeEvidenceMalformed:
		return http.StatusBadRequest
	case CodeUnknownKey:
		return http.StatusNotFound
	case CodeUnavailable:
		return http.StatusServiceUnavailable
	case CodeInternal:
		return http.StatusInternalServerError
	default:
		return http.StatusForbidden
	}
}

// Refusal is a refused challenge or release: a code and a human detail.
type Refusal struct {
	Code   Code
	Detail string
	// Status is the HTTP status the refusal came with (client side only).
	Status int
}

// Refuse returns a Refusal with a formatted detail.
func Refuse(code Code, format string, args ...any) *Refusal {
	return &Refusal{Code: code, Detail: fmt.Sprintf(format, args...)}
}

func (r *Refusal) Error() string {
	if r.Detail == "" {
		return r.Code.Error()
	}
	return r.Code.Error() + ": " + r.Detail
}

// Is makes errors.Is(err, code) true for a refusal with that code.
func (r *Refusal) Is(target error) bool {
	c, ok := target.(Code)
	return ok && c == r.Code
}

// ChallengeRequest is the body of POST /v1/challenge.
type ChallengeRequest struct {
	KeyID string `json:"keyID"`
}

// ChallengeResponse is the answer to a challenge.
type ChallengeResponse struct {
	Session   string    `json:"session"`
	Nonce     []byte    `json:"nonce"`
	ExpiresAt time.Time `json:"expiresAt"`
}

// ReleaseRequest is the body of POST /v1/release.
type ReleaseRequest struct {
	Session   string `json:"session"`
	KeyID     string `json:"keyID"`
	TEE       string `json:"tee"`
	Evidence  []byte `json:"evidence"`
	KEMID     uint16 `json:"kemID"`
	PublicKey []byte `json:"publicKey"`
	// PolicySHA256 is the hash of the egress policy the requesting sandbox
	// runs under (docs/keybroker.md §5), 64 hex characters; empty (the member
	// absent) when the request binds no policy.
	PolicySHA256 string `json:"policySHA256,omitempty"`
	// NodeKey is the Ed25519 public key that signs the requesting node's
	// audit checkpoints (docs/keybroker.md §7), 32 bytes; nil (the member
	// absent) when the request binds no node key.
	NodeKey []byte `json:"nodeKey,omitempty"`
}

// PolicyHash is the decoded PolicySHA256: nil when absent. The decoder has
// checked it; on an unchecked request a malformed hash is an error.
func (r *ReleaseRequest) PolicyHash() ([]byte, error) {
	if r.PolicySHA256 == "" {
		return nil, nil
	}
	return ParsePolicySHA256(r.PolicySHA256)
}

// ReportData is the REPORT_DATA this request's evidence must carry for a
// session with nonce: ReportDataBound over the request's KEM, public key,
// key id, policy hash and node key.
func (r *ReleaseRequest) ReportData(nonce []byte) ([64]byte, error) {
	policy, err := r.PolicyHash()
	if err != nil {
		return [64]byte{}, err
	}
	return ReportDataBound(nonce, r.KEMID, r.PublicKey, r.KeyID, policy, r.NodeKey), nil
}

// ReleaseResponse is the answer to a granted release.
type ReleaseResponse struct {
	KeyID    string    `json:"keyID"`
	Version  int       `json:"version"`
	Sealed   []byte    `json:"sealed"`
	NotAfter time.Time `json:"notAfter"`
}

// ErrorResponse is the body of a refusal.
type ErrorResponse struct {
	Error  Code   `json:"error"`
	Detail string `json:"detail"`
}

// Limits on request members, so a decoded request is bounded whatever the
// HTTP layer let through.
const (
	MaxRequestBytes   = 64 << 10
	MaxEvidenceBytes  = 32 << 10
	MaxPublicKeyBytes = 4 << 10
	MaxKeyIDBytes     = 256
	MaxSessionBytes   = 128
	maxTEEBytes       = 16
)

// DecodeChallengeRequest decodes a challenge body strictly: one JSON object,
// exactly the member names of the protocol (case-sensitive, no duplicates, no
// unknown members, no null), nothing after it. Errors are bad-request refusals.
func DecodeChallengeRequest(data []byte) (ChallengeRequest, error) {
	var req ChallengeRequest
	err := decodeStrict(data, []member{
		{name: "keyID", into: &req.KeyID},
	})
	if err != nil {
		return ChallengeRequest{}, err
	}
	if err := checkString("keyID", req.KeyID, MaxKeyIDBytes); err != nil {
		return ChallengeRequest{}, err
	}
	return req, nil
}

// DecodeReleaseRequest decodes a release body as strictly as
// DecodeChallengeRequest and checks member sizes, the KEM and the optional
// policySHA256 (64 hex characters when present; present but empty or
// malformed is a bad-request) and nodeKey (32 bytes when present). It does
// not parse the public key or the evidence.
func DecodeReleaseRequest(data []byte) (ReleaseRequest, error) {
	var req ReleaseRequest
	var policy *string
	var nodeKey *[]byte
	err := decodeStrict(data, []member{
		{name: "session", into: &req.Session},
		{name: "keyID", into: &req.KeyID},
		{name: "tee", into: &req.TEE},
		{name: "evidence", into: &req.Evidence},
		{name: "kemID", into: &req.KEMID},
		{name: "publicKey", into: &req.PublicKey},
		{name: "policySHA256", into: &policy, optional: true},
		{name: "nodeKey", into: &nodeKey, optional: true},
	})
	if err != nil {
		return ReleaseRequest{}, err
	}
	if policy != nil {
		if _, err := ParsePolicySHA256(*policy); err != nil {
			return ReleaseRequest{}, Refuse(CodeBadRequest, "policySHA256: %v (the hash `cleanwall policy hash` prints)", err)
		}
		req.PolicySHA256 = *policy
	}
	if nodeKey != nil {
		if len(*nodeKey) != NodeKeySize {
			return ReleaseRequest{}, Refuse(CodeBadRequest, "nodeKey: %d bytes, an Ed25519 public key has %d", len(*nodeKey), NodeKeySize)
		}
		req.NodeKey = *nodeKey
	}
	for _, c := range []struct {
		name  string
		value string
		max   int
	}{{"session", req.Session, MaxSessionBytes}, {"keyID", req.KeyID, MaxKeyIDBytes}, {"tee", req.TEE, maxTEEBytes}} {
		if err := checkString(c.name, c.value, c.max); err != nil {
			return ReleaseRequest{}, err
		}
	}
	switch {
	case len(req.Evidence) == 0:
		return ReleaseRequest{}, Refuse(CodeBadRequest, "evidence: empty")
	case len(req.Evidence) > MaxEvidenceBytes:
		return ReleaseRequest{}, Refuse(CodeBadRequest, "evidence: %d bytes, at most %d", len(req.Evidence), MaxEvidenceBytes)
	case len(req.PublicKey) == 0:
		return ReleaseRequest{}, Refuse(CodeBadRequest, "publicKey: empty")
	case len(req.PublicKey) > MaxPublicKeyBytes:
		return ReleaseRequest{}, Refuse(CodeBadRequest, "publicKey: %d bytes, at most %d", len(req.PublicKey), MaxPublicKeyBytes)
	}
	if _, err := KEM(req.KEMID); err != nil {
		return ReleaseRequest{}, Refuse(CodeBadRequest, "kemID: 0x%04x not supported (0x%04x, 0x%04x are)", req.KEMID, KEMX25519, KEMMLKEM768X25519)
	}
	return req, nil
}

func checkString(name, value string, max int) error {
	if value == "" {
		return Refuse(CodeBadRequest, "%s: empty", name)
	}
	if len(value) > max {
		return Refuse(CodeBadRequest, "%s: %d bytes, at most %d", name, len(value), max)
	}
	return nil
}

type member struct {
	name string
	into any
	// optional members may be absent; present, they obey the same rules.
	optional bool
}

// decodeStrict walks one top-level JSON object token by token. encoding/json
// alone matches member names case-insensitively and lets a later duplicate
// win, which would let two parsers of the same request disagree.
func decodeStrict(data []byte, members []member) error {
	if len(data) > MaxRequestBytes {
		return Refuse(CodeBadRequest, "request body: %d bytes, at most %d", len(data), MaxRequestBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return Refuse(CodeBadRequest, "request body: %v", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return Refuse(CodeBadRequest, "request body: not a JSON object")
	}
	seen := make(map[string]bool, len(members))
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return Refuse(CodeBadRequest, "request body: %v", err)
		}
		name, _ := tok.(string)
		var target any
		for _, m := range members {
			if m.name == name {
				target = m.into
			}
		}
		if target == nil {
			return Refuse(CodeBadRequest, "unknown member %q", name)
		}
		if seen[name] {
			return Refuse(CodeBadRequest, "duplicate member %q", name)
		}
		seen[name] = true
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return Refuse(CodeBadRequest, "request body: truncated JSON")
			}
			return Refuse(CodeBadRequest, "request body: member %q: %v", name, err)
		}
		if bytes.Equal(raw, []byte("null")) {
			return Refuse(CodeBadRequest, "%s: null", name)
		}
		if err := json.Unmarshal(raw, target); err != nil {
			var typeErr *json.UnmarshalTypeError
			if errors.As(err, &typeErr) {
				return Refuse(CodeBadRequest, "%s: %s is not a valid %s", name, typeErr.Value, typeErr.Type)
			}
			return Refuse(CodeBadRequest, "%s: %v", name, err)
		}
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return Refuse(CodeBadRequest, "request body: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return Refuse(CodeBadRequest, "request body: data after the JSON object")
	}
	for _, m := range members {
		if !seen[m.name] && !m.optional {
			return Refuse(CodeBadRequest, "%s: required", m.name)
		}
	}
	return nil
}
