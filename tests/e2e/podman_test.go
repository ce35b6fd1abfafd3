package e2e

import (
	"bytes"
	"debug/elf"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// podman is a real podman (CNI network backend, runc) whose CNI plugins
// run in the node namespace: the container's host-side veth lands there,
// next to cleanwalld, as on a node. It is entered with nsenter, not
// `ip netns exec`, which would remount /sys and hide the cgroup mounts
// runc needs. Its storage and configuration live in the test's directory.
type podman struct {
	t       *testing.T
	env     *harness.Env
	dir     string
	network string
}

func newPodman(t *testing.T, env *harness.Env, policyFile string) *podman {
	t.Helper()
	for _, tool := range []string{"podman", "runc", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Skip(t, tool+" is not installed (make deps installs podman, runc and util-linux)")
		}
	}
	// podman refuses a runroot path longer than 50 characters: the
	// test's own directory is too deep.
	dir, err := os.MkdirTemp("", "cwpm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	p := &podman{t: t, env: env, dir: dir, network: env.Name + "-pm"}
	netDir := filepath.Join(p.dir, "net.d")
	if err := os.MkdirAll(netDir, 0o755); err != nil {
		t.Fatal(err)
	}
	conflist := map[string]any{
		"cniVersion": "1.0.0",
		"name":       p.network,
		"plugins": []any{
			map[string]any{"type": "ptp", "ipMasq": false, "ipam": map[string]any{
				"type": "host-local", "dataDir": filepath.Join(p.dir, "ipam"),
				"ranges": [][]map[string]string{{{"subnet": env.SandboxNet.String()}}},
				"routes": []map[string]string{{"dst": "0.0.0.0/0"}},
			}},
			map[string]any{"type": "cleanwall-cni", "policy": policyFile, "socket": filepath.Join(env.Dir, "cleanwalld.sock")},
		},
	}
	b, err := json.MarshalIndent(conflist, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(netDir, p.network+".conflist"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	conf := fmt.Sprintf(`[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = %q
[network]
network_backend = "cni"
cni_plugin_dirs = [%q, %q]
network_config_dir = %q
`, filepath.Join(p.dir, "events.log"), env.CNIPaths[0], env.CNIPaths[1], netDir)
	if err := os.WriteFile(filepath.Join(p.dir, "containers.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// run runs podman with args and returns its stdout; stderr goes into the
// error.
func (p *podman) run(args ...string) (string, error) {
	all := append([]string{"--net=" + p.env.Node, "podman",
		"--root", filepath.Join(p.dir, "root"), "--runroot", filepath.Join(p.dir, "runroot"),
		"--tmpdir", filepath.Join(p.dir, "tmp"), "--cni-config-dir", filepath.Join(p.dir, "net.d")}, args...)
	cmd := exec.Command("nsenter", all...)
	cmd.Env = append(os.Environ(), "CONTAINERS_CONF="+filepath.Join(p.dir, "containers.conf"))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("podman %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), err
}

// staticRootfs is a container root filesystem holding only a static
// busybox (Debian's busybox-static): no image registry is needed.
func staticRootfs(t *testing.T, dir string) string {
	t.Helper()
	const busybox = "/bin/busybox"
	f, err := elf.Open(busybox)
	if err != nil {
		testutil.Skip(t, "no "+busybox+" (make deps installs busybox-static): "+err.Error())
	}
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			f.Close()
			t.Fatalf("%s is linked dynamically; install busybox-static", busybox)
		}
	}
	f.Close()
	root := filepath.Join(dir, "rootfs")
	for _, d := range []string{"bin", "etc", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	data, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin", "busybox"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	return root
}

// TestPodmanContainerIsEnforced: a container that podman starts on a
// network chaining cleanwall-cni after ptp reaches an allowed destination
// only through the proxy; a denied one gets nothing, counted; removing the
// container detaches it.
func TestPodmanContainerIsEnforced(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	srv := env.TCPServer("198.51.100.10:8080")
	denied := env.TCPServer("198.51.100.10:8081")
	policyFile := writePolicy(t, env, "podman-policy.yaml", policyOpen)
	pm := newPodman(t, env, policyFile)
	rootfs := staticRootfs(t, pm.dir)
	sniff := env.Sniff()

	name := env.Name + "-ctr"
	// runc refuses podman's default rlimits above this machine's hard
	// limits: ask for small ones.
	out, err := pm.run("run", "-d", "--name", name, "--network", pm.network,
		"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
		"--rootfs", rootfs, "/bin/busybox", "sleep", "120")
	if err != nil {
		t.Fatalf("%v\n%s", err, d.Log())
	}
	id := strings.TrimSpace(out)
	removed := false
	t.Cleanup(func() {
		if !removed {
			_, _ = pm.run("rm", "-f", "-t", "0", name)
		}
	})
	sb := &harness.Sandbox{ContainerID: id}
	got, err := d.Client().Get(harness.Ctx(), id, "")
	if err != nil {
		t.Fatalf("the daemon does not know podman's container %s: %v", id, err)
	}
	if got.PolicyName != "e2e" || got.IfName != "eth0" || len(got.IPs) == 0 {
		t.Fatalf("sandbox as the daemon sees it: %+v", got)
	}
	ip := got.IPs[0].Address.Addr()

	exec := func(script string) (string, error) {
		return pm.run("exec", name, "/bin/busybox", "sh", "-c", script)
	}
	// busybox nc sends its stdin, prints what comes back, and gives up
	// after 3 s of silence.
	out, err = exec("echo hello | /bin/busybox nc -w 3 198.51.100.10 8080")
	if !strings.Contains(out, "ack:6") {
		t.Fatalf("allowed connection from the container: %q %v\n%s", out, err, countersString(t, d, sb))
	}
	if conns := srv.Conns(); len(conns) != 1 || conns[0].From.Addr() != harness.NodeRemoteIP {
		t.Fatalf("server saw %+v, want one connection from the proxy", conns)
	}
	if counter(t, d, sb, "redirect", "rule", "results-api") == 0 {
		t.Fatalf("no redirect counted: %s", countersString(t, d, sb))
	}

	before := counter(t, d, sb, "drop", bpf.ReasonNoRule.String(), "")
	if out, err := exec("/bin/busybox nc -w 2 198.51.100.10 8081 </dev/null"); err == nil {
		t.Fatalf("denied connection from the container succeeded: %q", out)
	}
	if counter(t, d, sb, "drop", bpf.ReasonNoRule.String(), "") == before {
		t.Fatalf("denied connection not counted: %s", countersString(t, d, sb))
	}
	if n := len(denied.Conns()); n != 0 {
		t.Fatalf("denied server accepted %d connections", n)
	}
	if n := sniff.FromSource(ip); n != 0 {
		t.Fatalf("%d packets from the container (%v) reached the remote side", n, ip)
	}

	if _, err := pm.run("rm", "-f", "-t", "0", name); err != nil {
		t.Fatal(err)
	}
	removed = true
	deadline := time.Now().Add(5 * time.Second)
	for {
		list, err := d.Client().List(harness.Ctx())
		if err != nil {
			t.Fatal(err)
		}
		if len(list) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the daemon still has %d sandboxes after podman rm", len(list))
		}
		time.Sleep(50 * time.Millisecond)
	}
	nothingLeft(t, d)
}
