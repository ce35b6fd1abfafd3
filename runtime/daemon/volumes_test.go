package daemon

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/cleanwall/cleanwall/attest/broker/client"
	"github.com/cleanwall/cleanwall/attest/simulated"
	"github.com/cleanwall/cleanwall/governance/audit"
	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/keys"
	"github.com/cleanwall/cleanwall/volumes"
)

// The volume lifecycle through the API, over a test opener (no root, no
// FUSE): the kinds themselves are tested in volumes/..., and the whole
// through `cleanwall run` in tests/e2e/volumes_test.go.

// testOpener serves a volume as a marker file in its directory.
type testOpener struct {
	mu     sync.Mutex
	open   map[string]bool // dir -> served
	keys   map[string][]byte
	failOn string // a volume name whose open fails
}

type testMounted struct {
	o   *testOpener
	dir string
	blk bool
}

func (m *testMounted) HostPath() string {
	if m.blk {
		return "/dev/loop-test"
	}
	return m.dir
}

func (m *testMounted) Device() (uint32, uint32, bool) { return 7, 42, m.blk }

func (m *testMounted) Close() error {
	m.o.mu.Lock()
	defer m.o.mu.Unlock()
	delete(m.o.open, m.dir)
	return os.Remove(filepath.Join(m.dir, "served"))
}

func (o *testOpener) Open(ctx context.Context, r volumes.Request) (volumes.Mounted, error) {
	if r.Volume.Name == o.failOn {
		return nil, errors.New("store does not open")
	}
	if err := os.WriteFile(filepath.Join(r.Dir, "served"), []byte(r.Volume.Name), 0o600); err != nil {
		return nil, err
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.open[r.Dir] = true
	o.keys[r.Volume.Name] = r.Key.Key
	return &testMounted{o: o, dir: r.Dir, blk: r.Volume.Kind == "block"}, nil
}

func (o *testOpener) served() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.open)
}

func useTestOpener(t *testing.T) *testOpener {
	o := &testOpener{open: map[string]bool{}, keys: map[string][]byte{}}
	prev := openVolume
	openVolume = o.Open
	t.Cleanup(func() { openVolume = prev })
	return o
}

// refusingReleaser releases every key but the one named refuse.
type refusingReleaser struct{ refuse string }

func (r refusingReleaser) ReleaseWith(ctx context.Context, id string, o client.ReleaseOptions) (client.Key, error) {
	if id == r.refuse {
		return client.Key{}, errors.New("key-not-allowed")
	}
	return releaser{}.ReleaseWith(ctx, id, o)
}

