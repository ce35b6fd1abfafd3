package policy

import (
	"fmt"
	"net/netip"
	pathpkg "path"
	"regexp"
	"strconv"
	"strings"
)

// Validate checks p against the rules of the language and returns nil or
// an ErrorList with every problem, each named by its field path. It accepts
// policies built in Go as well as parsed ones, normalised or not.
func (p *Policy) Validate() error {
	return p.validate(nil).err()
}

// validate returns the problems of p. decodeErrs are the problems already
// reported while decoding: checks on fields that failed to decode are
// skipped, so that one mistake is reported once.
func (p *Policy) validate(decodeErrs ErrorList) ErrorList {
	v := &validator{p: p, broken: decodeErrs}
	v.policy()
	return v.errs
}

type validator struct {
	p      *Policy
	errs   ErrorList
	broken ErrorList
}

// add reports a problem with the value at path.
func (v *validator) add(path, format string, args ...any) {
	for _, b := range v.broken {
		if isWithin(path, b.Path) {
			return
		}
	}
	v.errs = append(v.errs, &FieldError{Path: path, Msg: fmt.Sprintf(format, args...), Line: v.line(path)})
}

// need reports a missing or incomplete value at path. Unlike add it stays
// silent when anything under path failed to decode: the field is not
// missing, it was written wrongly, and that is reported already.
func (v *validator) need(path, format string, args ...any) {
	for _, b := range v.broken {
		if isWithin(b.Path, path) {
			return
		}
	}
	v.add(path, format, args...)
}

// isWithin reports whether path is base or a field or element under it.
func isWithin(path, base string) bool {
	if !strings.HasPrefix(path, base) {
		return false
	}
	if len(path) == len(base) || base == "" {
		return true
	}
	c := path[len(base)]
	return c == '.' || c == '['
}

// line is the YAML line of path (see lineOf).
func (v *validator) line(path string) int { return lineOf(v.p.lines, path) }

// lineOf is the YAML line of path, or of its closest ancestor that was
// written (a missing field is reported on the line of its parent); 0 for a
// policy built in Go.
func lineOf(lines map[string]int, path string) int {
	if lines == nil {
		return 0
	}
	for {
		if l, ok := lines[path]; ok {
			return l
		}
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			return lines[""]
		}
		path = path[:i]
	}
}

// present reports whether the YAML named the field at path (possibly with
// an empty value). Policies built in Go have no such record.
func (v *validator) present(path string) bool {
	_, ok := v.p.lines[path]
	return ok
}

// notEmpty reports an optional string field that was written but left
// empty.
func (v *validator) notEmpty(path, value string) {
	if value == "" && v.present(path) {
		v.add(path, "must not be empty (omit the field instead)")
	}
}

func (v *validator) policy() {
	p := v.p
	switch p.APIVersion {
	case "":
		v.need("apiVersion", "required (%s)", APIVersion)
	case APIVersion:
	default:
		v.add("apiVersion", "%s is not supported (want %s)", quote(p.APIVersion), APIVersion)
	}
	switch p.Kind {
	case "":
		v.need("kind", "required (%s)", Kind)
	case Kind:
	default:
		v.add("kind", "%s is not supported (want %s)", quote(p.Kind), Kind)
	}
	switch name := p.Metadata.Name; {
	case name == "":
		v.need("metadata.name", "required")
	case !isDNSLabel(name):
		v.add("metadata.name", "%s is not a DNS label (%s)", quote(name), labelRules)
	}
	if p.Spec.DNS != nil {
		v.dns("spec.dns", p.Spec.DNS)
	}
	if l := p.Spec.Limits; l != nil {
		for _, f := range []struct {
			name string
			v    *int
		}{{"tcpFlows", l.TCPFlows}, {"udpFlows", l.UDPFlows}, {"newFlowsPerSecond", l.NewFlowsPerSecond}, {"dnsQueriesInFlight", l.DNSQueriesInFlight}} {
			if f.v != nil && *f.v < 1 {
				v.add("spec.limits."+f.name, "%d: must be at least 1 (omit it for the daemon's limit)", *f.v)
			}
		}
	}
	v.volumes()
	if g := p.Spec.Governance; g != nil {
		switch g.Consent {
		case "", ConsentNone, ConsentRequired:
		default:
			v.add("spec.governance.consent", "%s: must be required or none", quote(g.Consent))
		}
	}
	first := make(map[string]int, len(p.Spec.Egress))
	for i := range p.Spec.Egress {
		rp := "spec.egress[" + strconv.Itoa(i) + "]"
		r := &p.Spec.Egress[i]
		v.rule(rp, r)
		if r.Name == "" {
			continue
		}
		if j, dup := first[r.Name]; dup {
			v.add(rp+".name", "duplicate rule name %s (first at spec.egress[%d])", quote(r.Name), j)
		} else {
			first[r.Name] = i
		}
	}
}

