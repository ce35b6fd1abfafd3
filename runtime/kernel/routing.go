package kernel

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RedirectMask is the part of the redirect mark that the fwmark rule and
// the nftables wall match: the low 8 bits carry the listener kind.
const RedirectMask = 0xffffff00

// Routing is the node-side half of the redirect: packets carrying the
// redirect mark are routed to the local table, where the socket the
// datapath assigned receives them.
type Routing struct {
	Mark, Mask uint32
	Table      int
	Priority   int
}

// Rule is the fwmark rule of a family.
func (r Routing) Rule(family int) *netlink.Rule {
	rule := netlink.NewRule()
	rule.Family = family
	rule.Mark = r.Mark
	rule.Mask = &r.Mask
	rule.Table = r.Table
	rule.Priority = r.Priority
	return rule
}

// Route is the local route of a family.
func (r Routing) Route(family int) *netlink.Route {
	dst := &net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)}
	if family == unix.AF_INET6 {
		dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	lo, _ := netlink.LinkByName("lo")
	idx := 1
	if lo != nil {
		idx = lo.Attrs().Index
	}
	return &netlink.Route{
		Family:    family,
		Dst:       dst,
		Type:      unix.RTN_LOCAL,
		Scope:     unix.RT_SCOPE_HOST,
		Table:     r.Table,
		LinkIndex: idx,
	}
}

func (r Routing) hasRule(family int) (bool, error) {
	rules, err := netlink.RuleList(family)
	if err != nil {
		return false, err
	}
	for _, x := range rules {
		if x.Table == r.Table && x.Mark == r.Mark && x.Mask != nil && *x.Mask == r.Mask && x.Priority == r.Priority {
			return true, nil
		}
	}
	return false, nil
}

// Install adds the rule and route for IPv4 and IPv6, idempotently. It
// reports which families were installed; IPv6 is skipped where the
// namespace has IPv6 disabled (IPv6 sandboxes then only ever drop).
func (r Routing) Install() (v6 bool, err error) {
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		if err := netlink.RouteReplace(r.Route(family)); err != nil {
			if family == unix.AF_INET6 && (errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EACCES)) {
				return false, nil
			}
			return false, fmt.Errorf("adding local route to table %d (family %d): %w", r.Table, family, err)
		}
		ok, err := r.hasRule(family)
		if err != nil {
			return false, fmt.Errorf("listing ip rules: %w", err)
		}
		if !ok {
			if err := netlink.RuleAdd(r.Rule(family)); err != nil && !errors.Is(err, unix.EEXIST) {
				return false, fmt.Errorf("adding fwmark rule (family %d): %w", family, err)
			}
		}
	}
	return true, nil
}

// Remove deletes the rules and routes (used by `cleanwall run` for what it
// added itself, and by uninstall).
func (r Routing) Remove() error {
	var errs []error
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		if err := netlink.RuleDel(r.Rule(family)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EAFNOSUPPORT) {
			errs = append(errs, fmt.Errorf("deleting fwmark rule: %w", err))
		}
		if err := netlink.RouteDel(r.Route(family)); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.EAFNOSUPPORT) {
			errs = append(errs, fmt.Errorf("deleting local route: %w", err))
		}
	}
	return errors.Join(errs...)
}
