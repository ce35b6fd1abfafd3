package main

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/governance/audit"
)

// auditDir writes a signed log rotated into several files, with records of
// two sandboxes, and returns its directory and node key file.
func auditDir(t *testing.T) (string, string) {
	t.Helper()
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "node.key")
	key, _, err := audit.LoadOrCreateNodeKey(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	l, err := audit.Open(filepath.Join(dir, "audit.jsonl"), audit.Options{Signer: key, MaxSize: 1 << 10, Sync: audit.SyncNever})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 30 {
		sb := fmt.Sprintf("c%d/eth0", i%2)
		l.Append("sandbox.add", map[string]any{"sandbox": sb, "policy": "p"})
		l.Append("deny.datapath", map[string]any{"sandbox": sb, "reason": "no-rule"})
	}
	l.Close()
	return dir, keyFile
}

func runAudit(t *testing.T, f func(stdout, stderr *bytes.Buffer) error) (string, string, int) {
	t.Helper()
	var out, errOut bytes.Buffer
	err := f(&out, &errOut)
	code := 0
	var ee *exitError
	var ue *usageError
	switch {
	case errors.As(err, &ee):
		code = ee.code
	case errors.As(err, &ue):
		code, errOut = 2, *bytes.NewBufferString(ue.msg)
	case err != nil:
		t.Fatal(err)
	}
	return out.String(), errOut.String(), code
}

func TestAuditVerifyCommand(t *testing.T) {
	dir, keyFile := auditDir(t)
	files, _ := audit.Files(filepath.Join(dir, "audit.jsonl"))
	if len(files) < 3 {
		t.Fatalf("files %v", files)
	}
	key, _ := audit.ReadNodeKey(keyFile)
	pubText := audit.EncodeNodeKey(key.Public().(ed25519.PublicKey))
	for _, args := range [][]string{{dir}, {filepath.Join(dir, "audit.jsonl")}, files, {"--node-key", pubText, dir}, {dir, "--node-key", keyFile}} {
		out, errOut, code := runAudit(t, func(o, e *bytes.Buffer) error { return cmdAuditVerify(args, o, e) })
		if code != 0 || !strings.Contains(out, "chain intact") || !hasLine(out, "sandbox.add 30") || !strings.Contains(out, "by node key "+pubText) {
			t.Fatalf("verify %v: %d\n%s%s", args, code, out, errOut)
		}
	}
	// Another node key: refused, naming the first checkpoint.
	other, _, _ := ed25519.GenerateKey(nil)
	_, errOut, code := runAudit(t, func(o, e *bytes.Buffer) error {
		return cmdAuditVerify([]string{"--node-key", audit.EncodeNodeKey(other), dir}, o, e)
	})
	if code != 1 || !strings.Contains(errOut, "audit.jsonl.000001:") || !strings.Contains(errOut, "not the log's node key") {
		t.Fatalf("other key: %d %s", code, errOut)
	}
	// --node-key on a log without checkpoints proves nothing: refused.
	plain := filepath.Join(t.TempDir(), "audit.jsonl")
	if l, err := audit.Open(plain, audit.Options{}); err == nil {
		l.Append("x", nil)
		l.Close()
	}
	_, errOut, code = runAudit(t, func(o, e *bytes.Buffer) error {
		return cmdAuditVerify([]string{"--node-key", pubText, plain}, o, e)
	})
	if code != 1 || !strings.Contains(errOut, "no checkpoint signed") {
		t.Fatalf("unsigned log with --node-key: %d %s", code, errOut)
	}
	// A dropped rotated file is named at the first record after the gap.
	os.Remove(files[1])
	_, errOut, code = runAudit(t, func(o, e *bytes.Buffer) error { return cmdAuditVerify([]string{dir}, o, e) })
	if code != 1 || !strings.Contains(errOut, filepath.Base(files[2])+":1)") || !strings.Contains(errOut, "follows") {
		t.Fatalf("dropped file: %d %s", code, errOut)
	}
	// A copy that starts late (a sink added later): refused, unless
	// --partial, which says what it did not check.
	_, errOut, code = runAudit(t, func(o, e *bytes.Buffer) error { return cmdAuditVerify(files[2:], o, e) })
	if code != 1 || !strings.Contains(errOut, "are missing") {
		t.Fatalf("late copy: %d %s", code, errOut)
	}
	out, errOut, code := runAudit(t, func(o, e *bytes.Buffer) error {
		return cmdAuditVerify(append([]string{"--partial"}, files[2:]...), o, e)
	})
	if code != 0 || !strings.Contains(out, "were not checked") {
		t.Fatalf("--partial: %d %s%s", code, out, errOut)
	}
	if _, _, code := runAudit(t, func(o, e *bytes.Buffer) error { return cmdAuditVerify(nil, o, e) }); code != 2 {
		t.Fatal("verify without files was not a usage error")
	}
}

func TestAuditShowCommand(t *testing.T) {
	dir, _ := auditDir(t)
	out, errOut, code := runAudit(t, func(o, e *bytes.Buffer) error {
		return cmdAuditShow([]string{"--sandbox", "c1", "--kind", "deny", "--since", "1h", "--json", dir}, o, e, time.Now())
	})
	if code != 0 {
		t.Fatalf("%d %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 15 {
		t.Fatalf("%d records shown, want 15:\n%s", len(lines), out)
	}
	for _, l := range lines {
		var r audit.Record
		if err := json.Unmarshal([]byte(l), &r); err != nil || r.Kind != "deny.datapath" || r.Fields["sandbox"] != "c1/eth0" {
			t.Fatalf("shown %s (%v)", l, err)
		}
	}
	// Table output, and --since in the future shows nothing.
	out, _, _ = runAudit(t, func(o, e *bytes.Buffer) error {
		return cmdAuditShow([]string{dir, "--kind", "sandbox.add", "--sandbox", "c0/eth0"}, o, e, time.Now())
	})
	if n := strings.Count(out, "sandbox.add"); n != 15 || !strings.Contains(out, "sandbox=c0/eth0") {
		t.Fatalf("table:\n%s", out)
	}
	future := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	out, errOut, _ = runAudit(t, func(o, e *bytes.Buffer) error {
		return cmdAuditShow([]string{"--since", future, dir}, o, e, time.Now())
	})
	if out != "" || !strings.Contains(errOut, "no matching") {
		t.Fatalf("future --since: %q %q", out, errOut)
	}
	if _, errOut, code := runAudit(t, func(o, e *bytes.Buffer) error {
		return cmdAuditShow([]string{"--since", "yesterday", dir}, o, e, time.Now())
	}); code != 2 || !strings.Contains(errOut, "--since") {
		t.Fatalf("bad --since: %d %s", code, errOut)
	}
}

// hasLine reports whether a line of out has exactly want's words.
func hasLine(out, want string) bool {
	for _, l := range strings.Split(out, "\n") {
		if strings.Join(strings.Fields(l), " ") == want {
			return true
		}
	}
	return false
}
