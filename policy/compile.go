package policy

import (
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
)

// Compiled is a validated policy in the shapes its consumers need: rules
// by id for the proxies, datapath entries for the cidr destinations, the
// DNS allow list, and what the author should be warned about.
type Compiled struct {
	Name string
	// Hash is Policy.Hash(): the identity of the policy's meaning.
	Hash string
	// Policy is the normalised policy; Rules[i].Spec point into it.
	Policy *Policy
	// Rules are in file order: Rules[i].ID == uint32(i+1); id 0 means "no
	// rule" in the datapath.
	Rules []*Rule
	// Entries are the datapath entries of the cidr destinations, one per
	// (prefix, proto, port), in file order. A key that several rules name
	// belongs to the first of them.
	Entries []Entry
	// DNS is nil when spec.dns is absent: every query is refused.
	DNS      *DNS
	Warnings []Warning

	table  *lpmTable
	byName map[string][]*Rule
}

// Entry is one datapath entry: flows to Prefix on Proto/Port go to the
// proxy of rule RuleID.
type Entry struct {
	Prefix netip.Prefix
	Proto  Protocol
	Port   uint16
	RuleID uint32
}

// Rule is a compiled egress rule.
type Rule struct {
	ID    uint32
	Name  string
	Mode  Mode
	CIDRs []netip.Prefix // canonical, duplicates dropped, file order
	FQDNs []string       // normalised, duplicates dropped, file order
	Ports []PortProto
	// Spec is the rule as written (normalised), for the proxies.
	Spec *EgressRule
	// Path is the rule's field path, "spec.egress[3]".
	Path string
}

// fqdnKey identifies an fqdn destination on a port; cidr destinations
// are keyed in the lpmTable.
type fqdnKey struct {
	name string
	pp   PortProto
}

// Compile validates p and compiles it. It does not modify p and touches
// nothing outside its result.
func Compile(p *Policy) (*Compiled, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	q := p.Clone()
	q.normalize()
	c := &Compiled{
		Name:   q.Metadata.Name,
		Hash:   q.digest(),
		Policy: q,
		Rules:  make([]*Rule, len(q.Spec.Egress)),
		table:  newLPMTable(),
		byName: map[string][]*Rule{},
	}
	l := &linter{lines: q.lines, byRule: make([][]Warning, len(q.Spec.Egress))}
	if q.Spec.DNS != nil {
		c.DNS = compileDNS(q.Spec.DNS)
		l.dns(q.Spec.DNS)
	}
	entries := 0
	for _, r := range q.Spec.Egress {
		entries += len(r.To) * len(r.Ports)
	}
	c.Entries = make([]Entry, 0, entries)
	fqdnOwners := map[fqdnKey]uint32{}
	for i := range q.Spec.Egress {
		spec := &q.Spec.Egress[i]
		mode, _ := parseMode(spec.Mode)
		r := &Rule{
			ID:   uint32(i + 1),
			Name: spec.Name,
			Mode: mode,
			Spec: spec,
			Path: "spec.egress[" + strconv.Itoa(i) + "]",
		}
		c.Rules[i] = r
		for _, ps := range spec.Ports {
			proto, _ := parseProtocol(ps.Protocol)
			r.Ports = append(r.Ports, PortProto{Port: uint16(ps.Port), Proto: proto})
		}
		r.CIDRs = make([]netip.Prefix, 0, len(spec.To))
		groups := make([]*lpmGroup, len(r.Ports))
		for k, pp := range r.Ports {
			groups[k] = c.table.group(pp)
		}
		ov := overlaps{}
		seenCIDR := make(map[netip.Prefix]int, len(spec.To))
		seenFQDN := map[string]int{}
		for j, d := range spec.To {
			if d.FQDN != "" {
				if first, dup := seenFQDN[d.FQDN]; dup {
					l.warn(i, toPath(r.Path, j), "duplicate of to[%d] (fqdn %s)", first, d.FQDN)
					continue
				}
				seenFQDN[d.FQDN] = j
				r.FQDNs = append(r.FQDNs, d.FQDN)
				c.byName[d.FQDN] = append(c.byName[d.FQDN], r)
				for _, pp := range r.Ports {
					k := fqdnKey{d.FQDN, pp}
					if owner, taken := fqdnOwners[k]; taken {
						ov.add(owner, overlapKey{fqdn: d.FQDN, pp: pp})
					} else {
						fqdnOwners[k] = r.ID
						ov.total++
					}
				}
				continue
			}
			pfx, _ := parseCIDR(d.CIDR)
			if first, dup := seenCIDR[pfx]; dup {
				l.warn(i, toPath(r.Path, j), "duplicate of to[%d] (cidr %s)", first, pfx)
				continue
			}
			seenCIDR[pfx] = j
			r.CIDRs = append(r.CIDRs, pfx)
			for k, pp := range r.Ports {
				if owner, added := groups[k].insert(pfx, r.ID); !added {
					ov.add(owner, overlapKey{cidr: pfx, pp: pp})
					continue
				}
				ov.total++
				c.Entries = append(c.Entries, Entry{Prefix: pfx, Proto: pp.Proto, Port: pp.Port, RuleID: r.ID})
			}
		}
		l.rule(i, r, c.DNS, &ov, c.Rules)
	}
	l.specificity(c)
	for _, ws := range l.byRule {
		l.warnings = append(l.warnings, ws...)
	}
	c.Warnings = l.warnings
	return c, nil
}

