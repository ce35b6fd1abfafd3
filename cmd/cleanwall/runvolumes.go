package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/daemon"
)

// The command of `cleanwall run` sees each volume of the policy at its
// path, in a mount namespace of its own (docs/volumes-lifecycle.md): the
// runtime (cleanwalld or the embedded one) mounted the volume before it
// admitted the sandbox; the sandbox init binds the decrypted directory
// (files) or a block device node made on a private tmpfs (block) onto the
// volume's path, then hides the runtime's volume directory under an empty
// tmpfs. None of these mounts propagates to the host. A path missing on
// the host is created empty for the run (a directory, or an empty file
// with no permissions as the mountpoint of a device node) and removed
// when the run ends.

// volumesFlag passes the plan to the sandbox init.
const volumesFlag = "--volumes="

// runVolume is one volume as the command sees it.
type runVolume struct {
	Name     string `json:"name"`
	Kind     string `json:"kind"`
	HostPath string `json:"hostPath"`
	Path     string `json:"path"`
	ReadOnly bool   `json:"readOnly,omitempty"`
	Major    uint32 `json:"major,omitempty"`
	Minor    uint32 `json:"minor,omitempty"`
}

// volumePlan is what the sandbox init mounts before it starts the command.
type volumePlan struct {
	// Stage is a directory of the run the init mounts a private tmpfs on,
	// for the device nodes of block volumes.
	Stage string `json:"stage"`
	// Hide are directories that get an empty tmpfs in the command's
	// namespace: the runtime's volume directory (every sandbox's volumes).
	Hide    []string    `json:"hide,omitempty"`
	Volumes []runVolume `json:"volumes"`
}

// prepareVolumes reads the sandbox's volumes back from the runtime (they
// are mounted once it admitted the sandbox) and makes their mountpoints on
// the host where missing (removed again by td). nil: no volumes.
func prepareVolumes(ctx context.Context, client *api.Client, c *policy.Compiled, containerID, ifName, dir string, td *teardown) (*volumePlan, error) {
	if c.Policy == nil || len(c.Policy.Spec.Volumes) == 0 {
		return nil, nil
	}
	sb, err := client.Get(ctx, containerID, ifName)
	if err != nil {
		return nil, fail("reading the sandbox's volumes: %v", err)
	}
	plan := &volumePlan{Stage: filepath.Join(dir, "volumes")}
	hide := map[string]bool{daemon.DefaultVolumeDir: true}
	served := map[string]api.Volume{}
	for _, v := range sb.Volumes {
		served[v.Name] = v
	}
	for i, pv := range c.Policy.Spec.Volumes {
		v, ok := served[pv.Name]
		if !ok || v.HostPath == "" {
			why := "not served by the runtime"
			if v.Error != "" {
				why = v.Error
			}
			return nil, fail("volume %s (spec.volumes[%d]): %s", pv.Name, i, why)
		}
		rv := runVolume{Name: v.Name, Kind: v.Kind, HostPath: v.HostPath, Path: pv.Path, ReadOnly: pv.ReadOnly}
		switch v.Kind {
		case "files":
			var fs unix.Statfs_t
			if err := unix.Statfs(v.HostPath, &fs); err != nil || fs.Type != unix.FUSE_SUPER_MAGIC {
				return nil, fail("volume %s (spec.volumes[%d]): %s is not the runtime's mount in this mount namespace (%v): run cleanwall in the mount namespace of the cleanwalld at %s (nsenter --net=... rather than ip netns exec), or give --socket a path no cleanwalld answers on so that cleanwall run starts a runtime of its own", pv.Name, i, v.HostPath, statfsWhy(err, fs), client.Socket)
			}
			hide[filepath.Dir(filepath.Dir(v.HostPath))] = true
		case "block":
			if v.Device == nil {
				return nil, fail("volume %s (spec.volumes[%d]): the runtime reports no device number", pv.Name, i)
			}
			rv.Major, rv.Minor = v.Device.Major, v.Device.Minor
		default:
			return nil, fail("volume %s (spec.volumes[%d]): kind %q", pv.Name, i, v.Kind)
		}
		if err := mountpoint(rv.Path, rv.Kind == "files", dir, td); err != nil {
			return nil, fail("volume %s (spec.volumes[%d]): path %s: %v", pv.Name, i, rv.Path, err)
		}
		plan.Volumes = append(plan.Volumes, rv)
	}
	for h := range hide {
		if st, err := os.Stat(h); err == nil && st.IsDir() && !underAny(h, plan.Volumes) {
			plan.Hide = append(plan.Hide, h)
		}
	}
	if err := os.Mkdir(plan.Stage, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fail("creating %s: %v", plan.Stage, err)
	}
	for _, v := range plan.Volumes {
		ro := ""
		if v.ReadOnly {
			ro = ", read-only"
		}
		fmt.Fprintf(os.Stderr, "cleanwall: volume %s (%s%s) at %s\n", v.Name, v.Kind, ro, v.Path)
	}
	return plan, nil
}

func statfsWhy(err error, fs unix.Statfs_t) string {
	if err != nil {
		return err.Error()
	}
	return fmt.Sprintf("file system type %#x, not FUSE", fs.Type)
}

// underAny reports whether one of the volumes' paths is at or under dir
// (hiding dir would hide the volume).
func underAny(dir string, vols []runVolume) bool {
	for _, v := range vols {
		if v.Path == dir || strings.HasPrefix(v.Path, dir+"/") {
			return true
		}
	}
	return false
}

// mountpointsFile lists, in the run directory, the mountpoints the run
// created on the host (one a line, parents first): `cleanwall gc` removes
// them when the run was killed before its teardown.
const mountpointsFile = "mountpoints"

