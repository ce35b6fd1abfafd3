package httpproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/cleanwall/cleanwall/internal/rawsys"
)

// forward sends an allowed request to the upstream and relays the response.
// A held body is sent from memory, and so is a Content-Length body that
// arrived whole with the head; a Content-Length body still on its way is
// streamed by a goroutine while the response is awaited, so an upstream
// that answers early is relayed at once.
func (c *conn) forward(q *request, hold bool, start time.Time) (bool, error) {
	reused := c.up != nil
	if !reused {
		if err := c.dial(); err != nil {
			c.refuse(q, refuse(ReasonUpstreamUnreachable, "%v", err), start, false)
			return false, fmt.Errorf("connecting to the upstream: %w", err)
		}
	}
	sent := int64(len(q.text))
	_, _ = c.uw.WriteString(q.text) // errors stick in uw and surface at Flush
	if hold {
		if q.chunked {
			sent += writeChunked(c.uw, c.held)
		} else {
			_, _ = c.uw.Write(c.held)
			sent += int64(len(c.held))
		}
	}
	stream := !hold && q.contentLength > 0
	if stream && int64(c.cr.Buffered()) >= q.contentLength {
		// The whole body came with the head: it goes with it, in the same
		// write, and the exchange is sequential (no goroutine to stream it).
		body, _ := c.cr.Peek(int(q.contentLength))
		_, _ = c.uw.Write(body)
		_, _ = c.cr.Discard(len(body))
		sent += int64(len(body))
		stream = false
	}
	var bodyDone chan bodyResult
	if stream {
		// The response head timeout starts once the body is sent.
		c.up.setReadTimeout(0)
		bodyDone = make(chan bodyResult, 1)
		c.bodySent.Store(false)
		go func() { bodyDone <- c.streamBody(q.contentLength) }()
	} else if c.up.rw.Raw() && c.ur.Buffered() == 0 {
		// relay's first read sends the request (readAfterFlush).
		c.up.setReadTimeout(c.lim.ResponseHeaderTimeout)
		c.up.flushFirst = c.uw
	} else {
		if err := c.uw.Flush(); err != nil {
			return c.upstreamFailed(q, start, err)
		}
		c.up.setReadTimeout(c.lim.ResponseHeaderTimeout)
	}

	status, keep, err := c.relay(q)
	var body bodyResult
	if stream {
		if !c.bodySent.Load() {
			// The upstream answered (or failed) before reading the whole
			// body: what the sandbox sends next cannot be told apart from
			// the rest of it, so the connection ends.
			c.client.abortRead()
			c.up.abort()
			keep = false
		}
		body = <-bodyDone
		sent += body.n
		keep = keep && body.err == nil
	}
	c.fm.sent(sent)
	switch {
	case err == nil:
		c.fm.request(decisionAllow, reasonNone, time.Since(start))
		if c.log.Enabled(c.ctx, slog.LevelDebug) {
			c.log.Debug("request forwarded", logMethod, SafeMethod(q.method), logStatus, status)
		}
		return keep, nil
	case body.err != nil && !c.wrote:
		// The exchange failed because the body did.
		switch {
		case body.clientSide && errors.Is(body.err, os.ErrDeadlineExceeded):
			c.refuse(q, refuse(ReasonTimeout, "request body stalled for %v", c.lim.BodyIdleTimeout), start, false)
		case body.clientSide:
			c.fm.request(decisionError, string(ReasonClientGone), time.Since(start))
		default:
			return c.upstreamFailed(q, start, body.err)
		}
		return false, fmt.Errorf("streaming a request body: %w", body.err)
	case errors.Is(err, errStaleUpstream) && reused:
		// The upstream closed the idle connection as this request reached
		// it, without answering. Closing the sandbox's connection the same
		// way lets its HTTP client retry, as it would without the proxy.
		c.fm.request(decisionError, string(ReasonUpstreamUnreachable), time.Since(start))
		c.log.Debug("upstream closed an idle connection; closing the sandbox's", logMethod, SafeMethod(q.method))
		return false, nil
	case isClientError(err):
		c.fm.request(decisionError, string(ReasonClientGone), time.Since(start))
		return false, fmt.Errorf("relaying a response: %w", err)
	case c.wrote:
		c.fm.request(decisionError, string(ReasonBadUpstreamResponse), time.Since(start))
		return false, fmt.Errorf("relaying a response: %w", err)
	}
	return c.upstreamFailed(q, start, err)
}

