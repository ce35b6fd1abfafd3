package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/cni"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// The images the CRI tests import (no registry is reachable).
const (
	criPauseImage   = "localhost/cleanwall-test/pause:1"
	criBusyboxImage = "localhost/cleanwall-test/busybox:1"
)

// criConflist is the README's containerd conflist
// (examples/cni/containerd.conflist: ptp, then cleanwall-cni declaring the
// pod-annotations capability) with this test's subnet, daemon socket and
// default policy file.
func criConflist(t *testing.T, env *harness.Env, d *harness.Daemon, ipamDir, defaultPolicy string) []byte {
	t.Helper()
	data, err := os.ReadFile("../../examples/cni/containerd.conflist")
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		CNIVersion string           `json:"cniVersion"`
		Name       string           `json:"name"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(data, &list); err != nil {
		t.Fatalf("examples/cni/containerd.conflist: %v", err)
	}
	if len(list.Plugins) != 2 || list.Plugins[0]["type"] != "ptp" || list.Plugins[1]["type"] != "cleanwall-cni" {
		t.Fatalf("examples/cni/containerd.conflist: want ptp then cleanwall-cni, got %v", list.Plugins)
	}
	caps, _ := list.Plugins[1]["capabilities"].(map[string]any)
	if caps[cni.PodAnnotationsCapability] != true {
		t.Fatalf("examples/cni/containerd.conflist: cleanwall-cni does not declare %s", cni.PodAnnotationsCapability)
	}
	ipam, _ := list.Plugins[0]["ipam"].(map[string]any)
	if ipam == nil {
		t.Fatal("examples/cni/containerd.conflist: ptp has no ipam")
	}
	ipam["dataDir"] = ipamDir
	ipam["ranges"] = [][]map[string]string{{{"subnet": env.SandboxNet.String()}}}
	list.Plugins[1]["socket"] = d.Socket
	list.Plugins[1]["policy"] = defaultPolicy
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// criPod is a pod run through the CRI with crictl.
type criPod struct {
	cd   *harness.Containerd
	Name string
	ID   string
}

// runPod runs `crictl runp` for a pod named name with the annotations.
func runPod(t *testing.T, cd *harness.Containerd, name string, annotations map[string]string) (*criPod, error) {
	t.Helper()
	dir := filepath.Join(cd.Dir, "pods", name)
	if err := os.MkdirAll(filepath.Join(dir, "logs"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "cleanroom", "uid": name + "-uid", "attempt": 0},
		"hostname":      name,
		"log_directory": filepath.Join(dir, "logs"),
		"annotations":   annotations,
		"linux":         map[string]any{"cgroup_parent": cd.CgroupParent},
	}
	path := writeJSON(t, filepath.Join(dir, "pod.json"), cfg)
	out, err := cd.Crictl("runp", path)
	if err != nil {
		return nil, err
	}
	p := &criPod{cd: cd, Name: name, ID: strings.TrimSpace(out)}
	t.Cleanup(func() { _, _ = cd.Crictl("rmp", "--force", p.ID) })
	return p, nil
}

func writeJSON(t *testing.T, path string, v any) string {
	t.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// startContainer creates and starts a busybox container in the pod running
// script, with hostDir mounted at /probe; it returns the container's id.
func (p *criPod) startContainer(t *testing.T, name, script, hostDir string) string {
	t.Helper()
	dir := filepath.Join(p.cd.Dir, "pods", p.Name)
	ctr := writeJSON(t, filepath.Join(dir, name+"-container.json"), map[string]any{
		"metadata": map[string]any{"name": name},
		"image":    map[string]any{"image": criBusyboxImage},
		"command":  []string{"/bin/sh", "-c", script},
		"log_path": name + ".log",
		"mounts":   []map[string]any{{"host_path": hostDir, "container_path": "/probe"}},
		"linux":    map[string]any{},
	})
	// crictl create reads the pod's config again.
	out, err := p.cd.Crictl("create", p.ID, ctr, filepath.Join(dir, "pod.json"))
	if err != nil {
		t.Fatal(err)
	}
	id := strings.TrimSpace(out)
	if _, err := p.cd.Crictl("start", id); err != nil {
		t.Fatal(err)
	}
	return id
}

// state returns the pod's CRI state (SANDBOX_READY, SANDBOX_NOTREADY).
func (p *criPod) state(t *testing.T) string {
	t.Helper()
	out, err := p.cd.Crictl("inspectp", "-o", "json", p.ID)
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Status struct {
			State string `json:"state"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("crictl inspectp: %v", err)
	}
	return st.Status.State
}

