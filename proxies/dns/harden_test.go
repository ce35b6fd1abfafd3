package dnsproxy

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// Raw message builders: the hardening cases are messages that a well-behaved
// library refuses to produce.

func header(id, flags, qd, an, ns, ar uint16) []byte {
	return binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(
		binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(
			nil, id), flags), qd), an), ns), ar)
}

func wireName(labels ...string) []byte {
	var b []byte
	for _, l := range labels {
		b = append(b, byte(len(l)))
		b = append(b, l...)
	}
	return append(b, 0)
}

func qtail(qtype, qclass uint16) []byte {
	return binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(nil, qtype), qclass)
}

var apiName = wireName("api", "example", "test")

// optRR is an OPT record; owner is its wire name.
func optRR(owner []byte, size uint16, version uint8, rdata []byte) []byte {
	b := append([]byte(nil), owner...)
	b = binary.BigEndian.AppendUint16(b, dns.TypeOPT)
	b = binary.BigEndian.AppendUint16(b, size)
	b = append(b, 0, version, 0, 0)
	b = binary.BigEndian.AppendUint16(b, uint16(len(rdata)))
	return append(b, rdata...)
}

func aRR(owner []byte) []byte {
	b := append([]byte(nil), owner...)
	b = append(b, qtail(dns.TypeA, dns.ClassINET)...)
	b = append(b, 0, 0, 1, 0, 0, 4, 192, 0, 2, 1)
	return b
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

const rdFlag = flagRD

// hardeningCases are answered by a proxy whose DenyRcode is NXDOMAIN, which
// shows which answers are policy denials and which are not.
type hardeningCase struct {
	name   string
	msg    []byte
	rcode  int // -1: dropped
	reason Reason
	echoQ  bool // the response carries the question byte for byte
}

func hardeningCases() []hardeningCase {
	q := cat(apiName, qtail(dns.TypeA, dns.ClassINET))
	long63 := strings.Repeat("a", 63)
	return []hardeningCase{
		{"short message", []byte{0x12, 0x34, 0x01}, -1, ReasonMalformed, false},
		{"empty message", nil, -1, ReasonMalformed, false},
		{"response sent as query", cat(header(7, flagQR|rdFlag, 1, 0, 0, 0), q), -1, ReasonMalformed, false},
		{"qdcount 0", header(7, rdFlag, 0, 0, 0, 0), dns.RcodeFormatError, ReasonMalformed, false},
		{"qdcount 2", cat(header(7, rdFlag, 2, 0, 0, 0), q, q), dns.RcodeFormatError, ReasonMalformed, false},
		{"qdcount lies", cat(header(7, rdFlag, 3, 0, 0, 0), q), dns.RcodeFormatError, ReasonMalformed, false},
		{"opcode iquery", cat(header(7, 1<<11, 1, 0, 0, 0), q), dns.RcodeNotImplemented, ReasonOpcode, true},
		{"opcode status", cat(header(7, 2<<11, 1, 0, 0, 0), q), dns.RcodeNotImplemented, ReasonOpcode, true},
		{"opcode notify", cat(header(7, 4<<11, 1, 0, 0, 0), q), dns.RcodeNotImplemented, ReasonOpcode, true},
		{"opcode update", cat(header(7, 5<<11, 1, 1, 0, 0), q, aRR(apiName)), dns.RcodeNotImplemented, ReasonOpcode, true},
		{"answer section in query", cat(header(7, rdFlag, 1, 1, 0, 0), q, aRR(apiName)), dns.RcodeFormatError, ReasonMalformed, true},
		{"authority section in query", cat(header(7, rdFlag, 1, 0, 1, 0), q, aRR(apiName)), dns.RcodeFormatError, ReasonMalformed, true},
		{"label over 63 bytes", cat(header(7, rdFlag, 1, 0, 0, 0), []byte{64}, bytes.Repeat([]byte("a"), 64), wireName("store", "example", "test"), qtail(dns.TypeA, 1)), dns.RcodeFormatError, ReasonMalformed, false},
		{"name over 253", cat(header(7, rdFlag, 1, 0, 0, 0), wireName(long63, long63, long63, long63[:50], "store", "example", "test"), qtail(dns.TypeA, 1)), dns.RcodeFormatError, ReasonMalformed, false},
		{"compression pointer in question", cat(header(7, rdFlag, 1, 0, 0, 0), []byte{3, 'a', 'p', 'i', 0xC0, 12}, qtail(dns.TypeA, 1)), dns.RcodeFormatError, ReasonMalformed, false},
		{"pointer loop", cat(header(7, rdFlag, 1, 0, 0, 0), []byte{0xC0, 12}, qtail(dns.TypeA, 1)), dns.RcodeFormatError, ReasonMalformed, false},
		{"truncated question", cat(header(7, rdFlag, 1, 0, 0, 0), apiName, []byte{0, 1}), dns.RcodeFormatError, ReasonMalformed, false},
		{"unterminated name", cat(header(7, rdFlag, 1, 0, 0, 0), []byte{3, 'a', 'p', 'i'}), dns.RcodeFormatError, ReasonMalformed, false},
		{"trailing garbage", cat(header(7, rdFlag, 1, 0, 0, 0), q, []byte("hidden data")), dns.RcodeFormatError, ReasonMalformed, true},
		{"trailing garbage after OPT", cat(header(7, rdFlag, 1, 0, 0, 1), q, optRR([]byte{0}, 1232, 0, nil), []byte{0}), dns.RcodeFormatError, ReasonMalformed, true},
		{"arcount lies", cat(header(7, rdFlag, 1, 0, 0, 2), q, optRR([]byte{0}, 1232, 0, nil)), dns.RcodeFormatError, ReasonMalformed, true},
		{"two OPT records", cat(header(7, rdFlag, 1, 0, 0, 2), q, optRR([]byte{0}, 1232, 0, nil), optRR([]byte{0}, 1232, 0, nil)), dns.RcodeFormatError, ReasonMalformed, true},
		{"OPT not owned by the root", cat(header(7, rdFlag, 1, 0, 0, 1), q, optRR(apiName, 1232, 0, nil)), dns.RcodeFormatError, ReasonMalformed, true},
		{"OPT option overruns", cat(header(7, rdFlag, 1, 0, 0, 1), q, optRR([]byte{0}, 1232, 0, []byte{0, 8, 0, 200, 1})), dns.RcodeFormatError, ReasonMalformed, true},
		{"A record in additional", cat(header(7, rdFlag, 1, 0, 0, 1), q, aRR(apiName)), dns.RcodeFormatError, ReasonMalformed, true},
		{"EDNS version 1", cat(header(7, rdFlag, 1, 0, 0, 1), q, optRR([]byte{0}, 1232, 1, nil)), dns.RcodeBadVers, ReasonEDNSVersion, true},
		{"class CH", cat(header(7, rdFlag, 1, 0, 0, 0), apiName, qtail(dns.TypeA, dns.ClassCHAOS)), dns.RcodeRefused, ReasonClass, true},
		{"class ANY", cat(header(7, rdFlag, 1, 0, 0, 0), apiName, qtail(dns.TypeA, dns.ClassANY)), dns.RcodeRefused, ReasonClass, true},
		{"qtype ANY", cat(header(7, rdFlag, 1, 0, 0, 0), apiName, qtail(dns.TypeANY, 1)), dns.RcodeRefused, ReasonQueryType, true},
		{"qtype AXFR", cat(header(7, 0, 1, 0, 0, 0), apiName, qtail(dns.TypeAXFR, 1)), dns.RcodeRefused, ReasonQueryType, true},
		{"qtype IXFR", cat(header(7, 0, 1, 0, 0, 0), apiName, qtail(dns.TypeIXFR, 1)), dns.RcodeRefused, ReasonQueryType, true},
		{"qtype TXT not allowed", cat(header(7, rdFlag, 1, 0, 0, 0), apiName, qtail(dns.TypeTXT, 1)), dns.RcodeRefused, ReasonQueryType, true},
		{"binary label under a wildcard", cat(header(7, rdFlag, 1, 0, 0, 0), wireName("\x00\x01\xff", "store", "example", "test"), qtail(dns.TypeA, 1)), dns.RcodeNameError, ReasonInvalidName, true},
		{"dot inside a label", cat(header(7, rdFlag, 1, 0, 0, 0), wireName("x.api", "store", "example", "test"), qtail(dns.TypeA, 1)), dns.RcodeNameError, ReasonInvalidName, true},
		{"root name", cat(header(7, rdFlag, 1, 0, 0, 0), []byte{0}, qtail(dns.TypeA, 1)), dns.RcodeNameError, ReasonNotAllowed, true},
	}
}

// rawTCP sends b framed on a new connection and returns the framed reply, or
// nil when none came within wait.
func rawTCP(t *testing.T, addr string, b []byte, wait time.Duration) []byte {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(cat(binary.BigEndian.AppendUint16(nil, uint16(len(b))), b)); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(wait))
	var n [2]byte
	if _, err := io.ReadFull(c, n[:]); err != nil {
		return nil
	}
	resp := make([]byte, binary.BigEndian.Uint16(n[:]))
	if _, err := io.ReadFull(c, resp); err != nil {
		t.Fatalf("short tcp response: %v", err)
	}
	return resp
}

