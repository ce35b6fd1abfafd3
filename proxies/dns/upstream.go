package dnsproxy

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// upstreamPool keeps connected UDP sockets to upstream resolvers, so that a
// forwarded query does not pay for a socket of its own (socket, connect,
// poller registration, close: a fifth of the proxy's CPU on the cache-miss
// path when every query had one). See the package documentation (Upstream
// sockets) for what it keeps of a socket per query.
type upstreamPool struct {
	uses    int           // exchanges per socket
	maxAge  time.Duration // lifetime of a socket
	bufSize int           // read buffer: the EDNS size the proxy advertises

	bufs sync.Pool // *[]byte of bufSize

	mu   sync.Mutex
	idle map[netip.AddrPort][]*upstreamSocket // oldest first
}

// maxIdleUpstreamSockets bounds the idle sockets kept per upstream: a burst
// opens as many sockets as it has queries in flight, and all but these are
// closed as they come back.
const maxIdleUpstreamSockets = 64

// upstreamSocket is one connected socket and what decides its retirement.
type upstreamSocket struct {
	conn *net.UDPConn
	uses int
	born time.Time
}

func newUpstreamPool(l Limits) *upstreamPool {
	p := &upstreamPool{uses: l.UpstreamSocketUses, maxAge: l.UpstreamSocketMaxAge, bufSize: l.MaxUDPSize,
		idle: make(map[netip.AddrPort][]*upstreamSocket)}
	p.bufs.New = func() any { b := make([]byte, p.bufSize); return &b }
	return p
}

// get checks out a socket connected to up: the most recently returned one,
// else a new one (the kernel picks a random ephemeral source port).
func (p *upstreamPool) get(up netip.AddrPort, now time.Time) (*upstreamSocket, error) {
	p.mu.Lock()
	list := p.idle[up]
	// The oldest sockets sit at the front: close those past their age now
	// rather than on a next use that may never come.
	stale := 0
	for stale < len(list) && now.Sub(list[stale].born) >= p.maxAge {
		stale++
	}
	old := list[:stale:stale]
	list = list[stale:]
	var s *upstreamSocket
	if n := len(list); n > 0 {
		s = list[n-1]
		list = list[:n-1]
	}
	if len(list) == 0 {
		delete(p.idle, up)
	} else {
		p.idle[up] = list
	}
	p.mu.Unlock()
	for _, o := range old {
		_ = o.conn.Close()
	}
	if s != nil {
		return s, nil
	}
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(up))
	if err != nil {
		return nil, err
	}
	return &upstreamSocket{conn: c, born: now}, nil
}

// put returns a socket whose last exchange got its answer; a socket that
// reached its use or age limit, or one above the idle limit, is closed.
func (p *upstreamPool) put(up netip.AddrPort, s *upstreamSocket, now time.Time) {
	s.uses++
	if s.uses >= p.uses || now.Sub(s.born) >= p.maxAge {
		_ = s.conn.Close()
		return
	}
	p.mu.Lock()
	list := p.idle[up]
	if len(list) < maxIdleUpstreamSockets {
		p.idle[up] = append(list, s)
		s = nil
	}
	p.mu.Unlock()
	if s != nil {
		_ = s.conn.Close()
	}
}

func (p *upstreamPool) buffer() *[]byte     { return p.bufs.Get().(*[]byte) }
func (p *upstreamPool) putBuffer(b *[]byte) { p.bufs.Put(b) }

// exchange sends query and returns the first datagram that carries id,
// read into buf. Datagrams with another ID are ignored, as a resolver
// does: they cannot be the answer, and giving up on them would let anyone
// who can send one fail the query.
func (s *upstreamSocket) exchange(query []byte, id uint16, deadline time.Time, buf []byte) ([]byte, error) {
	if err := s.conn.SetDeadline(deadline); err != nil {
		return nil, err
	}
	if _, err := s.conn.Write(query); err != nil {
		return nil, err
	}
	for {
		n, err := s.conn.Read(buf)
		if err != nil {
			return nil, err
		}
		if n >= headerLen && binary.BigEndian.Uint16(buf) == id {
			return buf[:n], nil
		}
	}
}

// randomID is a query ID from the system's CSPRNG.
func randomID() uint16 {
	var b [2]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	return binary.BigEndian.Uint16(b[:])
}

