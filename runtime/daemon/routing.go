package daemon

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// routing is the node-side half of the redirect: packets carrying the
// redirect mark are routed to the local table, where the socket the
// datapath assigned receives them.
type routing struct {
	mark, mask uint32
	table      int
	priority   int
}

func (r routing) rule(family int) *netlink.Rule {
	rule := netlink.NewRule()
	rule.Family = family
	rule.Mark = r.mark
	rule.Mask = &r.mask
	rule.Table = r.table
	rule.Priority = r.priority
	return rule
}

func (r routing) route(family int) *netlink.Route {
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
		Table:     r.table,
		LinkIndex: idx,
	}
}

func (r routing) hasRule(family int) (bool, error) {
	rules, err := netlink.RuleList(family)
	if err != nil {
		return false, err
	}
	for _, x := range rules {
		if x.Table == r.table && x.Mark == r.mark && x.Mask != nil && *x.Mask == r.mask && x.Priority == r.priority {
			return true, nil
		}
	}
	return false, nil
}

// install adds the rule and route for IPv4 and IPv6, idempotently. It
// reports which families were installed; IPv6 is skipped where the
// namespace has IPv6 disabled (IPv6 sandboxes then only ever drop).
func (r routing) install() (v6 bool, err error) {
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		if err := netlink.RouteReplace(r.route(family)); err != nil {
			if family == unix.AF_INET6 && (errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EACCES)) {
				return false, nil
			}
			return false, fmt.Errorf("adding local route to table %d (family %d): %w", r.table, family, err)
		}
		ok, err := r.hasRule(family)
		if err != nil {
			return false, fmt.Errorf("listing ip rules: %w", err)
		}
		if !ok {
			if err := netlink.RuleAdd(r.rule(family)); err != nil && !errors.Is(err, unix.EEXIST) {
				return false, fmt.Errorf("adding fwmark rule (family %d): %w", family, err)
			}
		}
	}
	return true, nil
}

// remove deletes the rules and routes (used by `cleanwall run` for what it
// added itself, and by uninstall).
func (r routing) remove() error {
	var errs []error
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		if err := netlink.RuleDel(r.rule(family)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EAFNOSUPPORT) {
			errs = append(errs, fmt.Errorf("deleting fwmark rule: %w", err))
		}
		if err := netlink.RouteDel(r.route(family)); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.EAFNOSUPPORT) {
			errs = append(errs, fmt.Errorf("deleting local route: %w", err))
		}
	}
	return errors.Join(errs...)
}
