package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// AttachMode says how a program is attached to an interface.
type AttachMode string

const (
	// AttachTCX is a tcx link, pinned under <root>/links.
	AttachTCX AttachMode = "tcx"
	// AttachLegacyTC is a cls_bpf filter on a clsact qdisc, used only where
	// the kernel has no tcx. The filter lives with the interface.
	AttachLegacyTC AttachMode = "tc"
)

// ErrLinkGone means the interface behind an attachment no longer exists.
var ErrLinkGone = errors.New("attached interface is gone")

// legacyPriority and legacyHandle identify our cls_bpf filter.
const (
	legacyPriority = 1
	legacyHandle   = 0xc1ea
	legacyName     = "cleanwall"
)

// Attachment describes where a program is attached.
type Attachment struct {
	Name    string // pin name under <root>/links
	Ifindex int
	Mode    AttachMode
	Bridge  bool // bridge device program rather than a sandbox port program
}

func (d *Datapath) linkPin(name string) string { return filepath.Join(d.pinRoot, "links", name) }

func (d *Datapath) program(bridge bool) *ebpf.Program {
	if bridge {
		return d.objs.BridgeIngress
	}
	return d.objs.SandboxEgress
}

// Attach attaches the sandbox (or bridge) program at ingress of ifindex,
// first in the tcx chain so no other program sees sandbox traffic before
// us. With preferLegacy false it uses tcx and falls back to tc only when
// tcx is unsupported. An existing attachment of the same name is updated in
// place (atomically) when it still targets ifindex.
func (d *Datapath) Attach(a Attachment, preferLegacy bool) (Attachment, error) {
	prog := d.program(a.Bridge)
	if !preferLegacy {
		if err := d.attachTCX(a, prog); err == nil {
			a.Mode = AttachTCX
			return a, nil
		} else if !errors.Is(err, ebpf.ErrNotSupported) {
			return a, err
		}
	}
	if err := attachLegacy(a.Ifindex, prog); err != nil {
		return a, err
	}
	a.Mode = AttachLegacyTC
	return a, nil
}

func (d *Datapath) attachTCX(a Attachment, prog *ebpf.Program) error {
	pin := d.linkPin(a.Name)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		defer l.Close()
		info, ierr := l.Info()
		if ierr == nil && info.TCX() != nil && int(info.TCX().Ifindex) == a.Ifindex {
			if err := l.Update(prog); err == nil {
				return nil
			}
		}
		// Stale pin (interface recreated, or gone): replace it.
		_ = l.Unpin()
	}
	l, err := link.AttachTCX(link.TCXOptions{
		Interface: a.Ifindex,
		Program:   prog,
		Attach:    ebpf.AttachTCXIngress,
		Anchor:    link.Head(),
	})
	if err != nil {
		return fmt.Errorf("attaching tcx program to ifindex %d: %w", a.Ifindex, err)
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pinning tcx link: %w", err)
	}
	return nil
}

func attachLegacy(ifindex int, prog *ebpf.Program) error {
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := netlink.QdiscReplace(qdisc); err != nil {
		return fmt.Errorf("adding clsact qdisc to ifindex %d: %w", ifindex, err)
	}
	filter := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    netlink.HANDLE_MIN_INGRESS,
			Handle:    legacyHandle,
			Protocol:  unix.ETH_P_ALL,
			Priority:  legacyPriority,
		},
		Fd:           prog.FD(),
		Name:         legacyName,
		DirectAction: true,
	}
	if err := netlink.FilterReplace(filter); err != nil {
		return fmt.Errorf("adding cls_bpf filter to ifindex %d: %w", ifindex, err)
	}
	return nil
}

// Detach removes an attachment. Missing attachments are not an error.
func (d *Datapath) Detach(a Attachment) error {
	switch a.Mode {
	case AttachLegacyTC:
		filter := &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{
			LinkIndex: a.Ifindex, Parent: netlink.HANDLE_MIN_INGRESS, Handle: legacyHandle,
			Protocol: unix.ETH_P_ALL, Priority: legacyPriority,
		}}
		if err := netlink.FilterDel(filter); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("deleting cls_bpf filter: %w", err)
		}
		return nil
	default:
		pin := d.linkPin(a.Name)
		l, err := link.LoadPinnedLink(pin, nil)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			// A pin we cannot load is still removed: the link dies with it.
			if rerr := os.Remove(pin); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
				return fmt.Errorf("removing link pin: %w", rerr)
			}
			return nil
		}
		defer l.Close()
		_ = l.Detach()
		if err := l.Unpin(); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("unpinning link: %w", err)
		}
		return nil
	}
}

// Check verifies that the attachment exists, targets its interface and runs
// this datapath's program.
func (d *Datapath) Check(a Attachment) error {
	want, err := d.program(a.Bridge).Info()
	if err != nil {
		return fmt.Errorf("reading program info: %w", err)
	}
	wantID, _ := want.ID()
	switch a.Mode {
	case AttachLegacyTC:
		filters, err := netlink.FilterList(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: a.Ifindex}}, netlink.HANDLE_MIN_INGRESS)
		if err != nil {
			return fmt.Errorf("listing filters of ifindex %d: %w", a.Ifindex, err)
		}
		for _, f := range filters {
			if bf, ok := f.(*netlink.BpfFilter); ok && bf.Handle == legacyHandle && bf.Id == int(wantID) {
				return nil
			}
		}
		return fmt.Errorf("no cleanwall cls_bpf filter with program %d on ifindex %d", wantID, a.Ifindex)
	default:
		l, err := link.LoadPinnedLink(d.linkPin(a.Name), nil)
		if err != nil {
			return fmt.Errorf("loading link pin %s: %w", a.Name, err)
		}
		defer l.Close()
		info, err := l.Info()
		if err != nil {
			if errors.Is(err, unix.ENOLINK) {
				return ErrLinkGone
			}
			return fmt.Errorf("reading link info: %w", err)
		}
		tcx := info.TCX()
		if tcx == nil {
			return fmt.Errorf("link %s is not a tcx link", a.Name)
		}
		if tcx.Ifindex == 0 {
			return ErrLinkGone
		}
		if int(tcx.Ifindex) != a.Ifindex {
			return fmt.Errorf("link %s is attached to ifindex %d, want %d", a.Name, tcx.Ifindex, a.Ifindex)
		}
		if info.Program != wantID {
			return fmt.Errorf("link %s runs program %d, want %d", a.Name, info.Program, wantID)
		}
		return nil
	}
}

// PinnedLinks lists the names of pinned links (for reconcile after restart).
func (d *Datapath) PinnedLinks() ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(d.pinRoot, "links"))
	if err != nil {
		return nil, fmt.Errorf("listing link pins: %w", err)
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names, nil
}
