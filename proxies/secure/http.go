package secure

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	httpproxy "github.com/cleanwall/cleanwall/proxies/http"
	"github.com/cleanwall/cleanwall/proxies/internal/httpwire"
	"github.com/cleanwall/cleanwall/proxies/seal"
)

// HTTP is the privacy proxy of (secure, http): the sandbox speaks plain
// HTTP/1.1; request bodies are sealed on their way to the remote, each as
// one object, and response bodies are opened on their way back. See the
// package documentation and docs/sealing.md for what becomes
// of each kind of request and response.
type HTTP struct {
	// Dial connects to the flow's destination. Nil: a net.Dialer.
	Dial DialFunc
	// Logger receives refusals (Info). Nil: slog.Default().
	Logger *slog.Logger
	// Limits bound each connection; zero fields take their defaults.
	Limits HTTPLimits
	// SegmentSize is the segment size request bodies are sealed with.
	// Zero: seal.DefaultSegmentSize.
	SegmentSize int
}

// HTTPLimits bound a secure HTTP connection. A zero field takes the
// default shown.
type HTTPLimits struct {
	MaxHeaderBytes         int           // a request head: 32 KiB (431 above)
	MaxResponseHeaderBytes int           // a response head: 64 KiB (502 above)
	HeaderTimeout          time.Duration // first byte of a request to the end of its head: 10 s
	IdleTimeout            time.Duration // keep-alive wait for the next request: 60 s
	BodyIdleTimeout        time.Duration // longest stall of a body, either direction: 30 s
	ResponseHeaderTimeout  time.Duration // request sent to response head: 60 s (504)
	DialTimeout            time.Duration // connection and TLS handshake: 10 s (502)
}

func (l HTTPLimits) withDefaults() HTTPLimits {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	dur := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&l.MaxHeaderBytes, 32<<10)
	def(&l.MaxResponseHeaderBytes, 64<<10)
	dur(&l.HeaderTimeout, 10*time.Second)
	dur(&l.IdleTimeout, 60*time.Second)
	dur(&l.BodyIdleTimeout, 30*time.Second)
	dur(&l.ResponseHeaderTimeout, 60*time.Second)
	dur(&l.DialTimeout, DefaultDialTimeout)
	return l
}

// Refusals of the secure HTTP proxy (Denial.Reason, and the
// Cleanwall-Reason header of the response the sandbox gets).
const (
	ReasonBadRequest      = "bad-request"      // 400: a request net/http cannot read
	ReasonHeaderTooLarge  = "header-too-large" // 431
	ReasonHTTPVersion     = "http-version"     // 505: anything but HTTP/1.x
	ReasonHostMismatch    = "host-mismatch"    // 421: Host does not name the flow's destination
	ReasonConnect         = "connect"          // 403: a tunnel would carry unsealed bytes
	ReasonUpgrade         = "upgrade"          // 403: so would a switched protocol
	ReasonExpect          = "expect"           // 417: Expect other than 100-continue
	ReasonContentEncoding = "content-encoding" // 415 for a request body, 502 for a response's
	ReasonUnsealedBody    = "unsealed-body"    // the response's status, with its body withheld
)

// Failures: answered, logged, not reported as denials.
const (
	reasonUpstreamUnreachable = "upstream-unreachable"  // 502
	reasonUpstreamTimeout     = "upstream-timeout"      // 504
	reasonBadUpstreamResponse = "bad-upstream-response" // 502
	reasonTimeout             = "timeout"               // 408
)

var _ proxies.StreamProxy = (*HTTP)(nil)

// NewHTTP returns the secure HTTP proxy, dialing with dial (nil: a
// net.Dialer) and logging to log (nil: slog.Default()).
func NewHTTP(dial DialFunc, log *slog.Logger) *HTTP {
	return &HTTP{Dial: dial, Logger: log}
}

// Configure accepts a secure rule with secure.protocol http: it reads the
// rule's upstreamTLS files and pins, so that a flow never fails on them.
func (p *HTTP) Configure(r *policy.Rule) (any, error) {
	return configure(r, "http")
}

