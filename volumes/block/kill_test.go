package block

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/testutil"
)

// helperEnv makes the test binary a block volume server (TestServeHelper).
const helperEnv = "CLEANWALL_BLOCK_TEST_SERVE"

// TestServeHelper serves the volume named by helperEnv ("store dir") and
// prints its device until it is killed; it does nothing in a normal run.
func TestServeHelper(t *testing.T) {
	arg := os.Getenv(helperEnv)
	if arg == "" {
		t.Skip("helper process for TestKilledServer")
	}
	store, dir, _ := strings.Cut(arg, " ")
	v, err := Serve(context.Background(), Config{Store: store, Size: 64 << 20, Key: testKey("vol-dek", 7), Dir: dir, Name: "killed"})
	if err != nil {
		os.Stdout.WriteString("ERR " + err.Error() + "\n")
		os.Exit(1)
	}
	os.Stdout.WriteString("DEV " + v.HostPath() + "\n")
	select {}
}

// TestKilledServer: the serving process is killed (SIGKILL) while ext4 on
// the volume has a file fsynced and another one only written. Its dead FUSE
// mount is cleaned up the way the daemon does at restart, the loop device
// lets go once unmounted (autoclear), and the volume served again mounts
// (ext4 replays its journal), holds the fsynced file, and passes e2fsck.
func TestKilledServer(t *testing.T) {
	requireBlock(t)
	for _, tool := range []string{"mkfs.ext4", "e2fsck", "unshare"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Skip(t, "needs "+tool)
		}
	}
	d := t.TempDir()
	store, dir, mnt := filepath.Join(d, "store.img"), filepath.Join(d, "fuse"), filepath.Join(d, "mnt")
	for _, p := range []string{dir, mnt} {
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(os.Args[0], "-test.run", "^TestServeHelper$")
	cmd.Env = append(os.Environ(), helperEnv+"="+store+" "+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Kill() // the helper we started, by its pid
		_ = cmd.Wait()
		_ = unix.Unmount(dir, unix.MNT_DETACH)
	}()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "DEV /dev/loop") {
		t.Fatalf("helper: %q %v", line, err)
	}
	dev := strings.TrimSpace(strings.TrimPrefix(line, "DEV "))
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	// In a private mount namespace: write, fsync one file, write another
	// without, kill the server, let go of the mount.
	script := `
mount -t ext4 ` + dev + ` ` + mnt + `
echo durable-` + canary + ` > ` + mnt + `/synced
sync -f ` + mnt + `/synced
head -c 3000000 /dev/urandom > ` + mnt + `/unsynced
kill -9 ` + strconv.Itoa(cmd.Process.Pid) + `
umount -l ` + mnt + ` || true
`
	if out, err := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-ec", script).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	_ = cmd.Wait()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("helper ended with %v, want SIGKILL", cmd.ProcessState)
	}
	// The loop device detaches itself (autoclear) once nothing holds it.
	n, _ := strconv.Atoi(strings.TrimPrefix(dev, "/dev/loop"))
	deadline := time.Now().Add(10 * time.Second)
	for backingFile(n) != "" && strings.HasPrefix(backingFile(n), dir) {
		if time.Now().After(deadline) {
			t.Fatalf("%s still attached to %s after its server died", dev, backingFile(n))
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The dead FUSE mount: detached as the daemon does at restart.
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
		t.Fatalf("unmounting the dead FUSE mount: %v", err)
	}

	tv := &testVolume{store: store, dir: dir}
	tv.vol.Name, tv.vol.Kind, tv.vol.Store, tv.vol.SizeBytes, tv.vol.KeyID = "killed", "block", store, 64<<20, "vol-dek"
	m, err := tv.open(t, testKey("vol-dek", 7))
	if err != nil {
		t.Fatal(err)
	}
	res := inMountNS(t, `
mount -t ext4 `+m.HostPath()+` `+mnt+`
cat `+mnt+`/synced
umount `+mnt+`
e2fsck -fn `+m.HostPath()+` >/dev/null && echo FSCK-CLEAN`)
	if !strings.Contains(res, "durable-"+canary) || !strings.Contains(res, "FSCK-CLEAN") {
		t.Fatalf("after the kill: %s", res)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
}
