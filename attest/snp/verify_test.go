package snp_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/uuid"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/simulated"
	"github.com/cleanwall/cleanwall/attest/snp"
)

// noNetwork fails every fetch: verification in tests must never leave the machine.
type noNetwork struct{ calls atomic.Int32 }

func (n *noNetwork) Get(url string) ([]byte, error) {
	n.calls.Add(1)
	return nil, fmt.Errorf("test forbids fetching %s", url)
}

func evidence(t *testing.T, a attest.Attester, rd [64]byte) []byte {
	t.Helper()
	ev, err := a.Evidence(context.Background(), rd)
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

func wantCode(t *testing.T, err error, code attest.Code) *attest.Refusal {
	t.Helper()
	var r *attest.Refusal
	if !errors.As(err, &r) || r.Code != code {
		t.Fatalf("err = %v, want refusal %s", err, code)
	}
	return r
}

func TestVerifySignatureChain(t *testing.T) {
	net := &noNetwork{}
	allow := &snp.Verifier{AllowSimulated: true, Getter: net, FetchCertificates: true, CheckRevocations: true}
	deny := &snp.Verifier{Getter: net, FetchCertificates: true, CheckRevocations: true}
	a, err := simulated.New(simulated.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	rd := [64]byte{42}
	ev := evidence(t, a, rd)

	v, err := allow.Verify(context.Background(), ev)
	if err != nil {
		t.Fatalf("simulated evidence refused by a broker that allows it: %v", err)
	}
	if !v.Simulated || v.CheckReportData(rd) != nil {
		t.Fatalf("Simulated=%v", v.Simulated)
	}
	wantCode(t, v.CheckReportData([64]byte{43}), attest.CodeReportDataMismatch)

	_, err = deny.Verify(context.Background(), ev)
	wantCode(t, err, attest.CodeSimulatedNotAllowed)

	// Without the label the chain still gives simulated evidence away.
	_, entries, _ := snp.SplitEvidence(ev)
	var unlabelled []snp.CertEntry
	for _, e := range entries {
		if e.GUID != snp.SimulatedLabelGUID {
			unlabelled = append(unlabelled, e)
		}
	}
	_, err = deny.Verify(context.Background(), snp.JoinEvidence(ev[:snp.ReportSize], unlabelled))
	wantCode(t, err, attest.CodeSimulatedNotAllowed)

	// One flipped byte in the signed part of the report.
	tampered := bytes.Clone(ev)
	tampered[0x90] ^= 0x01 // first byte of MEASUREMENT
	_, err = allow.Verify(context.Background(), tampered)
	wantCode(t, err, attest.CodeSignatureInvalid)

	// A chain made from other keys, that looks like AMD's.
	u, err := simulated.NewUntrusted(simulated.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	uev := evidence(t, u, rd)
	_, err = allow.Verify(context.Background(), uev)
	wantCode(t, err, attest.CodeUntrustedRoot)
	_, uentries, _ := snp.SplitEvidence(uev)
	var ulabel []snp.CertEntry
	for _, e := range uentries {
		if e.GUID != snp.SimulatedLabelGUID {
			ulabel = append(ulabel, e)
		}
	}
	// Unlabelled, it is checked against AMD's real roots, and fails there.
	_, err = deny.Verify(context.Background(), snp.JoinEvidence(uev[:snp.ReportSize], ulabel))
	wantCode(t, err, attest.CodeUntrustedRoot)

	// No VCEK in the table and no fetching: nothing to verify with.
	var novcek []snp.CertEntry
	for _, e := range entries {
		if e.GUID != uuid.MustParse(abi.VcekGUID) {
			novcek = append(novcek, e)
		}
	}
	_, err = (&snp.Verifier{AllowSimulated: true}).Verify(context.Background(), snp.JoinEvidence(ev[:snp.ReportSize], novcek))
	wantCode(t, err, attest.CodeEvidenceMalformed)

	_, err = allow.Verify(context.Background(), ev[:100])
	wantCode(t, err, attest.CodeEvidenceMalformed)
	if n := net.calls.Load(); n != 0 {
		t.Fatalf("verification fetched %d times", n)
	}
}

// withoutLabel drops the simulated label from evidence: trust must never
// rest on it.
func withoutLabel(t *testing.T, ev []byte) []byte {
	t.Helper()
	_, entries, err := snp.SplitEvidence(ev)
	if err != nil {
		t.Fatal(err)
	}
	var out []snp.CertEntry
	for _, e := range entries {
		if e.GUID != snp.SimulatedLabelGUID {
			out = append(out, e)
		}
	}
	return snp.JoinEvidence(ev[:snp.ReportSize], out)
}

// TestEveryProductLine: simulated evidence of every product line
// go-sev-guest knows, signed with a VCEK or a VLEK, verifies against that
// line's simulated roots, and only when they are trusted.
func TestEveryProductLine(t *testing.T) {
	net := &noNetwork{}
	for _, product := range simulated.Products {
		line, err := simulated.ProductLine(product)
		if err != nil {
			t.Fatal(err)
		}
		for _, vlek := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s vlek=%v", product, vlek), func(t *testing.T) {
				cfg := simulated.DefaultConfig()
				cfg.Product, cfg.VLEK = product, vlek
				a, err := simulated.New(cfg)
				if err != nil {
					t.Fatal(err)
				}
				rd := [64]byte{7}
				ev := evidence(t, a, rd)
				allow := &snp.Verifier{AllowSimulated: true, Getter: net, FetchCertificates: true, CheckRevocations: true}
				v, err := allow.Verify(context.Background(), ev)
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if !v.Simulated || v.CheckReportData(rd) != nil {
					t.Fatalf("Simulated=%v", v.Simulated)
				}
				if _, err := v.Satisfies([]snp.ReferenceValues{refValues(cfg)}, nil); err != nil {
					t.Fatalf("healthy %s guest does not satisfy its policy: %v", product, err)
				}
				// Unlabelled, the chain still gives it away.
				deny := &snp.Verifier{Getter: net, FetchCertificates: true, CheckRevocations: true}
				_, err = deny.Verify(context.Background(), withoutLabel(t, ev))
				wantCode(t, err, attest.CodeSimulatedNotAllowed)
				// A broker that trusts the simulated roots of the other lines only.
				var others []string
				for _, p := range simulated.Products {
					if l, _ := simulated.ProductLine(p); l != line {
						others = append(others, l)
					}
				}
				only := &snp.Verifier{AllowSimulated: true, SimulatedProductLines: others, Getter: net}
				_, err = only.Verify(context.Background(), ev)
				r := wantCode(t, err, attest.CodeUntrustedRoot)
				if !strings.Contains(r.Detail, `product line "`+line+`"`) || !strings.Contains(r.Detail, strings.Join(others, ", ")+" only") {
					t.Fatalf("detail %q does not say which line is not trusted", r.Detail)
				}
				// A chain of other keys that looks like this line's.
				u, err := simulated.NewUntrusted(cfg)
				if err != nil {
					t.Fatal(err)
				}
				_, err = allow.Verify(context.Background(), evidence(t, u, rd))
				wantCode(t, err, attest.CodeUntrustedRoot)
				// Unlabelled, it is checked against AMD's real roots, and fails there.
				_, err = deny.Verify(context.Background(), withoutLabel(t, evidence(t, u, rd)))
				r = wantCode(t, err, attest.CodeUntrustedRoot)
				if vlek && !strings.Contains(r.Detail, "no ASVK") {
					t.Fatalf("a VLEK against the real roots: detail %q", r.Detail)
				}
			})
		}
	}
	if n := net.calls.Load(); n != 0 {
		t.Fatalf("verification fetched %d times", n)
	}
}