// ServeStream serves one connection's requests, one at a time.
func (p *HTTP) ServeStream(ctx context.Context, c net.Conn, f *proxies.Flow) proxies.Result {
	cfg, err := flowConfig(f, "http")
	if err != nil {
		reset(c)
		return proxies.Result{End: proxies.EndError, Err: err}
	}
	h := &httpFlow{
		p: p, ctx: ctx, f: f, cfg: cfg, lim: p.Limits.withDefaults(),
		log:   logger(p.Logger).With(logSandbox, f.Sandbox, logRule, f.RuleName(), logDst, f.Dst.String()),
		hosts: httpproxy.Flow{Dst: f.Dst, Hosts: f.Hosts},
	}
	if _, err := currentKey(f, cfg.keyID); err != nil {
		// Before any dial: without the key nothing may leave. Reported
		// before the reset, so that the audit trail never lags the sandbox.
		h.deny(nil, ReasonNoKey, 0, err)
		reset(c)
		return proxies.Result{End: proxies.EndError, Err: &proxies.RefusalError{Reason: ReasonNoKey, Err: err}}
	}
	h.client = &httpwire.TimedConn{Conn: c}
	h.cin = httpwire.NewLimitedReader(h.client)
	h.cr = bufio.NewReaderSize(h.cin, 16<<10)
	h.cw = bufio.NewWriterSize(h.client, 4<<10)

	stop := context.AfterFunc(ctx, h.abort)
	err = h.serve()
	stop()
	f.Report.Bytes(h.client.BytesRead.Load(), h.client.BytesWritten.Load())
	clean := err == nil && ctx.Err() == nil && !h.isAborted()
	h.finish(clean)
	return proxies.ResultOf(ctx, err)
}

// httpFlow is one sandbox connection and, once a request went out, its
// connection to the remote.
type httpFlow struct {
	p     *HTTP
	ctx   context.Context
	f     *proxies.Flow
	cfg   *ruleConfig
	lim   HTTPLimits
	log   *slog.Logger
	hosts httpproxy.Flow

	client *httpwire.TimedConn
	cin    *httpwire.LimitedReader
	cr     *bufio.Reader
	cw     *bufio.Writer
	wrote  bool // part of the current response reached the sandbox

	mu      sync.Mutex // guards up and aborted against abort
	up      remote
	aborted bool
	upHost  string // the Host the remote connection was verified for
	upIO    *httpwire.TimedConn
	upLim   *httpwire.LimitedReader
	ur      *bufio.Reader
	uw      *bufio.Writer
	body    *bodySender // the current request body's sender, if any
}

// refusal is a request the proxy answers itself.
type refusal struct {
	status int
	reason string
	deny   bool // a decision (reported), not a failure
	err    error
}

func (r *refusal) Error() string {
	if r.err != nil {
		return r.reason + ": " + r.err.Error()
	}
	return r.reason
}

func (r *refusal) Unwrap() error { return r.err }

func refuseFor(status int, reason string, deny bool, err error) *refusal {
	return &refusal{status: status, reason: reason, deny: deny, err: err}
}

// serve runs the request loop; nil when the connection ended by the
// protocol's rules (including after a refusal).
func (h *httpFlow) serve() error {
	for first := true; ; first = false {
		wait := h.lim.IdleTimeout
		if first {
			wait = h.lim.HeaderTimeout
		}
		_ = h.client.SetReadDeadline(time.Now().Add(wait))
		if _, err := h.cr.Peek(1); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, os.ErrDeadlineExceeded) || h.isAborted() {
				return nil // the sandbox closed or idled out between requests
			}
			return fmt.Errorf("waiting for a request: %w", err)
		}
		_ = h.client.SetReadDeadline(time.Now().Add(h.lim.HeaderTimeout))
		// What the reader holds already is part of the head's budget.
		h.cin.Limit(max(0, h.lim.MaxHeaderBytes-h.cr.Buffered()))
		req, err := http.ReadRequest(h.cr)
		hit := h.cin.Hit
		h.cin.Limit(-1)
		_ = h.client.SetReadDeadline(time.Time{})
		if err != nil {
			switch {
			case hit:
				h.refuse(nil, refuseFor(http.StatusRequestHeaderFieldsTooLarge, ReasonHeaderTooLarge, true, errHeadTooLarge))
				return nil
			case errors.Is(err, os.ErrDeadlineExceeded):
				h.refuse(nil, refuseFor(http.StatusRequestTimeout, reasonTimeout, false, err))
			case h.isAborted():
			default:
				h.refuse(nil, refuseFor(http.StatusBadRequest, ReasonBadRequest, true, errMalformedHead))
				return nil
			}
			return fmt.Errorf("reading a request head: %w", err)
		}
		keep, err := h.handle(req)
		if err != nil || !keep {
			return err
		}
	}
}

