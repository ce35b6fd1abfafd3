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
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/governance/audit"
	"github.com/cleanwall/cleanwall/policy"
	dnsproxy "github.com/cleanwall/cleanwall/proxies/dns"
	httpproxy "github.com/cleanwall/cleanwall/proxies/http"
	"github.com/cleanwall/cleanwall/proxies/tproxy"
	"github.com/cleanwall/cleanwall/runtime/api"
)

// Daemon is a running cleanwalld.
type Daemon struct {
	cfg   Config
	log   *slog.Logger
	dp    *bpf.Datapath
	store store
	route routing
	wall  *wall // the second, BPF-independent wall (nftables)

	ctx    context.Context
	cancel context.CancelFunc

	mu        sync.RWMutex
	sandboxes map[string]*sandbox // by container ID + "/" + ifName
	byIP      map[netip.Addr]*sandbox

	tcp    *tproxy.TCPListener
	udp    *tproxy.UDPSocket
	dnsUDP *tproxy.UDPSocket
	dnsTCP *tproxy.TCPListener
	dns    *dnsproxy.Proxy
	http   *httpproxy.Proxy
	keys   *keyring
	audit  *auditor

	observers observers
	logs      *logLimiter // hot-path log lines (refusals, accept errors)
	fds       *fdBudget   // descriptors flows may hold, node-wide
	udpFlow   *udpFlows
	events    *bpf.EventReader
	server    *http.Server
	sock      net.Listener
	metrics   *metrics
	started   time.Time
	ready     bool
	wg        sync.WaitGroup
}

// New validates cfg; nothing is touched until Start.
func New(cfg Config) (*Daemon, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	d := &Daemon{
		cfg:       cfg,
		log:       cfg.Logger,
		store:     store{dir: cfg.StateDir},
		route:     routing{mark: cfg.RedirectMark, mask: RedirectMask, table: cfg.Table, priority: cfg.RulePriority},
		wall:      newWall(cfg),
		logs:      newLogLimiter(10, 100*time.Millisecond),
		fds:       &fdBudget{},
		sandboxes: map[string]*sandbox{},
		byIP:      map[netip.Addr]*sandbox{},
	}
	d.metrics = newMetrics(d)
	return d, nil
}

// Registry is the daemon's Prometheus registry (serve it on /metrics).
func (d *Daemon) Registry() *prometheus.Registry { return d.metrics.reg }

// Config returns the effective configuration.
func (d *Daemon) Config() Config { return d.cfg }

// Datapath exposes the loaded datapath (for tests and `cleanwall run`).
func (d *Daemon) Datapath() *bpf.Datapath { return d.dp }