const labelRules = "lowercase letters, digits and '-', at most 63 characters, starting and ending with a letter or digit"

func (v *validator) dns(path string, d *DNSSpec) {
	if d.Upstream == "" {
		v.need(path+".upstream", "required (ip:port of the resolver that allowed names are forwarded to)")
	} else if _, problem := parseUpstream(d.Upstream); problem != "" {
		v.add(path+".upstream", "%s", problem)
	}
	for i, a := range d.Allow {
		if problem := allowProblem(normName(a)); problem != "" {
			v.add(path+".allow["+strconv.Itoa(i)+"]", "%s is not a name or \"*.\" + name: %s", quote(a), problem)
		}
	}
	if d.QueryTypes != nil && len(d.QueryTypes) == 0 || d.QueryTypes == nil && v.present(path+".queryTypes") {
		v.add(path+".queryTypes", "at least one query type (omit queryTypes for A, AAAA, CNAME)")
	}
	for i, t := range d.QueryTypes {
		if _, ok := rrTypes[t]; ok {
			continue
		}
		qp := path + ".queryTypes[" + strconv.Itoa(i) + "]"
		if _, ok := rrTypes[strings.ToUpper(t)]; ok {
			v.add(qp, "%s is not a query type (write %s)", quote(t), strings.ToUpper(t))
		} else {
			v.add(qp, "%s is not a supported query type (%s)", quote(t), rrTypeList)
		}
	}
}

// parseUpstream reads "ip:port", "[ipv6]:port" or a bare IP (port 53).
func parseUpstream(s string) (netip.AddrPort, string) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		a, aerr := netip.ParseAddr(s)
		if aerr != nil {
			return netip.AddrPort{}, quote(s) + " is not ip:port (the resolver is given by address: naming it would need DNS)"
		}
		ap = netip.AddrPortFrom(a, 53)
	}
	switch a := ap.Addr(); {
	case a.Zone() != "":
		return ap, quote(s) + ": IPv6 zones are not allowed"
	case a.Is4In6():
		return ap, quote(s) + ": IPv4-mapped IPv6 address (write " + netip.AddrPortFrom(a.Unmap(), ap.Port()).String() + ")"
	case a.IsUnspecified():
		return ap, quote(s) + ": the unspecified address is not a resolver"
	case ap.Port() == 0:
		return ap, quote(s) + ": port 0 is not a port (1-65535)"
	}
	return ap, ""
}

func (v *validator) rule(rp string, r *EgressRule) {
	switch {
	case r.Name == "":
		v.need(rp+".name", "required")
	case !isDNSLabel(r.Name):
		v.add(rp+".name", "%s is not a DNS label (%s)", quote(r.Name), labelRules)
	}
	v.destinations(rp, r.To)
	mode, modeOK := parseMode(r.Mode)
	switch {
	case r.Mode == "":
		v.need(rp+".mode", "required (open, trusted or secure)")
	case !modeOK:
		v.add(rp+".mode", "%s is not a mode (open, trusted or secure)", quote(r.Mode))
	}
	openProto := "tcp"
	if r.Open != nil && r.Open.Protocol != "" {
		openProto = r.Open.Protocol
	}
	v.ports(rp, r.Ports, mode, openProto)
	if !modeOK {
		return
	}
	blocks := []struct {
		name string
		set  bool
		mode Mode
	}{{"open", r.Open != nil, ModeOpen}, {"trusted", r.Trusted != nil, ModeTrusted}, {"secure", r.Secure != nil, ModeSecure}}
	for _, b := range blocks {
		if b.set && b.mode != mode {
			v.add(rp+"."+b.name, "only allowed with mode %s (this rule's mode is %s)", b.name, mode)
		}
	}
	switch mode {
	case ModeOpen:
		if r.Open != nil {
			v.open(rp+".open", r.Open)
		}
	case ModeTrusted:
		if r.Trusted == nil {
			v.need(rp+".trusted", "required with mode trusted (tls and/or hpke)")
		} else {
			v.trusted(rp+".trusted", r.Trusted)
		}
	case ModeSecure:
		if r.Secure == nil {
			v.need(rp+".secure", "required with mode secure (keyID and protocol)")
		} else {
			v.secure(rp+".secure", r.Secure)
		}
	}
}

