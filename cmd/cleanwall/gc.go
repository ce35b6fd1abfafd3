package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/runtime/cnichain"
	"github.com/cleanwall/cleanwall/runtime/daemon"
)

// gcLockFile serializes gc passes with each other and with a new run
// claiming its name and run directory, so neither sees a half-made claim.
const gcLockFile = "gc.lock"

// gcTimeout bounds a gc pass (the CNI plugins it runs).
const gcTimeout = 2 * time.Minute

// cmdGC removes what runs whose owner is gone left behind.
func cmdGC(args []string) error {
	if len(args) > 0 {
		return fail("usage: cleanwall gc (no arguments): removes what killed `cleanwall run`s left behind")
	}
	if os.Geteuid() != 0 {
		return fail("needs root (network namespaces, routing, BPF pins): run it with sudo")
	}
	if _, err := os.Stat(runDir); errors.Is(err, os.ErrNotExist) {
		fmt.Println("nothing to remove")
		return nil
	}
	unlock, err := lockGC()
	if err != nil {
		return err
	}
	defer unlock()
	ctx, cancel := context.WithTimeout(context.Background(), gcTimeout)
	defer cancel()
	pass := collect(ctx, runDir)
	failed := false
	for _, c := range pass.collected {
		if c.err == nil {
			fmt.Printf("removed %s:\n", c.title())
		} else {
			failed = true
			fmt.Printf("partly removed %s:\n", c.title())
		}
		for _, item := range c.removed {
			fmt.Printf("  %s\n", item)
		}
		for _, n := range c.notes {
			fmt.Printf("  (%s)\n", n)
		}
		if c.err != nil {
			fmt.Fprintf(os.Stderr, "cleanwall: %s: %v (its run directory stays for the next gc)\n", c.title(), c.err)
		}
	}
	for _, n := range pass.notes {
		fmt.Fprintf(os.Stderr, "cleanwall: %s\n", n)
	}
	if len(pass.collected) == 0 {
		fmt.Println("nothing to remove")
	}
	if failed {
		return &exitError{1}
	}
	return nil
}

// lockGC takes the gc lock (blocking).
func lockGC() (func(), error) {
	path := filepath.Join(runDir, gcLockFile)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fail("opening %s: %v", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fail("locking %s: %v", path, err)
	}
	return func() { f.Close() }, nil
}

// gcPass is the outcome of one pass over the run directories.
type gcPass struct {
	collected []collected
	// remaining are the runs still there: live ones, and dead ones whose
	// removal failed (their names stay taken).
	remaining []*runRecord
	notes     []string
}

// collected is a run whose owner was gone, and what was removed of it.
type collected struct {
	rec     *runRecord
	why     string
	removed []string
	notes   []string
	err     error
}

func (c collected) title() string {
	name := c.rec.Name
	if name == "" {
		name = "(name unknown)"
	}
	return fmt.Sprintf("run %s (pid %d, %s)", name, c.rec.Owner.PID, c.why)
}

// collect goes over the run directories under dir (named by their owner's
// pid) and removes every run whose owner is gone. The caller holds the gc
// lock. A run it cannot judge is left alone.
func collect(ctx context.Context, dir string) gcPass {
	var pass gcPass
	entries, err := os.ReadDir(dir)
	if err != nil {
		pass.notes = append(pass.notes, fmt.Sprintf("reading %s: %v", dir, err))
		return pass
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 || !e.IsDir() {
			continue // slot locks, the gc lock, IPAM and CNI cache dirs
		}
		path := filepath.Join(dir, e.Name())
		rec, err := loadRecord(path)
		if errors.Is(err, os.ErrNotExist) {
			rec, err = legacyRecord(dir, path, pid)
		}
		if err != nil {
			pass.notes = append(pass.notes, fmt.Sprintf("%s left alone: %v", path, err))
			continue
		}
		alive, why := rec.Owner.alive()
		if alive {
			pass.remaining = append(pass.remaining, rec)
			continue
		}
		c := purgeRun(ctx, rec, path, why)
		pass.collected = append(pass.collected, c)
		if c.err != nil {
			pass.remaining = append(pass.remaining, rec)
		}
	}
	return pass
}

