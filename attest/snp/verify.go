package snp

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	"github.com/google/go-sev-guest/verify"
	"github.com/google/go-sev-guest/verify/trust"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/simulated/simroots"
)

// Verifier checks that evidence was signed by an AMD endorsement key that
// chains to trusted roots. The zero value trusts AMD's real roots only,
// without revocation checks or certificate fetching.
type Verifier struct {
	// AllowSimulated trusts evidence whose endorsement key chains to the
	// simulated (go-sev-guest test-only) roots. When false such evidence is
	// refused with simulated-not-allowed, and those roots are never trusted.
	AllowSimulated bool
	// SimulatedProductLines restricts AllowSimulated to the simulated roots
	// of these product lines; nil means every line simroots holds (Milan,
	// Genoa, Turin). Simulated evidence from another line is untrusted-root.
	SimulatedProductLines []string
	// CheckRevocations fetches AMD's CRL through Getter and refuses a
	// revoked ASK. Never applied to simulated evidence (it has no CRL).
	CheckRevocations bool
	// FetchCertificates lets verification fetch certificates missing from
	// the evidence (VCEK, ASK, ARK) from AMD's KDS through Getter. Never
	// applied to simulated evidence.
	FetchCertificates bool
	// Getter fetches from AMD's KDS; a CachingGetter over go-sev-guest's
	// default getter if nil. Used only when CheckRevocations or
	// FetchCertificates is set.
	Getter trust.HTTPSGetter
	// Now is the clock for certificate validity; time.Now if nil.
	Now func() time.Time

	once          sync.Once
	defaultGetter trust.HTTPSGetter
}

// Verified is evidence whose signature chain holds.
type Verified struct {
	*Parsed
	// Simulated is true when the evidence chains to the simulated roots.
	Simulated bool
}

func (v *Verifier) getter() trust.HTTPSGetter {
	if v.Getter != nil {
		return v.Getter
	}
	v.once.Do(func() { v.defaultGetter = &CachingGetter{Next: trust.DefaultHTTPSGetter()} })
	return v.defaultGetter
}

func (v *Verifier) now() time.Time {
	if v.Now != nil {
		return v.Now()
	}
	return time.Now()
}

// Verify parses evidence and checks its signature chain. Refusals
// (*attest.Refusal) carry evidence-malformed, simulated-not-allowed,
// signature-invalid or untrusted-root.
func (v *Verifier) Verify(ctx context.Context, evidence []byte) (*Verified, error) {
	p, err := Parse(evidence)
	if err != nil {
		return nil, attest.Refuse(attest.CodeEvidenceMalformed, "%v", err)
	}
	report := p.Attestation.GetReport()
	info, _ := abi.ParseSignerInfo(report.GetSignerInfo()) // checked by Parse
	var ekDER []byte
	switch info.SigningKey {
	case abi.VcekReportSigner:
		ekDER = p.Attestation.GetCertificateChain().GetVcekCert()
	case abi.VlekReportSigner:
		ekDER = p.Attestation.GetCertificateChain().GetVlekCert()
	default:
		return nil, attest.Refuse(attest.CodeEvidenceMalformed, "report signed by %v, want VCEK or VLEK", info.SigningKey)
	}
	var ek *x509.Certificate
	if len(ekDER) > 0 {
		if ek, err = x509.ParseCertificate(ekDER); err != nil {
			return nil, attest.Refuse(attest.CodeEvidenceMalformed, "%v certificate: %v", info.SigningKey, err)
		}
	} else if !v.FetchCertificates {
		return nil, attest.Refuse(attest.CodeEvidenceMalformed, "certificate table has no %v certificate (and fetching it from AMD is disabled)", info.SigningKey)
	}

	simulated := p.Labelled || (ek != nil && simroots.Issued(ek))
	if simulated && !v.AllowSimulated {
		return nil, attest.Refuse(attest.CodeSimulatedNotAllowed,
			"evidence comes from the simulated SEV-SNP attester (test-only AMD chain) and this broker does not allow simulated TEEs")
	}
	line := productLine(p, ek, info.SigningKey)
	opts := &verify.Options{Now: v.now(), Getter: v.getter()}
	if simulated {
		lines := v.SimulatedProductLines
		if lines == nil {
			lines = simroots.ProductLines
		}
		if !slices.Contains(lines, line) {
			return nil, attest.Refuse(attest.CodeUntrustedRoot,
				"simulated evidence from a chip of product line %q: this broker trusts the simulated roots of %s only", line, strings.Join(lines, ", "))
		}
		// Test roots only, and nothing fetched: they exist nowhere but here.
		opts.TrustedRoots = simroots.Roots([]string{line})
		opts.DisableCertFetching = true
	} else {
		if err := realRootsFor(line, info.SigningKey); err != nil {
			return nil, err
		}
		// nil TrustedRoots: go-sev-guest's embedded AMD roots.
		opts.DisableCertFetching = !v.FetchCertificates
		opts.CheckRevocations = v.CheckRevocations
	}
	if err := verify.SnpAttestationContext(ctx, p.Attestation, opts); err != nil {
		return nil, v.classify(p, err)
	}
	return &Verified{Parsed: p, Simulated: simulated}, nil
}

