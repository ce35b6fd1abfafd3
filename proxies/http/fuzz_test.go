package httpproxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

// fuzzLimits keep fuzzed bodies small.
const fuzzMaxBody = 1 << 16

// parseAll reads one request (head and body) the way ServeConn does.
func parseAll(data []byte) (*request, []byte, error) {
	lim := Limits{}.withDefaults()
	rr := requestReader{
		r:   bufio.NewReaderSize(bytes.NewReader(data), max(minClientReader, lim.MaxLineBytes+2)),
		lim: headLimits{maxLine: lim.MaxLineBytes, maxHead: lim.MaxHeaderBytes, maxFields: lim.MaxHeaderCount},
	}
	q := &request{}
	if err := rr.read(q); err != nil {
		return nil, nil, err
	}
	switch {
	case q.chunked:
		body, err := readChunked(rr.r, nil, func(total int64) error {
			if total > fuzzMaxBody {
				return refuse(ReasonBodyTooLarge, "fuzz limit")
			}
			return nil
		})
		return q, body, err
	case q.contentLength > fuzzMaxBody:
		return nil, nil, errors.New("fuzz limit")
	case q.contentLength > 0:
		body := make([]byte, q.contentLength)
		_, err := io.ReadFull(rr.r, body)
		return q, body, err
	}
	return q, nil, nil
}

// serialize writes a parsed request back in canonical form: single spaces,
// "Name: value" fields, and a held chunked body as the proxy forwards it.
func serialize(q *request, body []byte) []byte {
	var b bytes.Buffer
	w := bufio.NewWriter(&b)
	_, _ = w.WriteString(q.method + " " + q.target + " HTTP/1." + string(rune('0'+q.minor)) + "\r\n")
	for _, f := range q.fields {
		_, _ = w.WriteString(f.name + ": " + f.value + "\r\n")
	}
	_, _ = w.WriteString("\r\n")
	if q.chunked {
		writeChunked(w, body)
	} else {
		_, _ = w.Write(body)
	}
	_ = w.Flush()
	return b.Bytes()
}

// verdict is the decision ServeConn's checks reach for q on a fixed flow.
func verdict(q *request) Reason {
	hosts, _ := newHostMatcher(Flow{Dst: netip.MustParseAddrPort("127.0.0.1:8080"), Hosts: []string{testHost, "127.0.0.1"}})
	c := &conn{rules: policyRules(), lim: Limits{}.withDefaults(), hosts: hosts}
	if rf := c.check(q); rf != nil {
		return rf.reason
	}
	return ""
}

// comparable drops what legitimately differs after re-serialisation: the
// verbatim text.
func comparable(q *request) request {
	c := *q
	c.text = ""
	return c
}

// FuzzReadRequest: the parser never panics, and a request it accepts
// re-serialises to one it accepts identically (same fields, framing,
// target, body and verdict). The seeds in testdata/fuzz/FuzzReadRequest are
// the smuggling corpus and allowed requests.
func FuzzReadRequest(f *testing.F) {
	host := strings.NewReplacer("{host}", testHost+":8080", "{port}", "8080")
	for _, tc := range smugglingCorpus {
		f.Add([]byte(host.Replace(tc.raw)))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		q1, body1, err := parseAll(data)
		if err != nil {
			return
		}
		ser := serialize(q1, body1)
		q2, body2, err := parseAll(ser)
		if err != nil {
			t.Fatalf("accepted %q\nbut not its re-serialisation %q: %v", data, ser, err)
		}
		if a, b := comparable(q1), comparable(q2); !reflect.DeepEqual(a, b) {
			t.Fatalf("re-serialisation parses differently:\n%+v\n%+v", a, b)
		}
		if !bytes.Equal(body1, body2) {
			t.Fatalf("body %q became %q", body1, body2)
		}
		if v1, v2 := verdict(q1), verdict(q2); v1 != v2 {
			t.Fatalf("verdict %q became %q for %q", v1, v2, ser)
		}
	})
}
