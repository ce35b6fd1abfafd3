package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	dnsproxy "github.com/cleanwall/cleanwall/proxies/dns"
	"github.com/cleanwall/cleanwall/proxies/extension"
	httpproxy "github.com/cleanwall/cleanwall/proxies/http"
	pgproxy "github.com/cleanwall/cleanwall/proxies/postgres"
	"github.com/cleanwall/cleanwall/proxies/secure"
	tcpproxy "github.com/cleanwall/cleanwall/proxies/tcp"
	"github.com/cleanwall/cleanwall/proxies/tproxy"
	"github.com/cleanwall/cleanwall/proxies/trusted"
	udpproxy "github.com/cleanwall/cleanwall/proxies/udp"
	"github.com/cleanwall/cleanwall/runtime/dispatch"
	"github.com/cleanwall/cleanwall/runtime/enforce"
	"github.com/cleanwall/cleanwall/runtime/fqdn"
	"github.com/cleanwall/cleanwall/runtime/kernel"
	"github.com/cleanwall/cleanwall/runtime/keys"
	"github.com/cleanwall/cleanwall/runtime/limits"
	"github.com/cleanwall/cleanwall/runtime/metrics"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

// Daemon is a running cleanwalld.
type Daemon struct {
	cfg Config
	log *slog.Logger

	dp        *bpf.Datapath
	kernel    enforce.Datapath // dp, as the API reads it (a fake in tests)
	route     kernel.Routing
	wall      *kernel.NFTWall // the second, BPF-independent wall
	sandboxes *sandbox.Registry
	enforcer  *enforce.Enforcer
	learner   *fqdn.Learner
	dispatch  *dispatch.Dispatcher
	proxies   *proxies.Registry
	dns       *dnsproxy.Proxy
	exts      []*extension.Proxy
	keys      *keys.Ring // nil without a key broker
	consent   *consentGate
	vols      volumeRegistry
	metrics   *metrics.Metrics
	audit     *auditor
	observers observers
	logs      *dispatch.LogLimiter // hot-path log lines (refusals, accept errors)
	node      *limits.Node         // descriptors flows may hold, node-wide

	tcp, dnsTCP *tproxy.TCPListener
	udp, dnsUDP *tproxy.UDPSocket
	events      *bpf.EventReader
	server      *http.Server

	ctx     context.Context
	cancel  context.CancelFunc
	started time.Time
	ready   atomic.Bool
	wg      sync.WaitGroup
}

// New validates cfg; nothing is touched until Start.
func New(cfg Config) (*Daemon, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	d := &Daemon{
		cfg:       cfg,
		log:       cfg.Logger,
		route:     kernel.Routing{Mark: cfg.RedirectMark, Mask: RedirectMask, Table: cfg.Table, Priority: cfg.RulePriority},
		wall:      kernel.NewNFTWall(cfg.Table, cfg.RedirectMark),
		sandboxes: sandbox.NewRegistry(),
		logs:      dispatch.NewLogLimiter(10, 100*time.Millisecond),
		node:      &limits.Node{},
	}
	d.metrics = metrics.New(datapathSource{d})
	var err error
	if d.consent, err = newConsentGate(d); err != nil {
		return nil, err
	}
	return d, nil
}

// Registry is the daemon's Prometheus registry (serve it on /metrics).
func (d *Daemon) Registry() *prometheus.Registry { return d.metrics.Registry }

// Config returns the effective configuration.
func (d *Daemon) Config() Config { return d.cfg }

// Datapath exposes the loaded datapath (for tests and `cleanwall run`).
func (d *Daemon) Datapath() *bpf.Datapath { return d.dp }