// clientError is a failed write to the sandbox.
type clientError struct{ err error }

// isClientError reports whether err is a failed write to the sandbox.
// (A function of its own: the target of errors.As escapes, and would be
// allocated for every request in the caller.)
func isClientError(err error) bool {
	var ce *clientError
	return errors.As(err, &ce)
}

func (e *clientError) Error() string { return "writing to the sandbox: " + e.err.Error() }
func (e *clientError) Unwrap() error { return e.err }

// upstreamFailed answers a request whose response never started.
func (c *conn) upstreamFailed(q *request, start time.Time, err error) (bool, error) {
	var rf *refusal
	switch {
	case errors.As(err, &rf):
		rf.reason = ReasonBadUpstreamResponse
	case errors.Is(err, os.ErrDeadlineExceeded):
		rf = refuse(ReasonUpstreamTimeout, "%v", err)
	default:
		rf = refuse(ReasonUpstreamUnreachable, "%v", err)
	}
	c.refuse(q, rf, start, false)
	return false, fmt.Errorf("upstream: %w", err)
}

type bodyResult struct {
	n          int64
	err        error
	clientSide bool // the sandbox, not the upstream, failed
}

// streamBody copies n body bytes from the sandbox to the upstream and sets
// c.bodySent once all are read from the sandbox (before the last of them
// leave: see below). On failure it aborts the upstream
// connection, so that relay returns.
func (c *conn) streamBody(n int64) (res bodyResult) {
	c.client.setReadIdle(c.lim.BodyIdleTimeout)
	defer c.client.setReadIdle(0)
	if c.bodyBuf == nil {
		c.bodyBuf = getBuffer()
	}
	buf := *c.bodyBuf
	for n > 0 {
		if c.cr.Buffered() == 0 {
			// About to wait for the sandbox: send what is buffered (at
			// first the head, which an Expect: 100-continue client waits
			// on).
			if err := c.uw.Flush(); err != nil {
				c.up.abort()
				return bodyResult{n: res.n, err: err}
			}
		}
		m, err := c.cr.Read(buf[:min(int64(len(buf)), n)])
		if m > 0 {
			n -= int64(m)
			if n == 0 {
				// The whole body is read from the sandbox: from here on the
				// upstream may have it (a full buffer is written through,
				// the flush below sends the rest) and answer at once, so
				// the flag must be up before any of its last bytes leave,
				// or relay would see the answer first and end a connection
				// that is fine.
				c.bodySent.Store(true)
			}
			if _, werr := c.uw.Write(buf[:m]); werr != nil {
				c.up.abort()
				return bodyResult{n: res.n, err: werr}
			}
			res.n += int64(m)
		}
		if err != nil {
			c.up.abort()
			return bodyResult{n: res.n, err: unexpected(err), clientSide: true}
		}
	}
	if err := c.uw.Flush(); err != nil {
		c.up.abort()
		return bodyResult{n: res.n, err: err}
	}
	c.bodySent.Store(true)
	c.up.setReadTimeout(c.lim.ResponseHeaderTimeout)
	return res
}

// maxInformational bounds the 1xx responses before a final one.
const maxInformational = 8

// errStaleUpstream: a reused upstream connection ended before any byte of
// a response.
var errStaleUpstream = errors.New("upstream closed the connection without a response")

