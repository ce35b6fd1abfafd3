package snp

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	"github.com/google/go-sev-guest/validate"

	"github.com/cleanwall/cleanwall/attest"
)

// TCB is the part of a TCB version a release policy constrains.
type TCB struct {
	Bootloader, TEE, SNP, Microcode uint8
}

func (t TCB) parts() kds.TCBParts {
	return kds.TCBParts{BlSpl: t.Bootloader, TeeSpl: t.TEE, SnpSpl: t.SNP, UcodeSpl: t.Microcode}
}

// Version composes the 64-bit TCB_VERSION (Milan/Genoa layout).
func (t TCB) Version() uint64 {
	v, _ := kds.ComposeTCBParts(t.parts())
	return uint64(v)
}

func (t TCB) String() string {
	return fmt.Sprintf("bootloader %d, tee %d, snp %d, microcode %d", t.Bootloader, t.TEE, t.SNP, t.Microcode)
}

func tcbOf(version uint64) TCB {
	p := kds.DecomposeTCBVersion(kds.TCBVersion(version))
	return TCB{Bootloader: p.BlSpl, TEE: p.TeeSpl, SNP: p.SnpSpl, Microcode: p.UcodeSpl}
}

// Firmware is an SEV firmware API version, "major.minor".
type Firmware struct {
	Major, Minor uint8
}

func (f Firmware) String() string { return fmt.Sprintf("%d.%d", f.Major, f.Minor) }

// ParseFirmware parses "major.minor".
func ParseFirmware(s string) (Firmware, error) {
	major, minor, ok := strings.Cut(s, ".")
	maj, err1 := parseU8(major)
	min, err2 := parseU8(minor)
	if !ok || err1 != nil || err2 != nil {
		return Firmware{}, fmt.Errorf("firmware version %q: want major.minor (0-255 each), e.g. 1.55", s)
	}
	return Firmware{Major: maj, Minor: min}, nil
}

func parseU8(s string) (uint8, error) {
	if s == "" || s[0] < '0' || s[0] > '9' {
		return 0, fmt.Errorf("not a number: %q", s)
	}
	n, err := strconv.ParseUint(s, 10, 8)
	return uint8(n), err
}

// ReferenceValues is one complete entry of a release policy's anyOf: every
// field is checked. There is no "unset": whoever builds one (the broker's
// config loader) must fill every field.
type ReferenceValues struct {
	// Measurements are the allowed launch measurements (48 bytes each); at least one.
	Measurements [][]byte
	// HostData is the required HOST_DATA (32 bytes).
	HostData []byte
	// MinimumTCB is the component-wise minimum reported TCB.
	MinimumTCB TCB
	// MinimumFirmware is the minimum firmware API version.
	MinimumFirmware Firmware
	// Debug allows a guest policy with the debug bit set.
	Debug bool
	// VMPL is the required VMPL (0-3).
	VMPL int
	// AllowedChipIDs are the allowed CHIP_IDs (64 bytes each); empty means any chip.
	AllowedChipIDs [][]byte
	// EgressPolicies are the egress policy hashes (32 bytes each) a release
	// must name (docs/keybroker.md §5); nil means no egress-policy binding.
	// It is not a property of the evidence, but it belongs to the entry:
	// anyOf picks one complete entry, binding included.
	EgressPolicies [][]byte
}

// Check reports whether r is complete and well formed.
func (r *ReferenceValues) Check() error {
	if len(r.Measurements) == 0 {
		return fmt.Errorf("measurements: at least one required")
	}
	for i, m := range r.Measurements {
		if len(m) != abi.MeasurementSize {
			return fmt.Errorf("measurements[%d]: %d bytes, want %d", i, len(m), abi.MeasurementSize)
		}
	}
	if len(r.HostData) != abi.HostDataSize {
		return fmt.Errorf("hostData: %d bytes, want %d", len(r.HostData), abi.HostDataSize)
	}
	if _, err := kds.ComposeTCBParts(r.MinimumTCB.parts()); err != nil {
		return fmt.Errorf("minimumTCB: %w", err)
	}
	if r.VMPL < 0 || r.VMPL > 3 {
		return fmt.Errorf("vmpl: %d, want 0-3", r.VMPL)
	}
	for i, c := range r.AllowedChipIDs {
		if len(c) != abi.ChipIDSize {
			return fmt.Errorf("allowedChipIDs[%d]: %d bytes, want %d", i, len(c), abi.ChipIDSize)
		}
	}
	if r.EgressPolicies != nil && len(r.EgressPolicies) == 0 {
		return fmt.Errorf("egressPolicies: empty (nil means no binding)")
	}
	for i, h := range r.EgressPolicies {
		if len(h) != attest.PolicySHA256Size {
			return fmt.Errorf("egressPolicies[%d]: %d bytes, want %d", i, len(h), attest.PolicySHA256Size)
		}
	}
	return nil
}

