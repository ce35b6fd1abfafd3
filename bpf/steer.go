package bpf

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Map names of the time-wait steering (pinned under <root>/maps).
const (
	MapSteer     = "cw_steer"
	MapListeners = "cw_listeners"
)

// SteeringListener is a proxy listener that steer_listener may hand a SYN
// to: a listening TCP socket (IPv4 or IPv6) of kind ListenerTCP or
// ListenerDNSTCP.
type SteeringListener struct {
	Kind uint8
	Conn syscall.Conn
}

// Steering is steer_listener attached to the proxy listeners' network
// namespace. When a sandbox reuses the 4-tuple of a flow whose proxy socket
// is in TIME_WAIT, the tc programs hand its SYN to that socket so that the
// kernel retires it as it would for a direct connection, and note the
// 4-tuple in cw_steer; the listener lookup the kernel then makes for the
// original destination is answered by steer_listener with our listener.
// Without it attached such a SYN drops (reason time-wait): the tc programs
// probe it before every use. The link is not pinned: it lives as long as
// the listeners it steers to, i.e. the daemon.
type Steering struct {
	link link.Link
}

// AttachSteering writes the listeners into cw_listeners (one socket per
// family and kind: the kernel spreads over its SO_REUSEPORT group) and
// attaches steer_listener to their network namespace. A listener that
// closes leaves the map by itself.
func (d *Datapath) AttachSteering(listeners []SteeringListener) (*Steering, error) {
	if len(listeners) == 0 {
		return nil, errors.New("steering needs at least one proxy listener")
	}
	nsFD := -1
	defer func() {
		if nsFD >= 0 {
			unix.Close(nsFD)
		}
	}()
	for _, l := range listeners {
		if l.Kind != ListenerTCP && l.Kind != ListenerDNSTCP {
			return nil, fmt.Errorf("steering: listener kind %d is not a TCP listener", l.Kind)
		}
		rc, err := l.Conn.SyscallConn()
		if err != nil {
			return nil, fmt.Errorf("steering: %w", err)
		}
		var serr error
		err = rc.Control(func(fd uintptr) {
			domain, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN)
			if err != nil {
				serr = fmt.Errorf("reading the listener's family: %w", err)
				return
			}
			idx := uint32(l.Kind)
			if domain == unix.AF_INET6 {
				idx += 4
			}
			if err := d.objs.CwListeners.Update(idx, uint64(fd), ebpf.UpdateAny); err != nil {
				serr = fmt.Errorf("writing listener %d into %s: %w", idx, MapListeners, err)
				return
			}
			if nsFD < 0 {
				// The namespace the listeners live in, whatever thread runs this.
				if nsFD, err = unix.IoctlRetInt(int(fd), unix.SIOCGSKNS); err != nil {
					serr = fmt.Errorf("finding the listener's network namespace: %w", err)
				}
			}
		})
		if err = errors.Join(err, serr); err != nil {
			return nil, fmt.Errorf("steering: %w", err)
		}
	}
	l, err := link.AttachNetNs(nsFD, d.objs.SteerListener)
	if err != nil {
		return nil, fmt.Errorf("attaching the sk_lookup steering program: %w", err)
	}
	return &Steering{link: l}, nil
}

// Close detaches the program. Time-wait SYNs drop from then on.
func (s *Steering) Close() error { return s.link.Close() }

// SteeringProgram is the sk_lookup program (for tests with BPF_PROG_TEST_RUN).
func (d *Datapath) SteeringProgram() *ebpf.Program { return d.objs.SteerListener }
