package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/governance/telemetry"
	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/cnichain"
	"github.com/cleanwall/cleanwall/runtime/daemon"
	"github.com/cleanwall/cleanwall/runtime/keys"
)

// runDir holds what `cleanwall run` makes: per-run sockets and state, the
// slot locks, host-local's allocations and libcni's cache.
const runDir = "/run/cleanwall/run"

// Defaults of the sandbox network. Every run shares one host-local range,
// so concurrent runs get distinct addresses.
var (
	defaultSubnet  = netip.MustParsePrefix("10.231.0.0/24")
	defaultSubnet6 = netip.MustParsePrefix("fd00:c1ea:231::/64")
)

type runOptions struct {
	policyFile  string
	name        string
	metricsAddr string
	cniDirs     []string
	socket      string
	subnet      netip.Prefix
	subnet6     netip.Prefix
	attach      string
	verbose     bool
	command     []string
	// The embedded runtime's key broker and extensions (cleanwalld's flags).
	keyBroker, brokerCA, attestation string
	consentURL, consentCA            string
	consentTimeout                   time.Duration
	// otlp exports the embedded runtime's metrics (cleanwalld's --otlp-*).
	otlp       telemetry.Config
	extensions []string
}

// usageError is a one-line "what is wrong and how to fix it".
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func fail(format string, args ...any) error { return &usageError{fmt.Sprintf(format, args...)} }

func parseRunFlags(args []string) (*runOptions, error) {
	o := &runOptions{}
	fs := flag.NewFlagSet("cleanwall run", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.policyFile, "policy", "", "policy file (required)")
	fs.StringVar(&o.name, "name", "", "sandbox name (default run-<pid>)")
	fs.StringVar(&o.metricsAddr, "metrics-addr", "", "serve Prometheus metrics of the embedded runtime on this address")
	cniDir := fs.String("cni-bin-dir", "", "CNI plugin search path, colon-separated (default: the cleanwall binary's directory, /usr/lib/cni, /opt/cni/bin)")
	fs.StringVar(&o.socket, "socket", api.DefaultSocket, "use the cleanwalld answering here; without one, an embedded runtime runs")
	subnet := fs.String("subnet", defaultSubnet.String(), "IPv4 range of sandbox addresses")
	subnet6 := fs.String("subnet6", defaultSubnet6.String(), "IPv6 range of sandbox addresses (\"\" for none)")
	fs.StringVar(&o.attach, "attach", "auto", "datapath attachment: auto, tcx or tc")
	fs.BoolVar(&o.verbose, "v", false, "log the embedded runtime's decisions to stderr")
	fs.StringVar(&o.keyBroker, "keybroker", "", "key broker URL for the embedded runtime (as cleanwalld's): releases the data keys of secure-mode rules to this node's attestation")
	fs.StringVar(&o.brokerCA, "broker-ca", "", "PEM file of the CA(s) the key broker's TLS certificate chains to (default: system roots)")
	fs.StringVar(&o.attestation, "attestation", "snp", "evidence for the key broker: snp (SEV-SNP guest device) or simulated (labelled fake: tests and demos only)")
	fs.StringVar(&o.consentURL, "consent-url", "", "consent service for the embedded runtime (as cleanwalld's, docs/consent.md): asked before COMMAND starts when the policy requires consent")
	fs.StringVar(&o.consentCA, "consent-ca", "", "PEM file of the CA(s) the consent service's TLS certificate chains to (default: system roots)")
	fs.DurationVar(&o.consentTimeout, "consent-timeout", 2*time.Second, "bound of each consent request; no answer in time is a deny")
	fs.StringVar(&o.otlp.Endpoint, "otlp-endpoint", "", "export the embedded runtime's metrics to an OpenTelemetry collector, OTLP/HTTP over TLS (as cleanwalld's; docs/telemetry.md)")
	fs.StringVar(&o.otlp.CAFile, "otlp-ca", "", "PEM file of the CA(s) the collector's TLS certificate chains to (default: system roots)")
	fs.DurationVar(&o.otlp.Interval, "otlp-interval", telemetry.DefaultInterval, "how often the metrics are exported to --otlp-endpoint")
	fs.Func("extension", "an out-of-process privacy proxy for the embedded runtime, NAME=unix:/path (repeatable; docs/extensions.md)", func(v string) error {
		o.extensions = append(o.extensions, v)
		return nil
	})
	if err := fs.Parse(args); err != nil {
		return nil, fail("%v (usage: cleanwall run --policy FILE [--name NAME] -- COMMAND [ARGS...])", err)
	}
	o.command = fs.Args()
	if len(o.command) == 0 {
		return nil, fail("no command to run: cleanwall run --policy FILE -- COMMAND [ARGS...]")
	}
	if o.policyFile == "" {
		return nil, fail("--policy is required: cleanwall run --policy FILE -- COMMAND")
	}
	if o.name == "" {
		o.name = fmt.Sprintf("run-%d", os.Getpid())
	}
	if !validName(o.name) {
		return nil, fail("--name %q: use up to 32 letters, digits and dashes", o.name)
	}
	var err error
	if o.subnet, err = netip.ParsePrefix(*subnet); err != nil || !o.subnet.Addr().Is4() {
		return nil, fail("--subnet %q is not an IPv4 prefix", *subnet)
	}
	if *subnet6 != "" {
		if o.subnet6, err = netip.ParsePrefix(*subnet6); err != nil || o.subnet6.Addr().Is4() {
			return nil, fail("--subnet6 %q is not an IPv6 prefix", *subnet6)
		}
	}
	if *cniDir != "" {
		o.cniDirs = strings.Split(*cniDir, ":")
	} else {
		if exe, err := os.Executable(); err == nil {
			o.cniDirs = append(o.cniDirs, filepath.Dir(exe))
		}
		o.cniDirs = append(o.cniDirs, cnichain.DefaultPluginDirs...)
	}
	switch o.attach {
	case "auto", "tcx", "tc":
	default:
		return nil, fail("--attach %q: want auto, tcx or tc", o.attach)
	}
	return o, nil
}