// containerState returns a container's CRI state (CONTAINER_RUNNING, ...).
func containerState(t *testing.T, cd *harness.Containerd, id string) string {
	t.Helper()
	out, err := cd.Crictl("inspect", "-o", "json", id)
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Status struct {
			State string `json:"state"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("crictl inspect: %v", err)
	}
	return st.Status.State
}

// probeScript loops forever in the pod: each round fetches the allowed
// HTTP server (busybox nc: the wget of Debian's busybox-static crashes) and tries the denied port, and appends "round allowed denied"
// to /probe/log (a host directory: the probe does not depend on containerd
// to carry its output while containerd is down).
const probeScript = `i=0
while :; do
  i=$((i+1))
  if printf 'GET /probe/%s HTTP/1.0\r\nHost: results\r\n\r\n' $i | nc -w 2 198.51.100.10 8080 2>>/probe/errors | grep -q "ok /probe/$i"; then a=ok; else a=fail; fi
  if nc -w 1 198.51.100.10 8081 </dev/null >/dev/null 2>&1; then d=open; else d=closed; fi
  echo "$i $a $d" >> /probe/log
  sleep 0.2
done`

type probeRound struct {
	n               int
	allowed, denied string
}

// probeRounds reads the rounds the probe logged so far.
func probeRounds(t *testing.T, path string) []probeRound {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var rounds []probeRound
	for _, line := range strings.Split(string(data), "\n") {
		var r probeRound
		if _, err := fmt.Sscan(line, &r.n, &r.allowed, &r.denied); err == nil {
			rounds = append(rounds, r)
		}
	}
	return rounds
}

// waitRounds waits until the probe has logged n rounds after the first
// `after`, and returns those.
func waitRounds(t *testing.T, path string, after, n int, what string) []probeRound {
	t.Helper()
	deadline := time.Now().Add(time.Duration(n)*5*time.Second + 10*time.Second)
	for {
		rounds := probeRounds(t, path)
		if len(rounds) >= after+n {
			return rounds[after:]
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the probe logged %d rounds, want %d more than %d", what, len(rounds), n, after)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// noHostVeths fails when a pod's host-side veth is left in the node
// namespace (ptp names them veth...).
func noHostVeths(t *testing.T, env *harness.Env) {
	t.Helper()
	out, err := exec.Command("ip", "-n", filepath.Base(env.Node), "-o", "link").CombinedOutput()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), "veth") {
		t.Fatalf("host veths left in the node namespace:\n%s", out)
	}
}

// TestContainerdCRIPodsAreEnforced: containerd (Debian's 1.6, its CRI
// plugin, runc) driven by crictl, with a conflist chaining cleanwall-cni
// after ptp. A pod picks its policy with the annotation cleanwall.dev/policy
// (an unknown name keeps the pod from starting; no annotation, or a conf
// that does not declare the pod-annotations capability, falls back to the
// conf's file); its container reaches the allowed HTTP server only
// through the proxy, and a denied port never, counted. Enforcement holds
// while containerd and while cleanwalld are killed and restarted with the
// pod running; stopping and removing the pod detaches it.
func TestContainerdCRIPodsAreEnforced(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	if err := os.WriteFile(filepath.Join(d.PolicyDir, "pod-open.yaml"), []byte(policyPorts("pod-open", 8080)), 0o644); err != nil {
		t.Fatal(err)
	}
	// The conf's fallback allows another destination only.
	defaultPolicy := writePolicy(t, env, "cri-default.yaml", strings.ReplaceAll(policyPorts("cri-default", 8080), "198.51.100.10/32", "198.51.100.11/32"))
	allowed := env.HTTPServer("198.51.100.10:8080", nil)
	denied := env.TCPServer("198.51.100.10:8081")

	start := time.Now()
	cd := env.StartContainerd(harness.ContainerdOptions{
		Conflist:     criConflist(t, env, d, filepath.Join(env.Dir, "ipam"), defaultPolicy),
		SandboxImage: criPauseImage,
	})
	cd.ImportImage(harness.PauseImage(t, criPauseImage))
	cd.ImportImage(harness.BusyboxImage(t, criBusyboxImage))
	t.Logf("containerd ready and images imported in %v", time.Since(start).Round(time.Millisecond))
	sniff := env.Sniff()

	// An unknown policy: the pod does not start, nothing stays attached.
	if p, err := runPod(t, cd, "unknown", map[string]string{cni.PolicyAnnotation: "no-such-policy"}); err == nil {
		t.Fatalf("pod %s with an unknown policy started", p.ID)
	} else if !strings.Contains(err.Error(), "unknown policy") || !strings.Contains(err.Error(), "no-such-policy") {
		t.Fatalf("runp with an unknown policy: the error does not name it: %v", err)
	}
	nothingLeft(t, d)
	noHostVeths(t, env)

	// No annotation: the conf's policy file.
	fallback, err := runPod(t, cd, "fallback", nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := d.Client().Get(harness.Ctx(), fallback.ID, "")
	if err != nil {
		t.Fatalf("the daemon does not know the pod %s: %v", fallback.ID, err)
	}
	if got.PolicyName != "cri-default" {
		t.Fatalf("pod without the annotation has policy %q, want the conf's cri-default", got.PolicyName)
	}
	for _, cmd := range []string{"stopp", "rmp"} {
		if _, err := cd.Crictl(cmd, fallback.ID); err != nil {
			t.Fatal(err)
		}
	}
	nothingLeft(t, d)
	noHostVeths(t, env)

	// Without the capability in the conf containerd does not pass the
	// annotations: the pod gets the conf's file, whatever it asks for.
	withCapability := criConflist(t, env, d, filepath.Join(env.Dir, "ipam"), defaultPolicy)
	var list map[string]any
	if err := json.Unmarshal(withCapability, &list); err != nil {
		t.Fatal(err)
	}
	delete(list["plugins"].([]any)[1].(map[string]any), "capabilities")
	withoutCapability, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	cd.SetConflist(withoutCapability)
	asks, err := runPod(t, cd, "asks", map[string]string{cni.PolicyAnnotation: "pod-open"})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := d.Client().Get(harness.Ctx(), asks.ID, ""); err != nil || got.PolicyName != "cri-default" {
		t.Fatalf("annotated pod on a conf without the capability: %+v %v, want the conf's cri-default", got, err)
	}
	if _, err := cd.Crictl("rmp", "--force", asks.ID); err != nil {
		t.Fatal(err)
	}
	nothingLeft(t, d)
	cd.SetConflist(withCapability)

	// The annotated pod and its probe.
	pod, err := runPod(t, cd, "analytics", map[string]string{cni.PolicyAnnotation: "pod-open", "team": "research"})
	if err != nil {
		t.Fatalf("%v\n%s", err, d.Log())
	}
	sb := &harness.Sandbox{ContainerID: pod.ID}
	got, err = d.Client().Get(harness.Ctx(), pod.ID, "")
	if err != nil {
		t.Fatalf("the daemon does not know the pod %s: %v", pod.ID, err)
	}
	if got.PolicyName != "pod-open" || got.IfName != "eth0" || len(got.IPs) == 0 {
		t.Fatalf("pod as the daemon sees it: %+v", got)
	}
	podIP := got.IPs[0].Address.Addr()
	probeDir := filepath.Join(cd.Dir, "probe")
	if err := os.MkdirAll(probeDir, 0o755); err != nil {
		t.Fatal(err)
	}
	probeLog := filepath.Join(probeDir, "log")
	ctrID := pod.startContainer(t, "probe", probeScript, probeDir)

	// checkRounds fails on a round in which the denied port answered, or
	// (when allowedToo) the allowed server did not; and on any packet of
	// the pod's own address on the remote side.
	checkRounds := func(what string, rounds []probeRound, allowedToo bool) {
		t.Helper()
		for _, r := range rounds {
			if r.denied != "closed" || (allowedToo && r.allowed != "ok") {
				errs, _ := os.ReadFile(filepath.Join(probeDir, "errors"))
				t.Fatalf("%s: probe round %d: allowed %s, denied %s\ncounters: %s\nthe probe's errors:\n%s", what, r.n, r.allowed, r.denied, countersString(t, d, sb), errs)
			}
		}
		if n := len(denied.Conns()); n != 0 {
			t.Fatalf("%s: the denied server accepted %d connections", what, n)
		}
		if n := sniff.FromSource(podIP); n != 0 {
			t.Fatalf("%s: %d packets from the pod (%v) reached the remote side", what, n, podIP)
		}
	}
	deniedDrops := func() uint64 { return counter(t, d, sb, "drop", bpf.ReasonNoRule.String(), "") }

	// Steady state.
	rounds := waitRounds(t, probeLog, 0, 3, "steady")
	checkRounds("steady", rounds, true)
	reqs := allowed.Requests()
	if len(reqs) < 3 {
		t.Fatalf("the allowed server saw %d requests, want 3 or more", len(reqs))
	}
	for _, r := range reqs {
		if !strings.HasPrefix(r.From, harness.NodeRemoteIP.String()+":") {
			t.Fatalf("the allowed server saw a request from %s, not from the proxy", r.From)
		}
	}
	if counter(t, d, sb, "redirect", "rule", "port-8080") == 0 {
		t.Fatalf("no redirect counted: %s", countersString(t, d, sb))
	}
	drops := deniedDrops()
	if drops == 0 {
		t.Fatalf("denied connections not counted: %s", countersString(t, d, sb))
	}

	// containerd killed: the pod keeps running under its shim and stays
	// enforced; restarted, containerd manages it again.
	seen := len(probeRounds(t, probeLog))
	cd.Kill()
	checkRounds("containerd down", waitRounds(t, probeLog, seen, 2, "containerd down"), true)
	restart := time.Now()
	cd.Start()
	t.Logf("containerd restarted in %v", time.Since(restart).Round(time.Millisecond))
	if st := pod.state(t); st != "SANDBOX_READY" {
		t.Fatalf("after the containerd restart the pod is %s", st)
	}
	if st := containerState(t, cd, ctrID); st != "CONTAINER_RUNNING" {
		t.Fatalf("after the containerd restart the container is %s", st)
	}
	if out, err := cd.Crictl("exec", ctrID, "/bin/busybox", "echo", "managed"); err != nil || strings.TrimSpace(out) != "managed" {
		t.Fatalf("crictl exec after the containerd restart: %q %v", out, err)
	}
	seen2 := len(probeRounds(t, probeLog))
	checkRounds("after containerd restart", append(probeRounds(t, probeLog)[seen:seen2], waitRounds(t, probeLog, seen2, 2, "after containerd restart")...), true)
	if again, err := d.Client().Get(harness.Ctx(), pod.ID, ""); err != nil || !again.Created.Equal(got.Created) {
		t.Fatalf("after the containerd restart the daemon's sandbox changed: %+v %v", again, err)
	}
	if n := deniedDrops(); n <= drops {
		t.Fatalf("denied connections during the containerd restart not counted (%d, was %d)", n, drops)
	} else {
		drops = n
	}

	// cleanwalld killed: the pinned datapath keeps dropping (the allowed
	// destination is unreachable without its proxy); restarted, it
	// adopts the pod again and the allowed destination comes back.
	seen = len(probeRounds(t, probeLog))
	d.Kill()
	down := waitRounds(t, probeLog, seen, 2, "cleanwalld down")
	checkRounds("cleanwalld down", down, false)
	t.Logf("probe rounds while cleanwalld was down (round allowed denied): %v", down)
	d.Start()
	deadline := time.Now().Add(20 * time.Second)
	for {
		rounds := probeRounds(t, probeLog)
		last := rounds[len(rounds)-1]
		if last.n > down[len(down)-1].n && last.allowed == "ok" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the allowed destination did not come back after the cleanwalld restart: %+v\n%s", last, d.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
	seen = len(probeRounds(t, probeLog))
	checkRounds("after cleanwalld restart", waitRounds(t, probeLog, seen, 2, "after cleanwalld restart"), true)
	if again, err := d.Client().Get(harness.Ctx(), pod.ID, ""); err != nil || again.PolicyName != "pod-open" {
		t.Fatalf("after the cleanwalld restart the daemon has the pod as %+v, %v", again, err)
	}
	if n := deniedDrops(); n <= drops {
		t.Fatalf("denied connections around the cleanwalld restart not counted (%d, was %d)", n, drops)
	}

	// Stopping the pod detaches it; removing it leaves nothing.
	if _, err := cd.Crictl("stopp", pod.ID); err != nil {
		t.Fatal(err)
	}
	if list, err := d.Client().List(harness.Ctx()); err != nil || len(list) != 0 {
		t.Fatalf("after crictl stopp the daemon still lists %+v (%v)", list, err)
	}
	if _, err := cd.Crictl("rmp", pod.ID); err != nil {
		t.Fatal(err)
	}
	nothingLeft(t, d)
	noHostVeths(t, env)
	t.Logf("whole test: %v", time.Since(start).Round(time.Millisecond))
}

// make deps builds the crictl the suite expects.
func TestCrictlVersionMatchesMakefile(t *testing.T) {
	data, err := os.ReadFile("../../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	want := "CRICTL_VERSION := " + harness.CrictlVersion + "\n"
	if !strings.Contains(string(data), want) {
		t.Fatalf("the Makefile does not pin crictl %s (want the line %q)", harness.CrictlVersion, strings.TrimSpace(want))
	}
}
