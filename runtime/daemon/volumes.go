package daemon

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/enforce"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
	"github.com/cleanwall/cleanwall/volumes"
)

// The lifecycle of a sandbox's volumes (spec.volumes, docs/volumes-lifecycle.md):
// after the volume keys are released (keys.Ensure) and before the sandbox
// is admitted, every volume is mounted under
// <VolumeDir>/<containerID>@<ifName>/<name>; an admission that fails
// unmounts them again. They are unmounted (and a block volume's loop
// device detached) at DEL, GC and when the daemon stops: a FUSE server
// does not outlive its process. After a restart, the re-adopted sandboxes'
// volumes are mounted again; a dead mount left by the previous process
// (ENOTCONN) is detached first, with the loop devices over it. A live
// policy change may not change spec.volumes.

// DefaultVolumeDir is where the daemon mounts the sandboxes' volumes.
const DefaultVolumeDir = "/run/cleanwall/volumes"

// Audit record kinds of the volumes.
const (
	auditVolumeMount   = "volume.mount"
	auditVolumeRefuse  = "volume.mount.failed"
	auditVolumeUnmount = "volume.unmount"
)

// openVolume serves one volume (tests replace it).
var openVolume = volumes.Open

// servedVolume is one volume of a sandbox.
type servedVolume struct {
	index int // in spec.volumes
	vol   policy.Volume
	dir   string
	m     volumes.Mounted // nil: not mounted (err says why)
	err   error
	key   []byte // the volume's copy of its key, wiped once it is closed
}

// volumeSet is a sandbox's volumes.
type volumeSet struct {
	sandbox string
	dir     string
	vols    []*servedVolume
}

// volumeRegistry holds the mounted volume sets by sandbox name.
type volumeRegistry struct {
	mu   sync.Mutex
	sets map[string]*volumeSet
}

func (r *volumeRegistry) get(name string) *volumeSet {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sets[name]
}

func (r *volumeRegistry) put(set *volumeSet) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sets == nil {
		r.sets = map[string]*volumeSet{}
	}
	r.sets[set.sandbox] = set
}

func (r *volumeRegistry) take(name string) *volumeSet {
	r.mu.Lock()
	defer r.mu.Unlock()
	set := r.sets[name]
	delete(r.sets, name)
	return set
}

func (r *volumeRegistry) takeAll() []*volumeSet {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*volumeSet, 0, len(r.sets))
	for name, set := range r.sets {
		out = append(out, set)
		delete(r.sets, name)
	}
	return out
}

// volumeDirName is a sandbox's directory under VolumeDir: its attachment
// as containerID@ifName (both are checked not to hold a slash), or a hash
// of it when that is too long for one path element.
func volumeDirName(containerID, ifName string) string {
	n := containerID + "@" + ifName
	if len(n) > 200 || strings.ContainsAny(n, "/\x00") || n[0] == '.' {
		sum := sha256.Sum256([]byte(n))
		return "h-" + hex.EncodeToString(sum[:16])
	}
	return n
}

// VolumeDirOf is where a daemon with volume directory root mounts the
// volume named volume of the sandbox attached as containerID/ifName.
func VolumeDirOf(root, containerID, ifName, volume string) string {
	return filepath.Join(root, volumeDirName(containerID, ifName), volume)
}

// mountVolumes mounts every volume of c for the sandbox being admitted;
// on error nothing of them remains. Call with the registry locked, after
// keys.Ensure(c). The set is registered by admitted.
func (d *Daemon) mountVolumes(ctx context.Context, req *api.AddRequest, c *policy.Compiled) (*volumeSet, error) {
	name := sandbox.AttachmentKey(req.ContainerID, req.IfName)
	if len(c.Policy.Spec.Volumes) == 0 {
		return nil, nil
	}
	if d.vols.get(name) != nil || d.sandboxes.Get(name) != nil {
		return nil, enforce.BadRequest("containerID", "%s is already attached", name)
	}
	set := &volumeSet{sandbox: name, dir: filepath.Join(d.cfg.VolumeDir, volumeDirName(req.ContainerID, req.IfName))}
	for i, v := range c.Policy.Spec.Volumes {
		sv := &servedVolume{index: i, vol: v, dir: filepath.Join(set.dir, v.Name)}
		if err := d.mountOne(ctx, set, sv, c); err != nil {
			_ = d.closeVolumes(set, "admission failed")
			return nil, &api.Error{Field: "policy", Message: fmt.Sprintf("spec.volumes[%d] (%s): %v", i, v.Name, err)}
		}
		set.vols = append(set.vols, sv)
	}
	return set, nil
}