// purgeRun removes what a run whose owner is gone left, in the order of
// its own teardown: the CNI attachment (host-local's reservation, the
// veth, libcni's cache entry; cleanwall-cni's DEL tolerates the dead
// runtime), the sandbox namespace, what the embedded runtime installed,
// then the run directory. It stops at the first failed step so nothing is
// opened out of order (the runtime's programs stay while the sandbox
// does), and the run directory goes only when everything else did, so the
// next gc retries. It works in the run's node namespace, where the
// routing lives.
func purgeRun(ctx context.Context, rec *runRecord, dir, why string) collected {
	c := collected{rec: rec, why: why}
	node, here, found := rec.NodeNetns.locate()
	steps := func() error {
		if rec.ContainerID != "" {
			o := rec.CNI
			o.PluginDirs = pluginSearchPath(o.PluginDirs)
			nsPath := ""
			if rec.Netns != "" && netns.Exists(rec.Netns) {
				nsPath = netns.Path(rec.Netns)
			}
			cached, err := cnichain.DelCached(ctx, o, rec.ContainerID, nsPath, rec.IfName)
			if err != nil {
				return err
			}
			if cached {
				c.removed = append(c.removed, fmt.Sprintf("CNI attachment %s/%s of network %s (DEL through the chain, cache entry)", rec.ContainerID, rec.IfName, o.Name))
			} else {
				c.removed = append(c.removed, fmt.Sprintf("CNI DEL of %s/%s (it had no cache entry)", rec.ContainerID, rec.IfName))
			}
		}
		if rec.Netns != "" {
			if _, err := os.Lstat(netns.Path(rec.Netns)); err == nil {
				if err := netns.Delete(rec.Netns); err != nil {
					return err
				}
				c.removed = append(c.removed, "netns "+rec.Netns)
			}
		}
		// The mountpoints it made on the host for its volumes.
		c.removed = append(c.removed, removeMountpoints(dir)...)
		if rec.Runtime == nil {
			return nil
		}
		cfg := rec.Runtime.config()
		release := func() error { return nil }
		switch {
		case rec.Runtime.Slot == 0:
			cfg.Table, cfg.RedirectMark = 0, 0
			if rec.legacy {
				c.notes = append(c.notes, "made before ownership records: its routing slot is unknown; a new run of that slot replaces it")
			}
		case !found:
			cfg.Table, cfg.RedirectMark = 0, 0
			c.notes = append(c.notes, fmt.Sprintf("its node namespace is gone (and its rules with it) or out of reach: routing of table %d not looked for", rec.Runtime.Table))
		default:
			rel, ok, err := trySlot(rec.Runtime.Slot)
			if err != nil {
				return err
			}
			if !ok {
				// The rule and route are identical for every run of a
				// slot: they belong to the live run holding it now.
				cfg.Table, cfg.RedirectMark = 0, 0
				c.notes = append(c.notes, fmt.Sprintf("slot %d belongs to a live run now: its rule and route of table %d stay", rec.Runtime.Slot, rec.Runtime.Table))
			} else {
				release = rel
			}
		}
		removed, err := daemon.Purge(cfg)
		_ = release()
		c.removed = append(c.removed, removed...)
		if err != nil {
			return err
		}
		// The runtime's FUSE servers died with it: its volume mounts are dead.
		removed, err = daemon.CleanDeadVolumes(daemon.DefaultVolumeDir, rec.ContainerID, rec.IfName)
		c.removed = append(c.removed, removed...)
		return err
	}
	var err error
	if found && !here {
		err = netns.Do(node, steps)
	} else {
		err = steps()
	}
	if err == nil {
		if err = os.RemoveAll(dir); err == nil {
			c.removed = append(c.removed, "run directory "+dir)
		}
	}
	c.err = err
	return c
}

// pluginSearchPath is where gc looks for the CNI plugins: where the run
// found them, then where a run would look now.
func pluginSearchPath(recorded []string) []string {
	dirs := append([]string{}, recorded...)
	if exe, err := os.Executable(); err == nil {
		dirs = append(dirs, filepath.Dir(exe))
	}
	return append(dirs, cnichain.DefaultPluginDirs...)
}

// legacyRecord reconstructs what a run directory made before ownership
// records (or by a run killed before it wrote one) holds. An empty one was
// abandoned before anything was made. Otherwise the embedded runtime's
// files sit at fixed places under the pid, and libcni's cache knows the
// attachment whose cleanwall-cni used the runtime's socket. Its routing
// slot was not recorded, so its rule and route stay (a new run of that
// slot replaces them). Without a start time, the owner counts as gone only
// once its pid is free.
func legacyRecord(dir, path string, pid int) (*runRecord, error) {
	rec := &runRecord{Owner: owner{PID: pid}, legacy: true}
	entries, err := os.ReadDir(path)
	if err != nil || len(entries) == 0 {
		return rec, err
	}
	sock := filepath.Join(path, "cleanwalld.sock")
	rec.Runtime = &runtimeRecord{Socket: sock, PinRoot: pinRootOf(pid), StateDir: filepath.Join(path, "state")}
	cacheDir := filepath.Join(dir, "cni-cache")
	atts, err := cnichain.CachedAttachments(cacheDir)
	if err != nil {
		return nil, err
	}
	for _, a := range atts {
		if !chainUsesSocket(a.Config, sock) {
			continue
		}
		rec.ContainerID, rec.IfName = a.ContainerID, a.IfName
		if filepath.Dir(a.NetNS) == netns.Dir {
			rec.Netns = filepath.Base(a.NetNS)
			rec.Name = strings.TrimPrefix(rec.Netns, "cleanwall-")
		}
		rec.CNI = cnichain.Options{Name: a.Network, Subnet: defaultSubnet, Cleanwall: true, Socket: sock,
			CacheDir: cacheDir, IPAMDir: filepath.Join(dir, "ipam")}
		break
	}
	return rec, nil
}

// chainUsesSocket tells whether a conflist's cleanwall-cni talks to socket.
func chainUsesSocket(conflist []byte, socket string) bool {
	var list struct {
		Plugins []struct {
			Type   string `json:"type"`
			Socket string `json:"socket"`
		} `json:"plugins"`
	}
	if json.Unmarshal(conflist, &list) != nil {
		return false
	}
	for _, p := range list.Plugins {
		if p.Type == "cleanwall-cni" && p.Socket == socket {
			return true
		}
	}
	return false
}
