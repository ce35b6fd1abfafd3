package bench

import (
	"bufio"
	"fmt"
	"math"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/policy"
)

// The proxy scenarios (dns, http) share one topology: the names and
// addresses below are what its policy allows and its servers answer.
const (
	// benchZone is the authoritative server's wildcard: it answers any name
	// under it, so every query of the cache-miss workload can be a new name.
	benchZone   = "bench.test"
	benchRecord = "*." + benchZone + ". 300 IN A 198.51.100.10"
	dnsUpstream = "198.51.100.53:53"
	originPort  = 8080
)

// proxiesPolicyYAML allows every name under benchZone through the DNS proxy
// and open-mode HTTP (inspected: any GET) to the origin server.
func proxiesPolicyYAML() []byte {
	return fmt.Appendf(nil, `apiVersion: %s
kind: %s
metadata:
  name: bench-proxies
spec:
  dns:
    upstream: %s
    allow: ["*.%s"]
  egress:
    - name: origin
      to: [{cidr: %s/32}]
      ports: [{port: %d}]
      mode: open
      open:
        protocol: http
        http:
          rules:
            - methods: [GET]
              paths: ["/**"]
`, policy.APIVersion, policy.Kind, dnsUpstream, benchZone, remoteServer, originPort)
}

// wrkResult is what one wrk run printed.
type wrkResult struct {
	Requests      float64 // completed requests
	RPS           float64 // "Requests/sec"
	P50, P90, P99 time.Duration
	SocketErrors  int // connect + read + write + timeout
	Non2xx        int
}

// parseWrk reads wrk's text output (run with --latency).
func parseWrk(out string) (wrkResult, error) {
	var r wrkResult
	var seen struct{ rps, p50, p99 bool }
	s := bufio.NewScanner(strings.NewReader(out))
	for s.Scan() {
		f := strings.Fields(s.Text())
		switch {
		case len(f) == 2 && f[0] == "Requests/sec:":
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				return r, fmt.Errorf("wrk: requests/sec %q: %w", f[1], err)
			}
			r.RPS, seen.rps = v, true
		case len(f) == 2 && (f[0] == "50%" || f[0] == "90%" || f[0] == "99%"):
			d, err := parseWrkDuration(f[1])
			if err != nil {
				return r, err
			}
			switch f[0] {
			case "50%":
				r.P50, seen.p50 = d, true
			case "90%":
				r.P90 = d
			case "99%":
				r.P99, seen.p99 = d, true
			}
		case len(f) >= 3 && f[1] == "requests" && f[2] == "in":
			v, err := strconv.ParseFloat(f[0], 64)
			if err != nil {
				return r, fmt.Errorf("wrk: request count %q: %w", f[0], err)
			}
			r.Requests = v
		case len(f) == 10 && f[0] == "Socket" && f[1] == "errors:":
			// Socket errors: connect 0, read 0, write 0, timeout 0
			for _, i := range []int{3, 5, 7, 9} {
				n, err := strconv.Atoi(strings.TrimSuffix(f[i], ","))
				if err != nil {
					return r, fmt.Errorf("wrk: socket errors %q: %w", s.Text(), err)
				}
				r.SocketErrors += n
			}
		case len(f) == 5 && f[0] == "Non-2xx":
			n, err := strconv.Atoi(f[4])
			if err != nil {
				return r, fmt.Errorf("wrk: non-2xx %q: %w", s.Text(), err)
			}
			r.Non2xx = n
		}
	}
	if !seen.rps || !seen.p50 || !seen.p99 {
		return r, fmt.Errorf("wrk: no Requests/sec or latency distribution in:\n%s", out)
	}
	return r, nil
}

// parseWrkDuration reads wrk's durations: "412.00us", "1.23ms", "2.00s", "1.50m".
func parseWrkDuration(s string) (time.Duration, error) {
	units := []struct {
		suffix string
		unit   time.Duration
	}{{"us", time.Microsecond}, {"ms", time.Millisecond}, {"m", time.Minute}, {"s", time.Second}}
	for _, u := range units {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			v, err := strconv.ParseFloat(num, 64)
			if err != nil {
				break
			}
			return time.Duration(math.Round(v * float64(u.unit))), nil
		}
	}
	return 0, fmt.Errorf("wrk: duration %q", s)
}

