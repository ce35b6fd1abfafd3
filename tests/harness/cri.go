package harness

import (
	"bufio"
	"bytes"
	"debug/buildinfo"
	"debug/elf"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/internal/testutil"
)

// CrictlVersion is the cri-tools release the CRI tests drive containerd
// with (`make deps` builds it into bin/tools).
const CrictlVersion = "v1.37.0"

// CrictlModule is what `go install` builds crictl from.
const CrictlModule = "sigs.k8s.io/cri-tools/cmd/crictl@" + CrictlVersion

var (
	crictlOnce sync.Once
	crictlPath string
	crictlErr  error
)

// Crictl returns the path of crictl CrictlVersion: bin/tools/crictl of
// the module when it is that version, else built there now through the
// module proxy (go install, about a minute on a fresh machine).
func Crictl(t testing.TB) string {
	t.Helper()
	crictlOnce.Do(func() {
		root, err := moduleRoot()
		if err != nil {
			crictlErr = err
			return
		}
		dir := filepath.Join(root, "bin", "tools")
		p := filepath.Join(dir, "crictl")
		// go install leaves crictl's own version string empty: read the
		// module version from the build information instead.
		if bi, err := buildinfo.ReadFile(p); err == nil && bi.Main.Path == "sigs.k8s.io/cri-tools" && bi.Main.Version == CrictlVersion {
			crictlPath = p
			return
		}
		cmd := exec.Command("go", "install", CrictlModule)
		cmd.Dir = os.TempDir() // outside this module: go install pkg@version ignores it anyway
		cmd.Env = append(os.Environ(), "GOBIN="+dir, "GOFLAGS=")
		if out, err := cmd.CombinedOutput(); err != nil {
			crictlErr = fmt.Errorf("go install %s: %v\n%s", CrictlModule, err, out)
			return
		}
		crictlPath = p
	})
	if crictlErr != nil {
		t.Fatal(crictlErr)
	}
	return crictlPath
}

// Containerd is a containerd process with the CRI plugin running in the
// node namespace, as on a node: its config, root, state, socket and CNI
// configuration live in a directory of its own; the machine's containerd
// (if any) is never touched (runc's state too; only the shims' sockets go
// where containerd 1.6 always puts them, /run/containerd/s, named by a hash
// that includes this containerd's socket). Its shims keep the pods running
// when it is killed, and it finds them again when it starts.
type Containerd struct {
	env *Env
	// Dir holds everything: config.toml, root, state, the socket.
	Dir    string
	Socket string
	// CNIConfDir and CNIBinDir are the CRI plugin's CNI directories: the
	// bin dir holds the reference plugins and cleanwall-cni.
	CNIConfDir, CNIBinDir string
	// CgroupParent is the cgroup the test's pods go under (their pod
	// config's linux.cgroup_parent); cleanup removes it.
	CgroupParent string
	crictl       string
	snapshotter  string
	log          *os.File
	cmd          *exec.Cmd
	done         chan struct{}
}

// ContainerdOptions configure StartContainerd.
type ContainerdOptions struct {
	// Conflist is written to the CNI conf dir before containerd starts.
	Conflist []byte
	// SandboxImage is the CRI's pause image (imported with ImportImage
	// before the first pod).
	SandboxImage string
	// Snapshotter defaults to overlayfs (native where the directory is on
	// an overlay).
	Snapshotter string
}

// snapshotter is the snapshotter the CRI plugin unpacks images into:
// overlayfs, unless dir is itself on an overlay (a container's root on
// many CI machines), where overlayfs cannot stack: native copies instead.
func (o ContainerdOptions) snapshotter(dir string) string {
	if o.Snapshotter != "" {
		return o.Snapshotter
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err == nil && st.Type == unix.OVERLAYFS_SUPER_MAGIC {
		return "native"
	}
	return "overlayfs"
}

// RequireContainerd skips (fails under CI) when containerd, its runc shim,
// ctr or runc are missing.
func RequireContainerd(t testing.TB) {
	t.Helper()
	for _, tool := range []string{"containerd", "containerd-shim-runc-v2", "ctr", "runc"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Skip(t, tool+" is not installed (make deps installs containerd and runc)")
		}
	}
}

