//go:build bench

package bench

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// Load of the dns scenario.
const (
	dnsClients = 8 // concurrent clients of the rate rows
	// A rate round runs dnsRateOmit + dnsRateWindow and counts the answers
	// of the window only, so that the start (threads entering the
	// namespace, a rate-limit bucket's burst allowance) does not decide
	// the rate.
	dnsRateOmit   = 500 * time.Millisecond
	dnsRateWindow = 2 * time.Second
	// Latency rounds send one query at a time, paced (one every
	// dnsLatencyInterval), so that they time single queries, not queues,
	// and stay below cleanwalld's default DNS rate limit (100 queries/s) as
	// well.
	dnsLatencyQueries  = 150
	dnsLatencyInterval = 12 * time.Millisecond
	dnsHitNames        = 16 // names of the cache-hit workload
	dnsQueryTimeout    = 500 * time.Millisecond
)

var errDNSTimeout = errors.New("no answer")

// dnsConn is a connected UDP socket in a sandbox namespace, used with
// blocking syscalls from the OS thread that made it (as the connect
// scenario does: no Go netpoller in the measured path).
type dnsConn struct {
	fd  int
	id  uint16
	out []byte
	in  []byte
}

// newDNSConn must run inside the sandbox namespace.
func newDNSConn(server netip.AddrPort) (*dnsConn, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	tv := unix.NsecToTimeval(dnsQueryTimeout.Nanoseconds())
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(server.Port()), Addr: server.Addr().As4()}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("connect: %w", err)
	}
	return &dnsConn{fd: fd, id: uint16(fd) << 8, out: make([]byte, 0, 512), in: make([]byte, 1500)}, nil
}

func (c *dnsConn) Close() { unix.Close(c.fd) }

// query asks for name's A record and returns the answer's rcode and
// answer count. Late answers to earlier queries (other IDs) are skipped.
func (c *dnsConn) query(name string) (rcode, answers int, err error) {
	c.id++
	m := dns.Msg{MsgHdr: dns.MsgHdr{Id: c.id, RecursionDesired: true}, Question: []dns.Question{{Name: name, Qtype: dns.TypeA, Qclass: dns.ClassINET}}}
	out, err := m.PackBuffer(c.out)
	if err != nil {
		return 0, 0, err
	}
	for {
		_, err := unix.Write(c.fd, out)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 0, 0, fmt.Errorf("send: %w", err)
		}
		break
	}
	for {
		n, err := unix.Read(c.fd, c.in)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EAGAIN):
			return 0, 0, errDNSTimeout
		case err != nil:
			return 0, 0, fmt.Errorf("receive: %w", err)
		}
		h := c.in[:n]
		if n < 12 || binary.BigEndian.Uint16(h[0:2]) != c.id || h[2]&0x80 == 0 {
			continue
		}
		return int(h[3] & 0x0f), int(binary.BigEndian.Uint16(h[6:8])), nil
	}
}

// dnsRate is one rate round: answers counted in the window only.
type dnsRate struct {
	Good    int // NOERROR with an answer
	Refused int // REFUSED (the DNS proxy's rate limit)
	Other   int // any other rcode
	Lost    int // no answer within dnsQueryTimeout
	Window  time.Duration
	First   error
}

func (r dnsRate) goodPerSecond() float64 { return float64(r.Good) / r.Window.Seconds() }

