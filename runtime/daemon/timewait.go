package daemon

import (
	"fmt"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/proxies/tproxy"
)

// steerTimeWait attaches the datapath's time-wait steering to the TCP proxy
// listeners (see bpf.Steering and docs/datapath.md): a sandbox that reuses
// the 4-tuple of a flow whose proxy socket is in TIME_WAIT (the server
// closed first) gets a new flow at once, as on a direct connection, instead
// of a SYN the kernel drops. Detached when the daemon stops, with the
// listeners.
func (d *Daemon) steerTimeWait() error {
	var ls []bpf.SteeringListener
	for _, g := range []struct {
		kind uint8
		l    *tproxy.TCPListener
	}{{bpf.ListenerTCP, d.tcp}, {bpf.ListenerDNSTCP, d.dnsTCP}} {
		if g.l == nil {
			continue
		}
		for _, l := range g.l.Listeners() {
			ls = append(ls, bpf.SteeringListener{Kind: g.kind, Conn: l})
		}
	}
	s, err := d.dp.AttachSteering(ls)
	if err != nil {
		return fmt.Errorf("attaching the time-wait steering: %w", err)
	}
	d.goBackground(func() {
		<-d.ctx.Done()
		s.Close()
	})
	return nil
}
