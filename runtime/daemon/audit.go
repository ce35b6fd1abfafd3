package daemon

import (
	"crypto/ed25519"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cleanwall/cleanwall/governance/audit"
	"github.com/cleanwall/cleanwall/runtime/keys"
)

// Audit record kinds written by the daemon.
const (
	auditStart         = "daemon.start"
	auditOpen          = "audit.open"
	auditSandboxAdd    = "sandbox.add"
	auditSandboxRefuse = "sandbox.add.refused"
	auditSandboxDelete = "sandbox.delete"
	auditPolicyApply   = "policy.apply"
	auditPolicyRefuse  = "policy.apply.refused"
	auditDenyDatapath  = "deny.datapath"
	auditDenyDNS       = "deny.dns"
	auditDenyHTTP      = "deny.http"
	auditDenyProxy     = "deny.proxy"
	auditDenySuppress  = "deny.suppressed"
	auditRepair        = "watchdog.repair"
	auditKeyLapse      = "key.lapse"
)

// Defaults of the audit trail.
const (
	// DefaultAuditCheckpointInterval is how often a signed checkpoint is
	// written when records were added.
	DefaultAuditCheckpointInterval = 10 * time.Second
	// DefaultAuditMaxSize is the size past which the audit log rotates.
	DefaultAuditMaxSize = 64 << 20
	// NodeKeyFile is the node key's name in the state dir.
	NodeKeyFile = "node.key"
)

// maxDenyRecordsPerSecond bounds deny records: a sandbox flooding denied
// traffic must not flood the audit trail (the datapath counters stay exact;
// the suppressed count is itself recorded).
const maxDenyRecordsPerSecond = 50

// auditor appends to the hash-chained audit log (governance/audit). Every
// record is on disk (written and fsynced) when record returns: the API
// handlers record before they answer, so an acknowledged operation is
// recorded. A failure to audit is logged loudly and counted; use recordErr
// where the caller must not go on without the record.
type auditor struct {
	log   *slog.Logger
	chain *audit.Log
	sink  *audit.Forwarder
	lost  prometheus.Counter // nil until openAudit

	mu         sync.Mutex
	window     time.Time
	denies     int
	suppressed int
}

func (a *auditor) record(kind string, fields map[string]any) {
	_ = a.recordErr(kind, fields)
}

// recordErr appends a record and returns once it is durable (fsynced), or
// with the error that kept it from being written: a caller that must not act
// on an unrecorded decision (a fresh consent answer, say) treats an error as
// a refusal. Without an audit log (--audit-log -) it returns nil.
func (a *auditor) recordErr(kind string, fields map[string]any) error {
	if a == nil || a.chain == nil {
		return nil
	}
	if _, err := a.chain.Append(kind, fields); err != nil {
		a.log.Error("audit record lost", "kind", kind, "error", err)
		if a.lost != nil {
			a.lost.Inc()
		}
		return fmt.Errorf("audit record %s not written: %w", kind, err)
	}
	return nil
}

// deny records a denial, rate-limited.
func (a *auditor) deny(kind string, fields map[string]any) {
	if a == nil || a.chain == nil {
		return
	}
	a.mu.Lock()
	now := time.Now()
	var flush int
	if now.Sub(a.window) >= time.Second {
		flush, a.window, a.denies, a.suppressed = a.suppressed, now, 0, 0
	}
	allowed := a.denies < maxDenyRecordsPerSecond
	if allowed {
		a.denies++
	} else {
		a.suppressed++
	}
	a.mu.Unlock()
	if flush > 0 {
		a.record(auditDenySuppress, map[string]any{"count": flush})
	}
	if allowed {
		a.record(kind, fields)
	}
}

// keyAuditErr is the key ring's AuditErr: a granted release is recorded,
// durably, before the key is held or used, and counted; an error withholds
// the key (the ring then records and counts a refusal).
func (d *Daemon) keyAuditErr(kind string, fields map[string]any) error {
	if err := d.audit.recordErr(kind, fields); err != nil {
		return err
	}
	if kind == keys.AuditRelease {
		d.metrics.KeyReleases.WithLabelValues("released").Inc()
	}
	return nil
}

// nodeKey is the public key that signs the log's checkpoints (nil without
// a log).
func (a *auditor) nodeKey() ed25519.PublicKey {
	if a == nil || a.chain == nil {
		return nil
	}
	return a.chain.NodeKey()
}

// sinkDrainTimeout bounds how long a stopping daemon waits for the sink to
// acknowledge the last records.
const sinkDrainTimeout = 2 * time.Second

// close writes a last checkpoint, gives the sink a moment to acknowledge it
// (what it has not acknowledged stays in the log for the next start), stops
// the forwarder and closes the log.
func (a *auditor) close() {
	if a == nil {
		return
	}
	if a.sink != nil {
		if a.chain != nil {
			if _, err := a.chain.Checkpoint(); err != nil {
				a.log.Error("last audit checkpoint", "error", err)
			}
		}
		for deadline := time.Now().Add(sinkDrainTimeout); a.sink.Backlog() > 0 && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
		a.sink.Close()
		a.sink = nil
	}
	if a.chain != nil {
		if err := a.chain.Close(); err != nil {
			a.log.Error("closing the audit log", "error", err)
		}
	}
}