func (v *validator) destinations(rp string, to []Destination) {
	if len(to) == 0 {
		v.need(rp+".to", "at least one destination (cidr or fqdn)")
		return
	}
	for j := range to {
		d := &to[j]
		switch {
		case d.CIDR != "" && d.FQDN != "":
			v.add(toPath(rp, j), "cidr and fqdn are exclusive (one destination per entry)")
		case d.CIDR != "":
			if _, problem := parseCIDR(d.CIDR); problem != "" {
				v.add(toPath(rp, j)+".cidr", "%s", problem)
			}
		case d.FQDN != "":
			if problem := fqdnProblem(d.FQDN); problem != "" {
				v.add(toPath(rp, j)+".fqdn", "%s", problem)
			}
		default:
			tp := toPath(rp, j)
			if v.present(tp+".cidr") || v.present(tp+".fqdn") {
				v.notEmpty(tp+".cidr", d.CIDR)
				v.notEmpty(tp+".fqdn", d.FQDN)
			} else {
				v.need(tp, "needs cidr or fqdn")
			}
		}
	}
}

func toPath(rp string, j int) string { return rp + ".to[" + strconv.Itoa(j) + "]" }

// parseCIDR reads a destination prefix, which must be canonical: no host
// bits, no zone, no IPv4-mapped IPv6 form (the datapath keeps IPv4 and IPv6
// apart, so a mapped prefix would never match).
func parseCIDR(s string) (netip.Prefix, string) {
	if strings.Contains(s, "%") {
		return netip.Prefix{}, quote(s) + ": IPv6 zones are not allowed"
	}
	if !strings.Contains(s, "/") {
		if a, err := netip.ParseAddr(s); err == nil {
			return netip.Prefix{}, fmt.Sprintf("%s is an address, not a prefix (did you mean %s/%d?)", quote(s), s, a.BitLen())
		}
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		msg := err.Error()
		if _, after, ok := strings.Cut(msg, "): "); ok {
			msg = after
		}
		return netip.Prefix{}, quote(s) + " is not a CIDR prefix: " + msg
	}
	if a := p.Addr(); a.Is4In6() {
		hint := ""
		if p.Bits() >= 96 {
			hint = " (write " + netip.PrefixFrom(a.Unmap(), p.Bits()-96).Masked().String() + ")"
		}
		return netip.Prefix{}, quote(s) + " is an IPv4-mapped IPv6 prefix: write IPv4 destinations as IPv4" + hint
	}
	if m := p.Masked(); m != p {
		return netip.Prefix{}, fmt.Sprintf("%s has host bits set (did you mean %s?)", quote(s), m)
	}
	return p, ""
}

func fqdnProblem(s string) string {
	if strings.Contains(s, "*") {
		return quote(s) + ": wildcards are not allowed in fqdn destinations (list each name; wildcards belong in spec.dns.allow)"
	}
	if problem := hostnameProblem(normName(s)); problem != "" {
		return quote(s) + " is not a hostname: " + problem
	}
	return ""
}

