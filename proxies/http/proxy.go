package httpproxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Flow is the context of one redirected connection, from the daemon.
type Flow struct {
	Sandbox string         // sandbox id (metrics label, logs)
	Rule    string         // egress rule name (metrics label, logs)
	Dst     netip.AddrPort // original destination: the only upstream
	// Hosts are the acceptable Host values: the fqdn(s) the flow's
	// destination was resolved from, or the literal IP for a cidr rule.
	// Empty: every request is refused (421).
	Hosts []string
	// OnDeny, when set, is called for this flow's refused requests
	// instead of Proxy.OnDeny (same rules: synchronous, must not block).
	OnDeny func(Denial)
}

// Limits bound each connection. A zero field takes the default shown.
type Limits struct {
	MaxLineBytes           int           // request line or one field line, without CRLF: 8 KiB (431 above)
	MaxHeaderBytes         int           // whole request head: 32 KiB (431 above)
	MaxHeaderCount         int           // request header fields: 100 (431 above)
	MaxResponseHeaderBytes int           // whole upstream response head: 64 KiB (502 above)
	MaxHeldBodyBytes       int64         // one held request body: 8 MiB (413 above)
	MaxHeldTotalBytes      int64         // held bodies of all connections of a Proxy: 256 MiB (503 above)
	HeaderTimeout          time.Duration // first byte of a request to the end of its head: 10 s (408)
	IdleTimeout            time.Duration // keep-alive wait for the next request: 60 s
	BodyIdleTimeout        time.Duration // longest stall of a body read or write, either direction: 30 s
	ResponseHeaderTimeout  time.Duration // request fully sent to response head received: 60 s (504)
	DialTimeout            time.Duration // connecting to the upstream: 10 s (502)
}

func (l Limits) withDefaults() Limits {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def64 := func(v *int64, d int64) {
		if *v <= 0 {
			*v = d
		}
	}
	dur := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&l.MaxLineBytes, 8<<10)
	def(&l.MaxHeaderBytes, 32<<10)
	def(&l.MaxHeaderCount, 100)
	def(&l.MaxResponseHeaderBytes, 64<<10)
	def64(&l.MaxHeldBodyBytes, 8<<20)
	def64(&l.MaxHeldTotalBytes, 256<<20)
	dur(&l.HeaderTimeout, 10*time.Second)
	dur(&l.IdleTimeout, 60*time.Second)
	dur(&l.BodyIdleTimeout, 30*time.Second)
	dur(&l.ResponseHeaderTimeout, 60*time.Second)
	dur(&l.DialTimeout, 10*time.Second)
	return l
}

// Proxy inspects the HTTP/1.1 requests of open-mode flows. Its fields are
// read-only once ServeConn has been called; it must not be copied after.
type Proxy struct {
	// Dial connects to the flow's original destination (network "tcp",
	// addr Flow.Dst). The daemon supplies one whose traffic is not
	// redirected again. nil: a net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Logger receives refusals (Info) and forwarded requests (Debug).
	// nil: slog.Default().
	Logger *slog.Logger
	// Limits bound memory and time per connection.
	Limits Limits
	// OnDeny, when set, is called for every refused request (not for
	// failures such as timeouts or an unreachable upstream), synchronously
	// on the connection's goroutine: it must not block.
	OnDeny func(Flow, Denial)
	// Metrics, when set, counts requests, bytes and durations.
	Metrics *Metrics
	// PlainIO turns raw I/O off (see internal/rawsys and poll.go): every
	// connection is then read and written through its own Read and Write,
	// as a connection the daemon wraps always is. False is the path that
	// was measured.
	PlainIO bool

	held atomic.Int64 // bytes of request bodies held across connections
}

func (p *Proxy) logger() *slog.Logger {
	if p.Logger != nil {
		return p.Logger
	}
	return slog.Default()
}

