package policy

import (
	"net/netip"
	"strconv"
	"strings"
)

// isDNSLabel reports whether s is an RFC 1123 label: 1-63 lowercase
// letters, digits and '-', starting and ending with a letter or digit.
// Policy and rule names use it.
func isDNSLabel(s string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	for i := range len(s) {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9':
		case c == '-' && i > 0 && i < len(s)-1:
		default:
			return false
		}
	}
	return true
}

// normName lowercases a DNS name and drops one trailing dot.
func normName(s string) string {
	return strings.ToLower(strings.TrimSuffix(s, "."))
}

// hostnameProblem explains why s (already normalised) is not a hostname,
// or returns "". Labels are letters, digits, '-' (not first or last) and
// '_' (service names such as _ldap._tcp need it); at most 63 octets each
// and 253 in all; the last label is not all digits, so that nothing that
// looks like an IP address passes for a name.
func hostnameProblem(s string) string {
	if s == "" {
		return "empty name"
	}
	if _, err := netip.ParseAddr(s); err == nil {
		return "an IP address, not a name (use cidr)"
	}
	if len(s) > 253 {
		return "longer than 253 characters"
	}
	labels := strings.Split(s, ".")
	for _, l := range labels {
		if l == "" {
			return "empty label"
		}
		if len(l) > 63 {
			return "label " + quote(l) + " is longer than 63 characters"
		}
		for i := range len(l) {
			c := l[i]
			switch {
			case 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '_':
			case c == '-' && i > 0 && i < len(l)-1:
			case c == '*':
				return "wildcards are not allowed here"
			case c == '-':
				return "label " + quote(l) + " starts or ends with '-'"
			default:
				return "invalid character " + quote(l[i:i+1]) + " in label " + quote(l)
			}
		}
	}
	last := labels[len(labels)-1]
	if strings.Trim(last, "0123456789") == "" {
		return "the last label is all digits"
	}
	return ""
}

// allowProblem explains why s (normalised) is not a dns.allow entry: an
// exact name or "*." followed by a name.
func allowProblem(s string) string {
	suffix, wild := strings.CutPrefix(s, "*.")
	if !wild && strings.Contains(s, "*") {
		return "a wildcard must be the whole leftmost label (\"*.\" + suffix)"
	}
	if wild && strings.Contains(suffix, "*") {
		return "only the leftmost label may be a wildcard"
	}
	return hostnameProblem(suffix)
}

// quote is strconv.Quote, shortened for values echoed in messages.
func quote(s string) string {
	const limit = 80
	if len(s) > limit {
		s = s[:limit] + "..."
	}
	return strconv.Quote(s)
}