func TestSatisfiesEgressPolicies(t *testing.T) {
	good := simulated.DefaultConfig()
	v := verified(t, good)
	h1, h2 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	bound := refValues(good)
	bound.EgressPolicies = [][]byte{h1}
	if i, err := v.Satisfies([]snp.ReferenceValues{bound}, h1); err != nil || i != 0 {
		t.Fatalf("listed policy refused: %d %v", i, err)
	}
	r := wantCode(t, second(v.Satisfies([]snp.ReferenceValues{bound}, h2)), attest.CodeEgressPolicyNotAllowed)
	if !strings.Contains(r.Detail, hex.EncodeToString(h2)+" is not one of the 1 allowed") {
		t.Fatalf("detail %q", r.Detail)
	}
	r = wantCode(t, second(v.Satisfies([]snp.ReferenceValues{bound}, nil)), attest.CodeEgressPolicyNotAllowed)
	if !strings.Contains(r.Detail, "names no egress policy") {
		t.Fatalf("detail %q", r.Detail)
	}
	// No list: any policy, or none.
	for _, h := range [][]byte{nil, h1, h2} {
		if _, err := v.Satisfies([]snp.ReferenceValues{refValues(good)}, h); err != nil {
			t.Fatalf("unbound entry refused %x: %v", h, err)
		}
	}
	// anyOf: an unbound entry or another entry listing the hash satisfies.
	other := refValues(good)
	other.EgressPolicies = [][]byte{h2}
	if i, err := v.Satisfies([]snp.ReferenceValues{bound, other}, h2); err != nil || i != 1 {
		t.Fatalf("second entry should match: %d %v", i, err)
	}
	// An entry that fails on the evidence and on the policy: both reasons.
	wrong := bound
	wrong.HostData = bytes.Repeat([]byte{3}, 32)
	r = wantCode(t, second(v.Satisfies([]snp.ReferenceValues{wrong}, h2)), attest.CodePolicyNotSatisfied)
	if !strings.Contains(r.Detail, "(host-data-mismatch)") || !strings.Contains(r.Detail, "(egress-policy-not-allowed)") {
		t.Fatalf("detail %q", r.Detail)
	}
	bad := bound
	bad.EgressPolicies = [][]byte{}
	if bad.Check() == nil {
		t.Fatal("an empty, non-nil egressPolicies list passes Check")
	}
	bad.EgressPolicies = [][]byte{{1, 2}}
	if bad.Check() == nil {
		t.Fatal("a 2-byte egress policy hash passes Check")
	}
}

