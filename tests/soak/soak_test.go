//go:build soak

// Package soak is `make soak`: minutes of mixed allowed and denied traffic
// from 20 sandboxes, then the same with one more sandbox flooding every
// proxy it can reach. It checks that cleanwalld's descriptors, goroutines
// and memory stay flat, that the 20 keep their latency within twice that
// of the calm phase, and that nothing denied ever gets through. Not part
// of `make test` (it runs for SOAK_DURATION, 5 minutes by default).
package soak

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/cleanwall/cleanwall/tests/harness"
)

const policyCalm = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: calm}
spec:
  egress:
    - name: results-api
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}]
      mode: open
`

// policyFlood opens what the flooder floods: TCP 8080, HTTP 8082, UDP
// 9000, DNS for one name.
const policyFlood = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: flood}
spec:
  dns:
    upstream: 198.51.100.53:53
    allow: [api.example.test]
  egress:
    - name: results-api
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}, {port: 9000, protocol: UDP}]
      mode: open
    - name: web
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8082}]
      mode: open
      open:
        protocol: http
        http:
          rules: [{methods: [GET], paths: ["/**"]}]
`

// sample is one reading of cleanwalld.
type sample struct {
	At         time.Duration `json:"at"`
	Phase      string        `json:"phase"`
	FDs        int           `json:"fds"`
	Goroutines int           `json:"goroutines"`
	RSSKiB     int           `json:"rssKiB"`
	CPUTicks   int           `json:"cpuTicks"` // utime+stime so far (clock ticks, 1/100 s)
}

// report is what a soak run writes to tests/soak/results.
type report struct {
	Started     time.Time           `json:"started"`
	Duration    string              `json:"duration"`
	Sandboxes   int                 `json:"sandboxes"`
	Latency     map[string][]string `json:"latency"` // phase: p50, p99, requests, failures
	Samples     []sample            `json:"samples"`
	FloodStats  map[string]int64    `json:"flood"`
	Leaks       int                 `json:"leaks"`
	FlowLimited float64             `json:"flowLimitRefusals"`
}

// The flooder is this test binary run again inside the flooding
// sandbox's namespace, at the idle scheduling class: a sandbox has its own
// CPU share on a node, and here it shares two cores with everything else.
// What the soak measures is what its flood costs the others through
// cleanwall, not through the CPU it burns itself.
const flooderEnv = "CLEANWALL_SOAK_FLOODER"

func TestMain(m *testing.M) {
	if out := os.Getenv(flooderEnv); out != "" {
		runFlooder(out)
		return
	}
	os.Exit(m.Run())
}

// runFlooder floods until SIGTERM, then writes its counts to out.
func runFlooder(out string) {
	stats := map[string]*atomic.Int64{"tcp-held": {}, "tcp-refused": {}, "udp-sent": {}, "dns-sent": {}, "slowloris": {}}
	var heldMu sync.Mutex
	var held []net.Conn
	keep := func(c net.Conn, max int) bool {
		heldMu.Lock()
		defer heldMu.Unlock()
		if len(held) >= max {
			return false
		}
		held = append(held, c)
		return true
	}
	loop := func(f func()) {
		go func() {
			for {
				f()
			}
		}()
	}
	loop(func() { // idle TCP flows, held: as many as it is given
		c, err := net.DialTimeout("tcp4", "198.51.100.10:8080", time.Second)
		if err != nil {
			stats["tcp-refused"].Add(1)
			return
		}
		if _, err := c.Write([]byte("x")); err == nil {
			if _, err := harness.ReadAck(c, time.Second); err == nil && keep(c, 5000) {
				stats["tcp-held"].Add(1)
				return
			}
		}
		stats["tcp-refused"].Add(1)
		c.Close()
	})
	loop(func() { // UDP from ever new source ports
		if c, err := net.Dial("udp4", "198.51.100.10:9000"); err == nil {
			_, _ = c.Write([]byte("u"))
			stats["udp-sent"].Add(1)
			c.Close()
		}
	})
	loop(func() { // DNS queries as fast as it can, to any resolver
		m := new(dns.Msg)
		m.SetQuestion(fmt.Sprintf("x%d.api.example.test.", rand.IntN(1e9)), dns.TypeA)
		b, _ := m.Pack()
		if c, err := net.Dial("udp4", fmt.Sprintf("198.51.100.%d:53", 60+rand.IntN(100))); err == nil {
			_, _ = c.Write(b)
			stats["dns-sent"].Add(1)
			c.Close()
		}
	})
	loop(func() { // slowloris: HTTP heads that never end
		c, err := net.DialTimeout("tcp4", "198.51.100.10:8082", time.Second)
		if err != nil {
			return
		}
		_, _ = c.Write([]byte("GET / HTTP/1.1\r\nHost: 198.51.100.10\r\nX-a: "))
		stats["slowloris"].Add(1)
		if !keep(c, 10000) {
			c.Close()
		}
	})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	counts := map[string]int64{}
	for k, v := range stats {
		counts[k] = v.Load()
	}
	b, _ := json.Marshal(counts)
	_ = os.WriteFile(out, b, 0o644)
}

