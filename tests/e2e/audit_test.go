package e2e

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/governance/audit"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// The daemon keeps a tamper-evident trail of sandbox lifecycle, policy
// changes and denials; cleanwall audit verify checks the chain.
func TestAuditTrail(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	sb := env.MustAddSandbox("audit", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
	if c, err := sb.Dial("tcp4", "198.51.100.10:9999", time.Second); err == nil {
		c.Close()
	}
	if _, err := apply(t, d, sb, policyPorts("audited", 8081)); err != nil {
		t.Fatal(err)
	}
	if err := sb.Del(); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(d.StateDir, "audit.jsonl")
	verify := func() (string, error) {
		out, err := exec.Command(filepath.Join(env.Bin, "cleanwall"), "audit", "verify", logPath).CombinedOutput()
		return string(out), err
	}
	var out string
	ok := harness.Eventually(5*time.Second, func() bool {
		var err error
		out, err = verify()
		return err == nil && strings.Contains(out, "deny.datapath")
	})
	if !ok {
		t.Fatalf("audit log lacks records or fails to verify:\n%s", out)
	}
	for _, kind := range []string{"daemon.start", "sandbox.add", "policy.apply", "sandbox.delete", "deny.datapath"} {
		if !strings.Contains(out, kind) {
			t.Errorf("no %s record:\n%s", kind, out)
		}
	}
	// Tamper with one record: verification names it.
	data, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	tampered := bytes.Replace(data, []byte(`"policy":"e2e"`), []byte(`"policy":"e3e"`), 1)
	if bytes.Equal(tampered, data) {
		t.Fatal("nothing to tamper with")
	}
	if err := os.WriteFile(logPath, tampered, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err = verify()
	if err == nil || !strings.Contains(out, "audit.jsonl:") || !strings.Contains(out, "hash does not match") {
		t.Fatalf("a tampered log verified:\n%s", out)
	}
}

// auditSink is a sink as docs/audit.md describes: it stores each record
// once, in order, checks the chain, and acknowledges what it stored.
type auditSink struct {
	mu       sync.Mutex
	lines    []string
	lastHash string
	dupes    int
}

func (s *auditSink) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil || r.Header.Get("Content-Type") != audit.SinkContentType {
		http.Error(w, "bad batch", http.StatusBadRequest)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, line := range strings.SplitAfter(string(body), "\n") {
		if line == "" {
			continue
		}
		var rec audit.Record
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			break
		}
		have := uint64(len(s.lines))
		if rec.Seq <= have {
			s.dupes++
			continue
		}
		if rec.Seq != have+1 || (have > 0 && rec.PrevHash != s.lastHash) {
			break
		}
		s.lines = append(s.lines, line)
		s.lastHash = rec.Hash
	}
	json.NewEncoder(w).Encode(audit.SinkAck{Through: uint64(len(s.lines))})
}

// auditMetric reads one unlabelled sample from the daemon's metrics (-1: absent).
func auditMetric(d *harness.Daemon, name string) float64 {
	text, err := d.Metrics()
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}

// The daemon's audit trail beyond one file: signed checkpoints, rotation by
// size with the chain continuing, a sink that is down at first (the backlog
// grows, nothing is lost) and then gets every record once, in order; the
// node key file signs it all; and an ADD acknowledged just before the
// daemon is SIGKILLed is in the log.
func TestAuditRotationSinkAndCrash(t *testing.T) {
	env := harness.New(t)
	pki := env.NewPKI("audit-sink")
	cert := pki.Issue("audit-sink", []string{harness.RemoteIP.String()}, false, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
	sinkAddr := net.JoinHostPort(harness.RemoteIP.String(), "9443")
	d := env.StartDaemon("--audit-max-size", "4KiB", "--audit-checkpoint-interval", "200ms",
		"--audit-sink", "https://"+sinkAddr+"/v1/audit", "--audit-sink-ca", pki.CAFile)
	sb := env.MustAddSandbox("audited", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
	for i := range 5 {
		if _, err := apply(t, d, sb, policyPorts("audited", 8081+i)); err != nil {
			t.Fatal(err)
		}
	}
	// The sink is not there yet: deliveries fail, the backlog holds.
	if !harness.Eventually(10*time.Second, func() bool { return auditMetric(d, "cleanwall_audit_sink_failures_total") >= 1 }) {
		t.Fatal("no failed delivery counted while the sink is down")
	}
	if b := auditMetric(d, "cleanwall_audit_sink_backlog_records"); b < 7 {
		t.Fatalf("backlog %v with the sink down", b)
	}
	sink := &auditSink{}
	var l net.Listener
	if err := env.InRemote(func() (err error) { l, err = net.Listen("tcp", sinkAddr); return err }); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: sink, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}, ErrorLog: log.New(io.Discard, "", 0)}
	go srv.ServeTLS(l, "", "")
	defer srv.Close()
	if !harness.Eventually(20*time.Second, func() bool { return auditMetric(d, "cleanwall_audit_sink_backlog_records") == 0 }) {
		t.Fatalf("backlog not delivered: %v", auditMetric(d, "cleanwall_audit_sink_backlog_records"))
	}

	// SIGKILL right after an acknowledged ADD: the ADD is in the log.
	sb2 := env.MustAddSandbox("acked", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
	d.Kill()
	_ = sb2
	logPath := filepath.Join(d.StateDir, "audit.jsonl")
	files, err := audit.Files(logPath)
	if err != nil || len(files) < 2 {
		t.Fatalf("files %v (%v): no rotation at 4KiB", files, err)
	}
	var adds []string
	sum, err := audit.VerifyFiles(files, audit.VerifyOptions{Visit: func(_ string, _ int, r audit.Record) {
		if r.Kind == "sandbox.add" {
			adds = append(adds, r.Fields["sandbox"].(string))
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	if len(adds) != 2 || !strings.HasPrefix(adds[1], sb2.ContainerID) {
		t.Fatalf("sandbox.add records %v, want the acknowledged %s", adds, sb2.ContainerID)
	}
	if sum.Checkpoints < len(files)-1 {
		t.Fatalf("%d checkpoints for %d files", sum.Checkpoints, len(files))
	}
	// Every record the sink acknowledged is the log's, once, in order.
	sink.mu.Lock()
	got := append([]string(nil), sink.lines...)
	dupes := sink.dupes
	sink.mu.Unlock()
	var local []string
	for _, f := range files {
		b, _ := os.ReadFile(f)
		local = append(local, strings.SplitAfter(strings.TrimSuffix(string(b), "\n"), "\n")...)
	}
	for i := range local {
		if !strings.HasSuffix(local[i], "\n") {
			local[i] += "\n"
		}
	}
	if len(got) == 0 || len(got) > len(local) || dupes != 0 {
		t.Fatalf("sink has %d records (%d duplicates), the log %d", len(got), dupes, len(local))
	}
	for i := range got {
		if got[i] != local[i] {
			t.Fatalf("sink record %d differs from the log:\n%s%s", i+1, got[i], local[i])
		}
	}

	// A restart continues the chain, signs with the same key, and sends the
	// rest; cleanwall audit verify checks it all against the node key file.
	d.Start()
	if !harness.Eventually(20*time.Second, func() bool { return auditMetric(d, "cleanwall_audit_sink_backlog_records") == 0 }) {
		t.Fatal("backlog after restart not delivered")
	}
	d.Stop()
	out, err := exec.Command(filepath.Join(env.Bin, "cleanwall"), "audit", "verify", "--node-key", filepath.Join(d.StateDir, "node.key"), d.StateDir).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "chain intact") || !strings.Contains(string(out), "signed checkpoints by node key") {
		t.Fatalf("cleanwall audit verify: %v\n%s", err, out)
	}
	sink.mu.Lock()
	defer sink.mu.Unlock()
	// The SIGKILL may have come between the sink's acknowledgement and the
	// cursor's write: the batch is sent again, and the sink's dedup by seq
	// keeps one copy. After a clean stop the sink has every record.
	if err := audit.Verify(strings.NewReader(strings.Join(sink.lines, ""))); err != nil {
		t.Fatalf("the sink's copy: %v", err)
	}
	final, err := audit.VerifyFiles(mustAuditFiles(t, logPath), audit.VerifyOptions{})
	if err != nil || uint64(len(sink.lines)) != final.LastSeq {
		t.Fatalf("the sink holds %d records, the log %d (%v)", len(sink.lines), final.LastSeq, err)
	}
	out, err = exec.Command(filepath.Join(env.Bin, "cleanwall"), "audit", "show", "--kind", "sandbox", "--sandbox", sb2.ContainerID, d.StateDir).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "sandbox.add") {
		t.Fatalf("cleanwall audit show: %v\n%s", err, out)
	}
	t.Logf("%d files, %d records, %d checkpoints; sink holds %d\n%s", len(files), sum.Records, sum.Checkpoints, len(sink.lines), out)
}

func mustAuditFiles(t *testing.T, path string) []string {
	t.Helper()
	files, err := audit.Files(path)
	if err != nil {
		t.Fatal(err)
	}
	return files
}