// Start loads and pins the datapath, installs the routing, opens the proxy
// listeners, re-adopts persisted sandboxes and serves the API. Until the
// listeners exist the datapath drops every new flow (no proxy socket).
func (d *Daemon) Start(ctx context.Context) (err error) {
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.started = time.Now()
	if limit, budget, err := raiseNoFile(); err != nil {
		d.log.Warn("reading the descriptor limit", "error", err)
	} else {
		d.fds = budget
		d.log.Info("descriptors", "limit", limit, "for_flows", budget.max, "reserved", reservedFDs)
	}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	d.audit = &auditor{d: d}
	if d.cfg.AuditLog != "-" {
		l, err := audit.Open(d.cfg.AuditLog, audit.Options{})
		if err != nil {
			return fmt.Errorf("opening the audit log: %w", err)
		}
		d.audit.log = l
	}
	// Pins must outlive this process (see bpf.ResolvePinRoot): in a
	// private mount namespace they go to the host's bpffs, or start fails.
	if d.cfg.PinRoot, err = bpf.ResolvePinRoot(d.cfg.PinRoot); err != nil {
		return err
	}
	if d.dp, err = bpf.Load(bpf.Options{PinRoot: d.cfg.PinRoot, MaxSandboxes: d.cfg.MaxSandboxes, MaxRules: d.cfg.MaxRules, MaxCounters: d.cfg.MaxCounters}); err != nil {
		return err
	}
	if _, err := d.route.install(); err != nil {
		return err
	}
	if err := d.wall.install(); err != nil {
		return err
	}
	if d.tcp, err = tproxy.ListenTCP(ctx, d.cfg.TCPPort, d.cfg.ListenersPerFamily, d.cfg.SocketMark); err != nil {
		return fmt.Errorf("opening the TCP proxy listeners: %w", err)
	}
	if d.udp, err = tproxy.ListenUDP(ctx, d.cfg.UDPPort, d.cfg.SocketMark); err != nil {
		return fmt.Errorf("opening the UDP proxy socket: %w", err)
	}
	if d.cfg.KeyBroker != nil {
		d.keys = newKeyring(d, d.cfg.KeyBroker)
		if err := d.keys.start(ctx); err != nil {
			return err
		}
	}
	if err := d.startHTTP(); err != nil {
		return err
	}
	if err := d.startDNS(ctx); err != nil {
		return fmt.Errorf("opening the DNS proxy sockets: %w", err)
	}
	d.udpFlow = &udpFlows{d: d, sock: d.udp, m: map[[2]netip.AddrPort]*udpFlow{}}
	if err := d.dp.SetConfig(bpf.Config{
		RedirectMark: d.cfg.RedirectMark,
		SocketMark:   d.cfg.SocketMark,
		Ports:        d.ports(),
	}); err != nil {
		return err
	}
	if err := d.steerTimeWait(); err != nil {
		return err
	}
	if err := d.reconcile(); err != nil {
		return fmt.Errorf("re-adopting sandboxes: %w", err)
	}
	for _, l := range d.tcp.Listeners() {
		d.goBackground(func() { d.acceptLoop(l, "tcp", func(c *net.TCPConn) { go d.handleTCP(c) }) })
	}
	d.goBackground(func() { _ = d.udp.Serve(d.udpFlow.handle) })
	d.serveDNS()
	d.goBackground(d.sweep)
	d.goBackground(d.watch)
	if d.events, err = d.dp.Events(); err != nil {
		return err
	}
	d.goBackground(d.readEvents)
	if err := d.serveAPI(); err != nil {
		return err
	}
	d.mu.Lock()
	d.ready = true
	d.mu.Unlock()
	d.audit.record(auditStart, map[string]any{"version": d.cfg.Version, "pinRoot": d.cfg.PinRoot, "sandboxes": len(d.sandboxes),
		"keyBroker": d.cfg.KeyBroker != nil})
	d.log.Info("cleanwalld ready", "socket", d.cfg.Socket, "pin_root", d.cfg.PinRoot,
		"tcp_port", d.tcp.Port, "udp_port", d.udp.Port, "sandboxes", len(d.sandboxes))
	return nil
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

func (d *Daemon) goBackground(f func()) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		f()
	}()
}

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
			d.sweepLearnt()
		}
	}
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

