package adversarial

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/tests/harness"
)

// TestFailClosedAfterSIGKILL (review finding 1): SIGKILL of the daemon
// started each supported way leaves the sandbox enforced. Under `ip netns
// exec` (a private mount namespace without /sys/fs/bpf) the daemon used to
// mount a bpffs of its own there: SIGKILL dropped the mount, the links
// were released, tcx detached, and the sandbox reached the remote on every
// port (TCP, UDP, spoofed sources, SO_MARK tricks, the metadata address).
func TestFailClosedAfterSIGKILL(t *testing.T) {
	for _, launch := range []harness.Launch{harness.LaunchEnterNetns, harness.LaunchIPNetnsExec, harness.LaunchOwnMountNS} {
		t.Run(launch.String(), func(t *testing.T) {
			env := harness.New(t)
			o := harness.DaemonOptions{Launch: launch}
			if launch != harness.LaunchEnterNetns {
				o.PinRoot = "/sys/fs/bpf/" + env.Name
			}
			d := env.StartDaemonWith(o)
			targets := env.NewEscapeTargets()
			sb := env.MustAddSandbox("crash", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
			d.RoundTrip(t, sb)
			info, err := d.Client().Get(harness.Ctx(), sb.ContainerID, "")
			if err != nil {
				t.Fatal(err)
			}
			before := len(targets.Allowed.Conns())

			d.Kill()
			if _, err := os.Stat(filepath.Join(d.PinRoot, "links")); err != nil {
				// Show what that means before failing: the sandbox is open.
				t.Errorf("the link pins did not outlive the daemon: %v", err)
				targets.Attempt(t, sb)
				targets.AssertNothingEscaped(t, sb, before)
				t.FailNow()
			}
			drops := d.PinnedDrops(t, info.DatapathID)
			targets.Attempt(t, sb)
			targets.AssertNothingEscaped(t, sb, before)
			if after := d.PinnedDrops(t, info.DatapathID); after <= drops {
				t.Errorf("the attempts were not counted as drops (%d before, %d after)", drops, after)
			}

			if err := d.TryStart(); err != nil {
				t.Fatal(err)
			}
			if err := sb.Check(); err != nil {
				t.Fatalf("CHECK after restart: %v", err)
			}
			d.RoundTrip(t, sb)
		})
	}
}

// TestDaemonRefusesPinsThatDieWithIt (review finding 1): where no bpffs
// that outlives the daemon can be had, it refuses to start and says how to
// run it.
func TestDaemonRefusesPinsThatDieWithIt(t *testing.T) {
	env := harness.New(t)
	t.Run("ip-netns-exec-without-host-bpffs", func(t *testing.T) {
		plain := filepath.Join("/run", env.Name+"-plain")
		if err := os.MkdirAll(plain, 0o700); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(plain) })
		d := env.NewDaemon(harness.DaemonOptions{Launch: harness.LaunchIPNetnsExec, PinRoot: filepath.Join(plain, "bpf")})
		err := d.TryStart()
		if err == nil {
			d.Stop()
			t.Fatal("cleanwalld started with pins on a bpffs private to its mount namespace")
		}
		var se *harness.StartError
		if !errors.As(err, &se) || !strings.Contains(se.Log, "would not outlive") || !strings.Contains(se.Log, "nsenter --net=") {
			t.Fatalf("want a refusal that says how to run it, got: %v", err)
		}
	})
	t.Run("own-bpffs-in-a-private-mount-namespace", func(t *testing.T) {
		dir := filepath.Join(env.Dir, "private-bpf")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		script := fmt.Sprintf("mount -t bpf bpf %s && exec nsenter --net=%s %s --socket %s --bpf-root %s --state-dir %s --audit-log -",
			dir, env.Node, filepath.Join(env.Bin, "cleanwalld"), filepath.Join(env.Dir, "private.sock"), dir, filepath.Join(env.Dir, "private-state"))
		cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script)
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		select {
		case err := <-exited:
			if err == nil || !strings.Contains(out.String(), "would not outlive") {
				t.Fatalf("want the pin root refused, got %v:\n%s", err, out.String())
			}
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			t.Fatalf("cleanwalld runs with pins on its own private bpffs:\n%s", out.String())
		}
	})
}

// TestSecondWallHoldsWithoutPrograms (review finding 2): with the
// sandbox's program gone (pins removed, or `bpftool link detach`) and the
// watchdog held back, the nftables wall alone keeps everything in: nothing
// reaches the remote or a node service, CHECK reports it, and the wall
// counts the drops.
func TestSecondWallHoldsWithoutPrograms(t *testing.T) {
	for way, detach := range harness.Detachers {
		t.Run(way, func(t *testing.T) {
			env := harness.New(t)
			d := env.StartDaemon("--watchdog-interval", "1h")
			targets := env.NewEscapeTargets()
			sb := env.MustAddSandbox("bare", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
			d.RoundTrip(t, sb)
			before := len(targets.Allowed.Conns())

			detach(t, d)
			if !harness.Eventually(2*time.Second, func() bool { return env.TCXPrograms(t, sb.HostVeth()) == 0 }) {
				t.Fatalf("the program is still attached after %s", way)
			}
			if err := sb.Check(); err == nil {
				t.Error("CNI CHECK passes with the program gone")
			}
			wallBefore := d.WallDrops(t, sb)
			targets.Attempt(t, sb)
			targets.AssertNothingEscaped(t, sb, before)
			if after := d.WallDrops(t, sb); after <= wallBefore {
				t.Errorf("the wall counted no drops (%v before, %v after)", wallBefore, after)
			}
		})
	}
}
