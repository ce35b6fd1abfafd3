// Package simulated is a software SEV-SNP attester for tests and demos. It
// signs a fresh report per request with go-sev-guest's test-only AMD chain
// (or, for tests of refusals, with a chain of its own that nobody trusts),
// as any product line go-sev-guest knows (Milan, Genoa, Turin) and with a
// VCEK or a VLEK, with configurable measurement, host data, guest policy,
// TCB, firmware, VMPL and chip id, so tests can also produce wrong evidence.
//
// Everything it makes is labelled simulated: Attester.Simulated is true and
// the evidence's certificate table carries snp.SimulatedLabelGUID. A broker
// trusts it only when configured with allowSimulatedTEE. This package links
// go-sev-guest's testing package (fixed, published private keys, and global
// flags): production code paths must never import it.
package simulated

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha512"
	"crypto/x509"
	"fmt"
	"sync"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	sevtest "github.com/google/go-sev-guest/testing"
	"github.com/google/uuid"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/snp"
)

// DefaultProduct is the product of the simulated chip unless configured:
// Milan, stepping B1.
const DefaultProduct = "Milan-B1"

// Products are the product names the simulated attester can sign as: one
// per product line go-sev-guest knows (see attest/simulated/simroots).
var Products = []string{"Milan-B1", "Genoa-B1", "Turin-B0"}

// simulatedCSPID is the cloud provider a simulated VLEK is issued to.
const simulatedCSPID = "cleanwall-simulated-csp"

// chainCreated is when the simulated chain's certificates start to be valid
// (the ARK and ASK for 25 years, the VCEK for 7).
var chainCreated = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

// Config is what the simulated guest reports about itself.
type Config struct {
	// Product is the simulated chip's product name as a VCEK certificate
	// carries it (kds: "Milan-B1", "Genoa-B1", "Turin-B0", …): the report's
	// CPUID family, model and stepping, the endorsement certificate and the
	// chain's product line follow it. Empty means DefaultProduct.
	Product string
	// VLEK signs reports with a VLEK (an endorsement key AMD certifies, via
	// the product line's ASVK, for a cloud provider) instead of the chip's
	// VCEK.
	VLEK        bool
	Measurement [abi.MeasurementSize]byte
	HostData    [abi.HostDataSize]byte
	// Debug sets the guest policy's debug bit.
	Debug bool
	// MigrateMA sets the guest policy's migration agent bit.
	MigrateMA bool
	// TCB is the current, committed, reported and launch TCB, and the TCB
	// the VCEK (or VLEK) is certified for.
	TCB snp.TCB
	// Firmware is the current and committed firmware API version.
	Firmware snp.Firmware
	// FirmwareBuild is the current and committed firmware build.
	FirmwareBuild uint8
	VMPL          uint32
	// ChipID is the report's CHIP_ID and the VCEK's HWID.
	ChipID [abi.ChipIDSize]byte
}

// DefaultConfig is a plausible, healthy guest: a Milan-B1 chip signing with
// its VCEK, fixed measurement and host data derived from their names, no
// debug, VMPL 0, TCB 3/0/8/115, firmware 1.55.
func DefaultConfig() Config {
	c := Config{Product: DefaultProduct}
	m := sha512.Sum384([]byte("cleanwall simulated guest measurement"))
	copy(c.Measurement[:], m[:])
	h := sha512.Sum512_256([]byte("cleanwall simulated host data"))
	copy(c.HostData[:], h[:])
	id := sha512.Sum512([]byte("cleanwall simulated chip"))
	copy(c.ChipID[:], id[:])
	c.TCB = snp.TCB{Bootloader: 3, TEE: 0, SNP: 8, Microcode: 115}
	c.Firmware = snp.Firmware{Major: 1, Minor: 55}
	c.FirmwareBuild = 1
	return c
}

// Attester is a simulated SEV-SNP attester. It is safe for concurrent use.
type Attester struct {
	cfg Config
	// signer is the VCEK or the VLEK.
	signer *ecdsa.PrivateKey
	fms    uint32
	table  []snp.CertEntry
}

var _ attest.Attester = (*Attester)(nil)

// chainMu serialises chain building: go-sev-guest's builder signs with a
// shared math/rand source that is not safe for concurrent use.
var chainMu sync.Mutex