// Match finds the rule a flow to dst on proto/port is redirected for,
// exactly as the datapath does: among the entries for proto and port whose
// prefix contains dst, the longest prefix wins (identical prefixes were
// given to the first rule in file order). An IPv4-mapped IPv6 dst is IPv6:
// it matches IPv6 prefixes only.
func (c *Compiled) Match(dst netip.Addr, proto Protocol, port uint16) (*Rule, bool) {
	id := c.table.lookup(dst.WithZone(""), PortProto{Port: port, Proto: proto})
	if id == 0 {
		return nil, false
	}
	return c.Rules[id-1], true
}

// Rule returns the rule with id, or nil (id 0 is "no rule").
func (c *Compiled) Rule(id uint32) *Rule {
	if id == 0 || int(id) > len(c.Rules) {
		return nil
	}
	return c.Rules[id-1]
}

// RulesForName returns the rules with an fqdn destination equal to name
// (case and one trailing dot do not matter), in file order. The slice is
// shared: do not modify it.
func (c *Compiled) RulesForName(name string) []*Rule {
	return c.byName[normName(name)]
}

// EntriesForName returns the datapath entries that an address learnt for
// name opens: addr as a host prefix on every port of every rule that
// names it, the first rule in file order owning each (proto, port). Where
// an earlier rule has a cidr entry with the same key, that entry stands and
// none is returned; where a later rule has one, the returned entry replaces
// it for as long as the address is valid (the caller restores the cidr
// entry when it expires). The same holds between addresses learnt for
// different names: the lower rule id wins.
func (c *Compiled) EntriesForName(name string, addr netip.Addr) []Entry {
	rules := c.RulesForName(name)
	if len(rules) == 0 || !addr.IsValid() {
		return nil
	}
	addr = addr.WithZone("")
	pfx := netip.PrefixFrom(addr, addr.BitLen())
	var out []Entry
	for _, r := range rules {
		for _, pp := range r.Ports {
			if slices.ContainsFunc(out, func(e Entry) bool { return e.Proto == pp.Proto && e.Port == pp.Port }) {
				continue
			}
			if owner := c.table.owner(pfx, pp); owner != 0 && owner < r.ID {
				continue
			}
			out = append(out, Entry{Prefix: pfx, Proto: pp.Proto, Port: pp.Port, RuleID: r.ID})
		}
	}
	return out
}

