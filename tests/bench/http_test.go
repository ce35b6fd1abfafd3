//go:build bench

package bench

import (
	"bytes"
	"fmt"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/tests/harness"
)

// httpLoad is one fixed wrk load: every side runs it the same way.
type httpLoad struct {
	name              string
	threads, conns    int
	duration          time.Duration
	rate, p50, p99    *Comparison // vs direct
	rateN, p50N, p99N *Comparison // vs nginx (latency rows: nil for the loaded run)
	cpu               *Comparison // the proxy's CPU time per request, vs nginx
}

// wrkRound runs wrk in a sandbox against url.
func wrkRound(s *harness.Sandbox, url string, threads, conns int, d time.Duration) (wrkResult, error) {
	cmd := nsCommand(s.NS, "wrk", "-t", strconv.Itoa(threads), "-c", strconv.Itoa(conns),
		"-d", fmt.Sprintf("%.0fs", d.Seconds()), "--timeout", "2s", "--latency", url)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return wrkResult{}, fmt.Errorf("wrk: %v: %s%s", err, stdout.String(), stderr.String())
	}
	return parseWrk(stdout.String())
}

// httpSides are the three paths, in the order of round r (rotated, so
// that each takes each place once every three rounds).
func httpSides(r int) []string {
	s := []string{"direct", "nginx", "cleanwall"}
	r %= len(s)
	return append(s[r:], s[:r]...)
}