// relay copies the upstream's response to the client verbatim: the head's
// bytes as received, the body in its own framing. It returns the final
// status and whether both sides keep the connection.
func (c *conn) relay(q *request) (status int, keep bool, err error) {
	c.wrote = false
	lim := c.responseLimits()
	for informational := 0; ; informational++ {
		if informational > maxInformational {
			return 0, false, refuse(ReasonBadUpstreamResponse, "more than %d informational responses", maxInformational)
		}
		if _, err := c.ur.Peek(1); err != nil {
			var fe *flushError
			if informational == 0 && !errors.As(err, &fe) && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
				return 0, false, errStaleUpstream
			}
			return 0, false, err
		}
		var resp response
		c.respHead, c.spans, resp, err = readResponse(c.ur, c.respHead, c.spans, lim)
		if err != nil {
			return 0, false, err
		}
		if resp.status < 200 {
			if resp.status == 101 {
				if q.upgrade == "" || !c.rules.allowsUpgrade(string(resp.upgrade)) {
					return 0, false, refuse(ReasonBadUpstreamResponse, "101 to a protocol not requested or not allowed")
				}
				if err := c.writeClient(c.respHead, true); err != nil {
					return 0, false, err
				}
				return 101, false, c.tunnel()
			}
			if resp.status == 100 && c.sent100 {
				continue // the sandbox already got ours
			}
			if err := c.writeClient(c.respHead, true); err != nil {
				return 0, false, err
			}
			c.up.setReadTimeout(c.lim.ResponseHeaderTimeout)
			continue
		}
		if err := c.writeClient(c.respHead, false); err != nil {
			return 0, false, err
		}
		c.up.setReadIdle(c.lim.BodyIdleTimeout)
		switch {
		case q.method == "HEAD" || resp.status == 204 || resp.status == 304:
		case resp.chunked:
			err = c.relayChunked()
		case resp.contentLength >= 0:
			err = c.relayBody(resp.contentLength)
		default:
			resp.close = true
			err = c.relayBody(-1)
		}
		c.up.setReadIdle(0)
		if err == nil {
			err = c.flushClient()
		}
		return resp.status, err == nil && !resp.close && !q.close, err
	}
}

// responseLimits bound a response head or trailer: a line fits the
// upstream reader; the field count is bounded by the byte limit only.
func (c *conn) responseLimits() headLimits {
	return headLimits{maxLine: upstreamReaderSize - 2, maxHead: c.lim.MaxResponseHeaderBytes, maxFields: c.lim.MaxResponseHeaderBytes}
}

// writeClient writes response bytes to the sandbox, flushing when asked.
func (c *conn) writeClient(b []byte, flush bool) error {
	c.wrote = true
	if _, err := c.cw.Write(b); err != nil {
		return &clientError{err}
	}
	if flush {
		return c.flushClient()
	}
	return nil
}

func (c *conn) flushClient() error {
	if err := c.cw.Flush(); err != nil {
		return &clientError{err}
	}
	return nil
}

// relayBody copies n bytes (n < 0: up to the upstream's EOF) to the
// sandbox, flushing whenever the upstream has nothing more buffered so
// that streamed responses are not delayed.
func (c *conn) relayBody(n int64) error {
	if c.buf == nil {
		c.buf = getBuffer()
	}
	buf := *c.buf
	for n != 0 {
		want := int64(len(buf))
		if n > 0 {
			want = min(want, n)
		}
		m, err := c.ur.Read(buf[:want])
		if m > 0 {
			if n > 0 {
				n -= int64(m)
			}
			if _, werr := c.cw.Write(buf[:m]); werr != nil {
				return &clientError{werr}
			}
		}
		if err != nil {
			if n < 0 && errors.Is(err, io.EOF) {
				return nil
			}
			return unexpected(err)
		}
		if c.ur.Buffered() == 0 {
			if err := c.flushClient(); err != nil {
				return err
			}
		}
	}
	return nil
}