func second[T any](_ T, err error) error { return err }

func refValues(c simulated.Config) snp.ReferenceValues {
	return snp.ReferenceValues{
		Measurements:    [][]byte{bytes.Repeat([]byte{9}, 48), c.Measurement[:]},
		HostData:        c.HostData[:],
		MinimumTCB:      c.TCB,
		MinimumFirmware: c.Firmware,
		Debug:           false,
		VMPL:            int(c.VMPL),
		AllowedChipIDs:  nil,
	}
}

func verified(t *testing.T, cfg simulated.Config) *snp.Verified {
	t.Helper()
	a, err := simulated.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	v, err := (&snp.Verifier{AllowSimulated: true}).Verify(context.Background(), evidence(t, a, [64]byte{}))
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestSatisfiesMapsEachFailure(t *testing.T) {
	good := simulated.DefaultConfig()
	ref := refValues(good)
	if i, err := verified(t, good).Satisfies([]snp.ReferenceValues{ref}, nil); err != nil || i != 0 {
		t.Fatalf("healthy guest refused: %d %v", i, err)
	}
	withChips := ref
	withChips.AllowedChipIDs = [][]byte{bytes.Repeat([]byte{1}, 64), good.ChipID[:]}
	if _, err := verified(t, good).Satisfies([]snp.ReferenceValues{withChips}, nil); err != nil {
		t.Fatalf("allowed chip refused: %v", err)
	}
	for _, tc := range []struct {
		name   string
		guest  func(*simulated.Config)
		ref    func(*snp.ReferenceValues)
		code   attest.Code
		detail string
	}{
		{"measurement", func(c *simulated.Config) { c.Measurement[0] ^= 1 }, nil, attest.CodeMeasurementNotAllowed, "is not one of the 2 allowed"},
		{"host data", func(c *simulated.Config) { c.HostData[5] ^= 1 }, nil, attest.CodeHostDataMismatch, "host data"},
		{"debug", func(c *simulated.Config) { c.Debug = true }, nil, attest.CodeDebugNotAllowed, "debugging"},
		{"migration agent", func(c *simulated.Config) { c.MigrateMA = true }, nil, attest.CodePolicyNotSatisfied, "migration agent"},
		{"tcb snp", func(c *simulated.Config) { c.TCB.SNP = 7 }, nil, attest.CodeTCBTooLow, "snp 7"},
		{"tcb microcode", func(c *simulated.Config) { c.TCB.Microcode = 114 }, nil, attest.CodeTCBTooLow, "microcode 114"},
		{"firmware", func(c *simulated.Config) { c.Firmware.Minor = 54 }, nil, attest.CodeFirmwareTooOld, "1.54 is older than 1.55"},
		{"vmpl", func(c *simulated.Config) { c.VMPL = 1 }, nil, attest.CodeVMPLNotAllowed, "VMPL 1, want 0"},
		{"chip", nil, func(r *snp.ReferenceValues) { r.AllowedChipIDs = [][]byte{bytes.Repeat([]byte{1}, 64)} }, attest.CodeChipNotAllowed, "chip"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, r := good, ref
			if tc.guest != nil {
				tc.guest(&cfg)
			}
			if tc.ref != nil {
				tc.ref(&r)
			}
			_, err := verified(t, cfg).Satisfies([]snp.ReferenceValues{r}, nil)
			ref := wantCode(t, err, tc.code)
			if !strings.Contains(ref.Detail, tc.detail) || !strings.HasPrefix(ref.Detail, "anyOf[0]: ") {
				t.Fatalf("detail %q does not say %q", ref.Detail, tc.detail)
			}
		})
	}
	// Debug allowed by the entry: the debug guest passes.
	dbg := good
	dbg.Debug = true
	allowDebug := ref
	allowDebug.Debug = true
	if _, err := verified(t, dbg).Satisfies([]snp.ReferenceValues{allowDebug}, nil); err != nil {
		t.Fatalf("debug guest refused by a policy that allows debug: %v", err)
	}
}

