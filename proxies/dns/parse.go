package dnsproxy

import (
	"encoding/binary"
	"strings"

	"github.com/miekg/dns"
)

const headerLen = 12

// Header flag bits (RFC 1035 4.1.1).
const (
	flagQR     = 1 << 15
	flagAA     = 1 << 10
	flagTC     = 1 << 9
	flagRD     = 1 << 8
	flagRA     = 1 << 7
	flagCD     = 1 << 4
	opcodeMask = 0xF << 11
)

// query is what the proxy reads from a sandbox's message. The parser is
// strict on purpose: miekg's Msg.Unpack forgives lying section counts and
// trailing bytes, both of which are places to hide data.
type query struct {
	id     uint16
	flags  uint16
	qEnd   int    // offset just past the question; 0 when it was not read
	name   string // question name in presentation form, original case, escaped
	canon  string // lower-case host name with trailing dot; "" if not a host name
	qtype  uint16
	qclass uint16

	edns        bool // a well-formed OPT record was present
	ednsVersion uint8
	udpSize     uint16
}

// verdict is the outcome of parsing when the message must not go further.
type verdict struct {
	drop   bool // send nothing
	rcode  int  // else answer with this rcode
	reason Reason
	opt    bool // include an OPT record in the answer
}

// parseQuery reads a query message. A nil verdict means the message is a
// well-formed query; the policy has not been applied yet.
func parseQuery(msg []byte) (query, *verdict) {
	var q query
	if len(msg) < headerLen {
		return q, &verdict{drop: true, reason: ReasonMalformed}
	}
	q.id = binary.BigEndian.Uint16(msg[0:])
	q.flags = binary.BigEndian.Uint16(msg[2:])
	qd := binary.BigEndian.Uint16(msg[4:])
	an := binary.BigEndian.Uint16(msg[6:])
	ns := binary.BigEndian.Uint16(msg[8:])
	ar := binary.BigEndian.Uint16(msg[10:])

	if q.flags&flagQR != 0 {
		return q, &verdict{drop: true, reason: ReasonMalformed}
	}
	if qd != 1 {
		return q, &verdict{rcode: dns.RcodeFormatError, reason: ReasonMalformed}
	}
	off, ok := q.readQuestion(msg)
	if !ok {
		return q, &verdict{rcode: dns.RcodeFormatError, reason: ReasonMalformed}
	}
	q.qEnd = off
	// Other opcodes give the sections other meanings (UPDATE, NOTIFY), so
	// the opcode is judged before the sections are.
	if (q.flags&opcodeMask)>>11 != dns.OpcodeQuery {
		return q, &verdict{rcode: dns.RcodeNotImplemented, reason: ReasonOpcode}
	}
	if an != 0 || ns != 0 {
		return q, &verdict{rcode: dns.RcodeFormatError, reason: ReasonMalformed}
	}
	var opt *dns.OPT
	for range ar {
		rr, next, err := dns.UnpackRR(msg, off)
		if err != nil {
			return q, &verdict{rcode: dns.RcodeFormatError, reason: ReasonMalformed}
		}
		o, isOPT := rr.(*dns.OPT)
		if !isOPT || opt != nil || o.Hdr.Name != "." {
			return q, &verdict{rcode: dns.RcodeFormatError, reason: ReasonMalformed}
		}
		opt, off = o, next
	}
	if off != len(msg) {
		return q, &verdict{rcode: dns.RcodeFormatError, reason: ReasonMalformed}
	}
	if opt != nil {
		q.edns, q.ednsVersion, q.udpSize = true, opt.Version(), opt.UDPSize()
		if q.ednsVersion != 0 {
			return q, &verdict{rcode: dns.RcodeBadVers, reason: ReasonEDNSVersion, opt: true}
		}
	}
	return q, nil
}

// readQuestion reads the question's name, type and class, and returns the
// offset after them. It refuses compression pointers (nothing precedes the
// question that a pointer could legitimately name), label types other than
// plain labels, and names over 255 bytes on the wire.
func (q *query) readQuestion(msg []byte) (int, bool) {
	off := headerLen
	wire := 1 // the root label
	var name strings.Builder
	host := true
	for {
		if off >= len(msg) {
			return 0, false
		}
		l := int(msg[off])
		off++
		if l&0xC0 != 0 {
			return 0, false
		}
		if l == 0 {
			break
		}
		wire += l + 1
		if wire > 255 || off+l > len(msg) {
			return 0, false
		}
		for _, c := range msg[off : off+l] {
			host = host && hostByte(c)
			escapeByte(&name, c)
		}
		name.WriteByte('.')
		off += l
	}
	if off+4 > len(msg) {
		return 0, false
	}
	q.qtype = binary.BigEndian.Uint16(msg[off:])
	q.qclass = binary.BigEndian.Uint16(msg[off+2:])
	q.name = name.String()
	if q.name == "" {
		q.name = "."
	}
	if host {
		q.canon = strings.ToLower(q.name)
	}
	return off + 4, true
}

func hostByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_'
}

// escapeByte writes c as miekg's presentation form would: printable bytes as
// themselves, '.' and '\' and a few zone-file specials escaped with '\',
// everything else as \DDD.
func escapeByte(b *strings.Builder, c byte) {
	switch {
	case c == '.' || c == '\\' || c == '"' || c == '(' || c == ')' || c == ';' || c == '@' || c == '$':
		b.WriteByte('\\')
		b.WriteByte(c)
	case c < 0x21 || c > 0x7E:
		b.WriteByte('\\')
		b.WriteByte('0' + c/100)
		b.WriteByte('0' + c/10%10)
		b.WriteByte('0' + c%10)
	default:
		b.WriteByte(c)
	}
}

// eventName cuts a presentation name for a deny event.
func eventName(n string) string {
	if len(n) <= maxEventName {
		return n
	}
	return n[:maxEventName-3] + "..."
}

// echoResponse answers msg with rcode without consulting anyone: the header
// and the question are copied from the query byte for byte, and an OPT record
// is appended when withOPT (carrying the upper bits of an extended rcode).
func echoResponse(msg []byte, q *query, rcode int, withOPT bool, udpSize int) []byte {
	n := max(q.qEnd, headerLen)
	out := make([]byte, n, n+11)
	copy(out, msg[:n])
	flags := q.flags&(opcodeMask|flagRD) | flagQR | flagRA | uint16(rcode&0xF)
	binary.BigEndian.PutUint16(out[2:], flags)
	qd := uint16(0)
	if q.qEnd > 0 {
		qd = 1
	}
	binary.BigEndian.PutUint16(out[4:], qd)
	binary.BigEndian.PutUint16(out[6:], 0)
	binary.BigEndian.PutUint16(out[8:], 0)
	binary.BigEndian.PutUint16(out[10:], 0)
	if withOPT {
		binary.BigEndian.PutUint16(out[10:], 1)
		// root owner, TYPE OPT, CLASS = UDP size, TTL = extended rcode,
		// version 0, no flags; RDLENGTH 0.
		out = append(out, 0, 0, byte(dns.TypeOPT), byte(udpSize>>8), byte(udpSize), byte(rcode>>4), 0, 0, 0, 0, 0)
	}
	return out
}
