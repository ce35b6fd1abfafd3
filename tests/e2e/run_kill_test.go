package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// What `cleanwall run` keeps under /run/cleanwall/run (cmd/cleanwall/run.go).
const (
	runStateDir  = "/run/cleanwall/run"
	runIPAMDir   = runStateDir + "/ipam/cleanwall-run"
	runCNICache  = runStateDir + "/cni-cache/results"
	runOwnerFile = "owner.json"
)

// startedRun is a `cleanwall run` process whose command is up. Its
// output goes to files, not pipes: a command that outlives it (the bug
// these tests catch) must not keep Wait from returning.
type startedRun struct {
	cmd    *exec.Cmd
	out    string // stdout file
	errOut string // stderr file
	name   string
	ipv4   string
	done   chan struct{} // closed when cmd.Wait returned
	err    error         // cmd.Wait's result, once done
}

func (r *startedRun) stdout() string { b, _ := os.ReadFile(r.out); return string(b) }
func (r *startedRun) stderr() string { b, _ := os.ReadFile(r.errOut); return string(b) }

// pid is the pid of `cleanwall run` itself (`ip netns exec` execs it).
func (r *startedRun) pid() int { return r.cmd.Process.Pid }

var sandboxAddrs = regexp.MustCompile(`sandbox \S+ \(([0-9.]+)`)

// startRun starts `cleanwall run` and waits until the file ready exists
// (made by the command) or the command is announced when ready is "".
func startRun(t *testing.T, env *harness.Env, name, ready string, args ...string) *startedRun {
	t.Helper()
	r := &startedRun{cmd: runCmd(env, append([]string{"--name", name}, args...)...), name: name, done: make(chan struct{}),
		out: filepath.Join(env.Dir, name+".stdout"), errOut: filepath.Join(env.Dir, name+".stderr")}
	stdout, err := os.Create(r.out)
	if err != nil {
		t.Fatal(err)
	}
	defer stdout.Close() // the child has its own descriptors
	stderr, err := os.Create(r.errOut)
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	r.cmd.Stdout, r.cmd.Stderr = stdout, stderr
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { r.err = r.cmd.Wait(); close(r.done) }()
	t.Cleanup(func() {
		_ = r.cmd.Process.Kill()
		<-r.done
	})
	up := func() bool {
		if ready != "" {
			_, err := os.Stat(ready)
			return err == nil
		}
		return strings.Contains(r.stderr(), "; running ")
	}
	if !harness.Eventually(30*time.Second, up) {
		t.Fatalf("the run never came up:\n%s", r.stderr())
	}
	m := sandboxAddrs.FindStringSubmatch(r.stderr())
	if m == nil {
		t.Fatalf("no sandbox address announced:\n%s", r.stderr())
	}
	r.ipv4 = m[1]
	return r
}

// kill SIGKILLs `cleanwall run` and reaps it.
func (r *startedRun) kill(t *testing.T) {
	t.Helper()
	if err := r.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		t.Fatal("cleanwall run survived SIGKILL")
	}
}

// runOwner is the part of a run's ownership record these tests read.
type runOwner struct {
	Name        string `json:"name"`
	Netns       string `json:"netns"`
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
	Runtime     *struct {
		Slot    int    `json:"slot"`
		Table   int    `json:"table"`
		PinRoot string `json:"pinRoot"`
	} `json:"runtime"`
}

func readOwner(t *testing.T, pid int) runOwner {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(runStateDir, strconv.Itoa(pid), runOwnerFile))
	if err != nil {
		t.Fatalf("ownership record of run %d: %v", pid, err)
	}
	var o runOwner
	if err := json.Unmarshal(data, &o); err != nil {
		t.Fatalf("ownership record of run %d: %v", pid, err)
	}
	if o.Runtime == nil || o.Runtime.Table == 0 || o.ContainerID == "" || o.Netns == "" {
		t.Fatalf("ownership record of run %d lacks what gc needs:\n%s", pid, data)
	}
	return o
}

// processGone reports whether pid has exited (no entry, or a zombie).
func processGone(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(stat)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || strings.HasPrefix(s[i+1:], " Z")
}

// readPid waits for a pid file written by the sandboxed command.
func readPid(t *testing.T, path string) int {
	t.Helper()
	var pid int
	if !harness.Eventually(20*time.Second, func() bool {
		data, err := os.ReadFile(path)
		if err != nil {
			return false
		}
		pid, err = strconv.Atoi(strings.TrimSpace(string(data)))
		return err == nil && pid > 0
	}) {
		t.Fatalf("%s never written", path)
	}
	return pid
}