func TestSatisfiesAnyOf(t *testing.T) {
	good := simulated.DefaultConfig()
	v := verified(t, good)
	wrongMeasurement := refValues(good)
	wrongMeasurement.Measurements = [][]byte{bytes.Repeat([]byte{3}, 48)}
	wrongHost := refValues(good)
	wrongHost.HostData = bytes.Repeat([]byte{3}, 32)
	if i, err := v.Satisfies([]snp.ReferenceValues{wrongMeasurement, refValues(good)}, nil); err != nil || i != 1 {
		t.Fatalf("second entry should match: %d %v", i, err)
	}
	// Different reasons in different entries: policy-not-satisfied, reasons kept.
	_, err := v.Satisfies([]snp.ReferenceValues{wrongMeasurement, wrongHost}, nil)
	r := wantCode(t, err, attest.CodePolicyNotSatisfied)
	if !strings.Contains(r.Detail, "anyOf[0]: measurement") || !strings.Contains(r.Detail, "(measurement-not-allowed)") ||
		!strings.Contains(r.Detail, "anyOf[1]: host data") || !strings.Contains(r.Detail, "(host-data-mismatch)") {
		t.Fatalf("detail lacks per-entry reasons: %s", r.Detail)
	}
	// The same reason everywhere keeps its code.
	_, err = v.Satisfies([]snp.ReferenceValues{wrongMeasurement, wrongMeasurement}, nil)
	wantCode(t, err, attest.CodeMeasurementNotAllowed)
}

func TestCachingGetter(t *testing.T) {
	var calls atomic.Int32
	next := getterFunc(func(url string) ([]byte, error) {
		calls.Add(1)
		if strings.Contains(url, "fail") {
			return nil, errors.New("down")
		}
		return []byte("body of " + url), nil
	})
	now := time.Unix(1000, 0)
	g := &snp.CachingGetter{Next: next, TTL: time.Minute, MaxEntries: 2, Now: func() time.Time { return now }}
	for range 3 {
		if b, err := g.Get("https://kds/a"); err != nil || string(b) != "body of https://kds/a" {
			t.Fatal(b, err)
		}
	}
	if calls.Load() != 1 {
		t.Fatalf("%d fetches for one URL, want 1", calls.Load())
	}
	if _, err := g.Get("https://kds/fail"); err == nil {
		t.Fatal("failure not passed on")
	}
	g.Get("https://kds/fail")
	if calls.Load() != 3 {
		t.Fatalf("failures were cached: %d calls", calls.Load())
	}
	now = now.Add(2 * time.Minute)
	g.Get("https://kds/a")
	if calls.Load() != 4 {
		t.Fatal("expired entry reused")
	}
	g.Get("https://kds/b")
	g.Get("https://kds/c") // evicts a
	g.Get("https://kds/a")
	if calls.Load() != 7 {
		t.Fatalf("bounded cache kept too much: %d calls", calls.Load())
	}
}

type getterFunc func(string) ([]byte, error)

func (f getterFunc) Get(url string) ([]byte, error) { return f(url) }

// FuzzVerify feeds mutated simulated evidence through verification and
// policy evaluation: whatever the bytes, the answer is a verdict or a
// refusal, never a panic (go-sev-guest parses attacker input here).
func FuzzVerify(f *testing.F) {
	a, err := simulated.New(simulated.DefaultConfig())
	if err != nil {
		f.Fatal(err)
	}
	ev, err := a.Evidence(context.Background(), [64]byte{})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(ev)
	f.Add(ev[:snp.ReportSize])
	// Every product line, VCEK and VLEK.
	for _, product := range simulated.Products {
		for _, vlek := range []bool{false, true} {
			cfg := simulated.DefaultConfig()
			cfg.Product, cfg.VLEK = product, vlek
			a, err := simulated.New(cfg)
			if err != nil {
				f.Fatal(err)
			}
			ev, err := a.Evidence(context.Background(), [64]byte{})
			if err != nil {
				f.Fatal(err)
			}
			f.Add(ev)
		}
	}
	ref := refValues(simulated.DefaultConfig())
	ref.EgressPolicies = [][]byte{bytes.Repeat([]byte{1}, 32)}
	v := &snp.Verifier{AllowSimulated: true}
	f.Fuzz(func(t *testing.T, evidence []byte) {
		got, err := v.Verify(context.Background(), evidence)
		if err != nil {
			var r *attest.Refusal
			if !errors.As(err, &r) {
				t.Fatalf("Verify returned a non-refusal: %v", err)
			}
			return
		}
		for _, policy := range [][]byte{nil, bytes.Repeat([]byte{1}, 32)} {
			if _, err := got.Satisfies([]snp.ReferenceValues{ref}, policy); err != nil {
				var r *attest.Refusal
				if !errors.As(err, &r) {
					t.Fatalf("Satisfies returned a non-refusal: %v", err)
				}
			} else if policy == nil {
				t.Fatal("an entry bound to an egress policy was satisfied by a release that names none")
			}
		}
	})
}