// StartContainerd writes containerd's configuration and starts it in the
// node namespace; it returns once the CRI reports the runtime and the
// network ready. Cleanup removes every pod, stops containerd and removes
// its directory.
func (e *Env) StartContainerd(o ContainerdOptions) *Containerd {
	e.T.Helper()
	RequireContainerd(e.T)
	crictl := Crictl(e.T)
	// Shorter than the test's directory: unix socket paths are bounded.
	dir, err := os.MkdirTemp("", "cwcd-")
	if err != nil {
		e.T.Fatal(err)
	}
	c := &Containerd{
		env: e, Dir: dir, Socket: filepath.Join(dir, "containerd.sock"),
		CNIConfDir: filepath.Join(dir, "net.d"), CNIBinDir: filepath.Join(dir, "cni-bin"), crictl: crictl,
		snapshotter: o.snapshotter(dir), CgroupParent: "/" + e.Name,
	}
	e.onCleanup(c.cleanup)
	for _, d := range []string{c.CNIConfDir, c.CNIBinDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			e.T.Fatal(err)
		}
	}
	// containerd 1.6 takes one CNI bin dir: the reference plugins and
	// cleanwall-cni side by side, as an operator installs them.
	for _, d := range e.CNIPaths {
		entries, err := os.ReadDir(d)
		if err != nil {
			e.T.Fatal(err)
		}
		for _, ent := range entries {
			dst := filepath.Join(c.CNIBinDir, ent.Name())
			if _, err := os.Lstat(dst); err == nil {
				continue
			}
			if err := os.Symlink(filepath.Join(d, ent.Name()), dst); err != nil {
				e.T.Fatal(err)
			}
		}
	}
	if o.Conflist != nil {
		if err := os.WriteFile(filepath.Join(c.CNIConfDir, conflistName), o.Conflist, 0o644); err != nil {
			e.T.Fatal(err)
		}
	}
	runc, err := exec.LookPath("runc")
	if err != nil {
		e.T.Fatal(err)
	}
	config := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[6]q
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = %[11]t
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = %[7]q
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = %[8]q
        SystemdCgroup = false
        Root = %[12]q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[9]q
    conf_dir = %[10]q
    max_conf_num = 1
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), c.Socket, c.Socket+".ttrpc", filepath.Join(dir, "opt"),
		o.SandboxImage, c.snapshotter, runc, c.CNIBinDir, c.CNIConfDir, !hasCapSysResource(), filepath.Join(dir, "runc"))
	if err := os.WriteFile(c.ConfigPath(), []byte(config), 0o644); err != nil {
		e.T.Fatal(err)
	}
	crictlConf := fmt.Sprintf("runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 60\n", c.Socket, c.Socket)
	if err := os.WriteFile(filepath.Join(dir, "crictl.yaml"), []byte(crictlConf), 0o644); err != nil {
		e.T.Fatal(err)
	}
	if c.log, err = os.OpenFile(filepath.Join(dir, "containerd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err != nil {
		e.T.Fatal(err)
	}
	c.Start()
	return c
}

// hasCapSysResource reports whether this process has CAP_SYS_RESOURCE,
// which lowering an oom_score_adj below the parent's needs. The CRI gives
// the sandbox container -998; without the capability (some CI machines
// drop it) runc fails to create the pod, and the CRI's
// restrict_oom_score_adj (meant for rootless containerd) clamps the value
// to containerd's own instead.
func hasCapSysResource() bool {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			var caps uint64
			if _, err := fmt.Sscanf(strings.TrimSpace(v), "%x", &caps); err != nil {
				return false
			}
			return caps&(1<<unix.CAP_SYS_RESOURCE) != 0
		}
	}
	return false
}

// conflistName is the conflist's file in the CNI conf dir.
const conflistName = "10-cleanwall.conflist"

