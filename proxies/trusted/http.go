package trusted

import (
	"bufio"
	"context"
	"crypto/tls"
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
	"github.com/cleanwall/cleanwall/proxies/seal/hpke"
)

// HTTP is the privacy proxy of (trusted, http): rules with trusted.hpke,
// and trusted.tls or not. The sandbox speaks plain HTTP/1.1; each request
// body is sealed to the customer's public key on its way to the remote
// (Content-Length set to the sealed size, chunked when the sandbox's was),
// and responses come back as the remote sent them. With trusted.tls the
// remote connection is TLS, originated and verified as by the TCP proxy.
type HTTP struct {
	// Dial connects to the remote. Nil: a net.Dialer.
	Dial DialFunc
	// Logger receives refusals (Info) and reloads. Nil: slog.Default().
	Logger *slog.Logger
	// Limits bound each connection; zero fields take their defaults.
	Limits HTTPLimits
	// SessionCacheSize, ReloadInterval and ClientAuthWait: as TCP's.
	SessionCacheSize int
	ReloadInterval   time.Duration
	ClientAuthWait   time.Duration

	curves []tls.CurveID // overrides the key exchanges offered (benchmarks)

	once   sync.Once
	origin *origin
}

// HTTPLimits bound a trusted HTTP connection. A zero field takes the
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

// Refusals of a request by the trusted HTTP proxy (Denial.Reason, and the
// Cleanwall-Reason of the response the sandbox gets). A remote that fails
// trusted.tls is refused with the TCP proxy's reasons, as a 502.
const (
	ReasonBadRequest      = "bad-request"      // 400: a request net/http cannot read, or a field out of the grammar
	ReasonHeaderTooLarge  = "header-too-large" // 431
	ReasonHTTPVersion     = "http-version"     // 505: anything but HTTP/1.x
	ReasonHostMismatch    = "host-mismatch"    // 421: Host does not name the flow's destination
	ReasonConnect         = "connect"          // 403: a tunnel would carry unsealed bytes
	ReasonUpgrade         = "upgrade"          // 403: so would a switched protocol
	ReasonExpect          = "expect"           // 417: Expect other than 100-continue
	ReasonContentEncoding = "content-encoding" // 415: the remote would label a sealed body with the sandbox's coding
	ReasonHPKEKey         = "hpke-key"         // 500: the rule's public key file no longer loads
	ReasonSealFailed      = "seal-failed"      // 500: the format's limit (a body over 64 TiB)
)

// Failures: answered, logged, not reported as denials.
const (
	reasonUpstreamTimeout     = "upstream-timeout"      // 504
	reasonBadUpstreamResponse = "bad-upstream-response" // 502
	reasonTimeout             = "timeout"               // 408
)

var _ proxies.StreamProxy = (*HTTP)(nil)

// NewHTTP returns the trusted HTTP proxy, dialing with dial (nil: a
// net.Dialer) and logging to log (nil: slog.Default()).
func NewHTTP(dial DialFunc, log *slog.Logger) *HTTP {
	return &HTTP{Dial: dial, Logger: log}
}

// Configure accepts a trusted rule with hpke: it reads the public key
// file, and tls's files and pins when the rule has tls, refusing what
// could never work with the field named.
func (p *HTTP) Configure(r *policy.Rule) (any, error) {
	return configure(r, "http", p.ReloadInterval)
}

func (p *HTTP) init() *origin {
	p.once.Do(func() {
		p.origin = newOrigin(p.Dial, p.Logger, p.Limits.withDefaults().DialTimeout, p.ClientAuthWait, p.SessionCacheSize, p.curves, []string{"http/1.1"})
	})
	return p.origin
}