func validName(s string) bool {
	if len(s) == 0 || len(s) > 32 {
		return false
	}
	for _, r := range s {
		if !(r == '-' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
			return false
		}
	}
	return true
}

// preflight checks everything that can be checked before touching the
// system, so a bad setup fails with one line and leaves nothing behind.
func (o *runOptions) preflight() (*policy.Compiled, error) {
	if os.Geteuid() != 0 {
		return nil, fail("needs root (network namespaces, BPF): run it with sudo")
	}
	p, err := policy.LoadFile(o.policyFile)
	if err != nil {
		var list policy.ErrorList
		if errors.As(err, &list) && len(list) > 0 {
			more := ""
			if len(list) > 1 {
				more = fmt.Sprintf(" (and %d more: cleanwall policy check %s)", len(list)-1, o.policyFile)
			}
			return nil, fail("invalid policy %s: %v%s", o.policyFile, list[0], more)
		}
		return nil, fail("%v", err)
	}
	compiled, err := policy.Compile(p)
	if err != nil {
		return nil, fail("invalid policy %s: %v", o.policyFile, err)
	}
	if abs, err := filepath.Abs(o.policyFile); err == nil {
		o.policyFile = abs
	}
	if err := bpf.ProbeBTF(); err != nil {
		return nil, fail("%v", err)
	}
	if o.attach != "tc" {
		if err := bpf.ProbeTCX(); err != nil {
			return nil, fail("%v", err)
		}
	}
	if err := cnichain.FindPlugins(o.cniDirs, "ptp", "host-local", "cleanwall-cni"); err != nil {
		return nil, fail("%v", err)
	}
	return compiled, nil
}

func sandboxNetns(name string) string { return "cleanwall-" + name }

// pinRootOf is the pin root of the embedded runtime of the run of pid.
func pinRootOf(pid int) string { return fmt.Sprintf("/sys/fs/bpf/cleanwall-run-%d", pid) }

// chain is the CNI chain of the run's sandbox (Socket comes with the runtime).
func (o *runOptions) chain() cnichain.Options {
	return cnichain.Options{
		Name: "cleanwall-run", Subnet: o.subnet, Subnet6: o.subnet6,
		Cleanwall: true, PolicyFile: o.policyFile,
		PluginDirs: o.cniDirs, CacheDir: filepath.Join(runDir, "cni-cache"), IPAMDir: filepath.Join(runDir, "ipam"),
	}
}

