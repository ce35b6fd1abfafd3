package secure

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/proxies/seal"
)

// TCP is the privacy proxy of (secure, tcp): each flow is connected to its
// original destination, the sandbox's stream sealed on its way there as
// one interactive object, the remote's stream opened on its way back as
// another, under the other direction's context.
type TCP struct {
	// Dial connects to the flow's destination. Nil: a net.Dialer.
	Dial DialFunc
	// Logger receives refusals (Info). Nil: slog.Default().
	Logger *slog.Logger
	// DialTimeout bounds the connection and the TLS handshake. Zero:
	// DefaultDialTimeout.
	DialTimeout time.Duration
	// IdleTimeout ends (resets) a flow on which nothing moved either way
	// for that long. Zero: DefaultIdleTimeout.
	IdleTimeout time.Duration
	// SegmentSize is the most plaintext one outbound segment carries (a
	// read from the sandbox is sealed as one segment, up to this). Zero:
	// seal.DefaultSegmentSize.
	SegmentSize int
}

var _ proxies.StreamProxy = (*TCP)(nil)

// NewTCP returns the secure TCP proxy, dialing with dial (nil: a
// net.Dialer) and logging to log (nil: slog.Default()).
func NewTCP(dial DialFunc, log *slog.Logger) *TCP {
	return &TCP{Dial: dial, Logger: log}
}

// Configure accepts a secure rule with secure.protocol tcp: it reads the
// rule's upstreamTLS files and pins, so that a flow never fails on them.
func (p *TCP) Configure(r *policy.Rule) (any, error) {
	return configure(r, "tcp")
}

// ErrIdle ends a flow on which nothing moved for IdleTimeout.
var ErrIdle = errors.New("flow idle")

// ServeStream serves one flow: no key, no connection; then the two
// directions, each ending at its end of object (a clean half-close) or at
// the first refusal, which resets both connections.
func (p *TCP) ServeStream(ctx context.Context, c net.Conn, f *proxies.Flow) proxies.Result {
	cfg, err := flowConfig(f, "tcp")
	if err != nil {
		reset(c)
		return proxies.Result{End: proxies.EndError, Err: err}
	}
	log := logger(p.Logger).With(logSandbox, f.Sandbox, logRule, f.RuleName(), logDst, f.Dst.String())
	deny := func(reason string, err error) {
		f.Report.Deny(proxies.Denial{Reason: reason, Detail: cfg.keyID})
		log.Info("secure flow refused", logReason, reason, logError, err)
	}

	key, err := currentKey(f, cfg.keyID)
	if err != nil {
		// Before any dial: without the key nothing may leave, not even a
		// connection attempt. Reported before the reset, so that the audit
		// trail never lags the sandbox.
		deny(ReasonNoKey, err)
		reset(c)
		return proxies.Result{End: proxies.EndError, Err: &proxies.RefusalError{Reason: ReasonNoKey, Err: err}}
	}
	host := ""
	if len(f.Hosts) > 0 {
		host = f.Hosts[0]
	}
	up, err := dialRemote(ctx, p.Dial, p.DialTimeout, cfg, f.Dst, host)
	if err != nil {
		if ctx.Err() != nil {
			reset(c)
			return proxies.Result{End: proxies.EndRevoked, Err: context.Cause(ctx)}
		}
		if isVerifyError(err) {
			deny(ReasonUpstreamTLS, err)
		}
		reset(c)
		return proxies.Result{End: proxies.EndError, Err: err}
	}
	sealer, err := seal.NewSealer(up.conn, cfg.sealConfig(key, p.SegmentSize, true))
	if err != nil {
		reset(c)
		up.reset()
		return proxies.Result{End: proxies.EndError, Err: err}
	}

	idle := p.IdleTimeout
	if idle <= 0 {
		idle = DefaultIdleTimeout
	}
	s := &tcpFlow{client: c, up: up, idle: idle, deny: deny}
	s.touch()
	stop := context.AfterFunc(ctx, func() { s.fail(context.Cause(ctx), "") })
	s.mu.Lock()
	s.timer = time.AfterFunc(idle, s.checkIdle)
	s.mu.Unlock()

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.inbound(cfg, f)
	}()
	s.outbound(sealer)
	wg.Wait()
	stop()

	s.mu.Lock()
	s.finished = true
	s.timer.Stop()
	err = s.err
	s.mu.Unlock()
	f.Report.Bytes(s.out.Load(), s.in.Load())
	if err == nil && ctx.Err() == nil {
		// Both objects ended whole: the half-closes went out already.
		_ = c.Close()
		up.close()
		return proxies.Result{End: proxies.EndClosed}
	}
	reset(c) // a no-op after fail, which reset both already
	up.reset()
	return proxies.ResultOf(ctx, err, proxies.EndFor{Err: ErrIdle, End: proxies.EndIdle})
}