// Log field names.
const (
	logSandbox = "sandbox"
	logRule    = "rule"
	logDst     = "dst"
	logReason  = "reason"
	logStatus  = "status"
	logMethod  = "method"
	logPath    = "path"
	logDetail  = "detail"
	logError   = "error"
)

// Buffer sizes; see the package documentation for the per-connection bound.
const (
	copyBufferSize     = 32 << 10
	upstreamReaderSize = 32 << 10
	writerSize         = 4 << 10
	minClientReader    = 16 << 10
	lingerTimeout      = 500 * time.Millisecond
	lingerBytes        = 256 << 10
)

// ServeConn serves one redirected connection from a sandbox until either
// side closes it, a refusal ends it, or ctx is canceled. It owns client and
// closes it. Requests are read, checked against rules and forwarded to
// flow.Dst one at a time; see the package documentation for what is
// refused and how. It returns nil when the connection ended by the
// protocol's rules (including after a refusal; those are reported through
// OnDeny, Metrics and the logger), the error that ended it otherwise, and
// ctx's error when it was canceled. Invalid rules or flow close client at
// once.
func (p *Proxy) ServeConn(ctx context.Context, client net.Conn, flow Flow, rules *Rules) error {
	if err := rules.Validate(); err != nil {
		_ = client.Close()
		return fmt.Errorf("serving egress rule %q: %w", flow.Rule, err)
	}
	hosts, err := newHostMatcher(flow)
	if err != nil {
		_ = client.Close()
		return fmt.Errorf("serving egress rule %q: %w", flow.Rule, err)
	}
	lim := p.Limits.withDefaults()
	c := &conn{
		p: p, ctx: ctx, flow: flow, rules: rules, lim: lim, hosts: hosts,
		log:    p.logger().With(logSandbox, flow.Sandbox, logRule, flow.Rule, logDst, flow.Dst.String()),
		fm:     newFlowMetrics(p.Metrics, flow),
		client: newTimedConn(client, lim.BodyIdleTimeout, !p.PlainIO),
	}
	c.cr = getReader(c.client, max(minClientReader, lim.MaxLineBytes+2))
	c.cw = getWriter(c.client)
	c.rr = requestReader{r: c.cr, lim: headLimits{maxLine: lim.MaxLineBytes, maxHead: lim.MaxHeaderBytes, maxFields: lim.MaxHeaderCount}}

	stop := context.AfterFunc(ctx, c.abort)
	err = c.serve()
	stop()
	c.finish()
	if ctx.Err() != nil {
		return fmt.Errorf("serving %s: %w", flow.Dst, context.Cause(ctx))
	}
	if err != nil {
		return fmt.Errorf("serving %s: %w", flow.Dst, err)
	}
	return nil
}

// conn is one client connection and, once a request was allowed, its
// upstream connection.
type conn struct {
	p     *Proxy
	ctx   context.Context
	flow  Flow
	rules *Rules
	lim   Limits
	hosts hostMatcher
	log   *slog.Logger
	fm    flowMetrics

	client *timedConn
	cr     *bufio.Reader
	cw     *bufio.Writer
	rr     requestReader
	req    request
	// parsed: req was read by serveArrived, at parsedAt, and is for the
	// blocking path to handle.
	parsed   bool
	parsedAt time.Time

	mu      sync.Mutex // guards up and aborted against abort
	up      *timedConn
	aborted bool
	ur      *bufio.Reader
	uw      *bufio.Writer

	held     []byte      // the current request's held body
	reserved int64       // bytes of held and of its decodings counted in p.held
	heldRes  int64       // the part of reserved that is held
	bc       bodyCoding  // how the current request's body is decoded for matching
	reading  scratch     // a reading of the decoded body (Latin-1, UTF-16)
	unescape scratch     // a reading with its escapes decoded
	headBuf  []byte      // decoded query and field values
	sent100  bool        // the proxy answered Expect: 100-continue itself
	wrote    bool        // part of the current response reached the client
	bodySent atomic.Bool // the streamed body is all sent

	buf      *[]byte // response copy buffer
	bodyBuf  *[]byte // request body copy buffer (its own goroutine)
	scratch  []byte
	respHead []byte
	spans    []fieldSpan
}