// Start loads and pins the datapath, installs the routing and the wall,
// opens the proxy listeners, builds the proxy registry, re-adopts
// persisted sandboxes and serves the API. Until the listeners exist the
// datapath drops every new flow (no proxy socket).
func (d *Daemon) Start(ctx context.Context) (err error) {
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.started = time.Now()
	if limit, budget, err := limits.RaiseNoFile(); err != nil {
		d.log.Warn("reading the descriptor limit", "error", err)
	} else {
		d.node = budget
		d.log.Info("descriptors", "limit", limit, "for_flows", budget.Max, "reserved", limits.ReservedFDs)
	}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	if err := d.openAudit(); err != nil {
		return err
	}
	// Pins must outlive this process (see bpf.ResolvePinRoot): in a
	// private mount namespace they go to the host's bpffs, or start fails.
	if d.cfg.PinRoot, err = bpf.ResolvePinRoot(d.cfg.PinRoot); err != nil {
		return err
	}
	if d.dp, err = bpf.Load(bpf.Options{PinRoot: d.cfg.PinRoot, MaxSandboxes: d.cfg.MaxSandboxes, MaxRules: d.cfg.MaxRules, MaxCounters: d.cfg.MaxCounters}); err != nil {
		return err
	}
	if _, err := d.route.Install(); err != nil {
		return err
	}
	if err := d.wall.Install(); err != nil {
		return err
	}
	if d.tcp, err = tproxy.ListenTCP(ctx, d.cfg.TCPPort, d.cfg.ListenersPerFamily, d.cfg.SocketMark); err != nil {
		return fmt.Errorf("opening the TCP proxy listeners: %w", err)
	}
	if d.udp, err = tproxy.ListenUDP(ctx, d.cfg.UDPPort, d.cfg.SocketMark); err != nil {
		return fmt.Errorf("opening the UDP proxy socket: %w", err)
	}
	if d.dnsUDP, err = tproxy.ListenUDP(ctx, d.cfg.DNSPort, d.cfg.SocketMark); err != nil {
		return fmt.Errorf("opening the DNS proxy sockets: %w", err)
	}
	if d.dnsTCP, err = tproxy.ListenTCP(ctx, d.cfg.DNSPort, 1, d.cfg.SocketMark); err != nil {
		return fmt.Errorf("opening the DNS proxy sockets: %w", err)
	}
	if d.cfg.KeyBroker != nil {
		d.keys = keys.New(*d.cfg.KeyBroker, d.log, d.keyAudit)
		d.keys.NodeKey = d.audit.nodeKey() // ties the audit log to the attestation (docs/keybroker.md §7)
		d.keys.AuditErr = d.keyAuditErr    // no record, no key
		d.keys.OnLapse = d.keyLapsed
		if err := d.keys.Start(d.ctx); err != nil {
			return err
		}
	}
	if err := d.consent.start(d.ctx); err != nil {
		return err
	}
	if err := d.wire(d.dp, kernel.NetlinkLinks{}, d.wall); err != nil {
		return err
	}
	if err := d.dp.SetConfig(bpf.Config{RedirectMark: d.cfg.RedirectMark, SocketMark: d.cfg.SocketMark, Ports: d.ports()}); err != nil {
		return err
	}
	if err := d.steerTimeWait(); err != nil {
		return err
	}
	if err := d.reconcile(); err != nil {
		return fmt.Errorf("re-adopting sandboxes: %w", err)
	}
	d.consent.adopted()
	d.serveFlows()
	d.goBackground(d.sweep)
	d.goBackground(d.watch)
	if d.events, err = d.dp.Events(); err != nil {
		return err
	}
	d.goBackground(d.readEvents)
	if err := d.serveAPI(); err != nil {
		return err
	}
	d.ready.Store(true)
	d.sandboxes.RLock()
	n := d.sandboxes.Len()
	d.sandboxes.RUnlock()
	d.audit.record(auditStart, map[string]any{"version": d.cfg.Version, "pinRoot": d.cfg.PinRoot, "sandboxes": n,
		"keyBroker": d.cfg.KeyBroker != nil, "proxies": d.proxies.Keys()})
	d.log.Info("cleanwalld ready", "socket", d.cfg.Socket, "pin_root", d.cfg.PinRoot,
		"tcp_port", d.tcp.Port, "udp_port", d.udp.Port, "sandboxes", n, "proxies", d.proxies.Keys())
	return nil
}

// kernelDatapath is all the daemon's parts ask of the datapath.
type kernelDatapath interface {
	enforce.Datapath
	dispatch.Datapath
}