// New returns an attester whose chain is go-sev-guest's test-only AMD chain
// (the roots in attest/simulated/simroots).
func New(cfg Config) (*Attester, error) {
	return newAttester(cfg, sevtest.DefaultAmdKeys())
}

// NewUntrusted returns an attester with a chain made from fresh keys: it
// looks like an AMD chain but no broker trusts it.
func NewUntrusted(cfg Config) (*Attester, error) {
	keys := &sevtest.AmdKeys{}
	var err error
	for _, k := range []**rsa.PrivateKey{&keys.Ark, &keys.Ask, &keys.Asvk} {
		if *k, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			return nil, fmt.Errorf("generating untrusted chain: %w", err)
		}
	}
	for _, k := range []**ecdsa.PrivateKey{&keys.Vcek, &keys.Vlek} {
		if *k, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader); err != nil {
			return nil, fmt.Errorf("generating untrusted chain: %w", err)
		}
	}
	return newAttester(cfg, keys)
}

// Chain is a simulated chain as go-sev-guest's test signer builds it.
type Chain struct {
	ARK, ASK, ASVK, VCEK, VLEK *x509.Certificate
}

// chain builds the certificate chain of cfg's product with keys, the
// endorsement keys certified for cfg's TCB (and the VCEK for its chip id).
func chain(cfg Config, keys *sevtest.AmdKeys) (Chain, error) {
	tcb := kds.TCBParts{BlSpl: cfg.TCB.Bootloader, TeeSpl: cfg.TCB.TEE, SnpSpl: cfg.TCB.SNP, UcodeSpl: cfg.TCB.Microcode}
	// The product name is always set: an empty one would make the builder
	// read go-sev-guest's global --product_name flag.
	b := &sevtest.AmdSignerBuilder{
		Keys:             keys,
		ProductName:      cfg.Product,
		ArkCreationTime:  chainCreated,
		AskCreationTime:  chainCreated,
		AsvkCreationTime: chainCreated,
		VcekCreationTime: chainCreated,
		VlekCreationTime: chainCreated,
		CSPID:            simulatedCSPID,
		VcekCustom:       sevtest.CertOverride{Extensions: sevtest.CustomExtensions(tcb, cfg.ChipID[:], "", cfg.Product)},
		VlekCustom:       sevtest.CertOverride{Extensions: sevtest.CustomExtensions(tcb, nil, simulatedCSPID, cfg.Product)},
	}
	chainMu.Lock()
	signer, err := b.TestOnlyCertChain()
	chainMu.Unlock()
	if err != nil {
		return Chain{}, fmt.Errorf("building simulated AMD chain: %w", err)
	}
	return Chain{ARK: signer.Ark, ASK: signer.Ask, ASVK: signer.Asvk, VCEK: signer.Vcek, VLEK: signer.Vlek}, nil
}

// ProductLine is the product line of a product name ("Genoa" for
// "Genoa-B1"), or an error for a name kds does not know.
func ProductLine(product string) (string, error) {
	p, err := kds.ParseProductName(product, abi.VcekReportSigner)
	if err != nil {
		return "", fmt.Errorf("simulated product %q: %w (known: %v)", product, err, Products)
	}
	return kds.ProductLine(p), nil
}

func newAttester(cfg Config, keys *sevtest.AmdKeys) (*Attester, error) {
	if cfg.Product == "" {
		cfg.Product = DefaultProduct
	}
	product, err := kds.ParseProductName(cfg.Product, abi.VcekReportSigner)
	if err != nil {
		return nil, fmt.Errorf("simulated product %q: %w (known: %v)", cfg.Product, err, Products)
	}
	if _, err := kds.ComposeTCBParts(kds.TCBParts{BlSpl: cfg.TCB.Bootloader, TeeSpl: cfg.TCB.TEE, SnpSpl: cfg.TCB.SNP, UcodeSpl: cfg.TCB.Microcode}); err != nil {
		return nil, fmt.Errorf("simulated TCB: %w", err)
	}
	if cfg.VMPL > 3 {
		return nil, fmt.Errorf("simulated VMPL %d: want 0-3", cfg.VMPL)
	}
	c, err := chain(cfg, keys)
	if err != nil {
		return nil, err
	}
	a := &Attester{cfg: cfg, signer: keys.Vcek, fms: abi.MaskedCpuid1EaxFromSevProduct(product)}
	if cfg.VLEK {
		// The table carries the VLEK's intermediate (the ASVK) in the ASK
		// slot: the certificate table has no GUID of its own for it.
		a.signer = keys.Vlek
		a.table = []snp.CertEntry{
			{GUID: uuid.MustParse(abi.ArkGUID), Data: c.ARK.Raw},
			{GUID: uuid.MustParse(abi.AskGUID), Data: c.ASVK.Raw},
			{GUID: uuid.MustParse(abi.VlekGUID), Data: c.VLEK.Raw},
		}
	} else {
		a.table = []snp.CertEntry{
			{GUID: uuid.MustParse(abi.ArkGUID), Data: c.ARK.Raw},
			{GUID: uuid.MustParse(abi.AskGUID), Data: c.ASK.Raw},
			{GUID: uuid.MustParse(abi.VcekGUID), Data: c.VCEK.Raw},
		}
	}
	a.table = append(a.table, snp.CertEntry{GUID: snp.SimulatedLabelGUID, Data: []byte(snp.SimulatedLabel)})
	return a, nil
}