// handle decides and forwards one request; it reports whether the
// connection may carry another.
func (h *httpFlow) handle(req *http.Request) (bool, error) {
	h.wrote = false
	if rf := h.check(req); rf != nil {
		h.refuse(req, rf)
		return false, nil
	}
	key, err := currentKey(h.f, h.cfg.keyID)
	if err != nil {
		// The key went away between requests: no answer at all.
		h.deny(req, ReasonNoKey, 0, err)
		h.abort()
		return false, err
	}
	if hasBody(req) && strings.EqualFold(req.Header.Get("Expect"), "100-continue") {
		// The proxy reads the body itself, so it answers the expectation
		// (the remote gets no Expect).
		if _, err := h.cw.WriteString("HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
			return false, err
		}
		if err := h.cw.Flush(); err != nil {
			return false, err
		}
	}
	if rs, ok := singleRange(req); ok {
		return h.ranged(req, key, rs)
	}
	resp, rf := h.roundTrip(req, key, "", "")
	if rf != nil {
		return h.failed(req, rf)
	}
	return h.relay(req, resp, false)
}

// check applies the flow and secure mode's limits to a request head.
func (h *httpFlow) check(req *http.Request) *refusal {
	switch {
	case req.ProtoMajor != 1:
		return refuseFor(http.StatusHTTPVersionNotSupported, ReasonHTTPVersion, true, errors.New("not HTTP/1.x"))
	case req.Method == http.MethodConnect:
		return refuseFor(http.StatusForbidden, ReasonConnect, true, nil)
	case req.Header.Get("Upgrade") != "":
		return refuseFor(http.StatusForbidden, ReasonUpgrade, true, nil)
	case !strings.HasPrefix(req.RequestURI, "/") && req.RequestURI != "*" && (req.URL.Scheme != "http" || req.URL.User != nil):
		return refuseFor(http.StatusBadRequest, ReasonBadRequest, true, errors.New("the target is neither origin-form nor an http absolute-form"))
	case !httpproxy.HostAllowed(h.hosts, req.Host):
		return refuseFor(http.StatusMisdirectedRequest, ReasonHostMismatch, true, errors.New("the Host is not one of the flow's names"))
	}
	if e := req.Header.Get("Expect"); e != "" && !strings.EqualFold(e, "100-continue") {
		return refuseFor(http.StatusExpectationFailed, ReasonExpect, true, nil)
	}
	if ce := req.Header.Values("Content-Encoding"); hasBody(req) && len(ce) > 0 && !(len(ce) == 1 && strings.EqualFold(ce[0], "identity")) {
		// The remote would label a sealed object with a coding it does not
		// have; a sandbox that compresses does it inside the body.
		return refuseFor(http.StatusUnsupportedMediaType, ReasonContentEncoding, true, nil)
	}
	for k, vs := range req.Header {
		if !httpwire.ValidFieldName(k) {
			return refuseFor(http.StatusBadRequest, ReasonBadRequest, true, errors.New("a field name is not a token"))
		}
		for _, v := range vs {
			if !httpwire.ValidFieldValue(v) {
				return refuseFor(http.StatusBadRequest, ReasonBadRequest, true, errors.New("a field value has a forbidden byte"))
			}
		}
	}
	return nil
}

// hasBody reports whether a request declares a body: a Content-Length
// (0 included: an empty object is still an object) or chunked framing.
func hasBody(req *http.Request) bool {
	return req.ContentLength != 0 || len(req.Header.Values("Content-Length")) > 0
}

// bodyResult is how sending a request body ended.
type bodyResult struct {
	err        error
	clientSide bool // the sandbox, not the remote, failed
}

