package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/tests/harness"
)

// Volumes through `cleanwall run` and the real kinds (FUSE, loop devices):
// the runtime mounts them once the key broker released their keys and
// before the sandbox is admitted; the command sees them at their paths in
// its own mount namespace; the stores on the host hold only ciphertext;
// after the run nothing stays mounted or attached.

// volumeScript is the command's side: "write" fills the volumes and
// checks every operation against a model in memory; "verify" reads back
// what "write" left (in a later run) and expects EIO where the store was
// tampered with. Both print "ok" last.
const volumeScript = `
import errno, hashlib, os, random, subprocess, sys, tempfile

mode, docs, other, dev, canary = sys.argv[1:6]
rng = random.Random(1234)

def fail(msg):
    print("FAIL", msg, flush=True)
    sys.exit(3)

def blob(n):
    return bytes(rng.getrandbits(8) for _ in range(n)) if n < 4096 else os.urandom(n)

def digest(p):
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

def expect_eio(p):
    try:
        with open(p, "rb") as f:
            f.read()
    except OSError as e:
        if e.errno != errno.EIO:
            fail("%s: %s, want EIO" % (p, e))
        return
    fail("%s read without an error, want EIO" % p)

def block(verify):
    mnt = tempfile.mkdtemp(prefix="cw-ext4-")
    try:
        if not verify:
            subprocess.run(["/usr/sbin/mkfs.ext4", "-q", "-F", dev], check=True)
        for round in range(1 if verify else 2):
            subprocess.run(["mount", "-t", "ext4", dev, mnt], check=True)
            p = os.path.join(mnt, "canary.txt")
            if not verify and round == 0:
                with open(p, "w") as f:
                    f.write(canary * 100)
            if open(p).read() != canary * 100:
                fail("ext4 on the block volume lost the canary")
            subprocess.run(["umount", mnt], check=True)
    finally:
        os.rmdir(mnt)

if mode == "write":
    # One file, many operations, checked against a model at random offsets.
    path = os.path.join(docs, "random.bin")
    model = bytearray()
    with open(path, "w+b") as f:
        for step in range(60):
            op = rng.choice(["write", "write", "append", "truncate", "read"])
            if op == "write":
                off = rng.randrange(0, len(model) + 1)
                data = blob(rng.choice([1, 17, 4096, 5000, 70000]))
                f.seek(off); f.write(data)
                if off + len(data) > len(model):
                    model.extend(b"\0" * (off + len(data) - len(model)))
                model[off:off + len(data)] = data
            elif op == "append":
                data = blob(rng.choice([3, 4095, 4097, 300000]))
                f.seek(0, 2); f.write(data); model.extend(data)
            elif op == "truncate":
                n = rng.randrange(0, len(model) + 9000)
                f.truncate(n)
                model = model[:n] + bytearray(max(0, n - len(model)))
            f.flush(); os.fsync(f.fileno())
            for _ in range(5):
                off = rng.randrange(0, len(model) + 1)
                n = rng.choice([1, 100, 4096, 9000])
                f.seek(off)
                if f.read(n) != bytes(model[off:off + n]):
                    fail("step %d (%s): bytes at %d differ" % (step, op, off))
    if digest(path) != hashlib.sha256(model).hexdigest():
        fail("random.bin differs from its model")
    # A canary in a file whose name holds it too; an empty file; a big one.
    os.makedirs(os.path.join(docs, "dir-" + canary), exist_ok=True)
    with open(os.path.join(docs, "dir-" + canary, "note-" + canary + ".txt"), "w") as f:
        f.write((canary + "\n") * 1000)
    open(os.path.join(docs, "empty"), "w").close()
    with open(os.path.join(docs, "big.bin"), "wb") as f:
        f.write(os.urandom(24 << 20))
    # Files the host will damage (tamper.bin) and replace (victim.bin) in the store.
    with open(os.path.join(docs, "tamper.bin"), "wb") as f:
        f.write(os.urandom(5 << 20))
    with open(os.path.join(docs, "victim.bin"), "wb") as f:
        f.write(os.urandom(123457))
    with open(os.path.join(other, "donor.bin"), "wb") as f:
        f.write(os.urandom(123457))
    for name in ["random.bin", "big.bin", "empty", "dir-%s/note-%s.txt" % (canary, canary)]:
        print("sum", name, digest(os.path.join(docs, name)))
    os.sync()
    block(False)
    print("ok", flush=True)
elif mode == "verify":
    for line in open(sys.argv[6]):
        _, name, want = line.split()
        if digest(os.path.join(docs, name)) != want:
            fail("%s changed between runs" % name)
    expect_eio(os.path.join(docs, "tamper.bin"))
    expect_eio(os.path.join(docs, "victim.bin"))
    try:
        open(os.path.join(docs, "new.txt"), "w").close()
        fail("created a file in the read-only volume")
    except OSError as e:
        if e.errno != errno.EROFS:
            fail("writing to the read-only volume: %s, want EROFS" % e)
    block(True)
    print("ok", flush=True)
else:
    fail("mode " + mode)
`

