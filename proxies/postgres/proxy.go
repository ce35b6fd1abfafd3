package postgres

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

// Key is the registry key of this proxy.
var Key = proxies.Key{Mode: "open", Protocol: "postgres"}

// Defaults of a zero Proxy.
const (
	DefaultConnectTimeout = 10 * time.Second
	// MaxMessageBytes bounds one message from the sandbox; a larger one is
	// answered with an error and the connection closed.
	MaxMessageBytes = 1 << 20
)

// DialFunc connects to a flow's original destination (network "tcp").
// The daemon supplies one whose traffic the datapath does not redirect
// again.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// Proxy serves the flows of open postgres rules. Create it with New.
type Proxy struct {
	dial    DialFunc
	metrics *Metrics
	log     *slog.Logger
	// ConnectTimeout bounds the upstream connection and login; zero means
	// DefaultConnectTimeout.
	ConnectTimeout time.Duration
	// IdleTimeout ends a session whose sandbox sent nothing for that long
	// while no statement ran (EndIdle); zero means never.
	IdleTimeout time.Duration

	mu      sync.Mutex
	cancels map[cancelKey]*cancelTarget
}

// New returns a proxy that connects upstream with dial (nil: a
// net.Dialer), records into m (nil: nothing) and logs to log (nil: discard).
func New(dial DialFunc, m *Metrics, log *slog.Logger) *Proxy {
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Proxy{dial: dial, metrics: m, log: log, cancels: map[cancelKey]*cancelTarget{}}
}

// Configure reads the rule's upstream login and parses its statements.
func (p *Proxy) Configure(r *policy.Rule) (any, error) {
	return configure(r)
}

// cancelKey is the key the proxy gave a sandbox's connection
// (BackendKeyData); cancelTarget is where a CancelRequest with it goes.
type cancelKey struct {
	pid    uint32
	secret [4]byte
}

type cancelTarget struct {
	sandbox string
	addr    string
	pid     uint32
	secret  []byte
	tls     *tls.Config
}

// Field names of log records.
const (
	logRule    = "rule"
	logSandbox = "sandbox"
	logErr     = "err"
)

// ServeStream serves one sandbox connection.
func (p *Proxy) ServeStream(ctx context.Context, c net.Conn, f *proxies.Flow) proxies.Result {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	cfg, ok := f.Config.(*ruleConfig)
	if !ok || cfg == nil {
		return proxies.Result{End: proxies.EndError, Err: fmt.Errorf("postgres proxy: rule %q was not configured by this proxy", f.RuleName())}
	}
	sc := &countConn{Conn: c}
	defer func() { f.Report.Bytes(sc.read.Swap(0), sc.written.Swap(0)) }()
	be := pgproto3.NewBackend(sc, sc)
	be.SetMaxBodyLen(MaxMessageBytes)

	startup, err := p.startup(ctx, be, sc, f)
	if err != nil || startup == nil {
		return proxies.ResultOf(ctx, err)
	}
	up, err := p.connect(ctx, cfg, f, startup)
	if err != nil {
		p.log.Warn("connecting upstream", logRule, cfg.rule, logSandbox, f.Sandbox, logErr, err)
		be.Send(&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: "08006",
			Message: "cleanwall: the database cannot be reached or refused the proxy's login"})
		be.Flush()
		return proxies.ResultOf(ctx, fmt.Errorf("connecting upstream: %w", err))
	}
	defer up.Conn.Close()
	stopUp := context.AfterFunc(ctx, func() { up.Conn.Close() })
	defer stopUp()

	key := p.register(f, cfg, up)
	defer p.unregister(key)

	be.Send(&pgproto3.AuthenticationOk{})
	names := make([]string, 0, len(up.ParameterStatuses))
	for n := range up.ParameterStatuses {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		be.Send(sandboxStatus(&pgproto3.ParameterStatus{Name: n, Value: up.ParameterStatuses[n]}, startup))
	}
	be.Send(&pgproto3.BackendKeyData{ProcessID: key.pid, SecretKey: key.secret[:]})
	be.Send(&pgproto3.ReadyForQuery{TxStatus: up.TxStatus})
	if err := be.Flush(); err != nil {
		return proxies.ResultOf(ctx, err)
	}
	s := &session{p: p, cfg: cfg, flow: f, be: be, fe: up.Frontend, sc: sc, startup: startup,
		statements: map[string]*prepared{}, portals: map[string]*portal{}}
	return proxies.ResultOf(ctx, s.serve(), proxies.EndFor{Err: os.ErrDeadlineExceeded, End: proxies.EndIdle})
}