// roundTrip sends req to the remote (dialing it first when needed): its
// head with the fields secure mode forwards, rangeHdr as its Range and
// ifMatch as its If-Match when set, and its body, if any, sealed under key
// by a goroutine while the response head is awaited. It returns the final
// response head (informational ones are dropped).
func (h *httpFlow) roundTrip(req *http.Request, key proxies.DataKey, rangeHdr, ifMatch string) (*http.Response, *refusal) {
	if rf := h.connect(req.Host); rf != nil {
		return nil, rf
	}
	h.upIO.ReadIdle = 0
	body := hasBody(req) && rangeHdr == ""
	var layout seal.Layout
	if body {
		var err error
		if layout, err = h.cfg.sealConfig(key, h.p.SegmentSize, false).Layout(); err != nil {
			return nil, refuseFor(http.StatusInternalServerError, ReasonSealFailed, true, err)
		}
	}
	uw := h.uw
	target := req.RequestURI
	if !strings.HasPrefix(target, "/") && target != "*" {
		target = req.URL.RequestURI()
	}
	uw.WriteString(req.Method + " " + target + " HTTP/1.1\r\nHost: " + req.Host + "\r\n")
	httpwire.WriteFields(uw, req.Header, dropRequest)
	uw.WriteString("Accept-Encoding: identity\r\n")
	if rangeHdr != "" {
		uw.WriteString("Range: " + rangeHdr + "\r\n")
	}
	if ifMatch != "" {
		uw.WriteString("If-Match: " + ifMatch + "\r\n")
	}
	chunked := body && req.ContentLength < 0
	switch {
	case chunked:
		uw.WriteString("Transfer-Encoding: chunked\r\n")
	case body:
		uw.WriteString("Content-Length: " + strconv.FormatInt(layout.SealedSize(req.ContentLength), 10) + "\r\n")
	}
	if req.Close {
		uw.WriteString("Connection: close\r\n")
	}
	uw.WriteString("\r\n")

	h.body = nil
	if body {
		// The response head timeout starts once the body is sent.
		_ = h.upIO.SetReadDeadline(time.Time{})
		b := &bodySender{done: make(chan struct{})}
		h.body = b
		go func() {
			b.res = h.sendBody(req, key, chunked)
			close(b.done)
		}()
	} else {
		if err := uw.Flush(); err != nil {
			return nil, refuseFor(http.StatusBadGateway, reasonUpstreamUnreachable, false, err)
		}
		_ = h.upIO.SetReadDeadline(time.Now().Add(h.lim.ResponseHeaderTimeout))
	}

	h.upLim.Limit(h.lim.MaxResponseHeaderBytes)
	defer h.upLim.Limit(-1)
	probe := &http.Request{Method: req.Method}
	for range 9 {
		resp, err := http.ReadResponse(h.ur, probe)
		if err != nil {
			if res := h.endBody(); res.err != nil {
				if res.clientSide {
					// The sandbox stopped sending its body: it gets no
					// answer but a timeout, if that is what happened.
					status := 0
					if errors.Is(res.err, os.ErrDeadlineExceeded) {
						status = http.StatusRequestTimeout
					}
					return nil, refuseFor(status, reasonTimeout, false, res.err)
				}
				err = res.err
			}
			switch {
			case h.upLim.Hit:
				return nil, refuseFor(http.StatusBadGateway, reasonBadUpstreamResponse, false, err)
			case errors.Is(err, os.ErrDeadlineExceeded):
				return nil, refuseFor(http.StatusGatewayTimeout, reasonUpstreamTimeout, false, err)
			}
			return nil, refuseFor(http.StatusBadGateway, reasonBadUpstreamResponse, false, err)
		}
		switch {
		case resp.StatusCode == http.StatusSwitchingProtocols:
			return nil, refuseFor(http.StatusBadGateway, reasonBadUpstreamResponse, false, errors.New("101 to a request that asked for no upgrade"))
		case resp.StatusCode < 200:
			continue // 100 Continue (the proxy answered the sandbox's), 103
		}
		_ = h.upIO.SetReadDeadline(time.Time{})
		h.upIO.ReadIdle = h.lim.BodyIdleTimeout
		return resp, nil
	}
	return nil, refuseFor(http.StatusBadGateway, reasonBadUpstreamResponse, false, errors.New("too many informational responses"))
}

