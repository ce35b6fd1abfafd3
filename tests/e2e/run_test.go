package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// cleanwallRun runs `ip netns exec NODE cleanwall run ...`: inside a
// namespace whose mount namespace has no /sys/fs/bpf, as a user would.
type runResult struct {
	code           int
	stdout, stderr string
}

func runCmd(env *harness.Env, args ...string) *exec.Cmd {
	all := append([]string{"netns", "exec", filepath.Base(env.Node), filepath.Join(env.Bin, "cleanwall"), "run"}, args...)
	cmd := exec.Command("ip", all...)
	cmd.Env = append(os.Environ(), "PATH="+env.Bin+":"+os.Getenv("PATH"))
	return cmd
}

func cleanwallRun(t *testing.T, env *harness.Env, args ...string) runResult {
	t.Helper()
	cmd := runCmd(env, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return runResult{code, out.String(), errb.String()}
}

func writePolicy(t *testing.T, env *harness.Env, name, body string) string {
	t.Helper()
	p := filepath.Join(env.Dir, name)
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// runLeftovers checks the node namespace holds nothing of a finished run:
// no sandbox namespace, no host veth, no fwmark rule or local route of an
// embedded runtime, no run directory.
func runLeftovers(t *testing.T, env *harness.Env, name string) {
	t.Helper()
	if netns.Exists("cleanwall-" + name) {
		t.Errorf("sandbox namespace cleanwall-%s left behind", name)
	}
	for _, args := range [][]string{{"rule"}, {"-6", "rule"}, {"link"}} {
		out, err := exec.Command("ip", append([]string{"-n", filepath.Base(env.Node)}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(out), "fwmark") || strings.Contains(string(out), "veth") {
			t.Errorf("left behind in the node namespace (ip %v):\n%s", args, out)
		}
	}
}

func TestRunEndToEnd(t *testing.T) {
	env := harness.New(t)
	srv := env.HTTPServer("198.51.100.10:8080", nil)
	env.HTTPServer("198.51.100.10:8081", nil)
	pol := writePolicy(t, env, "run.yaml", policyOpen)
	res := cleanwallRun(t, env, "--policy", pol, "--name", runName("e2e-run"), "--",
		"sh", "-c", `curl -sS -m 3 http://198.51.100.10:8080/from-run && ! curl -sS -m 2 http://198.51.100.10:8081/ && exit 7`)
	if res.code != 7 {
		t.Fatalf("exit status %d, want the command's 7\nstdout: %s\nstderr: %s", res.code, res.stdout, res.stderr)
	}
	if !strings.Contains(res.stdout, "ok /from-run") {
		t.Fatalf("the allowed request's answer is missing from stdout: %q", res.stdout)
	}
	if n := len(srv.Requests()); n != 1 {
		t.Fatalf("server got %d requests", n)
	}
	for _, want := range []string{"exited with status 7", "redirected results-api", "dropped    no-rule"} {
		if !strings.Contains(res.stderr, want) {
			t.Errorf("summary lacks %q:\n%s", want, res.stderr)
		}
	}
	runLeftovers(t, env, runName("e2e-run"))
}

func TestRunConcurrentSandboxes(t *testing.T) {
	env := harness.New(t)
	srv := env.HTTPServer("198.51.100.10:8080", nil)
	pol := writePolicy(t, env, "run.yaml", policyOpen)
	var wg sync.WaitGroup
	results := make([]runResult, 2)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Overlapping lifetimes: each fetches, waits for the other to be up, fetches again.
			results[i] = cleanwallRun(t, env, "--policy", pol, "--name", runName(fmt.Sprintf("conc-%d", i)), "--",
				"sh", "-c", fmt.Sprintf(`curl -sS -m 3 http://198.51.100.10:8080/a%d && sleep 2 && curl -sS -m 3 http://198.51.100.10:8080/b%d`, i, i))
		}()
	}
	wg.Wait()
	for i, r := range results {
		if r.code != 0 {
			t.Fatalf("run %d: exit %d\nstdout: %s\nstderr: %s", i, r.code, r.stdout, r.stderr)
		}
		if !strings.Contains(r.stdout, fmt.Sprintf("ok /b%d", i)) {
			t.Fatalf("run %d: %q", i, r.stdout)
		}
	}
	if n := len(srv.Requests()); n != 4 {
		t.Fatalf("server got %d requests, want 4", n)
	}
	runLeftovers(t, env, runName("conc-0"))
	runLeftovers(t, env, runName("conc-1"))
}

// Bad input: one clear line, a non-zero exit, the command never started,
// nothing left behind.
func TestRunBadInput(t *testing.T) {
	env := harness.New(t)
	marker := filepath.Join(env.Dir, "started")
	good := writePolicy(t, env, "good.yaml", policyOpen)
	bad := writePolicy(t, env, "bad.yaml", strings.Replace(policyOpen, "port: 8080", "port: 70000", 1))
	cases := []struct {
		name string
		args []string
		want string
		user bool
	}{
		{"missing policy file", []string{"--policy", filepath.Join(env.Dir, "nope.yaml")}, "nope.yaml", false},
		{"invalid policy", []string{"--policy", bad}, "spec.egress[0].ports[0].port", false},
		{"missing CNI plugin", []string{"--policy", good, "--cni-bin-dir", "/nonexistent"}, "CNI plugin(s) ptp, host-local, cleanwall-cni not found", false},
		{"no command", []string{"--policy", good}, "no command to run", false},
		{"not root", []string{"--policy", good}, "needs root", true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			args := append([]string{}, c.args...)
			if c.name != "no command" {
				args = append(args, "--name", runName("bad"), "--", "touch", marker)
			}
			var res runResult
			if c.user {
				cmd := exec.Command("setpriv", append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", filepath.Join(env.Bin, "cleanwall"), "run"}, args...)...)
				var errb bytes.Buffer
				cmd.Stderr = &errb
				err := cmd.Run()
				ee, ok := err.(*exec.ExitError)
				if !ok {
					t.Fatalf("unexpected: %v", err)
				}
				res = runResult{code: ee.ExitCode(), stderr: errb.String()}
			} else {
				res = cleanwallRun(t, env, args...)
			}
			if res.code == 0 {
				t.Fatal("exit status 0")
			}
			lines := strings.Split(strings.TrimSpace(res.stderr), "\n")
			if len(lines) != 1 || !strings.HasPrefix(lines[0], "cleanwall: ") || !strings.Contains(lines[0], c.want) {
				t.Fatalf("want one line naming %q, got:\n%s", c.want, res.stderr)
			}
			if _, err := os.Stat(marker); err == nil {
				t.Fatal("the command ran")
			}
			runLeftovers(t, env, runName("bad"))
		})
	}
}

// Ctrl-C (SIGINT) while the command runs: the command ends, everything is
// torn down, cleanwall exits 130.
func TestRunInterruptTearsDown(t *testing.T) {
	env := harness.New(t)
	pol := writePolicy(t, env, "run.yaml", policyOpen)
	cmd := runCmd(env, "--policy", pol, "--name", runName("intr"), "--", "sleep", "60")
	var errb testutil.SyncBuffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if !harness.Eventually(20*time.Second, func() bool { return strings.Contains(errb.String(), "running sleep") }) {
		cmd.Process.Kill()
		t.Fatalf("sandbox never came up:\n%s", errb.String())
	}
	cmd.Process.Signal(syscall.SIGINT)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		ee, ok := err.(*exec.ExitError)
		if !ok || ee.ExitCode() != 130 {
			t.Fatalf("exit: %v\n%s", err, errb.String())
		}
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatal("cleanwall run did not end after SIGINT")
	}
	runLeftovers(t, env, runName("intr"))
}

// runName makes a sandbox name unique to this test process: sandbox
// namespaces live on the machine, and test processes may run side by side.
func runName(base string) string { return fmt.Sprintf("%s-%d", base, os.Getpid()) }
