package policy

import (
	"errors"
	"os"
	"strings"
	"testing"
)

const header = "apiVersion: cleanwall.dev/v1\nkind: EgressPolicy\nmetadata: {name: t}\n"

// doc builds a policy with an optional spec.dns (a flow mapping) and egress
// rules (each a flow mapping), one per line: rule i is on line 6+i when dns
// is set, 5+i otherwise.
func doc(dns string, rules ...string) string {
	var b strings.Builder
	b.WriteString(header + "spec:\n")
	if dns != "" {
		b.WriteString("  dns: " + dns + "\n")
	}
	b.WriteString("  egress:\n")
	for _, r := range rules {
		b.WriteString("    - " + r + "\n")
	}
	return b.String()
}

const (
	okDNS   = "{upstream: 198.51.100.53:53, allow: [api.example.test, '*.store.example.test']}"
	okOpen  = "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 443}], mode: open}"
	okOpen2 = "{name: b, to: [{cidr: 10.0.0.0/8}], ports: [{port: 80}], mode: open}"
	okTLS   = "tls: {serverName: p.example.test, caFile: /ca.pem}"
)

// The parts of a valid open.postgres block.
const (
	pgLogin  = "database: clinic, upstreamUserFile: /etc/pg/user, upstreamPasswordFile: /etc/pg/password"
	okPGBody = pgLogin + ", queries: [{name: cohort, sql: 'SELECT region, count(*) AS n FROM patients GROUP BY region'}]"
)

// pgRule builds an open postgres rule on port 5432 with the given
// open.postgres fields.
func pgRule(fields string) string {
	return "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 5432}], mode: open, open: {protocol: postgres, postgres: {" + fields + "}}}"
}

// rule builds a rule named a with one cidr destination on port 443 and
// the given further fields.
func rule(fields string) string {
	return "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 443}], " + fields + "}"
}