// overlaps tallies, for one rule, the (destination, port) keys that
// earlier rules own already.
type overlaps struct {
	total   int // keys the rule owns
	taken   int // keys earlier rules own
	byOwner map[uint32]*overlap
	owners  []uint32 // in order of first overlap
}

type overlap struct {
	count   int
	example overlapKey
}

// overlapKey is a (destination, port) key, formatted only when warned about.
type overlapKey struct {
	cidr netip.Prefix
	fqdn string
	pp   PortProto
}

func (k overlapKey) String() string {
	if k.fqdn != "" {
		return "fqdn " + k.fqdn + " " + k.pp.String()
	}
	return k.cidr.String() + " " + k.pp.String()
}

func (o *overlaps) add(owner uint32, example overlapKey) {
	o.taken++
	if o.byOwner == nil {
		o.byOwner = map[uint32]*overlap{}
	}
	x := o.byOwner[owner]
	if x == nil {
		x = &overlap{example: example}
		o.byOwner[owner] = x
		o.owners = append(o.owners, owner)
	}
	x.count++
}

// linter collects warnings: per rule, so that the policy-wide passes can
// add to a rule's list and the result still reads in file order.
type linter struct {
	lines    map[string]int
	warnings []Warning   // policy-wide (spec.dns)
	byRule   [][]Warning // by rule index
}

func (l *linter) add(path, format string, args ...any) {
	l.warnings = append(l.warnings, Warning{Path: path, Msg: fmt.Sprintf(format, args...), Line: lineOf(l.lines, path)})
}

func (l *linter) warn(rule int, path, format string, args ...any) {
	l.byRule[rule] = append(l.byRule[rule], Warning{Path: path, Msg: fmt.Sprintf(format, args...), Line: lineOf(l.lines, path)})
}

func (l *linter) dns(d *DNSSpec) {
	seen := map[string]int{}
	for i, a := range d.Allow {
		if first, dup := seen[a]; dup {
			l.add("spec.dns.allow["+strconv.Itoa(i)+"]", "duplicate of allow[%d] (%s)", first, a)
		} else {
			seen[a] = i
		}
		if suffix, ok := cutWildcard(a); ok {
			// A reviewer should know: the labels before the suffix are the
			// sandbox's to choose, and the resolver carries them on.
			l.add("spec.dns.allow["+strconv.Itoa(i)+"]",
				"wildcard: the sandbox chooses the labels under %s, so every query can carry data in them to that domain's name servers (bounded by the DNS rate limit); list exact names where you can", suffix)
		}
	}
	seenType := map[string]int{}
	for i, t := range d.QueryTypes {
		if first, dup := seenType[t]; dup {
			l.add("spec.dns.queryTypes["+strconv.Itoa(i)+"]", "duplicate of queryTypes[%d] (%s)", first, t)
		} else {
			seenType[t] = i
		}
	}
}

// rule warns about what makes rule r (index i) unreachable in part or in
// whole.
func (l *linter) rule(i int, r *Rule, dns *DNS, ov *overlaps, rules []*Rule) {
	for k, pp := range r.Ports {
		if pp.Port == 53 {
			l.warn(i, r.Path+".ports["+strconv.Itoa(k)+"]", "port 53 never reaches this rule: every DNS flow goes to the DNS proxy")
		}
	}
	unlearnable := 0
	for _, name := range r.FQDNs {
		if !dns.Allowed(name) {
			unlearnable++
		}
	}
	if unlearnable > 0 {
		whole := unlearnable == len(r.FQDNs) && len(r.CIDRs) == 0
		for j, d := range r.Spec.To {
			if d.FQDN == "" || dns.Allowed(d.FQDN) {
				continue
			}
			msg := "fqdn " + d.FQDN + " is not in spec.dns.allow: its addresses can never be learnt"
			if dns == nil {
				msg = "fqdn " + d.FQDN + " can never be resolved: spec.dns is absent, so every query is refused"
			}
			if whole {
				msg += ", the rule is unreachable"
			}
			l.warn(i, toPath(r.Path, j)+".fqdn", "%s", msg)
		}
	}
	if t := r.Spec.Trusted; t != nil && t.TLS != nil {
		l.pins(i, r.Path+".trusted.tls", t.TLS)
	}
	if s := r.Spec.Secure; s != nil && s.UpstreamTLS != nil {
		l.pins(i, r.Path+".secure.upstreamTLS", s.UpstreamTLS)
	}
	if ov.taken == 0 {
		return
	}
	if ov.total == 0 {
		l.warn(i, r.Path, "shadowed: every destination and port is matched by an earlier rule (%s), this rule never matches", ownerPaths(ov, rules))
		return
	}
	for _, owner := range ov.owners {
		x := ov.byOwner[owner]
		l.warn(i, r.Path, "partially overlaps %s: %d of its destination-port pairs belong to that earlier rule (first: %s)",
			rules[owner-1].Path, x.count, x.example)
	}
}