func (v *validator) ports(rp string, ports []PortSpec, mode Mode, openProto string) {
	if len(ports) == 0 {
		v.need(rp+".ports", "at least one port")
		return
	}
	first := make(map[PortProto]int, len(ports))
	for k := range ports {
		ps := &ports[k]
		pp := rp + ".ports[" + strconv.Itoa(k) + "]"
		portOK := true
		switch {
		case ps.Port == 0 && !v.present(pp+".port"):
			v.need(pp+".port", "required")
			portOK = false
		case ps.Port < 1 || ps.Port > 65535:
			v.add(pp+".port", "%d is not a port (1-65535)", ps.Port)
			portOK = false
		}
		proto, ok := parseProtocol(ps.Protocol)
		switch {
		case ps.Protocol == "" && v.present(pp+".protocol"):
			v.add(pp+".protocol", "must not be empty (TCP or UDP; omit it for TCP)")
			continue
		case !ok && (strings.EqualFold(ps.Protocol, "tcp") || strings.EqualFold(ps.Protocol, "udp")):
			v.add(pp+".protocol", "%s is not a protocol (write %s)", quote(ps.Protocol), strings.ToUpper(ps.Protocol))
			continue
		case !ok:
			v.add(pp+".protocol", "%s is not a protocol (TCP or UDP)", quote(ps.Protocol))
			continue
		}
		if proto == ProtoUDP {
			switch {
			case mode == ModeTrusted:
				v.add(pp+".protocol", "UDP is not possible with mode trusted (TLS and HPKE run over TCP)")
			case mode == ModeSecure:
				v.add(pp+".protocol", "UDP is not possible with mode secure (sealed streams run over TCP)")
			case mode == ModeOpen && openProto == "http":
				v.add(pp+".protocol", "UDP is not possible with open.protocol http (HTTP runs over TCP)")
			case mode == ModeOpen && openProto == "postgres":
				v.add(pp+".protocol", "UDP is not possible with open.protocol postgres (PostgreSQL runs over TCP)")
			case mode == ModeOpen && openProto != "tcp":
				v.add(pp+".protocol", "UDP is not possible with open.protocol %s (extensions serve TCP flows)", openProto)
			}
		}
		if !portOK {
			continue
		}
		key := PortProto{Port: uint16(ps.Port), Proto: proto}
		if j, dup := first[key]; dup {
			v.add(pp, "duplicate of ports[%d] (%s)", j, key)
		} else {
			first[key] = k
		}
	}
}

// extensionNameRE is what an extension's name (an open.protocol served by
// an out-of-process privacy proxy) may look like.
var extensionNameRE = regexp.MustCompile(`^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$`)

func (v *validator) open(path string, o *OpenSpec) {
	proto := o.Protocol
	switch proto {
	case "http", "tcp", "postgres":
	case "":
		if v.present(path + ".protocol") {
			v.add(path+".protocol", "must not be empty (http, tcp or postgres; omit it for tcp)")
			return
		}
		proto = "tcp"
	default:
		// Any other protocol names a privacy-proxy extension (cleanwalld
		// --extension NAME=unix:/path, docs/extensions.md): whether one of
		// that name is configured is checked where the policy is admitted.
		if !extensionNameRE.MatchString(proto) {
			v.add(path+".protocol", "%s is not an open protocol (http, tcp, or the name of an extension: a lowercase DNS label starting with a letter)", quote(o.Protocol))
			return
		}
	}
	if proto != "http" && o.HTTP != nil {
		v.add(path+".http", "only allowed with open.protocol http (this rule's protocol is %s)", proto)
	}
	if proto == "http" {
		if o.HTTP == nil {
			v.need(path+".http", "required with open.protocol http (a request must match at least one of its rules)")
		} else {
			v.http(path+".http", o.HTTP)
		}
	}
	if proto != "postgres" && o.Postgres != nil {
		v.add(path+".postgres", "only allowed with open.protocol postgres (this rule's protocol is %s)", proto)
	}
	if proto == "postgres" {
		if o.Postgres == nil {
			v.need(path+".postgres", "required with open.protocol postgres (database, upstream login and queries)")
		} else {
			v.postgres(path+".postgres", o.Postgres)
		}
	}
	if o.TCP != nil && o.TCP.MaxBytesOut != nil && *o.TCP.MaxBytesOut <= 0 {
		v.add(path+".tcp.maxBytesOut", "%d: must be greater than 0 (omit it for no budget)", *o.TCP.MaxBytesOut)
	}
}

