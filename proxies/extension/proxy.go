package extension

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

// Defaults for a Proxy's zero fields.
const (
	// DefaultAnswerTimeout bounds the time from a flow's hand-off to the
	// extension's accept or refuse, including the dial and hello of a new
	// control connection. Long enough for an interpreter under load, short
	// enough that a sandbox's connect does not hang.
	DefaultAnswerTimeout = 2 * time.Second
	// DefaultCloseTimeout bounds the delivery of a close message; an
	// extension that cannot take one in that time loses its control
	// connection (and must then close every flow it holds).
	DefaultCloseTimeout = time.Second
	// DefaultMaxFlows bounds the flows in flight per extension (from the
	// hand-off to the end).
	DefaultMaxFlows = 1024
	// DefaultMinBackoff and DefaultMaxBackoff bound the wait between dials
	// after a failure; it doubles with each failure in a row. MaxBackoff
	// stays below AnswerTimeout, so a flow that arrives while the proxy
	// backs off waits for the next dial rather than failing at once, and
	// an extension that comes back serves flows again within MaxBackoff.
	DefaultMinBackoff = 50 * time.Millisecond
	DefaultMaxBackoff = time.Second
)

// maxDenials bounds the deny events reported per flow; later ones are
// dropped (and logged once): each becomes an audit record.
const maxDenials = 256

// Log field names.
const (
	logExtension = "extension"
	logPath      = "path"
	logID        = "flow"
	logSandbox   = "sandbox"
	logRule      = "rule"
	logDst       = "dst"
	logReason    = "reason"
	logError     = "error"
	logRetry     = "retry_in"
)

// Proxy hands the TCP flows of open rules with open.protocol Name to the
// extension listening at Path. Its exported fields are read-only once it
// serves; it must not be copied after. Register it under Key().
type Proxy struct {
	// Name is the extension's name, the open.protocol of its rules (see
	// ParseSpec for what a name may be).
	Name string
	// Path is the extension's SOCK_SEQPACKET unix socket.
	Path string
	// Logger receives connection changes (Info, Warn) and refused flows
	// (Debug). nil: slog.Default().
	Logger *slog.Logger
	// AnswerTimeout: zero means DefaultAnswerTimeout.
	AnswerTimeout time.Duration
	// CloseTimeout: zero means DefaultCloseTimeout.
	CloseTimeout time.Duration
	// MaxFlows: zero means DefaultMaxFlows.
	MaxFlows int
	// MinBackoff and MaxBackoff: zero means DefaultMinBackoff and
	// DefaultMaxBackoff.
	MinBackoff, MaxBackoff time.Duration

	mu        sync.Mutex
	ctl       *control  // the live control connection; nil when none
	dialing   *dialing  // the dial in progress; nil when none
	notBefore time.Time // no dial before (backoff)
	backoff   time.Duration
	down      bool // the last dial failed (logged once per outage)
	inFlight  int
	closed    bool

	lastID atomic.Uint64 // flow ids: unique for the proxy's life
}

// dialing is one dial; waiters read c or err after done is closed.
type dialing struct {
	done chan struct{}
	c    *control
	err  error
}

// ParseSpec reads the daemon's --extension value, NAME=unix:/path. NAME
// becomes an open.protocol value: a lowercase DNS label that is not one
// of the built-in protocols.
func ParseSpec(s string) (name, path string, err error) {
	name, addr, ok := strings.Cut(s, "=")
	if !ok {
		return "", "", fmt.Errorf("extension %q: want NAME=unix:/path", s)
	}
	if err := checkName(name); err != nil {
		return "", "", err
	}
	path, ok = strings.CutPrefix(addr, "unix:")
	if !ok || !filepath.IsAbs(path) {
		return "", "", fmt.Errorf("extension %s: %q is not unix:/absolute/path", name, addr)
	}
	return name, filepath.Clean(path), nil
}

// builtin are the protocols cleanwalld serves itself.
var builtin = map[string]bool{"tcp": true, "http": true, "udp": true, "dns": true}