func ownerPaths(ov *overlaps, rules []*Rule) string {
	s := ""
	for k, owner := range ov.owners {
		if k > 0 {
			s += ", "
		}
		s += rules[owner-1].Path
	}
	return s
}

// pins warns about spkiSHA256 entries that cannot be a pin. docs/policy.md's own
// example carries a placeholder there and must load, so a malformed pin is
// not an error; it can never match, and TLSSpec.Pins makes the proxy refuse
// the rule's connections.
func (l *linter) pins(i int, path string, t *TLSSpec) {
	for k, pin := range t.SPKISHA256 {
		if _, err := decodePin(pin); err != nil {
			l.warn(i, path+".spkiSHA256["+strconv.Itoa(k)+"]", "%v: this pin can never match, connections through the rule are refused", err)
		}
	}
}

// specificity reports cidr entries of a rule that take traffic from a
// broader prefix of an earlier rule: informational, since that is what
// "the most specific prefix wins" means, but easy to miss when reading a
// policy from top to bottom. One warning per pair of rules.
func (l *linter) specificity(c *Compiled) {
	type pair struct{ later, earlier uint32 }
	type tally struct {
		count   int
		example string
	}
	found := map[pair]*tally{}
	var order []pair
	for _, e := range c.Entries {
		pp := PortProto{Port: e.Port, Proto: e.Proto}
		c.table.covering(e.Prefix, pp, func(cover netip.Prefix, owner uint32) {
			if owner >= e.RuleID {
				return
			}
			k := pair{e.RuleID, owner}
			t := found[k]
			if t == nil {
				t = &tally{example: fmt.Sprintf("%s inside %s on %s", e.Prefix, cover, pp)}
				found[k] = t
				order = append(order, k)
			}
			t.count++
		})
	}
	for _, k := range order {
		t := found[k]
		later := c.Rules[k.later-1]
		l.warn(int(k.later-1), later.Path, "takes traffic from the earlier %s: %d of its (prefix, port) entries are more specific than that rule's (first: %s), and the most specific prefix wins",
			c.Rules[k.earlier-1].Path, t.count, t.example)
	}
}

// Pins returns the SHA-256 digests of spkiSHA256. A proxy must refuse the
// rule's connections when it returns an error: a malformed pin is accepted
// by Parse (with a warning from Compile) but must never weaken the check.
func (t *TLSSpec) Pins() ([][sha256.Size]byte, error) {
	pins := make([][sha256.Size]byte, 0, len(t.SPKISHA256))
	for i, s := range t.SPKISHA256 {
		pin, err := decodePin(s)
		if err != nil {
			return nil, fmt.Errorf("spkiSHA256[%d]: %w", i, err)
		}
		pins = append(pins, pin)
	}
	return pins, nil
}

func decodePin(s string) ([sha256.Size]byte, error) {
	var pin [sha256.Size]byte
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(b) != sha256.Size {
		return pin, fmt.Errorf("%s is not the base64 of a SHA-256 digest (32 bytes)", quote(s))
	}
	copy(pin[:], b)
	return pin, nil
}