// TEE is "snp".
func (a *Attester) TEE() string { return attest.TEESNP }

// Simulated is always true.
func (a *Attester) Simulated() bool { return true }

// Config is what the attester reports.
func (a *Attester) Config() Config { return a.cfg }

// Evidence returns a freshly signed report binding reportData, followed by
// the certificate table.
func (a *Attester) Evidence(ctx context.Context, reportData [64]byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	raw, err := a.Report(reportData)
	if err != nil {
		return nil, err
	}
	return snp.JoinEvidence(raw, a.table), nil
}

// Report returns a signed raw report (without certificates).
func (a *Attester) Report(reportData [64]byte) ([]byte, error) {
	c := a.cfg
	tcb := c.TCB.Version()
	signer := abi.VcekReportSigner
	if c.VLEK {
		signer = abi.VlekReportSigner
	}
	r := &spb.Report{
		Version:         abi.ReportVersion3,
		GuestSvn:        1,
		Policy:          abi.SnpPolicyToBytes(abi.SnpPolicy{ABIMajor: 1, ABIMinor: 51, SMT: true, Debug: c.Debug, MigrateMA: c.MigrateMA}),
		FamilyId:        make([]byte, abi.FamilyIDSize),
		ImageId:         make([]byte, abi.ImageIDSize),
		Vmpl:            c.VMPL,
		SignatureAlgo:   abi.SignEcdsaP384Sha384,
		CurrentTcb:      tcb,
		PlatformInfo:    1, // SMT enabled
		SignerInfo:      abi.ComposeSignerInfo(abi.SignerInfo{SigningKey: signer}),
		ReportData:      reportData[:],
		Measurement:     c.Measurement[:],
		HostData:        c.HostData[:],
		IdKeyDigest:     make([]byte, abi.IDKeyDigestSize),
		AuthorKeyDigest: make([]byte, abi.AuthorKeyDigestSize),
		ReportId:        make([]byte, abi.ReportIDSize),
		ReportIdMa:      make([]byte, abi.ReportIDMASize),
		ReportedTcb:     tcb,
		Cpuid1EaxFms:    a.fms,
		ChipId:          c.ChipID[:],
		CommittedTcb:    tcb,
		CurrentBuild:    uint32(c.FirmwareBuild),
		CurrentMinor:    uint32(c.Firmware.Minor),
		CurrentMajor:    uint32(c.Firmware.Major),
		CommittedBuild:  uint32(c.FirmwareBuild),
		CommittedMinor:  uint32(c.Firmware.Minor),
		CommittedMajor:  uint32(c.Firmware.Major),
		LaunchTcb:       tcb,
		Signature:       make([]byte, abi.SignatureSize),
	}
	if _, err := rand.Read(r.ReportId); err != nil {
		return nil, fmt.Errorf("simulated report id: %w", err)
	}
	raw, err := abi.ReportToAbiBytes(r)
	if err != nil {
		return nil, fmt.Errorf("encoding simulated report: %w", err)
	}
	digest := crypto.SHA384.New()
	digest.Write(abi.SignedComponent(raw))
	rs, ss, err := ecdsa.Sign(rand.Reader, a.signer, digest.Sum(nil))
	if err != nil {
		return nil, fmt.Errorf("signing simulated report: %w", err)
	}
	if err := abi.SetSignature(rs, ss, raw); err != nil {
		return nil, fmt.Errorf("signing simulated report: %w", err)
	}
	return raw, nil
}
