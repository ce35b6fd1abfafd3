package httpproxy

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// parseTarget splits the request target into authority and path and checks
// that the path is in normal form (see the package documentation). The
// target is forwarded as sent, so the proxy refuses what it would otherwise
// have to rewrite.
func (q *request) parseTarget() *refusal {
	t := q.target
	if strings.IndexByte(t, '#') >= 0 {
		return refuse(ReasonBadTarget, "fragment in the target")
	}
	if strings.IndexByte(t, '\\') >= 0 {
		return refuse(ReasonBadPath, "backslash in the target")
	}
	rest := t
	if t[0] != '/' {
		if t == "*" {
			return refuse(ReasonBadTarget, "asterisk-form target")
		}
		if len(t) < 7 || !strings.EqualFold(t[:7], "http://") {
			return refuse(ReasonBadTarget, "target is neither origin-form nor an http absolute-form")
		}
		rest = t[7:]
		end := strings.IndexAny(rest, "/?")
		if end < 0 {
			end = len(rest)
		}
		q.authority, rest = rest[:end], rest[end:]
		if strings.IndexByte(q.authority, '@') >= 0 {
			return refuse(ReasonBadTarget, "userinfo in the target")
		}
		if !validHostPort(q.authority) {
			return refuse(ReasonBadTarget, "malformed authority in the target")
		}
	}
	rawPath, _, _ := strings.Cut(rest, "?")
	if rawPath == "" {
		rawPath = "/"
	}
	q.rawPath = rawPath
	path, rf := normalPath(rawPath)
	if rf != nil {
		return rf
	}
	q.path = path
	return nil
}

// normalPath checks that raw (which starts with "/") is a path the upstream
// cannot read differently from the proxy, and returns it with its escapes
// decoded. Refused: bytes outside RFC 3986 pchar; empty segments except a
// trailing slash; "." and ".." segments, also with ";parameters" (servlet
// containers strip those); escapes of "/", "\", ".", "%" (against double
// decoding) and control bytes.
func normalPath(raw string) (string, *refusal) {
	escapes := false
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		switch {
		case c == '%':
			if i+2 >= len(raw) {
				return "", refuse(ReasonBadPath, "truncated escape")
			}
			hi, ok1 := unhex(raw[i+1])
			lo, ok2 := unhex(raw[i+2])
			if !ok1 || !ok2 {
				return "", refuse(ReasonBadPath, "invalid escape")
			}
			switch d := hi<<4 | lo; {
			case d == '/' || d == '\\' || d == '.' || d == '%' || d < 0x20 || d == 0x7f:
				return "", refuse(ReasonBadPath, "escaped %q", d)
			}
			escapes = true
			i += 2
		case c == '/' || isPchar(c):
		default:
			return "", refuse(ReasonBadTarget, "byte %q in the path", c)
		}
	}
	for s := raw[1:]; ; {
		seg, next, more := strings.Cut(s, "/")
		if seg == "" && more {
			return "", refuse(ReasonBadPath, "empty segment")
		}
		if name, _, _ := strings.Cut(seg, ";"); name == "." || name == ".." {
			return "", refuse(ReasonBadPath, "dot segment")
		}
		if !more {
			break
		}
		s = next
	}
	if !escapes {
		return raw, nil
	}
	b := make([]byte, 0, len(raw))
	for i := 0; i < len(raw); i++ {
		if raw[i] == '%' {
			hi, _ := unhex(raw[i+1])
			lo, _ := unhex(raw[i+2])
			b = append(b, hi<<4|lo)
			i += 2
			continue
		}
		b = append(b, raw[i])
	}
	return string(b), nil
}

// isPchar reports whether c is an unreserved, sub-delims, ":" or "@" byte.
func isPchar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("-._~!$&'()*+,;=:@", c) >= 0
}

