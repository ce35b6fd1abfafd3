package guest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/cleanwall/cleanwall/attest/simulated"
	"github.com/cleanwall/cleanwall/attest/snp"
)

func TestNewWithoutDevice(t *testing.T) {
	if _, err := os.Stat("/dev/sev-guest"); err == nil {
		t.Skip("this machine is an SEV-SNP guest")
	}
	if _, err := os.Stat("/sys/kernel/config/tsm/report"); err == nil {
		t.Skip("this machine has configfs-tsm")
	}
	_, err := New()
	if !errors.Is(err, ErrNoDevice) || !strings.HasPrefix(err.Error(), "no SEV-SNP guest device: ") {
		t.Fatalf("New() = %v, want ErrNoDevice", err)
	}
}

type providerFunc func([64]byte) ([]byte, error)

func (f providerFunc) GetRawQuote(rd [64]byte) ([]byte, error) { return f(rd) }

func TestEvidenceFromProvider(t *testing.T) {
	sim, err := simulated.New(simulated.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	hw := NewWithProvider(providerFunc(func(rd [64]byte) ([]byte, error) {
		return sim.Evidence(context.Background(), rd)
	}))
	if hw.Simulated() || hw.TEE() != "snp" {
		t.Fatal("hardware attester mislabelled")
	}
	rd := [64]byte{1, 2, 3}
	ev, err := hw.Evidence(context.Background(), rd)
	if err != nil {
		t.Fatal(err)
	}
	p, err := snp.Parse(ev)
	if err != nil || !bytes.Equal(p.ReportData(), rd[:]) {
		t.Fatalf("evidence: %v", err)
	}

	for name, qp := range map[string]providerFunc{
		"short":        func([64]byte) ([]byte, error) { return make([]byte, 100), nil },
		"other data":   func([64]byte) ([]byte, error) { return sim.Evidence(context.Background(), [64]byte{9}) },
		"device fails": func([64]byte) ([]byte, error) { return nil, errors.New("ioctl: EIO") },
	} {
		if _, err := NewWithProvider(qp).Evidence(context.Background(), rd); err == nil {
			t.Errorf("%s: evidence accepted", name)
		}
	}
}