func volumePolicy(name string, vols ...string) string {
	return "apiVersion: cleanwall.dev/v1\nkind: EgressPolicy\nmetadata: {name: " + name + "}\nspec:\n  volumes:\n" + strings.Join(vols, "")
}

// storeFiles lists a store's regular files (path -> content).
func storeFiles(t *testing.T, root string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(p)
		out[p] = b
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// largest is the store file with the most bytes.
func largest(files map[string][]byte) string {
	best := ""
	for p, b := range files {
		if best == "" || len(b) > len(files[best]) {
			best = p
		}
	}
	return best
}

// volumeLeftovers checks nothing of a run's volumes stays: no mount (in
// this namespace) of its volume directory or of the paths, no loop device
// over one of its images, no mountpoint the run created. A loop device
// goes when its last opener closes it (autoclear), which another process
// probing loop devices may delay a little: it is waited for.
func volumeLeftovers(t *testing.T, run string, paths ...string) {
	t.Helper()
	volumeLeftoversIn(t, filepath.Join("/run/cleanwall/volumes", "cleanwall-"+run+"@eth0"), paths...)
}

// volumeLeftoversIn is volumeLeftovers for the sandbox directory volDir.
func volumeLeftoversIn(t *testing.T, volDir string, paths ...string) {
	t.Helper()
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(info), "\n") {
		for _, p := range append([]string{volDir + "/"}, paths...) {
			if strings.Contains(line, " "+p+" ") || strings.Contains(line, " "+p+"/") {
				t.Errorf("still mounted: %s", line)
			}
		}
	}
	attached := func() (out []string) {
		loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
		for _, f := range loops {
			if b, err := os.ReadFile(f); err == nil && strings.Contains(string(b), volDir+"/") {
				out = append(out, f+" -> "+strings.TrimSpace(string(b)))
			}
		}
		return out
	}
	if !harness.Eventually(10*time.Second, func() bool { return len(attached()) == 0 }) {
		t.Errorf("loop devices still attached 10s after the run: %v", attached())
	}
	if _, err := os.Stat(volDir); !os.IsNotExist(err) {
		t.Errorf("the run's volume directory is left: %v", err)
	}
	for _, p := range paths {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Errorf("mountpoint %s left on the host: %v", p, err)
		}
	}
}