func duration(t *testing.T) time.Duration {
	if s := os.Getenv("SOAK_DURATION"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("SOAK_DURATION: %v", err)
		}
		return d
	}
	return 5 * time.Minute
}

// latencies collects request latencies of the calm sandboxes by phase.
type latencies struct {
	mu       sync.Mutex
	phase    string
	byPhase  map[string][]time.Duration
	failures map[string]int
}

func (l *latencies) add(d time.Duration, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ok {
		l.byPhase[l.phase] = append(l.byPhase[l.phase], d)
	} else {
		l.failures[l.phase]++
	}
}

func (l *latencies) set(phase string) {
	l.mu.Lock()
	l.phase = phase
	l.mu.Unlock()
}

func pct(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

func readDaemon(t *testing.T, d *harness.Daemon, at time.Duration, phase string) sample {
	s := sample{At: at.Round(time.Second), Phase: phase}
	if ents, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(d.Pid()), "fd")); err == nil {
		s.FDs = len(ents)
	}
	if b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(d.Pid()), "status")); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
				s.RSSKiB, _ = strconv.Atoi(f[1])
			}
		}
	}
	if b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(d.Pid()), "stat")); err == nil {
		if i := strings.LastIndexByte(string(b), ')'); i > 0 {
			f := strings.Fields(string(b)[i+2:])
			if len(f) > 12 {
				u, _ := strconv.Atoi(f[11])
				k, _ := strconv.Atoi(f[12])
				s.CPUTicks = u + k
			}
		}
	}
	if m, err := d.Metrics(); err == nil {
		v, _ := harness.MetricValue(m, "go_goroutines")
		s.Goroutines = int(v)
	}
	return s
}