// productLine is the AMD product line the evidence claims: from the
// report's CPUID family/model (report version 3 and later), else from the
// endorsement certificate's product name; "" when neither says.
func productLine(p *Parsed, ek *x509.Certificate, key abi.ReportSigner) string {
	if fms := p.Attestation.GetReport().GetCpuid1EaxFms(); fms != 0 {
		return kds.ProductLineFromFms(fms)
	}
	if ek == nil {
		return ""
	}
	exts, err := kds.CertificateExtensions(ek, key)
	if err != nil {
		return ""
	}
	product, err := kds.ParseProductName(exts.ProductName, key)
	if err != nil {
		return ""
	}
	return kds.ProductLine(product)
}

// realRootsFor refuses, with a reason a human can act on, evidence that
// go-sev-guest's embedded AMD roots cannot verify whatever its signature:
// an unknown product line, or a VLEK where the embedded roots carry no ASVK
// (go-sev-guest v0.15 embeds only the VCEK chains as roots). The roots
// themselves are go-sev-guest's, unchanged.
func realRootsFor(line string, key abi.ReportSigner) error {
	if line == "" {
		return nil // v2 report whose certificate is to be fetched: go-sev-guest decides
	}
	r, ok := trust.DefaultRootCerts[line]
	if !ok || r == nil || r.ProductCerts == nil {
		return attest.Refuse(attest.CodeUntrustedRoot, "no AMD root is known for product line %q", line)
	}
	if key == abi.VlekReportSigner && r.ProductCerts.Asvk == nil {
		return attest.Refuse(attest.CodeUntrustedRoot,
			"VLEK-signed evidence from product line %s: go-sev-guest's embedded AMD roots carry no ASVK, so a VLEK cannot be chained to a trusted root", line)
	}
	return nil
}

// classify names why verify.SnpAttestation failed. Its errors are strings, so
// decide by re-checking: a report whose signature does not verify under the
// certificate it came with is signature-invalid; a good signature by a key
// that does not chain to a trusted root is untrusted-root.
func (v *Verifier) classify(p *Parsed, err error) error {
	var crlErr verify.CRLUnavailableErr
	if errors.As(err, &crlErr) {
		return attest.Refuse(attest.CodeUntrustedRoot, "revocation status unavailable: %v", err)
	}
	var fetchErr *trust.AttestationRecreationErr
	if errors.As(err, &fetchErr) {
		return attest.Refuse(attest.CodeUntrustedRoot, "could not obtain the endorsement certificate chain: %v", err)
	}
	chain := p.Attestation.GetCertificateChain()
	der := chain.GetVcekCert()
	if len(der) == 0 {
		der = chain.GetVlekCert()
	}
	ek, perr := x509.ParseCertificate(der)
	if perr != nil {
		return attest.Refuse(attest.CodeEvidenceMalformed, "endorsement certificate: %v", perr)
	}
	if serr := verify.SnpReportSignature(p.Raw, ek); serr != nil {
		return attest.Refuse(attest.CodeSignatureInvalid, "report signature does not verify under the endorsement key: %v", serr)
	}
	return attest.Refuse(attest.CodeUntrustedRoot, "endorsement key does not chain to a trusted AMD root: %v", err)
}

// CachingGetter is a trust.HTTPSGetter that remembers successful answers
// for TTL, so verifying many reports does not fetch the same VCEK, chain or
// CRL from AMD's KDS each time (AMD throttles repeated requests).
type CachingGetter struct {
	// Next does the fetching.
	Next trust.HTTPSGetter
	// TTL is how long an answer is reused; 1 hour if zero.
	TTL time.Duration
	// MaxEntries bounds the cache; 1024 if zero. The oldest entry goes first.
	MaxEntries int
	// Now is the clock; time.Now if nil.
	Now func() time.Time

	mu      sync.Mutex
	entries map[string]cached
	order   []string
}

type cached struct {
	body    []byte
	expires time.Time
}

// Get fetches url or answers from the cache.
func (g *CachingGetter) Get(url string) ([]byte, error) {
	return g.GetContext(context.Background(), url)
}

// GetContext fetches url or answers from the cache.
func (g *CachingGetter) GetContext(ctx context.Context, url string) ([]byte, error) {
	now := time.Now
	if g.Now != nil {
		now = g.Now
	}
	g.mu.Lock()
	if e, ok := g.entries[url]; ok && now().Before(e.expires) {
		g.mu.Unlock()
		return e.body, nil
	}
	g.mu.Unlock()
	body, err := trust.GetWith(ctx, g.Next, url)
	if err != nil {
		return nil, fmt.Errorf("fetching %s: %w", url, err)
	}
	ttl, max := g.TTL, g.MaxEntries
	if ttl == 0 {
		ttl = time.Hour
	}
	if max == 0 {
		max = 1024
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.entries == nil {
		g.entries = make(map[string]cached)
	}
	if _, ok := g.entries[url]; !ok {
		g.order = append(g.order, url)
	}
	g.entries[url] = cached{body: body, expires: now().Add(ttl)}
	for len(g.order) > max {
		delete(g.entries, g.order[0])
		g.order = g.order[1:]
	}
	return body, nil
}