func TestRunVolumes(t *testing.T) {
	env := harness.New(t)
	kb := env.StartKeyBroker(harness.KeyBrokerOptions{AllowSimulated: true, Keys: []string{"vol-a", "vol-b"}})
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	secret := "CANARY" + hex.EncodeToString(b)
	storeA, storeB := filepath.Join(env.Dir, "store-a"), filepath.Join(env.Dir, "store-b")
	image := filepath.Join(env.Dir, "scratch.img")
	docs, other := filepath.Join(env.Dir, "mnt", "docs"), filepath.Join(env.Dir, "mnt", "other")
	dev := fmt.Sprintf("/dev/cw-scratch-%d", os.Getpid())
	policyFile := func(file string, docsReadOnly bool) string {
		return writePolicy(t, env, file, volumePolicy("volumes",
			fmt.Sprintf("    - {name: docs, kind: files, store: %s, keyID: vol-a, path: %s, readOnly: %v}\n", storeA, docs, docsReadOnly),
			fmt.Sprintf("    - {name: other, kind: files, store: %s, keyID: vol-b, path: %s}\n", storeB, other),
			fmt.Sprintf("    - {name: scratch, kind: block, store: %s, sizeBytes: 67108864, keyID: vol-a, path: %s}\n", image, dev)))
	}
	pol, readOnly := policyFile("volumes.yaml", false), policyFile("volumes-ro.yaml", true)
	script := filepath.Join(env.Dir, "volumes.py")
	if err := os.WriteFile(script, []byte(volumeScript), 0o644); err != nil {
		t.Fatal(err)
	}
	brokerFlags := []string{"--keybroker", kb.URL, "--broker-ca", kb.CAFile, "--attestation", "simulated"}
	run := func(pol, name string, args ...string) runResult {
		t.Helper()
		all := append([]string{"--policy", pol, "--name", name}, brokerFlags...)
		all = append(all, "--", "/usr/bin/python3", script)
		res := cleanwallRun(t, env, append(all, args...)...)
		volumeLeftovers(t, name, docs, other, dev, filepath.Join(env.Dir, "mnt"))
		return res
	}

	// First run: write, rewrite, append, truncate, read back; ext4 on the
	// block volume.
	first := runName("vol-write")
	res := run(pol, first, "write", docs, other, dev, secret)
	if res.code != 0 || !strings.HasSuffix(res.stdout, "ok\n") {
		t.Fatalf("write run: exit status %d\nstdout: %s\nstderr: %s", res.code, res.stdout, res.stderr)
	}
	if want := "cleanwall: volume scratch (block) at " + dev; !strings.Contains(res.stderr, want) {
		t.Errorf("the run does not announce %q:\n%s", want, res.stderr)
	}
	var sums bytes.Buffer
	for _, line := range strings.Split(res.stdout, "\n") {
		if strings.HasPrefix(line, "sum ") {
			sums.WriteString(line + "\n")
		}
	}
	if strings.Count(sums.String(), "\n") != 4 {
		t.Fatalf("sums: %q", sums.String())
	}

	// The stores hold ciphertext only: no canary, no file name.
	filesA, filesB := storeFiles(t, storeA), storeFiles(t, storeB)
	if len(filesA) < 6 {
		t.Fatalf("store A holds %d files", len(filesA))
	}
	for _, files := range []map[string][]byte{filesA, filesB} {
		for p, data := range files {
			for _, plain := range []string{secret, "random.bin", "victim.bin", "tamper.bin", "donor.bin", "note-"} {
				if strings.Contains(p, plain) || bytes.Contains(data, []byte(plain)) {
					t.Fatalf("store file %s holds %q in plaintext", p, plain)
				}
			}
		}
	}
	img, err := os.ReadFile(image)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(img, []byte(secret)) || bytes.Contains(img, []byte("canary.txt")) {
		t.Fatal("the block image holds the canary in plaintext")
	}

	// Damage the store: flip a byte in the middle of the largest file of
	// A that is tamper.bin's (big.bin is larger: the second largest), and
	// put B's donor (same size, another key) in place of victim.bin.
	big := largest(filesA)
	delete(filesA, big)
	tampered := largest(filesA)
	data := filesA[tampered]
	data[len(data)/2] ^= 0x40
	if err := os.WriteFile(tampered, data, 0o600); err != nil {
		t.Fatal(err)
	}
	donor := largest(filesB)
	var victim string
	for p, d := range filesA {
		if len(d) == len(filesB[donor]) {
			if victim != "" {
				t.Fatalf("two files of A are the size of B's donor: %s, %s", victim, p)
			}
			victim = p
		}
	}
	if victim == "" {
		t.Fatalf("no file of A is the size of B's donor (%d bytes)", len(filesB[donor]))
	}
	if err := os.WriteFile(victim, filesB[donor], 0o600); err != nil {
		t.Fatal(err)
	}

	// Second run on the same stores, docs read-only: what was written
	// reads back; the damaged and the moved file read as EIO; nothing can
	// be written to docs; the ext4 volume remounts.
	sumsFile := filepath.Join(env.Dir, "sums.txt")
	if err := os.WriteFile(sumsFile, sums.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	res = run(readOnly, runName("vol-verify"), "verify", docs, other, dev, secret, sumsFile)
	if res.code != 0 || !strings.HasSuffix(res.stdout, "ok\n") {
		t.Fatalf("verify run: exit status %d\nstdout: %s\nstderr: %s", res.code, res.stdout, res.stderr)
	}

	// No key: the broker does not release it; the command never runs and
	// the error names the volume.
	marker := filepath.Join(env.Dir, "ran")
	denied := writePolicy(t, env, "denied.yaml", volumePolicy("denied",
		fmt.Sprintf("    - {name: sealed, kind: files, store: %s, keyID: vol-unknown, path: %s}\n", filepath.Join(env.Dir, "store-c"), docs)))
	name := runName("vol-nokey")
	res = cleanwallRun(t, env, append(append([]string{"--policy", denied, "--name", name}, brokerFlags...), "--", "touch", marker)...)
	if res.code == 0 || !strings.Contains(res.stderr, "spec.volumes[0].keyID (sealed)") || !strings.Contains(res.stderr, "vol-unknown") {
		t.Fatalf("run without the volume's key: exit status %d\nstderr: %s", res.code, res.stderr)
	}
	if _, err := os.Stat(marker); !os.IsNotExist(err) {
		t.Fatal("the command ran without its volume's key")
	}
	volumeLeftovers(t, name, docs)
	runLeftovers(t, env, name)
}

// cleanwalld mounts a sandbox's volumes under --volume-dir for a container
// runtime to bind. SIGKILLed, it leaves dead mounts (its FUSE servers died
// with it) and a loop device over one; restarted, it detaches those and
// mounts the volumes again, and what was written reads back. DEL unmounts
// and detaches everything.
func TestVolumesAcrossDaemonRestart(t *testing.T) {
	env := harness.New(t)
	kb := env.StartKeyBroker(harness.KeyBrokerOptions{AllowSimulated: true, Keys: []string{"vol-a"}})
	volDir := filepath.Join(env.Dir, "volumes")
	d := env.StartDaemon("--volume-dir", volDir, "--keybroker", kb.URL, "--broker-ca", kb.CAFile, "--attestation", "simulated")
	pol := volumePolicy("restart",
		fmt.Sprintf("    - {name: docs, kind: files, store: %s, keyID: vol-a, path: /data}\n", filepath.Join(env.Dir, "store")),
		fmt.Sprintf("    - {name: disk, kind: block, store: %s, sizeBytes: 8388608, keyID: vol-a, path: /dev/disk}\n", filepath.Join(env.Dir, "disk.img")))
	sb := env.MustAddSandbox("vol-restart", harness.SandboxOptions{Policy: pol})
	view := func() (files, block string) {
		t.Helper()
		v, err := d.Client().Get(harness.Ctx(), sb.ContainerID, "")
		if err != nil {
			t.Fatal(err)
		}
		if len(v.Volumes) != 2 || v.Volumes[0].Name != "docs" || v.Volumes[1].Device == nil {
			t.Fatalf("volumes in the view: %+v", v.Volumes)
		}
		return v.Volumes[0].HostPath, v.Volumes[1].HostPath
	}
	files, loop := view()
	if want := filepath.Join(volDir, sb.ContainerID+"@eth0", "docs"); files != want {
		t.Fatalf("files volume at %s, want %s", files, want)
	}
	if st, err := os.Stat(filepath.Dir(files)); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("the sandbox's volume directory: %v %v", st.Mode(), err)
	}
	if err := os.WriteFile(filepath.Join(files, "kept.txt"), []byte("before the restart"), 0o600); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(loop, "/dev/loop") {
		t.Fatalf("block volume at %q", loop)
	}
	attached := func() []string {
		var out []string
		loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
		for _, f := range loops {
			if b, err := os.ReadFile(f); err == nil && strings.HasPrefix(string(b), volDir) {
				out = append(out, f)
			}
		}
		return out
	}
	if n := len(attached()); n != 1 {
		t.Fatalf("%d loop devices over the volume dir, want 1", n)
	}

	// The operator learns where to bind from `cleanwall sandboxes`.
	out, err := exec.Command(filepath.Join(env.Bin, "cleanwall"), "sandboxes", "--socket", d.Socket).CombinedOutput()
	if err != nil || !strings.Contains(string(out), files) || !strings.Contains(string(out), loop) {
		t.Fatalf("cleanwall sandboxes: %v\n%s", err, out)
	}

	d.Kill()
	if _, err := os.Stat(files); err == nil {
		t.Fatal("the files volume still answers after its daemon was killed")
	}
	d.Start()
	files, _ = view()
	if b, err := os.ReadFile(filepath.Join(files, "kept.txt")); err != nil || string(b) != "before the restart" {
		t.Fatalf("after the restart: %q %v", b, err)
	}
	if n := len(attached()); n != 1 {
		t.Fatalf("%d loop devices over the volume dir after the restart, want 1 (the dead one detached)", n)
	}
	if log := d.Log(); !strings.Contains(log, "dead volume mount detached") {
		t.Errorf("the restart did not report the dead mounts it detached:\n%s", harness.Grep(log, "volume"))
	}

	if err := sb.Del(); err != nil {
		t.Fatal(err)
	}
	if n := len(attached()); n != 0 {
		t.Fatalf("%d loop devices left after DEL", n)
	}
	info, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(info), volDir) {
		t.Fatalf("still mounted after DEL:\n%s", harness.Grep(string(info), volDir))
	}
	if entries, _ := os.ReadDir(volDir); len(entries) != 0 {
		t.Fatalf("left in the volume dir after DEL: %v", entries)
	}
}