// claim removes what runs whose owner is gone left behind, then takes the
// sandbox's name and makes the run directory with its ownership record
// (before anything else is made, so whatever follows can be found again
// by gc). It holds the gc lock meanwhile: a concurrent gc or run sees no
// claim or a complete one, and a name belongs to one run record at a time.
func (o *runOptions) claim(td *teardown) (*runRecord, string, error) {
	unlock, err := lockGC()
	if err != nil {
		return nil, "", err
	}
	defer unlock()
	ctx, cancel := context.WithTimeout(context.Background(), gcTimeout)
	pass := collect(ctx, runDir)
	cancel()
	for _, c := range pass.collected {
		if c.err != nil {
			fmt.Fprintf(os.Stderr, "cleanwall: could not remove all that %s left behind: %v (see cleanwall gc)\n", c.title(), c.err)
		} else {
			fmt.Fprintf(os.Stderr, "cleanwall: removed what %s left behind (%d items)\n", c.title(), len(c.removed))
		}
	}
	for _, rec := range pass.remaining {
		if rec.Name == o.name {
			return nil, "", fail("a sandbox named %q exists already (run of pid %d): pick another --name", o.name, rec.Owner.PID)
		}
	}
	if netns.Exists(sandboxNetns(o.name)) {
		return nil, "", fail("a sandbox named %q exists already (netns %s): pick another --name", o.name, sandboxNetns(o.name))
	}
	me, err := self()
	if err != nil {
		return nil, "", fail("identifying this process: %v", err)
	}
	dir := filepath.Join(runDir, strconv.Itoa(me.PID))
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, "", fail("creating the run directory: %v (cleanwall gc removes what dead runs left)", err)
	}
	td.push(func() error { return os.RemoveAll(dir) })
	rec := &runRecord{
		Owner: me, Name: o.name, Netns: sandboxNetns(o.name), ContainerID: "cleanwall-" + o.name, IfName: "eth0",
		NodeNetns: currentNetns(), CNI: o.chain(),
	}
	if err := rec.save(dir); err != nil {
		return nil, "", fail("%v", err)
	}
	return rec, dir, nil
}

// teardown runs cleanup steps last-in first-out, reporting failures.
type teardown []func() error

func (t *teardown) push(f func() error) { *t = append(*t, f) }

func (t *teardown) run() {
	for i := len(*t) - 1; i >= 0; i-- {
		if err := (*t)[i](); err != nil {
			fmt.Fprintln(os.Stderr, "cleanwall: teardown:", err)
		}
	}
	*t = nil
}