// dnsRateRound runs clients closed-loop clients (each an OS thread in the
// sandbox namespace with a socket of its own, asking the next name as soon
// as the previous one is answered) for omit + window.
func dnsRateRound(nsPath string, server netip.AddrPort, clients int, omit, window time.Duration, name func(client, i int) string) (dnsRate, error) {
	per := make([]dnsRate, clients)
	start := make(chan struct{})
	var t0 time.Time
	var ready, done sync.WaitGroup
	var mu sync.Mutex
	var setupErr error
	for w := range clients {
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			signalled := false
			err := netns.Do(nsPath, func() error {
				c, err := newDNSConn(server)
				signalled = true
				ready.Done()
				if err != nil {
					return err
				}
				defer c.Close()
				<-start
				from, end := t0.Add(omit), t0.Add(omit+window)
				r := &per[w]
				for i := 0; ; i++ {
					rcode, an, err := c.query(name(w, i))
					now := time.Now()
					if now.After(end) {
						return nil
					}
					if now.Before(from) {
						continue
					}
					switch {
					case err != nil:
						r.Lost++
						if r.First == nil {
							r.First = err
						}
					case rcode == dns.RcodeSuccess && an > 0:
						r.Good++
					case rcode == dns.RcodeRefused:
						r.Refused++
					default:
						r.Other++
						if r.First == nil {
							r.First = fmt.Errorf("rcode %s, %d answers", dns.RcodeToString[rcode], an)
						}
					}
				}
			})
			if err != nil {
				mu.Lock()
				setupErr = err
				mu.Unlock()
				if !signalled {
					ready.Done()
				}
			}
		}()
	}
	ready.Wait()
	t0 = time.Now()
	close(start)
	done.Wait()
	if setupErr != nil {
		return dnsRate{}, setupErr
	}
	sum := dnsRate{Window: window}
	for _, r := range per {
		sum.Good += r.Good
		sum.Refused += r.Refused
		sum.Other += r.Other
		sum.Lost += r.Lost
		if sum.First == nil {
			sum.First = r.First
		}
	}
	return sum, nil
}

// dnsLatency is one latency round: the round trips of the answered
// queries, sorted, and what was not answered.
type dnsLatency struct {
	Lat      []time.Duration
	Failures int
	First    error
}

func (r dnsLatency) p(q float64) float64 {
	return float64(percentile(r.Lat, q)) / float64(time.Microsecond)
}

// dnsLatencyRound sends n queries from one client, one every interval,
// and times each from send to answer.
func dnsLatencyRound(nsPath string, server netip.AddrPort, n int, interval time.Duration, name func(i int) string) (dnsLatency, error) {
	var res dnsLatency
	err := netns.Do(nsPath, func() error {
		c, err := newDNSConn(server)
		if err != nil {
			return err
		}
		defer c.Close()
		t0 := time.Now()
		for i := range n {
			time.Sleep(time.Until(t0.Add(time.Duration(i) * interval)))
			start := time.Now()
			rcode, an, err := c.query(name(i))
			d := time.Since(start)
			if err == nil && (rcode != dns.RcodeSuccess || an == 0) {
				err = fmt.Errorf("rcode %s, %d answers", dns.RcodeToString[rcode], an)
			}
			if err != nil {
				res.Failures++
				if res.First == nil {
					res.First = err
				}
				continue
			}
			res.Lat = append(res.Lat, d)
		}
		return nil
	})
	slices.Sort(res.Lat)
	return res, err
}

