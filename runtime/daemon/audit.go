package daemon

import (
	"log/slog"
	"sync"
	"time"

	"github.com/cleanwall/cleanwall/governance/audit"
)

// Audit record kinds written by the daemon.
const (
	auditStart         = "daemon.start"
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

// maxDenyRecordsPerSecond bounds deny records: a sandbox flooding denied
// traffic must not flood the audit trail (the datapath counters stay exact;
// the suppressed count is itself recorded).
const maxDenyRecordsPerSecond = 50

// auditor appends to the hash-chained audit log (governance/audit). A
// failure to audit is logged loudly; it never opens anything.
type auditor struct {
	log   *slog.Logger
	chain *audit.Log

	mu         sync.Mutex
	window     time.Time
	denies     int
	suppressed int
}

func (a *auditor) record(kind string, fields map[string]any) {
	if a == nil || a.chain == nil {
		return
	}
	if _, err := a.chain.Append(kind, fields); err != nil {
		a.log.Error("audit record lost", "kind", kind, "error", err)
	}
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

func (a *auditor) close() {
	if a != nil && a.chain != nil {
		a.chain.Close()
	}
}
