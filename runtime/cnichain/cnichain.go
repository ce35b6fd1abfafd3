// Package cnichain attaches a network namespace through a CNI chain the way
// container runtimes do (libcni): a reference plugin (ptp or bridge, with
// host-local IPAM) and then cleanwall-cni. `cleanwall run` and the test
// harness use it; it must be called from the namespace that plays the node.
package cnichain

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
)

// DefaultPluginDirs are searched for the CNI reference plugins.
var DefaultPluginDirs = []string{"/usr/lib/cni", "/opt/cni/bin"}

// Options describe the chain.
type Options struct {
	// Name is the CNI network name (host-local keys its allocations by it).
	Name string
	// Chain is "ptp" (default) or "bridge".
	Chain  string
	Bridge string // bridge device for Chain "bridge" (default cw0)
	Subnet netip.Prefix
	// Subnet6 adds IPv6 addresses when valid.
	Subnet6 netip.Prefix
	// PolicyFile and Socket configure cleanwall-cni. With Cleanwall false the
	// chain stops after the reference plugin (a "direct" baseline).
	Cleanwall  bool
	PolicyFile string
	Socket     string
	// ExtraConf adds raw fields to cleanwall-cni's conf.
	ExtraConf map[string]any
	// PluginDirs is CNI_PATH. CacheDir and IPAMDir hold libcni's cache and
	// host-local's allocations (shared between concurrent users on purpose:
	// host-local locks its directory and hands out distinct addresses).
	PluginDirs []string
	CacheDir   string
	IPAMDir    string
}

// ConfList renders the conflist. The reference plugins from Debian speak CNI
// up to 1.0.0, so the list declares 1.0.0.
func ConfList(o Options) ([]byte, error) {
	if !o.Subnet.IsValid() {
		return nil, errors.New("cni chain: a subnet is required")
	}
	ranges := []any{[]any{map[string]any{"subnet": o.Subnet.String()}}}
	routes := []any{map[string]any{"dst": "0.0.0.0/0"}}
	if o.Subnet6.IsValid() {
		ranges = append(ranges, []any{map[string]any{"subnet": o.Subnet6.String()}})
		routes = append(routes, map[string]any{"dst": "::/0"})
	}
	ipam := map[string]any{"type": "host-local", "ranges": ranges, "routes": routes}
	if o.IPAMDir != "" {
		ipam["dataDir"] = o.IPAMDir
	}
	var first map[string]any
	switch o.Chain {
	case "", "ptp":
		first = map[string]any{"type": "ptp", "ipMasq": false, "ipam": ipam}
	case "bridge":
		br := o.Bridge
		if br == "" {
			br = "cw0"
		}
		first = map[string]any{"type": "bridge", "bridge": br, "isGateway": true, "ipMasq": false, "ipam": ipam}
	default:
		return nil, fmt.Errorf("cni chain: %q: want ptp or bridge", o.Chain)
	}
	plugins := []any{first}
	if o.Cleanwall {
		cw := map[string]any{"type": "cleanwall-cni"}
		if o.PolicyFile != "" {
			cw["policy"] = o.PolicyFile
		}
		if o.Socket != "" {
			cw["socket"] = o.Socket
		}
		for k, v := range o.ExtraConf {
			cw[k] = v
		}
		plugins = append(plugins, cw)
	}
	return json.Marshal(map[string]any{"cniVersion": "1.0.0", "name": o.Name, "plugins": plugins})
}

