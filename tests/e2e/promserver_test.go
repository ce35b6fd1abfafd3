package e2e

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// startPrometheus runs the prometheus binary prom in the node namespace,
// scraping target every second and evaluating rules (a file, or none),
// on 127.0.0.1:9090; it returns a client that reaches it.
func startPrometheus(t *testing.T, env *harness.Env, prom, target, rules string) *http.Client {
	t.Helper()
	dir := t.TempDir()
	ruleFiles := ""
	if rules != "" {
		ruleFiles = fmt.Sprintf("rule_files: [%q]\n", rules)
	}
	cfg := fmt.Sprintf("global: {scrape_interval: 1s, evaluation_interval: 1s}\n%sscrape_configs:\n  - job_name: cleanwall\n    static_configs: [{targets: [%q]}]\n", ruleFiles, target)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(prom, "--config.file="+filepath.Join(dir, "prometheus.yml"), "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address=127.0.0.1:9090", "--log.level=warn")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := netns.Do(env.Node, cmd.Start); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: env.NodeDialer()}}
}