// sendBody seals the sandbox's request body onto the remote: a
// Content-Length body is sealed to exactly layout.SealedSize of it, a
// chunked one in chunks. A body that does not arrive whole never becomes
// a whole object: the remote connection is reset instead of the object
// closed.
func (h *httpFlow) sendBody(req *http.Request, key proxies.DataKey, chunked bool) bodyResult {
	h.client.ReadIdle = h.lim.BodyIdleTimeout
	defer func() { h.client.ReadIdle = 0 }()
	var w io.Writer = h.uw
	var cw io.WriteCloser
	if chunked {
		cw = httputil.NewChunkedWriter(h.uw)
		w = cw
	}
	s, err := seal.NewSealer(w, h.cfg.sealConfig(key, h.p.SegmentSize, false))
	if err != nil {
		h.resetUpstream()
		return bodyResult{err: err}
	}
	src := &sourceReader{r: req.Body}
	_, err = s.ReadFrom(src)
	if err != nil {
		h.resetUpstream()
		return bodyResult{err: err, clientSide: src.err != nil}
	}
	err = s.Close()
	if err == nil && chunked {
		if err = cw.Close(); err == nil {
			_, err = h.uw.WriteString("\r\n")
		}
	}
	if err == nil {
		err = h.uw.Flush()
	}
	if err != nil {
		h.resetUpstream()
		return bodyResult{err: err}
	}
	_ = h.upIO.SetReadDeadline(time.Now().Add(h.lim.ResponseHeaderTimeout))
	return bodyResult{}
}

// sourceReader remembers its reader's errors (other than io.EOF), to tell
// a sandbox that failed from a remote that did.
type sourceReader struct {
	r   io.Reader
	err error
}

func (s *sourceReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if err != nil && err != io.EOF {
		s.err = err
	}
	return n, err
}

// bodySender is a request body being sent: res is set once done is
// closed.
type bodySender struct {
	done chan struct{}
	res  bodyResult
}

// bodySentWhole reports whether the current request's body (if any) went
// out whole, waiting up to httpwire.BodyGrace for its sender. A response
// head that says the connection stays open is written only then: a remote
// may answer before the sender returned, and the connection cannot carry
// another request unless the sandbox's body was read to its end.
func (h *httpFlow) bodySentWhole() bool {
	if h.body == nil {
		return true
	}
	return httpwire.AwaitDone(h.body.done, httpwire.BodyGrace) && h.body.res.err == nil
}

// endBody ends the current request body's sender: at once when it is
// done, else (the remote answered or failed before it had the whole body)
// by resetting the remote connection and stopping the sandbox's reads.
func (h *httpFlow) endBody() bodyResult {
	b := h.body
	if b == nil {
		return bodyResult{}
	}
	h.body = nil
	select {
	case <-b.done:
		return b.res
	default:
	}
	h.resetUpstream()
	h.client.Stop.Store(true)
	_ = h.client.Conn.SetReadDeadline(time.Now())
	<-b.done
	h.client.Stop.Store(false)
	if b.res.err == nil {
		b.res.err = errors.New("the remote answered before it had the whole request body")
	}
	return b.res
}

// end completes an exchange whose response went to the sandbox: the
// request body's sender is ended, the remote connection kept only when
// keepUp and the body went out whole, and the sandbox's only when keep
// and the body was read whole (what it sends next cannot be told from
// the rest of it otherwise).
func (h *httpFlow) end(keep, keepUp bool) (bool, error) {
	sent := h.endBody()
	if sent.err != nil || !keepUp {
		h.closeUpstream()
	}
	if err := h.cw.Flush(); err != nil {
		return false, err
	}
	return keep && sent.err == nil, nil
}

