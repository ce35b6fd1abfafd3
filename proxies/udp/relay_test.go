package udp

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

type report struct {
	mu      sync.Mutex
	out, in int64
}

func (r *report) Bytes(out, in int64) {
	r.mu.Lock()
	r.out += out
	r.in += in
	r.mu.Unlock()
}
func (r *report) Deny(proxies.Denial) {}
func (r *report) get() (int64, int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.out, r.in
}

// echo is a UDP destination on loopback answering each datagram with
// "re:" and the datagram.
func echo(t *testing.T) netip.AddrPort {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = c.WriteToUDPAddrPort(append([]byte("re:"), buf[:n]...), from)
		}
	}()
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

func TestRelayRoundTripAndIdle(t *testing.T) {
	dst := echo(t)
	r := &Relay{IdleTimeout: 200 * time.Millisecond}
	rep := &report{}
	replies := make(chan string, 4)
	fl, err := r.OpenPacketFlow(context.Background(), &proxies.Flow{Dst: dst, Report: rep}, func(p []byte) error {
		replies <- string(p)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	fl.Datagram([]byte("hello"))
	select {
	case got := <-replies:
		if got != "re:hello" {
			t.Fatalf("reply %q", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no reply")
	}
	select {
	case <-fl.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("an idle flow did not end")
	}
	if res := fl.Result(); res.End != proxies.EndIdle {
		t.Fatalf("result %+v, want idle", res)
	}
	if out, in := rep.get(); out != 5 || in != 8 {
		t.Fatalf("bytes out %d in %d, want 5 and 8", out, in)
	}
	fl.Datagram([]byte("after")) // an ended flow takes nothing
	if out, _ := rep.get(); out != 5 {
		t.Fatalf("an ended flow sent a datagram (out %d)", out)
	}
}

func TestRelayRevoked(t *testing.T) {
	dst := echo(t)
	ctx, cancel := context.WithCancelCause(context.Background())
	fl, err := (&Relay{}).OpenPacketFlow(ctx, &proxies.Flow{Dst: dst, Report: &report{}}, func([]byte) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	cause := errors.New("policy changed")
	cancel(cause)
	select {
	case <-fl.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("a revoked flow did not end")
	}
	if res := fl.Result(); res.End != proxies.EndRevoked || !errors.Is(res.Err, cause) {
		t.Fatalf("result %+v, want revoked with the cause", res)
	}
}

func TestRelayConfigure(t *testing.T) {
	if _, err := (&Relay{}).Configure(&policy.Rule{Mode: policy.ModeOpen}); err != nil {
		t.Fatal(err)
	}
	if _, err := (&Relay{}).Configure(&policy.Rule{Mode: policy.ModeSecure}); err == nil {
		t.Fatal("a secure rule's UDP was configured")
	}
}