// benchDNS compares DNS through cleanwalld's DNS proxy (the cleanwall
// sandbox, any resolver address goes to the proxy, which forwards to the
// authoritative server) with the direct sandbox asking the authoritative
// server itself. Two workloads: cache miss (every query a new name under
// the zone, so the proxy forwards each one) and cache hit (a few names,
// answered from the proxy's cache). Latency rounds run first (paced below
// the proxy's rate limit), then rate rounds (closed loop).
func benchDNS(t *testing.T, top *proxyTopology, rep *Report) {
	server := netip.MustParseAddrPort(dnsUpstream)
	sb := map[string]*harness.Sandbox{"baseline": top.direct, "cleanwall": top.cw}
	rep.Config["dnsClients"] = dnsClients
	rep.Config["dnsRateWindow"] = dnsRateWindow.String()
	rep.Config["dnsLatencyQueries"] = dnsLatencyQueries

	missRate := rep.addRow(&Comparison{Scenario: fmt.Sprintf("dns rate, cache miss, %d clients", dnsClients), Unit: "q/s", Baseline: "direct", Cleanwall: "cleanwall",
		Target: ">=0.50", Check: ratioAtLeast(0.50)})
	hitRate := rep.addRow(&Comparison{Scenario: fmt.Sprintf("dns rate, cache hit, %d clients", dnsClients), Unit: "q/s", Baseline: "direct", Cleanwall: "cleanwall"})
	lat := map[string][2]*Comparison{}
	for _, w := range []string{"miss", "hit"} {
		lat[w] = [2]*Comparison{
			rep.addRow(&Comparison{Scenario: "dns latency p50, cache " + w + ", 1 client", Unit: "µs", LowerBetter: true, Baseline: "direct", Cleanwall: "cleanwall", ShowAdded: true}),
			rep.addRow(&Comparison{Scenario: "dns latency p99, cache " + w + ", 1 client", Unit: "µs", LowerBetter: true, Baseline: "direct", Cleanwall: "cleanwall", ShowAdded: true}),
		}
	}
	hitName := func(i int) string { return fmt.Sprintf("h%d.%s.", i%dnsHitNames, benchZone) }
	// Fill the cache with the hit names (and check both paths answer them).
	for _, side := range []string{"baseline", "cleanwall"} {
		res, err := dnsLatencyRound(sb[side].NS, server, dnsHitNames, dnsLatencyInterval, hitName)
		if err != nil || res.Failures > 0 {
			t.Fatalf("warm-up %s: %v %v", side, err, res.First)
		}
	}
	upstreamBefore := top.dns.QueriesUnder(benchZone)

	for r := range rounds(3) {
		for _, w := range []string{"miss", "hit"} {
			for _, side := range order(r) {
				name := hitName
				if w == "miss" {
					name = func(i int) string { return fmt.Sprintf("l%d-%s-%d.%s.", r, side[:2], i, benchZone) }
				}
				cpu := takeCPU(top.pid)
				res, err := dnsLatencyRound(sb[side].NS, server, dnsLatencyQueries, dnsLatencyInterval, name)
				if err != nil {
					t.Fatal(err)
				}
				if res.Failures > 0 {
					t.Errorf("%s round %d cache %s: %d of %d queries failed (first: %v)", side, r, w, res.Failures, dnsLatencyQueries, res.First)
				}
				extra := cpu.extra(top.pid, map[string]float64{"queries": dnsLatencyQueries, "failures": float64(res.Failures), "p90us": res.p(90), "maxus": res.p(100)})
				lat[w][0].Add(r, side, res.p(50), extra)
				lat[w][1].Add(r, side, res.p(99), nil)
				t.Logf("round %d %-9s latency, cache %s: p50 %4.0f µs p99 %5.0f µs max %5.0f µs failures %d", r, side, w, res.p(50), res.p(99), res.p(100), res.Failures)
			}
		}
	}
	refused := 0
	perf := newPerfRecorder(t, top.daemon)
	for r := range rounds(3) {
		for _, w := range []string{"miss", "hit"} {
			row := missRate
			if w == "hit" {
				row = hitRate
			}
			for _, side := range order(r) {
				name := func(c, i int) string { return hitName(c*7 + i) }
				if w == "miss" {
					name = func(c, i int) string { return fmt.Sprintf("m%d-%s-%d-%d.%s.", r, side[:2], c, i, benchZone) }
				}
				if side == "cleanwall" {
					perf.start(fmt.Sprintf("dns-rate-%s-round%d", w, r))
				}
				cpu := takeCPU(top.pid)
				res, err := dnsRateRound(sb[side].NS, server, dnsClients, dnsRateOmit, dnsRateWindow, name)
				if side == "cleanwall" {
					perf.stop()
				}
				if err != nil {
					t.Fatal(err)
				}
				if res.Refused+res.Other > 0 {
					t.Errorf("%s round %d cache %s: %d refused, %d other answers (first: %v)", side, r, w, res.Refused, res.Other, res.First)
				}
				refused += res.Refused
				extra := cpu.extra(top.pid, map[string]float64{"refusedPerSecond": float64(res.Refused) / res.Window.Seconds(),
					"otherRcodes": float64(res.Other), "lost": float64(res.Lost)})
				row.Add(r, side, res.goodPerSecond(), extra)
				t.Logf("round %d %-9s rate, cache %s: %6.0f answers/s, %6.0f refused/s, %d lost, other %d (cleanwalld %.0f%% cpu, host busy %.0f%% steal %.0f%%)",
					r, side, w, res.goodPerSecond(), extra["refusedPerSecond"], res.Lost, res.Other, extra["daemonCPUPercent"], extra["hostBusyPercent"], extra["hostStealPercent"])
			}
		}
	}
	rep.note("dns: answers/s count NOERROR answers with a record in a %v window after %v (closed loop, %d clients, raw UDP sockets, blocking syscalls); latency rows: one client, %d queries per round one every %v; the authoritative server (harness, miekg/dns) runs in the suite's process; %d queries reached it from both sides",
		dnsRateWindow, dnsRateOmit, dnsClients, dnsLatencyQueries, dnsLatencyInterval, top.dns.QueriesUnder(benchZone)-upstreamBefore)
	rep.note("dns: cleanwalld runs with --dns-rate %d (per sandbox, burst twice that) in this scenario, so that the rate rows measure the DNS proxy; with the default (100 queries/s, burst 200) they would measure that limit: 100 answers/s and the rest REFUSED. %d queries of the cleanwall rate rounds were refused",
		benchDNSRate, refused)
	benchDNSLibrary(t, top.env, rep)
}

