// Package simroots holds the public root certificates (ARK and ASK, Milan)
// of go-sev-guest's test-only AMD chain, which the simulated attester signs
// with. It holds no private key and imports no test code: the verifier uses
// these roots to recognise simulated evidence, and trusts them only when the
// broker is configured with allowSimulatedTEE.
//
// ark.pem and ask.pem are generated from go-sev-guest's fixed test keys by
// `go test ./attest/simulated -run TestSimRoots -update-simroots`; that test
// fails when they no longer match the signer.
package simroots

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	_ "embed"
	"encoding/pem"
	"fmt"
	"sync"

	"github.com/google/go-sev-guest/verify/trust"
)

// ProductLine is the AMD product line of the simulated chain.
const ProductLine = "Milan"

var (
	//go:embed ark.pem
	arkPEM []byte
	//go:embed ask.pem
	askPEM []byte

	parseOnce sync.Once
	ark, ask  *x509.Certificate
)

func parse() {
	parseOnce.Do(func() {
		ark = mustParse("ark.pem", arkPEM)
		ask = mustParse("ask.pem", askPEM)
	})
}

func mustParse(name string, data []byte) *x509.Certificate {
	block, _ := pem.Decode(data)
	if block == nil {
		panic(fmt.Sprintf("simroots: %s is not PEM", name))
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		panic(fmt.Sprintf("simroots: %s: %v", name, err))
	}
	return c
}

// ARK is the simulated AMD root key certificate.
func ARK() *x509.Certificate { parse(); return ark }

// ASK is the simulated AMD signing key certificate (issuer of VCEKs).
func ASK() *x509.Certificate { parse(); return ask }

// Roots returns the simulated roots in the form verify.Options.TrustedRoots
// takes. Each call returns fresh values (go-sev-guest caches a CRL in them).
func Roots() map[string][]*trust.AMDRootCerts {
	parse()
	r := trust.AMDRootCertsProduct(ProductLine)
	r.ProductCerts = &trust.ProductCerts{Ark: ark, Ask: ask}
	return map[string][]*trust.AMDRootCerts{ProductLine: {r}}
}

// Issued reports whether cert was signed by the simulated ASK. Answers are
// remembered per certificate (an RSA-4096 check per release adds up).
func Issued(cert *x509.Certificate) bool {
	parse()
	sum := sha256.Sum256(cert.Raw)
	issuedMu.Lock()
	v, ok := issued[sum]
	issuedMu.Unlock()
	if ok {
		return v
	}
	v = bytes.Equal(cert.RawIssuer, ask.RawSubject) && cert.CheckSignatureFrom(ask) == nil
	issuedMu.Lock()
	if len(issued) >= maxIssued {
		clear(issued)
	}
	issued[sum] = v
	issuedMu.Unlock()
	return v
}

const maxIssued = 4096

var (
	issuedMu sync.Mutex
	issued   = map[[sha256.Size]byte]bool{}
)
