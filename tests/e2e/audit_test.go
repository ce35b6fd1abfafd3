package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
	if err == nil || !strings.Contains(out, "line") {
		t.Fatalf("a tampered log verified:\n%s", out)
	}
}
