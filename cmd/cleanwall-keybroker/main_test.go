package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/broker/client"
	"github.com/cleanwall/cleanwall/attest/simulated"
	"github.com/cleanwall/cleanwall/internal/testutil"
)

func TestHelpListsOnlyOurFlags(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run(context.Background(), []string{"-h"}, &out, &errOut); code != 0 {
		t.Fatalf("-h exit %d", code)
	}
	help := errOut.String()
	for _, want := range []string{"-config", "-allow-simulated-tee", "-check", "key create --config FILE --id ID"} {
		if !strings.Contains(help, want) {
			t.Errorf("-h lacks %q:\n%s", want, help)
		}
	}
	for _, foreign := range []string{"sev_guest", "workaround_kds", "product_name", "test_kds", "self_throttle"} {
		if strings.Contains(help, foreign) {
			t.Errorf("-h shows go-sev-guest's flag %q:\n%s", foreign, help)
		}
	}
	if code := run(context.Background(), []string{"-workaround_kds_productname"}, &out, &errOut); code != 2 {
		t.Fatalf("go-sev-guest's global flag was accepted (exit %d)", code)
	}
}

// TestNoTestCodeInBinary keeps the test-only signer (and its private keys)
// out of the production binary.
func TestNoTestCodeInBinary(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, pkg := range strings.Fields(string(out)) {
		if pkg == "github.com/google/go-sev-guest/testing" || strings.HasPrefix(pkg, "github.com/google/go-sev-guest/testing/") ||
			pkg == "github.com/cleanwall/cleanwall/attest/simulated" || pkg == "github.com/google/go-sev-guest/client" {
			t.Errorf("cleanwall-keybroker links %s", pkg)
		}
	}
}

func writeTLS(t *testing.T, dir string) *x509.CertPool {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "keybroker test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalECPrivateKey(key)
	os.WriteFile(filepath.Join(dir, "broker.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(filepath.Join(dir, "broker.key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd}), 0o600)
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return pool
}

func writeConfig(t *testing.T, dir string) string {
	t.Helper()
	c := simulated.DefaultConfig()
	cfg := fmt.Sprintf(`listen: 127.0.0.1:0
tls: {certFile: broker.pem, keyFile: broker.key}
allowSimulatedTEE: false
keyStore: {dir: keys, masterKeyFile: secret/master.key}
keys:
  - id: egress-dek
    release:
      anyOf:
        - tee: snp
          measurements: ["%x"]
          hostData: "%x"
          minimumTCB: {bootloader: 3, tee: 0, snp: 8, microcode: 115}
          minimumFirmware: "1.55"
          debug: false
          vmpl: 0
          allowedChipIDs: []
`, c.Measurement, c.HostData)
	path := filepath.Join(dir, "broker.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestKeyCreateAndServe(t *testing.T) {
	dir := t.TempDir()
	pool := writeTLS(t, dir)
	cfgPath := writeConfig(t, dir)
	create := func(id string) (string, int) {
		var out, errOut bytes.Buffer
		code := run(context.Background(), []string{"key", "create", "--config", cfgPath, "--id", id}, &out, &errOut)
		if code != 0 {
			t.Log(errOut.String())
		}
		return strings.TrimSpace(out.String()), code
	}
	if v, code := create("egress-dek"); code != 0 || v != "1" {
		t.Fatalf("first create printed %q (exit %d)", v, code)
	}
	st, err := os.Stat(filepath.Join(dir, "secret", "master.key"))
	if err != nil || st.Mode().Perm() != 0o600 || st.Size() != 32 {
		t.Fatalf("master key: %v %v", st, err)
	}
	if v, code := create("egress-dek"); code != 0 || v != "2" {
		t.Fatalf("rotation printed %q (exit %d)", v, code)
	}
	if _, code := create("not-configured"); code != 1 {
		t.Fatalf("create for an unconfigured key: exit %d", code)
	}

	var out bytes.Buffer
	if code := run(context.Background(), []string{"--config", cfgPath, "--check"}, &out, &out); code != 0 || !strings.Contains(out.String(), "OK: 1 keys, allowSimulatedTEE=false") {
		t.Fatalf("--check exit %d: %s", code, out.String())
	}

	// Serve with --allow-simulated-tee (the file says false) and release over loopback.
	logs := &testutil.SyncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"--config", cfgPath, "--allow-simulated-tee"}, &bytes.Buffer{}, logs)
	}()
	addr := regexp.MustCompile(`listen=(127\.0\.0\.1:\d+)`)
	var m []string
	for deadline := time.Now().Add(10 * time.Second); m == nil && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		m = addr.FindStringSubmatch(logs.String())
	}
	if m == nil {
		cancel()
		t.Fatalf("broker did not start:\n%s", logs.String())
	}
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "ALLOWING SIMULATED TEE EVIDENCE") {
		t.Errorf("simulated mode not announced loudly:\n%s", logs.String())
	}
	a, _ := simulated.New(simulated.DefaultConfig())
	k, err := client.New("https://"+m[1], pool, a).Release(context.Background(), "egress-dek")
	if err != nil || k.Version != 2 {
		t.Fatalf("release: v%d %v", k.Version, err)
	}
	_, err = client.New("https://"+m[1], pool, a).Release(context.Background(), "other")
	if !errors.Is(err, attest.CodeUnknownKey) {
		t.Fatalf("unknown key: %v", err)
	}
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("broker exit %d:\n%s", code, logs.String())
	}
}
