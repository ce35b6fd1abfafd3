package prometheus

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/cleanwall/cleanwall/internal/testutil"
)

// promtool returns Debian's promtool (package prometheus, in make test's
// TEST_DEPS); without it the test skips, which under CI=true fails.
func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		testutil.Skip(t, "promtool not installed (make deps installs Debian's prometheus)")
	}
	return p
}

func runPromtool(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(promtool(t), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// The rules parse and their expressions and templates are valid.
func TestAlertRulesCheck(t *testing.T) {
	out := runPromtool(t, "check", "rules", "alerts.yaml")
	if !strings.Contains(out, "SUCCESS") {
		t.Fatalf("promtool check rules did not succeed:\n%s", out)
	}
}

// Every alert fires on its case and stays quiet on the others
// (alerts_test.yaml).
func TestAlertRulesUnitTests(t *testing.T) {
	out := runPromtool(t, "test", "rules", "alerts_test.yaml")
	if !strings.Contains(out, "SUCCESS") {
		t.Fatalf("promtool test rules did not succeed:\n%s", out)
	}
}

var metricName = regexp.MustCompile(`\bcleanwall_[a-z_]+\b`)

// pending are metrics the rules read whose code is not in the tree yet
// (none now); a name that lands is reported so that its entry can go.
var pending = map[string]bool{}

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Expr        string            `yaml:"expr"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

// Every alert has a severity, a summary, a description, a unit test and a
// runbook section in docs/alerts.md; every metric the rules read is one the
// product exports (a renamed metric would leave an alert that never fires).
func TestAlertRulesCoverage(t *testing.T) {
	raw, err := os.ReadFile("alerts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	if err := yaml.Unmarshal(raw, &rf); err != nil {
		t.Fatal(err)
	}
	tests, err := os.ReadFile("alerts_test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "alerts.md"))
	if err != nil {
		t.Fatal(err)
	}
	anchors := map[string]bool{}
	for _, line := range strings.Split(string(doc), "\n") {
		if h, ok := strings.CutPrefix(line, "## "); ok {
			anchors[strings.ToLower(strings.TrimSpace(h))] = true
		}
	}
	exported := exportedMetrics(t)
	n := 0
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			n++
			switch r.Labels["severity"] {
			case "warning", "critical":
			default:
				t.Errorf("%s: severity %q, want warning or critical", r.Alert, r.Labels["severity"])
			}
			for _, a := range []string{"summary", "description", "runbook"} {
				if strings.TrimSpace(r.Annotations[a]) == "" {
					t.Errorf("%s: no %s annotation", r.Alert, a)
				}
			}
			if a, ok := strings.CutPrefix(r.Annotations["runbook"], "docs/alerts.md#"); !ok || !anchors[a] {
				t.Errorf("%s: runbook %q is not a section of docs/alerts.md", r.Alert, r.Annotations["runbook"])
			}
			if !strings.Contains(string(tests), "alertname: "+r.Alert+"\n") {
				t.Errorf("%s: no unit test in alerts_test.yaml", r.Alert)
			}
			for _, m := range metricName.FindAllString(r.Expr, -1) {
				if pending[m] {
					if exported[m] {
						t.Logf("%s is exported now: its pending entry can go", m)
					}
					continue
				}
				if !exported[m] {
					t.Errorf("%s reads %s, which no Go source of the product names", r.Alert, m)
				}
			}
		}
	}
	if n == 0 {
		t.Fatal("no alert in alerts.yaml")
	}
}

// exportedMetrics are the metric names spelled in the product's non-test
// Go sources.
func exportedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	names := map[string]bool{}
	root := filepath.Join("..", "..")
	for _, dir := range []string{"runtime", "proxies", "governance", "attest", "cmd"} {
		err := filepath.WalkDir(filepath.Join(root, dir), func(p string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
				return err
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			for _, m := range metricName.FindAllString(string(b), -1) {
				names[m] = true
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	keys := make([]string, 0, len(names))
	for k := range names {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	t.Logf("metric names in the sources: %s", strings.Join(keys, " "))
	return names
}