func checkName(name string) error {
	if builtin[name] {
		return fmt.Errorf("extension name %q is a built-in protocol", name)
	}
	ok := len(name) > 0 && len(name) <= 63 && name[0] >= 'a' && name[0] <= 'z' && name[len(name)-1] != '-'
	for i := 0; ok && i < len(name); i++ {
		c := name[i]
		ok = c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-'
	}
	if !ok {
		return fmt.Errorf("extension name %q is not a lowercase DNS label starting with a letter", name)
	}
	return nil
}

// Key is the registry key of the proxy: open rules with open.protocol
// Name.
func (p *Proxy) Key() proxies.Key {
	return proxies.Key{Mode: policy.ModeOpen.String(), Protocol: p.Name}
}

// Configure accepts an open rule whose open.protocol is the extension's
// name. A byte budget (open.tcp.maxBytesOut) is refused: the proxy does
// not see the bytes, and a budget nobody enforces must not pass.
func (p *Proxy) Configure(r *policy.Rule) (any, error) {
	if r == nil || r.Spec == nil {
		return nil, errors.New("no rule")
	}
	if r.Mode != policy.ModeOpen {
		return nil, fmt.Errorf("mode: extension %s serves open rules only (this rule's mode is %s)", p.Name, r.Mode)
	}
	o := r.Spec.Open
	if o == nil || o.Protocol != p.Name {
		proto := "tcp"
		if o != nil {
			proto = o.Protocol
		}
		return nil, fmt.Errorf("open.protocol: extension %s serves open.protocol %s (this rule's is %s)", p.Name, p.Name, proto)
	}
	if o.HTTP != nil {
		return nil, fmt.Errorf("open.http: only with open.protocol http (this rule's protocol is extension %s)", p.Name)
	}
	if o.TCP != nil && o.TCP.MaxBytesOut != nil {
		return nil, fmt.Errorf("open.tcp.maxBytesOut: extension %s does not enforce byte budgets (remove it, or enforce the budget in the extension)", p.Name)
	}
	return nil, nil
}

func (p *Proxy) logger() *slog.Logger {
	if p.Logger != nil {
		return p.Logger
	}
	return slog.Default()
}

func orDuration(v, d time.Duration) time.Duration {
	if v <= 0 {
		return d
	}
	return v
}

func (p *Proxy) answerTimeout() time.Duration {
	return orDuration(p.AnswerTimeout, DefaultAnswerTimeout)
}
func (p *Proxy) closeTimeout() time.Duration { return orDuration(p.CloseTimeout, DefaultCloseTimeout) }

