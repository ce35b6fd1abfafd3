package daemon

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/runtime/kernel"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

// Purge removes what a runtime with cfg leaves behind when its process died
// without Uninstall (an embedded runtime of a killed `cleanwall run`), without
// starting a daemon. It returns what it removed, one line per item, and
// carries on past a failed step so one stuck item does not keep the rest.
//
// The caller must know that no live runtime uses cfg (its pin root, state
// dir, marks and table: `cleanwall gc` checks the owner and the slot lock),
// and runs Purge in the runtime's node network namespace, where its routing
// lives. Zero fields are not defaulted, because Purge deletes and a default
// would aim at the node's cleanwalld: a zero Table and RedirectMark skip
// everything keyed by them (the routing; callers zero them when another live
// runtime now uses that table), an empty PinRoot the pins, an empty StateDir
// the records, the attachments they name and the state, an empty Socket the
// socket.
//
// Every step is idempotent. Keep this a list: a new kind of kernel state a
// runtime installs gets its own step here.
func Purge(cfg Config) ([]string, error) {
	if cfg.RulePriority == 0 {
		cfg.RulePriority = DefaultPriority // part of the rule's identity, not a target
	}
	p := &purger{cfg: cfg}
	p.step("sandbox attachments", p.attachments) // 1. what its state records attached
	p.step("routing", p.routing)                 // 2. the fwmark rules and local routes of its mark and table
	p.step("nftables wall", p.wall)              // 3. the nftables tables of its table number
	p.step("pins", p.pins)                       // 4. every pin under its pin root, then the root
	p.step("state", p.state)                     // 5. its state dir (records, audit log) and API socket
	return p.removed, errors.Join(p.errs...)
}

type purger struct {
	cfg     Config
	removed []string
	errs    []error
}

func (p *purger) step(what string, f func() error) {
	if err := f(); err != nil {
		p.errs = append(p.errs, fmt.Errorf("purging %s: %w", what, err))
	}
}

func (p *purger) did(format string, args ...any) {
	p.removed = append(p.removed, fmt.Sprintf(format, args...))
}

// attachments detaches what the state records name. A tcx link also goes
// with its pin (step 3); a legacy tc filter lives on its interface, so it
// is deleted here when that interface is still the recorded one. Without
// pinned maps there is no program handle to detach with: the filter then
// keeps dropping until its interface goes, which is the safe side.
func (p *purger) attachments() error {
	if p.cfg.StateDir == "" || p.cfg.PinRoot == "" {
		return nil
	}
	recs, errs := sandbox.Store{Dir: p.cfg.StateDir}.Load()
	if len(recs) == 0 {
		return errors.Join(errs...)
	}
	dp, err := bpf.OpenPinned(p.cfg.PinRoot)
	if err != nil {
		return errors.Join(errs...)
	}
	defer dp.Close()
	isRecorded := func(ifindex int, name string) bool {
		l, err := netlink.LinkByIndex(ifindex)
		return err == nil && l.Attrs().Name == name
	}
	bridges := map[string]bool{}
	for _, rec := range recs {
		if rec.Attachment.Mode == bpf.AttachTCX || isRecorded(rec.HostIfindex, rec.HostInterface) {
			if err := dp.Detach(rec.Attachment); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", rec.Key(), err))
			} else {
				p.did("attachment of sandbox %s (%s on %s)", rec.Key(), rec.Attachment.Mode, rec.HostInterface)
			}
		}
		if rec.Bridge == "" || bridges[rec.Bridge] {
			continue
		}
		bridges[rec.Bridge] = true
		att := bpf.Attachment{Name: "bridge-" + rec.Bridge, Ifindex: rec.BridgeIfindex, Bridge: true, Mode: rec.Attachment.Mode}
		if att.Mode == bpf.AttachTCX || isRecorded(rec.BridgeIfindex, rec.Bridge) {
			if err := dp.Detach(att); err != nil {
				errs = append(errs, fmt.Errorf("bridge %s: %w", rec.Bridge, err))
			} else {
				p.did("attachment of bridge %s", rec.Bridge)
			}
		}
	}
	return errors.Join(errs...)
}

