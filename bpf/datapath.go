// Package bpf owns cleanwall's kernel datapath: the C programs, their
// generated objects, and a typed Go API to load, pin, attach and program
// them. It holds no policy logic: callers hand it compiled rule entries.
//
// Layout under the pin root (a bpffs, mounted by Load when missing):
//
//	<root>/maps/cw_*        every map, BTF-typed, reused across restarts
//	<root>/links/<name>     one tcx link per attached interface
//
// Pinned links and maps outlive the daemon: after a crash the programs keep
// enforcing, and with no proxy socket to assign to, every new flow drops.
package bpf

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Map names as pinned under <root>/maps.
const (
	MapSandboxes = "cw_sandboxes"
	MapRules     = "cw_rules"
	MapConfig    = "cw_config"
	MapCounters  = "cw_counters"
	MapEvents    = "cw_events"
	MapVerdicts  = "cw_verdicts"
)

// Listener kinds: which proxy socket a redirected flow is assigned to.
const (
	ListenerTCP    = uint8(datapathListenerLISTENER_TCP)
	ListenerUDP    = uint8(datapathListenerLISTENER_UDP)
	ListenerDNSUDP = uint8(datapathListenerLISTENER_DNS_UDP)
	ListenerDNSTCP = uint8(datapathListenerLISTENER_DNS_TCP)
)

// RuleKeyFixedBits is the part of a rule key's prefix that is matched
// exactly (sandbox, generation, family, protocol, port).
const RuleKeyFixedBits = 80

// Options size and place the datapath. Zero values take the defaults
// compiled into the object.
type Options struct {
	// PinRoot is the bpffs directory for pins. Required.
	PinRoot string
	// MaxSandboxes, MaxRules, MaxCounters size the maps. Changing a size
	// of an already pinned map is refused (ErrMapIncompatible): unpin first.
	MaxSandboxes uint32
	MaxRules     uint32
	MaxCounters  uint32
	// MaxVerdicts sizes the verdict cache (LRU; default 65536).
	MaxVerdicts uint32
	// EventRingBytes is the deny-event ring buffer size (power of two).
	EventRingBytes uint32
}

// Datapath is the loaded programs and pinned maps.
type Datapath struct {
	objs    datapathObjects
	pinRoot string
}

// ErrMapFull is returned when a rule or sandbox update does not fit.
var ErrMapFull = errors.New("datapath map is full")

// Load loads the programs and opens (or creates and pins) the maps.
func Load(opts Options) (*Datapath, error) {
	if opts.PinRoot == "" {
		return nil, errors.New("bpf: pin root is required")
	}
	if err := EnsureBPFFS(opts.PinRoot); err != nil {
		return nil, err
	}
	for _, dir := range []string{"maps", "links"} {
		if err := os.MkdirAll(filepath.Join(opts.PinRoot, dir), 0o700); err != nil {
			return nil, fmt.Errorf("creating pin directory: %w", err)
		}
	}
	spec, err := loadDatapath()
	if err != nil {
		return nil, fmt.Errorf("loading datapath spec: %w", err)
	}
	for name, size := range map[string]uint32{
		MapSandboxes: opts.MaxSandboxes,
		MapFlowRate:  opts.MaxSandboxes,
		MapRules:     opts.MaxRules,
		MapCounters:  opts.MaxCounters,
		MapEvents:    opts.EventRingBytes,
		MapVerdicts:  opts.MaxVerdicts,
	} {
		if size != 0 {
			spec.Maps[name].MaxEntries = size
		}
	}
	d := &Datapath{pinRoot: opts.PinRoot}
	err = spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{
		Maps: ebpf.MapOptions{PinPath: filepath.Join(opts.PinRoot, "maps")},
	})
	if err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("loading datapath: verifier: %+v", verr)
		}
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("loading datapath: pinned maps under %s do not match this build or its sizes (remove them to start over): %w", opts.PinRoot, err)
		}
		return nil, fmt.Errorf("loading datapath: %w", err)
	}
	return d, nil
}

// EnsureBPFFS makes sure dir lives on a bpffs. Under /sys/fs/bpf it mounts
// bpffs at /sys/fs/bpf when that is not one (sysfs refuses mkdir; `ip netns
// exec` remounts /sys, so the mount can be missing); elsewhere it mounts a
// bpffs on dir itself.
func EnsureBPFFS(dir string) error {
	dir = filepath.Clean(dir)
	if dir == sysBPF || strings.HasPrefix(dir, sysBPF+"/") {
		if !isBPFFS(sysBPF) {
			if err := unix.Mount("bpf", sysBPF, "bpf", 0, "mode=0700"); err != nil {
				return fmt.Errorf("mounting bpffs at %s: %w", sysBPF, err)
			}
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("creating %s: %w", dir, err)
		}
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating bpffs directory %s: %w", dir, err)
	}
	if isBPFFS(dir) {
		return nil
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mounting bpffs at %s: %w", dir, err)
	}
	return nil
}

const sysBPF = "/sys/fs/bpf"