func cmdRun(args []string) error {
	o, err := parseRunFlags(args)
	if err != nil {
		return err
	}
	compiled, err := o.preflight()
	if err != nil {
		return err
	}
	// Until COMMAND runs, a signal aborts the setup (and tears it down).
	setupCtx, stopSetup := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stopSetup()

	var td teardown
	defer td.run()
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return fail("creating %s: %v", runDir, err)
	}

	rec, dir, err := o.claim(&td)
	if err != nil {
		return err
	}
	client, embedded, err := o.runtime(setupCtx, &td, rec, dir)
	if err != nil {
		return err
	}
	nsName := rec.Netns
	nsPath, err := netns.Create(nsName)
	if err != nil {
		return fail("creating the sandbox namespace: %v", err)
	}
	td.push(func() error { return netns.Delete(nsName) })

	containerID := rec.ContainerID
	att, err := cnichain.Add(setupCtx, rec.CNI, containerID, nsPath, rec.IfName, nil)
	if err != nil {
		return fail("attaching the sandbox: %v", err)
	}
	td.push(func() error { return att.Del(context.Background()) })
	if setupCtx.Err() != nil {
		return &exitError{130}
	}

	if o.metricsAddr != "" {
		if embedded == nil {
			fmt.Fprintf(os.Stderr, "cleanwall: --metrics-addr ignored: cleanwalld at %s serves its own metrics\n", client.Socket)
		} else if stop, err := serveMetrics(o.metricsAddr, embedded); err != nil {
			return fail("--metrics-addr %s: %v", o.metricsAddr, err)
		} else {
			td.push(stop)
		}
	}

	if o.otlp.Endpoint != "" {
		if embedded == nil {
			fmt.Fprintf(os.Stderr, "cleanwall: --otlp-endpoint ignored: cleanwalld at %s exports its own metrics\n", client.Socket)
		} else {
			cfg := o.otlp
			cfg.Gatherer, cfg.Service, cfg.Version = embedded.Registry(), "cleanwall-run", version
			exp, err := telemetry.Start(setupCtx, cfg)
			if err != nil {
				return fail("%v", err)
			}
			td.push(func() error { // a last export
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				return exp.Shutdown(ctx)
			})
		}
	}

	vols, err := prepareVolumes(setupCtx, client, compiled, containerID, rec.IfName, dir, &td)
	if err != nil {
		return err
	}

	addrs := []string{att.IPv4.String()}
	if att.IPv6.IsValid() {
		addrs = append(addrs, att.IPv6.String())
	}
	// Take over signal handling before announcing the command: a signal
	// from here on is queued and forwarded to it once it runs; one that
	// arrived during the setup aborts the run.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, forwardedSignals...)
	defer signal.Stop(sigs)
	if setupCtx.Err() != nil { // interrupted during the setup
		return &exitError{130}
	}
	stopSetup() // (it cancels setupCtx too: check first)
	fmt.Fprintf(os.Stderr, "cleanwall: sandbox %s (%s) enforcing policy %q: %d egress rule(s); running %s\n",
		o.name, strings.Join(addrs, ", "), compiled.Name, len(compiled.Rules), strings.Join(o.command, " "))

	status := runCommand(nsPath, o.command, sigs, vols)

	if sb, err := client.Get(context.Background(), containerID, rec.IfName); err == nil {
		printSummary(os.Stderr, o.name, o.command, status, sb)
	} else {
		fmt.Fprintf(os.Stderr, "cleanwall: reading the counters: %v\n", err)
	}
	td.run()
	if status != 0 {
		return &exitError{status}
	}
	return nil
}

// runtime returns a client for the cleanwalld answering on the socket, or
// starts an embedded one of its own (own socket, pin root, state, marks
// and routing table), torn down with the run. The ownership record in dir
// learns which, before the embedded runtime installs anything.
func (o *runOptions) runtime(ctx context.Context, td *teardown, rec *runRecord, dir string) (*api.Client, *daemon.Daemon, error) {
	client := api.NewClient(o.socket)
	sctx, cancel := context.WithTimeout(ctx, time.Second)
	st, err := client.Status(sctx)
	cancel()
	if err == nil && st.Ready {
		if o.consentURL != "" {
			fmt.Fprintf(os.Stderr, "cleanwall: --consent-url ignored: cleanwalld at %s asks its own consent service\n", client.Socket)
		}
		rec.CNI.Socket = client.Socket
		if err := rec.save(dir); err != nil {
			return nil, nil, fail("%v", err)
		}
		return client, nil, nil
	}
	slot, release, err := acquireSlot()
	if err != nil {
		return nil, nil, err
	}
	td.push(release)
	level := slog.LevelWarn
	if o.verbose {
		level = slog.LevelInfo
	}
	cfg := daemon.Config{
		Socket:       filepath.Join(dir, "cleanwalld.sock"),
		PinRoot:      pinRootOf(os.Getpid()),
		StateDir:     filepath.Join(dir, "state"),
		PolicyDir:    filepath.Join(dir, "policies"),
		RedirectMark: daemon.DefaultRedirectMark | uint32(slot)<<8,
		SocketMark:   daemon.DefaultSocketMark | uint32(slot),
		Table:        daemon.DefaultTable + slot,
		AttachMode:   o.attach,
		Extensions:   o.extensions,
		Logger:       slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
		Version:      version,
	}
	cfg.ConsentURL, cfg.ConsentCA, cfg.ConsentTimeout = o.consentURL, o.consentCA, o.consentTimeout
	if o.keyBroker != "" {
		if cfg.KeyBroker, err = keys.BrokerFromFlags(o.keyBroker, o.brokerCA, o.attestation); err != nil {
			return nil, nil, fail("%v", err)
		}
	}
	d, err := daemon.New(cfg)
	if err != nil {
		return nil, nil, fail("configuring the runtime: %v", err)
	}
	td.push(func() error {
		err := d.Uninstall()
		_ = os.Remove(cfg.PinRoot)
		return err
	})
	rec.Runtime = runtimeRecordOf(slot, d.Config())
	rec.CNI.Socket = cfg.Socket
	if err := rec.save(dir); err != nil {
		return nil, nil, fail("%v", err)
	}
	if err := d.Start(ctx); err != nil {
		return nil, nil, fail("starting the runtime: %v", err)
	}
	// The runtime may place its pins elsewhere than asked (where they
	// outlive it): gc must look there.
	if pins := d.Config().PinRoot; pins != rec.Runtime.PinRoot {
		rec.Runtime.PinRoot = pins
		if err := rec.save(dir); err != nil {
			return nil, nil, fail("%v", err)
		}
	}
	return api.NewClient(cfg.Socket), d, nil
}

