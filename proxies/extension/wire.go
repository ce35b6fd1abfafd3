package extension

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"unicode/utf8"

	"github.com/cleanwall/cleanwall/proxies"
)

// The wire protocol, version 1 (docs/extensions.md): one message per
// SOCK_SEQPACKET packet, each a JSON object of at most MaxMessage bytes.

// Version is the protocol version this package speaks.
const Version = 1

// MaxMessage bounds every message, both directions. An extension's
// message that is longer is a protocol violation.
const MaxMessage = 16 << 10

// Bounds of the fields the extension sends; see docs/extensions.md.
const (
	maxToken  = 64  // a reason: [a-z0-9][a-z0-9._-]*
	maxMethod = 32  // deny.method, truncated (as proxies/http does)
	maxPath   = 256 // deny.path, truncated
	maxDetail = 256 // deny.detail and end.error, truncated
	// maxHosts bounds flow.hosts; more are dropped and hosts_truncated set.
	maxHosts = 32
	// maxCount is the largest integer every JSON reader holds exactly
	// (2^53-1): ids and byte counts stay below it.
	maxCount = 1<<53 - 1
)

// Message types.
const (
	typeHello  = "hello"
	typeFlow   = "flow"
	typeClose  = "close"
	typeAccept = "accept"
	typeRefuse = "refuse"
	typeBytes  = "bytes"
	typeDeny   = "deny"
	typeEnd    = "end"
)

// Reasons of the close message.
const (
	closeRevoked = "revoked" // ServeStream's context is done
	closeTimeout = "timeout" // no answer in time: the proxy reset the flow
)

// helloOut is the proxy's hello.
type helloOut struct {
	Type       string `json:"type"`
	Version    int    `json:"version"`
	Extension  string `json:"extension"`
	MaxMessage int    `json:"max_message"`
}

// endpoint is an address and port.
type endpoint struct {
	IP   string `json:"ip"`
	Port uint16 `json:"port"`
}

func endpointOf(a netip.AddrPort) endpoint {
	return endpoint{IP: a.Addr().Unmap().WithZone("").String(), Port: a.Port()}
}

// flowOut announces a flow; its packet carries the descriptor.
type flowOut struct {
	Type           string   `json:"type"`
	Version        int      `json:"version"`
	ID             uint64   `json:"id"`
	Sandbox        string   `json:"sandbox"`
	Rule           string   `json:"rule"`
	Mode           string   `json:"mode"`
	Protocol       string   `json:"protocol"`
	Src            endpoint `json:"src"`
	Dst            endpoint `json:"dst"`
	Hosts          []string `json:"hosts"`
	HostsTruncated bool     `json:"hosts_truncated"`
}

// closeOut tells the extension to close a flow it holds.
type closeOut struct {
	Type   string `json:"type"`
	ID     uint64 `json:"id"`
	Reason string `json:"reason"`
}

// encodeFlow encodes m within MaxMessage, dropping hosts from the end
// (and saying so) when they do not fit.
func encodeFlow(m flowOut) ([]byte, error) {
	if len(m.Hosts) > maxHosts {
		m.Hosts, m.HostsTruncated = m.Hosts[:maxHosts], true
	}
	if m.Hosts == nil {
		m.Hosts = []string{}
	}
	for {
		b, err := json.Marshal(m)
		if err != nil {
			return nil, err
		}
		if len(b) <= MaxMessage {
			return b, nil
		}
		if len(m.Hosts) == 0 {
			return nil, fmt.Errorf("flow message of %d bytes is over %d", len(b), MaxMessage)
		}
		m.Hosts, m.HostsTruncated = m.Hosts[:len(m.Hosts)-1], true
	}
}

// inMsg is any message from the extension; which fields count depends on
// Type. Pointers tell absent from zero where a field is required.
type inMsg struct {
	Type       string  `json:"type"`
	Version    *int    `json:"version"`
	ReportsEnd bool    `json:"reports_end"`
	ID         *uint64 `json:"id"`
	Reason     *string `json:"reason"`
	Out        *int64  `json:"out"`
	In         *int64  `json:"in"`
	Status     int     `json:"status"`
	Method     string  `json:"method"`
	Path       string  `json:"path"`
	Detail     string  `json:"detail"`
	Result     *string `json:"result"`
	Error      string  `json:"error"`
}

// errMessage is a malformed message: a protocol violation.
var errMessage = errors.New("malformed message")

// decode parses and checks one message of the extension (not its
// meaning in the conversation: conn does that).
func decode(b []byte) (*inMsg, error) {
	if !utf8.Valid(b) {
		return nil, fmt.Errorf("%w: not UTF-8", errMessage)
	}
	b = bytes.TrimSpace(b)
	if len(b) == 0 || b[0] != '{' {
		return nil, fmt.Errorf("%w: not a JSON object", errMessage)
	}
	var m inMsg
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%w: %v", errMessage, err)
	}
	bad := func(format string, args ...any) (*inMsg, error) {
		return nil, fmt.Errorf("%w: %s: %s", errMessage, m.Type, fmt.Sprintf(format, args...))
	}
	switch m.Type {
	case typeHello:
		if m.Version == nil {
			return bad("no version")
		}
		return &m, nil
	case typeAccept, typeRefuse, typeBytes, typeDeny, typeEnd:
	case "":
		return nil, fmt.Errorf("%w: no type", errMessage)
	default:
		return nil, fmt.Errorf("%w: unknown type %q", errMessage, truncate(m.Type, maxToken))
	}
	if m.ID == nil || *m.ID == 0 || *m.ID > maxCount {
		return bad("id missing or out of range")
	}
	switch m.Type {
	case typeRefuse:
		if m.Reason == nil || !validToken(*m.Reason) {
			return bad("reason is not a token (1-%d bytes of a-z 0-9 . _ -)", maxToken)
		}
	case typeBytes:
		if m.Out == nil || m.In == nil || *m.Out < 0 || *m.In < 0 || *m.Out > maxCount || *m.In > maxCount {
			return bad("out and in must be integers from 0 to 2^53-1")
		}
	case typeDeny:
		if m.Reason == nil || !validToken(*m.Reason) {
			return bad("reason is not a token (1-%d bytes of a-z 0-9 . _ -)", maxToken)
		}
		if m.Status < 0 || m.Status > 999 {
			return bad("status %d out of range", m.Status)
		}
	case typeEnd:
		if m.Result == nil {
			return bad("no result")
		}
		if _, ok := endResults[*m.Result]; !ok {
			return bad("unknown result %q", truncate(*m.Result, maxToken))
		}
	}
	return &m, nil
}

// endResults maps end.result to how a flow ended.
var endResults = map[string]proxies.End{
	"closed":          proxies.EndClosed,
	"idle":            proxies.EndIdle,
	"budget-exceeded": proxies.EndBudget,
	"error":           proxies.EndError,
}

// validToken reports whether s is a reason token: it becomes a metric
// label and an audit field, so it is short and from a small alphabet.
func validToken(s string) bool {
	if len(s) == 0 || len(s) > maxToken {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case (c == '.' || c == '_' || c == '-') && i > 0:
		default:
			return false
		}
	}
	return true
}

// truncate cuts s to at most n bytes, at a rune boundary.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}