// relay answers the sandbox with resp: its status and forwarded fields,
// and its body opened (only a sealed object's verified plaintext ever
// reaches the sandbox). ranged is set for a response the proxy asked a
// range of (its 206 is expected).
func (h *httpFlow) relay(req *http.Request, resp *http.Response, ranged bool) (bool, error) {
	keep := !req.Close && h.bodySentWhole()
	fields := resp.Header.Clone()
	httpwire.DropFields(fields, dropResponse)
	// The response body is read to its end or not at all: the remote
	// connection is closed rather than drained (resp.Body.Close would
	// drain it).
	if ce := resp.Header.Values("Content-Encoding"); len(ce) > 0 && !(len(ce) == 1 && strings.EqualFold(ce[0], "identity")) {
		h.endBody()
		h.refuse(req, refuseFor(http.StatusBadGateway, ReasonContentEncoding, true, fmt.Errorf("the response's Content-Encoding %q", truncate(strings.Join(ce, ","), 64))))
		h.closeUpstream()
		return false, nil
	}
	if resp.StatusCode == http.StatusPartialContent && !ranged {
		return h.failed(req, refuseFor(http.StatusBadGateway, reasonBadUpstreamResponse, false, errors.New("206 to a request without Range")))
	}
	if req.Method == http.MethodHead || resp.StatusCode == http.StatusNoContent || resp.StatusCode == http.StatusNotModified {
		// No body; a Content-Length here would be the sealed object's.
		h.writeHead(resp.StatusCode, fields, noBody, keep)
		return h.end(keep, !resp.Close)
	}
	br := bufio.NewReaderSize(resp.Body, 512)
	magic, err := br.Peek(4)
	switch {
	case len(magic) == 0 && err == io.EOF:
		h.writeHead(resp.StatusCode, fields, 0, keep)
		return h.end(keep, !resp.Close)
	case err != nil && err != io.EOF:
		return h.failed(req, refuseFor(http.StatusBadGateway, reasonBadUpstreamResponse, false, err))
	case string(magic) != "CWSL":
		// Not a sealed object (an error page, a listing, a plaintext
		// object): the status goes through, the body never does.
		fields.Set("Cleanwall-Reason", ReasonUnsealedBody)
		h.deny(req, ReasonUnsealedBody, resp.StatusCode, nil)
		h.writeHead(resp.StatusCode, fields, 0, keep)
		return h.end(keep, false)
	}
	o := seal.NewOpener(br, h.cfg.keyFunc(h.f), seal.WithAccept(h.acceptBody))
	return h.deliver(req, resp, o, fields, -1)
}

// deliver opens o onto the sandbox under resp's status and fields: the
// header is verified (key commitment) before the response head goes out;
// a segment is released only once verified; a refusal after the head
// resets the sandbox's connection, so that a cut body never passes for a
// whole one. length is the plaintext's length when the caller knows it
// (a range), else -1.
func (h *httpFlow) deliver(req *http.Request, resp *http.Response, o *seal.Opener, fields http.Header, length int64) (bool, error) {
	keep := !req.Close && h.bodySentWhole()
	hd, err := o.Header()
	if err != nil {
		return h.failed(req, refuseFor(http.StatusBadGateway, ReasonSealOpenFailed, true, err))
	}
	if length < 0 && resp.ContentLength >= 0 && !hd.Interactive {
		n, err := hd.Layout().PlaintextSize(resp.ContentLength)
		if err != nil {
			return h.failed(req, refuseFor(http.StatusBadGateway, ReasonSealOpenFailed, true, err))
		}
		length = n
	}
	if length < 0 && req.ProtoMinor == 0 {
		keep = false // an HTTP/1.0 client reads to the close
	}
	before := h.client.BytesWritten.Load()
	h.writeHead(resp.StatusCode, fields, length, keep)
	var w io.Writer = h.cw
	var cw io.WriteCloser
	if length < 0 && req.ProtoMinor > 0 {
		cw = httputil.NewChunkedWriter(h.cw)
		w = cw
	}
	var held *holdLast
	if length > 0 {
		held = &holdLast{w: w}
		w = held
	}
	h.wrote = true
	h.client.WriteIdle = h.lim.BodyIdleTimeout
	n, err := o.WriteTo(w)
	if err == nil && length >= 0 && n != length {
		err = fmt.Errorf("opened %d bytes, the response said %d", n, length)
	}
	if err == nil && held != nil {
		err = held.release()
	}
	h.client.WriteIdle = 0
	if err != nil {
		if isSealError(err) && h.client.BytesWritten.Load() == before {
			// Nothing left the buffer yet (the first segment failed): the
			// head is taken back and the sandbox gets a plain refusal.
			h.cw.Reset(h.client)
			h.wrote = false
			return h.failed(req, refuseFor(http.StatusBadGateway, ReasonSealOpenFailed, true, err))
		}
		if isSealError(err) {
			h.deny(req, ReasonSealOpenFailed, resp.StatusCode, err)
		}
		h.abort()
		h.endBody()
		return false, fmt.Errorf("opening a response body: %w", err)
	}
	if cw != nil {
		if err := cw.Close(); err != nil {
			return false, err
		}
		if _, err := h.cw.WriteString("\r\n"); err != nil {
			return false, err
		}
	}
	return h.end(keep, !resp.Close)
}

