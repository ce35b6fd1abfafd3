package snp

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/uuid"
)

func header(guid uuid.UUID, offset, length uint32) []byte {
	h := make([]byte, certEntrySize)
	copy(h, guid[:])
	binary.LittleEndian.PutUint32(h[16:], offset)
	binary.LittleEndian.PutUint32(h[20:], length)
	return h
}

var (
	vcekGUID = uuid.MustParse(abi.VcekGUID)
	askGUID  = uuid.MustParse(abi.AskGUID)
)

func TestCertTableRoundTrip(t *testing.T) {
	entries := []CertEntry{{GUID: vcekGUID, Data: []byte("vcek")}, {GUID: askGUID, Data: []byte("a longer ask blob")}}
	report := bytes.Repeat([]byte{0xee}, ReportSize)
	ev := JoinEvidence(report, entries)
	gotReport, got, err := SplitEvidence(ev)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(gotReport, report) || len(got) != 2 || got[0].GUID != vcekGUID || string(got[1].Data) != "a longer ask blob" {
		t.Fatalf("round trip: %v", got)
	}
	// Our layout is the one go-sev-guest reads.
	var table abi.CertTable
	if err := table.Unmarshal(ev[ReportSize:]); err != nil {
		t.Fatal(err)
	}
	if b, _ := table.GetByGUIDString(abi.AskGUID); string(b) != "a longer ask blob" {
		t.Fatalf("go-sev-guest reads ASK %q", b)
	}
	// A report alone (empty table) frames fine.
	if _, e, err := SplitEvidence(report); err != nil || e != nil {
		t.Fatalf("report without table: %v %v", e, err)
	}
}

func TestCertTableRefusesBadFraming(t *testing.T) {
	zero := make([]byte, certEntrySize)
	for _, tc := range []struct {
		name, want string
		table      []byte
	}{
		{"no terminator", "no terminating entry", header(vcekGUID, 48, 0)},
		// 0xfffffff0 + 0x20 wraps to 0x10 in 32 bits; abi.CertTable.Unmarshal would slice out of range.
		{"wrapping offset", "outside the table", append(append(header(vcekGUID, 0xfffffff0, 0x20), zero...), make([]byte, 16)...)},
		{"offset into header", "outside the table", append(append(header(vcekGUID, 4, 4), zero...), "abcd"...)},
		{"past the end", "outside the table", append(append(header(vcekGUID, 48, 5), zero...), "abcd"...)},
		{"duplicate", "two entries", append(append(append(header(vcekGUID, 72, 1), header(vcekGUID, 72, 1)...), zero...), 'x')},
		{"too many", "more than 64", bytes.Repeat(header(vcekGUID, 0, 0), 70)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ev := append(bytes.Repeat([]byte{1}, ReportSize), tc.table...)
			_, _, err := SplitEvidence(ev)
			if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want ErrMalformed mentioning %q", err, tc.want)
			}
		})
	}
	if _, _, err := SplitEvidence(make([]byte, ReportSize-1)); !errors.Is(err, ErrMalformed) {
		t.Fatalf("short evidence: %v", err)
	}
}

func TestParseFirmware(t *testing.T) {
	if f, err := ParseFirmware("1.55"); err != nil || f != (Firmware{1, 55}) {
		t.Fatalf("1.55 = %v %v", f, err)
	}
	for _, s := range []string{"", "1", "1.", ".5", "1.55.2", "1.256", "-1.2", "+1.2", "a.b", "1. 5"} {
		if _, err := ParseFirmware(s); err == nil {
			t.Errorf("ParseFirmware(%q) accepted", s)
		}
	}
}

func FuzzSplitEvidence(f *testing.F) {
	f.Add(JoinEvidence(make([]byte, ReportSize), []CertEntry{{GUID: vcekGUID, Data: []byte("x")}}))
	f.Fuzz(func(t *testing.T, table []byte) {
		entries, err := ParseCertTable(table)
		if err != nil {
			return
		}
		again, err := ParseCertTable(MarshalCertTable(entries))
		if err != nil || len(again) != len(entries) {
			t.Fatalf("re-marshalled table: %v, %d entries want %d", err, len(again), len(entries))
		}
	})
}