// wire builds the proxy registry and the parts that act on the kernel
// through dp, links and wall (the real ones, or runtime/fake's in tests).
func (d *Daemon) wire(dp kernelDatapath, links enforce.Links, wall enforce.Wall) error {
	d.kernel = dp
	if err := d.buildProxies(); err != nil {
		return err
	}
	d.learner = &fqdn.Learner{DP: dp, Log: d.log}
	d.enforcer = &enforce.Enforcer{DP: dp, Links: links, Wall: wall, Store: sandbox.Store{Dir: d.cfg.StateDir},
		Sandboxes: d.sandboxes, Learner: d.learner, AttachMode: d.cfg.AttachMode,
		DNSRate: d.dnsRate(), EventRate: d.cfg.DenyEventsPerSecond, Log: d.log, Phase: d.metrics.ObservePhase}
	d.dispatch = &dispatch.Dispatcher{Sandboxes: d.sandboxes, DP: dp, Proxies: d.proxies, Metrics: d.metrics, Node: d.node,
		Events: flowEvents{d}, Log: d.log, Logs: d.logs, Ctx: d.ctx, Consent: d.consent}
	if d.keys != nil {
		d.dispatch.Keys = d.keys.For
	}
	return nil
}

// upstreamDialer opens the proxies' own connections to destinations, from
// the node namespace, without the proxy socket mark. No TCP keepalive:
// the proxies have idle timeouts of their own, and the probe settings
// cost four system calls per connection.
var upstreamDialer = net.Dialer{Timeout: tcpproxy.DefaultDialTimeout, KeepAlive: -1}

// buildProxies registers the privacy proxies: open tcp, http and udp, DNS,
// and the configured extensions. A policy whose rule no proxy serves is
// refused at admission.
func (d *Daemon) buildProxies() error {
	g := proxies.NewRegistry()
	// Not through Dialer.DialTCP: it binds the socket to the zero local
	// address it is given (go.dev/issue/81620), an extra system call that
	// also takes the ephemeral port at bind time.
	tcp := &tcpproxy.Proxy{Forwarder: tcpproxy.Forwarder{IdleTimeout: d.cfg.IdleTimeout,
		Dial: func(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
			return upstreamDialer.DialContext(ctx, "tcp", dst.String())
		}}}
	httpMetrics, err := httpproxy.NewMetrics(d.metrics.Registry)
	if err != nil {
		return err
	}
	http := &httpproxy.Proxy{Dial: upstreamDialer.DialContext, Logger: d.log.With("proxy", "http"), Metrics: httpMetrics}
	pgMetrics, err := pgproxy.NewMetrics(d.metrics.Registry)
	if err != nil {
		return err
	}
	pg := pgproxy.New(upstreamDialer.DialContext, pgMetrics, d.log.With("proxy", "postgres"))
	pg.IdleTimeout = d.cfg.IdleTimeout
	dnsMetrics, err := dnsproxy.NewMetrics(d.metrics.Registry)
	if err != nil {
		return err
	}
	d.dns = &dnsproxy.Proxy{
		OnLearn: d.learn,
		OnDeny:  d.dnsDenied,
		Logger:  d.log.With("proxy", "dns"),
		Metrics: dnsMetrics,
		Limits: dnsproxy.Limits{
			LearnMinTTL:      d.cfg.FQDNMinTTL,
			LearnMaxTTL:      d.cfg.FQDNMaxTTL,
			QueriesPerSecond: d.cfg.DNSQueriesPerSecond,
		},
	}
	if d.cfg.DNSRefuseNXDomain {
		d.dns.DenyRcode = 3 // NXDOMAIN
	}
	open := func(protocol string) proxies.Key { return proxies.Key{Mode: "open", Protocol: protocol} }
	errs := []error{
		g.AddStream(open("tcp"), tcp),
		g.AddStream(open("http"), http),
		g.AddPacket(open("udp"), &udpproxy.Relay{IdleTimeout: d.cfg.UDPIdleTimeout}),
		g.AddStream(proxies.Key{Mode: "secure", Protocol: "tcp"}, &secure.TCP{Dial: upstreamDialer.DialContext, Logger: d.log.With("proxy", "secure-tcp"), IdleTimeout: d.cfg.IdleTimeout}),
		g.AddStream(proxies.Key{Mode: "secure", Protocol: "http"}, secure.NewHTTP(upstreamDialer.DialContext, d.log.With("proxy", "secure-http"))),
		g.AddStream(proxies.Key{Mode: "trusted", Protocol: "tcp"}, &trusted.TCP{Dial: upstreamDialer.DialContext, Logger: d.log.With("proxy", "trusted-tcp"), IdleTimeout: d.cfg.IdleTimeout}),
		g.AddStream(proxies.Key{Mode: "trusted", Protocol: "http"}, trusted.NewHTTP(upstreamDialer.DialContext, d.log.With("proxy", "trusted-http"))),
		g.AddStream(pgproxy.Key, pg),
		g.AddStream(proxies.DNSKey, d.dns),
		g.AddPacket(proxies.DNSKey, d.dns),
	}
	for _, spec := range d.cfg.Extensions {
		name, path, err := extension.ParseSpec(spec)
		if err != nil {
			return err
		}
		x := &extension.Proxy{Name: name, Path: path, Logger: d.log} // it names itself in its lines
		d.exts = append(d.exts, x)
		errs = append(errs, g.AddStream(x.Key(), x))
		d.goBackground(func() { x.Connect(d.ctx) })
	}
	d.proxies = g
	return errors.Join(errs...)
}

