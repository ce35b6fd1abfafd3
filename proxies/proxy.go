package proxies

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"sync"

	"github.com/cleanwall/cleanwall/policy"
)

// A privacy proxy serves the flows of the egress rules of one mode and one
// protocol: the firewall (cleanwalld) accepts each flow the datapath
// redirected, decides which rule it falls under, and hands it to the proxy
// registered for that rule's (mode, protocol). The proxy owns the flow from
// then on. This file is the whole contract between them: proxies never see
// the daemon, the datapath or the key broker.

// Key names a privacy proxy: the mode of the rules it serves ("open",
// "trusted", "secure") and the protocol it speaks with the sandbox (open
// rules: open.protocol, "tcp" by default; "udp" for the UDP ports of open
// rules; secure rules: secure.protocol). DNS is served under DNSKey for
// every port-53 flow, whatever its destination.
type Key struct {
	Mode     string
	Protocol string
}

func (k Key) String() string { return k.Mode + "/" + k.Protocol }

// DNSKey is the key of the DNS proxy.
var DNSKey = Key{Mode: "dns", Protocol: "dns"}

// KeyOf is the key of the proxy that serves rule r's flows over transport
// ("tcp" or "udp").
func KeyOf(r *policy.Rule, transport string) Key {
	mode := r.Mode.String()
	if transport == "udp" {
		return Key{Mode: mode, Protocol: "udp"}
	}
	switch {
	case r.Spec.Open != nil && r.Spec.Open.Protocol != "":
		return Key{Mode: mode, Protocol: r.Spec.Open.Protocol}
	case r.Spec.Secure != nil && r.Spec.Secure.Protocol != "":
		return Key{Mode: mode, Protocol: r.Spec.Secure.Protocol}
	case r.Spec.Trusted != nil && r.Spec.Trusted.HPKE != nil:
		return Key{Mode: mode, Protocol: "http"}
	}
	return Key{Mode: mode, Protocol: "tcp"}
}

// Flow is one redirected flow, as a proxy receives it.
type Flow struct {
	// Sandbox is the sandbox's id (its CNI container ID); Attachment names
	// the attachment the flow came through (container ID/interface: one
	// sandbox may have several).
	Sandbox, Attachment string
	// Rule is the egress rule the flow falls under, as compiled (nil for
	// DNS); Config is what the proxy's Configure returned for it.
	Rule   *policy.Rule
	Config any
	// Src is the sandbox's end of the flow, Dst its original destination.
	Src, Dst netip.AddrPort
	// Hosts are the names the destination may be called by: the fqdns the
	// sandbox resolved it from through the DNS proxy, or its literal IP for
	// a cidr rule.
	Hosts []string
	// Keys holds the data keys of a secure rule (nil otherwise).
	Keys KeySource
	// Report receives what the proxy has to tell (never nil).
	Report Reporter
}

// Mode is the flow's rule's mode ("dns" for DNS flows).
func (f *Flow) Mode() string {
	if f.Rule == nil {
		return DNSKey.Mode
	}
	return f.Rule.Mode.String()
}

// RuleName is the flow's rule's name ("" for DNS flows).
func (f *Flow) RuleName() string {
	if f.Rule == nil {
		return ""
	}
	return f.Rule.Name
}

// KeySource gives secure-mode proxies the data keys the key broker
// released to this node: the current version to seal with, any version
// to open with. Keys live in memory only.
type KeySource interface {
	// Current returns the newest version of key id.
	Current(id string) (DataKey, error)
	// Version returns version v of key id (for opening what an older
	// version sealed).
	Version(id string, v int) (DataKey, error)
}

// DataKey is one version of a data key.
type DataKey struct {
	ID      string
	Version int
	Key     []byte // 32 bytes
}

// ErrNoKey is returned by a KeySource that holds no such key (version).
var ErrNoKey = errors.New("data key not held")

