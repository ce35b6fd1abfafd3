package e2e

import (
	"encoding/json"
	"net/url"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// The shipped alert rules (deploy/prometheus/alerts.yaml) loaded into a
// real Prometheus (Debian's) that scrapes a real cleanwalld: every rule
// evaluates without error against the daemon's series, and when the
// sandbox's datapath program is detached (`bpftool link detach`, as an
// operator could) and the watchdog puts it back, CleanwallDatapathDetached
// and CleanwallDriftRepaired fire for that sandbox and that repair.
func TestAlertRulesFireOnADetachedDatapath(t *testing.T) {
	prom, err := exec.LookPath("prometheus")
	if err != nil {
		testutil.Skip(t, "prometheus not installed (make deps installs it)")
	}
	rules, err := filepath.Abs(filepath.Join("..", "..", "deploy", "prometheus", "alerts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	env := harness.New(t)
	d := env.StartDaemon("--watchdog-interval", "3s")
	env.TCPServer("198.51.100.10:8080")
	sb := env.MustAddSandbox("alerts", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
	d.RoundTrip(t, sb)

	hc := startPrometheus(t, env, prom, d.MetricsAddr, rules)
	get := func(path string, v any) error {
		resp, err := hc.Get("http://127.0.0.1:9090" + path)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		return json.NewDecoder(resp.Body).Decode(v)
	}

	// Every rule of every group is loaded and evaluates cleanly.
	type rulesResp struct {
		Data struct {
			Groups []struct {
				Name  string `json:"name"`
				Rules []struct {
					Name      string `json:"name"`
					Health    string `json:"health"`
					LastError string `json:"lastError"`
				} `json:"rules"`
			} `json:"groups"`
		} `json:"data"`
	}
	var rr rulesResp
	var loaded, healthy int
	if !harness.Eventually(20*time.Second, func() bool {
		rr, loaded, healthy = rulesResp{}, 0, 0
		if get("/api/v1/rules", &rr) != nil {
			return false
		}
		for _, g := range rr.Data.Groups {
			for _, r := range g.Rules {
				loaded++
				if r.Health == "ok" {
					healthy++
				}
			}
		}
		return loaded > 0 && healthy == loaded
	}) {
		t.Fatalf("rules loaded %d, healthy %d: %+v", loaded, healthy, rr.Data.Groups)
	}

	// Prometheus has the baseline (0) of the series the alerts count.
	type sample struct {
		Metric map[string]string `json:"metric"`
	}
	type queryResp struct {
		Data struct {
			Result []sample `json:"result"`
		} `json:"data"`
	}
	has := func(q string) bool {
		var r queryResp
		return get("/api/v1/query?query="+url.QueryEscape(q), &r) == nil && len(r.Data.Result) > 0
	}
	if !harness.Eventually(15*time.Second, func() bool {
		return has(`cleanwall_wall_drops_total{sandbox="`+sb.ContainerID+`"}`) && has(`cleanwall_repairs_total{what="attachment"}`)
	}) {
		t.Fatal("Prometheus never scraped the wall drops of the sandbox and the repairs")
	}

	// Detach the program and send: the wall drops until the watchdog
	// reattaches it.
	harness.Detachers["bpftool-link-detach"](t, d)
	if !harness.Eventually(10*time.Second, func() bool {
		if c, err := sb.Dial("tcp4", "198.51.100.10:8080", 200*time.Millisecond); err == nil {
			c.Close()
		}
		return d.WallDrops(t, sb) > 0
	}) {
		t.Fatal("the wall dropped nothing while the program was detached")
	}

	type alertsResp struct {
		Data struct {
			Alerts []struct {
				Labels map[string]string `json:"labels"`
				State  string            `json:"state"`
			} `json:"alerts"`
		} `json:"data"`
	}
	var ar alertsResp
	firing := func(name string, labels map[string]string) bool {
		for _, a := range ar.Data.Alerts {
			if a.Labels["alertname"] != name || a.State != "firing" {
				continue
			}
			ok := true
			for k, v := range labels {
				ok = ok && a.Labels[k] == v
			}
			if ok {
				return true
			}
		}
		return false
	}
	want := map[string]map[string]string{
		"CleanwallDatapathDetached": {"sandbox": sb.ContainerID, "severity": "critical"},
		"CleanwallDriftRepaired":    {"what": "attachment", "severity": "warning"},
	}
	if !harness.Eventually(30*time.Second, func() bool {
		ar = alertsResp{}
		if get("/api/v1/alerts", &ar) != nil {
			return false
		}
		for name, labels := range want {
			if !firing(name, labels) {
				return false
			}
		}
		return true
	}) {
		t.Fatalf("alerts: %+v; want %v firing", ar.Data.Alerts, want)
	}
	if firing("CleanwallDaemonDown", nil) || firing("CleanwallRuleMapNearFull", nil) {
		t.Errorf("an alert about a healthy daemon fired: %+v", ar.Data.Alerts)
	}
	// The watchdog's repair let the sandbox's traffic through again.
	d.RoundTrip(t, sb)
}
