package policy

import (
	"net/netip"
	"slices"
)

// DNS is the compiled spec.dns: what the DNS proxy forwards, and where.
// A nil *DNS (spec.dns absent) allows nothing.
type DNS struct {
	Upstream netip.AddrPort
	// QueryTypes are RR type numbers (A is 1); default A, AAAA, CNAME.
	QueryTypes []uint16
	// Allow is spec.dns.allow, normalised.
	Allow []string

	exact    map[string]bool
	suffixes map[string]bool // "store.example.test" for "*.store.example.test"
}

func compileDNS(d *DNSSpec) *DNS {
	up, _ := parseUpstream(d.Upstream)
	c := &DNS{Upstream: up, Allow: slices.Clone(d.Allow), exact: map[string]bool{}, suffixes: map[string]bool{}}
	for _, a := range d.Allow {
		if suffix, ok := cutWildcard(a); ok {
			c.suffixes[suffix] = true
		} else {
			c.exact[a] = true
		}
	}
	for _, t := range d.QueryTypes {
		if n := rrTypes[t]; !slices.Contains(c.QueryTypes, n) {
			c.QueryTypes = append(c.QueryTypes, n)
		}
	}
	return c
}

func cutWildcard(allow string) (suffix string, ok bool) {
	if len(allow) > 2 && allow[0] == '*' && allow[1] == '.' {
		return allow[2:], true
	}
	return "", false
}

// Allowed reports whether queries for name may be forwarded: name equals
// an allow entry, or an entry "*.suffix" has suffix below name by one or
// more labels ("*.a.b" allows x.a.b and y.x.a.b, not a.b). Case and one
// trailing dot do not matter; a name that is not a valid hostname is never
// allowed.
func (d *DNS) Allowed(name string) bool {
	if d == nil {
		return false
	}
	n := normName(name)
	if hostnameProblem(n) != "" {
		return false
	}
	if d.exact[n] {
		return true
	}
	for i := 1; i < len(n); i++ {
		if n[i] == '.' && d.suffixes[n[i+1:]] {
			return true
		}
	}
	return false
}

// TypeAllowed reports whether queries of RR type qtype may be forwarded.
func (d *DNS) TypeAllowed(qtype uint16) bool {
	return d != nil && slices.Contains(d.QueryTypes, qtype)
}