// runFootprint is what a run holds on the machine: all of it must go
// once the run is gone.
type runFootprint struct {
	name, ipv4 string
	pid        int
	owner      runOwner
}

func (d runFootprint) runDir() string { return filepath.Join(runStateDir, strconv.Itoa(d.pid)) }
func (d runFootprint) cacheEntry() string {
	return filepath.Join(runCNICache, "cleanwall-run-"+d.owner.ContainerID+"-"+d.owner.IfName)
}

// nodeIP runs `ip -n NODE args...` and returns its output.
func nodeIP(t *testing.T, env *harness.Env, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", filepath.Base(env.Node)}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// ipamHolds lists host-local's reservation files naming the container.
func ipamHolds(t *testing.T, containerID string) []string {
	t.Helper()
	entries, err := os.ReadDir(runIPAMDir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var held []string
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(runIPAMDir, e.Name()))
		if err == nil && strings.Contains(string(data), containerID) {
			held = append(held, e.Name())
		}
	}
	return held
}

// leftoversPresent checks a run's debris is there, so that its absence
// later is gc's work (or, for a live run, that gc left it alone). A killed
// run started through `ip netns exec` loses its sandbox namespace with the
// last process of its mount namespace (the bind mount lived there), and
// the host veth with it; the netns file stays. A live run has both.
func leftoversPresent(t *testing.T, env *harness.Env, d runFootprint, live bool) {
	t.Helper()
	var missing []string
	if _, err := os.Stat(d.runDir()); err != nil {
		missing = append(missing, "run directory")
	}
	if _, err := os.Lstat(netns.Path(d.owner.Netns)); err != nil {
		missing = append(missing, "netns file")
	}
	if _, err := os.Stat(d.cacheEntry()); err != nil {
		missing = append(missing, "libcni cache entry")
	}
	if len(ipamHolds(t, d.owner.ContainerID)) == 0 {
		missing = append(missing, "host-local reservation")
	}
	if !strings.Contains(nodeIP(t, env, "rule"), fmt.Sprintf("lookup %d", d.owner.Runtime.Table)) {
		missing = append(missing, "ip rule")
	}
	if !strings.Contains(nodeNft(t, env), fmt.Sprintf("cleanwall_%d", d.owner.Runtime.Table)) {
		missing = append(missing, "nftables tables")
	}
	if live && !strings.Contains(nodeIP(t, env, "link"), "veth") {
		missing = append(missing, "host veth")
	}
	if len(missing) > 0 {
		t.Fatalf("run %s should still have its %s (is something else collecting runs?)", d.name, strings.Join(missing, ", "))
	}
}