func TestParseRejects(t *testing.T) {
	long := strings.Repeat("a", 64)
	tests := []struct {
		name string
		yaml string
		path string // of the (only, unless many) error
		msg  string // part of its message
		line int    // checked when non-zero
		many bool   // more errors are expected besides this one
	}{
		// Documents.
		{"empty", "", "", "empty document", 0, false},
		{"only comments", "# nothing\n", "", "empty document", 0, false},
		{"explicit null", "---\n~\n", "", "empty document", 0, false},
		{"two documents", doc("", okOpen) + "---\n" + doc("", okOpen), "", "more than one YAML document", 0, false},
		{"syntax", header + "spec: {egress: [\n", "", "invalid YAML", 0, false},
		{"syntax line", header + "spec:\n  egress:\n  - name: a\n   mode: open\n", "", "invalid YAML: did not find expected key", 4, false},
		{"not a mapping", "- a\n- b\n", "", "expected a mapping, got a list", 1, false},

		// Header.
		{"apiVersion missing", "kind: EgressPolicy\nmetadata: {name: t}\n", "apiVersion", "required (cleanwall.dev/v1)", 1, false},
		{"apiVersion wrong", strings.Replace(doc("", okOpen), "/v1", "/v2", 1), "apiVersion", `"cleanwall.dev/v2" is not supported (want cleanwall.dev/v1)`, 1, false},
		{"kind wrong", strings.Replace(doc("", okOpen), "EgressPolicy", "Policy", 1), "kind", `"Policy" is not supported (want EgressPolicy)`, 2, false},
		{"name missing", strings.Replace(doc("", okOpen), "{name: t}", "{}", 1), "metadata.name", "required", 3, false},
		{"name not a label", strings.Replace(doc("", okOpen), "{name: t}", "{name: Analytics}", 1), "metadata.name", `"Analytics" is not a DNS label`, 3, false},
		{"name too long", strings.Replace(doc("", okOpen), "{name: t}", "{name: "+long+"}", 1), "metadata.name", "is not a DNS label", 3, false},
		{"name integer", strings.Replace(doc("", okOpen), "{name: t}", "{name: 123}", 1), "metadata.name", "expected a string, got the integer 123", 3, false},
		{"metadata list", strings.Replace(doc("", okOpen), "{name: t}", "[t]", 1), "metadata", "expected a mapping, got a list", 3, false},

		// Strictness.
		{"unknown top field", doc("", okOpen) + "status: {}\n", "status", "unknown field", 7, false},
		{"unknown nested field", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], portz: [{port: 443}], mode: open}"), "spec.egress[0].portz", "unknown field (did you mean ports?)", 6, true},
		{"unknown field case", doc("{upstream: 198.51.100.53, querytypes: [A]}"), "spec.dns.querytypes", "unknown field (did you mean queryTypes?)", 5, false},
		{"duplicate key", header + "spec:\n  egress:\n    - name: a\n      name: b\n      to: [{cidr: 10.0.0.0/8}]\n      ports: [{port: 1}]\n      mode: open\n", "spec.egress[0].name", "duplicate key (first at line 6)", 7, false},
		{"list expected", doc("", "{name: a, to: 10.0.0.0/8, ports: [{port: 443}], mode: open}"), "spec.egress[0].to", `expected a list, got "10.0.0.0/8"`, 6, false},
		{"mapping expected", doc("", "{name: a, to: [10.0.0.0/8], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0]", `expected a mapping, got "10.0.0.0/8"`, 6, false},
		{"integer expected", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: '443'}], mode: open}"), "spec.egress[0].ports[0].port", `expected an integer, got "443"`, 6, false},
		{"integer not float", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 443.0}], mode: open}"), "spec.egress[0].ports[0].port", "expected an integer, got the number 443.0", 6, false},
		{"string not bool", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 443, protocol: true}], mode: open}"), "spec.egress[0].ports[0].protocol", "expected a string, got the boolean true", 6, false},
		{"integer overflow", doc("", rule("mode: open, open: {tcp: {maxBytesOut: 99999999999999999999}}")), "spec.egress[0].open.tcp.maxBytesOut", "expected an integer, got the number 99999999999999999999", 6, false},
		{"tagged mapping", strings.Replace(doc("", okOpen), "{name: t}", "!meta {name: t}", 1), "metadata", "expected a mapping, got a value tagged !meta", 3, false},
		{"tagged list", doc("", "{name: a, to: !!set [{cidr: 10.0.0.0/8}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to", "expected a list, got", 6, false},
		{"merge key in rule", header + "spec:\n  egress:\n    - &r " + okOpen + "\n    - {<<: *r, name: b}\n", "spec.egress[1]", "merge keys (<<) are not supported", 7, false},

		// Rule names.
		{"rule name missing", doc("", "{to: [{cidr: 10.0.0.0/8}], ports: [{port: 443}], mode: open}"), "spec.egress[0].name", "required", 6, false},
		{"rule name not a label", doc("", "{name: Results_API, to: [{cidr: 10.0.0.0/8}], ports: [{port: 443}], mode: open}"), "spec.egress[0].name", `"Results_API" is not a DNS label`, 6, false},

		// Destinations.
		{"to missing", doc("", "{name: a, ports: [{port: 443}], mode: open}"), "spec.egress[0].to", "at least one destination", 6, false},
		{"to empty", doc("", "{name: a, to: [], ports: [{port: 443}], mode: open}"), "spec.egress[0].to", "at least one destination", 6, false},
		{"cidr and fqdn", doc(okDNS, "{name: a, to: [{cidr: 10.0.0.0/8, fqdn: api.example.test}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0]", "cidr and fqdn are exclusive", 7, false},
		{"neither cidr nor fqdn", doc("", "{name: a, to: [{}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0]", "needs cidr or fqdn", 6, false},
		{"empty cidr", doc("", "{name: a, to: [{cidr: ''}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].cidr", "must not be empty", 6, false},
		{"cidr garbage", doc("", "{name: a, to: [{cidr: 10.0.0/8}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].cidr", `"10.0.0/8" is not a CIDR prefix`, 6, false},
		{"cidr length", doc("", "{name: a, to: [{cidr: 10.0.0.0/33}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].cidr", "is not a CIDR prefix: prefix length out of range", 6, false},
		{"cidr host bits", doc("", "{name: a, to: [{cidr: 10.1.2.3/8}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].cidr", `"10.1.2.3/8" has host bits set (did you mean 10.0.0.0/8?)`, 6, false},
		{"cidr v6 host bits", doc("", "{name: a, to: [{cidr: '2001:db8::1/32'}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].cidr", "did you mean 2001:db8::/32?", 6, false},
		{"cidr address", doc("", "{name: a, to: [{cidr: 10.0.0.1}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].cidr", "is an address, not a prefix (did you mean 10.0.0.1/32?)", 6, false},
		{"cidr mapped", doc("", "{name: a, to: [{cidr: '::ffff:10.0.0.0/104'}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].cidr", "IPv4-mapped IPv6 prefix: write IPv4 destinations as IPv4 (write 10.0.0.0/8)", 6, false},
		{"cidr zone", doc("", "{name: a, to: [{cidr: 'fe80::1%eth0/128'}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].cidr", "IPv6 zones are not allowed", 6, false},
		{"fqdn wildcard", doc(okDNS, "{name: a, to: [{fqdn: '*.store.example.test'}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].fqdn", "wildcards are not allowed in fqdn destinations", 7, false},
		{"fqdn long label", doc(okDNS, "{name: a, to: [{fqdn: "+long+".test}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].fqdn", "is longer than 63 characters", 7, false},
		{"fqdn long name", doc(okDNS, "{name: a, to: [{fqdn: "+strings.Repeat("abcdefgh.", 28)+"test}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].fqdn", "longer than 253 characters", 7, false},
		{"fqdn IP", doc(okDNS, "{name: a, to: [{fqdn: 10.0.0.1}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].fqdn", "an IP address, not a name (use cidr)", 7, false},
		{"fqdn numeric tld", doc(okDNS, "{name: a, to: [{fqdn: 10.0.0.300}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].fqdn", "the last label is all digits", 7, false},
		{"fqdn hyphen", doc(okDNS, "{name: a, to: [{fqdn: -api.example.test}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].fqdn", `label "-api" starts or ends with '-'`, 7, false},
		{"fqdn character", doc(okDNS, "{name: a, to: [{fqdn: 'api!.example.test'}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].fqdn", `invalid character "!"`, 7, false},
		{"fqdn empty label", doc(okDNS, "{name: a, to: [{fqdn: api..example.test}], ports: [{port: 443}], mode: open}"), "spec.egress[0].to[0].fqdn", "empty label", 7, false},

		// Ports.
		{"ports missing", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], mode: open}"), "spec.egress[0].ports", "at least one port", 6, false},
		{"port missing", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{protocol: TCP}], mode: open}"), "spec.egress[0].ports[0].port", "required", 6, false},
		{"port zero", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 0}], mode: open}"), "spec.egress[0].ports[0].port", "0 is not a port (1-65535)", 6, false},
		{"port negative", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: -1}], mode: open}"), "spec.egress[0].ports[0].port", "-1 is not a port (1-65535)", 6, false},
		{"protocol lowercase", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 1, protocol: tcp}], mode: open}"), "spec.egress[0].ports[0].protocol", `"tcp" is not a protocol (write TCP)`, 6, false},
		{"protocol unknown", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 1, protocol: SCTP}], mode: open}"), "spec.egress[0].ports[0].protocol", `"SCTP" is not a protocol (TCP or UDP)`, 6, false},
		{"protocol empty", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 1, protocol: ''}], mode: open}"), "spec.egress[0].ports[0].protocol", "must not be empty", 6, false},
		{"duplicate port", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 443}, {port: 80}, {port: 443, protocol: TCP}], mode: open}"), "spec.egress[0].ports[2]", "duplicate of ports[0] (443/TCP)", 6, false},

		// Modes and their blocks.
		{"mode missing", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 443}]}"), "spec.egress[0].mode", "required (open, trusted or secure)", 6, false},
		{"mode unknown", doc("", rule("mode: Open")), "spec.egress[0].mode", `"Open" is not a mode (open, trusted or secure)`, 6, false},
		{"block of another mode", doc("", rule("mode: open, trusted: {"+okTLS+"}")), "spec.egress[0].trusted", "only allowed with mode trusted (this rule's mode is open)", 6, false},
		{"open block on secure", doc("", rule("mode: secure, secure: {keyID: k, protocol: tcp}, open: {}")), "spec.egress[0].open", "only allowed with mode open (this rule's mode is secure)", 6, false},

		// Open.
		{"open protocol", doc("", rule("mode: open, open: {protocol: HTTP/1.1}")), "spec.egress[0].open.protocol", `"HTTP/1.1" is not an open protocol (http, tcp, or the name of an extension`, 6, false},
		{"open extension over UDP", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 53, protocol: UDP}], mode: open, open: {protocol: requestlog}}"), "spec.egress[0].ports[0].protocol", "UDP is not possible with open.protocol requestlog (extensions serve TCP flows)", 6, false},
		{"tls minVersion", doc("", rule("mode: trusted, trusted: {tls: {serverName: a.example.test, caFile: /ca.pem, minVersion: '1.1'}}")), "spec.egress[0].trusted.tls.minVersion", `"1.1" is not a TLS version this proxy speaks (1.2 or 1.3)`, 6, false},
		{"open extension name", doc("", rule("mode: open, open: {protocol: request-}")), "spec.egress[0].open.protocol", `"request-" is not an open protocol`, 6, false},
		{"open http with tcp", doc("", rule("mode: open, open: {http: {rules: [{methods: [GET], paths: [/]}]}}")), "spec.egress[0].open.http", "only allowed with open.protocol http (this rule's protocol is tcp)", 6, false},
		{"open http missing", doc("", rule("mode: open, open: {protocol: http}")), "spec.egress[0].open.http", "required with open.protocol http", 6, false},
		// Open postgres.
		{"postgres missing", doc("", rule("mode: open, open: {protocol: postgres}")), "spec.egress[0].open.postgres", "required with open.protocol postgres", 6, false},
		{"postgres with tcp", doc("", rule("mode: open, open: {postgres: {"+okPGBody+"}}")), "spec.egress[0].open.postgres", "only allowed with open.protocol postgres (this rule's protocol is tcp)", 6, false},
		{"postgres over UDP", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 5432, protocol: UDP}], mode: open, open: {protocol: postgres, postgres: {"+okPGBody+"}}}"), "spec.egress[0].ports[0].protocol", "UDP is not possible with open.protocol postgres", 6, false},
		{"postgres database", doc("", pgRule("upstreamUserFile: /u, upstreamPasswordFile: /p, queries: [{name: q, sql: SELECT 1}]")), "spec.egress[0].open.postgres.database", "required", 6, false},
		{"postgres user file", doc("", pgRule("database: d, upstreamPasswordFile: /p, queries: [{name: q, sql: SELECT 1}]")), "spec.egress[0].open.postgres.upstreamUserFile", "required", 6, false},
		{"postgres password file", doc("", pgRule("database: d, upstreamUserFile: /u, queries: [{name: q, sql: SELECT 1}]")), "spec.egress[0].open.postgres.upstreamPasswordFile", "required", 6, false},
		{"postgres no queries", doc("", pgRule("database: d, upstreamUserFile: /u, upstreamPasswordFile: /p")), "spec.egress[0].open.postgres.queries", "at least one query", 6, false},
		{"postgres query name", doc("", pgRule(pgLogin+", queries: [{sql: SELECT 1}]")), "spec.egress[0].open.postgres.queries[0].name", "required", 6, false},
		{"postgres query name label", doc("", pgRule(pgLogin+", queries: [{name: Q_1, sql: SELECT 1}]")), "spec.egress[0].open.postgres.queries[0].name", `"Q_1" is not a DNS label`, 6, false},
		{"postgres duplicate query", doc("", pgRule(pgLogin+", queries: [{name: q, sql: SELECT 1}, {name: q, sql: SELECT 2}]")), "spec.egress[0].open.postgres.queries[1].name", `"q" is the name of queries[0] already`, 6, false},
		{"postgres empty sql", doc("", pgRule(pgLogin+", queries: [{name: q, sql: ' '}]")), "spec.egress[0].open.postgres.queries[0].sql", "required", 6, false},
		{"postgres maxRows", doc("", pgRule(okPGBody+", rows: {maxRows: 0}")), "spec.egress[0].open.postgres.rows.maxRows", "0: must be greater than 0", 6, false},
		{"postgres minCount column", doc("", pgRule(okPGBody+", rows: {minCount: {atLeast: 10}}")), "spec.egress[0].open.postgres.rows.minCount.column", "required", 6, false},
		{"postgres minCount atLeast", doc("", pgRule(okPGBody+", rows: {minCount: {column: n, atLeast: 0}}")), "spec.egress[0].open.postgres.rows.minCount.atLeast", "0: must be at least 1", 6, false},
		{"postgres deny empty", doc("", pgRule(okPGBody+", columns: {deny: [ssn, '']}")), "spec.egress[0].open.postgres.columns.deny[1]", "must not be empty", 6, false},
		{"postgres upstreamTLS", doc("", pgRule(okPGBody+", upstreamTLS: {minVersion: '1.1'}")), "spec.egress[0].open.postgres.upstreamTLS.minVersion", `"1.1" is not a TLS version`, 6, false},
		{"postgres unknown field", doc("", pgRule(okPGBody+", maxRows: 3")), "spec.egress[0].open.postgres.maxRows", "", 6, false},
		{"open http no rules", doc("", rule("mode: open, open: {protocol: http, http: {rules: []}}")), "spec.egress[0].open.http.rules", "at least one rule", 6, false},
		{"open http no methods", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{paths: [/]}]}}")), "spec.egress[0].open.http.rules[0].methods", "at least one method", 6, false},
		{"open http lowercase method", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [get], paths: [/]}]}}")), "spec.egress[0].open.http.rules[0].methods[0]", `"get" is not a method (methods are uppercase: GET)`, 6, false},
		{"open http CONNECT", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET, CONNECT], paths: [/]}]}}")), "spec.egress[0].open.http.rules[0].methods[1]", "CONNECT is refused: it opens a tunnel", 6, false},
		{"open http TRACE", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [TRACE], paths: [/]}]}}")), "spec.egress[0].open.http.rules[0].methods[0]", "TRACE is refused", 6, false},
		{"open http unknown method", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [PROPFIND], paths: [/]}]}}")), "spec.egress[0].open.http.rules[0].methods[0]", `"PROPFIND" is not a supported method`, 6, false},
		{"open http no paths", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET]}]}}")), "spec.egress[0].open.http.rules[0].paths", "at least one path", 6, false},
		{"path relative", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: [v1]}]}}")), "spec.egress[0].open.http.rules[0].paths[0]", `"v1": must start with "/"`, 6, false},
		{"path double star", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: [/, '/v1/**/x']}]}}")), "spec.egress[0].open.http.rules[0].paths[1]", `"**" is only allowed as the last segment`, 6, false},
		{"path partial star", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: ['/v1/res*']}]}}")), "spec.egress[0].open.http.rules[0].paths[0]", "must be whole segments", 6, false},
		{"path empty segment", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: [/v1//x]}]}}")), "spec.egress[0].open.http.rules[0].paths[0]", "empty segment", 6, false},
		{"path query", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: ['/v1?a=b']}]}}")), "spec.egress[0].open.http.rules[0].paths[0]", "no query or fragment", 6, false},
		{"path dot segment", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: [/v1/../admin]}]}}")), "spec.egress[0].open.http.rules[0].paths[0]", "dot segments never match", 6, false},
		{"path character", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: ['/a b']}]}}")), "spec.egress[0].open.http.rules[0].paths[0]", `invalid character " " (percent-encode it)`, 6, false},
		{"path bad escape", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: ['/a%zz']}]}}")), "spec.egress[0].open.http.rules[0].paths[0]", `invalid character "%"`, 6, false},
		{"content type params", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [POST], paths: [/], contentTypes: ['application/json; charset=utf-8']}]}}")), "spec.egress[0].open.http.rules[0].contentTypes[0]", "parameters are not matched", 6, false},
		{"content type bare", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [POST], paths: [/], contentTypes: [json]}]}}")), "spec.egress[0].open.http.rules[0].contentTypes[0]", `"json" is not a media type: want type/subtype`, 6, false},
		{"content type wildcard", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [POST], paths: [/], contentTypes: ['text/*']}]}}")), "spec.egress[0].open.http.rules[0].contentTypes[0]", "wildcards are not allowed", 6, false},
		{"content types empty", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [POST], paths: [/], contentTypes: []}]}}")), "spec.egress[0].open.http.rules[0].contentTypes", "at least one content type (omit contentTypes to allow any)", 6, false},
		{"max body negative", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: [/]}], maxBodyBytes: -1}}")), "spec.egress[0].open.http.maxBodyBytes", "-1: must be 0 or more", 6, false},
		{"deny pattern", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: [/]}], denyBodyPatterns: ['ok', '(a']}}")), "spec.egress[0].open.http.denyBodyPatterns[1]", "error parsing regexp: missing closing ): `(a`", 6, false},
		{"deny pattern empty", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: [/]}], denyBodyPatterns: ['']}}")), "spec.egress[0].open.http.denyBodyPatterns[0]", "empty pattern", 6, false},
		{"whole-request pattern", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: [/]}], denyPatterns: ['ok', '(a']}}")), "spec.egress[0].open.http.denyPatterns[1]", "error parsing regexp: missing closing ): `(a`", 6, false},
		{"whole-request pattern empty", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: [/]}], denyPatterns: ['']}}")), "spec.egress[0].open.http.denyPatterns[0]", "empty pattern (it would match every request)", 6, false},
		{"whole-request pattern matching nothing", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: [/]}], denyPatterns: ['\\d{3}', 'x*|y']}}")), "spec.egress[0].open.http.denyPatterns[1]", `"x*|y" matches the empty string: a deny pattern must need at least one character to match`, 6, false},
		{"whole-request patterns not a list", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: [/]}], denyPatterns: 'secret'}}")), "spec.egress[0].open.http.denyPatterns", `expected a list, got "secret"`, 6, false},
		{"whole-request pattern not a string", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: [/]}], denyPatterns: [1234]}}")), "spec.egress[0].open.http.denyPatterns[0]", "expected a string, got the integer 1234", 6, false},
		{"whole-request patterns misspelt", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: [/]}], denyPattern: [x]}}")), "spec.egress[0].open.http.denyPattern", "unknown field (did you mean denyPatterns?)", 6, false},
		{"whole-request patterns on open tcp", doc("", rule("mode: open, open: {protocol: tcp, tcp: {denyPatterns: [x]}}")), "spec.egress[0].open.tcp.denyPatterns", "unknown field", 6, false},
		{"udp with http", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 443}, {port: 443, protocol: UDP}], mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: [/]}]}}}"), "spec.egress[0].ports[1].protocol", "UDP is not possible with open.protocol http (HTTP runs over TCP)", 6, false},
		{"max bytes out zero", doc("", rule("mode: open, open: {tcp: {maxBytesOut: 0}}")), "spec.egress[0].open.tcp.maxBytesOut", "0: must be greater than 0", 6, false},

		// Trusted.
		{"trusted missing", doc("", rule("mode: trusted")), "spec.egress[0].trusted", "required with mode trusted (tls and/or hpke)", 6, false},
		{"trusted empty", doc("", rule("mode: trusted, trusted: {}")), "spec.egress[0].trusted", "needs tls and/or hpke", 6, false},
		{"trusted upstream port", doc("", rule("mode: trusted, trusted: {upstreamPort: 70000, "+okTLS+"}")), "spec.egress[0].trusted.upstreamPort", "70000 is not a port (1-65535)", 6, false},
		{"trusted no server name", doc("", rule("mode: trusted, trusted: {tls: {caFile: /ca.pem}}")), "spec.egress[0].trusted.tls.serverName", "required (the SNI", 6, false},
		{"trusted bad server name", doc("", rule("mode: trusted, trusted: {tls: {serverName: 'a b', caFile: /ca.pem}}")), "spec.egress[0].trusted.tls.serverName", `"a b" is not a hostname`, 6, false},
		{"trusted no trust", doc("", rule("mode: trusted, trusted: {tls: {serverName: p.example.test}}")), "spec.egress[0].trusted.tls", "needs caFile and/or spkiSHA256", 6, false},
		{"trusted empty ca file", doc("", rule("mode: trusted, trusted: {tls: {serverName: p.example.test, caFile: '', spkiSHA256: [x]}}")), "spec.egress[0].trusted.tls.caFile", "must not be empty", 6, false},
		{"trusted cert without key", doc("", rule("mode: trusted, trusted: {tls: {serverName: p.example.test, caFile: /ca.pem, clientCertFile: /c.pem}}")), "spec.egress[0].trusted.tls.clientKeyFile", "required with clientCertFile", 6, false},
		{"trusted key without cert", doc("", rule("mode: trusted, trusted: {tls: {serverName: p.example.test, caFile: /ca.pem, clientKeyFile: /c.key}}")), "spec.egress[0].trusted.tls.clientCertFile", "required with clientKeyFile", 6, false},
		{"trusted hpke empty", doc("", rule("mode: trusted, trusted: {hpke: {}}")), "spec.egress[0].trusted.hpke.publicKeyFile", "required", 6, false},
		{"trusted udp", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 53000, protocol: UDP}], mode: trusted, trusted: {"+okTLS+"}}"), "spec.egress[0].ports[0].protocol", "UDP is not possible with mode trusted", 6, false},

		// Secure.
		{"secure missing", doc("", rule("mode: secure")), "spec.egress[0].secure", "required with mode secure", 6, false},
		{"secure no key", doc("", rule("mode: secure, secure: {protocol: tcp}")), "spec.egress[0].secure.keyID", "required", 6, false},
		{"secure bad key", doc("", rule("mode: secure, secure: {keyID: 'egress dek', protocol: tcp}")), "spec.egress[0].secure.keyID", `"egress dek" is not a key id`, 6, false},
		{"secure long key", doc("", rule("mode: secure, secure: {keyID: "+strings.Repeat("k", 129)+", protocol: tcp}")), "spec.egress[0].secure.keyID", "is not a key id (1-128", 6, false},
		{"secure no protocol", doc("", rule("mode: secure, secure: {keyID: k}")), "spec.egress[0].secure.protocol", "required: http (bodies sealed per object) or tcp (the stream is sealed)", 6, false},
		{"secure bad protocol", doc("", rule("mode: secure, secure: {keyID: k, protocol: udp}")), "spec.egress[0].secure.protocol", `"udp" is not a secure protocol (http or tcp)`, 6, false},
		{"secure udp", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 5000, protocol: UDP}], mode: secure, secure: {keyID: k, protocol: tcp}}"), "spec.egress[0].ports[0].protocol", "UDP is not possible with mode secure", 6, false},
		{"secure tls key without cert", doc("", rule("mode: secure, secure: {keyID: k, protocol: tcp, upstreamTLS: {clientKeyFile: /k}}")), "spec.egress[0].secure.upstreamTLS.clientCertFile", "required with clientKeyFile", 6, false},
		{"secure tls empty server name", doc("", rule("mode: secure, secure: {keyID: k, protocol: tcp, upstreamTLS: {serverName: ''}}")), "spec.egress[0].secure.upstreamTLS.serverName", "must not be empty", 6, false},

		// DNS.
		{"dns upstream missing", doc("{allow: [a.test]}", okOpen), "spec.dns.upstream", "required", 5, false},
		{"dns upstream name", doc("{upstream: 'dns.example.test:53'}", okOpen), "spec.dns.upstream", `"dns.example.test:53" is not ip:port`, 5, false},
		{"dns upstream zone", doc("{upstream: '[fe80::1%eth0]:53'}", okOpen), "spec.dns.upstream", "IPv6 zones are not allowed", 5, false},
		{"dns upstream port 0", doc("{upstream: '198.51.100.53:0'}", okOpen), "spec.dns.upstream", "port 0 is not a port", 5, false},
		{"dns upstream unspecified", doc("{upstream: 0.0.0.0}", okOpen), "spec.dns.upstream", "unspecified address", 5, false},
		{"dns upstream mapped", doc("{upstream: '[::ffff:198.51.100.53]:53'}", okOpen), "spec.dns.upstream", "IPv4-mapped IPv6 address (write 198.51.100.53:53)", 5, false},
		{"dns allow star", doc("{upstream: 198.51.100.53, allow: ['*']}", okOpen), "spec.dns.allow[0]", `a wildcard must be the whole leftmost label`, 5, false},
		{"dns allow partial wildcard", doc("{upstream: 198.51.100.53, allow: ['api*.example.test']}", okOpen), "spec.dns.allow[0]", `a wildcard must be the whole leftmost label`, 5, false},
		{"dns allow inner wildcard", doc("{upstream: 198.51.100.53, allow: ['*.*.example.test']}", okOpen), "spec.dns.allow[0]", "only the leftmost label may be a wildcard", 5, false},
		{"dns allow bad name", doc("{upstream: 198.51.100.53, allow: [ok.test, 'a..test']}", okOpen), "spec.dns.allow[1]", `"a..test" is not a name or "*." + name: empty label`, 5, false},
		{"dns query type case", doc("{upstream: 198.51.100.53, queryTypes: [a]}", okOpen), "spec.dns.queryTypes[0]", `"a" is not a query type (write A)`, 5, false},
		{"dns query type unknown", doc("{upstream: 198.51.100.53, queryTypes: [A, ANY]}", okOpen), "spec.dns.queryTypes[1]", `"ANY" is not a supported query type (A, NS, CNAME`, 5, false},
		{"dns query types empty", doc("{upstream: 198.51.100.53, queryTypes: []}", okOpen), "spec.dns.queryTypes", "at least one query type", 5, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.yaml))
			list := errorList(t, err)
			var got *FieldError
			for _, e := range list {
				if e.Path == tt.path && strings.Contains(e.Msg, tt.msg) {
					got = e
					break
				}
			}
			if got == nil {
				t.Fatalf("want an error at %q containing %q, got:\n%v", tt.path, tt.msg, err)
			}
			if tt.line != 0 && got.Line != tt.line {
				t.Errorf("line %d, want %d: %v", got.Line, tt.line, got)
			}
			if !tt.many && len(list) != 1 {
				t.Errorf("want exactly one error, got %d:\n%v", len(list), err)
			}
		})
	}
}