// serve runs the request loop.
func (c *conn) serve() error {
	for first := true; ; first = false {
		if !first && c.client.rw.Raw() && !c.parsed {
			if done, err := c.serveArrived(); done {
				return err
			}
		}
		q := &c.req
		start := c.parsedAt
		if !c.parsed {
			if err := c.await(first); err != nil {
				if errors.Is(err, io.EOF) || errors.Is(err, os.ErrDeadlineExceeded) || c.isAborted() {
					return nil // the sandbox closed or idled out between requests
				}
				return fmt.Errorf("waiting for a request: %w", err)
			}
			start = time.Now()
			if err := c.rr.read(q); err != nil {
				return c.headFailed(q, err, start)
			}
		}
		c.parsed = false
		keep, err := c.handle(q, start)
		if err != nil || !keep {
			return err
		}
	}
}

// headFailed answers a request whose head was refused or not read, and
// returns what serve returns.
func (c *conn) headFailed(q *request, err error, start time.Time) error {
	var rf *refusal
	switch {
	case errors.As(err, &rf):
		c.refuse(q, rf, start, false)
		return nil
	case errors.Is(err, os.ErrDeadlineExceeded):
		c.refuse(q, refuse(ReasonTimeout, "request head not complete in %v", c.lim.HeaderTimeout), start, false)
	}
	return fmt.Errorf("reading a request head: %w", err)
}

// await waits for the first byte of the next request: up to HeaderTimeout
// for the first request (it is part of the head), IdleTimeout for the
// following ones, which then get HeaderTimeout for the rest of their head
// unless it is buffered already.
func (c *conn) await(first bool) error {
	wait := c.lim.IdleTimeout
	if first {
		wait = c.lim.HeaderTimeout
	}
	c.client.setReadTimeout(wait)
	if _, err := c.cr.Peek(1); err != nil {
		return err
	}
	if !first && !headBuffered(c.cr) {
		c.client.setReadTimeout(c.lim.HeaderTimeout)
	}
	return nil
}

// headBuffered reports whether r holds a whole request head (its lines up
// to the empty one) already: reading it then takes nothing from the
// connection, and no head timeout is needed.
func headBuffered(r *bufio.Reader) bool {
	b, _ := r.Peek(r.Buffered())
	return bytes.Contains(b, crlfcrlf)
}

var crlfcrlf = []byte("\r\n\r\n")

// handle decides one request whose head was read, and forwards it when
// allowed. It reports whether the connection may carry another request.
func (c *conn) handle(q *request, start time.Time) (bool, error) {
	if rf := c.check(q); rf != nil {
		return c.refuse(q, rf, start, !q.hasBody()), nil
	}
	hold := q.chunked || (q.contentLength > 0 && c.rules.matchesBodies())
	c.sent100 = false
	if hold {
		defer c.release()
		if q.minor == 1 && q.expect != "" { // only 100-continue passed check
			if _, err := c.cw.WriteString("HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
				return false, fmt.Errorf("answering Expect: %w", err)
			}
			if err := c.cw.Flush(); err != nil {
				return false, fmt.Errorf("answering Expect: %w", err)
			}
			c.sent100 = true
		}
		if err := c.readHeld(q); err != nil {
			var rf *refusal
			switch {
			case errors.As(err, &rf):
				return c.refuse(q, rf, start, false), nil
			case errors.Is(err, os.ErrDeadlineExceeded):
				c.refuse(q, refuse(ReasonTimeout, "request body stalled for %v", c.lim.BodyIdleTimeout), start, false)
			}
			return false, fmt.Errorf("reading a request body: %w", err)
		}
		if c.rules.matchesBodies() {
			if rf := c.matchBody(); rf != nil {
				// The whole body was read: the next request's framing is known.
				return c.refuse(q, rf, start, true), nil
			}
		}
	}
	return c.forward(q, hold, start)
}