func TestHardening(t *testing.T) {
	f := newFixture(t, func(p *Proxy) { p.DenyRcode = dns.RcodeNameError })
	for _, tc := range hardeningCases() {
		for _, tcp := range []bool{false, true} {
			t.Run(tc.name+map[bool]string{false: "/udp", true: "/tcp"}[tcp], func(t *testing.T) {
				wait := 3 * time.Second
				if tc.rcode < 0 {
					wait = 300 * time.Millisecond
				}
				events := len(f.rec.denied())
				var resp []byte
				if tcp {
					resp = rawTCP(t, f.fe.TCP, tc.msg, wait)
				} else {
					resp = rawUDP(t, f.fe.UDP, tc.msg, wait)
				}
				ev := f.rec.denied()
				if len(ev) != events+1 || ev[events].Reason != tc.reason || ev[events].Rcode != tc.rcode || ev[events].TCP != tcp {
					t.Fatalf("deny events %+v, want one more with reason %s", ev[events:], tc.reason)
				}
				if tc.rcode < 0 {
					if resp != nil {
						t.Fatalf("got a response to a message that must be dropped: %x", resp)
					}
					return
				}
				m := new(dns.Msg)
				if err := m.Unpack(resp); err != nil {
					t.Fatalf("response does not parse: %v (%x)", err, resp)
				}
				if m.Rcode != tc.rcode {
					t.Fatalf("rcode %s, want %s", dns.RcodeToString[m.Rcode], dns.RcodeToString[tc.rcode])
				}
				if !m.Response || m.Id != 7 || len(m.Answer)+len(m.Ns) != 0 {
					t.Fatalf("bad response header or sections: %v", m)
				}
				if tc.echoQ {
					qEnd := headerLen + bytes.IndexByte(tc.msg[headerLen:], 0) + 5
					if !bytes.Equal(resp[headerLen:qEnd], tc.msg[headerLen:qEnd]) || m.Question == nil {
						t.Fatalf("question not echoed: %x", resp)
					}
				}
				if tc.rcode == dns.RcodeBadVers && (m.IsEdns0() == nil || m.IsEdns0().Version() != 0) {
					t.Fatalf("BADVERS without an OPT record of version 0: %v", m)
				}
			})
		}
	}
	if n := f.up.received.Load(); n != 0 {
		t.Fatalf("upstream received %d messages: %+v", n, f.up.queries())
	}
}

