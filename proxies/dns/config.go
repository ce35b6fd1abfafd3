package dnsproxy

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// Config is the DNS policy of one sandbox (spec.dns). A sandbox without a
// Config has every query refused.
type Config struct {
	// Upstream is the resolver that allowed queries are forwarded to.
	Upstream netip.AddrPort
	// Allow lists exact names ("api.example.test") and wildcards
	// ("*.store.example.test": one or more labels before the suffix, never the
	// suffix itself). Matching is case-insensitive; a trailing dot is optional.
	Allow []string
	// QueryTypes lists the query types that allowed names may be asked for.
	// Empty means A, AAAA and CNAME. Meta types (ANY, AXFR, IXFR, ...) are
	// refused whatever this says.
	QueryTypes []uint16
	// FQDNNames are the names that the sandbox's fqdn egress rules use.
	// Addresses learnt for them are reported through Proxy.OnLearn.
	FQDNNames []string
}

// DefaultQueryTypes are the query types allowed when Config.QueryTypes is empty.
var DefaultQueryTypes = []uint16{dns.TypeA, dns.TypeAAAA, dns.TypeCNAME}

// Validate reports the first entry of c that the proxy cannot honour. The
// proxy itself ignores such entries (they match nothing), so a caller that
// wants a policy error instead of a silently narrower policy calls Validate.
func (c *Config) Validate() error {
	if !c.Upstream.IsValid() || c.Upstream.Port() == 0 {
		return fmt.Errorf("upstream %q: not an address and port", c.Upstream)
	}
	for i, a := range c.Allow {
		if _, _, err := parseAllow(a); err != nil {
			return fmt.Errorf("allow[%d]: %w", i, err)
		}
	}
	for i, t := range c.QueryTypes {
		if metaQueryType(t) {
			return fmt.Errorf("queryTypes[%d]: %s cannot be allowed", i, typeString(t))
		}
	}
	for i, n := range c.FQDNNames {
		if c, ok := canonicalHostname(n); !ok || c == "." {
			return fmt.Errorf("fqdnNames[%d]: %q is not a host name", i, n)
		}
	}
	return nil
}

// Limits bound what a sandbox can make the proxy do. A zero field takes the
// default named in its comment; a negative one disables what it limits where
// the comment says so.
type Limits struct {
	// QueriesPerSecond is the sustained query rate of one sandbox (token
	// bucket refill); default 100, negative disables rate limiting.
	QueriesPerSecond float64
	// Burst is the token bucket size; default 2 × QueriesPerSecond (at least 1).
	Burst int
	// MaxUDPSize caps the EDNS UDP size a client may advertise and so the
	// largest UDP response; default 1232 (no IP fragmentation on common paths,
	// DNS flag day 2020). A response that does not fit the client's size
	// (512 without EDNS) is truncated with the TC bit set.
	MaxUDPSize int
	// MaxTCPSize caps a response over TCP; default and maximum 65535.
	MaxTCPSize int
	// CacheEntries caps the answer cache; default 10000, negative disables
	// the cache.
	CacheEntries int
	// CacheMaxTTL caps how long an answer stays cached; default 1h.
	CacheMaxTTL time.Duration
	// LearnMinTTL and LearnMaxTTL clamp the TTL reported to OnLearn;
	// defaults 30s and 1h. TTLs of answered records are capped at
	// LearnMaxTTL as well, so a client re-resolves (and the datapath learns
	// again) before the learnt addresses expire.
	LearnMinTTL, LearnMaxTTL time.Duration
	// UpstreamTimeout bounds one exchange with the upstream; default 2s.
	UpstreamTimeout time.Duration
	// UpstreamSocketUses is how many UDP exchanges one upstream socket
	// carries, one at a time, before it is closed and its successor gets a
	// new random source port; default 100. 1 gives every query a socket of
	// its own. See the package documentation (Upstream sockets).
	UpstreamSocketUses int
	// UpstreamSocketMaxAge retires an upstream UDP socket this long after it
	// was opened, however few exchanges it carried; default 5s.
	UpstreamSocketMaxAge time.Duration
	// TCPIdleTimeout closes a TCP connection on which no complete query
	// arrived for this long; default 10s (RFC 7766 6.2.3: seconds).
	TCPIdleTimeout time.Duration
	// TCPMaxInflight bounds the pipelined queries of one TCP connection that
	// are being answered at once; default 8.
	TCPMaxInflight int
	// TCPMaxConns bounds the concurrent TCP connections of one sandbox;
	// default 16.
	TCPMaxConns int
}

