package daemon

import (
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cleanwall/cleanwall/governance/audit"
	"github.com/cleanwall/cleanwall/internal/testutil"
)

func gauge(t *testing.T, d *Daemon, name string) float64 {
	t.Helper()
	mfs, err := d.metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			m := mf.GetMetric()[0]
			if m.Gauge != nil {
				return m.Gauge.GetValue()
			}
			return m.Counter.GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// The daemon's audit trail: a node key made at the first start (0600) and
// kept, signed checkpoints, rotation, and a sink whose backlog is a metric
// and which gets every record once the sink answers.
func TestDaemonAuditTrail(t *testing.T) {
	var down atomic.Bool
	down.Store(true)
	var mu sync.Mutex
	var got []string
	sink := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if down.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		body, err := io.ReadAll(r.Body)
		if err != nil {
			t.Error(err)
		}
		lines := strings.SplitAfter(string(body), "\n")
		mu.Lock()
		got = append(got, lines[:len(lines)-1]...)
		mu.Unlock()
		w.Write([]byte(`{"through":` + r.Header.Get(audit.HeaderLastSeq) + `}`))
	}))
	defer sink.Close()
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: sink.Certificate().Raw}), 0o600)

	state := t.TempDir()
	cfg := Config{StateDir: state, Logger: testutil.Logger(t), AuditMaxSize: 2 << 10, AuditCheckpointInterval: -1,
		AuditSink: sink.URL + "/v1/audit", AuditSinkCA: caFile}
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.openAudit(); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(state, NodeKeyFile))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("node key: %v %v", st, err)
	}
	pub := d.audit.nodeKey()
	for i := range 40 {
		if err := d.audit.recordErr(auditSandboxAdd, map[string]any{"sandbox": "c-" + strings.Repeat("x", i)}); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for gauge(t, d, "cleanwall_audit_sink_failures_total") == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no failed delivery while the sink answers 503")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if b := gauge(t, d, "cleanwall_audit_sink_backlog_records"); b < 41 {
		t.Fatalf("backlog %v with the sink down, want >= 41", b)
	}
	down.Store(false)
	for gauge(t, d, "cleanwall_audit_sink_backlog_records") != 0 {
		if time.Now().After(deadline) {
			t.Fatal("backlog not delivered")
		}
		time.Sleep(10 * time.Millisecond)
	}
	d.audit.close()
	files, _ := audit.Files(filepath.Join(state, "audit.jsonl"))
	sum, err := audit.VerifyFiles(files, audit.VerifyOptions{NodeKey: pub})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 3 || sum.Kinds[auditOpen] != 1 || sum.Kinds[auditSandboxAdd] != 40 || sum.LastCheckpoint != sum.LastSeq {
		t.Fatalf("%d files, summary %+v", len(files), sum)
	}
	mu.Lock()
	defer mu.Unlock()
	// Everything was delivered once, in order (the last checkpoint, written
	// at close, within the 2 s the close gives the sink).
	if len(got) != int(sum.LastSeq) && len(got) != int(sum.LastSeq)-1 {
		t.Fatalf("sink got %d records, the log has %d", len(got), sum.LastSeq)
	}
	for i, line := range got {
		if !strings.HasPrefix(line, fmt.Sprintf(`{"seq":%d,`, i+1)) {
			t.Fatalf("sink record %d is %.40s", i+1, line)
		}
	}

	// The next start keeps the key and continues the chain.
	d2, err := New(Config{StateDir: state, Logger: testutil.Logger(t), AuditCheckpointInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	if err := d2.openAudit(); err != nil {
		t.Fatal(err)
	}
	if !d2.audit.nodeKey().Equal(pub) {
		t.Fatal("the node key changed across starts")
	}
	// A second daemon on the same log is refused.
	d3, _ := New(Config{StateDir: state, Logger: testutil.Logger(t)})
	if err := d3.openAudit(); !errors.Is(err, audit.ErrLocked) {
		t.Fatalf("second daemon on one log: %v", err)
	}
	d2.audit.close()
	// A group-readable node key is refused.
	os.Chmod(filepath.Join(state, NodeKeyFile), 0o644)
	d4, _ := New(Config{StateDir: state, Logger: testutil.Logger(t)})
	if err := d4.openAudit(); err == nil || !strings.Contains(err.Error(), "--node-key") {
		t.Fatalf("group-readable node key: %v", err)
	}
}

func TestByteSize(t *testing.T) {
	for in, want := range map[string]int64{"64MiB": 64 << 20, "512K": 512 << 10, "1048576": 1 << 20, "1GiB": 1 << 30, "-1": -1} {
		var b ByteSize
		if err := b.Set(in); err != nil || int64(b) != want {
			t.Errorf("%s = %d, %v", in, b, err)
		}
	}
	var b ByteSize
	if err := b.Set("lots"); err == nil {
		t.Error("lots parsed")
	}
}

// An ADD whose record cannot be written is not acknowledged: the sandbox is
// taken back down and the CNI plugin gets the error.
func TestAddNotAcknowledgedUnaudited(t *testing.T) {
	td := startTest(t, Config{})
	if _, err := td.client.Add(ctx(), td.request("ok", 2, openPolicy)); err != nil {
		t.Fatal(err)
	}
	// The log fails (as after a failed fsync): closed, every Append errs.
	td.audit.lost = prometheus.NewCounter(prometheus.CounterOpts{Name: "lost"})
	td.audit.chain.Close()
	_, err := td.client.Add(ctx(), td.request("unaudited", 3, openPolicy))
	if err == nil || !strings.Contains(err.Error(), "not admitted") || !strings.Contains(err.Error(), "audit") {
		t.Fatalf("ADD with a failed audit log = %v", err)
	}
	list, err := td.client.List(ctx())
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].ID != "c-ok" {
		t.Fatalf("sandboxes after the unaudited ADD: %+v", list)
	}
	if n := promtest.ToFloat64(td.audit.lost); n < 1 {
		t.Fatalf("lost records counted: %v", n)
	}
}