// Reporter is how a proxy tells the firewall what happened in a flow.
// Calls must not block for long; they may come from any goroutine.
type Reporter interface {
	// Bytes adds bytes proxied: out from the sandbox to the destination,
	// in back.
	Bytes(out, in int64)
	// Deny reports a refusal inside the flow (an HTTP request, a DNS
	// query, a statement): counted, audited, streamed to observers.
	Deny(d Denial)
}

// Denial is one refusal inside a flow. Fields carry no payload data.
type Denial struct {
	Reason string // a short, bounded token: "method", "pattern", "no-rule", ...
	Status int    // the status the sandbox got (HTTP), 0 when none
	Method string // request method, when there is one and it is safe to keep
	Path   string // request path or DNS name, when safe to keep
	Detail string // anything else bounded and safe (a DNS query type, say)
}

// End says how a flow ended (the result label of the flows metric).
type End string

const (
	EndClosed  End = "closed"          // either side closed it
	EndIdle    End = "idle"            // idle timeout
	EndBudget  End = "budget-exceeded" // a byte budget ran out
	EndRevoked End = "policy-closed"   // the context was canceled: revoked
	EndError   End = "error"           // anything else (Err says what)
)

// Result is what a flow came to.
type Result struct {
	End End
	Err error
}

// Configurer turns one egress rule of a compiled policy into a proxy's
// configuration for it, at policy check (CNI ADD, policy apply): a rule a
// proxy cannot serve is refused there, with an error naming the field,
// never at flow time. The result is handed back in Flow.Config.
type Configurer interface {
	Configure(r *policy.Rule) (any, error)
}

// StreamProxy serves TCP flows.
type StreamProxy interface {
	Configurer
	// ServeStream owns c (the sandbox's accepted connection, its local
	// address the original destination) until the flow ends or ctx is done
	// (the policy no longer allows the flow, the sandbox was deleted, the
	// key was revoked, the daemon stops). It closes c before returning.
	ServeStream(ctx context.Context, c net.Conn, f *Flow) Result
}

// PacketProxy serves UDP flows: the firewall keeps one flow per sandbox
// address and original destination, opens it at its first datagram and
// hands it every datagram after.
type PacketProxy interface {
	Configurer
	// OpenPacketFlow starts serving a flow; reply sends a datagram back to
	// the sandbox, from the original destination. The flow ends when ctx is
	// done or when the proxy ends it (PacketFlow.Done).
	OpenPacketFlow(ctx context.Context, f *Flow, reply func([]byte) error) (PacketFlow, error)
}

// PacketFlow is one open UDP flow of a PacketProxy.
type PacketFlow interface {
	// Datagram hands the flow one datagram of the sandbox's (the proxy may
	// keep p). It must not block for long.
	Datagram(p []byte)
	// Done is closed when the flow has ended; Result then says how.
	Done() <-chan struct{}
	Result() Result
}

// Registry maps keys to proxies. It is built before the daemon serves and
// read-only after; Configure checks a whole policy against it.
type Registry struct {
	mu      sync.RWMutex
	streams map[Key]StreamProxy
	packets map[Key]PacketProxy
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{streams: map[Key]StreamProxy{}, packets: map[Key]PacketProxy{}}
}

// AddStream registers p for k's TCP flows; a key registered twice is an
// error (two extensions of one name, say).
func (g *Registry) AddStream(k Key, p StreamProxy) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, dup := g.streams[k]; dup {
		return fmt.Errorf("a stream proxy for %s is registered already", k)
	}
	g.streams[k] = p
	return nil
}

// AddPacket registers p for k's UDP flows.
func (g *Registry) AddPacket(k Key, p PacketProxy) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, dup := g.packets[k]; dup {
		return fmt.Errorf("a packet proxy for %s is registered already", k)
	}
	g.packets[k] = p
	return nil
}

// Stream returns the proxy of k's TCP flows.
func (g *Registry) Stream(k Key) (StreamProxy, bool) {
	g.mu.RLock()
	defer g.mu.RUnlock()
	p, ok := g.streams[k]
	return p, ok
}

// Packet returns the proxy of k's UDP flows.
func (g *Registry) Packet(k Key) (PacketProxy, bool) {
	g.mu.RLock()
	defer g.mu.RUnlock()
	p, ok := g.packets[k]
	return p, ok
}