// A `cleanwall run` SIGKILLed in the host's mount namespace (nsenter, not
// `ip netns exec`) leaves its volumes' dead FUSE mounts and the empty
// mountpoints it made on the host; `cleanwall gc` removes them.
func TestRunVolumesKilledThenGC(t *testing.T) {
	env := harness.New(t)
	if err := harness.EnsureHostBPFFS(); err != nil {
		t.Fatal(err)
	}
	kb := env.StartKeyBroker(harness.KeyBrokerOptions{AllowSimulated: true, Keys: []string{"vol-a"}})
	docs := filepath.Join(env.Dir, "mnt", "docs")
	dev := filepath.Join(env.Dir, "mnt", "disk")
	pol := writePolicy(t, env, "killed.yaml", volumePolicy("killed",
		fmt.Sprintf("    - {name: docs, kind: files, store: %s, keyID: vol-a, path: %s}\n", filepath.Join(env.Dir, "store"), docs),
		fmt.Sprintf("    - {name: disk, kind: block, store: %s, sizeBytes: 8388608, keyID: vol-a, path: %s}\n", filepath.Join(env.Dir, "disk.img"), dev)))
	name := runName("vol-killed")
	ready := filepath.Join(env.Dir, "ready")
	cw := filepath.Join(env.Bin, "cleanwall")
	cmd := exec.Command("nsenter", "--net="+env.Node, cw, "run", "--policy", pol, "--name", name,
		"--keybroker", kb.URL, "--broker-ca", kb.CAFile, "--attestation", "simulated", "--",
		"sh", "-c", `echo data > "$1/file" && touch "$2" && exec sleep 600`, "sh", docs, ready)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-done })
	if !harness.Eventually(30*time.Second, func() bool { _, err := os.Stat(ready); return err == nil }) {
		t.Fatalf("the command did not start:\n%s", stderr.String())
	}
	// The host's view is unchanged: the command's mounts are its own (the
	// mountpoints the run made are empty here).
	if entries, err := os.ReadDir(docs); err != nil || len(entries) != 0 {
		t.Fatalf("the host sees %v (%v) at %s, where the command wrote a file", entries, err, docs)
	}
	if st, err := os.Lstat(dev); err != nil || !st.Mode().IsRegular() || st.Size() != 0 || st.Mode().Perm() != 0 {
		t.Fatalf("the host sees %v (%v) at %s, want the run's empty mountpoint", st.Mode(), err, dev)
	}
	volDir := filepath.Join("/run/cleanwall/volumes", "cleanwall-"+name+"@eth0")
	_ = cmd.Process.Kill()
	<-done
	if _, err := os.Stat(filepath.Join(volDir, "docs")); !errors.Is(err, unix.ENOTCONN) {
		t.Fatalf("the killed run's files volume: %v, want a dead mount (ENOTCONN)", err)
	}
	out, err := exec.Command(cw, "gc").CombinedOutput()
	if err != nil {
		t.Fatalf("cleanwall gc: %v\n%s", err, out)
	}
	for _, want := range []string{"dead volume mount " + filepath.Join(volDir, "docs"), "mountpoint " + docs, "mountpoint " + dev} {
		if !strings.Contains(string(out), want) {
			t.Errorf("cleanwall gc does not report %q:\n%s", want, out)
		}
	}
	volumeLeftovers(t, name, docs, dev, filepath.Join(env.Dir, "mnt"))
	runLeftovers(t, env, name)
}