func withKeys(t *testing.T, td *testDaemon, refuse string) {
	att, err := simulated.New(simulated.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	td.keys = keys.NewWith("https://broker.test", att, refusingReleaser{refuse}, td.log, td.audit.record)
}

const volumesPolicy = openPolicy + `  volumes:
    - {name: patients, kind: files, store: /srv/patients, keyID: vk, path: /data/patients}
    - {name: scratch, kind: block, store: /srv/scratch.img, sizeBytes: 1048576, keyID: vk2, path: /dev/scratch}
`

func auditText(t *testing.T, td *testDaemon) string {
	t.Helper()
	data, err := os.ReadFile(td.cfg.AuditLog)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func TestVolumesLifecycle(t *testing.T) {
	o := useTestOpener(t)
	td := startTest(t, Config{VolumeDir: filepath.Join(t.TempDir(), "volumes")})
	withKeys(t, td, "")
	sb, err := td.client.Add(ctx(), td.request("v", 2, volumesPolicy))
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(td.cfg.VolumeDir, "c-v@eth0")
	want := []api.Volume{
		{Name: "patients", Kind: "files", Path: "/data/patients", HostPath: filepath.Join(dir, "patients")},
		{Name: "scratch", Kind: "block", Path: "/dev/scratch", HostPath: "/dev/loop-test", Device: &api.DeviceNumber{Major: 7, Minor: 42}},
	}
	if !reflect.DeepEqual(sb.Volumes, want) {
		t.Fatalf("volumes in the ADD's answer: %+v, want %+v", sb.Volumes, want)
	}
	if got, err := td.client.Get(ctx(), "c-v", "eth0"); err != nil || len(got.Volumes) != 2 || got.Volumes[0].HostPath != want[0].HostPath {
		t.Fatalf("volumes in the sandbox view: %+v, %v", got.Volumes, err)
	}
	if VolumeDirOf(td.cfg.VolumeDir, "c-v", "eth0", "patients") != want[0].HostPath {
		t.Fatal("VolumeDirOf disagrees with the mount")
	}
	for _, name := range []string{"patients", "scratch"} {
		if _, err := os.Stat(filepath.Join(dir, name, "served")); err != nil {
			t.Fatalf("volume %s not served: %v", name, err)
		}
		if fi, _ := os.Stat(filepath.Join(dir, name)); fi.Mode().Perm() != 0o700 {
			t.Fatalf("%s: mode %v, want 0700", name, fi.Mode())
		}
	}
	// Each volume got its own key, as released for this policy.
	if !bytes.Equal(o.keys["patients"], bytes.Repeat([]byte{7}, 32)) {
		t.Fatalf("key handed to the volume: %x", o.keys["patients"])
	}
	// A live change of spec.volumes is refused, naming the field; one that
	// keeps them applies.
	changed := strings.Replace(volumesPolicy, "/data/patients", "/data/other", 1)
	_, err = td.client.ApplyPolicy(ctx(), "c-v", "", api.ApplyRequest{Policy: []byte(changed), PolicySource: "test"})
	if err == nil || !strings.Contains(err.Error(), "spec.volumes") || !strings.Contains(err.Error(), "delete and add") {
		t.Fatalf("apply changing spec.volumes: %v", err)
	}
	kept := strings.Replace(volumesPolicy, "198.51.100.10/32", "198.51.100.11/32", 1)
	if res, err := td.client.ApplyPolicy(ctx(), "c-v", "", api.ApplyRequest{Policy: []byte(kept), PolicySource: "test"}); err != nil || len(res.Sandbox.Volumes) != 2 {
		t.Fatalf("apply keeping spec.volumes: %+v %v", res, err)
	}
	// DEL unmounts and removes the directories.
	if err := td.client.Delete(ctx(), "c-v", "eth0"); err != nil {
		t.Fatal(err)
	}
	if n := o.served(); n != 0 {
		t.Fatalf("%d volumes still served after DEL", n)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the sandbox's volume directory is left: %v", err)
	}
	a := auditText(t, td)
	for _, kind := range []string{auditVolumeMount, auditVolumeUnmount} {
		if strings.Count(a, `"`+kind+`"`) != 2 {
			t.Fatalf("want two %s records:\n%s", kind, a)
		}
	}
}

// No key: admission fails naming spec.volumes[i].keyID; nothing mounted.
// A volume that does not open fails admission naming it, and the volumes
// mounted before it are unmounted.
func TestVolumesRefused(t *testing.T) {
	o := useTestOpener(t)
	td := startTest(t, Config{VolumeDir: filepath.Join(t.TempDir(), "volumes")})
	withKeys(t, td, "vk2")
	_, err := td.client.Add(ctx(), td.request("n", 2, volumesPolicy))
	if err == nil || !strings.Contains(err.Error(), "spec.volumes[1].keyID (scratch)") || !strings.Contains(err.Error(), "key-not-allowed") {
		t.Fatalf("ADD without the volume's key: %v", err)
	}
	withKeys(t, td, "")
	o.failOn = "scratch"
	_, err = td.client.Add(ctx(), td.request("f", 3, volumesPolicy))
	if err == nil || !strings.Contains(err.Error(), "spec.volumes[1] (scratch): store does not open") {
		t.Fatalf("ADD with a volume that does not open: %v", err)
	}
	if n := o.served(); n != 0 {
		t.Fatalf("%d volumes left served after refused ADDs", n)
	}
	if list, _ := td.client.List(ctx()); len(list) != 0 {
		t.Fatalf("sandboxes admitted: %+v", list)
	}
	if entries, _ := os.ReadDir(td.cfg.VolumeDir); len(entries) != 0 {
		t.Fatalf("left in the volume dir: %v", entries)
	}
	if a := auditText(t, td); !strings.Contains(a, `"`+auditVolumeRefuse+`"`) || !strings.Contains(a, "store does not open") {
		t.Fatalf("no %s record:\n%s", auditVolumeRefuse, a)
	}
	// An admission that fails after the volumes were mounted (the address
	// is taken) unmounts them again.
	o.failOn = ""
	if _, err := td.client.Add(ctx(), td.request("a", 4, openPolicy)); err != nil {
		t.Fatal(err)
	}
	_, err = td.client.Add(ctx(), td.request("b", 4, volumesPolicy))
	if err == nil || !strings.Contains(err.Error(), "already belongs") {
		t.Fatalf("ADD of a taken address: %v", err)
	}
	if n := o.served(); n != 0 {
		t.Fatalf("%d volumes left served after a failed admission", n)
	}
}

// After a restart the re-adopted sandbox's volumes are mounted again; GC
// unmounts them.
func TestVolumesAfterRestart(t *testing.T) {
	o := useTestOpener(t)
	td := startTest(t, Config{VolumeDir: filepath.Join(t.TempDir(), "volumes")})
	withKeys(t, td, "")
	if _, err := td.client.Add(ctx(), td.request("r", 6, volumesPolicy)); err != nil {
		t.Fatal(err)
	}
	td.Close() // a stopping daemon unmounts: its FUSE servers stop with it
	if n := o.served(); n != 0 {
		t.Fatalf("%d volumes served after the daemon stopped", n)
	}
	cfg := td.cfg
	cfg.Logger = testutil.Logger(t)
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.audit = &auditor{log: d.log}
	defer d.Close()
	att, _ := simulated.New(simulated.DefaultConfig())
	d.keys = keys.NewWith("https://broker.test", att, releaser{}, d.log, nil)
	if err := d.wire(td.dp, td.links, td.wall); err != nil {
		t.Fatal(err)
	}
	if err := d.reconcile(); err != nil {
		t.Fatal(err)
	}
	if n := o.served(); n != 2 {
		t.Fatalf("%d volumes served after the restart, want 2", n)
	}
	if v := d.volumeViews("c-r/eth0"); len(v) != 2 || v[0].HostPath == "" || v[0].Error != "" {
		t.Fatalf("views after the restart: %+v", v)
	}
	d.GC(nil)
	if n := o.served(); n != 0 {
		t.Fatalf("%d volumes served after GC", n)
	}
}

// A re-adopted sandbox whose volume key is not released again keeps
// running without its volumes: the view and the audit say why.
func TestVolumesAfterRestartWithoutKey(t *testing.T) {
	o := useTestOpener(t)
	td := startTest(t, Config{VolumeDir: filepath.Join(t.TempDir(), "volumes")})
	withKeys(t, td, "")
	if _, err := td.client.Add(ctx(), td.request("r", 6, volumesPolicy)); err != nil {
		t.Fatal(err)
	}
	td.Close()
	cfg := td.cfg
	cfg.Logger = testutil.Logger(t)
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.audit = &auditor{log: d.log}
	if d.audit.chain, err = audit.Open(d.cfg.AuditLog, audit.Options{}); err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	att, _ := simulated.New(simulated.DefaultConfig())
	d.keys = keys.NewWith("https://broker.test", att, refusingReleaser{"vk2"}, d.log, nil)
	if err := d.wire(td.dp, td.links, td.wall); err != nil {
		t.Fatal(err)
	}
	if err := d.reconcile(); err != nil {
		t.Fatal(err)
	}
	if d.sandboxes.Lookup("c-r/eth0") == nil {
		t.Fatal("the sandbox was not re-adopted")
	}
	if n := o.served(); n != 0 {
		t.Fatalf("%d volumes served without their key", n)
	}
	v := d.volumeViews("c-r/eth0")
	if len(v) != 2 || v[0].HostPath != "" || !strings.Contains(v[1].Error, "spec.volumes[1].keyID") || !strings.Contains(v[1].Error, "key-not-allowed") {
		t.Fatalf("views: %+v", v)
	}
	d.audit.close()
	d.audit.chain = nil
	data, err := os.ReadFile(cfg.AuditLog)
	if err != nil || !strings.Contains(string(data), `"`+auditVolumeRefuse+`"`) {
		t.Fatalf("no %s record (%v)", auditVolumeRefuse, err)
	}
}