// Uninstall removes every sandbox, the routing and the pins. For a daemon
// that owns its node alone (`cleanwall run`); cleanwalld keeps them.
func (d *Daemon) Uninstall() error {
	var errs []error
	if d.dp != nil {
		d.mu.Lock()
		for _, s := range d.sandboxes {
			if err := d.teardown(s); err != nil {
				errs = append(errs, err)
			}
		}
		d.mu.Unlock()
	}
	if err := d.route.remove(); err != nil {
		errs = append(errs, err)
	}
	if err := d.wall.remove(); err != nil {
		errs = append(errs, err)
	}
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

// reconcile re-adopts the persisted sandboxes: their interfaces still
// exist, so their pinned links are updated in place to the new program
// (atomically: no window) and their policy is re-applied as a fresh
// generation. Sandboxes whose interface is gone are cleaned up; kernel
// state no record owns is removed, which leaves an orphan interface
// dropping everything (unknown sandbox) rather than open.
func (d *Daemon) reconcile() error {
	recs, errs := d.store.load()
	for _, err := range errs {
		d.log.Error("unreadable sandbox state", "error", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, rec := range recs {
		link, err := netlink.LinkByIndex(rec.HostIfindex)
		if err != nil || link.Attrs().Name != rec.HostInterface {
			d.log.Info("sandbox interface gone, cleaning up", "sandbox", rec.key(), "interface", rec.HostInterface)
			_ = d.dp.Detach(rec.Attachment)
			_ = d.wall.removeSandbox(rec.DatapathID)
			d.deleteEntryIfOwned(rec.HostIfindex, rec.DatapathID)
			_, _ = d.dp.DeleteRules(rec.DatapathID, -1)
			_ = d.dp.DeleteCounters(rec.DatapathID)
			_ = d.dp.DeleteFlowRate(rec.DatapathID)
			_ = d.store.remove(rec.ContainerID, rec.IfName)
			continue
		}
		compiled, err := compilePolicy(rec.Policy, rec.PolicySource)
		if err != nil {
			// The stored document no longer compiles: enforce nothing-allowed.
			d.log.Error("stored policy no longer valid; the sandbox gets an empty policy (everything drops)", "sandbox", rec.key(), "error", err)
			empty := fmt.Sprintf("apiVersion: cleanwall.dev/v1\nkind: EgressPolicy\nmetadata: {name: %s}\nspec: {}\n", "invalid-stored-policy")
			rec.Policy = []byte(empty)
			if compiled, err = compilePolicy(rec.Policy, "reconcile"); err != nil {
				return err
			}
		}
		// Both slots are swept once: the inactive one must be empty before
		// the re-apply writes into it (a crash may have left entries there).
		_, _ = d.dp.DeleteRules(rec.DatapathID, int((rec.Generation+1)%2))
		current, _ := d.dp.SandboxRules(rec.DatapathID, uint8(rec.Generation%2))
		var epoch uint64
		if cur, err := d.dp.Sandbox(rec.HostIfindex); err == nil && cur.ID == rec.DatapathID {
			epoch = cur.Epoch // continue from it: the re-apply moves it forward
		}
		sb := newSandbox(rec, compiled, current, epoch, d.cfg.Limits)
		// The second wall first: it holds whatever happens to the programs.
		if err := d.wall.addSandbox(rec.wallSandbox()); err != nil {
			return fmt.Errorf("re-installing the wall of %s: %w", rec.key(), err)
		}
		if err := isolatePort(rec, link); err != nil {
			return err
		}
		if rec.Bridge != "" {
			if err := d.ensureBridge(rec.Bridge, rec.BridgeIfindex); err != nil {
				return err
			}
		}
		att, err := d.dp.Attach(rec.Attachment, rec.Attachment.Mode == bpf.AttachLegacyTC)
		if err != nil {
			return fmt.Errorf("re-attaching %s: %w", rec.key(), err)
		}
		rec.Attachment = att
		if err := d.writeBudgets(rec.DatapathID, *sb.limits.lim.Load()); err != nil {
			return err
		}
		d.register(sb)
		if _, err := d.apply(sb, compiled, rec.Policy, rec.PolicySource); err != nil {
			return fmt.Errorf("re-applying the policy of %s: %w", rec.key(), err)
		}
		d.log.Info("sandbox re-adopted", "sandbox", rec.key(), "generation", sb.rec.Generation)
	}
	d.removeOrphans()
	return nil
}

// removeOrphans deletes kernel state that no registered sandbox owns.
func (d *Daemon) removeOrphans() {
	owned := map[uint32]bool{}
	ifOwner := map[int]uint32{}
	links := map[string]bool{}
	for _, s := range d.sandboxes {
		owned[s.rec.DatapathID] = true
		ifOwner[s.rec.HostIfindex] = s.rec.DatapathID
		links[s.rec.Attachment.Name] = true
		if s.rec.Bridge != "" {
			links["bridge-"+s.rec.Bridge] = true
		}
	}
	if entries, err := d.dp.Sandboxes(); err == nil {
		for ifindex, e := range entries {
			if ifOwner[ifindex] != e.ID {
				d.log.Warn("removing orphan sandbox entry (its interface now drops everything)", "ifindex", ifindex, "datapath_id", e.ID)
				_ = d.dp.DeleteSandbox(ifindex)
			}
		}
	}
	if names, err := d.dp.PinnedLinks(); err == nil {
		for _, name := range names {
			if links[name] {
				continue
			}
			var ifindex int
			if _, err := fmt.Sscanf(name[strings.LastIndex(name, "-if")+1:], "if%d", &ifindex); err == nil && strings.HasPrefix(name, "sandbox-") {
				if _, lerr := netlink.LinkByIndex(ifindex); lerr == nil {
					continue // keep the program on a live interface: it drops everything
				}
			}
			d.log.Info("removing orphan link pin", "link", name)
			_ = d.dp.Detach(bpf.Attachment{Name: name, Mode: bpf.AttachTCX})
		}
	}
	if chains, err := d.wall.sandboxChains(); err == nil {
		for name, id := range chains {
			if owned[id] {
				continue
			}
			// Like an orphan link: on a live interface the chain stays and
			// drops everything unmarked; on a gone one it is removed.
			if _, ifname, _ := chainParts(name); ifname != "" {
				if _, lerr := netlink.LinkByName(ifname); lerr == nil {
					continue
				}
			}
			d.log.Info("removing orphan wall chain", "chain", name)
			_ = d.wall.removeSandbox(id)
		}
	}
	for _, id := range d.dp.FlowRateIDs() {
		if !owned[id] {
			_ = d.dp.DeleteFlowRate(id)
		}
	}
	seen := map[uint32]bool{}
	for id := range d.orphanRuleIDs(owned) {
		if !seen[id] {
			seen[id] = true
			_, _ = d.dp.DeleteRules(id, -1)
			_ = d.dp.DeleteCounters(id)
		}
	}
}

func (d *Daemon) orphanRuleIDs(owned map[uint32]bool) map[uint32]bool {
	out := map[uint32]bool{}
	counters, err := d.dp.Counters()
	if err == nil {
		for k := range counters {
			if k.SandboxID != 0 && !owned[k.SandboxID] {
				out[k.SandboxID] = true
			}
		}
	}
	for _, id := range d.dp.RuleSandboxIDs() {
		if !owned[id] {
			out[id] = true
		}
	}
	return out
}

// GC removes every attachment not in valid (CNI GC).
func (d *Daemon) GC(valid []api.AttachmentRef) []api.AttachmentRef {
	keep := map[string]bool{}
	for _, v := range valid {
		keep[attachmentKey(v.ContainerID, v.IfName)] = true
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var removed []api.AttachmentRef
	for k, s := range d.sandboxes {
		if !keep[k] {
			if err := d.teardown(s); err != nil {
				d.log.Warn("gc", "sandbox", k, "error", err)
			}
			removed = append(removed, api.AttachmentRef{ContainerID: s.rec.ContainerID, IfName: s.rec.IfName})
		}
	}
	d.removeOrphans()
	return removed
}

// view renders a sandbox for the API.
func (d *Daemon) view(s *sandbox, counters bool) api.Sandbox {
	s.mu.Lock()
	rec := s.rec
	compiled := s.compiled
	rules := len(s.entries)
	s.mu.Unlock()
	v := api.Sandbox{
		ID: rec.ContainerID, IfName: rec.IfName, Netns: rec.Netns,
		HostInterface: rec.HostInterface, HostIfindex: rec.HostIfindex, Bridge: rec.Bridge,
		DatapathID: rec.DatapathID, MAC: rec.MAC, IPs: rec.IPs,
		PolicyName: rec.PolicyName, PolicyHash: compiled.Hash, Generation: rec.Generation,
		AttachMode: string(rec.Attachment.Mode), Created: rec.Created, Rules: rules,
	}
	if counters {
		v.Counters = d.countersOf(rec.DatapathID, compiled)
	}
	return v
}

func (d *Daemon) countersOf(id uint32, compiled *policy.Compiled) []api.Counter {
	all, err := d.dp.Counters()
	if err != nil {
		return nil
	}
	var out []api.Counter
	for k, v := range all {
		if k.SandboxID != id {
			continue
		}
		c := api.Counter{RuleID: k.RuleID, Verdict: k.Verdict.String(), Reason: k.Reason.String(), Packets: v.Packets, Bytes: v.Bytes, Flows: v.Flows}
		if r := compiled.Rule(k.RuleID); r != nil {
			c.Rule = r.Name
		}
		out = append(out, c)
	}
	sortCounters(out)
	return out
}
