package simulated

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-sev-guest/abi"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/simulated/simroots"
	"github.com/cleanwall/cleanwall/attest/snp"
)

var updateSimRoots = flag.Bool("update-simroots", false, "rewrite attest/simulated/simroots/{ark,ask}.pem from the test-only chain")

func chainCert(t *testing.T, evidence []byte, guid string) *x509.Certificate {
	t.Helper()
	_, entries, err := snp.SplitEvidence(evidence)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.GUID.String() == guid {
			c, err := x509.ParseCertificate(e.Data)
			if err != nil {
				t.Fatal(err)
			}
			return c
		}
	}
	t.Fatalf("no %s entry", guid)
	return nil
}

// TestSimRoots keeps simroots (public certificates, linked into the broker)
// in step with the signer (private keys, test code only).
func TestSimRoots(t *testing.T) {
	a, err := New(DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	ev, err := a.Evidence(context.Background(), [64]byte{1})
	if err != nil {
		t.Fatal(err)
	}
	ark, ask, vcek := chainCert(t, ev, abi.ArkGUID), chainCert(t, ev, abi.AskGUID), chainCert(t, ev, abi.VcekGUID)
	if *updateSimRoots {
		for name, c := range map[string]*x509.Certificate{"ark.pem": ark, "ask.pem": ask} {
			data := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
			if err := os.WriteFile(filepath.Join("simroots", name), data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		t.Log("rewrote simroots; rerun without -update-simroots")
		return
	}
	if !simroots.Issued(vcek) {
		t.Fatal("the simulated VCEK is not issued by simroots.ASK: regenerate with -update-simroots")
	}
	if err := simroots.ASK().CheckSignatureFrom(simroots.ARK()); err != nil {
		t.Fatalf("simroots ASK not signed by simroots ARK: %v", err)
	}
	if !bytes.Equal(simroots.ARK().RawSubjectPublicKeyInfo, ark.RawSubjectPublicKeyInfo) ||
		!bytes.Equal(simroots.ASK().RawSubject, ask.RawSubject) {
		t.Fatal("simroots do not match the test-only chain: regenerate with -update-simroots")
	}
	u, err := NewUntrusted(DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	uev, err := u.Evidence(context.Background(), [64]byte{1})
	if err != nil {
		t.Fatal(err)
	}
	if simroots.Issued(chainCert(t, uev, abi.VcekGUID)) {
		t.Fatal("the untrusted chain's VCEK verifies under simroots")
	}
}

func TestEvidenceIsFreshAndLabelled(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Debug = true
	cfg.VMPL = 2
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var _ attest.Attester = a
	if !a.Simulated() || a.TEE() != "snp" {
		t.Fatalf("Simulated=%v TEE=%q", a.Simulated(), a.TEE())
	}
	rd := [64]byte{0: 7, 63: 9}
	ev, err := a.Evidence(context.Background(), rd)
	if err != nil {
		t.Fatal(err)
	}
	p, err := snp.Parse(ev)
	if err != nil {
		t.Fatal(err)
	}
	r := p.Attestation.GetReport()
	if !p.Labelled || !bytes.Equal(r.GetReportData(), rd[:]) || r.GetVmpl() != 2 ||
		!bytes.Equal(r.GetMeasurement(), cfg.Measurement[:]) || !bytes.Equal(r.GetChipId(), cfg.ChipID[:]) {
		t.Fatalf("report does not say what was configured: labelled=%v %+v", p.Labelled, r)
	}
	pol, _ := abi.ParseSnpPolicy(r.GetPolicy())
	if !pol.Debug {
		t.Fatal("debug bit not set")
	}
	ev2, _ := a.Evidence(context.Background(), rd)
	if bytes.Equal(ev[:snp.ReportSize], ev2[:snp.ReportSize]) {
		t.Fatal("two reports for the same data are identical: not signed per request")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := a.Evidence(ctx, rd); err == nil {
		t.Fatal("Evidence ignored a cancelled context")
	}
}