func (v *validator) postgres(path string, p *PostgresSpec) {
	if p.Database == "" {
		v.need(path+".database", "required (the upstream database the proxy connects to)")
	}
	if p.UpstreamUserFile == "" {
		v.need(path+".upstreamUserFile", "required (a file holding the upstream user)")
	}
	if p.UpstreamPasswordFile == "" {
		v.need(path+".upstreamPasswordFile", "required (a file holding the upstream password)")
	}
	if p.UpstreamTLS != nil {
		v.tls(path+".upstreamTLS", p.UpstreamTLS, false)
	}
	if len(p.Queries) == 0 {
		v.need(path+".queries", "at least one query (only listed statements run)")
	}
	first := make(map[string]int, len(p.Queries))
	for i, q := range p.Queries {
		qp := path + ".queries[" + strconv.Itoa(i) + "]"
		switch {
		case q.Name == "":
			v.need(qp+".name", "required")
		case !isDNSLabel(q.Name):
			v.add(qp+".name", "%s is not a DNS label (%s)", quote(q.Name), labelRules)
		default:
			if j, dup := first[q.Name]; dup {
				v.add(qp+".name", "%s is the name of queries[%d] already", quote(q.Name), j)
			} else {
				first[q.Name] = i
			}
		}
		if strings.TrimSpace(q.SQL) == "" {
			v.need(qp+".sql", "required (one SQL statement)")
		}
	}
	if c := p.Columns; c != nil {
		for i, name := range c.Deny {
			if strings.TrimSpace(name) == "" {
				v.add(path+".columns.deny["+strconv.Itoa(i)+"]", "must not be empty (a result column name)")
			}
		}
	}
	if r := p.Rows; r != nil {
		if r.MaxRows != nil && *r.MaxRows <= 0 {
			v.add(path+".rows.maxRows", "%d: must be greater than 0 (omit it for no limit)", *r.MaxRows)
		}
		if m := r.MinCount; m != nil {
			if strings.TrimSpace(m.Column) == "" {
				v.need(path+".rows.minCount.column", "required (the count column of the listed queries)")
			}
			if m.AtLeast < 1 {
				v.add(path+".rows.minCount.atLeast", "%d: must be at least 1", m.AtLeast)
			}
		}
	}
}

// httpMethods are the methods an open HTTP rule may allow; refusedMethods
// say why the others that a policy author might try are not among them.
var (
	httpMethods    = map[string]bool{"GET": true, "HEAD": true, "POST": true, "PUT": true, "PATCH": true, "DELETE": true, "OPTIONS": true}
	refusedMethods = map[string]string{
		"CONNECT": "CONNECT is refused: it opens a tunnel the proxy cannot inspect",
		"TRACE":   "TRACE is refused: it echoes the request, headers included, back to the sender",
	}
)

func (v *validator) http(path string, h *HTTPSpec) {
	if len(h.Rules) == 0 {
		v.need(path+".rules", "at least one rule (a request must match one)")
	}
	for i := range h.Rules {
		r := &h.Rules[i]
		rp := path + ".rules[" + strconv.Itoa(i) + "]"
		if len(r.Methods) == 0 {
			v.need(rp+".methods", "at least one method")
		}
		for j, m := range r.Methods {
			mp := rp + ".methods[" + strconv.Itoa(j) + "]"
			up := strings.ToUpper(m)
			switch {
			case httpMethods[m]:
			case refusedMethods[up] != "":
				v.add(mp, "%s", refusedMethods[up])
			case httpMethods[up]:
				v.add(mp, "%s is not a method (methods are uppercase: %s)", quote(m), up)
			default:
				v.add(mp, "%s is not a supported method (GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS)", quote(m))
			}
		}
		if len(r.Paths) == 0 {
			v.need(rp+".paths", "at least one path (\"/**\" matches every path)")
		}
		for j, s := range r.Paths {
			if problem := pathProblem(s); problem != "" {
				v.add(rp+".paths["+strconv.Itoa(j)+"]", "%s: %s", quote(s), problem)
			}
		}
		if r.ContentTypes != nil && len(r.ContentTypes) == 0 || r.ContentTypes == nil && v.present(rp+".contentTypes") {
			v.add(rp+".contentTypes", "at least one content type (omit contentTypes to allow any)")
		}
		for j, ct := range r.ContentTypes {
			if problem := mediaTypeProblem(strings.ToLower(ct)); problem != "" {
				v.add(rp+".contentTypes["+strconv.Itoa(j)+"]", "%s is not a media type: %s", quote(ct), problem)
			}
		}
	}
	if h.MaxBodyBytes != nil && *h.MaxBodyBytes < 0 {
		v.add(path+".maxBodyBytes", "%d: must be 0 or more (0 allows no request body)", *h.MaxBodyBytes)
	}
	for i, pat := range h.DenyBodyPatterns {
		pp := path + ".denyBodyPatterns[" + strconv.Itoa(i) + "]"
		if pat == "" {
			v.add(pp, "empty pattern (it would match every body)")
			continue
		}
		if _, err := regexp.Compile(pat); err != nil {
			v.add(pp, "%v", err)
		}
	}
	for i, pat := range h.DenyPatterns {
		pp := path + ".denyPatterns[" + strconv.Itoa(i) + "]"
		if pat == "" {
			v.add(pp, "empty pattern (it would match every request)")
			continue
		}
		re, err := regexp.Compile(pat)
		switch {
		case err != nil:
			v.add(pp, "%v", err)
		case re.MatchString(""):
			// "a*" or "x?" would match every path, query and field value:
			// the rule would refuse everything.
			v.add(pp, "%s matches the empty string: a deny pattern must need at least one character to match", quote(pat))
		}
	}
}