// openAudit opens the audit trail the configuration asks for: the node key
// (created at the first start), the log with its checkpoints and rotation,
// and the sink forwarder; it registers the audit metrics.
func (d *Daemon) openAudit() error {
	d.audit = &auditor{log: d.log}
	if d.cfg.AuditLog == "-" {
		return nil
	}
	keyPath := d.cfg.NodeKey
	if keyPath == "" {
		keyPath = filepath.Join(d.cfg.StateDir, NodeKeyFile)
	}
	key, created, err := audit.LoadOrCreateNodeKey(keyPath)
	if err != nil {
		return fmt.Errorf("--node-key: %w", err)
	}
	pub := key.Public().(ed25519.PublicKey)
	if created {
		d.log.Info("created the node key that signs audit checkpoints", "file", keyPath, "public_key", audit.EncodeNodeKey(pub))
	}
	interval := d.cfg.AuditCheckpointInterval
	switch {
	case interval == 0:
		interval = DefaultAuditCheckpointInterval
	case interval < 0:
		interval = 0
	}
	maxSize := d.cfg.AuditMaxSize
	switch {
	case maxSize == 0:
		maxSize = DefaultAuditMaxSize
	case maxSize < 0:
		maxSize = 0
	}
	if d.cfg.AuditKeep < 0 {
		return fmt.Errorf("--audit-keep %d: want 0 (keep every file) or more", d.cfg.AuditKeep)
	}
	l, err := audit.Open(d.cfg.AuditLog, audit.Options{Signer: key, CheckpointInterval: interval, MaxSize: maxSize,
		Keep: d.cfg.AuditKeep, Logger: d.log.With("part", "audit")})
	if err != nil {
		return fmt.Errorf("opening the audit log: %w", err)
	}
	d.audit.chain = l
	open := map[string]any{"nodeKey": audit.EncodeNodeKey(pub), "nodeKeyCreated": created, "checkpointSeconds": interval.Seconds(),
		"maxSize": maxSize, "keep": d.cfg.AuditKeep}
	if d.cfg.AuditSink != "" {
		var roots *x509.CertPool
		if d.cfg.AuditSinkCA != "" {
			pem, err := os.ReadFile(d.cfg.AuditSinkCA)
			if err != nil {
				return fmt.Errorf("--audit-sink-ca: %w", err)
			}
			roots = x509.NewCertPool()
			if !roots.AppendCertsFromPEM(pem) {
				return fmt.Errorf("--audit-sink-ca %s: no PEM certificate in it", d.cfg.AuditSinkCA)
			}
		}
		fw, err := l.Forward(audit.SinkOptions{URL: d.cfg.AuditSink, Roots: roots, Logger: d.log.With("part", "audit-sink")})
		if err != nil {
			return fmt.Errorf("--audit-sink: %w", err)
		}
		d.audit.sink = fw
		if u, err := url.Parse(d.cfg.AuditSink); err == nil {
			open["sink"] = u.Host // the path may carry a token
		}
	}
	d.audit.lost = prometheus.NewCounter(prometheus.CounterOpts{Name: "cleanwall_audit_records_lost_total",
		Help: "Audit records that could not be written (the operation they describe was logged as unaudited)."})
	cs := []prometheus.Collector{d.audit.lost,
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "cleanwall_audit_records_total",
			Help: "Records in the audit log's chain (its last seq)."}, func() float64 { return float64(l.Durable()) }),
	}
	if fw := d.audit.sink; fw != nil {
		cs = append(cs,
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cleanwall_audit_sink_backlog_records",
				Help: "Audit records on disk that the sink has not acknowledged."}, func() float64 { return float64(fw.Backlog()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "cleanwall_audit_sink_failures_total",
				Help: "Failed deliveries to the audit sink (each retried with backoff)."}, func() float64 { return float64(fw.Failures()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "cleanwall_audit_sink_delivered_records_total",
				Help: "Audit records the sink acknowledged since start."}, func() float64 { return float64(fw.Delivered()) }),
		)
	}
	if d.metrics != nil {
		for _, c := range cs {
			if err := d.metrics.Registry.Register(c); err != nil {
				return fmt.Errorf("audit metrics: %w", err)
			}
		}
	}
	d.log.Info("audit trail", "log", d.cfg.AuditLog, "node_key", audit.EncodeNodeKey(pub), "checkpoint_interval", interval,
		"max_size", maxSize, "keep", d.cfg.AuditKeep, "sink", open["sink"])
	return d.audit.recordErr(auditOpen, open)
}

// ByteSize is a flag value of bytes: a number with an optional KiB, MiB,
// GiB (or K, M, G) suffix.
type ByteSize int64

func (b *ByteSize) String() string { return strconv.FormatInt(int64(*b), 10) }

// Set parses "64MiB", "512K", "1048576".
func (b *ByteSize) Set(s string) error {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1}} {
		if rest, ok := strings.CutSuffix(t, u.suffix); ok {
			t, mult = rest, u.mult
			break
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(t), 10, 64)
	if err != nil {
		return fmt.Errorf("%q is not a size (e.g. 64MiB)", s)
	}
	*b = ByteSize(n * mult)
	return nil
}