// ServeStream hands c to the extension and follows the flow until the
// extension reports its end, ctx is done (the extension is told to close
// it) or the control connection is lost (the extension must then close
// it). A flow the extension does not take is reset, and Result.Err is a
// *FlowError. An extension that does not report ends (hello.reports_end
// false) has the flow to itself once it accepts: ServeStream then returns
// EndClosed at once.
//
// c must be the accepted connection itself (a *net.TCPConn, or another
// syscall.Conn), with nothing read from it: the extension gets the
// socket, not c, so bytes a wrapper had buffered would be lost.
func (p *Proxy) ServeStream(ctx context.Context, c net.Conn, f *proxies.Flow) proxies.Result {
	start := time.Now()
	deadline := start.Add(p.answerTimeout())
	if !p.take() {
		return p.refuse(c, f, 0, ErrBusy)
	}
	defer p.give()

	ctl, err := p.control(ctx, deadline)
	if err != nil {
		if ctx.Err() != nil {
			reset(c)
			return proxies.Result{End: proxies.EndRevoked, Err: context.Cause(ctx)}
		}
		return p.refuse(c, f, 0, err)
	}
	fs := &flowState{id: p.lastID.Add(1), report: f.Report, answer: make(chan answer, 1), end: make(chan proxies.Result, 1)}
	msg, err := encodeFlow(flowOut{
		Type: typeFlow, Version: Version, ID: fs.id,
		Sandbox: f.Sandbox, Rule: f.RuleName(), Mode: f.Mode(), Protocol: p.Name,
		Src: endpointOf(f.Src), Dst: endpointOf(f.Dst), Hosts: f.Hosts,
	})
	if err != nil {
		// A sandbox id or rule name too long for a message: nothing the
		// extension could fix, and nothing it was sent.
		return p.refuse(c, f, fs.id, fmt.Errorf("%w: %v", ErrProtocol, err))
	}
	if err := ctl.register(fs); err != nil {
		return p.refuse(c, f, fs.id, err)
	}
	if err := ctl.sendFlow(msg, c, deadline); err != nil {
		ctl.abandon(fs, false)
		return p.refuse(c, f, fs.id, err)
	}

	// Wait for the answer. The proxy keeps its descriptor until then, so
	// that it can still reset the flow.
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	var a answer
	select {
	case a = <-fs.answer:
	case <-ctl.dead:
		select {
		case a = <-fs.answer: // answered just before the connection died
		default:
			return p.refuse(c, f, fs.id, ctl.err)
		}
	case <-timer.C:
		if ctl.abandon(fs, false) {
			r := p.refuse(c, f, fs.id, ErrTimeout)
			ctl.sendClose(fs.id, closeTimeout)
			return r
		}
		a = <-fs.answer
	case <-ctx.Done():
		if ctl.abandon(fs, false) {
			reset(c)
			ctl.sendClose(fs.id, closeRevoked)
			return proxies.Result{End: proxies.EndRevoked, Err: context.Cause(ctx)}
		}
		a = <-fs.answer
	}
	if !a.accepted {
		return p.refuseAs(c, f, fs.id, ReasonRefusedPrefix+a.reason, fmt.Errorf("%w: %s", ErrRefused, a.reason))
	}
	// The extension holds its own descriptor now: closing the proxy's
	// leaves the connection to it.
	c.Close()
	if !ctl.reportsEnd {
		return proxies.Result{End: proxies.EndClosed}
	}

	select {
	case r := <-fs.end:
		return r
	case <-ctl.dead:
		select {
		case r := <-fs.end:
			return r
		default:
		}
		return proxies.Result{End: proxies.EndError, Err: ctl.err}
	case <-ctx.Done():
		if !ctl.abandon(fs, true) {
			return <-fs.end
		}
		ctl.sendClose(fs.id, closeRevoked)
		return proxies.Result{End: proxies.EndRevoked, Err: context.Cause(ctx)}
	}
}

// refuse resets c: the extension is unavailable (err says how).
func (p *Proxy) refuse(c net.Conn, f *proxies.Flow, id uint64, err error) proxies.Result {
	return p.refuseAs(c, f, id, ReasonUnavailable, err)
}

// refuseAs resets c, reports the refusal (a deny event: counted and
// audited like every other) and returns its result.
func (p *Proxy) refuseAs(c net.Conn, f *proxies.Flow, id uint64, reason string, err error) proxies.Result {
	reset(c)
	fe := &FlowError{Reason: reason, Err: err}
	var detail string
	if reason == ReasonUnavailable {
		detail = causeToken(err)
	}
	f.Report.Deny(proxies.Denial{Reason: fe.Reason, Detail: detail})
	log := p.logger().With(logExtension, p.Name)
	if id != 0 { // 0: reset before an id was given
		log = log.With(logID, id)
	}
	log.Debug("flow reset", logSandbox, f.Sandbox, logRule, f.RuleName(), logDst, f.Dst, logReason, fe.Reason, logError, err)
	return proxies.Result{End: proxies.EndError, Err: fe}
}

