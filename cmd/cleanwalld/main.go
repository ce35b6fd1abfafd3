// Command cleanwalld is cleanwall's node daemon: it loads and pins the
// datapath, attaches it to sandboxes on request of the CNI plugin, runs the
// transparent proxies and serves the unix-socket API.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/cleanwall/cleanwall/governance/telemetry"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/daemon"
	"github.com/cleanwall/cleanwall/runtime/keys"
)

var version = "dev"

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "cleanwalld:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("cleanwalld", flag.ContinueOnError)
	var cfg daemon.Config
	fs.StringVar(&cfg.Socket, "socket", api.DefaultSocket, "unix socket of the API")
	fs.StringVar(&cfg.PinRoot, "bpf-root", daemon.DefaultPinRoot, "bpffs directory for pinned maps and links (mounted when missing)")
	fs.StringVar(&cfg.StateDir, "state-dir", daemon.DefaultStateDir, "directory for persisted sandbox state")
	fs.StringVar(&cfg.PolicyDir, "policy-dir", daemon.DefaultPolicyDir, "directory of named policies (CNI_ARGS CLEANWALL_POLICY=<name> selects <name>.yaml)")
	fs.StringVar(&cfg.VolumeDir, "volume-dir", daemon.DefaultVolumeDir, "where the sandboxes' volumes are mounted, <dir>/<containerID>@<ifName>/<name> (docs/volumes-lifecycle.md)")
	fs.StringVar(&cfg.AuditLog, "audit-log", "", "hash-chained audit log (default <state-dir>/audit.jsonl; - disables it)")
	fs.StringVar(&cfg.NodeKey, "node-key", "", "Ed25519 key (PEM, 0600) that signs audit checkpoints and is bound into key releases (default <state-dir>/node.key, created at the first start)")
	fs.DurationVar(&cfg.AuditCheckpointInterval, "audit-checkpoint-interval", daemon.DefaultAuditCheckpointInterval, "signed audit checkpoint every this long when records were added (negative: only at rotation and stop)")
	cfg.AuditMaxSize = daemon.DefaultAuditMaxSize
	fs.Var((*daemon.ByteSize)(&cfg.AuditMaxSize), "audit-max-size", "rotate the audit log before it passes this size (e.g. 64MiB; negative: never)")
	fs.IntVar(&cfg.AuditKeep, "audit-keep", 0, "rotated audit files kept (0: all); files the sink has not acknowledged are always kept")
	fs.StringVar(&cfg.AuditSink, "audit-sink", "", "forward audit records to this HTTPS sink (docs/audit.md); empty: off")
	fs.StringVar(&cfg.AuditSinkCA, "audit-sink-ca", "", "PEM file of the CAs the audit sink's certificate chains to (empty: the system roots)")
	fs.StringVar(&cfg.AttachMode, "attach", "auto", "auto (tcx, else legacy tc), tcx, or tc")
	pprofAddr := fs.String("pprof-addr", "", "serve Go's pprof profiles on this address (e.g. 127.0.0.1:6060); empty: off")
	metricsAddr := fs.String("metrics-addr", "", "serve Prometheus metrics on this address (e.g. 127.0.0.1:9464); empty: off")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	check := fs.Bool("check", false, "load and pin the datapath, install routing, open the listeners, report, and exit")
	var maxRules, maxSandboxes, maxCounters uint
	fs.UintVar(&maxRules, "max-rules", 0, "rule map size: datapath entries across all sandboxes, both generations (0: 262144); a full map fails the ADD or apply that needs more, never the datapath")
	fs.UintVar(&maxSandboxes, "max-sandboxes", 0, "sandbox map size (0: 4096)")
	fs.UintVar(&maxCounters, "max-counters", 0, "counter map size (0: 65536)")
	keyBroker := fs.String("keybroker", "", "key broker URL (https://host:port): releases the data keys of secure-mode rules to this node's attestation")
	brokerCA := fs.String("broker-ca", "", "PEM file of the CA(s) the key broker's TLS certificate chains to (default: system roots)")
	attestation := fs.String("attestation", "snp", "evidence for the key broker: snp (SEV-SNP guest device) or simulated (labelled fake: tests and demos only)")
	fs.StringVar(&cfg.ConsentURL, "consent-url", "", "consent service (https://host:port, docs/consent.md): policies with spec.governance.consent: required run only while it allows; without it such policies are refused")
	fs.StringVar(&cfg.ConsentCA, "consent-ca", "", "PEM file of the CA(s) the consent service's TLS certificate chains to (default: system roots)")
	fs.DurationVar(&cfg.ConsentTimeout, "consent-timeout", 2*time.Second, "bound of each consent request; no answer in time is a deny")
	var tcpPort, udpPort, dnsPort uint
	fs.UintVar(&tcpPort, "tcp-port", 0, "TCP proxy listener port (0: kernel-chosen)")
	fs.UintVar(&udpPort, "udp-port", 0, "UDP proxy socket port (0: kernel-chosen)")
	fs.UintVar(&dnsPort, "dns-port", 0, "DNS proxy port, UDP and TCP (0: kernel-chosen)")
	fs.DurationVar(&cfg.FQDNMinTTL, "fqdn-min-ttl", 0, "shortest time an address learnt through DNS stays allowed (0: 30s)")
	fs.DurationVar(&cfg.FQDNMaxTTL, "fqdn-max-ttl", 0, "longest time an address learnt through DNS stays allowed (0: 1h)")
	fs.Float64Var(&cfg.DNSQueriesPerSecond, "dns-rate", 0, "DNS queries per second per sandbox, burst twice that (0: 100; negative: unlimited); queries beyond it are answered REFUSED and counted rate_limited")
	fs.IntVar(&cfg.Limits.TCPFlows, "max-tcp-flows", daemon.DefaultLimits.TCPFlows, "concurrent TCP flows per sandbox (negative: unlimited); a policy's spec.limits can lower it")
	fs.IntVar(&cfg.Limits.UDPFlows, "max-udp-flows", daemon.DefaultLimits.UDPFlows, "concurrent UDP flows per sandbox (negative: unlimited)")
	fs.Float64Var(&cfg.Limits.NewFlowsPerSecond, "flow-rate", daemon.DefaultLimits.NewFlowsPerSecond, "new TCP and UDP flows per second per sandbox, burst twice that (negative: unlimited)")
	fs.IntVar(&cfg.Limits.DNSInFlight, "max-dns-inflight", daemon.DefaultLimits.DNSInFlight, "DNS queries over UDP answered at once per sandbox (negative: unlimited)")
	fs.Float64Var(&cfg.DenyEventsPerSecond, "deny-event-rate", daemon.DefaultDenyEventsPerSecond, "deny events per second per sandbox reported by the datapath (observe, audit, log), burst twice that; every drop is counted regardless (negative: report every drop)")
	fs.DurationVar(&cfg.WatchdogInterval, "watchdog-interval", daemon.DefaultWatchdogInterval, "how often attachments, pins and the nftables wall are verified; what is missing is put back within about one interval")
	fs.Func("extension", "an out-of-process privacy proxy, NAME=unix:/path (repeatable): open rules with open.protocol NAME hand their flows to the extension listening on that SOCK_SEQPACKET socket (docs/extensions.md)", func(v string) error {
		cfg.Extensions = append(cfg.Extensions, v)
		return nil
	})
	fs.BoolVar(&cfg.DNSRefuseNXDomain, "dns-nxdomain", false, "answer names the policy does not allow with NXDOMAIN instead of REFUSED")
	otlpEndpoint := fs.String("otlp-endpoint", "", "export the metrics to an OpenTelemetry collector, OTLP/HTTP over TLS: https://HOST:PORT[/path] (default path /v1/metrics; docs/telemetry.md); empty: off")
	otlpCA := fs.String("otlp-ca", "", "PEM file of the CA(s) the collector's TLS certificate chains to (default: system roots)")
	otlpInterval := fs.Duration("otlp-interval", telemetry.DefaultInterval, "how often the metrics are exported to --otlp-endpoint")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	cfg.TCPPort, cfg.UDPPort, cfg.DNSPort = uint16(tcpPort), uint16(udpPort), uint16(dnsPort)
	cfg.MaxRules, cfg.MaxSandboxes, cfg.MaxCounters = uint32(maxRules), uint32(maxSandboxes), uint32(maxCounters)
	cfg.Version = version

	if *keyBroker != "" {
		kb, err := keys.BrokerFromFlags(*keyBroker, *brokerCA, *attestation)
		if err != nil {
			return err
		}
		cfg.KeyBroker = kb
	}
	d, err := daemon.New(cfg)
	if err != nil {
		return err
	}
	var otlp *telemetry.Config
	if *otlpEndpoint != "" {
		otlp = &telemetry.Config{Endpoint: *otlpEndpoint, CAFile: *otlpCA, Interval: *otlpInterval, Gatherer: d.Registry(), Version: version, Logger: cfg.Logger}
		if err := otlp.Check(); err != nil { // before anything is loaded
			return err
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := d.Start(ctx); err != nil {
		return err
	}
	if *check {
		st := d.Config()
		fmt.Printf("ok: datapath pinned at %s, sandboxes re-adopted, proxies listening\n", st.PinRoot)
		return d.Close()
	}
	if *metricsAddr != "" {
		srv := &http.Server{Addr: *metricsAddr, Handler: promhttp.HandlerFor(d.Registry(), promhttp.HandlerOpts{}), ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				cfg.Logger.Error("metrics server", "error", err)
			}
		}()
		defer srv.Close()
	}
	if otlp != nil {
		exp, err := telemetry.Start(ctx, *otlp)
		if err != nil {
			_ = d.Close()
			return err
		}
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = exp.Shutdown(sctx) // a last export
		}()
	}
	if *pprofAddr != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		srv := &http.Server{Addr: *pprofAddr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				cfg.Logger.Error("pprof server", "error", err)
			}
		}()
		defer srv.Close()
	}
	<-ctx.Done()
	cfg.Logger.Info("shutting down: sandboxes stay enforced (pinned), new flows drop until restart")
	return d.Close()
}
