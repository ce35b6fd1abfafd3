package e2e

import (
	"bytes"
	"crypto/ed25519"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/governance/audit"
	"github.com/cleanwall/cleanwall/internal/netns"
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
	certFile, keyFile := pki.WriteKeyPair("audit-sink", pki.Issue("audit-sink", []string{harness.RemoteIP.String()}, false, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)))
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
	// The reference sink, cleanwall audit sink, in the remote namespace.
	// It stores only this node's records: its key, from the node key file.
	sinkDir := filepath.Join(env.Dir, "sink")
	nodeKey, err := audit.ReadNodeKey(filepath.Join(d.StateDir, "node.key"))
	if err != nil {
		t.Fatal(err)
	}
	allowed := filepath.Join(env.Dir, "node-keys")
	os.WriteFile(allowed, []byte("# this node\n"+audit.EncodeNodeKey(nodeKey.Public().(ed25519.PublicKey))+"\n"), 0o600)
	var sinkLog bytes.Buffer
	sink := exec.Command(filepath.Join(env.Bin, "cleanwall"), "audit", "sink", "--listen", sinkAddr, "--cert", certFile, "--key", keyFile, "--dir", sinkDir, "--node-keys", allowed)
	sink.Stdout, sink.Stderr = &sinkLog, &sinkLog
	if err := netns.Do(env.Remote, sink.Start); err != nil {
		t.Fatal(err)
	}
	defer func() {
		sink.Process.Kill()
		sink.Wait()
		if t.Failed() {
			t.Logf("sink log:\n%s", sinkLog.String())
		}
	}()
	if !harness.Eventually(20*time.Second, func() bool { return auditMetric(d, "cleanwall_audit_sink_backlog_records") == 0 }) {
		t.Fatalf("backlog not delivered: %v", auditMetric(d, "cleanwall_audit_sink_backlog_records"))
	}

	// SIGKILL right after an acknowledged ADD: the ADD is in the log.
	sb2 := env.MustAddSandbox("acked", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
	d.Kill()
	logPath := filepath.Join(d.StateDir, "audit.jsonl")
	files := mustAuditFiles(t, logPath)
	if len(files) < 2 {
		t.Fatalf("files %v: no rotation at 4KiB", files)
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

	// A restart continues the chain, signs with the same key and sends the
	// rest; at a clean stop the sink gets the last checkpoint too.
	d.Start()
	if !harness.Eventually(20*time.Second, func() bool { return auditMetric(d, "cleanwall_audit_sink_backlog_records") == 0 }) {
		t.Fatal("backlog after restart not delivered")
	}
	d.Stop()
	keyFlag := []string{"--node-key", filepath.Join(d.StateDir, "node.key")}
	out, err := exec.Command(filepath.Join(env.Bin, "cleanwall"), append(append([]string{"audit", "verify"}, keyFlag...), d.StateDir)...).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "chain intact") || !strings.Contains(string(out), "signed checkpoints by node key") {
		t.Fatalf("cleanwall audit verify: %v\n%s", err, out)
	}
	// The sink's copy: one file for this node, every record once, in order,
	// byte for byte the log's, signed by the node key.
	stored, _ := filepath.Glob(filepath.Join(sinkDir, "*.jsonl"))
	if len(stored) != 1 {
		t.Fatalf("sink files %v", stored)
	}
	out, err = exec.Command(filepath.Join(env.Bin, "cleanwall"), append(append([]string{"audit", "verify"}, keyFlag...), stored[0])...).CombinedOutput()
	if err != nil {
		t.Fatalf("the sink's copy does not verify: %v\n%s", err, out)
	}
	var local []byte
	for _, f := range mustAuditFiles(t, logPath) {
		b, _ := os.ReadFile(f)
		local = append(local, b...)
	}
	got, _ := os.ReadFile(stored[0])
	// At a clean stop the daemon gives the sink 2 s for the last checkpoint;
	// on a loaded machine that one may wait for the next start.
	if rest := bytes.TrimPrefix(local, got); !bytes.HasPrefix(local, got) ||
		len(rest) > 0 && (bytes.Count(rest, []byte("\n")) != 1 || !bytes.Contains(rest, []byte(`"kind":"audit.checkpoint"`))) {
		t.Fatalf("the sink holds %d bytes, the log %d: not the same records", len(got), len(local))
	}
	out, err = exec.Command(filepath.Join(env.Bin, "cleanwall"), "audit", "show", "--kind", "sandbox", "--sandbox", sb2.ContainerID, d.StateDir).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "sandbox.add") {
		t.Fatalf("cleanwall audit show: %v\n%s", err, out)
	}
	t.Logf("%d files, %d records, %d checkpoints; the sink's copy is identical\n%s", len(files), sum.Records, sum.Checkpoints, out)
}

func mustAuditFiles(t *testing.T, path string) []string {
	t.Helper()
	files, err := audit.Files(path)
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// The node's audit log is tied to the attested node: the key broker's
// release record names the node key the evidence bound, the daemon's own
// release record names the same key and REPORT_DATA, and the node's log
// verifies against exactly that key.
func TestAuditLogTiedToAttestedNode(t *testing.T) {
	env := harness.New(t)
	kb := env.StartKeyBroker(harness.KeyBrokerOptions{AllowSimulated: true})
	d := env.StartDaemon("--keybroker", kb.URL, "--broker-ca", kb.CAFile, "--attestation", "simulated")
	env.MustAddSandbox("secure", harness.SandboxOptions{Policy: secureWithKey("egress-dek"), NoIPv6: true})
	d.Stop()

	brokerLogs, _ := filepath.Glob(filepath.Join(kb.Dir, "*", "audit.jsonl"))
	if len(brokerLogs) != 1 {
		t.Fatalf("broker audit logs: %v", brokerLogs)
	}
	var brokerKey, brokerRD string
	if _, err := audit.VerifyFiles(brokerLogs, audit.VerifyOptions{Visit: func(_ string, _ int, r audit.Record) {
		if r.Kind == "keybroker.release" && r.Fields["decision"] == "granted" {
			brokerKey, _ = r.Fields["nodeKey"].(string)
			brokerRD, _ = r.Fields["reportData"].(string)
		}
	}}); err != nil {
		t.Fatal(err)
	}
	if brokerKey == "" {
		t.Fatal("the broker's release record names no node key")
	}
	var nodeKey, nodeRD string
	if _, err := audit.VerifyFiles(mustAuditFiles(t, filepath.Join(d.StateDir, "audit.jsonl")), audit.VerifyOptions{Visit: func(_ string, _ int, r audit.Record) {
		if r.Kind == "key.release" {
			nodeKey, _ = r.Fields["nodeKey"].(string)
			nodeRD, _ = r.Fields["reportData"].(string)
		}
	}}); err != nil {
		t.Fatal(err)
	}
	if nodeKey != brokerKey || nodeRD != brokerRD {
		t.Fatalf("node's release record (key %s, REPORT_DATA %s) and the broker's (%s, %s) differ", nodeKey, nodeRD, brokerKey, brokerRD)
	}
	cleanwall := filepath.Join(env.Bin, "cleanwall")
	out, err := exec.Command(cleanwall, "audit", "verify", "--node-key", brokerKey, d.StateDir).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "signed checkpoints by node key "+brokerKey) {
		t.Fatalf("the node's log against the key the broker recorded: %v\n%s", err, out)
	}
	// Against any other key it does not verify.
	other := "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
	if out, err := exec.Command(cleanwall, "audit", "verify", "--node-key", other, d.StateDir).CombinedOutput(); err == nil {
		t.Fatalf("the node's log verified against another key:\n%s", out)
	}
}