func (l Limits) withDefaults() Limits {
	if l.QueriesPerSecond == 0 {
		l.QueriesPerSecond = 100
	}
	if l.Burst <= 0 {
		l.Burst = max(1, int(2*l.QueriesPerSecond))
	}
	if l.MaxUDPSize <= 0 {
		l.MaxUDPSize = 1232
	}
	l.MaxUDPSize = min(max(l.MaxUDPSize, dns.MinMsgSize), dns.MaxMsgSize)
	if l.MaxTCPSize <= 0 || l.MaxTCPSize > dns.MaxMsgSize {
		l.MaxTCPSize = dns.MaxMsgSize
	}
	l.MaxTCPSize = max(l.MaxTCPSize, dns.MinMsgSize)
	if l.CacheEntries == 0 {
		l.CacheEntries = 10000
	}
	if l.CacheMaxTTL <= 0 {
		l.CacheMaxTTL = time.Hour
	}
	if l.LearnMinTTL <= 0 {
		l.LearnMinTTL = 30 * time.Second
	}
	if l.LearnMaxTTL <= 0 {
		l.LearnMaxTTL = time.Hour
	}
	l.LearnMaxTTL = max(l.LearnMaxTTL, l.LearnMinTTL)
	if l.UpstreamTimeout <= 0 {
		l.UpstreamTimeout = 2 * time.Second
	}
	if l.UpstreamSocketUses <= 0 {
		l.UpstreamSocketUses = 100
	}
	if l.UpstreamSocketMaxAge <= 0 {
		l.UpstreamSocketMaxAge = 5 * time.Second
	}
	if l.TCPIdleTimeout <= 0 {
		l.TCPIdleTimeout = 10 * time.Second
	}
	if l.TCPMaxInflight <= 0 {
		l.TCPMaxInflight = 8
	}
	if l.TCPMaxConns <= 0 {
		l.TCPMaxConns = 16
	}
	return l
}

// Reason says why a query was not forwarded. The set is closed and small: it
// is a metric label.
type Reason string

// Reasons of a DenyEvent.
const (
	ReasonNoPolicy     Reason = "no_policy"      // the sandbox has no Config
	ReasonNotAllowed   Reason = "not_allowed"    // the name matches no Allow entry
	ReasonInvalidName  Reason = "invalid_name"   // a byte outside letters, digits, '-', '_'
	ReasonQueryType    Reason = "query_type"     // meta type, or not in QueryTypes
	ReasonClass        Reason = "class"          // not IN
	ReasonOpcode       Reason = "opcode"         // not QUERY
	ReasonMalformed    Reason = "malformed"      // FORMERR cases, and dropped messages
	ReasonEDNSVersion  Reason = "edns_version"   // EDNS version other than 0
	ReasonRateLimited  Reason = "rate_limited"   // over the sandbox's token bucket
	ReasonTooManyConns Reason = "too_many_conns" // TCP connection over TCPMaxConns
)

// DenyEvent describes one query that was answered without being forwarded, or
// dropped.
type DenyEvent struct {
	Reason Reason
	// Name is the question name as the sandbox sent it, non-printable bytes
	// escaped as \DDD and cut to maxEventName bytes ("..." marks a cut);
	// empty when the question could not be read.
	Name string
	// Listed is the policy's own name or pattern ("*.example.test.") the
	// question matched, "" when it matched none. Unlike Name, it is safe
	// to log, audit and stream (docs/telemetry.md).
	Listed string
	QType  uint16
	// Rcode is the response code sent, or -1 when nothing was sent.
	Rcode int
	TCP   bool
}

// Decision is the label value of cleanwall_dns_queries_total.
type Decision string