// relayChunked copies a chunked body verbatim, following its framing to
// find its end.
func (c *conn) relayChunked() error {
	for {
		line, err := readLine(c.ur, maxChunkLine*16, ReasonBadUpstreamResponse)
		if err != nil {
			return unexpected(err)
		}
		size, ok := responseChunkSize(line)
		if !ok {
			return refuse(ReasonBadUpstreamResponse, "chunk size line")
		}
		c.scratch = append(append(c.scratch[:0], line...), '\r', '\n')
		if _, err := c.cw.Write(c.scratch); err != nil {
			return &clientError{err}
		}
		if size == 0 {
			return c.relayTrailer()
		}
		if err := c.relayBody(size); err != nil {
			return err
		}
		end, err := c.ur.Peek(2)
		if err != nil {
			return unexpected(err)
		}
		if end[0] != '\r' || end[1] != '\n' {
			return refuse(ReasonBadUpstreamResponse, "chunk data not followed by CRLF")
		}
		if _, err := c.cw.Write(end); err != nil {
			return &clientError{err}
		}
		_, _ = c.ur.Discard(2)
	}
}

// relayTrailer copies a response's trailer section and its final CRLF.
func (c *conn) relayTrailer() error {
	var err error
	c.scratch, c.spans, err = readFields(c.ur, c.scratch[:0], c.spans[:0], c.responseLimits())
	if err != nil {
		return unexpected(err)
	}
	if _, err := c.cw.Write(c.scratch); err != nil {
		return &clientError{err}
	}
	return nil
}

// tunnel relays an allowed upgrade's new protocol in both directions,
// uninspected, until both sides have closed their half.
func (c *conn) tunnel() error {
	_ = c.client.Conn.SetDeadline(time.Time{})
	_ = c.up.Conn.SetDeadline(time.Time{})
	var wg sync.WaitGroup
	var errUp, errDown error
	var sent int64
	wg.Add(2)
	go func() {
		defer wg.Done()
		sent, errUp = pump(c.up.Conn, c.cr, c.client.Conn)
	}()
	go func() {
		defer wg.Done()
		_, errDown = pump(c.client.Conn, c.ur, c.up.Conn)
	}()
	wg.Wait()
	c.fm.sent(sent)
	return errors.Join(errUp, errDown)
}

// pump copies what src has buffered, then everything from its connection,
// to dst, and half-closes dst.
func pump(dst net.Conn, src *bufio.Reader, srcConn net.Conn) (int64, error) {
	var n int64
	if k := src.Buffered(); k > 0 {
		b, _ := src.Peek(k)
		m, err := dst.Write(b)
		n += int64(m)
		if err != nil {
			return n, err
		}
		_, _ = src.Discard(k)
	}
	m, err := io.Copy(dst, srcConn)
	n += m
	if cw, ok := dst.(closeWriter); ok {
		_ = cw.CloseWrite()
	} else {
		_ = dst.Close()
	}
	return n, err
}

// dial connects to the flow's original destination.
func (c *conn) dial() error {
	ctx, cancel := context.WithTimeout(c.ctx, c.lim.DialTimeout)
	defer cancel()
	dial := c.p.Dial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	nc, err := dial(ctx, "tcp", c.flow.Dst.String())
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.aborted {
		_ = nc.Close()
		return context.Cause(c.ctx)
	}
	c.up = newTimedConn(nc, c.lim.BodyIdleTimeout, !c.p.PlainIO)
	c.ur = getReader(c.up, upstreamReaderSize)
	c.uw = getWriter(c.up)
	return nil
}

// timedConn enforces idle timeouts: with readIdle (writeIdle) set, every
// Read (Write) first moves the deadline that far ahead. abortRead makes
// reads fail for good, abort reads and writes, even one racing with a
// deadline refresh.
//
// Deadlines are moved lazily (see lazyDeadline): a timeout fires between
// its duration and 1/16 more after the event it times, and a keep-alive
// connection's deadlines cost nothing on most requests (each move is a
// runtime timer update).
type timedConn struct {
	net.Conn

	mu                        sync.Mutex
	readIdle, writeIdle       time.Duration
	readAborted, writeAborted bool
	readDL, writeDL           time.Time // as set on Conn; zero: none

	// rw writes Conn, raw when it can be (internal/rawsys), and reads it
	// without an empty read first (poll.go); the reads are made by the
	// connection's own goroutine only.
	rw         rawsys.Conn
	raw        bool          // inside rw.WaitRead's callback: Read reads fd, never waits
	fd         uintptr       // the socket, while raw
	flushFirst *bufio.Writer // written by the next Read, before it waits

	// The state of readAfterFlush's callback, which is made once per
	// connection.
	readStep   func(fd uintptr) bool
	rp         []byte
	rn         int
	rerr, ferr error
	flushW     *bufio.Writer
}