func errorList(t *testing.T, err error) ErrorList {
	t.Helper()
	if err == nil {
		t.Fatal("Parse succeeded, want an error")
	}
	var list ErrorList
	if !errors.As(err, &list) {
		t.Fatalf("error is %T, want ErrorList: %v", err, err)
	}
	return list
}

// The error format is part of the contract: docs/policy.md quotes it.
func TestErrorFormatFromPolicyMD(t *testing.T) {
	y := doc("", okOpen, "{name: b, to: [{cidr: 10.0.0.0/8}], ports: [{port: 70000}], mode: open}")
	_, err := Parse([]byte(y))
	want := "spec.egress[1].ports[0].port: 70000 is not a port (1-65535) (line 7)"
	if err == nil || err.Error() != want {
		t.Fatalf("got %v, want %s", err, want)
	}
}

func TestDuplicateRuleName(t *testing.T) {
	y := doc("", "{name: x, to: [{cidr: 10.0.0.0/8}], ports: [{port: 1}], mode: open}",
		"{name: y, to: [{cidr: 10.0.0.0/8}], ports: [{port: 2}], mode: open}",
		"{name: x, to: [{cidr: 10.0.0.0/8}], ports: [{port: 3}], mode: open}")
	_, err := Parse([]byte(y))
	want := `spec.egress[2].name: duplicate rule name "x" (first at spec.egress[0]) (line 8)`
	if err == nil || err.Error() != want {
		t.Fatalf("got %v, want %s", err, want)
	}
}