// pathProblem explains why s is not a path pattern, or returns "".
func pathProblem(s string) string {
	if !strings.HasPrefix(s, "/") {
		return "must start with \"/\""
	}
	if strings.ContainsAny(s, "?#") {
		return "a path pattern has no query or fragment"
	}
	segs := strings.Split(s[1:], "/")
	for i, seg := range segs {
		last := i == len(segs)-1
		switch {
		case seg == "" && !last:
			return "empty segment (\"//\")"
		case seg == "**" && !last:
			return "\"**\" is only allowed as the last segment"
		case seg == "*" || seg == "**":
		case strings.Contains(seg, "*"):
			return "\"*\" and \"**\" must be whole segments"
		case seg == "." || seg == "..":
			return "dot segments never match (the proxy matches normalised paths)"
		}
		for k := 0; k < len(seg); k++ {
			c := seg[k]
			switch {
			case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', strings.IndexByte("-._~!$&'()*+,;=:@", c) >= 0:
			case c == '%' && k+2 < len(seg) && isHex(seg[k+1]) && isHex(seg[k+2]):
				k += 2
			default:
				return "invalid character " + quote(seg[k:k+1]) + " (percent-encode it)"
			}
		}
	}
	return ""
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// mediaTypeProblem explains why s (lowercased) is not type/subtype, or
// returns "".
func mediaTypeProblem(s string) string {
	if strings.Contains(s, ";") {
		return "parameters are not matched (write type/subtype only)"
	}
	typ, sub, ok := strings.Cut(s, "/")
	if !ok {
		return "want type/subtype"
	}
	if typ == "*" || sub == "*" {
		return "wildcards are not allowed (list each media type)"
	}
	if !isToken(typ) || !isToken(sub) {
		return "want type/subtype, each an HTTP token"
	}
	return ""
}

// isToken reports whether s is an RFC 9110 token.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := range len(s) {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

func (v *validator) trusted(path string, t *TrustedSpec) {
	if t.UpstreamPort != nil && (*t.UpstreamPort < 1 || *t.UpstreamPort > 65535) {
		v.add(path+".upstreamPort", "%d is not a port (1-65535)", *t.UpstreamPort)
	}
	if t.TLS == nil && t.HPKE == nil {
		v.need(path, "needs tls and/or hpke")
	}
	if t.TLS != nil {
		v.tls(path+".tls", t.TLS, true)
	}
	if t.HPKE != nil && t.HPKE.PublicKeyFile == "" {
		v.need(path+".hpke.publicKeyFile", "required")
	}
}

// tls checks trusted.tls (strict: the customer's trust must be spelt out)
// and secure.upstreamTLS (every field optional).
func (v *validator) tls(path string, t *TLSSpec, strict bool) {
	switch {
	case t.ServerName != "":
		if problem := hostnameProblem(normName(t.ServerName)); problem != "" {
			v.add(path+".serverName", "%s is not a hostname: %s", quote(t.ServerName), problem)
		}
	case strict:
		v.need(path+".serverName", "required (the SNI and the name the upstream's certificate must carry)")
	default:
		v.notEmpty(path+".serverName", t.ServerName)
	}
	v.notEmpty(path+".caFile", t.CAFile)
	if strict && t.CAFile == "" && len(t.SPKISHA256) == 0 {
		v.need(path, "needs caFile and/or spkiSHA256 (what the upstream's certificate is verified against)")
	}
	v.notEmpty(path+".clientCertFile", t.ClientCertFile)
	v.notEmpty(path+".clientKeyFile", t.ClientKeyFile)
	switch {
	case t.ClientCertFile != "" && t.ClientKeyFile == "":
		v.need(path+".clientKeyFile", "required with clientCertFile (mTLS needs both)")
	case t.ClientKeyFile != "" && t.ClientCertFile == "":
		v.need(path+".clientCertFile", "required with clientKeyFile (mTLS needs both)")
	}
	switch t.MinVersion {
	case "1.2", "1.3":
	case "":
		v.notEmpty(path+".minVersion", t.MinVersion)
	default:
		v.add(path+".minVersion", "%s is not a TLS version this proxy speaks (1.2 or 1.3)", quote(t.MinVersion))
	}
}

var keyIDRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)