// FindPlugins checks that every plugin the chain needs is in dirs.
func FindPlugins(dirs []string, names ...string) error {
	var missing []string
	for _, n := range names {
		found := false
		for _, d := range dirs {
			if fi, err := os.Stat(filepath.Join(d, n)); err == nil && fi.Mode().IsRegular() {
				found = true
				break
			}
		}
		if !found {
			missing = append(missing, n)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("CNI plugin(s) %s not found in %s (install Debian's containernetworking-plugins, or pass --cni-bin-dir)",
			strings.Join(missing, ", "), strings.Join(dirs, ":"))
	}
	return nil
}

// Plugins lists the plugin binaries a chain needs.
func (o Options) Plugins() []string {
	first := "ptp"
	if o.Chain == "bridge" {
		first = "bridge"
	}
	p := []string{first, "host-local"}
	if o.Cleanwall {
		p = append(p, "cleanwall-cni")
	}
	return p
}

// Attachment is a namespace attached through the chain.
type Attachment struct {
	ContainerID string
	NetNS       string
	IfName      string
	Result      *current.Result
	// IPv4 and IPv6 are the sandbox's addresses (invalid when absent).
	IPv4, IPv6 netip.Addr
	MAC        net.HardwareAddr

	list *libcni.NetworkConfigList
	rt   *libcni.RuntimeConf
	cni  *libcni.CNIConfig
}

// Add runs CNI ADD for the namespace. On failure it runs DEL, as a runtime
// does, and returns the ADD error.
func Add(ctx context.Context, o Options, containerID, netnsPath, ifName string, args [][2]string) (*Attachment, error) {
	conf, err := ConfList(o)
	if err != nil {
		return nil, err
	}
	list, err := libcni.ConfListFromBytes(conf)
	if err != nil {
		return nil, fmt.Errorf("cni chain: %w", err)
	}
	a := &Attachment{
		ContainerID: containerID, NetNS: netnsPath, IfName: ifName, list: list,
		rt:  &libcni.RuntimeConf{ContainerID: containerID, NetNS: netnsPath, IfName: ifName, Args: args},
		cni: libcni.NewCNIConfigWithCacheDir(o.PluginDirs, o.CacheDir, nil),
	}
	res, err := a.cni.AddNetworkList(ctx, list, a.rt)
	if err != nil {
		_ = a.Del(context.WithoutCancel(ctx))
		return nil, err
	}
	if err := a.setResult(res); err != nil {
		_ = a.Del(context.WithoutCancel(ctx))
		return nil, err
	}
	return a, nil
}

func (a *Attachment) setResult(res types.Result) error {
	r, err := current.NewResultFromResult(res)
	if err != nil {
		return fmt.Errorf("cni chain: result: %w", err)
	}
	a.Result = r
	for _, ip := range r.IPs {
		addr, ok := netip.AddrFromSlice(ip.Address.IP)
		if !ok {
			continue
		}
		if addr = addr.Unmap(); addr.Is4() {
			a.IPv4 = addr
		} else {
			a.IPv6 = addr
		}
	}
	for _, iface := range r.Interfaces {
		if iface.Sandbox != "" && iface.Name == a.IfName {
			a.MAC, _ = net.ParseMAC(iface.Mac)
		}
	}
	return nil
}

// Del runs CNI DEL (idempotent).
func (a *Attachment) Del(ctx context.Context) error {
	return a.cni.DelNetworkList(ctx, a.list, a.rt)
}

// Check runs CNI CHECK.
func (a *Attachment) Check(ctx context.Context) error {
	return a.cni.CheckNetworkList(ctx, a.list, a.rt)
}

// HostInterface is the host-side veth of the attachment.
func (a *Attachment) HostInterface() string {
	for _, iface := range a.Result.Interfaces {
		if iface.Sandbox == "" && strings.HasPrefix(iface.Name, "veth") {
			return iface.Name
		}
	}
	return ""
}

// Gateway is the first host-side interface of the result: the ptp veth or
// the bridge (whose MAC the sandbox addresses its frames to).
func (a *Attachment) Gateway() string {
	for _, iface := range a.Result.Interfaces {
		if iface.Sandbox == "" {
			return iface.Name
		}
	}
	return ""
}

// DelCached runs CNI DEL for an attachment whose Attachment value is gone
// with its owner (a killed `cleanwall run`), as a runtime does after a
// crash: with the configuration libcni cached at ADD when there is one
// (what the plugins were really given), else with ConfList(o) (the owner
// died before ADD completed: host-local may hold an address all the same).
// An empty netnsPath tells the plugins the namespace is gone. It reports
// whether a cache entry existed.
func DelCached(ctx context.Context, o Options, containerID, netnsPath, ifName string) (cached bool, err error) {
	conf, err := ConfList(o)
	if err != nil {
		return false, err
	}
	list, err := libcni.ConfListFromBytes(conf)
	if err != nil {
		return false, fmt.Errorf("cni chain: %w", err)
	}
	// The plugins' stderr (cleanwall-cni's "daemon not reachable", expected
	// here) is kept for the error, not passed through.
	var stderr bytes.Buffer
	cni := libcni.NewCNIConfigWithCacheDir(o.PluginDirs, o.CacheDir, &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: &stderr}})
	rt := &libcni.RuntimeConf{ContainerID: containerID, NetNS: netnsPath, IfName: ifName}
	if b, crt, err := cni.GetNetworkListCachedConfig(list, rt); err == nil && b != nil {
		if l, err := libcni.ConfListFromBytes(b); err == nil {
			list, rt, cached = l, crt, true
		}
	}
	if err := cni.DelNetworkList(ctx, list, rt); err != nil {
		if msg := strings.TrimSpace(stderr.String()); msg != "" {
			err = fmt.Errorf("%w (plugin stderr: %s)", err, msg)
		}
		return cached, fmt.Errorf("cni chain: DEL %s/%s: %w", containerID, ifName, err)
	}
	return cached, nil
}

// CachedAttachment is an entry of libcni's cache.
type CachedAttachment struct {
	Network, ContainerID, IfName, NetNS string
	// Config is the conflist the attachment was added with.
	Config []byte
}

// CachedAttachments lists the entries of libcni's cache in cacheDir.
func CachedAttachments(cacheDir string) ([]CachedAttachment, error) {
	atts, err := libcni.NewCNIConfigWithCacheDir(nil, cacheDir, nil).GetCachedAttachments("")
	if err != nil {
		return nil, fmt.Errorf("cni chain: reading the cache: %w", err)
	}
	out := make([]CachedAttachment, 0, len(atts))
	for _, a := range atts {
		out = append(out, CachedAttachment{Network: a.Network, ContainerID: a.ContainerID, IfName: a.IfName, NetNS: a.NetNS, Config: a.Config})
	}
	return out, nil
}