// sandboxStatus is the ParameterStatus the sandbox sees: the upstream's,
// except session_authorization (the upstream user's name), which says the
// name the sandbox logged in with.
func sandboxStatus(m *pgproto3.ParameterStatus, sm *pgproto3.StartupMessage) *pgproto3.ParameterStatus {
	if strings.EqualFold(m.Name, "session_authorization") {
		return &pgproto3.ParameterStatus{Name: m.Name, Value: sm.Parameters["user"]}
	}
	return m
}

// startup answers SSLRequest and GSSENCRequest with N until the sandbox
// sends its StartupMessage (nil when it sent a CancelRequest instead,
// which startup has served).
func (p *Proxy) startup(ctx context.Context, be *pgproto3.Backend, sc *countConn, f *proxies.Flow) (*pgproto3.StartupMessage, error) {
	for range 4 {
		msg, err := be.ReceiveStartupMessage()
		if err != nil {
			return nil, fmt.Errorf("reading the startup message: %w", err)
		}
		switch m := msg.(type) {
		case *pgproto3.SSLRequest, *pgproto3.GSSEncRequest:
			if _, err := sc.Write([]byte{'N'}); err != nil {
				return nil, err
			}
		case *pgproto3.CancelRequest:
			p.cancel(ctx, m, f)
			return nil, nil
		case *pgproto3.StartupMessage:
			if m.ProtocolVersion != pgproto3.ProtocolVersion30 {
				// The upstream session speaks 3.0: so does the sandbox's.
				var opts []string
				for k := range m.Parameters {
					if strings.HasPrefix(k, "_pq_.") {
						opts = append(opts, k)
					}
				}
				be.Send(&pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0, UnrecognizedOptions: opts})
			}
			return m, nil
		}
	}
	return nil, errors.New("too many startup negotiation requests")
}

// passedParams are the startup parameters of the sandbox's that reach
// the upstream session (lowercase); the others are dropped ("options"
// could set anything).
var passedParams = map[string]string{"application_name": "application_name", "datestyle": "DateStyle",
	"timezone": "TimeZone", "intervalstyle": "IntervalStyle", "extra_float_digits": "extra_float_digits"}

// connect logs in upstream and takes the connection over.
func (p *Proxy) connect(ctx context.Context, cfg *ruleConfig, f *proxies.Flow, sm *pgproto3.StartupMessage) (*pgconn.HijackedConn, error) {
	// ParseConfig reads PG* environment variables and files: everything it
	// could have taken from them is overwritten below.
	pc, err := pgconn.ParseConfig("sslmode=disable")
	if err != nil {
		return nil, err
	}
	pc.Host = f.Dst.Addr().Unmap().String()
	pc.Port = f.Dst.Port()
	pc.Database = cfg.database
	pc.User = cfg.user
	pc.Password = cfg.password
	pc.Fallbacks = nil
	pc.TLSConfig = nil
	pc.KerberosSrvName, pc.KerberosSpn = "", ""
	if cfg.tls != nil {
		pc.TLSConfig = cfg.tls.Config(cfg.tls.ServerNameFor(firstHost(f.Hosts), f.Dst))
	}
	pc.DialFunc = pgconn.DialFunc(p.dial)
	pc.LookupFunc = func(ctx context.Context, host string) ([]string, error) { return []string{host}, nil }
	pc.ConnectTimeout = p.ConnectTimeout
	if pc.ConnectTimeout == 0 {
		pc.ConnectTimeout = DefaultConnectTimeout
	}
	pc.RuntimeParams = map[string]string{"client_encoding": "UTF8", "standard_conforming_strings": "on"}
	for k, v := range sm.Parameters {
		if name, ok := passedParams[strings.ToLower(k)]; ok {
			pc.RuntimeParams[name] = v
		}
	}
	conn, err := pgconn.ConnectConfig(ctx, pc)
	if err != nil {
		return nil, err
	}
	if err := conn.SyncConn(ctx); err != nil {
		conn.Close(ctx)
		return nil, err
	}
	return conn.Hijack()
}