// ServeStream serves one connection's requests, one at a time.
func (p *HTTP) ServeStream(ctx context.Context, c net.Conn, f *proxies.Flow) proxies.Result {
	cfg, err := flowConfig(f, "http")
	if err != nil {
		reset(c)
		return proxies.Result{End: proxies.EndError, Err: err}
	}
	o := p.init()
	h := &httpFlow{
		o: o, ctx: ctx, f: f, cfg: cfg, lim: p.Limits.withDefaults(),
		log:   o.log.With(logSandbox, f.Sandbox, logRule, f.RuleName(), logDst, f.Dst.String()),
		hosts: httpproxy.Flow{Dst: f.Dst, Hosts: f.Hosts},
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
	if h.refused != nil && ctx.Err() == nil {
		// The remote failed trusted.tls: the flow as a whole was refused.
		return proxies.Result{End: proxies.EndError, Err: &proxies.RefusalError{Reason: h.refused.reason, Err: h.refused.err}}
	}
	return proxies.ResultOf(ctx, err)
}

// httpFlow is one sandbox connection and, once a request went out, its
// connection to the remote.
type httpFlow struct {
	o     *origin
	ctx   context.Context
	f     *proxies.Flow
	cfg   *ruleConfig
	lim   HTTPLimits
	log   *slog.Logger
	hosts httpproxy.Flow

	client  *httpwire.TimedConn
	cin     *httpwire.LimitedReader
	cr      *bufio.Reader
	cw      *bufio.Writer
	wrote   bool     // part of the current response reached the sandbox
	refused *failure // the remote failed trusted.tls

	mu      sync.Mutex // guards up and aborted against abort
	up      *upstream
	aborted bool
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
	var pub *hpke.PublicKey
	if hasBody(req) {
		var err error
		if pub, err = h.cfg.hpke.key.get(h.o.log, "hpke publicKeyFile"); err != nil {
			h.refuse(req, refuseFor(http.StatusInternalServerError, ReasonHPKEKey, true, err))
			return false, nil
		}
		if strings.EqualFold(req.Header.Get("Expect"), "100-continue") {
			// The proxy reads the body itself, so it answers the
			// expectation (the remote gets no Expect).
			if _, err := h.cw.WriteString("HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
				return false, err
			}
			if err := h.cw.Flush(); err != nil {
				return false, err
			}
		}
	}
	resp, rf := h.roundTrip(req, pub)
	if rf != nil {
		return h.failed(req, rf)
	}
	return h.relay(req, resp)
}

// check applies the flow and trusted mode's limits to a request head.
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
		// A remote framework would decode the sealed body by the
		// sandbox's coding; a sandbox that compresses does it inside.
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
// (0 included: an empty body is still sealed, so the remote can tell it
// from a missing one) or chunked framing.
func hasBody(req *http.Request) bool {
	return req.ContentLength != 0 || len(req.Header.Values("Content-Length")) > 0
}

// Fields trusted mode does not forward. Request: hop-by-hop fields, the
// framing it redoes, Expect (it answers 100-continue itself), digests of
// the plaintext body (they do not describe the sealed one), and a
// SealedHeader of the sandbox's (only the proxy says a body is sealed).
// Response: hop-by-hop fields and the framing it redoes; the rest passes.
var (
	dropRequest  = httpwire.FieldSet(httpwire.HopByHop, httpwire.Digests, []string{"Host", "Content-Length", "Expect", SealedHeader})
	dropResponse = httpwire.FieldSet(httpwire.HopByHop, []string{"Content-Length"})
)

// bodyResult is how sending a request body ended.
type bodyResult struct {
	err        error
	clientSide bool // the sandbox, not the remote, failed
}

// bodySender is a request body being sent: res is set once done is
// closed.
type bodySender struct {
	done chan struct{}
	res  bodyResult
}

// roundTrip sends req to the remote (connecting first when needed): its
// head with the fields trusted mode forwards, and its body, if any, sealed
// to pub by a goroutine while the response head is awaited. It returns the
// final response head (informational ones are dropped).
func (h *httpFlow) roundTrip(req *http.Request, pub *hpke.PublicKey) (*http.Response, *refusal) {
	if rf := h.connect(); rf != nil {
		return nil, rf
	}
	h.upIO.ReadIdle = 0
	body := pub != nil
	uw := h.uw
	target := req.RequestURI
	if !strings.HasPrefix(target, "/") && target != "*" {
		target = req.URL.RequestURI()
	}
	uw.WriteString(req.Method + " " + target + " HTTP/1.1\r\nHost: " + req.Host + "\r\n")
	httpwire.WriteFields(uw, req.Header, dropRequest)
	chunked := body && req.ContentLength < 0
	switch {
	case chunked:
		uw.WriteString(SealedHeader + ": " + SealedValue + "\r\nTransfer-Encoding: chunked\r\n")
	case body:
		uw.WriteString(SealedHeader + ": " + SealedValue + "\r\nContent-Length: " + strconv.FormatInt(hpke.SealedSize(req.ContentLength, pub), 10) + "\r\n")
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
			b.res = h.sendBody(req, pub, chunked)
			close(b.done)
		}()
	} else {
		if err := uw.Flush(); err != nil {
			return nil, refuseFor(http.StatusBadGateway, reasonUnreachable, false, err)
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
			if h.up != nil && h.up.tls != nil {
				// A remote that refuses the client certificate after the
				// proxy stopped waiting says so here.
				if fl := classify(err); fl.deny && fl.reason == ReasonClientCert {
					h.refused = fl
					return nil, refuseFor(http.StatusBadGateway, fl.reason, true, err)
				}
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
// Content-Length body to exactly hpke.SealedSize of it, a chunked one in
// chunks. A body that does not arrive whole is never closed as a body:
// the remote connection is reset instead, so the remote never holds a cut
// body that opens as whole.
func (h *httpFlow) sendBody(req *http.Request, pub *hpke.PublicKey, chunked bool) bodyResult {
	h.client.ReadIdle = h.lim.BodyIdleTimeout
	defer func() { h.client.ReadIdle = 0 }()
	var w io.Writer = h.uw
	var cw io.WriteCloser
	if chunked {
		cw = httputil.NewChunkedWriter(h.uw)
		w = cw
	}
	s, err := hpke.NewSealer(w, pub, h.cfg.hpke.context)
	if err != nil {
		h.resetUpstream()
		return bodyResult{err: err}
	}
	src := &sourceReader{r: req.Body}
	_, err = io.Copy(s, src) // the Sealer's ReadFrom reads into its chunk
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

// awaitBody waits up to d for the current request body's sender and
// reports whether the body went out whole. A remote that answered before
// it read the body (a refusal, say) does not hold the response longer
// than d.
func (h *httpFlow) awaitBody(d time.Duration) bool {
	if h.body == nil {
		return true
	}
	return httpwire.AwaitDone(h.body.done, d) && h.body.res.err == nil
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

// relay passes the remote's response to the sandbox: its status, its
// fields but the hop-by-hop ones, and its body, framed by the proxy
// (Content-Length kept, chunked re-chunked, a body that ends at the
// close passed on to the close).
func (h *httpFlow) relay(req *http.Request, resp *http.Response) (bool, error) {
	keep := !req.Close && h.awaitBody(httpwire.BodyGrace)
	fields := resp.Header.Clone()
	httpwire.DropFields(fields, dropResponse)
	if req.Method == http.MethodHead || resp.StatusCode == http.StatusNoContent || resp.StatusCode == http.StatusNotModified {
		// No body; the Content-Length of a HEAD or 304 describes the
		// representation and passes as the remote sent it.
		if cl := resp.Header.Get("Content-Length"); cl != "" && resp.StatusCode != http.StatusNoContent {
			if _, err := strconv.ParseUint(cl, 10, 63); err == nil {
				fields.Set("Content-Length", cl)
			}
		}
		h.writeHead(resp.StatusCode, fields, noBody, keep)
		return h.end(keep, !resp.Close)
	}
	length := resp.ContentLength
	if length < 0 && (req.ProtoMinor == 0 || !keep) {
		keep = false // the body ends at the close
		length = untilClose
	}
	h.writeHead(resp.StatusCode, fields, length, keep)
	var w io.Writer = h.cw
	var cw io.WriteCloser
	if length == -1 {
		cw = httputil.NewChunkedWriter(h.cw)
		w = cw
	}
	h.wrote = true
	h.client.WriteIdle = h.lim.BodyIdleTimeout
	n, err := io.Copy(w, resp.Body)
	h.client.WriteIdle = 0
	if err == nil && length >= 0 && n != length {
		err = fmt.Errorf("relayed %d bytes, the response said %d", n, length)
	}
	if err == nil && cw != nil {
		if err = cw.Close(); err == nil {
			_, err = h.cw.WriteString("\r\n")
		}
	}
	if err != nil {
		// A cut body must not read as a whole one.
		h.abort()
		h.endBody()
		return false, fmt.Errorf("relaying a response body: %w", err)
	}
	return h.end(keep, !resp.Close && length != untilClose)
}

// end completes an exchange whose response went to the sandbox: the
// request body's sender is ended, the remote connection kept only when
// keepUp and the body went out whole, and the sandbox's only when keep
// and the body was read whole.
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

// Lengths writeHead takes besides a Content-Length: none at all, and a
// body that ends at the close.
const (
	noBody     = -2
	untilClose = -3
)

// writeHead writes a response head to the sandbox: length bytes of body
// (-1: unknown, chunked; noBody: none; untilClose: read to the close).
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
	case length == -1:
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
		h.log.Info("trusted request failed", logReason, rf.reason, logStatus, rf.status, logError, rf.err)
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
	var method, path string
	if req != nil {
		method, path = req.Method, truncate(req.URL.Path, 256)
	}
	name, resumed := "", false
	if h.cfg.tls != nil {
		name = h.cfg.tls.serverNameFor(h.f)
	}
	var fl *failure
	if errors.As(err, &fl) {
		resumed = fl.resumed
	}
	h.f.Report.Deny(denial(reason, status, method, path, name, resumed))
	h.log.Info("trusted request refused", logReason, reason, logStatus, status, logError, err)
}

// connect makes sure a verified remote connection is open. One serves
// the whole sandbox connection: the remote is the rule's (SNI and name
// are trusted.tls's, whatever Host the request names within the flow's
// hosts).
func (h *httpFlow) connect() *refusal {
	h.mu.Lock()
	have := h.up != nil
	h.mu.Unlock()
	if have {
		return nil
	}
	up, err := h.o.connect(h.ctx, h.f, h.cfg)
	if err != nil {
		var fl *failure
		if !errors.As(err, &fl) {
			fl = &failure{reason: reasonUnreachable, err: err}
		}
		if fl.deny {
			h.refused = fl
		}
		return refuseFor(http.StatusBadGateway, fl.reason, fl.deny, fl)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.aborted {
		reset(up.raw)
		return refuseFor(http.StatusBadGateway, reasonUnreachable, false, context.Cause(h.ctx))
	}
	h.up = up
	// A remote that stops reading a body it is sent fails the write.
	h.upIO = &httpwire.TimedConn{Conn: &relayConn{up: up, onRefuse: func(*failure) {}}, WriteIdle: h.lim.BodyIdleTimeout}
	h.upLim = httpwire.NewLimitedReader(h.upIO)
	h.ur = bufio.NewReaderSize(h.upLim, 16<<10)
	h.uw = bufio.NewWriterSize(h.upIO, 16<<10)
	return nil
}

// closeUpstream closes the remote connection (the next request connects
// again).
func (h *httpFlow) closeUpstream() {
	h.mu.Lock()
	up := h.up
	h.up = nil
	h.mu.Unlock()
	if up != nil {
		_ = up.conn.Close()
	}
}

// resetUpstream resets the remote connection: a request body that ended
// badly must not reach the remote as a whole body. The connection is
// dropped later by the request's owner.
func (h *httpFlow) resetUpstream() {
	h.mu.Lock()
	up := h.up
	h.mu.Unlock()
	if up != nil {
		reset(up.raw)
	}
}

// abort resets both connections (revocation, a cut response body).
func (h *httpFlow) abort() {
	h.mu.Lock()
	h.aborted = true
	up := h.up
	h.mu.Unlock()
	reset(h.client.Conn)
	if up != nil {
		reset(up.raw)
	}
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
	closeGracefully(h.client.Conn)
}

// The errors of a request head that does not parse: net/http's own quote
// the sandbox's bytes, and refusals are logged (docs/telemetry.md).
var (
	errMalformedHead = errors.New("malformed request head")
	errHeadTooLarge  = errors.New("request head above the limit")
)