func isBPFFS(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && st.Type == unix.BPF_FS_MAGIC
}

// Close releases this process's handles. Pins stay: enforcement continues.
func (d *Datapath) Close() error { return d.objs.Close() }

// PinRoot is the bpffs directory holding the pins.
func (d *Datapath) PinRoot() string { return d.pinRoot }

// RemovePins deletes every pin (maps and links) under the pin root. Links
// removed this way detach their programs: only for a full uninstall.
func (d *Datapath) RemovePins() error {
	var errs []error
	for _, dir := range []string{"links", "maps"} {
		entries, _ := os.ReadDir(filepath.Join(d.pinRoot, dir))
		for _, e := range entries {
			if err := os.Remove(filepath.Join(d.pinRoot, dir, e.Name())); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// SandboxProgram is the program attached to sandbox veths (for tests and
// benchmarks that run it with BPF_PROG_TEST_RUN).
func (d *Datapath) SandboxProgram() *ebpf.Program { return d.objs.SandboxEgress }

// BridgeProgram is the program attached to bridge devices.
func (d *Datapath) BridgeProgram() *ebpf.Program { return d.objs.BridgeIngress }

// Config is the node-wide datapath configuration.
type Config struct {
	RedirectMark uint32    // skb mark of redirected packets; low 8 bits must be 0
	SocketMark   uint32    // SO_MARK carried by every proxy socket
	Ports        [4]uint16 // listener ports by Listener* kind; 0 = no listener
}

// SetConfig writes the node-wide configuration.
func (d *Datapath) SetConfig(c Config) error {
	if c.RedirectMark&0xff != 0 || c.RedirectMark == 0 {
		return fmt.Errorf("redirect mark %#x: must be non-zero with the low 8 bits clear", c.RedirectMark)
	}
	v := datapathConfig{RedirectMark: c.RedirectMark, SocketMark: c.SocketMark, Ports: c.Ports}
	if err := d.objs.CwConfig.Put(uint32(0), v); err != nil {
		return fmt.Errorf("writing datapath config: %w", err)
	}
	return nil
}

// ReadConfig reads the node-wide configuration back from the kernel.
func (d *Datapath) ReadConfig() (Config, error) {
	var v datapathConfig
	if err := d.objs.CwConfig.Lookup(uint32(0), &v); err != nil {
		return Config{}, fmt.Errorf("reading datapath config: %w", err)
	}
	return Config{RedirectMark: v.RedirectMark, SocketMark: v.SocketMark, Ports: v.Ports}, nil
}

// Sandbox is what the datapath knows about one sandbox interface.
type Sandbox struct {
	ID         uint32
	Generation uint32
	// Epoch must move forward on every change of the sandbox's rules
	// (cached verdicts are keyed by it). CLOCK_MONOTONIC ns is used: it only
	// grows within a boot, across daemon restarts and sandbox id reuse.
	Epoch                uint64
	Bridge               bool
	MAC                  net.HardwareAddr
	GatewayMAC           net.HardwareAddr
	IPv4                 netip.Addr // invalid: the sandbox has no IPv4
	GatewayIPv4          netip.Addr
	IPv6                 netip.Addr // invalid: the sandbox has no global IPv6
	IPv6LinkLocal        netip.Addr
	GatewayIPv6          netip.Addr
	GatewayIPv6LinkLocal netip.Addr
	Name                 string
}

func (s Sandbox) encode() (datapathSandbox, error) {
	var v datapathSandbox
	if s.ID == 0 {
		return v, errors.New("sandbox id 0 is reserved")
	}
	if len(s.MAC) != 6 || len(s.GatewayMAC) != 6 {
		return v, errors.New("sandbox and gateway MAC must be 6 bytes")
	}
	v.SandboxId = s.ID
	v.Generation = s.Generation
	v.Epoch = s.Epoch
	copy(v.Mac[:], s.MAC)
	copy(v.GatewayMac[:], s.GatewayMAC)
	if s.IPv4.IsValid() {
		if !s.IPv4.Is4() || !s.GatewayIPv4.Is4() {
			return v, errors.New("sandbox IPv4 needs an IPv4 gateway")
		}
		v.Flags |= uint32(datapathSandboxFlagsSANDBOX_HAS_IPV4)
		v.Ipv4 = s.IPv4.As4()
		v.GatewayIpv4 = s.GatewayIPv4.As4()
	}
	if s.IPv6.IsValid() {
		if !s.IPv6.Is6() || s.IPv6.Is4In6() {
			return v, errors.New("sandbox IPv6 address is not IPv6")
		}
		v.Flags |= uint32(datapathSandboxFlagsSANDBOX_HAS_IPV6)
		v.Ipv6 = s.IPv6.As16()
		if s.GatewayIPv6.IsValid() {
			v.GatewayIpv6 = s.GatewayIPv6.As16()
		}
	}
	if s.IPv6LinkLocal.IsValid() {
		v.Ipv6LinkLocal = s.IPv6LinkLocal.As16()
	}
	if s.GatewayIPv6LinkLocal.IsValid() {
		v.GatewayIpv6LinkLocal = s.GatewayIPv6LinkLocal.As16()
	}
	if s.Bridge {
		v.Flags |= uint32(datapathSandboxFlagsSANDBOX_BRIDGE_PORT)
	}
	for i := 0; i < len(v.Name)-1 && i < len(s.Name); i++ {
		v.Name[i] = int8(s.Name[i])
	}
	return v, nil
}

func decodeSandbox(v *datapathSandbox) Sandbox {
	s := Sandbox{
		ID:         v.SandboxId,
		Generation: v.Generation,
		Epoch:      v.Epoch,
		Bridge:     v.Flags&uint32(datapathSandboxFlagsSANDBOX_BRIDGE_PORT) != 0,
		MAC:        net.HardwareAddr(append([]byte(nil), v.Mac[:]...)),
		GatewayMAC: net.HardwareAddr(append([]byte(nil), v.GatewayMac[:]...)),
	}
	if v.Flags&uint32(datapathSandboxFlagsSANDBOX_HAS_IPV4) != 0 {
		s.IPv4 = netip.AddrFrom4(v.Ipv4)
		s.GatewayIPv4 = netip.AddrFrom4(v.GatewayIpv4)
	}
	if v.Flags&uint32(datapathSandboxFlagsSANDBOX_HAS_IPV6) != 0 {
		s.IPv6 = netip.AddrFrom16(v.Ipv6)
		s.GatewayIPv6 = netip.AddrFrom16(v.GatewayIpv6)
	}
	if a := netip.AddrFrom16(v.Ipv6LinkLocal); !a.IsUnspecified() {
		s.IPv6LinkLocal = a
	}
	if a := netip.AddrFrom16(v.GatewayIpv6LinkLocal); !a.IsUnspecified() {
		s.GatewayIPv6LinkLocal = a
	}
	var name strings.Builder
	for _, c := range v.Name {
		if c == 0 {
			break
		}
		name.WriteByte(byte(c))
	}
	s.Name = name.String()
	return s
}

// PutSandbox installs or replaces the sandbox entry of a host interface.
// The replacement is atomic: the program sees the old or the new entry.
func (d *Datapath) PutSandbox(ifindex int, s Sandbox) error {
	v, err := s.encode()
	if err != nil {
		return fmt.Errorf("sandbox %q: %w", s.Name, err)
	}
	if err := d.objs.CwSandboxes.Put(datapathSandboxKey{Ifindex: uint32(ifindex)}, v); err != nil {
		if errors.Is(err, unix.E2BIG) {
			return fmt.Errorf("writing sandbox entry: %w (max %d sandboxes)", ErrMapFull, d.objs.CwSandboxes.MaxEntries())
		}
		return fmt.Errorf("writing sandbox entry: %w", err)
	}
	return nil
}

// Sandbox reads the entry of one host interface.
func (d *Datapath) Sandbox(ifindex int) (Sandbox, error) {
	var v datapathSandbox
	if err := d.objs.CwSandboxes.Lookup(datapathSandboxKey{Ifindex: uint32(ifindex)}, &v); err != nil {
		return Sandbox{}, fmt.Errorf("reading sandbox entry of ifindex %d: %w", ifindex, err)
	}
	return decodeSandbox(&v), nil
}

// DeleteSandbox removes the entry; a missing entry is not an error.
func (d *Datapath) DeleteSandbox(ifindex int) error {
	err := d.objs.CwSandboxes.Delete(datapathSandboxKey{Ifindex: uint32(ifindex)})
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("deleting sandbox entry: %w", err)
	}
	return nil
}

// Sandboxes lists every sandbox entry by host ifindex.
func (d *Datapath) Sandboxes() (map[int]Sandbox, error) {
	out := map[int]Sandbox{}
	var k datapathSandboxKey
	var v datapathSandbox
	it := d.objs.CwSandboxes.Iterate()
	for it.Next(&k, &v) {
		out[int(k.Ifindex)] = decodeSandbox(&v)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("listing sandboxes: %w", err)
	}
	return out, nil
}

// OpenPinned opens the pinned maps under pinRoot without loading programs:
// enough to read sandboxes, rules and counters (for `cleanwall` commands
// that read what the kernel holds, and for tests while the daemon is down).
func OpenPinned(pinRoot string) (*Datapath, error) {
	d := &Datapath{pinRoot: pinRoot}
	maps := map[string]**ebpf.Map{
		MapSandboxes: &d.objs.CwSandboxes,
		MapRules:     &d.objs.CwRules,
		MapConfig:    &d.objs.CwConfig,
		MapCounters:  &d.objs.CwCounters,
		MapEvents:    &d.objs.CwEvents,
		MapVerdicts:  &d.objs.CwVerdicts,
	}
	for name, dst := range maps {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinRoot, "maps", name), nil)
		if err != nil {
			d.objs.Close()
			return nil, fmt.Errorf("opening pinned map %s: %w", name, err)
		}
		*dst = m
	}
	return d, nil
}
