package e2e

import (
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// A real Prometheus (Debian's) scrapes cleanwalld; every query of the
// shipped Grafana dashboard evaluates, and the ones about redirects and
// drops return the traffic the test made.
func TestPrometheusScrapesAndDashboardQueriesWork(t *testing.T) {
	prom, err := exec.LookPath("prometheus")
	if err != nil {
		testutil.Skip(t, "prometheus not installed (make deps installs it)")
	}
	env := harness.New(t)
	d := env.StartDaemon()
	env.DNSServer(zone...)
	env.HTTPServer("198.51.100.10:8080", nil)
	sb := env.MustAddSandbox("prom", harness.SandboxOptions{Policy: policyDNS, NoIPv6: true})

	hc := startPrometheus(t, env, prom, d.MetricsAddr, "")

	// Traffic for the panels: allowed and denied flows, DNS both ways.
	traffic := func() {
		if _, err := exchange(t, sb, "198.51.100.53:53", "api.example.test", dns.TypeA, false); err != nil {
			t.Fatal(err)
		}
		exchange(t, sb, "198.51.100.53:53", "blocked.example.test", dns.TypeA, false)
		if c, err := sb.Dial("tcp4", "198.51.100.10:8080", 5*time.Second); err == nil {
			c.Close()
		}
		if c, err := sb.Dial("tcp4", "198.51.100.10:9999", 300*time.Millisecond); err == nil {
			c.Close()
		}
	}
	query := func(q string) (string, int, error) {
		resp, err := hc.Get("http://127.0.0.1:9090/api/v1/query?query=" + url.QueryEscape(q))
		if err != nil {
			return "", 0, err
		}
		defer resp.Body.Close()
		var r struct {
			Status string `json:"status"`
			Error  string `json:"error"`
			Data   struct {
				Result []json.RawMessage `json:"result"`
			} `json:"data"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
			return "", 0, err
		}
		if r.Status != "success" {
			return r.Status, 0, fmt.Errorf("%s", r.Error)
		}
		return r.Status, len(r.Data.Result), nil
	}
	deadline := time.Now().Add(45 * time.Second)
	want := map[string]bool{
		`sum by (reason) (rate(cleanwall_datapath_packets_total{verdict="drop"}[1m]))`:                        false,
		`sum by (sandbox, rule) (rate(cleanwall_datapath_flows_total{verdict="redirect",reason="rule"}[1m]))`: false,
		`sum by (decision) (rate(cleanwall_dns_queries_total[1m]))`:                                           false,
	}
	for time.Now().Before(deadline) {
		traffic()
		done := true
		for q := range want {
			if _, n, err := query(q); err == nil && n > 0 {
				want[q] = true
			}
			done = done && want[q]
		}
		if done {
			break
		}
		time.Sleep(time.Second)
	}
	for q, ok := range want {
		if !ok {
			t.Errorf("no data for %s", q)
		}
	}
	// Every panel of the dashboard is a valid query.
	root, _ := os.Getwd()
	data, err := os.ReadFile(filepath.Join(root, "..", "..", "deploy", "grafana", "cleanwall.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatal(err)
	}
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			if _, _, err := query(tg.Expr); err != nil {
				t.Errorf("dashboard panel %q: %s: %v", p.Title, tg.Expr, err)
			}
		}
	}
}