// SetConflist replaces the conflist (renamed into place) and waits until
// the CRI has loaded it (containerd watches its conf dir).
func (c *Containerd) SetConflist(conflist []byte) {
	t := c.env.T
	t.Helper()
	tmp := filepath.Join(c.CNIConfDir, ".next")
	if err := os.WriteFile(tmp, conflist, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(c.CNIConfDir, conflistName)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		out, err := c.Crictl("info")
		if err == nil {
			var info struct {
				CNIConfig struct {
					Networks []struct {
						Config struct {
							Source string
						}
					}
				} `json:"cniconfig"`
			}
			if json.Unmarshal([]byte(out), &info) == nil {
				for _, n := range info.CNIConfig.Networks {
					if n.Config.Source == string(conflist) {
						return
					}
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not load the new conflist in 15s (%v)", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ConfigPath is containerd's config.toml.
func (c *Containerd) ConfigPath() string { return filepath.Join(c.Dir, "config.toml") }

// Start starts containerd in the node namespace (again, after Kill) and
// waits until the CRI reports the runtime and the network ready.
func (c *Containerd) Start() {
	t := c.env.T
	t.Helper()
	cmd := exec.Command("containerd", "--config", c.ConfigPath(), "--log-level", "info")
	cmd.Stdout, cmd.Stderr = c.log, c.log
	// containerd and the shims it starts share the host's mount namespace
	// (as the test does); only the network namespace is the node's.
	if err := netns.Do(c.env.Node, cmd.Start); err != nil {
		t.Fatalf("starting containerd: %v", err)
	}
	c.cmd, c.done = cmd, make(chan struct{})
	go func() { _ = cmd.Wait(); close(c.done) }()
	deadline := time.Now().Add(30 * time.Second)
	var last string
	for {
		ready, why := c.ready()
		if ready {
			return
		}
		last = why
		select {
		case <-c.done:
			t.Fatalf("containerd exited during its start:\n%s", c.Log())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd's CRI not ready after 30s (%s):\n%s", last, c.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ready asks the CRI for its status conditions.
func (c *Containerd) ready() (bool, string) {
	out, err := c.Crictl("info")
	if err != nil {
		return false, err.Error()
	}
	var info struct {
		Status struct {
			Conditions []struct {
				Type    string `json:"type"`
				Status  bool   `json:"status"`
				Message string `json:"message"`
			} `json:"conditions"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		return false, fmt.Sprintf("crictl info: %v", err)
	}
	want := map[string]bool{"RuntimeReady": false, "NetworkReady": false}
	var why []string
	for _, cond := range info.Status.Conditions {
		if _, ok := want[cond.Type]; ok {
			want[cond.Type] = cond.Status
			if !cond.Status {
				why = append(why, cond.Type+": "+cond.Message)
			}
		}
	}
	return want["RuntimeReady"] && want["NetworkReady"], strings.Join(why, "; ")
}

// Kill sends containerd SIGKILL and waits until it is gone; the shims and
// the pods keep running.
func (c *Containerd) Kill() {
	if c.cmd == nil || c.Exited() {
		return
	}
	_ = c.cmd.Process.Signal(syscall.SIGKILL)
	<-c.done
}

// Exited reports whether the containerd process has exited.
func (c *Containerd) Exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// Pid is the containerd process's pid.
func (c *Containerd) Pid() int { return c.cmd.Process.Pid }

// Log returns what containerd logged (every start).
func (c *Containerd) Log() string {
	b, _ := os.ReadFile(filepath.Join(c.Dir, "containerd.log"))
	return string(b)
}

// Crictl runs crictl against this containerd, from the node namespace
// (exec and logs reach the CRI's streaming server on the node's
// loopback), and returns its stdout; stderr goes into the error.
func (c *Containerd) Crictl(args ...string) (string, error) {
	cmd := exec.Command(c.crictl, append([]string{"--config", filepath.Join(c.Dir, "crictl.yaml")}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := netns.Do(c.env.Node, cmd.Run)
	if err != nil {
		err = fmt.Errorf("crictl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), err
}

// Ctr runs ctr in the CRI's namespace (k8s.io) against this containerd.
func (c *Containerd) Ctr(args ...string) (string, error) {
	cmd := exec.Command("ctr", append([]string{"--address", c.Socket, "--namespace", "k8s.io"}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), err
}

// ImportImage writes img as an OCI archive and imports it with
// `ctr images import`, unpacked for the CRI's snapshotter.
func (c *Containerd) ImportImage(img OCIImage) {
	t := c.env.T
	t.Helper()
	f, err := os.CreateTemp(c.Dir, "image-*.tar")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(f.Name())
	w := bufio.NewWriter(f)
	if err := img.WriteArchive(w); err != nil {
		t.Fatalf("writing image %s: %v", img.Ref, err)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctr("images", "import", "--snapshotter", c.snapshotter, f.Name()); err != nil {
		t.Fatalf("importing %s: %v", img.Ref, err)
	}
	if _, err := c.Crictl("inspecti", img.Ref); err != nil {
		t.Fatalf("the CRI does not see the imported image %s: %v", img.Ref, err)
	}
}

// cleanup removes every pod (their CNI DEL runs), stops containerd, ends
// the shims this containerd started, unmounts what is left under its
// directory and removes it.
func (c *Containerd) cleanup() {
	if c.cmd != nil && !c.Exited() {
		_, _ = c.Crictl("rmp", "--force", "--all")
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.done:
		case <-time.After(10 * time.Second):
			c.Kill()
		}
	}
	for _, pid := range c.shims() {
		_ = unix.Kill(pid, unix.SIGKILL)
	}
	c.unmountAll()
	c.removeCgroups()
	if t, ok := c.env.T.(*testing.T); ok && t.Failed() {
		t.Logf("containerd log:\n%s", c.Log())
	}
	if c.log != nil {
		c.log.Close()
	}
	_ = os.RemoveAll(c.Dir)
}

// shims returns the pids of the runc shims of this containerd (their
// command line names its socket).
func (c *Containerd) shims() []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(cmdline), "\x00")
		if len(args) == 0 || filepath.Base(args[0]) != "containerd-shim-runc-v2" {
			continue
		}
		for i, a := range args {
			if a == "-address" && i+1 < len(args) && args[i+1] == c.Socket {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

// removeCgroups removes the (empty, once the pods are gone) cgroup parent
// in every hierarchy, cgroup v1 or v2.
func (c *Containerd) removeCgroups() {
	dirs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", c.CgroupParent))
	dirs = append(dirs, filepath.Join("/sys/fs/cgroup", c.CgroupParent))
	for _, d := range dirs {
		_ = os.Remove(d)
	}
}

// unmountAll lazily unmounts every mount under the directory, deepest first.
func (c *Containerd) unmountAll() {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var mounts []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], c.Dir+"/") {
			mounts = append(mounts, f[4])
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(mounts)))
	for _, m := range mounts {
		_ = unix.Unmount(m, unix.MNT_DETACH)
	}
}

// StaticBusybox returns Debian's busybox-static; it skips (fails under CI)
// when it is missing and fails when /bin/busybox is linked dynamically.
func StaticBusybox(t testing.TB) []byte {
	t.Helper()
	const busybox = "/bin/busybox"
	f, err := elf.Open(busybox)
	if err != nil {
		testutil.Skip(t, "no "+busybox+" (make deps installs busybox-static): "+err.Error())
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			t.Fatalf("%s is linked dynamically; install busybox-static", busybox)
		}
	}
	data, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// BusyboxImage is an image holding only a static busybox at /bin/busybox
// and links to it for the applets the tests use.
func BusyboxImage(t testing.TB, ref string) OCIImage {
	t.Helper()
	img := OCIImage{Ref: ref, Cmd: []string{"/bin/sh"}, Files: []ImageFile{
		{Path: "bin/busybox", Mode: 0o755, Data: StaticBusybox(t)},
		{Path: "tmp", Mode: 0o1777, Dir: true},
		{Path: "etc", Mode: 0o755, Dir: true},
	}}
	for _, applet := range []string{"sh", "nc", "sleep", "cat", "echo", "ls", "grep", "printf"} {
		img.Files = append(img.Files, ImageFile{Path: "bin/" + applet, Mode: 0o777, Link: "busybox"})
	}
	return img
}

var (
	pauseOnce sync.Once
	pauseBin  []byte
	pauseErr  error
)

// PauseImage is a sandbox ("pause") image: tests/harness/pause built
// statically, as /pause.
func PauseImage(t testing.TB, ref string) OCIImage {
	t.Helper()
	pauseOnce.Do(func() {
		root, err := moduleRoot()
		if err != nil {
			pauseErr = err
			return
		}
		dir, err := os.MkdirTemp("", "cleanwall-pause-")
		if err != nil {
			pauseErr = err
			return
		}
		defer os.RemoveAll(dir)
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(dir, "pause"), "./tests/harness/pause")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			pauseErr = fmt.Errorf("building the pause program: %v\n%s", err, out)
			return
		}
		pauseBin, pauseErr = os.ReadFile(filepath.Join(dir, "pause"))
	})
	if pauseErr != nil {
		t.Fatal(pauseErr)
	}
	return OCIImage{Ref: ref, Entrypoint: []string{"/pause"}, Files: []ImageFile{{Path: "pause", Mode: 0o755, Data: pauseBin}}}
}
