package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// maps lists the loaded maps by pin name.
func (d *Datapath) maps() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{
		MapSandboxes: d.objs.CwSandboxes,
		MapRules:     d.objs.CwRules,
		MapConfig:    d.objs.CwConfig,
		MapCounters:  d.objs.CwCounters,
		MapEvents:    d.objs.CwEvents,
		MapVerdicts:  d.objs.CwVerdicts,
		MapSteer:     d.objs.CwSteer,
		MapListeners: d.objs.CwListeners,
		MapFlowRate:  d.objs.CwFlowRate,
		MapUDPFlows:  d.objs.CwUdpFlows,
	}
}

// RepinMaps pins again every map whose pin file is gone (an operator's rm,
// a bug): the daemon still holds the maps, and without their pins the next
// daemon would start from empty maps. It returns the names it re-pinned.
func (d *Datapath) RepinMaps() ([]string, error) {
	var repinned []string
	var errs []error
	for name, m := range d.maps() {
		if m == nil {
			continue
		}
		path := filepath.Join(d.pinRoot, "maps", name)
		if _, err := os.Stat(path); err == nil || !errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			errs = append(errs, err)
			continue
		}
		// The map remembers its old pin path: forget it, or Pin is a no-op.
		_ = m.Unpin()
		if err := m.Pin(path); err != nil {
			errs = append(errs, fmt.Errorf("re-pinning %s: %w", name, err))
			continue
		}
		repinned = append(repinned, name)
	}
	return repinned, errors.Join(errs...)
}