// Decisions, one per answered (or dropped) query.
const (
	DecisionForwarded     Decision = "forwarded"
	DecisionCached        Decision = "cached"
	DecisionRefused       Decision = "refused"
	DecisionRateLimited   Decision = "rate_limited"
	DecisionMalformed     Decision = "malformed"
	DecisionUpstreamError Decision = "upstream_error"
)

// maxEventName bounds DenyEvent.Name: names are sandbox-controlled data.
const maxEventName = 100

// errBadPattern is wrapped by allow-list parse errors.
var errBadPattern = errors.New("not an exact name or *.suffix")

// parseAllow returns the canonical name (lower case, trailing dot) of an
// allow entry and whether it is a wildcard; for a wildcard the name is the
// suffix.
func parseAllow(a string) (name string, wildcard bool, err error) {
	if rest, ok := strings.CutPrefix(a, "*."); ok {
		a, wildcard = rest, true
	}
	n, ok := canonicalHostname(a)
	if !ok || n == "." {
		return "", false, fmt.Errorf("%q: %w", a, errBadPattern)
	}
	return n, wildcard, nil
}

// matcher is a compiled allow list.
type matcher struct {
	exact    map[string]struct{}
	suffixes []string // ".store.example.test."
}

func compileAllow(allow []string) (matcher, []error) {
	m := matcher{exact: make(map[string]struct{}, len(allow))}
	var errs []error
	for _, a := range allow {
		n, wild, err := parseAllow(a)
		switch {
		case err != nil:
			errs = append(errs, err)
		case wild:
			m.suffixes = append(m.suffixes, "."+n)
		default:
			m.exact[n] = struct{}{}
		}
	}
	return m, errs
}

// allows reports whether the canonical host name n (see canonicalHostname)
// is on the list. Because n holds only letters, digits, '-', '_' and dots, a
// string suffix is a label suffix.
func (m *matcher) allows(n string) bool {
	if _, ok := m.exact[n]; ok {
		return true
	}
	for _, s := range m.suffixes {
		if len(n) > len(s) && strings.HasSuffix(n, s) {
			return true
		}
	}
	return false
}

// listed is the entry of the list that allows n: n itself when listed
// exactly, "*" and the suffix for a pattern, "" when none does.
func (m *matcher) listed(n string) string {
	if _, ok := m.exact[n]; ok {
		return n
	}
	for _, s := range m.suffixes {
		if len(n) > len(s) && strings.HasSuffix(n, s) {
			return "*" + s
		}
	}
	return ""
}

// canonicalHostname lower-cases s and adds the trailing dot. It reports false
// unless s is a host name: labels of 1-63 letters, digits, '-' or '_', at
// most 253 characters without the trailing dot. Presentation escapes are not
// host names, so a name from a record (whose bytes miekg escaped) that carries
// a dot or any odd byte inside a label is refused here.
func canonicalHostname(s string) (string, bool) {
	if s == "." {
		return s, true
	}
	s = strings.TrimSuffix(s, ".")
	if len(s) == 0 || len(s) > 253 {
		return "", false
	}
	label := 0
	lower := true
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.':
			if label == 0 {
				return "", false
			}
			label = 0
			continue
		case 'A' <= c && c <= 'Z':
			lower = false
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '-', c == '_':
		default:
			return "", false
		}
		label++
		if label > 63 {
			return "", false
		}
	}
	if label == 0 {
		return "", false
	}
	if !lower {
		s = strings.ToLower(s)
	}
	return s + ".", true
}

// metaQueryType reports the types that ask for something other than the
// records of one name and type, or that are not data at all.
func metaQueryType(t uint16) bool {
	switch t {
	case dns.TypeNone, dns.TypeOPT, dns.TypeTKEY, dns.TypeTSIG, dns.TypeIXFR,
		dns.TypeAXFR, dns.TypeMAILB, dns.TypeMAILA, dns.TypeANY:
		return true
	}
	return false
}

func typeString(t uint16) string {
	if s, ok := dns.TypeToString[t]; ok {
		return s
	}
	return fmt.Sprintf("TYPE%d", t)
}