// routing deletes the fwmark rule and the local route of the runtime's
// mark and table, for IPv4 and IPv6 (the same ones routing.install adds).
func (p *purger) routing() error {
	if p.cfg.Table == 0 && p.cfg.RedirectMark == 0 {
		return nil
	}
	if p.cfg.Table == 0 || p.cfg.RedirectMark == 0 {
		return fmt.Errorf("table %d and redirect mark %#x: both or neither", p.cfg.Table, p.cfg.RedirectMark)
	}
	r := kernel.Routing{Mark: p.cfg.RedirectMark, Mask: RedirectMask, Table: p.cfg.Table, Priority: p.cfg.RulePriority}
	var errs []error
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		fam := map[int]string{unix.AF_INET: "IPv4", unix.AF_INET6: "IPv6"}[family]
		// Loop: a rule added twice (by hand, or a race) is two rules.
		for range 16 {
			err := netlink.RuleDel(r.Rule(family))
			if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EAFNOSUPPORT) {
				break
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("deleting %s fwmark rule of table %d: %w", fam, r.Table, err))
				break
			}
			p.did("%s rule fwmark %#x/%#x lookup %d", fam, r.Mark, r.Mask, r.Table)
		}
		err := netlink.RouteDel(r.Route(family))
		switch {
		case err == nil:
			p.did("%s local route of table %d", fam, r.Table)
		case errors.Is(err, unix.ESRCH), errors.Is(err, unix.ENOENT), errors.Is(err, unix.EAFNOSUPPORT):
		default:
			errs = append(errs, fmt.Errorf("deleting %s local route of table %d: %w", fam, r.Table, err))
		}
	}
	return errors.Join(errs...)
}

// wall deletes the runtime's nftables tables (netdev and inet), named by
// its table number: only when the routing is the runtime's to remove too.
func (p *purger) wall() error {
	if p.cfg.Table == 0 {
		return nil
	}
	w := kernel.NewNFTWall(p.cfg.Table, p.cfg.RedirectMark)
	present, err := w.Present()
	if err != nil || !present {
		return err
	}
	if err := w.Remove(); err != nil {
		return err
	}
	p.did("nftables tables %s", w.Name())
	return nil
}

// pins removes the pin root: link pins first (their links detach), then
// the maps, then the directories. A pin root the runtime mounted a bpffs
// on itself (outside /sys/fs/bpf) is unmounted once empty.
func (p *purger) pins() error {
	if p.cfg.PinRoot == "" {
		return nil
	}
	root := filepath.Clean(p.cfg.PinRoot)
	if !filepath.IsAbs(root) || root == "/" || root == "/sys/fs/bpf" {
		return fmt.Errorf("pin root %q is not a directory of its own", p.cfg.PinRoot)
	}
	if _, err := os.Lstat(root); errors.Is(err, os.ErrNotExist) {
		// A runtime in a private mount namespace pinned on the host's
		// bpffs (bpf.ResolvePinRoot); a record saved before it resolved
		// its pin root names the path it asked for.
		host := "/proc/2/root" + root
		if _, err := os.Lstat(host); err != nil {
			return nil
		}
		root = host
	}
	n := 0
	var errs []error
	for _, sub := range []string{"links", "maps"} {
		entries, _ := os.ReadDir(filepath.Join(root, sub))
		for _, e := range entries {
			if err := os.Remove(filepath.Join(root, sub, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			} else {
				n++
			}
		}
	}
	err := os.RemoveAll(root)
	if errors.Is(err, unix.EBUSY) {
		if uerr := unix.Unmount(root, unix.MNT_DETACH); uerr == nil {
			err = os.Remove(root)
		}
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	} else {
		p.did("pins under %s (%d)", root, n)
	}
	return errors.Join(errs...)
}

// state removes the state dir (sandbox records, audit log) and the socket.
func (p *purger) state() error {
	var errs []error
	if dir := filepath.Clean(p.cfg.StateDir); p.cfg.StateDir != "" {
		if !filepath.IsAbs(dir) || dir == "/" {
			errs = append(errs, fmt.Errorf("state dir %q is not a directory of its own", p.cfg.StateDir))
		} else if _, err := os.Lstat(dir); err == nil {
			if err := os.RemoveAll(dir); err != nil {
				errs = append(errs, err)
			} else {
				p.did("state %s", dir)
			}
		}
	}
	if p.cfg.Socket != "" {
		// Only a socket: a path mistaken for one must not be deleted.
		if fi, err := os.Lstat(p.cfg.Socket); err == nil && fi.Mode().Type() == os.ModeSocket {
			if err := os.Remove(p.cfg.Socket); err != nil {
				errs = append(errs, err)
			} else {
				p.did("socket %s", p.cfg.Socket)
			}
		}
	}
	return errors.Join(errs...)
}
