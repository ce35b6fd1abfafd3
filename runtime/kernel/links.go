// Package kernel holds the daemon's adapters to the node's kernel besides
// the BPF datapath (package bpf): netlink for interfaces and bridge ports
// (NetlinkLinks), the fwmark routing of redirected packets (Routing), and
// the nftables wall (NFTWall). runtime/enforce reaches them through its
// Links and Wall interfaces; runtime/fake stands in for them in tests.
package kernel

import (
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/runtime/enforce"
)

var _ enforce.Links = NetlinkLinks{}

// NetlinkLinks is Links over netlink, in the calling thread's namespace.
type NetlinkLinks struct{}

func toLink(l netlink.Link) enforce.Link {
	a := l.Attrs()
	return enforce.Link{Name: a.Name, Index: a.Index, Type: l.Type(), MasterIndex: a.MasterIndex, MAC: a.HardwareAddr}
}

// ByName looks an interface up by name.
func (NetlinkLinks) ByName(name string) (enforce.Link, error) {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return enforce.Link{}, err
	}
	return toLink(l), nil
}

// ByIndex looks an interface up by index.
func (NetlinkLinks) ByIndex(index int) (enforce.Link, error) {
	l, err := netlink.LinkByIndex(index)
	if err != nil {
		return enforce.Link{}, err
	}
	return toLink(l), nil
}

// SetIsolated sets IFLA_BRPORT_ISOLATED of a bridge port.
func (NetlinkLinks) SetIsolated(index int, on bool) error {
	l, err := netlink.LinkByIndex(index)
	if err != nil {
		return err
	}
	return netlink.LinkSetIsolated(l, on)
}

// Isolated reads it.
func (NetlinkLinks) Isolated(index int) (bool, error) {
	l, err := netlink.LinkByIndex(index)
	if err != nil {
		return false, err
	}
	pi, err := netlink.LinkGetProtinfo(l)
	if err != nil {
		return false, err
	}
	return pi.Isolated, nil
}

// LinkLocal reads the first IPv6 link-local address of a link.
func (NetlinkLinks) LinkLocal(nsPath, ifName string) (netip.Addr, bool) {
	var found netip.Addr
	read := func() error {
		l, err := netlink.LinkByName(ifName)
		if err != nil {
			return err
		}
		addrs, err := netlink.AddrList(l, unix.AF_INET6)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.IsLinkLocalUnicast() {
				found = ip
				return nil
			}
		}
		return nil
	}
	if nsPath == "" {
		_ = read()
	} else {
		_ = netns.Do(nsPath, read)
	}
	return found, found.IsValid()
}