// Keys lists what is registered ("open/http (stream)", ...), sorted.
func (g *Registry) Keys() []string {
	g.mu.RLock()
	defer g.mu.RUnlock()
	var out []string
	for k := range g.streams {
		out = append(out, k.String()+" (stream)")
	}
	for k := range g.packets {
		out = append(out, k.String()+" (packet)")
	}
	sort.Strings(out)
	return out
}

// RuleConfigs are the proxies' configurations of a compiled policy's
// rules, by rule and transport.
type RuleConfigs map[RuleTransport]any

// RuleTransport is one rule over one transport ("tcp" or "udp").
type RuleTransport struct {
	Rule      *policy.Rule
	Transport string
}

// Configure checks every rule of c against the registry: each transport a
// rule's ports use needs a registered proxy, and that proxy's Configure
// must accept the rule. Errors name the rule's field path.
func (g *Registry) Configure(c *policy.Compiled) (RuleConfigs, error) {
	out := RuleConfigs{}
	var errs []error
	for _, r := range c.Rules {
		path := r.Path
		for _, transport := range transports(r) {
			k := KeyOf(r, transport)
			var conf Configurer
			if transport == "udp" {
				p, ok := g.Packet(k)
				if !ok {
					errs = append(errs, fmt.Errorf("%s.ports: no privacy proxy serves UDP for mode %s in this cleanwalld", path, k.Mode))
					continue
				}
				conf = p
			} else {
				p, ok := g.Stream(k)
				if !ok {
					errs = append(errs, fmt.Errorf("%s: no privacy proxy for mode %s, protocol %s in this cleanwalld (it has: %v)", path, k.Mode, k.Protocol, g.Keys()))
					continue
				}
				conf = p
			}
			cfg, err := conf.Configure(r)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", path, err))
				continue
			}
			out[RuleTransport{r, transport}] = cfg
		}
	}
	return out, errors.Join(errs...)
}

// transports lists the transports rule r's ports use, TCP first.
func transports(r *policy.Rule) []string {
	var tcp, udp bool
	for _, p := range r.Ports {
		if p.Proto == policy.ProtoUDP {
			udp = true
		} else {
			tcp = true
		}
	}
	var out []string
	if tcp {
		out = append(out, "tcp")
	}
	if udp {
		out = append(out, "udp")
	}
	return out
}

// Refused is implemented by the error a proxy ends a flow with when it
// refused the flow as a whole (and reset it): the flows metric counts the
// flow under RefusalReason (a short, bounded token) instead of an end.
type Refused interface {
	error
	RefusalReason() string
}

// RefusalOf returns the refusal reason err carries, if any.
func RefusalOf(err error) (string, bool) {
	var r Refused
	if err != nil && errors.As(err, &r) {
		return r.RefusalReason(), true
	}
	return "", false
}

// EndFor names the End of a flow that ended with Err (errors.Is).
type EndFor struct {
	Err error
	End End
}

// ResultOf is how a stream ended, mapped the way every proxy does: revoked
// when ctx is done (Err is its cause), closed without an error, otherwise
// the End of the first of ends that err matches, otherwise EndError.
func ResultOf(ctx context.Context, err error, ends ...EndFor) Result {
	switch {
	case ctx.Err() != nil:
		return Result{End: EndRevoked, Err: context.Cause(ctx)}
	case err == nil:
		return Result{End: EndClosed}
	}
	for _, e := range ends {
		if errors.Is(err, e.Err) {
			return Result{End: e.End, Err: err}
		}
	}
	return Result{End: EndError, Err: err}
}

// RefusalError is a Refused error for proxies that need no type of their
// own: the flow was refused as a whole for Reason, Err says how.
type RefusalError struct {
	Reason string
	Err    error
}

func (e *RefusalError) Error() string         { return e.Reason + ": " + e.Err.Error() }
func (e *RefusalError) Unwrap() error         { return e.Err }
func (e *RefusalError) RefusalReason() string { return e.Reason }