// benchDNSLibrary runs the DNS proxy package's own BenchmarkQuery
// (parallel clients, loopback, rate limit off, cache off for the miss path)
// inside the node namespace: the proxy's own cost without cleanwalld's
// sockets and per-sandbox rate limit. One process per target and round,
// the targets' order rotating from round to round.
func benchDNSLibrary(t *testing.T, env *harness.Env, rep *Report) {
	pkg := "github.com/cleanwall/cleanwall/proxies/dns"
	bin := filepath.Join(t.TempDir(), "dnsproxy.test")
	if out, err := exec.Command("go", "test", "-c", "-o", bin, pkg).CombinedOutput(); err != nil {
		t.Fatalf("building %s tests: %v\n%s", pkg, err, out)
	}
	dir, err := exec.Command("go", "list", "-f", "{{.Dir}}", pkg).Output()
	if err != nil {
		t.Fatal(err)
	}
	miss := rep.addRow(&Comparison{Scenario: "dns library, no rate limit, cache miss", Unit: "q/s", Baseline: "direct", Cleanwall: "dnsproxy"})
	hit := rep.addRow(&Comparison{Scenario: "dns library, no rate limit, cache hit", Unit: "q/s", Baseline: "direct", Cleanwall: "dnsproxy"})
	targets := []string{"direct", "proxy-miss", "proxy-hit"}
	n := rounds(3)
	for r := range n {
		for i := range targets {
			target := targets[(i+r)%len(targets)]
			cmd := nsCommand(env.Node, bin, "-test.run=^$", "-test.bench=^BenchmarkQuery$/^parallel$/^"+target+"$", "-test.benchtime=1s")
			cmd.Dir = strings.TrimSpace(string(dir))
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Run(); err != nil {
				t.Fatalf("BenchmarkQuery %s: %v\n%s%s", target, err, stdout.String(), stderr.String())
			}
			lines := parseGoBench(stdout.String())
			if len(lines) != 1 || lines[0].Metrics["queries/s"] == 0 {
				t.Fatalf("BenchmarkQuery %s printed no queries/s:\n%s", target, stdout.String())
			}
			qps := lines[0].Metrics["queries/s"]
			switch target {
			case "direct":
				miss.Add(r, "baseline", qps, nil)
				hit.Add(r, "baseline", qps, nil)
			case "proxy-miss":
				miss.Add(r, "cleanwall", qps, nil)
			case "proxy-hit":
				hit.Add(r, "cleanwall", qps, nil)
			}
			t.Logf("library round %d %-10s %8.0f queries/s", r, target, qps)
		}
	}
	rep.note("dns library rows: %s BenchmarkQuery/parallel (go test -bench, 1 s per target and round, targets rotating) in the node namespace: GOMAXPROCS clients on 127.0.0.1, each its own socket; the proxy without cleanwalld's sockets, datapath and rate limit; its cache off for the miss path", pkg)
}
