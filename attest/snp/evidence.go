// Package snp owns AMD SEV-SNP evidence as the release protocol carries it:
// the framing (raw attestation report followed by its certificate table,
// docs/keybroker.md §2), its parsing into go-sev-guest's types, the verification
// of the signature chain (verify.SnpAttestation) and the evaluation of
// release-policy reference values (validate.SnpAttestation), with every
// failure mapped to its refusal code.
//
// It never talks to a guest device (see attest/snp/guest) and never signs
// anything (see attest/simulated). It imports go-sev-guest's verify package,
// which registers one global flag: a program that imports this package must
// parse its own flags with a flag.FlagSet.
package snp

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-sev-guest/abi"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	"github.com/google/uuid"

	"github.com/cleanwall/cleanwall/attest"
)

// ReportSize is the size of a raw SEV-SNP attestation report.
const ReportSize = abi.ReportSize

// SimulatedLabelGUID marks evidence made by the simulated attester: its
// certificate table carries an entry with this GUID. The label is a courtesy
// to humans and to brokers that refuse simulated evidence; trust never rests
// on it (the verifier decides by the signing chain).
var SimulatedLabelGUID = uuid.MustParse("c1ea0a11-5141-4c57-9e1d-000000000001")

// SimulatedLabel is the content of the simulated label entry.
const SimulatedLabel = "cleanwall simulated SEV-SNP evidence, signed by go-sev-guest's test-only AMD chain: not a TEE"

// maxCertEntries bounds the certificate table; real tables hold a handful.
const maxCertEntries = 64

const certEntrySize = abi.CertTableEntrySize

// ErrMalformed matches every framing or parsing failure of evidence.
var ErrMalformed = errors.New("malformed SEV-SNP evidence")

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, args...))
}

// CertEntry is one entry of a certificate table.
type CertEntry struct {
	GUID uuid.UUID
	Data []byte
}

// SplitEvidence checks the framing of evidence and returns its raw report and
// its certificate entries (in table order). An empty table is allowed.
func SplitEvidence(evidence []byte) (report []byte, entries []CertEntry, err error) {
	if len(evidence) < ReportSize {
		return nil, nil, malformed("%d bytes, shorter than a %d-byte report", len(evidence), ReportSize)
	}
	report = evidence[:ReportSize]
	entries, err = ParseCertTable(evidence[ReportSize:])
	if err != nil {
		return nil, nil, err
	}
	return report, entries, nil
}

// ParseCertTable parses a certificate table: 24-byte headers (GUID, offset,
// length; offsets from the table start) closed by an all-zero header, then
// the blobs. Unlike abi.CertTable.Unmarshal it does the bounds arithmetic in
// 64 bits, so a crafted offset cannot wrap around.
func ParseCertTable(table []byte) ([]CertEntry, error) {
	if len(table) == 0 {
		return nil, nil
	}
	type header struct {
		guid        uuid.UUID
		offset, len uint64
	}
	var headers []header
	end := -1
	for i := 0; ; i++ {
		at := i * certEntrySize
		if at+certEntrySize > len(table) {
			return nil, malformed("certificate table has no terminating entry")
		}
		var h header
		copy(h.guid[:], table[at:at+16])
		h.offset = uint64(binary.LittleEndian.Uint32(table[at+16 : at+20]))
		h.len = uint64(binary.LittleEndian.Uint32(table[at+20 : at+24]))
		if h.guid == (uuid.UUID{}) && h.offset == 0 && h.len == 0 {
			end = at + certEntrySize
			break
		}
		if i == maxCertEntries {
			return nil, malformed("certificate table has more than %d entries", maxCertEntries)
		}
		headers = append(headers, h)
	}
	entries := make([]CertEntry, 0, len(headers))
	seen := make(map[uuid.UUID]bool, len(headers))
	for i, h := range headers {
		if h.offset < uint64(end) || h.offset+h.len > uint64(len(table)) {
			return nil, malformed("certificate table entry %d (%s) points outside the table: offset %d, length %d, table %d bytes",
				i, h.guid, h.offset, h.len, len(table))
		}
		if seen[h.guid] {
			return nil, malformed("certificate table has two entries for %s", h.guid)
		}
		seen[h.guid] = true
		entries = append(entries, CertEntry{GUID: h.guid, Data: table[h.offset : h.offset+h.len]})
	}
	return entries, nil
}

// MarshalCertTable lays out entries as a certificate table.
func MarshalCertTable(entries []CertEntry) []byte {
	if len(entries) == 0 {
		return nil
	}
	headerSize := (len(entries) + 1) * certEntrySize
	size := headerSize
	for _, e := range entries {
		size += len(e.Data)
	}
	out := make([]byte, size)
	offset := headerSize
	for i, e := range entries {
		at := i * certEntrySize
		copy(out[at:at+16], e.GUID[:])
		binary.LittleEndian.PutUint32(out[at+16:at+20], uint32(offset))
		binary.LittleEndian.PutUint32(out[at+20:at+24], uint32(len(e.Data)))
		copy(out[offset:], e.Data)
		offset += len(e.Data)
	}
	return out
}

// JoinEvidence frames a raw report and its certificate table as evidence.
func JoinEvidence(report []byte, entries []CertEntry) []byte {
	return append(append(make([]byte, 0, len(report)), report...), MarshalCertTable(entries)...)
}

// Parsed is evidence taken apart.
type Parsed struct {
	// Raw is the raw report, exactly as signed.
	Raw []byte
	// Attestation is the report and its certificate chain in go-sev-guest's form.
	Attestation *spb.Attestation
	// Labelled is true when the table carries the simulated label.
	Labelled bool
}

// Parse frames and parses evidence. Every failure wraps ErrMalformed.
func Parse(evidence []byte) (*Parsed, error) {
	raw, entries, err := SplitEvidence(evidence)
	if err != nil {
		return nil, err
	}
	if err := abi.ValidateReportFormat(raw); err != nil {
		return nil, malformed("%v", err)
	}
	report, err := abi.ReportToProto(raw)
	if err != nil {
		return nil, malformed("%v", err)
	}
	if _, err := abi.ParseSignerInfo(report.GetSignerInfo()); err != nil {
		return nil, malformed("signer info: %v", err)
	}
	chain := &spb.CertificateChain{Extras: map[string][]byte{}}
	p := &Parsed{Raw: bytes.Clone(raw), Attestation: &spb.Attestation{Report: report, CertificateChain: chain}}
	for _, e := range entries {
		data := bytes.Clone(e.Data)
		switch e.GUID.String() {
		case abi.ArkGUID:
			chain.ArkCert = data
		case abi.AskGUID:
			chain.AskCert = data
		case abi.VcekGUID:
			chain.VcekCert = data
		case abi.VlekGUID:
			chain.VlekCert = data
		default:
			if e.GUID == SimulatedLabelGUID {
				p.Labelled = true
			}
			chain.Extras[e.GUID.String()] = data
		}
	}
	return p, nil
}

// Measurement is the report's launch measurement.
func (p *Parsed) Measurement() []byte { return p.Attestation.GetReport().GetMeasurement() }

// ReportData is the report's REPORT_DATA.
func (p *Parsed) ReportData() []byte { return p.Attestation.GetReport().GetReportData() }

// CheckReportData refuses (report-data-mismatch) a report whose REPORT_DATA
// is not want.
func (p *Parsed) CheckReportData(want [64]byte) error {
	if !bytes.Equal(p.ReportData(), want[:]) {
		return attest.Refuse(attest.CodeReportDataMismatch,
			"report data does not bind this session's nonce, KEM, public key and key id")
	}
	return nil
}
