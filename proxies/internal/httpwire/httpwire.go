// Package httpwire is what the privacy proxies that write HTTP/1.1 heads
// themselves (secure and trusted mode's HTTP proxies, which re-frame
// bodies they seal) share about the wire: which fields never cross a
// proxy, the field grammar a head they write keeps to, and connections
// whose idle time and head size they bound. Open mode forwards heads
// verbatim and has its own strict parser (proxies/http). It holds no
// policy and never imports runtime, bpf or attest.
package httpwire

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"time"
)

// HopByHop are the fields of one connection (RFC 9110, 7.6.1): a proxy
// never forwards them. Digests are the digest fields of a body, which no
// longer describe a body the proxy transformed.
var (
	HopByHop = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}
	Digests  = []string{"Content-Md5", "Digest", "Content-Digest", "Repr-Digest", "Want-Digest", "Want-Content-Digest", "Want-Repr-Digest"}
)

// FieldSet is the set of the canonical names in lists.
func FieldSet(lists ...[]string) map[string]bool {
	m := map[string]bool{}
	for _, l := range lists {
		for _, k := range l {
			m[http.CanonicalHeaderKey(k)] = true
		}
	}
	return m
}

// DropFields removes from h the fields in drop and those its Connection
// field names.
func DropFields(h http.Header, drop map[string]bool) {
	for _, v := range h.Values("Connection") {
		for _, name := range strings.Split(v, ",") {
			h.Del(strings.TrimSpace(name))
		}
	}
	for k := range h {
		if drop[k] {
			delete(h, k)
		}
	}
}

// WriteFields writes h's fields, sorted, without those in drop or named
// by its Connection field.
func WriteFields(w *bufio.Writer, h http.Header, drop map[string]bool) {
	if drop != nil {
		h = h.Clone()
		DropFields(h, drop)
	}
	keys := make([]string, 0, len(h))
	for k := range h {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		for _, v := range h[k] {
			w.WriteString(k + ": " + v + "\r\n")
		}
	}
}

// ValidFieldName and ValidFieldValue keep what a proxy writes in the
// grammar (net/http's reader is more tolerant in places).
func ValidFieldName(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte("\"(),/:;<=>?@[\\]{}", c) >= 0 {
			return false
		}
	}
	return true
}

func ValidFieldValue(v string) bool {
	for i := 0; i < len(v); i++ {
		if c := v[i]; (c < ' ' && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// TimedConn counts a connection's bytes and, when ReadIdle or WriteIdle
// is set, moves the deadline before each read or write (a body must keep
// moving).
type TimedConn struct {
	net.Conn
	ReadIdle, WriteIdle     time.Duration
	BytesRead, BytesWritten atomic.Int64
	// Stop fails reads at once (a proxy ending a body sender that may be
	// between two reads with it).
	Stop atomic.Bool
}

func (c *TimedConn) Read(p []byte) (int, error) {
	if c.Stop.Load() {
		return 0, os.ErrDeadlineExceeded
	}
	if c.ReadIdle > 0 {
		_ = c.Conn.SetReadDeadline(time.Now().Add(c.ReadIdle))
	}
	n, err := c.Conn.Read(p)
	c.BytesRead.Add(int64(n))
	return n, err
}

func (c *TimedConn) Write(p []byte) (int, error) {
	if c.WriteIdle > 0 {
		_ = c.Conn.SetWriteDeadline(time.Now().Add(c.WriteIdle))
	}
	n, err := c.Conn.Write(p)
	c.BytesWritten.Add(int64(n))
	return n, err
}

// LimitedReader passes reads through while its budget lasts (no budget
// until Limit); a head that does not end within it is refused as too
// large (Hit).
type LimitedReader struct {
	r    io.Reader
	left int64
	Hit  bool
}

// ErrHeadTooLarge is what a LimitedReader returns once its budget is spent.
var ErrHeadTooLarge = errors.New("head above the limit")

// NewLimitedReader returns a LimitedReader of r without a budget.
func NewLimitedReader(r io.Reader) *LimitedReader { return &LimitedReader{r: r, left: -1} }

// Limit sets the budget to n bytes (n < 0: none) and clears Hit.
func (l *LimitedReader) Limit(n int) {
	l.left, l.Hit = int64(n), false
}

func (l *LimitedReader) Read(p []byte) (int, error) {
	if l.left == 0 {
		l.Hit = true
		return 0, ErrHeadTooLarge
	}
	if l.left > 0 && int64(len(p)) > l.left {
		p = p[:l.left]
	}
	n, err := l.r.Read(p)
	if l.left > 0 {
		l.left -= int64(n)
	}
	return n, err
}

// BodyGrace is how long a response head waits for the request body's
// sender: a remote that read the whole body answers while the sender is
// still returning from its last write, and a connection is kept open only
// once the body is known to have gone out whole.
const BodyGrace = time.Second

// AwaitDone waits up to d for done to close and reports whether it did. A
// remote that answered before it read the body (a refusal, say) does not
// hold the response longer than d.
func AwaitDone(done <-chan struct{}, d time.Duration) bool {
	select {
	case <-done:
		return true
	default:
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}