// Every problem is reported, in file order, not just the first.
func TestErrorsAggregate(t *testing.T) {
	y := "apiVersion: cleanwall.dev/v2\nkind: EgressPolicy\nmetadata: {name: t, labels: {}}\nspec:\n  egress:\n" +
		"    - {name: a, to: [{cidr: 10.0.0.1/8}], ports: [{port: 0}], mode: open}\n" +
		"    - {name: b, to: [{fqdn: '*.x.test'}], ports: [{port: 1, protocol: udp}], mode: sideways}\n"
	_, err := Parse([]byte(y))
	list := errorList(t, err)
	want := []string{
		"apiVersion", "metadata.labels",
		"spec.egress[0].to[0].cidr", "spec.egress[0].ports[0].port",
		"spec.egress[1].to[0].fqdn", "spec.egress[1].mode", "spec.egress[1].ports[0].protocol",
	}
	var got []string
	for _, e := range list {
		got = append(got, e.Path)
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("paths %v, want %v\n%v", got, want, err)
	}
	for i := 1; i < len(list); i++ {
		if list[i].Line < list[i-1].Line {
			t.Errorf("errors out of line order:\n%v", err)
		}
	}
}

func TestParseAccepts(t *testing.T) {
	tests := []struct {
		name  string
		yaml  string
		check func(t *testing.T, p *Policy)
	}{
		{"upstream bare IPv4 gets port 53", doc("{upstream: 198.51.100.53}", okOpen), func(t *testing.T, p *Policy) {
			eq(t, p.Spec.DNS.Upstream, "198.51.100.53:53")
		}},
		{"upstream bracketed IPv6", doc("{upstream: '[2001:db8::53]:5353'}", okOpen), func(t *testing.T, p *Policy) {
			eq(t, p.Spec.DNS.Upstream, "[2001:db8::53]:5353")
		}},
		{"upstream bare IPv6", doc("{upstream: '2001:DB8::53'}", okOpen), func(t *testing.T, p *Policy) {
			eq(t, p.Spec.DNS.Upstream, "[2001:db8::53]:53")
		}},
		{"query types default", doc("{upstream: 198.51.100.53}", okOpen), func(t *testing.T, p *Policy) {
			eq(t, strings.Join(p.Spec.DNS.QueryTypes, ","), "A,AAAA,CNAME")
		}},
		{"names normalised", doc("{upstream: 198.51.100.53, allow: [API.Example.Test., '*.Store.example.test']}",
			"{name: a, to: [{fqdn: API.Example.TEST.}], ports: [{port: 443}], mode: open}"), func(t *testing.T, p *Policy) {
			eq(t, p.Spec.Egress[0].To[0].FQDN, "api.example.test")
			eq(t, strings.Join(p.Spec.DNS.Allow, ","), "api.example.test,*.store.example.test")
		}},
		{"service names", doc("{upstream: 198.51.100.53, allow: [_ldap._tcp.example.test], queryTypes: [SRV]}", okOpen), nil},
		{"cidr canonical", doc("", "{name: a, to: [{cidr: '2001:DB8::/32'}], ports: [{port: 443}], mode: open}"), func(t *testing.T, p *Policy) {
			eq(t, p.Spec.Egress[0].To[0].CIDR, "2001:db8::/32")
		}},
		{"defaults filled", doc("", okOpen), func(t *testing.T, p *Policy) {
			r := p.Spec.Egress[0]
			eq(t, r.Ports[0].Protocol, "TCP")
			if r.Open == nil || r.Open.Protocol != "tcp" {
				t.Errorf("open = %+v, want protocol tcp", r.Open)
			}
		}},
		{"udp with open tcp", doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 5000, protocol: UDP}], mode: open, open: {tcp: {maxBytesOut: 10}}}"), nil},
		{"max body default", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET], paths: ['/**']}]}}")), func(t *testing.T, p *Policy) {
			eq(t, *p.Spec.Egress[0].Open.HTTP.MaxBodyBytes, int64(DefaultMaxBodyBytes))
		}},
		{"max body zero kept", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [GET, HEAD, DELETE, OPTIONS], paths: ['/', '/a/*/b', '/%41/~x/**']}], maxBodyBytes: 0}}")), func(t *testing.T, p *Policy) {
			eq(t, *p.Spec.Egress[0].Open.HTTP.MaxBodyBytes, int64(0))
		}},
		{"content types lowercased", doc("", rule("mode: open, open: {protocol: http, http: {rules: [{methods: [POST, PUT, PATCH], paths: [/], contentTypes: [Application/JSON, application/vnd.api+json]}]}}")), func(t *testing.T, p *Policy) {
			eq(t, p.Spec.Egress[0].Open.HTTP.Rules[0].ContentTypes[0], "application/json")
		}},
		{"trusted hpke only", doc("", rule("mode: trusted, trusted: {hpke: {publicKeyFile: /k.pub}}")), nil},
		{"trusted spki only", doc("", rule("mode: trusted, trusted: {tls: {serverName: p.example.test, spkiSHA256: ['"+testPin+"']}}")), nil},
		{"secure empty upstream tls", doc("", rule("mode: secure, secure: {keyID: egress-dek.v1_A, protocol: http, upstreamTLS: {}}")), func(t *testing.T, p *Policy) {
			if p.Spec.Egress[0].Secure.UpstreamTLS == nil {
				t.Error("upstreamTLS: {} was dropped")
			}
		}},
		{"trailing document separator", "---\n" + doc("", okOpen) + "---\n", nil},
		{"anchors and aliases", header + "spec:\n  egress:\n    - {name: a, to: [{cidr: 10.0.0.0/8}], ports: &web [{port: 80}, {port: 443}], mode: open}\n    - {name: b, to: [{cidr: 10.1.0.0/16}], ports: *web, mode: open}\n", func(t *testing.T, p *Policy) {
			eq(t, len(p.Spec.Egress[1].Ports), 2)
		}},
		{"no egress", header + "spec: {}\n", func(t *testing.T, p *Policy) {
			eq(t, len(p.Spec.Egress), 0)
		}},
		{"files are not opened", doc("", rule("mode: trusted, trusted: {hpke: {publicKeyFile: /nonexistent/k.pub}, tls: {serverName: x.test, caFile: /nonexistent/ca.pem}}")), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Parse([]byte(tt.yaml))
			if err != nil {
				t.Fatalf("Parse: %v\n%s", err, tt.yaml)
			}
			if tt.check != nil {
				tt.check(t, p)
			}
		})
	}
}