// tcpFlow is one secure TCP flow: both directions, the idle timer and the
// first failure, which resets both connections.
type tcpFlow struct {
	client  net.Conn
	up      remote
	idle    time.Duration
	last    atomic.Int64 // time.Since(epoch) of the last byte moved
	out, in atomic.Int64 // plaintext bytes: sealed from the sandbox, opened to it

	deny func(reason string, err error)

	mu       sync.Mutex
	timer    *time.Timer
	err      error
	failed   bool
	finished bool
}

// epoch anchors the activity clock.
var epoch = time.Now()

func (s *tcpFlow) touch() { s.last.Store(int64(time.Since(epoch))) }

func (s *tcpFlow) checkIdle() {
	quiet := time.Since(epoch) - time.Duration(s.last.Load())
	if quiet >= s.idle {
		s.fail(ErrIdle, "")
		return
	}
	s.mu.Lock()
	if !s.finished {
		s.timer.Reset(s.idle - quiet)
	}
	s.mu.Unlock()
}

// fail records the flow's first failure, reports it when it is a refusal
// (reason set), and resets both connections: the sandbox must not read a
// cut stream as an ended one, and the remote must not either.
func (s *tcpFlow) fail(err error, reason string) {
	s.mu.Lock()
	if s.finished || s.failed {
		s.mu.Unlock()
		return
	}
	s.failed, s.err = true, err
	s.mu.Unlock()
	if reason != "" {
		s.deny(reason, err)
	}
	reset(s.client)
	s.up.reset()
}

// outbound seals the sandbox's stream onto the remote: each read becomes
// a segment at once (Sealer.ReadFrom on an interactive sealer), so a
// request reaches the remote without waiting for a segment to fill; the
// sandbox's EOF becomes the final segment and a half-close.
func (s *tcpFlow) outbound(sealer *seal.Sealer) {
	_, err := sealer.ReadFrom(&countingReader{r: s.client, n: &s.out, touch: s.touch})
	if err == nil {
		err = sealer.Close()
		if err == nil {
			err = closeWrite(s.up.conn)
		}
	}
	switch {
	case err == nil:
	case errors.Is(err, seal.ErrTooLarge):
		s.fail(fmt.Errorf("sealing the sandbox's stream: %w", err), ReasonSealFailed)
	default:
		s.fail(fmt.Errorf("sealing the sandbox's stream: %w", err), "")
	}
}

// inbound opens the remote's stream onto the sandbox: only segments that
// verified, as the remote's direction of this rule, reach it; the end of
// the object (nothing after its final segment) becomes a half-close.
func (s *tcpFlow) inbound(cfg *ruleConfig, f *proxies.Flow) {
	o := seal.NewOpener(bufio.NewReaderSize(s.up.conn, inboundReaderSize), cfg.keyFunc(f),
		seal.WithContext(cfg.in), seal.WithAccept(cfg.acceptKeyID))
	_, err := o.WriteTo(&countingWriter{w: s.client, n: &s.in, touch: s.touch})
	if err == nil {
		err = closeWrite(s.client)
	}
	switch {
	case err == nil:
	case isSealError(err):
		s.fail(fmt.Errorf("opening the remote's stream: %w", err), ReasonSealOpenFailed)
	default:
		s.fail(fmt.Errorf("opening the remote's stream: %w", err), "")
	}
}

// inboundReaderSize buffers the remote's frame headers; segment bodies
// larger than it are read straight into the opener's buffer.
const inboundReaderSize = 4 << 10

// countingReader counts the bytes read and marks activity.
type countingReader struct {
	r     io.Reader
	n     *atomic.Int64
	touch func()
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.n.Add(int64(n))
		c.touch()
	}
	return n, err
}

// countingWriter counts the bytes written and marks activity.
type countingWriter struct {
	w     io.Writer
	n     *atomic.Int64
	touch func()
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	if n > 0 {
		c.n.Add(int64(n))
		c.touch()
	}
	return n, err
}