// maxSlots bounds concurrent embedded runtimes on one node namespace: each
// slot owns a redirect mark, a socket mark and a routing table.
const maxSlots = 63

// acquireSlot takes the first free slot lock (held for the run's lifetime:
// a killed run frees its slot with its process).
func acquireSlot() (int, func() error, error) {
	for slot := 1; slot <= maxSlots; slot++ {
		release, ok, err := trySlot(slot)
		if err != nil {
			return 0, nil, err
		}
		if ok {
			return slot, release, nil
		}
	}
	return 0, nil, fail("%d cleanwall runs are active: wait for one to end", maxSlots)
}

// trySlot takes a slot's lock if no live run holds it.
func trySlot(slot int) (release func() error, ok bool, err error) {
	path := filepath.Join(runDir, fmt.Sprintf("slot-%d.lock", slot))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, false, fail("opening %s: %v", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, false, nil
	}
	return f.Close, true, nil
}

func serveMetrics(addr string, d *daemon.Daemon) (func() error, error) {
	srv := &http.Server{Addr: addr, Handler: promhttp.HandlerFor(d.Registry(), promhttp.HandlerOpts{}), ReadHeaderTimeout: 5 * time.Second}
	ln, err := netListen(addr)
	if err != nil {
		return nil, err
	}
	go func() { _ = srv.Serve(ln) }()
	return srv.Close, nil
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// printSummary shows what the datapath did with the sandbox's traffic.
func printSummary(w io.Writer, name string, command []string, status int, sb api.Sandbox) {
	fmt.Fprintf(w, "\ncleanwall: %s exited with status %d; sandbox %s summary:\n", command[0], status, name)
	type row struct {
		verdict, what      string
		flows, packets, by uint64
	}
	agg := map[string]*row{}
	for _, c := range sb.Counters {
		var key, what string
		switch c.Verdict {
		case "redirect":
			what = c.Rule
			if what == "" {
				what = "(" + c.Reason + ")"
			}
			if c.Reason == "established" {
				continue // packets of flows already counted
			}
			key = "redirect/" + what
		case "drop":
			what = c.Reason
			key = "drop/" + what
		default:
			continue
		}
		r := agg[key]
		if r == nil {
			r = &row{verdict: c.Verdict, what: what}
			agg[key] = r
		}
		r.flows += c.Flows
		r.packets += c.Packets
		r.by += c.Bytes
	}
	rows := make([]*row, 0, len(agg))
	for _, r := range agg {
		rows = append(rows, r)
	}
	sort.Slice(rows, func(i, j int) bool {
		if rows[i].verdict != rows[j].verdict {
			return rows[i].verdict > rows[j].verdict
		}
		return rows[i].what < rows[j].what
	})
	if len(rows) == 0 {
		fmt.Fprintln(w, "  no traffic")
		return
	}
	fmt.Fprintf(w, "  %-10s %-24s %8s %9s\n", "verdict", "rule / reason", "flows", "packets")
	for _, r := range rows {
		verdict := "redirected"
		if r.verdict == "drop" {
			verdict = "dropped"
		}
		fmt.Fprintf(w, "  %-10s %-24s %8d %9d\n", verdict, r.what, r.flows, r.packets)
	}
}
