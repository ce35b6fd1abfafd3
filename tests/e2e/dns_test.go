package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/tests/harness"
)

const policyDNS = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: dns}
spec:
  dns:
    upstream: 198.51.100.53:53
    allow: [api.example.test, short.example.test, other.example.test, alias.example.test]
  egress:
    - name: api
      to: [{fqdn: api.example.test}, {fqdn: short.example.test}, {fqdn: alias.example.test}]
      ports: [{port: 8080}]
      mode: open
    - name: other
      to: [{fqdn: other.example.test}]
      ports: [{port: 8081}]
      mode: open
`

var zone = []string{
	"api.example.test. 300 IN A 198.51.100.10",
	"short.example.test. 2 IN A 198.51.100.10",
	"other.example.test. 300 IN A 198.51.100.10",
	"alias.example.test. 300 IN CNAME api.example.test.",
	"blocked.example.test. 300 IN A 198.51.100.11",
	"*.exfil.test. 300 IN A 198.51.100.11",
}

// resolverIn returns a Go resolver that asks resolver (any address: the
// datapath sends every port-53 flow to the DNS proxy) from inside sb.
func resolverIn(sb *harness.Sandbox, resolver string, tcp bool) *net.Resolver {
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		if tcp {
			network = "tcp"
		}
		var c net.Conn
		err := sb.Do(func() (err error) {
			c, err = (&net.Dialer{}).DialContext(ctx, network, resolver)
			return err
		})
		return c, err
	}}
}

// exchange sends one raw query from inside the sandbox.
func exchange(t *testing.T, sb *harness.Sandbox, resolver, name string, qtype uint16, tcp bool) (*dns.Msg, error) {
	t.Helper()
	return sb.DNSExchange(resolver, name, qtype, tcp)
}

func dnsEnv(t *testing.T, daemonArgs ...string) (*harness.Env, *harness.Daemon, *harness.DNSServer, *harness.Sandbox) {
	env := harness.New(t)
	d := env.StartDaemon(daemonArgs...)
	srv := env.DNSServer(zone...)
	sb := env.MustAddSandbox("dns", harness.SandboxOptions{Policy: policyDNS})
	return env, d, srv, sb
}

func TestDNSAllowedNameThroughAnyResolver(t *testing.T) {
	env, d, upstream, sb := dnsEnv(t)
	http := env.HTTPServer("198.51.100.10:8080", nil)
	// A resolver address the sandbox picked at random: nothing listens there.
	resolver := fmt.Sprintf("203.0.113.%d:53", 1+rand.IntN(250))
	addrs, err := resolverIn(sb, resolver, false).LookupHost(context.Background(), "api.example.test")
	if err != nil {
		t.Fatalf("resolving an allowed name via %s: %v\n%s", resolver, err, d.Log())
	}
	if len(addrs) != 1 || addrs[0] != "198.51.100.10" {
		t.Fatalf("addresses %v", addrs)
	}
	if upstream.QueriesUnder("api.example.test") == 0 {
		t.Fatal("the upstream never saw the allowed query")
	}
	c, err := sb.Dial("tcp4", net.JoinHostPort(addrs[0], "8080"), 5*time.Second)
	if err != nil {
		t.Fatalf("connecting to the learnt address: %v (%s)", err, countersString(t, d, sb))
	}
	fmt.Fprintf(c, "GET /via-dns HTTP/1.1\r\nHost: api.example.test:8080\r\nConnection: close\r\n\r\n")
	buf := make([]byte, 512)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _ := c.Read(buf)
	c.Close()
	if !strings.Contains(string(buf[:n]), "ok /via-dns") {
		t.Fatalf("response %q", buf[:n])
	}
	if len(http.Requests()) != 1 {
		t.Fatal("server did not get the request")
	}
	// The answer came from the resolver the sandbox asked: miekg's client
	// on a connected socket accepts nothing else.
	if _, err := exchange(t, sb, resolver, "api.example.test", dns.TypeA, false); err != nil {
		t.Fatal(err)
	}
	// A CNAME through an allowed name opens the target's address for the alias's rule.
	if addrs, err := resolverIn(sb, resolver, false).LookupHost(context.Background(), "alias.example.test"); err != nil || len(addrs) == 0 {
		t.Fatalf("CNAME resolution: %v %v", addrs, err)
	}
}

func TestDNSDisallowedNameIsNeverForwarded(t *testing.T) {
	_, d, upstream, sb := dnsEnv(t)
	for _, tcp := range []bool{false, true} {
		r, err := exchange(t, sb, "198.51.100.53:53", "blocked.example.test", dns.TypeA, tcp)
		if err != nil {
			t.Fatalf("tcp=%v: %v", tcp, err)
		}
		if r.Rcode != dns.RcodeRefused || len(r.Answer) != 0 {
			t.Fatalf("tcp=%v: rcode %s, %d answers", tcp, dns.RcodeToString[r.Rcode], len(r.Answer))
		}
	}
	if n := upstream.QueriesUnder("blocked.example.test"); n != 0 {
		t.Fatalf("the upstream saw %d queries for the refused name", n)
	}
	m, _ := d.Metrics()
	if v, ok := harness.MetricValue(m, "cleanwall_dns_queries_total", `decision="refused"`); !ok || v < 2 {
		t.Fatalf("refusals not counted: %v", grep(m, "cleanwall_dns_queries_total"))
	}
}

func TestDNSOverTCPWorks(t *testing.T) {
	_, _, upstream, sb := dnsEnv(t)
	addrs, err := resolverIn(sb, "198.51.100.99:53", true).LookupHost(context.Background(), "api.example.test")
	if err != nil || len(addrs) != 1 {
		t.Fatalf("DNS over TCP: %v %v", addrs, err)
	}
	if upstream.QueriesUnder("api.example.test") == 0 {
		t.Fatal("no upstream query")
	}
}

// The address of a name the policy does not allow cannot be reached, even
// when the sandbox knows it; an address learnt for one name opens only that
// name's rules.
func TestDNSLearntAddressesAreScoped(t *testing.T) {
	env, d, _, sb := dnsEnv(t)
	env.HTTPServer("198.51.100.11:8080", nil)
	env.HTTPServer("198.51.100.10:8081", nil)
	if c, err := sb.Dial("tcp4", "198.51.100.11:8080", time.Second); err == nil {
		c.Close()
		t.Fatal("reached the address of a refused name")
	}
	// api.example.test resolved: port 8080 opens, 8081 (rule "other") does not.
	if _, err := resolverIn(sb, "198.51.100.53:53", false).LookupHost(context.Background(), "api.example.test"); err != nil {
		t.Fatal(err)
	}
	if c, err := sb.Dial("tcp4", "198.51.100.10:8081", time.Second); err == nil {
		c.Close()
		t.Fatal("an address learnt for api.example.test opened rule other's port")
	}
	if counter(t, d, sb, "drop", bpf.ReasonNoRule.String(), "") == 0 {
		t.Fatal("drops not counted")
	}
	if _, err := resolverIn(sb, "198.51.100.53:53", false).LookupHost(context.Background(), "other.example.test"); err != nil {
		t.Fatal(err)
	}
	c, err := sb.Dial("tcp4", "198.51.100.10:8081", 5*time.Second)
	if err != nil {
		t.Fatalf("after resolving other.example.test its port stays closed: %v", err)
	}
	c.Close()
	if counter(t, d, sb, "redirect", "rule", "other") == 0 {
		t.Fatalf("redirect not counted under rule other: %s", countersString(t, d, sb))
	}
}

// When a learnt address's TTL expires, new flows to it drop.
func TestDNSTTLExpiryClosesNewFlows(t *testing.T) {
	env, d, _, sb := dnsEnv(t, "--fqdn-min-ttl", "1s", "--fqdn-max-ttl", "2s")
	env.HTTPServer("198.51.100.10:8080", nil)
	if _, err := resolverIn(sb, "198.51.100.53:53", false).LookupHost(context.Background(), "short.example.test"); err != nil {
		t.Fatal(err)
	}
	c, err := sb.Dial("tcp4", "198.51.100.10:8080", 5*time.Second)
	if err != nil {
		t.Fatalf("before expiry: %v", err)
	}
	c.Close()
	time.Sleep(3 * time.Second)
	before := counter(t, d, sb, "drop", bpf.ReasonExpired.String(), "") + counter(t, d, sb, "drop", bpf.ReasonNoRule.String(), "")
	if c, err := sb.Dial("tcp4", "198.51.100.10:8080", time.Second); err == nil {
		c.Close()
		t.Fatal("a new flow to an expired address succeeded")
	}
	after := counter(t, d, sb, "drop", bpf.ReasonExpired.String(), "") + counter(t, d, sb, "drop", bpf.ReasonNoRule.String(), "")
	if after <= before {
		t.Fatalf("the expired flow's drop was not counted: %s", countersString(t, d, sb))
	}
	// The kernel holds no learnt entry any more once swept.
	if !harness.Eventually(5*time.Second, func() bool {
		v, err := d.Client().Policy(harness.Ctx(), sb.ContainerID, "")
		return err == nil && len(v.Rules) == 0
	}) {
		t.Fatal("expired entries were not swept from the kernel")
	}
}

// Without spec.dns every query is refused and nothing is forwarded.
func TestDNSWithoutSpecRefusesEverything(t *testing.T) {
	env := harness.New(t)
	env.StartDaemon()
	upstream := env.DNSServer(zone...)
	sb := env.MustAddSandbox("nodns", harness.SandboxOptions{Policy: policyOpen})
	r, err := exchange(t, sb, "198.51.100.53:53", "api.example.test", dns.TypeA, false)
	if err != nil {
		t.Fatal(err)
	}
	if r.Rcode != dns.RcodeRefused {
		t.Fatalf("rcode %s", dns.RcodeToString[r.Rcode])
	}
	if len(upstream.Queries()) != 0 {
		t.Fatalf("upstream saw %v", upstream.Queries())
	}
}

// TestDNSOverOtherPortsIsDropped: only port 53 goes to the DNS proxy. DNS
// over TLS (TCP 853) and over QUIC/DTLS (UDP 853) to the same resolver are
// dropped in the kernel and counted, since no rule allows them, and nothing
// reaches the resolver's listeners on 853.
func TestDNSOverOtherPortsIsDropped(t *testing.T) {
	env, d, _, sb := dnsEnv(t)
	dot := env.TCPServer("198.51.100.53:853")
	doq := env.UDPServer("198.51.100.53:853")
	sniff := env.Sniff()
	before := counter(t, d, sb, "drop", bpf.ReasonNoRule.String(), "")
	if c, err := sb.Dial("tcp4", "198.51.100.53:853", time.Second); err == nil {
		c.Close()
		t.Fatal("DNS over TLS (TCP 853) connected")
	}
	if err := sb.Do(func() error {
		c, err := net.Dial("udp4", "198.51.100.53:853")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("doq"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(2 * time.Second); counter(t, d, sb, "drop", bpf.ReasonNoRule.String(), "") < before+2; {
		if time.Now().After(deadline) {
			t.Fatalf("the drops were not counted: %s", countersString(t, d, sb))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n, m := len(dot.Conns()), len(doq.Received()); n != 0 || m != 0 {
		t.Fatalf("the resolver's 853 listeners got %d connections and %d datagrams", n, m)
	}
	if n := sniff.FromSource(sb.IP); n != 0 {
		t.Fatalf("%d packets from the sandbox reached the remote side", n)
	}
}
