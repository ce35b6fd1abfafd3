// Package guest is the SEV-SNP attester of a real confidential guest: it
// asks the AMD secure processor for a report through go-sev-guest's quote
// provider (configfs-tsm, else /dev/sev-guest) and returns it with its
// certificate table, as attest/snp frames evidence.
//
// It only reads from the guest device. go-sev-guest's client package, which
// it imports, registers global flags (sev_guest_device_path and others): a
// program that imports this package must parse its own flags with a
// flag.FlagSet, or its -h output lists them.
package guest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/google/go-sev-guest/client"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/snp"
)

// ErrNoDevice is returned by New on a machine that is not an SEV-SNP guest.
var ErrNoDevice = errors.New("no SEV-SNP guest device")

// QuoteProvider is the part of go-sev-guest's client.QuoteProvider used here.
type QuoteProvider interface {
	GetRawQuote(reportData [64]byte) ([]byte, error)
}

// Attester produces hardware SEV-SNP evidence.
type Attester struct {
	// mu serialises requests: the guest device handles one at a time.
	mu sync.Mutex
	qp QuoteProvider
}

var _ attest.Attester = (*Attester)(nil)

// New finds the guest's quote provider (configfs-tsm, else /dev/sev-guest).
func New() (*Attester, error) {
	qp, err := client.GetQuoteProvider()
	if err != nil {
		return nil, fmt.Errorf("%w: neither configfs-tsm (/sys/kernel/config/tsm/report) nor /dev/sev-guest answers: %v", ErrNoDevice, err)
	}
	return &Attester{qp: qp}, nil
}

// NewWithProvider uses qp, e.g. a recorded provider in tests.
func NewWithProvider(qp QuoteProvider) *Attester { return &Attester{qp: qp} }

// TEE is "snp".
func (a *Attester) TEE() string { return attest.TEESNP }

// Simulated is false.
func (a *Attester) Simulated() bool { return false }

// Evidence asks the secure processor for a report binding reportData and
// returns it followed by its certificate table, after checking the framing.
func (a *Attester) Evidence(ctx context.Context, reportData [64]byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	a.mu.Lock()
	raw, err := a.qp.GetRawQuote(reportData)
	a.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("getting SEV-SNP report: %w", err)
	}
	p, err := snp.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("SEV-SNP quote provider answered: %w", err)
	}
	if !bytes.Equal(p.ReportData(), reportData[:]) {
		return nil, errors.New("SEV-SNP report carries other report data than requested")
	}
	return raw, nil
}