// appendQuery appends the query that the proxy sends upstream for an
// allowed question: the ID, RD and nothing else in the header, the
// canonical name, the query type and class IN, and an OPT record that
// advertises udpSize with no flags and no options. It is the message that
// miekg packs for the same dns.Msg (exchangeOnce), written without one.
func appendQuery(b []byte, id uint16, canon string, qtype uint16, udpSize int) []byte {
	b = binary.BigEndian.AppendUint16(b, id)
	b = binary.BigEndian.AppendUint16(b, flagRD)
	b = append(b, 0, 1, 0, 0, 0, 0, 0, 1) // QD 1, AN 0, NS 0, AR 1
	for name := strings.TrimSuffix(canon, "."); name != ""; {
		var label string
		label, name, _ = strings.Cut(name, ".")
		b = append(b, byte(len(label)))
		b = append(b, label...)
	}
	b = append(b, 0)
	b = binary.BigEndian.AppendUint16(b, qtype)
	b = binary.BigEndian.AppendUint16(b, dns.ClassINET)
	// OPT: root owner, TYPE, CLASS = UDP size, TTL 0 (extended rcode,
	// version 0, no DO), RDLENGTH 0.
	b = append(b, 0)
	b = binary.BigEndian.AppendUint16(b, dns.TypeOPT)
	b = binary.BigEndian.AppendUint16(b, uint16(udpSize))
	return append(b, 0, 0, 0, 0, 0, 0)
}

// errMalformedAnswer: the upstream's answer to the query could not be read.
var errMalformedAnswer = errors.New("malformed response")

// readAnswer reads the upstream's UDP response to q, whose ID the caller
// matched, and reduces it to what may be cached (the records that forward
// keeps). The response must answer q exactly: QR set, opcode QUERY, one
// question with q's name (any case), type and class IN; otherwise
// ErrUpstreamMismatch. Its rcode, with the upper bits from an OPT record,
// must be NOERROR or NXDOMAIN (ErrUpstreamRcode). Only the kept records
// are unpacked; the others are walked to find where the next one starts.
// truncated reports TC, with whatever records were readable.
func readAnswer(msg []byte, q *query) (a *upstreamAnswer, truncated bool, err error) {
	flags := binary.BigEndian.Uint16(msg[2:])
	qd := binary.BigEndian.Uint16(msg[4:])
	counts := [3]uint16{binary.BigEndian.Uint16(msg[6:]), binary.BigEndian.Uint16(msg[8:]), binary.BigEndian.Uint16(msg[10:])}
	if flags&flagQR == 0 || (flags&opcodeMask)>>11 != dns.OpcodeQuery || qd != 1 {
		return nil, false, ErrUpstreamMismatch
	}
	off, ok := matchQuestion(msg, q)
	if !ok {
		return nil, false, ErrUpstreamMismatch
	}
	truncated = flags&flagTC != 0
	a = &upstreamAnswer{rcode: int(flags & 0xF)}
	for section, n := range counts {
		for range n {
			if off == len(msg) {
				break // the count overstates the records, as miekg tolerates
			}
			rrtype, class, ttl, rdata, end, ok := walkRR(msg, off)
			if !ok {
				if truncated {
					return a, true, nil // asked again over TCP
				}
				return nil, false, errMalformedAnswer
			}
			keep := false
			switch section {
			case 0:
				keep = keepAnswer(rrtype, class, q.qtype)
			case 1:
				keep = keepAuthority(rrtype, class)
			case 2:
				if rrtype == dns.TypeOPT {
					a.rcode |= int(ttl>>24) << 4
				}
			}
			if keep {
				rr, err := unpackKept(msg, off, rdata, end, rrtype, class, ttl)
				if err != nil {
					if truncated {
						return a, true, nil
					}
					return nil, false, errMalformedAnswer
				}
				if section == 0 {
					a.answer = append(a.answer, rr)
				} else {
					a.ns = append(a.ns, rr)
				}
			}
			off = end
		}
	}
	if a.rcode != dns.RcodeSuccess && a.rcode != dns.RcodeNameError {
		return nil, false, fmt.Errorf("%w: %s", ErrUpstreamRcode, dns.RcodeToString[a.rcode])
	}
	return a, truncated, nil
}

// matchQuestion checks that msg's question is q's (the name compared in
// any case, as RFC 4343 allows an upstream to answer) and returns the
// offset after it. A compression pointer never matches: nothing precedes
// the question that it could name.
func matchQuestion(msg []byte, q *query) (int, bool) {
	off := headerLen
	name := strings.TrimSuffix(q.canon, ".")
	for name != "" {
		var label string
		label, name, _ = strings.Cut(name, ".")
		if off+1+len(label) > len(msg) || int(msg[off]) != len(label) {
			return 0, false
		}
		off++
		for i := range len(label) {
			c := msg[off+i]
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			if c != label[i] {
				return 0, false
			}
		}
		off += len(label)
	}
	if off+5 > len(msg) || msg[off] != 0 ||
		binary.BigEndian.Uint16(msg[off+1:]) != q.qtype || binary.BigEndian.Uint16(msg[off+3:]) != dns.ClassINET {
		return 0, false
	}
	return off + 5, true
}