// splitHostPort splits "host", "host:port", "[v6]" or "[v6]:port". port is
// "" when absent.
func splitHostPort(hp string) (host, port string, ok bool) {
	if strings.HasPrefix(hp, "[") {
		end := strings.IndexByte(hp, ']')
		if end < 0 {
			return "", "", false
		}
		host, rest := hp[1:end], hp[end+1:]
		if rest == "" {
			return host, "", true
		}
		if rest[0] != ':' {
			return "", "", false
		}
		return host, rest[1:], true
	}
	host, port, hasPort := strings.Cut(hp, ":")
	if hasPort && strings.IndexByte(port, ':') >= 0 {
		return "", "", false
	}
	return host, port, true
}

// validHostPort checks Host (or authority) syntax: a registered name of
// letters, digits, '-', '.' and '_', an IPv4 address, or a bracketed IPv6
// address, and an optional decimal port. Escapes and other sub-delims are
// refused: no legitimate client needs them in a host.
func validHostPort(hp string) bool {
	host, port, ok := splitHostPort(hp)
	if !ok || host == "" {
		return false
	}
	if strings.HasPrefix(hp, "[") {
		a, err := netip.ParseAddr(host)
		if err != nil || !a.Is6() || a.Zone() != "" {
			return false
		}
	} else {
		for i := 0; i < len(host); i++ {
			c := host[i]
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_') {
				return false
			}
		}
	}
	if port == "" {
		return !strings.HasSuffix(hp, ":")
	}
	if len(port) > 5 {
		return false
	}
	for i := 0; i < len(port); i++ {
		if !isDigit(port[i]) {
			return false
		}
	}
	return true
}

// hostMatcher decides whether a Host value names the flow's destination.
type hostMatcher struct {
	names []string     // fqdns, compared case-insensitively
	addrs []netip.Addr // literal IPs
	port  string       // the destination port in decimal
}

func newHostMatcher(f Flow) (hostMatcher, error) {
	if !f.Dst.IsValid() {
		return hostMatcher{}, fmt.Errorf("flow destination %v is not an address and port", f.Dst)
	}
	m := hostMatcher{port: strconv.Itoa(int(f.Dst.Port()))}
	for _, h := range f.Hosts {
		if a, err := netip.ParseAddr(h); err == nil {
			m.addrs = append(m.addrs, a.Unmap())
			continue
		}
		m.names = append(m.names, h)
	}
	return m, nil
}

// allows reports whether hp (validated by validHostPort) names the flow's
// destination: a host in Flow.Hosts and, when a port is given, the
// destination port. Without a port the destination port must be 80: HTTP
// clients always send a non-default port, and a name without one means port
// 80 to the upstream. A trailing dot is not stripped: "api.example.test."
// is refused.
func (m *hostMatcher) allows(hp string) bool {
	host, port, ok := splitHostPort(hp)
	if !ok {
		return false
	}
	if port == "" {
		port = "80"
	}
	if port != m.port {
		return false
	}
	bracketed := strings.HasPrefix(hp, "[")
	// Only something that can be an IP literal goes through ParseAddr,
	// which allocates an error for every name.
	if host != "" && (bracketed || isDigit(host[0])) {
		if a, err := netip.ParseAddr(host); err == nil {
			return m.allowsAddr(a, bracketed)
		}
	}
	return m.allowsName(host)
}

// allowsAddr reports whether a is an acceptable IP Host: only literal IPs
// in Flow.Hosts (cidr rules) accept one, written as a dotted v4 or a
// bracketed v6 (not a v4-mapped one).
func (m *hostMatcher) allowsAddr(a netip.Addr, bracketed bool) bool {
	if a.Is6() != bracketed || a.Is4In6() {
		return false
	}
	for _, b := range m.addrs {
		if a == b {
			return true
		}
	}
	return false
}

func (m *hostMatcher) allowsName(host string) bool {
	for _, n := range m.names {
		if strings.EqualFold(host, n) {
			return true
		}
	}
	return false
}
