package simulated

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	sevtest "github.com/google/go-sev-guest/testing"
	"github.com/google/go-sev-guest/verify"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/simulated/simroots"
	"github.com/cleanwall/cleanwall/attest/snp"
)

var updateSimRoots = flag.Bool("update-simroots", false, "rewrite attest/simulated/simroots/<line>.pem from the test-only chain")

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
// in step with the signer (private keys, test code only), for every product
// line.
func TestSimRoots(t *testing.T) {
	if len(Products) != len(simroots.ProductLines) {
		t.Fatalf("products %v do not cover the simroots product lines %v", Products, simroots.ProductLines)
	}
	for i, product := range Products {
		line := simroots.ProductLines[i]
		t.Run(line, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.Product = product
			if got, err := ProductLine(product); err != nil || got != line {
				t.Fatalf("ProductLine(%q) = %q, %v, want %q", product, got, err, line)
			}
			c, err := chain(cfg, sevtest.DefaultAmdKeys())
			if err != nil {
				t.Fatal(err)
			}
			if *updateSimRoots {
				var data []byte
				for _, cert := range []*x509.Certificate{c.ARK, c.ASK, c.ASVK} {
					data = append(data, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})...)
				}
				if err := os.WriteFile(filepath.Join("simroots", simroots.FileName(line)), data, 0o644); err != nil {
					t.Fatal(err)
				}
				t.Log("rewrote simroots; rerun without -update-simroots")
				return
			}
			roots, ok := simroots.ChainOf(line)
			if !ok {
				t.Fatalf("simroots has no %s chain: regenerate with -update-simroots", line)
			}
			if !simroots.Issued(c.VCEK) || !simroots.Issued(c.VLEK) {
				t.Fatal("the simulated VCEK or VLEK is not issued by simroots: regenerate with -update-simroots")
			}
			for name, pair := range map[string][2]*x509.Certificate{"ARK": {roots.ARK, c.ARK}, "ASK": {roots.ASK, c.ASK}, "ASVK": {roots.ASVK, c.ASVK}} {
				if !bytes.Equal(pair[0].RawSubjectPublicKeyInfo, pair[1].RawSubjectPublicKeyInfo) || !bytes.Equal(pair[0].RawSubject, pair[1].RawSubject) {
					t.Fatalf("simroots %s %s does not match the test-only chain: regenerate with -update-simroots", line, name)
				}
			}
			for _, ica := range []*x509.Certificate{roots.ASK, roots.ASVK} {
				if err := ica.CheckSignatureFrom(roots.ARK); err != nil {
					t.Fatalf("simroots %s intermediate %s not signed by its ARK: %v", line, ica.Subject.CommonName, err)
				}
			}
			if want := "ARK-" + line; roots.ARK.Subject.CommonName != want {
				t.Fatalf("ARK is %q, want %q", roots.ARK.Subject.CommonName, want)
			}
			u, err := NewUntrusted(cfg)
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
		})
	}
}

func TestProducts(t *testing.T) {
	for _, vlek := range []bool{false, true} {
		for _, product := range Products {
			cfg := DefaultConfig()
			cfg.Product, cfg.VLEK = product, vlek
			a, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			ev, err := a.Evidence(context.Background(), [64]byte{2})
			if err != nil {
				t.Fatal(err)
			}
			p, err := snp.Parse(ev)
			if err != nil {
				t.Fatal(err)
			}
			r := p.Attestation.GetReport()
			line, _ := ProductLine(product)
			if got := kds.ProductLineFromFms(r.GetCpuid1EaxFms()); got != line {
				t.Errorf("%s: report CPUID says %s", product, got)
			}
			info, _ := abi.ParseSignerInfo(r.GetSignerInfo())
			chain := p.Attestation.GetCertificateChain()
			var ek *x509.Certificate
			switch {
			case vlek && info.SigningKey == abi.VlekReportSigner && len(chain.GetVlekCert()) > 0 && len(chain.GetVcekCert()) == 0:
				ek = chainCert(t, ev, abi.VlekGUID)
			case !vlek && info.SigningKey == abi.VcekReportSigner && len(chain.GetVcekCert()) > 0 && len(chain.GetVlekCert()) == 0:
				ek = chainCert(t, ev, abi.VcekGUID)
			default:
				t.Fatalf("%s vlek=%v: signed by %v with VCEK %d bytes, VLEK %d bytes", product, vlek, info.SigningKey, len(chain.GetVcekCert()), len(chain.GetVlekCert()))
			}
			if err := verify.SnpReportSignature(p.Raw, ek); err != nil {
				t.Errorf("%s vlek=%v: report does not verify under its endorsement key: %v", product, vlek, err)
			}
			if want := "SEV-" + line; !vlek && ek.Issuer.CommonName != want {
				t.Errorf("VCEK issued by %q, want %q", ek.Issuer.CommonName, want)
			}
			if want := "SEV-VLEK-" + line; vlek && ek.Issuer.CommonName != want {
				t.Errorf("VLEK issued by %q, want %q", ek.Issuer.CommonName, want)
			}
		}
	}
	cfg := DefaultConfig()
	cfg.Product = "Venice-A0"
	if _, err := New(cfg); err == nil || !strings.Contains(err.Error(), "Venice-A0") {
		t.Fatalf("unknown product: %v", err)
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