// register gives a connection its own cancel key.
func (p *Proxy) register(f *proxies.Flow, cfg *ruleConfig, up *pgconn.HijackedConn) cancelKey {
	t := &cancelTarget{sandbox: f.Sandbox, addr: net.JoinHostPort(f.Dst.Addr().Unmap().String(), strconv.Itoa(int(f.Dst.Port()))),
		pid: up.PID, secret: append([]byte(nil), up.SecretKey...)}
	if cfg.tls != nil {
		t.tls = cfg.tls.Config(cfg.tls.ServerNameFor(firstHost(f.Hosts), f.Dst))
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		var b [8]byte
		rand.Read(b[:])
		k := cancelKey{pid: binary.BigEndian.Uint32(b[:4]) &^ (1 << 31)}
		copy(k.secret[:], b[4:])
		if _, dup := p.cancels[k]; !dup && k.pid != 0 {
			p.cancels[k] = t
			return k
		}
	}
}

func (p *Proxy) unregister(k cancelKey) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.cancels, k)
}

// cancel forwards a CancelRequest with one of the proxy's keys to the
// upstream with the upstream's key. A key of another sandbox's does
// nothing (the sandbox learns nothing either way: PostgreSQL answers a
// CancelRequest with nothing).
func (p *Proxy) cancel(ctx context.Context, m *pgproto3.CancelRequest, f *proxies.Flow) {
	if len(m.SecretKey) != 4 {
		return
	}
	k := cancelKey{pid: m.ProcessID}
	copy(k.secret[:], m.SecretKey)
	p.mu.Lock()
	t := p.cancels[k]
	p.mu.Unlock()
	if t == nil || t.sandbox != f.Sandbox {
		return
	}
	ctx, done := context.WithTimeout(ctx, DefaultConnectTimeout)
	defer done()
	c, err := p.dial(ctx, "tcp", t.addr)
	if err != nil {
		p.log.Warn("forwarding a cancel request", logSandbox, f.Sandbox, logErr, err)
		return
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if t.tls != nil {
		req, _ := (&pgproto3.SSLRequest{}).Encode(nil)
		if _, err := c.Write(req); err != nil {
			return
		}
		var b [1]byte
		if _, err := c.Read(b[:]); err != nil || b[0] != 'S' {
			return
		}
		tc := tls.Client(c, t.tls)
		if err := tc.HandshakeContext(ctx); err != nil {
			return
		}
		c = tc
	}
	buf, err := (&pgproto3.CancelRequest{ProcessID: t.pid, SecretKey: t.secret}).Encode(nil)
	if err == nil {
		c.Write(buf)
	}
}

// countConn counts the bytes of the sandbox's connection.
type countConn struct {
	net.Conn
	read, written atomic.Int64
}

func (c *countConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.read.Add(int64(n))
	return n, err
}

func (c *countConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.written.Add(int64(n))
	return n, err
}

// firstHost is the first name a flow's destination was resolved from, ""
// for none.
func firstHost(hosts []string) string {
	if len(hosts) == 0 {
		return ""
	}
	return hosts[0]
}