// holdLast passes on all but the last byte written to it until release:
// a body framed by Content-Length is complete for the sandbox's client
// once that many bytes arrived, and the proxy takes its length from the
// remote's Content-Length, which a remote that drops the final segments
// can make match what is left. The opener withholds only the final
// segment's plaintext until the object verified to its end; holding back
// one more byte keeps any cut object from ever reading as whole.
type holdLast struct {
	w    io.Writer
	last [1]byte
	held bool
}

func (h *holdLast) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if h.held {
		if _, err := h.w.Write(h.last[:]); err != nil {
			return 0, err
		}
	}
	if _, err := h.w.Write(p[:len(p)-1]); err != nil {
		return 0, err
	}
	h.last[0], h.held = p[len(p)-1], true
	return len(p), nil
}

// release writes the byte held back.
func (h *holdLast) release() error {
	if !h.held {
		return nil
	}
	h.held = false
	_, err := h.w.Write(h.last[:])
	return err
}

// acceptBody is the opener's check of a response body's header before the
// key source is asked: the rule's key id, and a context of the rule's,
// either direction: an object another sandbox put (sealed on its way out)
// or one the key holder made for the Clean Room (cleanwall seal seal
// --context "rule=R dir=in").
func (h *httpFlow) acceptBody(hd seal.Header) error {
	if err := h.cfg.acceptKeyID(hd); err != nil {
		return err
	}
	if hd.Context != h.cfg.out && hd.Context != h.cfg.in {
		return fmt.Errorf("context %q is not rule %q's", hd.Context, h.cfg.rule)
	}
	return nil
}

// failed answers a request whose exchange failed before a response head
// was relayed.
func (h *httpFlow) failed(req *http.Request, rf *refusal) (bool, error) {
	h.endBody()
	h.closeUpstream()
	if h.isAborted() {
		return false, rf
	}
	h.refuse(req, rf)
	if rf.deny {
		return false, nil
	}
	return false, rf
}

// noBody as writeHead's length: a response without a body.
const noBody = -2

// writeHead writes a response head to the sandbox: length bytes of body
// (-1: unknown, chunked for HTTP/1.1; noBody: none).
func (h *httpFlow) writeHead(status int, fields http.Header, length int64, keep bool) {
	w := h.cw
	text := http.StatusText(status)
	if text == "" {
		text = "Status"
	}
	w.WriteString("HTTP/1.1 " + strconv.Itoa(status) + " " + text + "\r\n")
	httpwire.WriteFields(w, fields, nil)
	switch {
	case length >= 0:
		w.WriteString("Content-Length: " + strconv.FormatInt(length, 10) + "\r\n")
	case length == -1 && keep:
		w.WriteString("Transfer-Encoding: chunked\r\n")
	}
	if !keep {
		w.WriteString("Connection: close\r\n")
	}
	w.WriteString("\r\n")
}