// nodeNft lists the nftables tables of the node namespace ("family name"
// per line).
func nodeNft(t *testing.T, env *harness.Env) string {
	t.Helper()
	var b strings.Builder
	err := env.InNode(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		tables, err := c.ListTables()
		if err != nil {
			return err
		}
		for _, tb := range tables {
			fmt.Fprintf(&b, "%d %s\n", tb.Family, tb.Name)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// assertRunGone checks nothing of a dead run is left anywhere.
func assertRunGone(t *testing.T, env *harness.Env, d runFootprint) {
	t.Helper()
	runLeftovers(t, env, d.name) // netns, host veth, fwmark rules
	table := strconv.Itoa(d.owner.Runtime.Table)
	for _, fam := range []string{"-4", "-6"} {
		if out := nodeIP(t, env, fam, "rule"); strings.Contains(out, "lookup "+table) {
			t.Errorf("ip %s rule of table %s left in the node namespace:\n%s", fam, table, out)
		}
		if out := nodeIP(t, env, fam, "route", "show", "table", table); strings.TrimSpace(out) != "" {
			t.Errorf("ip %s routes of table %s left in the node namespace:\n%s", fam, table, out)
		}
	}
	if out := nodeNft(t, env); strings.Contains(out, "cleanwall_"+table) {
		t.Errorf("nftables tables cleanwall_%s left in the node namespace:\n%s", table, out)
	}
	if _, err := os.Stat(netns.Path(d.owner.Netns)); !os.IsNotExist(err) {
		t.Errorf("netns file %s left (%v)", netns.Path(d.owner.Netns), err)
	}
	if _, err := os.Stat(filepath.Join(runIPAMDir, d.ipv4)); !os.IsNotExist(err) {
		t.Errorf("host-local reservation of %s left (%v)", d.ipv4, err)
	}
	if held := ipamHolds(t, d.owner.ContainerID); len(held) > 0 {
		t.Errorf("host-local reservations of %s left: %v", d.owner.ContainerID, held)
	}
	if _, err := os.Stat(d.cacheEntry()); !os.IsNotExist(err) {
		t.Errorf("libcni cache entry %s left (%v)", d.cacheEntry(), err)
	}
	if _, err := os.Stat(d.runDir()); !os.IsNotExist(err) {
		t.Errorf("run directory %s left (%v)", d.runDir(), err)
	}
	for _, pins := range []string{d.owner.Runtime.PinRoot, fmt.Sprintf("/sys/fs/bpf/cleanwall-run-%d", d.pid)} {
		if _, err := os.Stat(pins); !os.IsNotExist(err) {
			t.Errorf("pins %s left (%v)", pins, err)
		}
	}
}

// cleanwallGC runs `ip netns exec NODE cleanwall gc`.
func cleanwallGC(t *testing.T, env *harness.Env) runResult {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", filepath.Base(env.Node), filepath.Join(env.Bin, "cleanwall"), "gc")
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

// SIGKILL of `cleanwall run`: the command and the daemonized grandchild it
// forked die with it, and `cleanwall gc` removes everything the run left.
func TestRunKilledTakesItsCommandAlongAndGCRemovesLeftovers(t *testing.T) {
	env := harness.New(t)
	pol := writePolicy(t, env, "run.yaml", policyOpen)
	name := runName("kill")
	dir := env.Dir
	// The grandchild leaves the command's session (setsid) and is
	// reparented; each writes its own (host) pid and a heartbeat.
	beat := func(who string) string {
		return fmt.Sprintf(`read -r p _ < /proc/self/stat; echo $p > %[1]s/%[2]s.tmp && mv %[1]s/%[2]s.tmp %[1]s/%[2]s.pid; `+
			`while :; do echo . >> %[1]s/%[2]s.hb; sleep 0.05; done`, dir, who)
	}
	script := fmt.Sprintf(`( setsid sh -c '%s' </dev/null >/dev/null 2>&1 & ); %s`, beat("grandchild"), beat("child"))
	var pids []int
	t.Cleanup(func() { // on failure, nothing of the command may outlive the test
		for _, p := range pids {
			if !processGone(p) {
				_ = syscall.Kill(p, syscall.SIGKILL)
			}
		}
		_ = netns.Delete("cleanwall-" + name)
	})
	run := startRun(t, env, name, filepath.Join(dir, "child.pid"), "--policy", pol, "--", "sh", "-c", script)
	child := readPid(t, filepath.Join(dir, "child.pid"))
	grandchild := readPid(t, filepath.Join(dir, "grandchild.pid"))
	pids = []int{child, grandchild}
	if processGone(child) || processGone(grandchild) {
		t.Fatalf("the command (%d) and its grandchild (%d) should be running", child, grandchild)
	}
	dead := runFootprint{name: name, ipv4: run.ipv4, pid: run.pid()}
	// Both beat before the kill (a pid file appears just before the first
	// beat): a heartbeat that stops must have started.
	sizes := func() (n [2]int64) {
		for i, f := range []string{"child.hb", "grandchild.hb"} {
			if fi, err := os.Stat(filepath.Join(dir, f)); err == nil {
				n[i] = fi.Size()
			}
		}
		return n
	}
	if !harness.Eventually(5*time.Second, func() bool { n := sizes(); return n[0] > 0 && n[1] > 0 }) {
		t.Fatalf("the command and its grandchild never beat: %v", sizes())
	}

	killed := time.Now()
	run.kill(t)
	for !processGone(child) || !processGone(grandchild) {
		if time.Since(killed) > 10*time.Second {
			t.Fatalf("10s after SIGKILL of cleanwall run: command alive %v, grandchild alive %v", !processGone(child), !processGone(grandchild))
		}
		time.Sleep(time.Millisecond)
	}
	t.Logf("the command and its grandchild were gone %v after SIGKILL of cleanwall run", time.Since(killed).Round(100*time.Microsecond))
	dead.owner = readOwner(t, dead.pid)

	leftoversPresent(t, env, dead, false)
	res := cleanwallGC(t, env)
	if res.code != 0 {
		t.Fatalf("cleanwall gc: exit %d\nstdout: %s\nstderr: %s", res.code, res.stdout, res.stderr)
	}
	if !strings.Contains(res.stdout, name) {
		t.Errorf("cleanwall gc does not say it removed run %s:\n%s", name, res.stdout)
	}
	t.Logf("cleanwall gc:\n%s", res.stdout)
	assertRunGone(t, env, dead)

	// The heartbeats have stopped: for 20 periods neither file grows.
	before := sizes()
	if before[0] == 0 || before[1] == 0 {
		t.Fatalf("no heartbeat was ever written: %v", before)
	}
	if harness.Eventually(time.Second, func() bool { return sizes() != before }) {
		t.Fatalf("a heartbeat went on after SIGKILL: %v then %v", before, sizes())
	}

	// Idempotent: a second gc finds nothing of it.
	res = cleanwallGC(t, env)
	if res.code != 0 || strings.Contains(res.stdout, name) {
		t.Fatalf("second cleanwall gc: exit %d\n%s%s", res.code, res.stdout, res.stderr)
	}
}

// The next `cleanwall run` removes what a killed run left, by itself.
func TestRunCleansUpAfterAKilledRun(t *testing.T) {
	env := harness.New(t)
	srv := env.HTTPServer("198.51.100.10:8080", nil)
	pol := writePolicy(t, env, "run.yaml", policyOpen)
	name := runName("killed")
	ready := filepath.Join(env.Dir, "ready")
	t.Cleanup(func() { _ = netns.Delete("cleanwall-" + name) })
	run := startRun(t, env, name, ready, "--policy", pol, "--", "sh", "-c", "touch "+ready+"; exec sleep 600")
	dead := runFootprint{name: name, ipv4: run.ipv4, pid: run.pid()}
	run.kill(t)
	dead.owner = readOwner(t, dead.pid)
	leftoversPresent(t, env, dead, false)

	next := runName("next")
	res := cleanwallRun(t, env, "--policy", pol, "--name", next, "--", "curl", "-sS", "-m", "3", "http://198.51.100.10:8080/next")
	if res.code != 0 || !strings.Contains(res.stdout, "ok /next") {
		t.Fatalf("the next run: exit %d\nstdout: %s\nstderr: %s", res.code, res.stdout, res.stderr)
	}
	if !strings.Contains(res.stderr, name) {
		t.Errorf("the next run does not say it removed what run %s left:\n%s", name, res.stderr)
	}
	if n := len(srv.Requests()); n != 1 {
		t.Errorf("server got %d requests, want 1", n)
	}
	assertRunGone(t, env, dead)
	runLeftovers(t, env, next)
}

// `cleanwall gc` leaves a live run alone: its namespace, routes, run
// directory and enforcement keep working, and it ends normally.
func TestGCSparesLiveRun(t *testing.T) {
	env := harness.New(t)
	srv := env.HTTPServer("198.51.100.10:8080", nil)
	pol := writePolicy(t, env, "run.yaml", policyOpen)
	name := runName("live")
	ready, goOn := filepath.Join(env.Dir, "ready"), filepath.Join(env.Dir, "go")
	script := fmt.Sprintf(`touch %s; while [ ! -e %s ]; do sleep 0.05; done; curl -sS -m 3 http://198.51.100.10:8080/after-gc`, ready, goOn)
	run := startRun(t, env, name, ready, "--policy", pol, "--", "sh", "-c", script)
	live := runFootprint{name: name, ipv4: run.ipv4, pid: run.pid()}
	live.owner = readOwner(t, live.pid)

	res := cleanwallGC(t, env)
	if res.code != 0 {
		t.Fatalf("cleanwall gc: exit %d\nstdout: %s\nstderr: %s", res.code, res.stdout, res.stderr)
	}
	if strings.Contains(res.stdout, name) || strings.Contains(res.stderr, name) {
		t.Errorf("cleanwall gc touched the live run %s:\n%s%s", name, res.stdout, res.stderr)
	}
	leftoversPresent(t, env, live, true) // everything of the live run is still there

	if err := os.WriteFile(goOn, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	select {
	case <-run.done:
		if run.err != nil {
			t.Fatalf("the live run failed after gc: %v\nstdout: %s\nstderr: %s", run.err, run.stdout(), run.stderr())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the live run did not end")
	}
	if !strings.Contains(run.stdout(), "ok /after-gc") || len(srv.Requests()) != 1 {
		t.Fatalf("the allowed request after gc did not arrive (%d requests): %q", len(srv.Requests()), run.stdout())
	}
	assertRunGone(t, env, live) // and its own teardown removed everything
}