// created records a mountpoint made on the host and has td remove it.
func created(runDir, p string, td *teardown) error {
	f, err := os.OpenFile(filepath.Join(runDir, mountpointsFile), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(f, p)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	td.push(func() error { return removeIfThere(p) })
	return err
}

// removeMountpoints removes the mountpoints a dead run created (if still
// empty), children first; it lists what it removed.
func removeMountpoints(runDir string) []string {
	b, err := os.ReadFile(filepath.Join(runDir, mountpointsFile))
	if err != nil {
		return nil
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	var removed []string
	for i := len(lines) - 1; i >= 0; i-- {
		if p := lines[i]; filepath.IsAbs(p) && os.Remove(p) == nil {
			removed = append(removed, "mountpoint "+p)
		}
	}
	return removed
}

// mountpoint makes sure path exists as a directory (dir) or a non-directory,
// creating what is missing (recorded in the run directory runDir, removed
// by td if still empty).
func mountpoint(path string, dir bool, runDir string, td *teardown) error {
	st, err := os.Lstat(path)
	switch {
	case err == nil && dir && !st.IsDir():
		return errors.New("exists and is not a directory")
	case err == nil && !dir && st.IsDir():
		return errors.New("exists and is a directory, not a device node")
	case err == nil:
		return nil
	case !errors.Is(err, os.ErrNotExist):
		return err
	}
	// Create the missing parents, then path itself.
	var missing []string
	for p := filepath.Dir(path); p != "/"; p = filepath.Dir(p) {
		if _, err := os.Lstat(p); err == nil {
			break
		}
		missing = append(missing, p)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		p := missing[i]
		if err := os.Mkdir(p, 0o755); err != nil {
			return err
		}
		if err := created(runDir, p, td); err != nil {
			return err
		}
	}
	if dir {
		if err := os.Mkdir(path, 0o755); err != nil {
			return err
		}
	} else {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		f.Close()
	}
	return created(runDir, path, td)
}

func removeIfThere(p string) error {
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// initArgs are the sandbox init's arguments before "--".
func (p *volumePlan) initArgs() ([]string, error) {
	if p == nil {
		return nil, nil
	}
	b, err := json.Marshal(p)
	if err != nil {
		return nil, err
	}
	return []string{volumesFlag + string(b)}, nil
}

// parseVolumesArg takes the plan off the init's arguments.
func parseVolumesArg(args []string) (*volumePlan, []string, error) {
	if len(args) == 0 || !strings.HasPrefix(args[0], volumesFlag) {
		return nil, args, nil
	}
	p := &volumePlan{}
	if err := json.Unmarshal([]byte(strings.TrimPrefix(args[0], volumesFlag)), p); err != nil {
		return nil, nil, fmt.Errorf("volumes: %w", err)
	}
	return p, args[1:], nil
}

// mountVolumes runs in the sandbox init, in the command's new mount
// namespace, before the command starts.
func (p *volumePlan) mount() error {
	// Nothing mounted here reaches the host; the host's unmounts still
	// reach here.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		return fmt.Errorf("making the mount namespace private: %w", err)
	}
	staged := false
	for _, v := range p.Volumes {
		switch v.Kind {
		case "files":
			// Fail closed: a directory that is not the runtime's FUSE mount
			// here (a runtime in a mount namespace this one does not see)
			// would take the command's writes in plaintext.
			var fs unix.Statfs_t
			if err := unix.Statfs(v.HostPath, &fs); err != nil {
				return fmt.Errorf("volume %s: %s: %w", v.Name, v.HostPath, err)
			}
			if fs.Type != unix.FUSE_SUPER_MAGIC {
				return fmt.Errorf("volume %s: %s is not the runtime's mount in this mount namespace (does cleanwalld run in another one?)", v.Name, v.HostPath)
			}
			if err := unix.Mount(v.HostPath, v.Path, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
				return fmt.Errorf("volume %s: binding %s on %s: %w", v.Name, v.HostPath, v.Path, err)
			}
			if v.ReadOnly {
				if err := unix.Mount("", v.Path, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
					return fmt.Errorf("volume %s: read-only: %w", v.Name, err)
				}
			}
		case "block":
			if !staged {
				if err := unix.Mount("cleanwall-volumes", p.Stage, "tmpfs", unix.MS_NOSUID|unix.MS_NOEXEC, "mode=0700,size=64k"); err != nil {
					return fmt.Errorf("mounting a tmpfs on %s: %w", p.Stage, err)
				}
				staged = true
			}
			node := filepath.Join(p.Stage, v.Name)
			mode := uint32(unix.S_IFBLK | 0o600)
			if v.ReadOnly {
				mode = unix.S_IFBLK | 0o400
			}
			if err := unix.Mknod(node, mode, int(unix.Mkdev(v.Major, v.Minor))); err != nil {
				return fmt.Errorf("volume %s: making the device node %d:%d: %w", v.Name, v.Major, v.Minor, err)
			}
			if err := unix.Mount(node, v.Path, "", unix.MS_BIND, ""); err != nil {
				return fmt.Errorf("volume %s: binding the device node on %s: %w", v.Name, v.Path, err)
			}
		default:
			return fmt.Errorf("volume %s: kind %q", v.Name, v.Kind)
		}
	}
	if staged {
		// The bound nodes stay; the staging directory is the run's again.
		_ = unix.Unmount(p.Stage, unix.MNT_DETACH)
	}
	for _, h := range p.Hide {
		if err := unix.Mount("cleanwall-hidden", h, "tmpfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0700,size=4k"); err != nil {
			return fmt.Errorf("hiding %s: %w", h, err)
		}
	}
	return nil
}