// serveFlows starts the accept loops and datagram readers of the proxy
// sockets; the dispatcher takes each flow from there.
func (d *Daemon) serveFlows() {
	for _, l := range d.tcp.Listeners() {
		d.goBackground(func() {
			dispatch.AcceptLoop(d.ctx, l, "tcp", d.log, d.logs, func(c *net.TCPConn) { go d.dispatch.ServeTCP(c) })
		})
	}
	for _, l := range d.dnsTCP.Listeners() {
		d.goBackground(func() { dispatch.AcceptLoop(d.ctx, l, "dns-tcp", d.log, d.logs, d.dispatch.ServeDNSTCP) })
	}
	d.goBackground(func() {
		_ = d.udp.Serve(func(dg tproxy.Datagram) { d.dispatch.HandleDatagram(dg, d.udp.Reply) })
	})
	d.goBackground(func() {
		_ = d.dnsUDP.Serve(func(dg tproxy.Datagram) { d.dispatch.HandleDNSDatagram(dg, d.dnsUDP.Reply) })
	})
}

func (d *Daemon) ports() [4]uint16 {
	var p [4]uint16
	if d.tcp != nil {
		p[bpf.ListenerTCP] = d.tcp.Port
	}
	if d.udp != nil {
		p[bpf.ListenerUDP] = d.udp.Port
	}
	if d.dnsUDP != nil {
		p[bpf.ListenerDNSUDP] = d.dnsUDP.Port
	}
	if d.dnsTCP != nil {
		p[bpf.ListenerDNSTCP] = d.dnsTCP.Port
	}
	return p
}

// dnsRate is the DNS proxy's per-sandbox query rate (negative: none).
func (d *Daemon) dnsRate() float64 {
	switch r := d.cfg.DNSQueriesPerSecond; {
	case r < 0:
		return -1
	case r == 0:
		return 100 // the DNS proxy's default
	default:
		return r
	}
}

func (d *Daemon) goBackground(f func()) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		f()
	}()
}

// sweep ends idle reply sockets and removes expired learnt addresses.
func (d *Daemon) sweep() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
			d.udp.Sweep(d.cfg.UDPIdleTimeout)
			d.dnsUDP.Sweep(d.cfg.UDPIdleTimeout)
			for _, s := range d.sandboxes.Snapshot() {
				d.learner.Sweep(s)
			}
		}
	}
}

// watch runs the watchdog until the daemon stops: what was removed under
// the daemon (a detached program, a deleted chain, an unpinned map) is
// put back within about one interval; meanwhile the nftables wall drops
// whatever the missing program would have decided.
func (d *Daemon) watch() {
	t := time.NewTicker(d.cfg.WatchdogInterval)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
			d.enforcer.Repair(d.repaired)
		}
	}
}

