// Package udp is the UDP relay of open-mode rules: one connected upstream
// socket per flow (a sandbox address and an original destination), the
// sandbox's datagrams written to it as they come, the destination's
// answers handed back to the firewall to send from the original
// destination. It inspects nothing: a UDP port of an open rule is an L4
// allowance. The flow ends when neither side has sent anything for
// IdleTimeout, or when the firewall revokes it.
package udp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

// DefaultIdleTimeout ends a flow neither side used for this long.
const DefaultIdleTimeout = 60 * time.Second

// maxDatagram is the largest UDP payload.
const maxDatagram = 65535

// Relay is the PacketProxy of open rules' UDP ports.
type Relay struct {
	// IdleTimeout: zero means DefaultIdleTimeout.
	IdleTimeout time.Duration
	// Dial opens the upstream socket; nil means net.DialUDP from the
	// node's namespace with the zero local address.
	Dial func(ctx context.Context, dst *net.UDPAddr) (*net.UDPConn, error)
}

var _ proxies.PacketProxy = (*Relay)(nil)

// Configure accepts an open rule (its UDP ports). There is nothing to
// configure: the relay's bounds are the firewall's flow limits.
func (r *Relay) Configure(rule *policy.Rule) (any, error) {
	if rule.Mode != policy.ModeOpen {
		return nil, fmt.Errorf("mode %s: UDP is relayed for open rules only", rule.Mode)
	}
	return nil, nil
}

func (r *Relay) idle() time.Duration {
	if r.IdleTimeout > 0 {
		return r.IdleTimeout
	}
	return DefaultIdleTimeout
}

// OpenPacketFlow dials the flow's original destination. reply sends the
// destination's datagrams back to the sandbox.
func (r *Relay) OpenPacketFlow(ctx context.Context, f *proxies.Flow, reply func([]byte) error) (proxies.PacketFlow, error) {
	dst := net.UDPAddrFromAddrPort(f.Dst)
	var (
		up  *net.UDPConn
		err error
	)
	if r.Dial != nil {
		up, err = r.Dial(ctx, dst)
	} else {
		up, err = net.DialUDP("udp", nil, dst)
	}
	if err != nil {
		return nil, err
	}
	fl := &flow{up: up, report: f.Report, done: make(chan struct{}), idle: r.idle()}
	fl.touch()
	stop := context.AfterFunc(ctx, func() { fl.end(proxies.Result{End: proxies.EndRevoked, Err: context.Cause(ctx)}) })
	go func() {
		defer stop()
		fl.readLoop(reply)
	}()
	return fl, nil
}

// flow is one relayed UDP flow.
type flow struct {
	up     *net.UDPConn
	report proxies.Reporter
	idle   time.Duration
	last   atomic.Int64 // unix nanoseconds of the last datagram either way

	once   sync.Once
	done   chan struct{}
	result proxies.Result
}

func (f *flow) touch() { f.last.Store(time.Now().UnixNano()) }

// Datagram writes one datagram of the sandbox's to the destination. A
// write that fails (the destination refused it, say) loses the datagram,
// as UDP would.
func (f *flow) Datagram(p []byte) {
	select {
	case <-f.done:
		return
	default:
	}
	f.touch()
	if n, err := f.up.Write(p); err == nil {
		f.report.Bytes(int64(n), 0)
	}
}

func (f *flow) Done() <-chan struct{} { return f.done }

// Result is valid once Done is closed.
func (f *flow) Result() proxies.Result { return f.result }

func (f *flow) end(res proxies.Result) {
	f.once.Do(func() {
		f.result = res
		f.up.Close()
		close(f.done)
	})
}

// readLoop hands the destination's datagrams back until the flow is idle,
// revoked, or the socket fails.
func (f *flow) readLoop(reply func([]byte) error) {
	buf := make([]byte, maxDatagram)
	for {
		_ = f.up.SetReadDeadline(time.Unix(0, f.last.Load()).Add(f.idle))
		n, err := f.up.Read(buf)
		if err != nil {
			var ne net.Error
			switch {
			case errors.Is(err, net.ErrClosed):
				f.end(proxies.Result{End: proxies.EndClosed})
				return
			case errors.As(err, &ne) && ne.Timeout():
				if time.Since(time.Unix(0, f.last.Load())) >= f.idle {
					f.end(proxies.Result{End: proxies.EndIdle})
					return
				}
				continue // the sandbox sent something meanwhile
			default:
				// ECONNREFUSED from an ICMP port unreachable, say: UDP
				// carries on (the next datagram may find a listener).
				if isRefused(err) {
					continue
				}
				f.end(proxies.Result{End: proxies.EndError, Err: err})
				return
			}
		}
		f.touch()
		if err := reply(buf[:n]); err == nil {
			f.report.Bytes(0, int64(n))
		}
	}
}

// isRefused reports an ICMP port or host unreachable surfaced on a
// connected UDP socket.
func isRefused(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH)
}
