package e2e

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/tests/harness"
)

// Trusted mode's TLS origination through cleanwalld: the sandbox speaks
// plain HTTP to 198.51.100.10 on a port per case, the proxy originates TLS
// to real TLS servers in the remote namespace, each rule pinned its own
// way. What verifies passes (TLS 1.3, the hybrid post-quantum group, the
// configured SNI, the client certificate when configured); what does not
// is refused with its reason before a byte of the request leaves: the
// sandbox gets 502 with Cleanwall-Reason, the refusal is counted under
// the reason, and the servers' application receives nothing.
func TestTrustedTLSOrigination(t *testing.T) {
	env := harness.New(t)
	pki := env.NewPKI("partner")
	other := env.NewPKI("other")
	now := time.Now()
	good := pki.Issue("partner", []string{"partner.example.test"}, false, now.Add(-time.Hour), now.Add(24*time.Hour))
	expired := pki.Issue("partner", []string{"partner.example.test"}, false, now.Add(-48*time.Hour), now.Add(-24*time.Hour))
	stranger := other.Issue("stranger", []string{"partner.example.test"}, false, now.Add(-time.Hour), now.Add(24*time.Hour))
	client := pki.Issue("clean-room-7", nil, true, now.Add(-time.Hour), now.Add(24*time.Hour))
	clientCert, clientKey := pki.WriteKeyPair("client", client)
	clientCAs := x509.NewCertPool()
	clientCAs.AddCert(pki.CA)

	srv := env.TLSServer("198.51.100.10:8443", good, nil)
	old := env.TLSServer("198.51.100.10:8444", expired, nil)
	mtls := env.TLSServer("198.51.100.10:8445", good, clientCAs)

	rule := func(name string, port, upstream int, tlsSpec string) string {
		return fmt.Sprintf(`    - name: %s
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: %d}]
      mode: trusted
      trusted:
        upstreamPort: %d
        tls: {%s}
`, name, port, upstream, tlsSpec)
	}
	sni := "serverName: partner.example.test"
	policy := "apiVersion: cleanwall.dev/v1\nkind: EgressPolicy\nmetadata: {name: trusted}\nspec:\n  egress:\n" +
		rule("ca", 81, 8443, sni+", caFile: "+pki.CAFile) +
		rule("spki", 82, 8443, sni+", spkiSHA256: ['"+harness.SPKIPin(good)+"']") +
		rule("wrong-pin", 83, 8443, sni+", spkiSHA256: ['"+harness.SPKIPin(stranger)+"']") +
		rule("wrong-ca", 84, 8443, sni+", caFile: "+other.CAFile) +
		rule("wrong-name", 85, 8443, "serverName: other.example.test, caFile: "+pki.CAFile) +
		rule("expired", 86, 8444, sni+", caFile: "+pki.CAFile) +
		rule("no-client-cert", 87, 8445, sni+", caFile: "+pki.CAFile) +
		rule("client-cert", 88, 8445, sni+", caFile: "+pki.CAFile+", clientCertFile: "+clientCert+", clientKeyFile: "+clientKey)
	d := env.StartDaemon()
	sb := env.MustAddSandbox("trusted", harness.SandboxOptions{Policy: policy, NoIPv6: true})

	for _, c := range []struct {
		rule   string
		port   int
		reason string // "" passes
	}{
		{"ca", 81, ""},
		{"spki", 82, ""},
		{"wrong-pin", 83, "upstream-tls-pin"},
		{"wrong-ca", 84, "upstream-tls-ca"},
		{"wrong-name", 85, "upstream-tls-name"},
		{"expired", 86, "upstream-tls-expired"},
		{"no-client-cert", 87, "upstream-tls-client-cert"},
		{"client-cert", 88, ""},
	} {
		code, hdr, body := sb.Curl(t, fmt.Sprintf("http://198.51.100.10:%d/%s", c.port, c.rule))
		if c.reason == "" {
			if code != 200 || body != "tls ok /"+c.rule+"\n" {
				t.Errorf("%s: status %d, body %q; want the server's answer", c.rule, code, body)
			}
			continue
		}
		if code != 502 || !strings.Contains(strings.ToLower(hdr), "cleanwall-reason: "+c.reason) {
			t.Errorf("%s: status %d, headers:\n%s\nwant 502 with Cleanwall-Reason %s", c.rule, code, hdr, c.reason)
		}
		if !harness.Eventually(5*time.Second, func() bool { return proxyFlows(t, d, sb, c.rule, c.reason) == 1 }) {
			m, _ := d.Metrics()
			t.Errorf("%s: refusal not counted under %s:\n%s", c.rule, c.reason, harness.Grep(m, `rule="`+c.rule+`"`))
		}
	}
	// The applications got exactly the requests of the rules that verified.
	var paths []string
	for _, s := range []*harness.TLSServer{srv, old, mtls} {
		for _, r := range s.Requests() {
			paths = append(paths, r.Path)
		}
	}
	if fmt.Sprint(paths) != "[/ca /spki /client-cert]" {
		t.Fatalf("the servers' applications received %v, want only /ca /spki /client-cert", paths)
	}
	snis := map[string]int{}
	for _, h := range srv.Handshakes() {
		snis[h.SNI]++
		if h.Version != tls.VersionTLS13 || h.Curve != tls.X25519MLKEM768 {
			t.Errorf("handshake %+v: want TLS 1.3 with X25519MLKEM768", h)
		}
	}
	// ca, spki and wrong-pin name the partner (wrong-ca failed on the
	// chain before a handshake record); wrong-name sent its own.
	if snis["partner.example.test"] < 2 || snis["other.example.test"] != 1 || len(snis) != 2 {
		t.Errorf("SNIs the server saw: %v", snis)
	}
	var presented []string
	for _, h := range mtls.Handshakes() {
		presented = append(presented, h.ClientCN)
	}
	if !strings.Contains(fmt.Sprint(presented), "clean-room-7") {
		t.Fatalf("the mTLS server saw client certificates %q, want clean-room-7's", presented)
	}
}