func eq[T comparable](t *testing.T, got, want T) {
	t.Helper()
	if got != want {
		t.Errorf("got %v, want %v", got, want)
	}
}

// A document cannot make the decoder do unbounded work with aliases (the
// schema is not recursive, but nested lists of aliases multiply), nor loop
// on an anchor aliased inside itself.
func TestAliasBombs(t *testing.T) {
	const n = 3000
	bomb := header + "spec:\n  egress: [&r {name: a, to: [&d {cidr: 10.0.0.0/8}" + strings.Repeat(", *d", n) +
		"], ports: [{port: 1}], mode: open}" + strings.Repeat(", *r", n) + "]\n"
	// The expansion bound refuses the document before it is built.
	_, err := Parse([]byte(bomb))
	if err == nil || !strings.Contains(err.Error(), "aliases expand the document to more than") {
		t.Fatalf("alias bomb: got %v", err)
	}

	cycle := header + "spec:\n  egress: &e\n    - " + okOpen + "\n    - {name: b, to: [{cidr: 10.0.0.0/8}], ports: [{port: 1}], mode: open, open: {http: *e}}\n"
	_, err = Parse([]byte(cycle))
	if err == nil || err.Error() != "an alias refers to a node that contains it" {
		t.Fatalf("self-referencing alias: got %v", err)
	}
}