// egressAllowed reports whether a release naming policySHA256 (nil: none)
// passes r's egress-policy binding.
func (r *ReferenceValues) egressAllowed(policySHA256 []byte) bool {
	if r.EgressPolicies == nil {
		return true
	}
	return policySHA256 != nil && anyBytes(r.EgressPolicies, func(h []byte) bool { return bytes.Equal(h, policySHA256) })
}

// Guest policy bits that no release policy can allow: a migration agent can
// read the guest's memory, and CXL memory may sit outside its encryption.
// SMT is allowed (most hosts run with it). Debug is per release policy.
var permissiveGuestPolicy = abi.SnpPolicy{SMT: true, MigrateMA: true, Debug: true, CXLAllowed: true}

// failure is one reason an entry failed.
type failure struct {
	code   attest.Code
	detail string
}

// Satisfies evaluates the verified report, released for the egress policy
// policySHA256 (nil when the request named none), against a release
// policy's anyOf and returns the index of the first entry it satisfies.
// Otherwise the refusal carries the entry's failure code when every failure
// of every entry has that one code, else policy-not-satisfied; the detail
// lists each entry's reasons.
func (v *Verified) Satisfies(anyOf []ReferenceValues, policySHA256 []byte) (int, error) {
	att := v.Attestation
	base := func() *validate.Options {
		return &validate.Options{GuestPolicy: permissiveGuestPolicy}
	}
	// The report's own consistency (committed vs current TCB and firmware,
	// reported TCB vs the VCEK's, CHIP_ID vs the VCEK's HWID) holds whatever
	// the entry says.
	if err := validate.SnpAttestation(att, base()); err != nil {
		return -1, attest.Refuse(attest.CodePolicyNotSatisfied, "report is not self-consistent: %v", err)
	}
	// Fast path: an entry that holds as a whole needs no diagnosis.
	for i := range anyOf {
		if anyOf[i].egressAllowed(policySHA256) && validate.SnpAttestation(att, v.fullOptions(&anyOf[i])) == nil {
			return i, nil
		}
	}
	var perEntry [][]failure
	for i := range anyOf {
		e := &anyOf[i]
		fails := v.entryFailures(e, base, policySHA256)
		if len(fails) == 0 {
			// Belt and braces: every constraint of the entry at once.
			full := v.fullOptions(e)
			if err := validate.SnpAttestation(att, full); err != nil {
				fails = []failure{{attest.CodePolicyNotSatisfied, err.Error()}}
			} else {
				return i, nil
			}
		}
		perEntry = append(perEntry, fails)
	}
	if len(anyOf) == 0 {
		return -1, attest.Refuse(attest.CodePolicyNotSatisfied, "release policy has no entries")
	}
	code := perEntry[0][0].code
	var parts []string
	for i, fails := range perEntry {
		var reasons []string
		for _, f := range fails {
			if f.code != code {
				code = attest.CodePolicyNotSatisfied
			}
			reasons = append(reasons, fmt.Sprintf("%s (%s)", f.detail, string(f.code)))
		}
		parts = append(parts, fmt.Sprintf("anyOf[%d]: %s", i, strings.Join(reasons, "; ")))
	}
	return -1, attest.Refuse(code, "%s", strings.Join(parts, " | "))
}

