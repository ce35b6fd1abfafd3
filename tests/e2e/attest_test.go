package e2e

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cleanwall/cleanwall/tests/harness"
)

const policySecure = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: secure}
spec:
  egress:
    - name: results-api
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}]
      mode: open
    - name: blob-store
      to: [{cidr: 198.51.100.20/32}]
      ports: [{port: 80}]
      mode: secure
      secure:
        keyID: %s
        protocol: http
`

func secureWithKey(id string) string { return strings.Replace(policySecure, "%s", id, 1) }

// A sandbox whose secure rules name a key is admitted only once the key
// broker released that key to the node's (simulated, labelled) evidence.
func TestSecureKeyReleasedBeforeAdmission(t *testing.T) {
	env := harness.New(t)
	kb := env.StartKeyBroker(harness.KeyBrokerOptions{AllowSimulated: true})
	d := env.StartDaemon("--keybroker", kb.URL, "--broker-ca", kb.CAFile, "--attestation", "simulated")
	sb := env.MustAddSandbox("secure", harness.SandboxOptions{Policy: secureWithKey("egress-dek"), NoIPv6: true})
	if err := sb.Check(); err != nil {
		t.Fatal(err)
	}
	st, err := d.Client().Attest(harness.Ctx())
	if err != nil {
		t.Fatal(err)
	}
	if !st.Configured || !st.Simulated || !strings.Contains(st.Evidence, "SIMULATED") || len(st.Measurement) != 96 {
		t.Fatalf("attest status: %+v", st)
	}
	if len(st.Keys) != 1 || st.Keys[0].ID != "egress-dek" || st.Keys[0].Version < 1 || st.LastRelease == nil {
		t.Fatalf("held keys: %+v", st.Keys)
	}
	out, err := exec.Command(filepath.Join(env.Bin, "cleanwall"), "attest", "status", "--socket", d.Socket).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "SIMULATED") || !strings.Contains(string(out), "key egress-dek: version 1") {
		t.Fatalf("cleanwall attest status: %v\n%s", err, out)
	}
	// The broker audited the release, labelled simulated.
	if !strings.Contains(kb.Log(), "simulated") {
		t.Logf("broker log:\n%s", kb.Log())
	}
}

// Release refused: the sandbox never starts, with the broker's reason, and
// nothing of it stays.
func TestSecureAdmissionFailsWhenReleaseIsRefused(t *testing.T) {
	cases := []struct {
		name   string
		broker harness.KeyBrokerOptions
		key    string
		want   string
	}{
		{"simulated evidence not allowed", harness.KeyBrokerOptions{AllowSimulated: false}, "egress-dek", "simulated-not-allowed"},
		{"wrong measurement", harness.KeyBrokerOptions{AllowSimulated: true, Measurement: strings.Repeat("ab", 48)}, "egress-dek", "measurement-not-allowed"},
		{"unknown key", harness.KeyBrokerOptions{AllowSimulated: true}, "no-such-dek", "unknown-key"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			env := harness.New(t)
			kb := env.StartKeyBroker(c.broker)
			d := env.StartDaemon("--keybroker", kb.URL, "--broker-ca", kb.CAFile, "--attestation", "simulated")
			_, err := env.AddSandbox("refused", harness.SandboxOptions{Policy: secureWithKey(c.key), NoIPv6: true})
			if err == nil {
				t.Fatal("ADD succeeded without a released key")
			}
			if !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "spec.egress[1]") {
				t.Fatalf("ADD error does not give the rule and the broker's reason %q:\n%v", c.want, err)
			}
			nothingLeft(t, d)
		})
	}
}

// Without a key broker, a policy with secure rules is refused at ADD.
func TestSecureWithoutKeyBroker(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	_, err := env.AddSandbox("nobroker", harness.SandboxOptions{Policy: secureWithKey("egress-dek"), NoIPv6: true})
	if err == nil || !strings.Contains(err.Error(), "--keybroker") {
		t.Fatalf("ADD: %v", err)
	}
	nothingLeft(t, d)
}