// Trusted mode's HPKE sealing through cleanwalld: request bodies the
// sandbox PUTs in plaintext reach the store sealed to the customer's
// public key, and open with `cleanwall seal open --hpke-key` to exactly
// what was sent; the store's recording never holds the canary. Sizes: 0,
// 1, a chunk and one byte either side, and 50 MiB.
func TestTrustedHPKEBodies(t *testing.T) {
	env := harness.New(t)
	cw := filepath.Join(env.Bin, "cleanwall")
	priv, pub := filepath.Join(env.Dir, "customer.key"), filepath.Join(env.Dir, "customer.pub")
	if out, err := exec.Command(cw, "seal", "keygen", "--private-key", priv, "--public-key", pub).CombinedOutput(); err != nil {
		t.Fatalf("cleanwall seal keygen: %v\n%s", err, out)
	}
	store := env.BlobStore("198.51.100.10:8080")
	policy := `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: trusted-hpke}
spec:
  egress:
    - name: partner-upload
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}]
      mode: trusted
      trusted: {hpke: {publicKeyFile: ` + pub + `}}
`
	env.StartDaemon()
	sb := env.MustAddSandbox("hpke", harness.SandboxOptions{Policy: policy, NoIPv6: true})
	secret := canary(t)
	for _, n := range []int{0, 1, 16<<10 - 1, 16 << 10, 16<<10 + 1, 50 << 20} {
		body := make([]byte, n)
		if _, err := rand.Read(body); err != nil {
			t.Fatal(err)
		}
		if n >= len(secret) {
			copy(body[n/2:], secret)
		}
		in := filepath.Join(env.Dir, fmt.Sprintf("body-%d", n))
		if err := os.WriteFile(in, body, 0o644); err != nil {
			t.Fatal(err)
		}
		path := fmt.Sprintf("/upload/%d", n)
		code, hdr, out := sb.Curl(t, "-m", "60", "-T", in, "http://198.51.100.10:8080"+path)
		if code/100 != 2 {
			t.Fatalf("%d bytes: status %d\n%s%s", n, code, hdr, out)
		}
		stored, ok := store.Object(path)
		if !ok {
			t.Fatalf("%d bytes: the store has no %s", n, path)
		}
		if !bytes.HasPrefix(stored, []byte("CWHP")) {
			t.Fatalf("%d bytes: the stored body is not an HPKE-sealed body (starts %q)", n, stored[:min(8, len(stored))])
		}
		sealedFile, opened := filepath.Join(env.Dir, fmt.Sprintf("sealed-%d", n)), filepath.Join(env.Dir, fmt.Sprintf("opened-%d", n))
		if err := os.WriteFile(sealedFile, stored, 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(cw, "seal", "open", "--hpke-key", priv, "-o", opened, sealedFile).CombinedOutput(); err != nil {
			t.Fatalf("%d bytes: cleanwall seal open: %v\n%s", n, err, out)
		}
		got, err := os.ReadFile(opened)
		if err != nil || !bytes.Equal(got, body) {
			t.Fatalf("%d bytes: opened %d bytes (%v), not what the sandbox sent", n, len(got), err)
		}
	}
	if bytes.Contains(store.Received(), []byte(secret)) {
		t.Fatal("the store's recording holds the plaintext canary")
	}
}