func TestValidateGoPolicy(t *testing.T) {
	p := &Policy{APIVersion: APIVersion, Kind: Kind, Metadata: Metadata{Name: "t"}, Spec: Spec{Egress: []EgressRule{{
		Name: "a", To: []Destination{{CIDR: "10.0.0.0/8"}}, Ports: []PortSpec{{Port: 443}}, Mode: "open",
	}}}}
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
	p.Spec.Egress[0].Ports[0].Port = 70000
	err := p.Validate()
	if err == nil || err.Error() != "spec.egress[0].ports[0].port: 70000 is not a port (1-65535)" {
		t.Fatalf("got %v", err)
	}
}

func TestLoadFileNamesTheFile(t *testing.T) {
	if _, err := LoadFile("testdata/policy-md-example.yaml"); err != nil {
		t.Fatal(err)
	}
	_, err := LoadFile("testdata/does-not-exist.yaml")
	if err == nil || !strings.Contains(err.Error(), "testdata/does-not-exist.yaml") {
		t.Fatalf("got %v", err)
	}
	path := t.TempDir() + "/bad.yaml"
	writeFile(t, path, doc("", "{name: a, to: [{cidr: 10.0.0.0/8}], ports: [{port: 0}], mode: open}"))
	_, err = LoadFile(path)
	var list ErrorList
	if err == nil || !strings.Contains(err.Error(), path) || !errors.As(err, &list) {
		t.Fatalf("got %v", err)
	}
}