func TestSoak(t *testing.T) {
	total := duration(t)
	calmFor := total / 5
	env := harness.New(t)
	args := []string{"--log-level", "warn"}
	if os.Getenv("SOAK_PPROF") != "" {
		args = append(args, "--pprof-addr", "127.0.0.1:6061")
	}
	d := env.StartDaemon(args...)
	srv := env.TCPServer("198.51.100.10:8080")
	denied := env.TCPServer("198.51.100.10:8081")
	udp := env.UDPServer("198.51.100.10:9000")
	env.HTTPServer("198.51.100.10:8082", nil)
	env.DNSServer("api.example.test. 300 IN A 198.51.100.10")
	sniff := env.SniffFromSandboxes()

	const n = 20
	calm := make([]*harness.Sandbox, n)
	for i := range calm {
		calm[i] = env.MustAddSandbox(fmt.Sprintf("calm%d", i), harness.SandboxOptions{Policy: policyCalm, NoIPv6: true})
	}
	flooder := env.MustAddSandbox("flooder", harness.SandboxOptions{Policy: policyFlood, NoIPv6: true})

	lat := &latencies{phase: "calm", byPhase: map[string][]time.Duration{}, failures: map[string]int{}}
	stop := make(chan struct{})
	var leaks atomic.Int64
	var wg sync.WaitGroup
	for _, sb := range calm {
		wg.Add(1)
		go func() { // mixed allowed and denied traffic, a request every 200 ms
			defer wg.Done()
			tick := time.NewTicker(200 * time.Millisecond)
			defer tick.Stop()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				start := time.Now()
				c, err := sb.Dial("tcp4", "198.51.100.10:8080", 2*time.Second)
				ok := err == nil
				if ok {
					_ = c.SetDeadline(time.Now().Add(2 * time.Second))
					_, err = c.Write([]byte("ping"))
					ack, rerr := harness.ReadAck(c, 2*time.Second)
					ok = err == nil && rerr == nil && ack == "ack:4"
					c.Close()
				}
				lat.add(time.Since(start), ok)
				if i%5 == 0 { // and something the policy denies
					if c, err := sb.Dial("tcp4", "198.51.100.10:8081", 300*time.Millisecond); err == nil {
						leaks.Add(1)
						c.Close()
					}
				}
			}
		}()
	}

	// Calm phase.
	var samples []sample
	begin := time.Now()
	sampleEvery := total / 30
	sampleUntil := func(until time.Time, phase string) {
		for time.Now().Before(until) {
			samples = append(samples, readDaemon(t, d, time.Since(begin), phase))
			time.Sleep(min(sampleEvery, time.Until(until)))
		}
	}
	sampleUntil(begin.Add(calmFor), "calm")

	// Flood phase: one sandbox at every proxy it can reach.
	lat.set("flood")
	statsFile := filepath.Join(env.Dir, "flood.json")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	fl := exec.Command("nsenter", "--net="+flooder.NS, "chrt", "--idle", "0", self, "-test.run", "^$")
	fl.Env = append(os.Environ(), flooderEnv+"="+statsFile)
	fl.Stdout, fl.Stderr = os.Stderr, os.Stderr
	if err := fl.Start(); err != nil {
		t.Fatal(err)
	}
	defer fl.Process.Kill()
	if out := os.Getenv("SOAK_PPROF"); out != "" { // a CPU profile of the daemon under the flood
		sampleUntil(time.Now().Add(10*time.Second), "flood")
		c := http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DialContext: env.NodeDialer()}}
		if resp, err := c.Get("http://127.0.0.1:6061/debug/pprof/profile?seconds=10"); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			_ = os.WriteFile(out, b, 0o644)
			t.Logf("CPU profile under the flood: %s", out)
		}
	}
	sampleUntil(begin.Add(total), "flood")
	if out := os.Getenv("SOAK_PPROF"); out != "" { // and what the daemon holds at the end
		c := http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DialContext: env.NodeDialer()}}
		if resp, err := c.Get("http://127.0.0.1:6061/debug/pprof/goroutine?debug=1"); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			_ = os.WriteFile(out+".goroutines", b, 0o644)
		}
	}
	_ = fl.Process.Signal(syscall.SIGTERM)
	_ = fl.Wait()
	close(stop)
	wg.Wait()

	rep := report{Started: begin.UTC(), Duration: total.String(), Sandboxes: n + 1, Latency: map[string][]string{},
		Samples: samples, FloodStats: map[string]int64{}, Leaks: int(leaks.Load())}
	if b, err := os.ReadFile(statsFile); err != nil {
		t.Errorf("the flooder left no counts: %v", err)
	} else if err := json.Unmarshal(b, &rep.FloodStats); err != nil {
		t.Error(err)
	}
	if m, err := d.Metrics(); err == nil {
		rep.FlowLimited = harness.MetricSum(m, "cleanwall_proxy_flows_total", `result="flow-limit"`)
	}
	for _, ph := range []string{"calm", "flood"} {
		ds := lat.byPhase[ph]
		rep.Latency[ph] = []string{pct(ds, 0.5).String(), pct(ds, 0.99).String(), strconv.Itoa(len(ds)), strconv.Itoa(lat.failures[ph])}
	}
	writeReport(t, rep)

	// Nothing denied got through, nothing reached the remote directly.
	if rep.Leaks != 0 || len(denied.Conns()) != 0 {
		t.Errorf("denied connections succeeded: %d (the denied server saw %d)", rep.Leaks, len(denied.Conns()))
	}
	for _, sb := range append(calm, flooder) {
		if c := sniff.FromSource(sb.IP); c != 0 {
			t.Errorf("%d packets from %s reached the remote side", c, sb.Name)
		}
	}
	for _, c := range srv.Conns() {
		if c.From.Addr() != harness.NodeRemoteIP {
			t.Errorf("the server saw a connection from %v", c.From)
		}
	}
	if len(udp.Received()) == 0 {
		t.Error("the flooder's allowed UDP never arrived: the flood did not run")
	}
	// Latency of the calm sandboxes: within 2x of the calm phase.
	calmL, floodL := lat.byPhase["calm"], lat.byPhase["flood"]
	for _, p := range []float64{0.5, 0.99} {
		if c, f := pct(calmL, p), pct(floodL, p); f > 2*c {
			t.Errorf("p%.0f latency of the calm sandboxes: %v calm, %v under the flood (over 2x)", p*100, c, f)
		}
	}
	if f := lat.failures["flood"]; f > 0 {
		t.Errorf("%d requests of the calm sandboxes failed under the flood", f)
	}
	// Flat: the last third of the flood holds no more than the first
	// third's peak, with a little slack.
	var underFlood []sample
	for _, s := range samples {
		if s.Phase == "flood" {
			underFlood = append(underFlood, s)
		}
	}
	if len(underFlood) >= 6 {
		third := len(underFlood) / 3
		peak := func(ss []sample, f func(sample) int) int {
			m := 0
			for _, s := range ss {
				m = max(m, f(s))
			}
			return m
		}
		for _, c := range []struct {
			name  string
			f     func(sample) int
			slack int
		}{
			{"descriptors", func(s sample) int { return s.FDs }, 64},
			{"goroutines", func(s sample) int { return s.Goroutines }, 128},
			{"RSS KiB", func(s sample) int { return s.RSSKiB }, 16 << 10},
		} {
			early, late := peak(underFlood[:third], c.f), peak(underFlood[2*third:], c.f)
			if late > early+early/10+c.slack {
				t.Errorf("%s grew during the flood: %d early, %d late", c.name, early, late)
			}
		}
	}
}

func writeReport(t *testing.T, rep report) {
	t.Logf("calm sandboxes' latency p50/p99 (requests, failures): calm %v, flood %v", rep.Latency["calm"], rep.Latency["flood"])
	t.Logf("flood: %v, flow-limit refusals %.0f", rep.FloodStats, rep.FlowLimited)
	for i, s := range rep.Samples {
		cpu := 0.0
		if i > 0 && s.At > rep.Samples[i-1].At {
			cpu = float64(s.CPUTicks-rep.Samples[i-1].CPUTicks) / 100 / (s.At - rep.Samples[i-1].At).Seconds() * 100
		}
		t.Logf("%6s %-5s fds %5d goroutines %5d rss %6d KiB cpu %5.1f%%", s.At, s.Phase, s.FDs, s.Goroutines, s.RSSKiB, cpu)
	}
	dir := "results"
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, _ := json.MarshalIndent(rep, "", "  ")
	path := filepath.Join(dir, rep.Started.Format("20060102-150405")+".json")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("report: tests/soak/%s", path)
}