// check applies the flow and the rules to a request head.
func (c *conn) check(q *request) *refusal {
	if !c.hosts.allows(q.host) {
		return refuse(ReasonHostMismatch, "Host %q", truncate(q.host, 64))
	}
	if q.authority != "" && !c.hosts.allows(q.authority) {
		return refuse(ReasonHostMismatch, "target authority %q", truncate(q.authority, 64))
	}
	if q.upgrade != "" && (q.minor == 0 || !c.rules.allowsUpgrade(q.upgrade)) {
		return refuse(ReasonUpgrade, "Upgrade %q", truncate(q.upgrade, 64))
	}
	if q.minor == 1 && q.expect != "" && !strings.EqualFold(q.expect, "100-continue") {
		return refuse(ReasonExpect, "Expect %q", truncate(q.expect, 64))
	}
	if rf := c.rules.match(q); rf != nil {
		return rf
	}
	if rf := c.matchHead(q); rf != nil {
		return rf
	}
	if !q.hasBody() {
		return nil
	}
	if c.rules.matchesBodies() {
		var rf *refusal
		if c.bc, rf = readBodyCoding(q); rf != nil {
			return rf
		}
	}
	if q.contentLength > 0 {
		if mx := c.rules.MaxBodyBytes; mx != NoBodyLimit && q.contentLength > mx {
			return refuse(ReasonBodyTooLarge, "Content-Length %d above %d", q.contentLength, mx)
		}
		if c.rules.matchesBodies() && q.contentLength > c.lim.MaxHeldBodyBytes {
			return refuse(ReasonHoldLimit, "Content-Length %d above the hold limit %d", q.contentLength, c.lim.MaxHeldBodyBytes)
		}
	}
	return nil
}

// readHeld reads the whole body of a request into c.held.
func (c *conn) readHeld(q *request) error {
	c.client.setReadIdle(c.lim.BodyIdleTimeout)
	defer c.client.setReadIdle(0)
	if q.chunked {
		var err error
		c.held, err = readChunked(c.cr, c.held[:0], c.grow)
		return err
	}
	if err := c.grow(q.contentLength); err != nil {
		return err
	}
	c.held = slices.Grow(c.held[:0], int(q.contentLength))[:q.contentLength]
	_, err := io.ReadFull(c.cr, c.held)
	return unexpected(err)
}

// grow admits a held body growing to total bytes: within the rule's
// maxBodyBytes, the per-connection hold limit and the proxy-wide budget.
func (c *conn) grow(total int64) error {
	if mx := c.rules.MaxBodyBytes; mx != NoBodyLimit && total > mx {
		return refuse(ReasonBodyTooLarge, "body above %d bytes", mx)
	}
	if total > c.lim.MaxHeldBodyBytes {
		return refuse(ReasonHoldLimit, "body above the hold limit %d", c.lim.MaxHeldBodyBytes)
	}
	if delta := total - c.heldRes; delta > 0 {
		if c.p.held.Add(delta) > c.lim.MaxHeldTotalBytes {
			c.p.held.Add(-delta)
			return refuse(ReasonProxyBusy, "held bodies above %d bytes", c.lim.MaxHeldTotalBytes)
		}
		c.heldRes = total
		c.reserved += delta
	}
	return nil
}

// release returns the held body's share of the proxy-wide budget (and
// that of its decodings), and its buffers when they are large.
func (c *conn) release() {
	c.p.held.Add(-c.reserved)
	c.reserved, c.heldRes = 0, 0
	if cap(c.held) > 64<<10 {
		c.held = nil
	}
	c.reading.done()
	c.unescape.done()
}