// entryFailures checks each constraint of e alone on top of the base
// options, so each failure gets its own code.
func (v *Verified) entryFailures(e *ReferenceValues, base func() *validate.Options, policySHA256 []byte) []failure {
	att := v.Attestation
	report := att.GetReport()
	check := func(mutate func(*validate.Options)) bool {
		o := base()
		mutate(o)
		return validate.SnpAttestation(att, o) == nil
	}
	var fails []failure
	if !anyBytes(e.Measurements, func(m []byte) bool { return check(func(o *validate.Options) { o.Measurement = m }) }) {
		fails = append(fails, failure{attest.CodeMeasurementNotAllowed,
			fmt.Sprintf("measurement %s is not one of the %d allowed", hex.EncodeToString(report.GetMeasurement()), len(e.Measurements))})
	}
	if !check(func(o *validate.Options) { o.HostData = e.HostData }) {
		fails = append(fails, failure{attest.CodeHostDataMismatch,
			fmt.Sprintf("host data %s, want %s", hex.EncodeToString(report.GetHostData()), hex.EncodeToString(e.HostData))})
	}
	if !check(func(o *validate.Options) { o.GuestPolicy.Debug = e.Debug }) {
		fails = append(fails, failure{attest.CodeDebugNotAllowed, "guest policy allows debugging (the host can read guest memory)"})
	}
	if !check(func(o *validate.Options) { o.GuestPolicy.MigrateMA, o.GuestPolicy.CXLAllowed = false, false }) {
		fails = append(fails, failure{attest.CodePolicyNotSatisfied,
			fmt.Sprintf("guest policy 0x%x allows a migration agent or CXL memory", report.GetPolicy())})
	}
	if !check(func(o *validate.Options) { o.MinimumTCB = e.MinimumTCB.parts() }) {
		fails = append(fails, failure{attest.CodeTCBTooLow,
			fmt.Sprintf("reported TCB (%s) is below the minimum (%s)", tcbOf(report.GetReportedTcb()), e.MinimumTCB)})
	}
	if !check(func(o *validate.Options) {
		o.MinimumVersion = uint16(e.MinimumFirmware.Major)<<8 | uint16(e.MinimumFirmware.Minor)
	}) {
		fails = append(fails, failure{attest.CodeFirmwareTooOld,
			fmt.Sprintf("firmware %d.%d is older than %s", report.GetCurrentMajor(), report.GetCurrentMinor(), e.MinimumFirmware)})
	}
	vmpl := e.VMPL
	if !check(func(o *validate.Options) { o.VMPL = &vmpl }) {
		fails = append(fails, failure{attest.CodeVMPLNotAllowed, fmt.Sprintf("VMPL %d, want %d", report.GetVmpl(), e.VMPL)})
	}
	if len(e.AllowedChipIDs) > 0 && !anyBytes(e.AllowedChipIDs, func(c []byte) bool { return check(func(o *validate.Options) { o.ChipID = c }) }) {
		fails = append(fails, failure{attest.CodeChipNotAllowed,
			fmt.Sprintf("chip %.32s… is not one of the %d allowed", hex.EncodeToString(report.GetChipId()), len(e.AllowedChipIDs))})
	}
	if !e.egressAllowed(policySHA256) {
		detail := fmt.Sprintf("the request names no egress policy (policySHA256) and the key is bound to %d", len(e.EgressPolicies))
		if policySHA256 != nil {
			detail = fmt.Sprintf("egress policy %s is not one of the %d allowed", hex.EncodeToString(policySHA256), len(e.EgressPolicies))
		}
		fails = append(fails, failure{attest.CodeEgressPolicyNotAllowed, detail})
	}
	return fails
}

// fullOptions is e as one validate.Options, with the measurement and chip
// that matched (validate takes one of each).
func (v *Verified) fullOptions(e *ReferenceValues) *validate.Options {
	report := v.Attestation.GetReport()
	vmpl := e.VMPL
	o := &validate.Options{
		GuestPolicy:    abi.SnpPolicy{SMT: true, Debug: e.Debug},
		HostData:       e.HostData,
		MinimumTCB:     e.MinimumTCB.parts(),
		MinimumVersion: uint16(e.MinimumFirmware.Major)<<8 | uint16(e.MinimumFirmware.Minor),
		VMPL:           &vmpl,
	}
	for _, m := range e.Measurements {
		if bytes.Equal(m, report.GetMeasurement()) {
			o.Measurement = m
		}
	}
	if o.Measurement == nil {
		o.Measurement = e.Measurements[0]
	}
	for _, c := range e.AllowedChipIDs {
		if bytes.Equal(c, report.GetChipId()) {
			o.ChipID = c
		}
	}
	if len(e.AllowedChipIDs) > 0 && o.ChipID == nil {
		o.ChipID = e.AllowedChipIDs[0]
	}
	return o
}

func anyBytes(list [][]byte, ok func([]byte) bool) bool {
	for _, b := range list {
		if ok(b) {
			return true
		}
	}
	return false
}