// take counts a flow in, unless MaxFlows are in flight.
func (p *Proxy) take() bool {
	max := p.MaxFlows
	if max <= 0 {
		max = DefaultMaxFlows
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.inFlight >= max {
		return false
	}
	p.inFlight++
	return true
}

func (p *Proxy) give() {
	p.mu.Lock()
	p.inFlight--
	p.mu.Unlock()
}

// Connect dials the extension now unless a control connection is up, and
// says whether it answered. Flows dial by themselves; the daemon may call
// this at start to log an extension that is not there yet.
func (p *Proxy) Connect(ctx context.Context) error {
	_, err := p.control(ctx, time.Now().Add(p.answerTimeout()))
	return err
}

// Close drops the control connection: flows in flight end, and new ones
// are refused (ErrClosed). The extension closes the flows it holds.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	ctl := p.ctl
	p.mu.Unlock()
	if ctl != nil {
		ctl.fail(ErrClosed)
	}
	return nil
}

// control returns the live control connection, dialling one if there is
// none: at most one dial at a time (the others wait for it), none before
// the backoff has passed, and none that could not finish by deadline.
func (p *Proxy) control(ctx context.Context, deadline time.Time) (*control, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	if p.ctl != nil {
		ctl := p.ctl
		p.mu.Unlock()
		return ctl, nil
	}
	d := p.dialing
	if d == nil {
		wait := time.Until(p.notBefore)
		if wait > 0 && time.Now().Add(wait).After(deadline) {
			p.mu.Unlock()
			return nil, fmt.Errorf("%w (next dial in %v)", ErrNotListening, wait.Round(time.Millisecond))
		}
		d = &dialing{done: make(chan struct{})}
		p.dialing = d
		p.mu.Unlock()
		go p.dial(d, wait, deadline)
	} else {
		p.mu.Unlock()
	}
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case <-d.done:
		return d.c, d.err
	case <-timer.C:
		return nil, ErrTimeout
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

// dial runs one dial (after wait) and publishes its outcome. It runs on a
// goroutine of its own so that the flow that started it may give up
// without abandoning the others that wait for it.
func (p *Proxy) dial(d *dialing, wait time.Duration, deadline time.Time) {
	if wait > 0 {
		time.Sleep(wait) // the backoff: bounded by MaxBackoff and by deadline
	}
	c, err := dialControl(p, deadline)
	log := p.logger()
	p.mu.Lock()
	p.dialing = nil
	switch {
	case err == nil && p.closed:
		err = ErrClosed
	case err == nil:
		p.ctl = c
		p.backoff = 0
		p.notBefore = time.Time{}
		p.down = false
		go c.readLoop()
	default:
		retry := p.bumpBackoff()
		if !p.down {
			log.Warn("extension unavailable", logExtension, p.Name, logPath, p.Path, logError, err, logRetry, retry)
		} else {
			log.Debug("extension still unavailable", logExtension, p.Name, logPath, p.Path, logError, err, logRetry, retry)
		}
		p.down = true
	}
	d.c, d.err = c, err
	p.mu.Unlock()
	if err == nil {
		log.Info("extension connected", logExtension, p.Name, logPath, p.Path)
	} else if c != nil {
		c.uc.Close()
	}
	close(d.done)
}

// bumpBackoff sets the wait before the next dial after a failure and
// returns it. p.mu is held.
func (p *Proxy) bumpBackoff() time.Duration {
	lo := orDuration(p.MinBackoff, DefaultMinBackoff)
	hi := orDuration(p.MaxBackoff, DefaultMaxBackoff)
	p.backoff = min(max(2*p.backoff, lo), hi)
	p.notBefore = time.Now().Add(p.backoff)
	return p.backoff
}

// lost forgets c as the live connection after it failed.
func (p *Proxy) lost(c *control, err error) {
	p.mu.Lock()
	live := p.ctl == c
	var retry time.Duration
	if live {
		p.ctl = nil
		retry = p.bumpBackoff()
	}
	p.mu.Unlock()
	if live && !errors.Is(err, ErrClosed) {
		p.logger().Warn("extension connection lost", logExtension, p.Name, logPath, p.Path, logError, err, logRetry, retry)
	}
}