// refuse answers a request the proxy will not forward, reports it, and
// returns whether the connection may carry another request: only after a
// refusal that says nothing about framing, of a well-formed HTTP/1.1
// request whose body was consumed (or absent), when the sandbox did not ask
// to close. (HTTP/1.0 clients may read a refusal to the connection's end.)
func (c *conn) refuse(q *request, rf *refusal, start time.Time, consumed bool) bool {
	info := reasons[rf.reason]
	keep := info.keepable && consumed && !q.close && q.minor == 1
	path := q.rawPath
	if path == "" {
		path, _, _ = strings.Cut(q.target, "?")
	}
	d := Denial{Reason: rf.reason, Status: info.status, Method: truncate(q.method, maxDenialMethod), Path: truncate(path, maxDenialPath)}
	detail := c.withhold(&d, path, rf)
	decision := decisionDeny
	if info.failure {
		decision = decisionError
	}
	// Report before answering: the audit trail never lags the sandbox.
	c.fm.request(decision, string(rf.reason), time.Since(start))
	// The log says which rule refused what kind of request, never where to:
	// no path (docs/telemetry.md).
	c.log.Info("request refused", logReason, rf.reason, logStatus, d.Status, logMethod, SafeMethod(d.Method), logDetail, detail)
	if !info.failure && c.flow.OnDeny != nil {
		c.flow.OnDeny(d)
	} else if !info.failure && c.p.OnDeny != nil {
		c.p.OnDeny(c.flow, d)
	}
	c.scratch = appendRefusal(c.scratch[:0], rf.reason, q.method == "HEAD", keep)
	if _, err := c.cw.Write(c.scratch); err != nil {
		return false
	}
	return c.cw.Flush() == nil && keep
}

// withhold keeps what the rule's deny patterns stop out of the audit trail
// and the log, whatever the refusal: a request refused for its path or
// method before the patterns ran may still carry their data there (and a
// detail may quote a field value). It empties such a method or path in d
// and returns the detail to log.
func (c *conn) withhold(d *Denial, path string, rf *refusal) string {
	pats := c.rules.DenyPatterns
	if len(pats) == 0 {
		return rf.detail
	}
	if rf.reason == ReasonPathPattern || c.matchEscaped(pats, path) >= 0 {
		d.Path = ""
	}
	if matchString(pats, d.Method) >= 0 {
		d.Method = ""
	}
	if c.matchEscaped(pats, rf.detail) >= 0 {
		return "withheld: it matches a deny pattern"
	}
	return rf.detail
}

// abort ends the connection when ctx is canceled.
func (c *conn) abort() {
	c.mu.Lock()
	c.aborted = true
	up := c.up
	c.mu.Unlock()
	_ = c.client.Close()
	if up != nil {
		_ = up.Close()
	}
}

func (c *conn) isAborted() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.aborted
}

// finish closes both connections. The client is half-closed and drained
// for a moment first, so that a sandbox still sending (the body of a
// refused request) reads the response instead of a reset.
func (c *conn) finish() {
	c.mu.Lock()
	up, aborted := c.up, c.aborted
	c.up = nil
	c.mu.Unlock()
	if up != nil {
		_ = up.Close()
	}
	if cw, ok := c.client.Conn.(closeWriter); ok && !aborted {
		_ = cw.CloseWrite()
		_ = c.client.Conn.SetReadDeadline(time.Now().Add(lingerTimeout))
		_, _ = io.CopyN(io.Discard, c.client.Conn, lingerBytes)
	}
	_ = c.client.Close()
	putReader(c.cr)
	putWriter(c.cw)
	putReader(c.ur)
	putWriter(c.uw)
	putBuffer(c.buf)
	putBuffer(c.bodyBuf)
	c.cr, c.cw, c.ur, c.uw, c.buf, c.bodyBuf = nil, nil, nil, nil, nil, nil
}

type closeWriter interface{ CloseWrite() error }