func TestLongestNameIsForwarded(t *testing.T) {
	f := newFixture(t, nil)
	l := strings.Repeat("a", 63)
	name := l + "." + l + "." + l + "." + l[:42] + ".store.example.test."
	if len(name) != 254 {
		t.Fatalf("test name has %d characters", len(name))
	}
	if r := exchange(t, f.fe.UDP, question(name, dns.TypeA), false); r.Rcode != dns.RcodeNameError {
		t.Fatalf("253-character allowed name: %v", r)
	}
	if q := f.up.queries(); len(q) != 1 || q[0].Name != name {
		t.Fatalf("upstream saw %+v", q)
	}
}

func TestDenyEventNameIsSanitised(t *testing.T) {
	f := newFixture(t, nil)
	label := "\x1b[31m\x00\n" + strings.Repeat("x", 50)
	msg := cat(header(9, rdFlag, 1, 0, 0, 0), wireName(label, label, label, "attacker", "test"), qtail(dns.TypeA, 1))
	if r := rawUDP(t, f.fe.UDP, msg, 3*time.Second); r == nil {
		t.Fatal("no response")
	}
	ev := f.rec.denied()
	if len(ev) != 1 {
		t.Fatalf("events: %+v", ev)
	}
	n := ev[0].Name
	if len(n) != maxEventName || !strings.HasSuffix(n, "...") || !strings.HasPrefix(n, `\027[31m\000\010xx`) {
		t.Fatalf("event name %q (%d bytes)", n, len(n))
	}
	for _, c := range []byte(n) {
		if c < 0x21 || c > 0x7e {
			t.Fatalf("event name holds byte %#x: %q", c, n)
		}
	}
}