// keyAudit counts a key release's result (cleanwall_key_releases_total)
// and audits it.
func (d *Daemon) keyAudit(kind string, fields map[string]any) {
	switch kind {
	case keys.AuditRelease:
		d.metrics.KeyReleases.WithLabelValues("released").Inc()
	case keys.AuditRefuse:
		d.metrics.KeyReleases.WithLabelValues("refused").Inc()
	}
	d.audit.record(kind, fields)
}

// repaired logs, counts and audits one repair.
func (d *Daemon) repaired(what, sandbox string, found, err error) {
	d.metrics.Repairs.WithLabelValues(what).Inc()
	fields := map[string]any{"what": what, "ok": err == nil, "found": found.Error()}
	if sandbox != "" {
		fields["sandbox"] = sandbox
	}
	if err != nil {
		fields["error"] = err.Error()
		d.log.Error("watchdog: repair failed (the nftables wall keeps dropping)", "what", what, "sandbox", sandbox, "error", err)
	} else {
		d.log.Warn("watchdog: repaired", "what", what, "sandbox", sandbox, "found", found)
	}
	d.audit.record(auditRepair, fields)
}

// Close stops serving: the API goes away and every proxy socket closes, so
// the datapath drops new flows. Pins, rules and attachments stay: the
// sandboxes remain enforced (fail closed) until a new daemon re-adopts them.
func (d *Daemon) Close() error {
	if d.cancel != nil {
		d.cancel()
	}
	if d.server != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = d.server.Shutdown(ctx)
		cancel()
	}
	if d.tcp != nil {
		d.tcp.Close()
	}
	if d.udp != nil {
		d.udp.Close()
	}
	if d.dnsUDP != nil {
		d.dnsUDP.Close()
	}
	if d.dnsTCP != nil {
		d.dnsTCP.Close()
	}
	for _, x := range d.exts {
		_ = x.Close()
	}
	_ = d.unmountAllVolumes("daemon stopped")
	if d.events != nil {
		d.events.Close()
	}
	d.wg.Wait()
	if d.dp != nil {
		d.dp.Close()
	}
	d.audit.close()
	return nil
}

// Uninstall removes every sandbox, the routing, the wall and the pins. For
// a daemon that owns its node alone (`cleanwall run`); cleanwalld keeps
// them.
func (d *Daemon) Uninstall() error {
	var errs []error
	if d.dp != nil && d.enforcer != nil {
		d.sandboxes.Lock()
		errs = append(errs, d.enforcer.TeardownAll())
		d.sandboxes.Unlock()
	}
	errs = append(errs, d.route.Remove(), d.wall.Remove())
	pinRoot := d.cfg.PinRoot
	dp := d.dp
	d.Close()
	if dp != nil {
		if err := dp.RemovePins(); err != nil {
			errs = append(errs, err)
		}
		_ = os.Remove(filepath.Join(pinRoot, "links"))
		_ = os.Remove(filepath.Join(pinRoot, "maps"))
		_ = os.Remove(pinRoot) // only if empty: a pin root may be shared
	}
	return errors.Join(errs...)
}

// errKeyLapsed ends the secure flows of a key that was not released again
// before it expired.
var errKeyLapsed = errors.New("data key expired and not released again")

// keyLapsed ends the flows that seal with a key released for a policy
// whose current version expired: no key, no egress. New flows are refused
// by the secure proxies until a release succeeds.
func (d *Daemon) keyLapsed(keyID, policySHA256 string) {
	closed := 0
	for _, s := range d.sandboxes.Snapshot() {
		s.Lock()
		under := false
		for _, c := range s.Slots {
			under = under || c != nil && c.Hash == policySHA256
		}
		s.Unlock()
		if !under {
			continue
		}
		closed += s.CloseFlows(func(f *sandbox.Flow) bool {
			sec := f.Rule.Spec.Secure
			return f.Rule.Mode != policy.ModeSecure || sec == nil || sec.KeyID != keyID
		}, errKeyLapsed)
	}
	d.log.Warn("data key lapsed: its secure flows are closed", "key", keyID, "policy", policySHA256, "closed_flows", closed)
	d.audit.record(auditKeyLapse, map[string]any{"key": keyID, "policySHA256": policySHA256, "closedFlows": closed})
}