// goBenchLine is one result line of `go test -bench`.
type goBenchLine struct {
	Name    string // without the -GOMAXPROCS suffix
	N       int
	Metrics map[string]float64 // unit -> value ("ns/op", "queries/s", ...)
}

// parseGoBench reads the result lines of `go test -bench` output, in order.
func parseGoBench(out string) []goBenchLine {
	var lines []goBenchLine
	s := bufio.NewScanner(strings.NewReader(out))
	for s.Scan() {
		f := strings.Fields(s.Text())
		if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") || len(f)%2 != 0 {
			continue
		}
		n, err := strconv.Atoi(f[1])
		if err != nil {
			continue
		}
		name := f[0]
		if i := strings.LastIndexByte(name, '-'); i > 0 {
			if _, err := strconv.Atoi(name[i+1:]); err == nil {
				name = name[:i]
			}
		}
		l := goBenchLine{Name: name, N: n, Metrics: map[string]float64{}}
		for i := 2; i+1 < len(f); i += 2 {
			if v, err := strconv.ParseFloat(f[i], 64); err == nil {
				l.Metrics[f[i+1]] = v
			}
		}
		lines = append(lines, l)
	}
	return lines
}

func TestProxiesPolicyCompiles(t *testing.T) {
	p, err := policy.Parse(proxiesPolicyYAML())
	if err != nil {
		t.Fatal(err)
	}
	c, err := policy.Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !c.DNS.Allowed("m1-2-3."+benchZone) || c.DNS.Allowed(benchZone) || c.DNS.Allowed("x.example.test") {
		t.Fatal("the allow list is not *.bench.test")
	}
	if r, ok := c.Match(remoteServer, policy.ProtoTCP, originPort); !ok || r.Spec.Open == nil || r.Spec.Open.Protocol != "http" {
		t.Fatalf("the origin is not an open http rule: %+v %v", r, ok)
	}
}

func TestParseWrk(t *testing.T) {
	out := `Running 3s test @ http://198.51.100.10:8080/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms  306.21us  12.61ms   86.30%
    Req/Sec    14.71k     1.02k   16.63k    68.33%
  Latency Distribution
     50%    1.04ms
     75%    1.21ms
     90%    1.42ms
     99%    2.15ms
  87844 requests in 3.00s, 12.74MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  29270.35
Transfer/sec:      4.24MB
`
	r, err := parseWrk(out)
	if err != nil {
		t.Fatal(err)
	}
	if r.RPS != 29270.35 || r.Requests != 87844 || r.P50 != 1040*time.Microsecond || r.P90 != 1420*time.Microsecond ||
		r.P99 != 2150*time.Microsecond || r.SocketErrors != 3 || r.Non2xx != 4 {
		t.Fatalf("parsed %+v", r)
	}
	if _, err := parseWrk("unable to connect to 198.51.100.10:8080 Connection refused\n"); err == nil {
		t.Fatal("output without results parsed")
	}
	for in, want := range map[string]time.Duration{"412.00us": 412 * time.Microsecond, "2.00s": 2 * time.Second, "1.50m": 90 * time.Second} {
		if d, err := parseWrkDuration(in); err != nil || d != want {
			t.Errorf("%s: %v %v", in, d, err)
		}
	}
}

func TestParseGoBench(t *testing.T) {
	out := `goos: linux
BenchmarkQuery/parallel/direct-2         	  305620	      3923 ns/op	    254880 queries/s
BenchmarkQuery/parallel/proxy-miss-2     	   91372	     13126 ns/op	     76184 queries/s
PASS
`
	l := parseGoBench(out)
	if len(l) != 2 || l[0].Name != "BenchmarkQuery/parallel/direct" || l[1].Name != "BenchmarkQuery/parallel/proxy-miss" ||
		l[1].N != 91372 || l[1].Metrics["queries/s"] != 76184 || l[0].Metrics["ns/op"] != 3923 {
		t.Fatalf("parsed %+v", l)
	}
}