// With podman (the documented flow): a container holds the sandbox's
// network, so its volumes are mounted by the time a second container that
// joins that network is created with binds of them; that container reads
// and writes the files volume and the block device; removing the holder
// (CNI DEL) unmounts and detaches them.
func TestPodmanBindsVolumes(t *testing.T) {
	env := harness.New(t)
	kb := env.StartKeyBroker(harness.KeyBrokerOptions{AllowSimulated: true, Keys: []string{"vol-a"}})
	volDir := filepath.Join(env.Dir, "volumes")
	d := env.StartDaemon("--volume-dir", volDir, "--keybroker", kb.URL, "--broker-ca", kb.CAFile, "--attestation", "simulated")
	store := filepath.Join(env.Dir, "store")
	policyFile := writePolicy(t, env, "podman-volumes.yaml", volumePolicy("podman-volumes",
		fmt.Sprintf("    - {name: docs, kind: files, store: %s, keyID: vol-a, path: /data}\n", store),
		fmt.Sprintf("    - {name: disk, kind: block, store: %s, sizeBytes: 8388608, keyID: vol-a, path: /dev/disk}\n", filepath.Join(env.Dir, "disk.img"))))
	pm := newPodman(t, env, policyFile)
	rootfs := staticRootfs(t, pm.dir)
	limits := []string{"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"}

	holder := env.Name + "-holder"
	out, err := pm.run(append(append([]string{"run", "-d", "--name", holder, "--network", pm.network}, limits...),
		"--rootfs", rootfs, "/bin/busybox", "sleep", "120")...)
	if err != nil {
		t.Fatalf("%v\n%s", err, d.Log())
	}
	id := strings.TrimSpace(out)
	removed := false
	t.Cleanup(func() {
		if !removed {
			_, _ = pm.run("rm", "-f", "-t", "0", holder)
		}
	})
	sb, err := d.Client().Get(harness.Ctx(), id, "")
	if err != nil || len(sb.Volumes) != 2 {
		t.Fatalf("the holder's sandbox: %+v %v", sb.Volumes, err)
	}
	files, loop := sb.Volumes[0].HostPath, sb.Volumes[1].HostPath
	if want := filepath.Join(volDir, id+"@eth0", "docs"); files != want {
		t.Fatalf("files volume at %s, want %s", files, want)
	}
	secret := canary(t)
	out, err = pm.run(append(append([]string{"run", "--rm", "--network", "container:" + holder}, limits...),
		"--mount", "type=bind,src="+files+",dst=/data", "--device", loop+":/dev/disk",
		"--rootfs", rootfs, "/bin/busybox", "sh", "-c",
		`echo "$1" > /data/note && cat /data/note && printf '%s' "$1" | /bin/busybox dd of=/dev/disk bs=4096 conv=sync,fsync 2>/dev/null && /bin/busybox dd if=/dev/disk bs=4096 count=1 2>/dev/null | /bin/busybox head -c ${#1}`,
		"sh", secret)...)
	if err != nil || out != secret+"\n"+secret {
		t.Fatalf("the worker container: %q %v", out, err)
	}
	if b, err := os.ReadFile(filepath.Join(files, "note")); err != nil || string(b) != secret+"\n" {
		t.Fatalf("the note through the host's mount: %q %v", b, err)
	}
	for p, data := range storeFiles(t, store) {
		if bytes.Contains(data, []byte(secret)) || strings.Contains(p, "note") {
			t.Fatalf("store file %s holds the canary or the name in plaintext", p)
		}
	}

	if _, err := pm.run("rm", "-f", "-t", "0", holder); err != nil {
		t.Fatal(err)
	}
	removed = true
	info, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(info), volDir) {
		t.Fatalf("still mounted after podman rm:\n%s", harness.Grep(string(info), volDir))
	}
	if !harness.Eventually(10*time.Second, func() bool {
		loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
		for _, f := range loops {
			if b, _ := os.ReadFile(f); strings.HasPrefix(string(b), volDir) {
				return false
			}
		}
		return true
	}) {
		t.Fatal("the block volume's loop device is still attached after podman rm")
	}
}