// benchHTTP compares HTTP/1.1 requests (keep-alive connections, GET, a
// 19-byte body from an nginx origin in the remote namespace) on three
// paths: direct (the node forwards), through an nginx reverse proxy in the
// node namespace (direct sandbox to the node's address), and through
// cleanwalld's open-mode HTTP proxy (cleanwall sandbox to the origin's
// address: the datapath redirects it, the proxy inspects every request).
// Two loads: 32 connections (rate; latency under load) and 1 connection
// (latency of one request at a time).
func benchHTTP(t *testing.T, top *proxyTopology, rep *Report) {
	origin := netip.AddrPortFrom(remoteServer, originPort)
	url := map[string]string{
		"direct":    fmt.Sprintf("http://%v/bench", origin),
		"nginx":     fmt.Sprintf("http://%v/bench", nginxProxyAddr),
		"cleanwall": fmt.Sprintf("http://%v/bench", origin),
	}
	sb := map[string]*harness.Sandbox{"direct": top.direct, "nginx": top.direct, "cleanwall": top.cw}
	loads := []*httpLoad{
		{name: "32 conns", threads: 2, conns: 32, duration: 3 * time.Second},
		{name: "1 conn", threads: 1, conns: 1, duration: 2 * time.Second},
	}
	for _, l := range loads {
		l.rateN = rep.addRow(&Comparison{Scenario: "http rate, " + l.name + ", vs nginx", Unit: "req/s", Baseline: "nginx", Cleanwall: "cleanwall"})
		l.rate = rep.addRow(&Comparison{Scenario: "http rate, " + l.name + ", vs direct", Unit: "req/s", Baseline: "direct", Cleanwall: "cleanwall"})
		l.p50 = rep.addRow(&Comparison{Scenario: "http latency p50, " + l.name + ", vs direct", Unit: "µs", LowerBetter: true, Baseline: "direct", Cleanwall: "cleanwall", ShowAdded: true})
		l.p99 = rep.addRow(&Comparison{Scenario: "http latency p99, " + l.name + ", vs direct", Unit: "µs", LowerBetter: true, Baseline: "direct", Cleanwall: "cleanwall", ShowAdded: true})
		l.cpu = rep.addRow(&Comparison{Scenario: "http proxy cpu per request, " + l.name + ", vs nginx", Unit: "µs", LowerBetter: true, Baseline: "nginx", Cleanwall: "cleanwall", ShowAdded: true})
		if l.conns == 1 {
			l.p50N = rep.addRow(&Comparison{Scenario: "http latency p50, " + l.name + ", vs nginx", Unit: "µs", LowerBetter: true, Baseline: "nginx", Cleanwall: "cleanwall", ShowAdded: true})
			l.p99N = rep.addRow(&Comparison{Scenario: "http latency p99, " + l.name + ", vs nginx", Unit: "µs", LowerBetter: true, Baseline: "nginx", Cleanwall: "cleanwall", ShowAdded: true})
		}
	}
	loads[0].rateN.Target, loads[0].rateN.Check = ">=1.00", ratioAtLeast(1.00)
	loads[1].p50.Target, loads[1].p50.Check = "+<150 µs", addedBelow(150)
	rep.Config["httpLoads"] = []string{loads[0].name, loads[1].name}
	rep.note("http: %s; wrk -t<threads> -c<conns> -d<seconds> --latency, keep-alive connections, GET /bench, 200 with a %d-byte body from an nginx origin (return 200) in the remote namespace; nginx (the reverse proxy) runs in the node namespace with worker_processes auto, an upstream keepalive pool of 64 (proxy_http_version 1.1, Connection cleared), access log off; cleanwall's rule is open http, GET /**",
		nginxVersion(), len(originBody))

	// Warm up every path (ARP, routes, nginx's upstream pool, the proxy's goroutines).
	for _, side := range httpSides(0) {
		if res, err := wrkRound(sb[side], url[side], 1, 4, time.Second); err != nil || res.Non2xx+res.SocketErrors > 0 {
			t.Fatalf("warm-up %s: %v %+v", side, err, res)
		}
	}
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	perf := newPerfRecorder(t, top.daemon)
	for r := range rounds(3) {
		for _, l := range loads {
			res := map[string]wrkResult{}
			proxyCPU := map[string]float64{}
			for _, side := range httpSides(r) {
				procs := map[string][]int{"nginx": top.nginx, "cleanwall": {top.pid}}[side]
				nss := []string{sb[side].NS, top.env.Node, top.env.Remote}
				if side == "cleanwall" {
					perf.start(fmt.Sprintf("http-%dconns-round%d", l.conns, r))
				}
				cpu, ticks, retrans := takeCPU(top.pid), cpuTicks(procs), tcpRetransmits(nss...)
				w, err := wrkRound(sb[side], url[side], l.threads, l.conns, l.duration)
				ticks, retrans = cpuTicks(procs)-ticks, tcpRetransmits(nss...)-retrans
				if side == "cleanwall" {
					perf.stop()
				}
				if err != nil {
					t.Fatalf("%s round %d %s: %v", side, r, l.name, err)
				}
				if w.Non2xx+w.SocketErrors > 0 {
					t.Errorf("%s round %d %s: %d non-2xx responses, %d socket errors", side, r, l.name, w.Non2xx, w.SocketErrors)
				}
				extra := cpu.extra(top.pid, map[string]float64{"rps": w.RPS, "p50us": us(w.P50), "p90us": us(w.P90), "p99us": us(w.P99), "requests": w.Requests,
					"non2xx": float64(w.Non2xx), "socketErrors": float64(w.SocketErrors), "tcpRetransmits": retrans})
				if side != "cleanwall" {
					delete(extra, "daemonCPUPercent")
				}
				if procs != nil && w.Requests > 0 {
					// µs of the proxy's CPU time per request (clock ticks of 10 ms).
					proxyCPU[side] = float64(ticks) * 1e6 / clockTicks / w.Requests
					extra["proxyCPUusPerRequest"] = proxyCPU[side]
				}
				res[side] = w
				t.Logf("round %d %-9s %-8s: %7.0f req/s p50 %6.0f µs p99 %6.0f µs (proxy cpu %4.1f µs/request, %.0f tcp retransmits, host busy %.0f%% steal %.0f%%)",
					r, side, l.name, w.RPS, us(w.P50), us(w.P99), proxyCPU[side], retrans, extra["hostBusyPercent"], extra["hostStealPercent"])
				if side == "nginx" {
					l.rateN.Add(r, "baseline", w.RPS, extra)
				} else {
					l.rate.Add(r, map[string]string{"direct": "baseline", "cleanwall": "cleanwall"}[side], w.RPS, extra)
				}
			}
			cw, d, n := res["cleanwall"], res["direct"], res["nginx"]
			l.rateN.Add(r, "cleanwall", cw.RPS, nil)
			l.cpu.Add(r, "baseline", proxyCPU["nginx"], nil)
			l.cpu.Add(r, "cleanwall", proxyCPU["cleanwall"], nil)
			l.p50.Add(r, "baseline", us(d.P50), nil)
			l.p50.Add(r, "cleanwall", us(cw.P50), nil)
			l.p99.Add(r, "baseline", us(d.P99), nil)
			l.p99.Add(r, "cleanwall", us(cw.P99), nil)
			if l.p50N != nil {
				l.p50N.Add(r, "baseline", us(n.P50), nil)
				l.p50N.Add(r, "cleanwall", us(cw.P50), nil)
				l.p99N.Add(r, "baseline", us(n.P99), nil)
				l.p99N.Add(r, "cleanwall", us(cw.P99), nil)
			}
		}
	}
}