// admitted registers a mounted set once its sandbox is admitted.
func (d *Daemon) admitted(set *volumeSet) {
	if set != nil {
		d.vols.put(set)
	}
}

// mountOne opens sv under the key released for c.
func (d *Daemon) mountOne(ctx context.Context, set *volumeSet, sv *servedVolume, c *policy.Compiled) (err error) {
	v := sv.vol
	fields := map[string]any{"sandbox": set.sandbox, "volume": v.Name, "kind": v.Kind, "store": v.Store,
		"keyID": v.KeyID, "readOnly": v.ReadOnly, "path": v.Path}
	defer func() {
		if err != nil {
			fields["error"] = err.Error()
			d.audit.record(auditVolumeRefuse, fields)
			d.log.Warn("volume not mounted", "sandbox", set.sandbox, "volume", v.Name, "error", err)
		}
	}()
	key, err := d.keys.VolumeKey(c, v.KeyID)
	if err != nil {
		return fmt.Errorf("key %q: %w", v.KeyID, err)
	}
	fields["keyVersion"] = key.Version
	if err := prepareVolumeDir(sv.dir); err != nil {
		clear(key.Key)
		return err
	}
	m, err := openVolume(ctx, volumes.Request{Volume: v, Key: key, Dir: sv.dir, Logger: d.log.With("volume", v.Name, "sandbox", set.sandbox)})
	if err != nil {
		clear(key.Key)
		_ = os.Remove(sv.dir)
		_ = os.Remove(set.dir) // only if empty
		return err
	}
	sv.m, sv.err, sv.key = m, nil, key.Key
	fields["hostPath"] = m.HostPath()
	if maj, min, ok := m.Device(); ok {
		fields["device"] = fmt.Sprintf("%d:%d", maj, min)
	}
	d.audit.record(auditVolumeMount, fields)
	d.log.Info("volume mounted", "sandbox", set.sandbox, "volume", v.Name, "kind", v.Kind, "host_path", m.HostPath())
	return nil
}

// prepareVolumeDir makes dir an empty directory (0700, root's) to mount
// a volume on. A dead mount a previous daemon left there (its FUSE server
// died with it: ENOTCONN) is detached first, with the loop devices over
// files under it; a live mount is refused.
func prepareVolumeDir(dir string) error {
	if err := cleanDeadMount(dir); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	if mounted, err := isMountPoint(dir); err != nil {
		return err
	} else if mounted {
		return fmt.Errorf("%s is mounted already (by another daemon?)", dir)
	}
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	names, _ := f.Readdirnames(1)
	f.Close()
	if len(names) > 0 {
		return fmt.Errorf("%s is not empty", dir)
	}
	return nil
}

// cleanDeadMount detaches a dead FUSE mount at dir and the loop devices
// whose backing file is under it. It leaves anything else alone.
func cleanDeadMount(dir string) error {
	var st unix.Stat_t
	err := unix.Stat(dir, &st)
	if !errors.Is(err, unix.ENOTCONN) && !errors.Is(err, unix.ECONNABORTED) {
		return nil
	}
	detachLoopsUnder(dir)
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("detaching the dead mount at %s: %w", dir, err)
	}
	return nil
}