func (v *validator) secure(path string, s *SecureSpec) {
	switch {
	case s.KeyID == "":
		v.need(path+".keyID", "required (the key the key broker releases after attestation)")
	case !keyIDRE.MatchString(s.KeyID):
		v.add(path+".keyID", "%s is not a key id (1-128 of A-Z a-z 0-9 . _ -)", quote(s.KeyID))
	}
	switch s.Protocol {
	case "http", "tcp":
	case "":
		v.need(path+".protocol", "required: http (bodies sealed per object) or tcp (the stream is sealed)")
	default:
		v.add(path+".protocol", "%s is not a secure protocol (http or tcp)", quote(s.Protocol))
	}
	if s.UpstreamTLS != nil {
		v.tls(path+".upstreamTLS", s.UpstreamTLS, false)
	}
}

// volumeSectorSize is the unit a block volume's size is counted in.
const volumeSectorSize = 4096

func (v *validator) volumes() {
	names := map[string]int{}
	paths := map[string]int{}
	for i := range v.p.Spec.Volumes {
		vp := "spec.volumes[" + strconv.Itoa(i) + "]"
		vol := &v.p.Spec.Volumes[i]
		switch {
		case vol.Name == "":
			v.need(vp+".name", "required")
		case !isDNSLabel(vol.Name):
			v.add(vp+".name", "%s is not a DNS label (%s)", quote(vol.Name), labelRules)
		default:
			if j, dup := names[vol.Name]; dup {
				v.add(vp+".name", "duplicate volume name %s (first at spec.volumes[%d])", quote(vol.Name), j)
			} else {
				names[vol.Name] = i
			}
		}
		switch vol.Kind {
		case "":
			v.need(vp+".kind", "required (files or block)")
		case VolumeFiles:
			if vol.SizeBytes != 0 {
				v.add(vp+".sizeBytes", "only for kind block (a files volume grows with its files)")
			}
		case VolumeBlock:
			switch {
			case vol.SizeBytes == 0:
				v.need(vp+".sizeBytes", "required with kind block (a positive multiple of %d)", volumeSectorSize)
			case vol.SizeBytes < 0 || vol.SizeBytes%volumeSectorSize != 0:
				v.add(vp+".sizeBytes", "%d: must be a positive multiple of %d", vol.SizeBytes, volumeSectorSize)
			}
		default:
			v.add(vp+".kind", "%s: must be files or block", quote(vol.Kind))
		}
		v.absPath(vp+".store", vol.Store, "the backing directory or image on the node")
		switch {
		case vol.KeyID == "":
			v.need(vp+".keyID", "required (the key the key broker releases after attestation)")
		case !keyIDRE.MatchString(vol.KeyID):
			v.add(vp+".keyID", "%s is not a key id (1-128 of A-Z a-z 0-9 . _ -)", quote(vol.KeyID))
		}
		if v.absPath(vp+".path", vol.Path, "where the sandbox sees the volume") {
			if j, dup := paths[vol.Path]; dup {
				v.add(vp+".path", "%s is also the path of spec.volumes[%d]", quote(vol.Path), j)
			} else {
				paths[vol.Path] = i
			}
		}
	}
}

// absPath checks a required absolute, clean path; it reports whether the
// path is good.
func (v *validator) absPath(path, value, what string) bool {
	switch {
	case value == "":
		v.need(path, "required (%s, an absolute path)", what)
	case !strings.HasPrefix(value, "/") || value == "/":
		v.add(path, "%s: must be an absolute path other than /", quote(value))
	case pathpkg.Clean(value) != value:
		v.add(path, "%s: must be clean (%s)", quote(value), quote(pathpkg.Clean(value)))
	case strings.ContainsAny(value, "\x00\n"):
		v.add(path, "%s: must not hold NUL or newline", quote(value))
	default:
		return true
	}
	return false
}