// `cleanwall run` with a cleanwalld: the command sees the volumes the
// daemon mounted when it runs in the daemon's mount namespace; from a
// mount namespace that does not see the daemon's mounts (ip netns exec on
// a host whose mounts do not propagate) it fails closed, naming the volume,
// and the command never runs, rather than writing to an empty directory.
func TestRunVolumesWithCleanwalld(t *testing.T) {
	env := harness.New(t)
	if err := harness.EnsureHostBPFFS(); err != nil {
		t.Fatal(err)
	}
	kb := env.StartKeyBroker(harness.KeyBrokerOptions{AllowSimulated: true, Keys: []string{"vol-a"}})
	volDir := filepath.Join(env.Dir, "volumes")
	d := env.StartDaemon("--volume-dir", volDir, "--keybroker", kb.URL, "--broker-ca", kb.CAFile, "--attestation", "simulated")
	store := filepath.Join(env.Dir, "store")
	docs, dev := filepath.Join(env.Dir, "mnt", "docs"), filepath.Join(env.Dir, "mnt", "disk")
	pol := writePolicy(t, env, "daemon-volumes.yaml", volumePolicy("daemon-volumes",
		fmt.Sprintf("    - {name: docs, kind: files, store: %s, keyID: vol-a, path: %s}\n", store, docs),
		fmt.Sprintf("    - {name: disk, kind: block, store: %s, sizeBytes: 8388608, keyID: vol-a, path: %s}\n", filepath.Join(env.Dir, "disk.img"), dev)))
	secret := canary(t)
	script := `printf '%s' "$1" > "$2/note" && cat "$2/note" && printf '%s' "$1" | dd of="$3" bs=4096 conv=sync,fsync 2>/dev/null && dd if="$3" bs=4096 count=1 2>/dev/null | head -c ${#1}`

	// In the daemon's mount namespace (nsenter enters only the network).
	name := runName("vol-daemon")
	cmd := exec.Command("nsenter", "--net="+env.Node, filepath.Join(env.Bin, "cleanwall"), "run", "--socket", d.Socket,
		"--policy", pol, "--name", name, "--", "sh", "-c", script, "sh", secret, docs, dev)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil || stdout.String() != secret+secret {
		t.Fatalf("run with cleanwalld: %v, stdout %q\nstderr: %s", err, stdout.String(), stderr.String())
	}
	sandboxDir := filepath.Join(volDir, "cleanwall-"+name+"@eth0")
	volumeLeftoversIn(t, sandboxDir, docs, dev, filepath.Join(env.Dir, "mnt"))
	for p, data := range storeFiles(t, store) {
		if bytes.Contains(data, []byte(secret)) {
			t.Fatalf("store file %s holds the canary", p)
		}
	}

	// From ip netns exec's mount namespace, which does not see them.
	name = runName("vol-elsewhere")
	marker := filepath.Join(env.Dir, "ran")
	res := cleanwallRun(t, env, "--socket", d.Socket, "--policy", pol, "--name", name, "--", "touch", marker)
	if res.code == 0 || !strings.Contains(res.stderr, "volume docs (spec.volumes[0])") || !strings.Contains(res.stderr, "not the runtime's mount") {
		t.Fatalf("run from another mount namespace: exit status %d\nstderr: %s", res.code, res.stderr)
	}
	if _, err := os.Stat(marker); !os.IsNotExist(err) {
		t.Fatal("the command ran without its volumes")
	}
	volumeLeftoversIn(t, filepath.Join(volDir, "cleanwall-"+name+"@eth0"), docs, dev)
	if list, err := d.Client().List(harness.Ctx()); err != nil || len(list) != 0 {
		t.Fatalf("sandboxes left in cleanwalld: %+v %v", list, err)
	}
}
