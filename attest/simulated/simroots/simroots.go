// Package simroots holds the public root certificates (ARK, ASK and ASVK of
// each product line go-sev-guest knows: Milan, Genoa, Turin) of
// go-sev-guest's test-only AMD chain, which the simulated attester signs
// with. It holds no private key and imports no test code: the verifier uses
// these roots to recognise simulated evidence, and trusts them only when the
// broker is configured with allowSimulatedTEE.
//
// <line>.pem holds the line's ARK, ASK and ASVK, in that order. The files
// are generated from go-sev-guest's fixed test keys by
// `go test ./attest/simulated -run TestSimRoots -update-simroots`; that test
// fails when they no longer match the signer.
package simroots

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"embed"
	"encoding/pem"
	"fmt"
	"strings"
	"sync"

	"github.com/google/go-sev-guest/verify/trust"
)

// ProductLines are the AMD product lines that have a simulated chain here:
// every line go-sev-guest's kds package knows.
var ProductLines = []string{"Milan", "Genoa", "Turin"}

// Chain is one product line's simulated roots.
type Chain struct {
	// ARK is the root, self-signed.
	ARK *x509.Certificate
	// ASK certifies VCEKs (chip endorsement keys).
	ASK *x509.Certificate
	// ASVK certifies VLEKs (endorsement keys AMD issues to a cloud provider).
	ASVK *x509.Certificate
}

//go:embed *.pem
var files embed.FS

var (
	parseOnce sync.Once
	chains    map[string]Chain
)

func parse() {
	parseOnce.Do(func() {
		chains = map[string]Chain{}
		for _, line := range ProductLines {
			name := FileName(line)
			data, err := files.ReadFile(name)
			if err != nil {
				panic(fmt.Sprintf("simroots: %v", err))
			}
			certs := mustParse(name, data)
			if len(certs) != 3 {
				panic(fmt.Sprintf("simroots: %s holds %d certificates, want ARK, ASK and ASVK", name, len(certs)))
			}
			chains[line] = Chain{ARK: certs[0], ASK: certs[1], ASVK: certs[2]}
		}
	})
}

// FileName is the file that holds line's chain.
func FileName(line string) string { return strings.ToLower(line) + ".pem" }

func mustParse(name string, data []byte) []*x509.Certificate {
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			panic(fmt.Sprintf("simroots: %s: %v", name, err))
		}
		out = append(out, c)
	}
	return out
}

// ChainOf returns line's simulated roots.
func ChainOf(line string) (Chain, bool) {
	parse()
	c, ok := chains[line]
	return c, ok
}

// Roots returns the simulated roots of lines (every line if nil) in the
// form verify.Options.TrustedRoots takes. A line without a chain here is
// left out. Each call returns fresh values (go-sev-guest caches a CRL in
// them).
func Roots(lines []string) map[string][]*trust.AMDRootCerts {
	parse()
	if lines == nil {
		lines = ProductLines
	}
	out := map[string][]*trust.AMDRootCerts{}
	for _, line := range lines {
		c, ok := chains[line]
		if !ok {
			continue
		}
		r := trust.AMDRootCertsProduct(line)
		r.ProductCerts = &trust.ProductCerts{Ark: c.ARK, Ask: c.ASK, Asvk: c.ASVK}
		out[line] = []*trust.AMDRootCerts{r}
	}
	return out
}

// Issued reports whether cert (a VCEK or VLEK) was signed by a simulated
// ASK or ASVK, of any product line. Answers are remembered per certificate
// (an RSA-4096 check per release adds up).
func Issued(cert *x509.Certificate) bool {
	parse()
	sum := sha256.Sum256(cert.Raw)
	issuedMu.Lock()
	v, ok := issued[sum]
	issuedMu.Unlock()
	if ok {
		return v
	}
	v = false
	for _, c := range chains {
		for _, ica := range []*x509.Certificate{c.ASK, c.ASVK} {
			if bytes.Equal(cert.RawIssuer, ica.RawSubject) && cert.CheckSignatureFrom(ica) == nil {
				v = true
			}
		}
	}
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