// detachLoopsUnder detaches the loop devices whose backing file is under
// dir (a block volume's image on a dead FUSE mount).
func detachLoopsUnder(dir string) {
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		backing := strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")
		if !strings.HasPrefix(backing, dir+"/") {
			continue
		}
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(f)))
		fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			continue
		}
		_ = unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0)
		unix.Close(fd)
	}
}

// isMountPoint reports whether dir is the root of a mount (its device or
// its mount id differs from its parent's).
func isMountPoint(dir string) (bool, error) {
	var st, parent unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return false, err
	}
	if err := unix.Lstat(filepath.Dir(dir), &parent); err != nil {
		return false, err
	}
	return st.Dev != parent.Dev, nil
}

// closeVolumes unmounts a set's volumes (in reverse order) and removes
// their directories.
func (d *Daemon) closeVolumes(set *volumeSet, why string) error {
	if set == nil {
		return nil
	}
	var errs []error
	for i := len(set.vols) - 1; i >= 0; i-- {
		sv := set.vols[i]
		if sv.m == nil {
			_ = os.Remove(sv.dir)
			continue
		}
		err := sv.m.Close()
		fields := map[string]any{"sandbox": set.sandbox, "volume": sv.vol.Name, "kind": sv.vol.Kind, "hostPath": sv.m.HostPath(), "why": why}
		if err != nil {
			fields["error"] = err.Error()
			errs = append(errs, fmt.Errorf("unmounting volume %s of %s: %w", sv.vol.Name, set.sandbox, err))
			d.log.Error("volume not unmounted", "sandbox", set.sandbox, "volume", sv.vol.Name, "error", err)
		} else {
			clear(sv.key)
			d.log.Info("volume unmounted", "sandbox", set.sandbox, "volume", sv.vol.Name, "why", why)
			if err := os.Remove(sv.dir); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
		d.audit.record(auditVolumeUnmount, fields)
		d.vols.mu.Lock()
		sv.m = nil
		d.vols.mu.Unlock()
	}
	_ = os.Remove(set.dir) // only if empty
	return errors.Join(errs...)
}

// unmountVolumes unmounts the volumes of a sandbox that was torn down.
func (d *Daemon) unmountVolumes(name, why string) error {
	return d.closeVolumes(d.vols.take(name), why)
}

// unmountAllVolumes unmounts every volume (the daemon stops).
func (d *Daemon) unmountAllVolumes(why string) error {
	var errs []error
	for _, set := range d.vols.takeAll() {
		errs = append(errs, d.closeVolumes(set, why))
	}
	return errors.Join(errs...)
}

// sweepDeadVolumes detaches the dead mounts (and their loop devices) a
// previous process left under VolumeDir, and removes their directories:
// those of the sandboxes it had that are gone too. Live mounts (another
// runtime's) are left alone.
func (d *Daemon) sweepDeadVolumes() {
	dirs, _ := filepath.Glob(filepath.Join(d.cfg.VolumeDir, "*", "*"))
	for _, dir := range dirs {
		var st unix.Stat_t
		err := unix.Stat(dir, &st)
		if !errors.Is(err, unix.ENOTCONN) && !errors.Is(err, unix.ECONNABORTED) {
			continue
		}
		if err := cleanDeadMount(dir); err != nil {
			d.log.Warn("volume left behind", "dir", dir, "error", err)
			continue
		}
		d.log.Info("dead volume mount detached", "dir", dir)
		_ = os.Remove(dir)
		_ = os.Remove(filepath.Dir(dir))
	}
}

// CleanDeadVolumes detaches the dead volume mounts (and the loop devices
// over them) that a runtime which is gone left for the sandbox attached as
// containerID/ifName under root (a Config's VolumeDir), and removes their
// directories; it lists what it removed. Live mounts are left alone.
// `cleanwall gc` calls it for the runs whose owner died.
func CleanDeadVolumes(root, containerID, ifName string) ([]string, error) {
	dir := filepath.Join(root, volumeDirName(containerID, ifName))
	vols, _ := filepath.Glob(filepath.Join(dir, "*"))
	var removed []string
	var errs []error
	for _, v := range vols {
		var st unix.Stat_t
		err := unix.Stat(v, &st)
		if errors.Is(err, unix.ENOTCONN) || errors.Is(err, unix.ECONNABORTED) {
			if err := cleanDeadMount(v); err != nil {
				errs = append(errs, err)
				continue
			}
			removed = append(removed, "dead volume mount "+v)
		}
		if err := os.Remove(v); err == nil {
			removed = append(removed, "volume directory "+v)
		}
	}
	_ = os.Remove(dir) // only if empty
	return removed, errors.Join(errs...)
}

// remountVolumes mounts the volumes of the re-adopted sandboxes after a
// restart. The sandbox is enforced already: a volume whose key is not
// released or whose store does not open is reported (log, audit, the
// sandbox's view) and left unmounted. Call with the registry locked.
func (d *Daemon) remountVolumes() {
	d.sweepDeadVolumes()
	for _, s := range d.sandboxes.All() {
		s.Lock()
		c, rec := s.Compiled, s.Rec
		s.Unlock()
		if c == nil || c.Policy == nil || len(c.Policy.Spec.Volumes) == 0 || d.vols.get(s.Name) != nil {
			continue
		}
		set := &volumeSet{sandbox: s.Name, dir: filepath.Join(d.cfg.VolumeDir, volumeDirName(rec.ContainerID, rec.IfName))}
		keyErr := d.keys.Ensure(d.ctx, c)
		for i, v := range c.Policy.Spec.Volumes {
			sv := &servedVolume{index: i, vol: v, dir: filepath.Join(set.dir, v.Name)}
			if keyErr != nil {
				sv.err = keyErr
				_ = cleanDeadMount(sv.dir)
				d.audit.record(auditVolumeRefuse, map[string]any{"sandbox": s.Name, "volume": v.Name, "keyID": v.KeyID, "error": keyErr.Error()})
			} else if err := d.mountOne(d.ctx, set, sv, c); err != nil {
				sv.err = err
			}
			set.vols = append(set.vols, sv)
		}
		d.vols.put(set)
	}
}

// volumesUnchanged refuses a live policy change that changes spec.volumes
// of any of list's sandboxes: a mounted volume stays as it was admitted
// (delete and add the sandbox again to change its volumes).
func volumesUnchanged(list []*sandbox.Sandbox, c *policy.Compiled) error {
	var want []policy.Volume
	if c.Policy != nil {
		want = c.Policy.Spec.Volumes
	}
	for _, s := range list {
		s.Lock()
		cur := s.Compiled
		s.Unlock()
		var have []policy.Volume
		if cur != nil && cur.Policy != nil {
			have = cur.Policy.Spec.Volumes
		}
		if len(have) == 0 && len(want) == 0 {
			continue
		}
		if !reflect.DeepEqual(have, want) {
			return &api.Error{Field: "spec.volumes", Message: fmt.Sprintf("%s: a live policy change cannot change spec.volumes (%d mounted as admitted, the new policy has %d, or they differ): delete and add the sandbox again to change its volumes", s.Name, len(have), len(want))}
		}
	}
	return nil
}

// volumeViews lists a sandbox's volumes for the API.
func (d *Daemon) volumeViews(name string) []api.Volume {
	set := d.vols.get(name)
	if set == nil {
		return nil
	}
	d.vols.mu.Lock()
	defer d.vols.mu.Unlock()
	out := make([]api.Volume, 0, len(set.vols))
	for _, sv := range set.vols {
		v := api.Volume{Name: sv.vol.Name, Kind: sv.vol.Kind, Path: sv.vol.Path, ReadOnly: sv.vol.ReadOnly}
		if sv.m != nil {
			v.HostPath = sv.m.HostPath()
			if maj, min, ok := sv.m.Device(); ok {
				v.Device = &api.DeviceNumber{Major: maj, Minor: min}
			}
		} else if sv.err != nil {
			v.Error = sv.err.Error()
		}
		out = append(out, v)
	}
	return out
}