// walkRR reads the type, class and TTL of the record at off and returns
// the offsets of its data and after it, without unpacking it.
func walkRR(msg []byte, off int) (rrtype, class uint16, ttl uint32, rdata, end int, ok bool) {
	for {
		if off >= len(msg) {
			return 0, 0, 0, 0, 0, false
		}
		l := int(msg[off])
		switch {
		case l == 0:
			off++
		case l&0xC0 == 0xC0: // compression pointer: the name ends here
			off += 2
		case l&0xC0 != 0: // obsolete or unknown label types
			return 0, 0, 0, 0, 0, false
		default:
			off += 1 + l
			continue
		}
		break
	}
	if off+10 > len(msg) {
		return 0, 0, 0, 0, 0, false
	}
	rrtype = binary.BigEndian.Uint16(msg[off:])
	class = binary.BigEndian.Uint16(msg[off+2:])
	ttl = binary.BigEndian.Uint32(msg[off+4:])
	rdata = off + 10
	end = rdata + int(binary.BigEndian.Uint16(msg[off+8:]))
	if end > len(msg) {
		return 0, 0, 0, 0, 0, false
	}
	return rrtype, class, ttl, rdata, end, true
}

// unpackKept unpacks a record that readAnswer keeps. A, AAAA and CNAME
// records whose names are host names, the answers to every question the
// proxy forwards, are decoded here into what miekg's UnpackRR returns for
// them (a host name's presentation form is its labels joined by dots);
// anything else goes through UnpackRR, which must end where the record
// does.
func unpackKept(msg []byte, off, rdata, end int, rrtype, class uint16, ttl uint32) (dns.RR, error) {
	hdr := dns.RR_Header{Rrtype: rrtype, Class: class, Ttl: ttl, Rdlength: uint16(end - rdata)}
	var ok bool
	hdr.Name, _, ok = hostName(msg, off)
	if ok {
		switch {
		case rrtype == dns.TypeA && end-rdata == net.IPv4len:
			return &dns.A{Hdr: hdr, A: net.IP(slices.Clone(msg[rdata:end]))}, nil
		case rrtype == dns.TypeAAAA && end-rdata == net.IPv6len:
			return &dns.AAAA{Hdr: hdr, AAAA: net.IP(slices.Clone(msg[rdata:end]))}, nil
		case rrtype == dns.TypeCNAME:
			if target, next, ok := hostName(msg, rdata); ok && next == end {
				return &dns.CNAME{Hdr: hdr, Target: target}, nil
			}
		}
	}
	rr, next, err := dns.UnpackRR(msg, off)
	if err == nil && next != end {
		err = errMalformedAnswer
	}
	return rr, err
}

// hostName decodes the name at off, following compression pointers, when
// every label is a host label (letters, digits, '-', '_'), and returns the
// offset after it where it started. ok is false for anything else: other
// bytes (which miekg escapes), a pointer that does not point strictly
// backwards (which could loop), a name over 255 bytes on the wire.
func hostName(msg []byte, off int) (name string, end int, ok bool) {
	var buf [255]byte
	b := buf[:0]
	end = -1
	limit := off // a pointer must point before the name or label it continues
	for off < len(msg) {
		l := int(msg[off])
		switch {
		case l == 0:
			if end < 0 {
				end = off + 1
			}
			if len(b) == 0 {
				return ".", end, true
			}
			return string(b), end, true
		case l&0xC0 == 0xC0:
			if off+1 >= len(msg) {
				return "", 0, false
			}
			ptr := (l&0x3F)<<8 | int(msg[off+1])
			if end < 0 {
				end = off + 2
			}
			if ptr >= limit {
				return "", 0, false
			}
			off, limit = ptr, ptr
			continue
		case l&0xC0 != 0:
			return "", 0, false
		}
		// The presentation form is one byte shorter than the wire form.
		if off+1+l > len(msg) || len(b)+l+1 > 254 {
			return "", 0, false
		}
		for _, c := range msg[off+1 : off+1+l] {
			if !hostByte(c) {
				return "", 0, false
			}
		}
		b = append(append(b, msg[off+1:off+1+l]...), '.')
		off += 1 + l
	}
	return "", 0, false
}