// refuse answers a request the proxy will not forward (or whose exchange
// failed) with a short response naming the reason, and reports it when it
// is a decision. The connection ends after it.
func (h *httpFlow) refuse(req *http.Request, rf *refusal) {
	if rf.deny {
		h.deny(req, rf.reason, rf.status, rf.err)
	} else {
		h.log.Info("secure request failed", logReason, rf.reason, logStatus, rf.status, logError, rf.err)
	}
	if h.wrote {
		h.abort()
		return
	}
	if rf.status == 0 {
		return
	}
	w := h.cw
	w.WriteString("HTTP/1.1 " + strconv.Itoa(rf.status) + " " + http.StatusText(rf.status) + "\r\nCleanwall-Reason: " + rf.reason + "\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
	_ = w.Flush()
}

// deny reports a refusal (and logs it).
func (h *httpFlow) deny(req *http.Request, reason string, status int, err error) {
	d := proxies.Denial{Reason: reason, Status: status, Detail: h.cfg.keyID}
	if req != nil {
		d.Method = truncate(req.Method, 16)
		d.Path = truncate(req.URL.Path, 256)
	}
	h.f.Report.Deny(d)
	h.log.Info("secure request refused", logReason, reason, logStatus, status, logError, err)
}

// connect makes sure a remote connection verified for host is open.
func (h *httpFlow) connect(host string) *refusal {
	name := host
	if hn, _, err := net.SplitHostPort(host); err == nil {
		name = hn
	}
	name = strings.TrimSuffix(strings.TrimPrefix(name, "["), "]")
	h.mu.Lock()
	have := h.up.conn != nil && h.upHost == name
	h.mu.Unlock()
	if have {
		return nil
	}
	h.closeUpstream()
	up, err := dialRemote(h.ctx, h.p.Dial, h.lim.DialTimeout, h.cfg, h.f.Dst, name)
	if err != nil {
		if isVerifyError(err) {
			return refuseFor(http.StatusBadGateway, ReasonUpstreamTLS, true, err)
		}
		return refuseFor(http.StatusBadGateway, reasonUpstreamUnreachable, false, err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.aborted {
		up.reset()
		return refuseFor(http.StatusBadGateway, reasonUpstreamUnreachable, false, context.Cause(h.ctx))
	}
	h.up, h.upHost = up, name
	// A remote that stops reading a body it is sent fails the write.
	h.upIO = &httpwire.TimedConn{Conn: up.conn, WriteIdle: h.lim.BodyIdleTimeout}
	h.upLim = httpwire.NewLimitedReader(h.upIO)
	h.ur = bufio.NewReaderSize(h.upLim, 16<<10)
	h.uw = bufio.NewWriterSize(h.upIO, 16<<10)
	return nil
}

// closeUpstream closes the remote connection (the next request dials
// again).
func (h *httpFlow) closeUpstream() {
	h.mu.Lock()
	up := h.up
	h.up = remote{}
	h.mu.Unlock()
	up.close()
}

// resetUpstream resets the remote connection: a request body that ended
// badly must not reach the remote as a whole object. It is what the body
// sender calls; the connection is dropped later by the request's owner.
func (h *httpFlow) resetUpstream() {
	h.mu.Lock()
	up := h.up
	h.mu.Unlock()
	up.reset()
}

// abort resets both connections (revocation, a refused body after its
// head went out, a key that went away).
func (h *httpFlow) abort() {
	h.mu.Lock()
	h.aborted = true
	up := h.up
	h.mu.Unlock()
	reset(h.client.Conn)
	up.reset()
}

func (h *httpFlow) isAborted() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.aborted
}

// finish closes both connections: gracefully after a clean end (the
// sandbox's connection half-closed and drained for a moment, so that a
// refusal's response is read rather than reset), abortively otherwise.
func (h *httpFlow) finish(clean bool) {
	if !clean {
		h.abort()
		return
	}
	h.closeUpstream()
	if cw, ok := h.client.Conn.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		_ = h.client.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		_, _ = io.CopyN(io.Discard, h.client.Conn, 256<<10)
	}
	_ = h.client.Close()
}

// Fields secure mode does not forward. Request: hop-by-hop fields, the
// framing it redoes, Expect (it answers 100-continue itself), the content
// negotiation it fixes (Accept-Encoding: identity, so that a sealed object
// comes back as it was stored), Range (it maps ranges itself), and digests
// of the plaintext body, which would let the remote confirm a guess of
// it. Response: hop-by-hop fields, the framing and range it redoes, and
// digests of the sealed object, which do not describe the plaintext the
// sandbox gets. Validators (ETag, Last-Modified) pass both ways: they name
// the stored object, which is the sealed one, consistently.
var (
	dropRequest  = httpwire.FieldSet(httpwire.HopByHop, httpwire.Digests, []string{"Host", "Content-Length", "Expect", "Accept-Encoding", "Range"})
	dropResponse = httpwire.FieldSet(httpwire.HopByHop, httpwire.Digests, []string{"Content-Length", "Content-Range"})
)

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// The errors of a request head that does not parse: net/http's own quote
// the sandbox's bytes, and refusals are logged (docs/telemetry.md).
var (
	errMalformedHead = errors.New("malformed request head")
	errHeadTooLarge  = errors.New("request head above the limit")
)
