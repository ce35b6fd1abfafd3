package secure

import (
	"crypto/sha256"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

// TestRegistry registers both proxies as the daemon does and configures
// a policy with a rule of each protocol; a rule either cannot serve is
// refused at Configure, its error naming the field.
func TestRegistry(t *testing.T) {
	dir := t.TempDir()
	testutil.TestCA(t, dir, "remote")
	ca := filepath.Join(dir, "ca.pem")
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	pin := sha256.Sum256([]byte("x"))
	goodPin := base64.StdEncoding.EncodeToString(pin[:])

	g := proxies.NewRegistry()
	if err := g.AddStream(proxies.Key{Mode: "secure", Protocol: "http"}, NewHTTP(nil, nil)); err != nil {
		t.Fatal(err)
	}
	if err := g.AddStream(proxies.Key{Mode: "secure", Protocol: "tcp"}, NewTCP(nil, nil)); err != nil {
		t.Fatal(err)
	}
	compile := func(t *testing.T, tls string) *policy.Compiled {
		t.Helper()
		p, err := policy.Parse([]byte(`apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: test}
spec:
  egress:
    - name: blob-store
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 80}]
      mode: secure
      secure: {keyID: egress-dek, protocol: http}
    - name: db
      to: [{cidr: 198.51.100.20/32}]
      ports: [{port: 5432}]
      mode: secure
      secure: {keyID: egress-dek, protocol: tcp, upstreamTLS: {` + tls + `}}
`))
		if err != nil {
			t.Fatal(err)
		}
		c, err := policy.Compile(p)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	for _, tc := range []struct {
		name, tls, wantErr string
	}{
		{"empty upstreamTLS", ``, ""},
		{"ca and pin", `caFile: ` + ca + `, spkiSHA256: ["` + goodPin + `"]`, ""},
		{"missing caFile", `caFile: ` + filepath.Join(dir, "missing.pem"), "spec.egress[1]: secure.upstreamTLS.caFile: open "},
		{"caFile without PEM", `caFile: ` + notPEM, "spec.egress[1]: secure.upstreamTLS.caFile: " + notPEM + " holds no PEM certificate"},
		{"malformed pin", `spkiSHA256: ["<base64 of SHA-256>"]`, "spec.egress[1]: secure.upstreamTLS.spkiSHA256[0]: "},
		{"missing client key", `clientCertFile: ` + filepath.Join(dir, "remote.pem") + `, clientKeyFile: ` + filepath.Join(dir, "missing.key"), "spec.egress[1]: secure.upstreamTLS.clientCertFile: "},
		{"mTLS", `clientCertFile: ` + filepath.Join(dir, "remote.pem") + `, clientKeyFile: ` + filepath.Join(dir, "remote.key"), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := compile(t, tc.tls)
			cfgs, err := g.Configure(c)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				for rt, cfg := range cfgs {
					rc := cfg.(*ruleConfig)
					if rc.protocol != rt.Rule.Spec.Secure.Protocol || rc.keyID != "egress-dek" || rc.out != "rule="+rt.Rule.Name+" dir=out" {
						t.Fatalf("rule %s configured as %+v", rt.Rule.Name, rc)
					}
				}
				return
			}
			if err == nil || !strings.HasPrefix(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want one starting %q", err, tc.wantErr)
			}
		})
	}
}

// TestConfigureRefusesOtherRules: each proxy serves its own protocol of
// secure mode only, and a flow whose Config is not its own is refused.
func TestConfigureRefusesOtherRules(t *testing.T) {
	tcpRule := compileRule(t, "db", `{keyID: egress-dek, protocol: tcp}`)
	httpRule := compileRule(t, "blob-store", `{keyID: egress-dek, protocol: http}`)
	if _, err := NewHTTP(nil, nil).Configure(tcpRule); err == nil || !strings.Contains(err.Error(), "secure.protocol") {
		t.Fatalf("the HTTP proxy configured a tcp rule: %v", err)
	}
	if _, err := NewTCP(nil, nil).Configure(httpRule); err == nil || !strings.Contains(err.Error(), "secure.protocol") {
		t.Fatalf("the TCP proxy configured an http rule: %v", err)
	}
	open := &policy.Rule{Name: "open", Mode: policy.ModeOpen, Spec: &policy.EgressRule{}}
	if _, err := NewTCP(nil, nil).Configure(open); err == nil || !strings.HasPrefix(err.Error(), "mode: open") {
		t.Fatalf("the TCP proxy configured an open rule: %v", err)
	}
	cfg, err := NewTCP(nil, nil).Configure(tcpRule)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := flowConfig(&proxies.Flow{Rule: tcpRule, Config: cfg}, "http"); err == nil {
		t.Fatal("a TCP rule's configuration passed for an HTTP flow")
	}
}
