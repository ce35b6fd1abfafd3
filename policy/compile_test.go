package policy

import (
	"errors"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
)

func mustCompile(t *testing.T, y string) *Compiled {
	t.Helper()
	p, err := Parse([]byte(y))
	if err != nil {
		t.Fatalf("Parse: %v\n%s", err, y)
	}
	c, err := Compile(p)
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	return c
}

func warningsAt(c *Compiled, path string) []string {
	var msgs []string
	for _, w := range c.Warnings {
		if w.Path == path {
			msgs = append(msgs, w.Msg)
		}
	}
	return msgs
}

// docs/policy.md promises that its example works exactly as written.
func TestPolicyMDExample(t *testing.T) {
	data, err := os.ReadFile("testdata/policy-md-example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c := mustCompile(t, string(data))

	eq(t, c.Name, "analytics")
	eq(t, len(c.Rules), 3)
	for i, want := range []struct {
		name string
		mode Mode
	}{{"results-api", ModeOpen}, {"partner", ModeTrusted}, {"blob-store", ModeSecure}} {
		r := c.Rules[i]
		if r.ID != uint32(i+1) || r.Name != want.name || r.Mode != want.mode || c.Rule(r.ID) != r {
			t.Errorf("rule %d = %d %s %s, want %s %s", i, r.ID, r.Name, r.Mode, want.name, want.mode)
		}
	}
	results := c.Rules[0]
	eq(t, results.Path, "spec.egress[0]")
	eq(t, results.Spec.Open.Protocol, "http")
	eq(t, *results.Spec.Open.HTTP.MaxBodyBytes, int64(1048576))
	eq(t, *results.Spec.Open.TCP.MaxBytesOut, int64(10485760))
	eq(t, results.Spec.Open.HTTP.DenyBodyPatterns[0], `\b\d{3}-\d{2}-\d{4}\b`)
	eq(t, results.Spec.Trusted == nil && results.Spec.Secure == nil, true)
	eq(t, c.Rules[1].Spec.Trusted.TLS.ClientKeyFile, "/etc/cleanwall/client.key")
	eq(t, *c.Rules[1].Spec.Trusted.UpstreamPort, 443)
	eq(t, c.Rules[2].Spec.Secure.KeyID, "egress-dek")

	want := []Entry{{Prefix: netip.MustParsePrefix("198.51.100.10/32"), Proto: ProtoTCP, Port: 8080, RuleID: 1}}
	if !slices.Equal(c.Entries, want) {
		t.Errorf("entries %v, want %v", c.Entries, want)
	}
	if r, ok := c.Match(netip.MustParseAddr("198.51.100.10"), ProtoTCP, 8080); !ok || r != results {
		t.Errorf("Match(198.51.100.10, 8080/TCP) = %v, %v", r, ok)
	}
	if _, ok := c.Match(netip.MustParseAddr("198.51.100.10"), ProtoTCP, 80); ok {
		t.Error("port 80 of a cidr that only opens 8080 matched")
	}
	if rs := c.RulesForName("API.Example.test."); len(rs) != 1 || rs[0] != results {
		t.Errorf("RulesForName(api.example.test) = %v", rs)
	}
	if rs := c.RulesForName("blob.store.example.test"); len(rs) != 1 || rs[0].Name != "blob-store" {
		t.Errorf("RulesForName(blob.store.example.test) = %v", rs)
	}

	eq(t, c.DNS.Upstream, netip.MustParseAddrPort("198.51.100.53:53"))
	eq(t, c.DNS.Allowed("api.example.test"), true)
	eq(t, c.DNS.Allowed("blob.store.example.test"), true)
	eq(t, c.DNS.Allowed("partner.example.test"), false)
	if !slices.Equal(c.DNS.QueryTypes, []uint16{1, 28, 5}) {
		t.Errorf("query types %v", c.DNS.QueryTypes)
	}

	// Exactly two things in the example can never work, and Compile says
	// so; its wildcard DNS entry gets the reviewer's warning.
	var got []string
	for _, w := range c.Warnings {
		got = append(got, w.Path)
	}
	wantPaths := []string{"spec.dns.allow[1]", "spec.egress[1].to[0].fqdn", "spec.egress[1].trusted.tls.spkiSHA256[0]"}
	if !slices.Equal(got, wantPaths) {
		t.Fatalf("warnings %v, want %v", c.Warnings, wantPaths)
	}
	if !strings.Contains(c.Warnings[0].Msg, "wildcard: the sandbox chooses the labels under store.example.test") {
		t.Errorf("warning: %v", c.Warnings[0])
	}
	if !strings.Contains(c.Warnings[1].Msg, "partner.example.test is not in spec.dns.allow") || !strings.Contains(c.Warnings[1].Msg, "the rule is unreachable") {
		t.Errorf("warning: %v", c.Warnings[1])
	}
	eq(t, c.Warnings[1].Line, 36)
	if _, err := c.Rules[1].Spec.Trusted.TLS.Pins(); err == nil {
		t.Error("the placeholder pin decoded")
	}
}

const oneRule = "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 443}], mode: open}"

func TestFirstRuleOwnsIdenticalEntries(t *testing.T) {
	c := mustCompile(t, doc("",
		"{name: a, to: [{cidr: 10.0.0.0/8}, {cidr: 192.0.2.0/24}], ports: [{port: 443}, {port: 53000, protocol: UDP}], mode: open}",
		"{name: b, to: [{cidr: 10.0.0.0/8}], ports: [{port: 443}], mode: open}",
		"{name: c, to: [{cidr: 10.0.0.0/8}, {cidr: 198.51.100.0/24}], ports: [{port: 443}], mode: open}",
	))
	var got []string
	for _, e := range c.Entries {
		got = append(got, e.Prefix.String()+" "+PortProto{e.Port, e.Proto}.String()+" "+c.Rule(e.RuleID).Name)
	}
	want := []string{
		"10.0.0.0/8 443/TCP a", "10.0.0.0/8 53000/UDP a", "192.0.2.0/24 443/TCP a", "192.0.2.0/24 53000/UDP a",
		"198.51.100.0/24 443/TCP c",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("entries\n%v\nwant\n%v", got, want)
	}
	if r, _ := c.Match(netip.MustParseAddr("10.9.9.9"), ProtoTCP, 443); r.Name != "a" {
		t.Errorf("10.9.9.9 went to %s", r.Name)
	}
	if r, _ := c.Match(netip.MustParseAddr("10.9.9.9"), ProtoUDP, 53000); r.Name != "a" {
		t.Errorf("10.9.9.9 UDP went to %s", r.Name)
	}
	if _, ok := c.Match(netip.MustParseAddr("10.9.9.9"), ProtoUDP, 443); ok {
		t.Error("UDP 443 matched a TCP-only entry")
	}

	b := warningsAt(c, "spec.egress[1]")
	if len(b) != 1 || !strings.Contains(b[0], "shadowed") || !strings.Contains(b[0], "spec.egress[0]") {
		t.Errorf("rule b warnings: %q", b)
	}
	cw := warningsAt(c, "spec.egress[2]")
	if len(cw) != 1 || !strings.Contains(cw[0], "partially overlaps spec.egress[0]: 1 of its destination-port pairs") || !strings.Contains(cw[0], "10.0.0.0/8 443/TCP") {
		t.Errorf("rule c warnings: %q", cw)
	}
}

func TestMostSpecificPrefixWins(t *testing.T) {
	c := mustCompile(t, doc("",
		"{name: broad, to: [{cidr: 10.0.0.0/8}, {cidr: '2001:db8::/32'}], ports: [{port: 443}], mode: open}",
		"{name: narrow, to: [{cidr: 10.1.0.0/16}, {cidr: 10.1.2.0/24}, {cidr: '2001:db8:1::/48'}], ports: [{port: 443}], mode: open}",
		"{name: all, to: [{cidr: 0.0.0.0/0}], ports: [{port: 443}], mode: open}",
	))
	for _, tt := range []struct{ dst, want string }{
		{"10.1.2.3", "narrow"}, {"10.1.9.9", "narrow"}, {"10.2.0.1", "broad"},
		{"2001:db8:1::5", "narrow"}, {"2001:db8:2::5", "broad"}, {"192.0.2.1", "all"},
		{"fe80::1%eth0", ""}, {"::ffff:10.1.2.3", ""},
	} {
		r, ok := c.Match(netip.MustParseAddr(tt.dst), ProtoTCP, 443)
		got := ""
		if ok {
			got = r.Name
		}
		if got != tt.want {
			t.Errorf("Match(%s) = %q, want %q", tt.dst, got, tt.want)
		}
	}
	w := warningsAt(c, "spec.egress[1]")
	if len(w) != 1 || !strings.Contains(w[0], "takes traffic from the earlier spec.egress[0]: 3 of its (prefix, port) entries") {
		t.Errorf("narrow warnings: %q", w)
	}
	// A broader rule after narrower ones is the usual way to write a
	// policy: nothing to say about it.
	if w := warningsAt(c, "spec.egress[2]"); len(w) != 0 {
		t.Errorf("all warnings: %q", w)
	}
}

func TestCompileWarnings(t *testing.T) {
	c := mustCompile(t, doc("{upstream: 198.51.100.53, allow: [a.test, a.test, '*.b.test'], queryTypes: [A, A]}",
		"{name: dup, to: [{cidr: 10.0.0.0/8}, {cidr: 10.0.0.0/8}, {fqdn: x.b.test}, {fqdn: X.B.test.}], ports: [{port: 443}], mode: open}",
		"{name: dns, to: [{cidr: 192.0.2.0/24}], ports: [{port: 53, protocol: UDP}], mode: open}",
		"{name: half, to: [{fqdn: a.test}, {fqdn: nope.test}], ports: [{port: 443}], mode: open}",
		"{name: fq, to: [{fqdn: x.b.test}], ports: [{port: 443}], mode: open}",
		"{name: sec, to: [{fqdn: a.test}], ports: [{port: 8443}], mode: secure, secure: {keyID: k, protocol: tcp, upstreamTLS: {spkiSHA256: [AAAA]}}}",
	))
	for _, tt := range []struct{ path, msg string }{
		{"spec.dns.allow[1]", "duplicate of allow[0] (a.test)"},
		{"spec.dns.allow[2]", "wildcard: the sandbox chooses the labels under b.test"},
		{"spec.dns.queryTypes[1]", "duplicate of queryTypes[0] (A)"},
		{"spec.egress[0].to[1]", "duplicate of to[0] (cidr 10.0.0.0/8)"},
		{"spec.egress[0].to[3]", "duplicate of to[2] (fqdn x.b.test)"},
		{"spec.egress[1].ports[0]", "port 53 never reaches this rule"},
		{"spec.egress[2].to[1].fqdn", "fqdn nope.test is not in spec.dns.allow: its addresses can never be learnt"},
		{"spec.egress[3]", "shadowed"},
		{"spec.egress[4].secure.upstreamTLS.spkiSHA256[0]", `"AAAA" is not the base64 of a SHA-256 digest`},
	} {
		ws := warningsAt(c, tt.path)
		if len(ws) != 1 || !strings.Contains(ws[0], tt.msg) {
			t.Errorf("warnings at %s: %q, want one containing %q", tt.path, ws, tt.msg)
		}
	}
	// The half-learnable rule is still reachable through a.test.
	if ws := warningsAt(c, "spec.egress[2].to[1].fqdn"); len(ws) == 1 && strings.Contains(ws[0], "unreachable") {
		t.Errorf("rule with a learnable name called unreachable: %q", ws)
	}
	if len(c.Warnings) != 9 {
		t.Errorf("%d warnings, want 9: %v", len(c.Warnings), c.Warnings)
	}
}

func TestFQDNWithoutDNS(t *testing.T) {
	c := mustCompile(t, doc("", "{name: a, to: [{fqdn: api.example.test}], ports: [{port: 443}], mode: open}"))
	ws := warningsAt(c, "spec.egress[0].to[0].fqdn")
	if len(ws) != 1 || !strings.Contains(ws[0], "spec.dns is absent") || !strings.Contains(ws[0], "the rule is unreachable") {
		t.Fatalf("warnings %q", ws)
	}
	if c.DNS != nil || c.DNS.Allowed("api.example.test") || c.DNS.TypeAllowed(1) {
		t.Error("absent spec.dns allows queries")
	}
}

func TestEntriesForName(t *testing.T) {
	c := mustCompile(t, doc("{upstream: 198.51.100.53, allow: [api.example.test]}",
		"{name: a, to: [{fqdn: api.example.test}], ports: [{port: 443}], mode: open}",
		"{name: b, to: [{fqdn: api.example.test}], ports: [{port: 443}, {port: 8443}], mode: secure, secure: {keyID: k, protocol: tcp}}",
		"{name: c, to: [{cidr: 203.0.113.7/32}], ports: [{port: 8443}], mode: open}",
	))
	got := c.EntriesForName("API.example.test.", netip.MustParseAddr("203.0.113.7"))
	want := []Entry{
		{Prefix: netip.MustParsePrefix("203.0.113.7/32"), Proto: ProtoTCP, Port: 443, RuleID: 1},
		{Prefix: netip.MustParsePrefix("203.0.113.7/32"), Proto: ProtoTCP, Port: 8443, RuleID: 2},
	}
	if !slices.Equal(got, want) {
		t.Errorf("EntriesForName = %v, want %v", got, want)
	}
	if e := c.EntriesForName("api.example.test", netip.MustParseAddr("2001:db8::7")); len(e) != 2 || e[0].Prefix.Bits() != 128 {
		t.Errorf("IPv6 entries %v", e)
	}
	if e := c.EntriesForName("other.example.test", netip.MustParseAddr("203.0.113.7")); e != nil {
		t.Errorf("unknown name opened %v", e)
	}
	ws := warningsAt(c, "spec.egress[1]")
	if len(ws) != 1 || !strings.Contains(ws[0], "partially overlaps spec.egress[0]") || !strings.Contains(ws[0], "fqdn api.example.test 443/TCP") {
		t.Errorf("warnings %q", ws)
	}

	// An earlier rule's cidr entry with the same key stands.
	c = mustCompile(t, doc("{upstream: 198.51.100.53, allow: [api.example.test]}",
		"{name: c, to: [{cidr: 203.0.113.7/32}], ports: [{port: 443}], mode: open}",
		"{name: a, to: [{fqdn: api.example.test}], ports: [{port: 443}, {port: 80}], mode: open}",
	))
	got = c.EntriesForName("api.example.test", netip.MustParseAddr("203.0.113.7"))
	want = []Entry{{Prefix: netip.MustParsePrefix("203.0.113.7/32"), Proto: ProtoTCP, Port: 80, RuleID: 2}}
	if !slices.Equal(got, want) {
		t.Errorf("EntriesForName beside an earlier cidr = %v, want %v", got, want)
	}
}

func TestCompileRejectsInvalid(t *testing.T) {
	p := &Policy{APIVersion: APIVersion, Kind: Kind, Metadata: Metadata{Name: "t"}, Spec: Spec{Egress: []EgressRule{{
		Name: "a", To: []Destination{{CIDR: "10.0.0.1/8"}}, Ports: []PortSpec{{Port: 443}}, Mode: "open",
	}}}}
	_, err := Compile(p)
	var list ErrorList
	if !errors.As(err, &list) || len(list) != 1 || list[0].Path != "spec.egress[0].to[0].cidr" {
		t.Fatalf("Compile: %v", err)
	}
}

// Compile works on a policy built in Go, normalises a copy and leaves the
// caller's policy alone.
func TestCompileDoesNotModifyItsInput(t *testing.T) {
	p := &Policy{APIVersion: APIVersion, Kind: Kind, Metadata: Metadata{Name: "t"}, Spec: Spec{
		DNS: &DNSSpec{Upstream: "198.51.100.53", Allow: []string{"API.Example.Test"}},
		Egress: []EgressRule{{
			Name: "a", To: []Destination{{FQDN: "API.Example.Test."}}, Ports: []PortSpec{{Port: 443}}, Mode: "open",
		}},
	}}
	before := p.Clone()
	c, err := Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	eq(t, p.Spec.Egress[0].To[0].FQDN, before.Spec.Egress[0].To[0].FQDN)
	eq(t, p.Spec.Egress[0].Open == nil, true)
	eq(t, p.Spec.DNS.QueryTypes == nil, true)
	eq(t, c.Rules[0].FQDNs[0], "api.example.test")
	eq(t, c.Policy.Spec.Egress[0].Ports[0].Protocol, "TCP")
	eq(t, c.Rules[0].Spec, &c.Policy.Spec.Egress[0])
	eq(t, c.Hash, p.Hash())
}

func TestRuleByID(t *testing.T) {
	c := mustCompile(t, doc("", oneRule))
	if c.Rule(0) != nil || c.Rule(2) != nil || c.Rule(1) != c.Rules[0] {
		t.Error("Rule(id) does not map 1..n to Rules and everything else to nil")
	}
}

func TestHash(t *testing.T) {
	base := doc("{upstream: 198.51.100.53:53, allow: [api.example.test]}",
		"{name: a, to: [{fqdn: api.example.test}, {cidr: '2001:db8::/32'}], ports: [{port: 443}], mode: open}")
	same := header + "# the same policy, written differently\nspec:\n  egress:\n  - mode: open\n    ports:\n    - {port: 443, protocol: TCP}\n" +
		"    to: [{fqdn: API.example.test.}, {cidr: '2001:DB8::/32'}]\n    name: a\n    open: {protocol: tcp}\n" +
		"  dns:\n    upstream: 198.51.100.53\n    allow: [api.example.test]\n    queryTypes: [A, AAAA, CNAME]\n"
	other := strings.Replace(base, "443", "8443", 1)
	h := func(y string) string {
		p, err := Parse([]byte(y))
		if err != nil {
			t.Fatal(err)
		}
		return p.Hash()
	}
	hb := h(base)
	if len(hb) != 64 || strings.Trim(hb, "0123456789abcdef") != "" {
		t.Fatalf("hash %q is not lowercase hex SHA-256", hb)
	}
	eq(t, h(same), hb)
	if h(other) == hb {
		t.Error("a different port gives the same hash")
	}
}

func TestPins(t *testing.T) {
	tls := &TLSSpec{SPKISHA256: []string{testPin}}
	pins, err := tls.Pins()
	if err != nil || len(pins) != 1 || pins[0][0] != 0xe3 {
		t.Fatalf("Pins = %x, %v", pins, err)
	}
	tls.SPKISHA256 = append(tls.SPKISHA256, "AAAA")
	if _, err := tls.Pins(); err == nil || !strings.Contains(err.Error(), "spkiSHA256[1]") {
		t.Fatalf("a short pin: %v", err)
	}
}

func TestDNSAllowed(t *testing.T) {
	c := mustCompile(t, doc("{upstream: 198.51.100.53, allow: [api.example.test, '*.store.example.test', _svc._tcp.example.test], queryTypes: [A, MX, HTTPS, CAA]}", oneRule))
	d := c.DNS
	for name, want := range map[string]bool{
		"api.example.test":          true,
		"API.Example.Test.":         true,
		"x.api.example.test":        false,
		"example.test":              false,
		"blob.store.example.test":   true,
		"a.blob.store.example.test": true,
		"store.example.test":        false,
		"xstore.example.test":       false,
		".store.example.test":       false,
		"a..store.example.test":     false,
		"_svc._tcp.example.test":    true,
		"":                          false,
		".":                         false,
		"api.example.test..":        false,
	} {
		if got := d.Allowed(name); got != want {
			t.Errorf("Allowed(%q) = %v, want %v", name, got, want)
		}
	}
	for qtype, want := range map[uint16]bool{1: true, 15: true, 65: true, 257: true, 28: false, 5: false, 255: false} {
		if got := d.TypeAllowed(qtype); got != want {
			t.Errorf("TypeAllowed(%d) = %v, want %v", qtype, got, want)
		}
	}
}