// newTimedConn returns nc with no timeouts yet, written (and read by
// serveArrived and readAfterFlush) with raw system calls when raw is true
// and nc is a plain TCP connection.
func newTimedConn(nc net.Conn, writeIdle time.Duration, raw bool) *timedConn {
	t := &timedConn{Conn: nc, writeIdle: writeIdle}
	t.rw.Init(nc, raw)
	return t
}

var errAborted = errors.New("connection aborted")

// lazyDeadline returns the deadline to set on a connection whose deadline
// is cur, for a timeout d from now (d <= 0: no deadline), and whether it
// must be set at all: a deadline already between now+d and now+d+d/16
// stays. A deadline that moves is set d/16 beyond now+d, so that the moves
// of the next d/16 cost nothing.
func lazyDeadline(cur time.Time, d time.Duration) (time.Time, bool) {
	if d <= 0 {
		return time.Time{}, !cur.IsZero()
	}
	want := time.Now().Add(d)
	slack := d / 16
	if !cur.IsZero() && !cur.Before(want) && cur.Sub(want) <= slack {
		return cur, false
	}
	return want.Add(slack), true
}

func (t *timedConn) Read(p []byte) (int, error) {
	t.mu.Lock()
	if t.readAborted {
		t.mu.Unlock()
		return 0, errAborted
	}
	if t.readIdle > 0 {
		t.setReadDeadlineLocked(t.readIdle)
	}
	t.mu.Unlock()
	switch {
	case t.raw:
		return rawsys.ReadNow(t.fd, p)
	case t.flushFirst != nil:
		w := t.flushFirst
		t.flushFirst = nil
		return t.readAfterFlush(w, p)
	}
	return t.Conn.Read(p)
}

func (t *timedConn) Write(p []byte) (int, error) {
	t.mu.Lock()
	if t.writeAborted {
		t.mu.Unlock()
		return 0, errAborted
	}
	if dl, ok := lazyDeadline(t.writeDL, t.writeIdle); ok && t.writeIdle > 0 {
		_ = t.Conn.SetWriteDeadline(dl)
		t.writeDL = dl
	}
	t.mu.Unlock()
	return t.rw.Write(p)
}

func (t *timedConn) setReadIdle(d time.Duration) {
	t.mu.Lock()
	t.readIdle = d
	t.mu.Unlock()
}

// setReadTimeout makes reads fail once d passed from now (d <= 0: never),
// within the slack of lazyDeadline.
func (t *timedConn) setReadTimeout(d time.Duration) {
	t.mu.Lock()
	if !t.readAborted {
		t.setReadDeadlineLocked(d)
	}
	t.mu.Unlock()
}

func (t *timedConn) setReadDeadlineLocked(d time.Duration) {
	if dl, ok := lazyDeadline(t.readDL, d); ok {
		_ = t.Conn.SetReadDeadline(dl)
		t.readDL = dl
	}
}

// abortRead unblocks and fails every read through t; writes still work
// (the sandbox may still get an answer).
func (t *timedConn) abortRead() {
	t.mu.Lock()
	t.readAborted = true
	_ = t.Conn.SetReadDeadline(time.Unix(1, 0))
	t.mu.Unlock()
}

// abort unblocks and fails every read and write through t.
func (t *timedConn) abort() {
	t.mu.Lock()
	t.readAborted, t.writeAborted = true, true
	_ = t.Conn.SetDeadline(time.Unix(1, 0))
	t.mu.Unlock()
}
