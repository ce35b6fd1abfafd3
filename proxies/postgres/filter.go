package postgres

import (
	"encoding/binary"
	"math"
	"strconv"

	"github.com/jackc/pgx/v5/pgproto3"
)

// Type OIDs a count column may have.
const (
	oidInt8    = 20
	oidInt2    = 21
	oidInt4    = 23
	oidFloat4  = 700
	oidFloat8  = 701
	oidNumeric = 1700
)

// describe records a statement's result columns and finds the count
// column among them: where the listed statement names it, else by name.
func (r *result) describe(cfg *ruleConfig, rd *pgproto3.RowDescription) {
	r.desc, r.countPos = rd, -1
	if cfg.minCount == nil || rd == nil || r.st == nil || r.st.q == nil {
		return
	}
	if p := r.st.q.countPos; p >= 0 && p < len(rd.Fields) {
		r.countPos = p
		return
	}
	for i, f := range rd.Fields {
		if string(f.Name) == cfg.minCount.column {
			r.countPos = i
			return
		}
	}
}

// meetsMinCount reports whether a row may pass rows.minCount: its count
// is at least atLeast. NULL or a value that is not a number is withheld.
func (r *result) meetsMinCount(cfg *ruleConfig, row *pgproto3.DataRow) bool {
	if cfg.minCount == nil || r.countPos < 0 || r.desc == nil {
		return true
	}
	if r.countPos >= len(row.Values) {
		return false
	}
	f := r.desc.Fields[r.countPos]
	v, ok := countValue(row.Values[r.countPos], f.DataTypeOID, f.Format)
	return ok && v >= float64(cfg.minCount.atLeast)
}

// countValue reads a count in text or binary format.
func countValue(b []byte, oid uint32, format int16) (float64, bool) {
	if b == nil {
		return 0, false
	}
	if format == 0 {
		v, err := strconv.ParseFloat(string(b), 64)
		return v, err == nil && !math.IsNaN(v)
	}
	switch {
	case oid == oidInt8 && len(b) == 8:
		return float64(int64(binary.BigEndian.Uint64(b))), true
	case oid == oidInt4 && len(b) == 4:
		return float64(int32(binary.BigEndian.Uint32(b))), true
	case oid == oidInt2 && len(b) == 2:
		return float64(int16(binary.BigEndian.Uint16(b))), true
	case oid == oidFloat8 && len(b) == 8:
		v := math.Float64frombits(binary.BigEndian.Uint64(b))
		return v, !math.IsNaN(v)
	case oid == oidFloat4 && len(b) == 4:
		v := float64(math.Float32frombits(binary.BigEndian.Uint32(b)))
		return v, !math.IsNaN(v)
	case oid == oidNumeric:
		return numericValue(b)
	}
	return 0, false
}

// numericValue reads numeric's binary format: ndigits, weight, sign,
// dscale, then base-10000 digits.
func numericValue(b []byte) (float64, bool) {
	if len(b) < 8 {
		return 0, false
	}
	ndigits := int(binary.BigEndian.Uint16(b))
	weight := int(int16(binary.BigEndian.Uint16(b[2:])))
	sign := binary.BigEndian.Uint16(b[4:])
	if len(b) != 8+2*ndigits || (sign != 0 && sign != 0x4000) {
		return 0, false // NaN, infinities or malformed
	}
	var v float64
	for i := range ndigits {
		d := float64(binary.BigEndian.Uint16(b[8+2*i:]))
		v += d * math.Pow(10000, float64(weight-i))
	}
	if sign == 0x4000 {
		v = -v
	}
	return v, true
}