// policyMDExampleHash is the hash of docs/policy.md's example as it was before
// optional fields were added: adding one must not change it.
const policyMDExampleHash = "e5a75ce4acc5b9b2601b9b07f87de1b174c2442e6aea8b4865babe687cd1c2bf"

// The "Whole-request patterns" example of docs/policy.md, exactly as written,
// in the results-api rule of the main example.
const denyPatternsExample = `          denyPatterns:           # RE2; matched against the decoded path and query,
            - '\b\d{3}-\d{2}-\d{4}\b'   # every header value, and the (decoded) body
`

func TestDenyPatterns(t *testing.T) {
	base, err := os.ReadFile("testdata/policy-md-example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	p, err := Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	eq(t, p.Hash(), policyMDExampleHash)

	withPatterns := strings.Replace(string(base), "          maxBodyBytes: 1048576\n", "          maxBodyBytes: 1048576\n"+denyPatternsExample, 1)
	q, err := Parse([]byte(withPatterns))
	if err != nil {
		t.Fatalf("docs/policy.md's denyPatterns example: %v", err)
	}
	h := q.Spec.Egress[0].Open.HTTP
	if len(h.DenyPatterns) != 1 || h.DenyPatterns[0] != `\b\d{3}-\d{2}-\d{4}\b` || len(h.DenyBodyPatterns) != 1 {
		t.Fatalf("denyPatterns %q, denyBodyPatterns %q", h.DenyPatterns, h.DenyBodyPatterns)
	}
	if q.Hash() == p.Hash() {
		t.Error("denyPatterns does not change the hash")
	}

	// An empty list means none, in the hash too.
	empty, err := Parse([]byte(strings.Replace(string(base), "          maxBodyBytes: 1048576\n", "          maxBodyBytes: 1048576\n          denyPatterns: []\n", 1)))
	if err != nil {
		t.Fatal(err)
	}
	eq(t, empty.Hash(), policyMDExampleHash)

	c := q.Clone()
	c.Spec.Egress[0].Open.HTTP.DenyPatterns[0] = "changed"
	eq(t, h.DenyPatterns[0], `\b\d{3}-\d{2}-\d{4}\b`)

	// Errors name the field path.
	_, err = Parse([]byte(strings.Replace(withPatterns, `'\b\d{3}-\d{2}-\d{4}\b'`, "'ok'\n            - '[z-a]'", 1)))
	if err == nil || !strings.Contains(err.Error(), "spec.egress[0].open.http.denyPatterns[1]: error parsing regexp: invalid character class range: `z-a`") {
		t.Fatalf("got %v", err)
	}
}

// An open.protocol that is neither http nor tcp names an extension: the
// policy parses; whether the daemon has one of that name is its business.
func TestOpenProtocolNamesAnExtension(t *testing.T) {
	p, err := Parse([]byte(doc("", rule("mode: open, open: {protocol: requestlog}"))))
	if err != nil {
		t.Fatal(err)
	}
	if got := p.Spec.Egress[0].Open.Protocol; got != "requestlog" {
		t.Fatalf("open.protocol = %q", got)
	}
}

// POLICY.md's postgres rule parses as written, survives Clone, and its
// hash ignores empty column and row blocks but not what they hold.
func TestPostgresRule(t *testing.T) {
	full := pgRule(okPGBody + ", columns: {deny: [ssn, name]}, rows: {maxRows: 100, minCount: {column: n, atLeast: 10}}, upstreamTLS: {serverName: DB.example.test}")
	p, err := Parse([]byte(doc("", full)))
	if err != nil {
		t.Fatal(err)
	}
	o := p.Spec.Egress[0].Open
	if o.Protocol != "postgres" || o.Postgres == nil || o.Postgres.Database != "clinic" || len(o.Postgres.Queries) != 1 ||
		o.Postgres.Rows.MinCount.Column != "n" || o.Postgres.Rows.MinCount.AtLeast != 10 || *o.Postgres.Rows.MaxRows != 100 {
		t.Fatalf("open = %+v", o)
	}
	q := p.Clone()
	q.Spec.Egress[0].Open.Postgres.Columns.Deny[0] = "changed"
	*q.Spec.Egress[0].Open.Postgres.Rows.MaxRows = 1
	q.Spec.Egress[0].Open.Postgres.Rows.MinCount.AtLeast = 1
	q.Spec.Egress[0].Open.Postgres.Queries[0].SQL = "SELECT 1"
	q.Spec.Egress[0].Open.Postgres.UpstreamTLS.CAFile = "/x"
	if o.Postgres.Columns.Deny[0] != "ssn" || *o.Postgres.Rows.MaxRows != 100 || o.Postgres.Rows.MinCount.AtLeast != 10 ||
		o.Postgres.Queries[0].SQL == "SELECT 1" || o.Postgres.UpstreamTLS.CAFile != "" {
		t.Fatal("Clone shares the postgres block")
	}
	if p.Hash() == q.Hash() {
		t.Fatal("the hash ignores the postgres block")
	}

	hash := func(fields string) string {
		t.Helper()
		p, err := Parse([]byte(doc("", pgRule(fields))))
		if err != nil {
			t.Fatal(err)
		}
		return p.Hash()
	}
	plain := hash(okPGBody)
	if h := hash(okPGBody + ", columns: {}, rows: {}"); h != plain {
		t.Error("columns: {} and rows: {} changed the hash")
	}
	if h := hash(okPGBody + ", columns: {deny: [ssn]}"); h == plain {
		t.Error("columns.deny did not change the hash")
	}
	if h := hash(okPGBody + ", rows: {maxRows: 5}"); h == plain {
		t.Error("rows.maxRows did not change the hash")
	}
}
