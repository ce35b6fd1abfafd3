package postgres

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

const (
	pgBin        = "/usr/lib/postgresql/15/bin"
	upstreamUser = "clinic_reader"
	upstreamPass = "upstream-secret-7f3a9c"
	canarySSN    = "CANARY-SSN-5f1e"
)

// server is a PostgreSQL started for the package's tests.
type server struct {
	dir  string
	port int
	log  string // the server's log file (log_statement=all)
	cmd  *exec.Cmd
	err  error
}

var (
	pgOnce   sync.Once
	pgServer server
)

func TestMain(m *testing.M) {
	code := m.Run()
	if pgServer.cmd != nil {
		pgServer.cmd.Process.Signal(syscall.SIGINT)
		pgServer.cmd.Wait()
		os.RemoveAll(pgServer.dir)
	}
	os.Exit(code)
}

// startPostgres starts the package's server on first use: initdb and
// postgres as the postgres user on loopback, a SCRAM login for the
// proxy, a table with canaries in its denied columns.
func startPostgres(t *testing.T) *server { return startPostgresB(t) }

func startPostgresB(t testing.TB) *server {
	t.Helper()
	testutil.RequireRoot(t) // PostgreSQL runs as the postgres user
	if _, err := os.Stat(filepath.Join(pgBin, "initdb")); err != nil {
		testutil.Skip(t, fmt.Sprintf("PostgreSQL 15 is not installed (%v): make deps", err))
	}
	pgOnce.Do(func() { pgServer.err = pgServer.start() })
	if pgServer.err != nil {
		t.Fatalf("starting PostgreSQL: %v", pgServer.err)
	}
	return &pgServer
}

func (s *server) start() error {
	u, err := user.Lookup("postgres")
	if err != nil {
		return err
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if s.dir, err = os.MkdirTemp("", "cleanwall-pg-"); err != nil {
		return err
	}
	if err := os.Chown(s.dir, uid, gid); err != nil {
		return err
	}
	as := func(name string, args ...string) *exec.Cmd {
		c := exec.Command(filepath.Join(pgBin, name), args...)
		c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
		c.Dir = s.dir
		return c
	}
	data := filepath.Join(s.dir, "data")
	if out, err := as("initdb", "-D", data, "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync").CombinedOutput(); err != nil {
		return fmt.Errorf("initdb: %v: %s", err, out)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	s.port = l.Addr().(*net.TCPAddr).Port
	l.Close()
	s.log = filepath.Join(s.dir, "server.log")
	logf, err := os.Create(s.log)
	if err != nil {
		return err
	}
	os.Chown(s.log, uid, gid)
	if err := s.writeTLS(uid, gid); err != nil {
		return err
	}
	s.cmd = as("postgres", "-D", data, "-k", s.dir, "-p", strconv.Itoa(s.port), "-c", "listen_addresses=127.0.0.1",
		"-c", "log_statement=all", "-c", "logging_collector=off", "-c", "fsync=off",
		"-c", "ssl=on", "-c", "ssl_cert_file="+filepath.Join(s.dir, "server.pem"), "-c", "ssl_key_file="+filepath.Join(s.dir, "server.key"))
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var admin *pgx.Conn
	for {
		admin, err = pgx.Connect(ctx, fmt.Sprintf("host=%s port=%d user=postgres dbname=postgres sslmode=disable", s.dir, s.port))
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return fmt.Errorf("waiting for the server: %w", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	defer admin.Close(ctx)
	seed := []string{
		"CREATE DATABASE clinic",
		"CREATE ROLE " + upstreamUser + " LOGIN PASSWORD '" + upstreamPass + "'",
	}
	for _, q := range seed {
		if _, err := admin.Exec(ctx, q); err != nil {
			return fmt.Errorf("%s: %w", q, err)
		}
	}
	db, err := pgx.Connect(ctx, fmt.Sprintf("host=%s port=%d user=postgres dbname=clinic sslmode=disable", s.dir, s.port))
	if err != nil {
		return err
	}
	defer db.Close(ctx)
	var b strings.Builder
	b.WriteString("CREATE TABLE patients (id int PRIMARY KEY, region text, age int, ssn text, name text);")
	b.WriteString("INSERT INTO patients SELECT i, CASE WHEN i <= 12 THEN 'north' WHEN i <= 24 THEN 'south' WHEN i <= 27 THEN 'east' ELSE 'west' END, 20 + i, '" + canarySSN + "-' || i, 'CANARY-NAME-' || i FROM generate_series(1, 28) i;")
	b.WriteString("GRANT SELECT ON patients TO " + upstreamUser + ";")
	if _, err := db.Exec(ctx, b.String()); err != nil {
		return fmt.Errorf("seeding: %w", err)
	}
	return nil
}

// writeTLS writes a CA (ca.pem), a server certificate for db.test
// signed by it (server.pem, server.key) and an unrelated CA (other-ca.pem).
func (s *server) writeTLS(uid, gid int) error {
	newCA := func(name string) (*x509.Certificate, *ecdsa.PrivateKey, []byte, error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, nil, nil, err
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			return nil, nil, nil, err
		}
		cert, err := x509.ParseCertificate(der)
		return cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), err
	}
	ca, caKey, caPEM, err := newCA("cleanwall test CA")
	if err != nil {
		return err
	}
	_, _, otherPEM, err := newCA("another CA")
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "db.test"}, DNSNames: []string{"db.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	for name, data := range map[string][]byte{
		"ca.pem": caPEM, "other-ca.pem": otherPEM,
		"server.pem": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		"server.key": pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	} {
		f := filepath.Join(s.dir, name)
		if err := os.WriteFile(f, data, 0o600); err != nil {
			return err
		}
		if err := os.Chown(f, uid, gid); err != nil {
			return err
		}
	}
	return nil
}

// serverLog is the server's log so far.
func (s *server) serverLog(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile(s.log)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// direct connects to the server as the upstream user, bypassing the proxy.
func (s *server) direct(t testing.TB) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(context.Background(), fmt.Sprintf("host=127.0.0.1 port=%d user=%s password=%s dbname=clinic sslmode=disable", s.port, upstreamUser, upstreamPass))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// reporter records what the proxy reports.
type reporter struct {
	mu      sync.Mutex
	out, in int64
	denials []proxies.Denial
}

func (r *reporter) Bytes(out, in int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.out += out
	r.in += in
}

func (r *reporter) Deny(d proxies.Denial) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.denials = append(r.denials, d)
}

func (r *reporter) reasons() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, d := range r.denials {
		out = append(out, d.Reason)
	}
	return out
}

// recConn records what the proxy sent to the sandbox.
type recConn struct {
	net.Conn
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *recConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	c.buf.Write(b)
	c.mu.Unlock()
	return c.Conn.Write(b)
}

// testProxy is the proxy serving one rule on a loopback listener, as the
// daemon would hand it the sandbox's flows.
type testProxy struct {
	addr    string
	proxy   *Proxy
	report  *reporter
	reg     *prometheus.Registry
	mu      sync.Mutex
	sandbox []*recConn
}

// postgresRule compiles an open postgres rule with the given
// open.postgres fields besides the login ones.
func postgresRule(t testing.TB, fields string) *policy.Rule {
	t.Helper()
	dir := t.TempDir()
	userFile, passFile := filepath.Join(dir, "user"), filepath.Join(dir, "password")
	os.WriteFile(userFile, []byte(upstreamUser+"\n"), 0o600)
	os.WriteFile(passFile, []byte(upstreamPass+"\n"), 0o600)
	doc := "apiVersion: cleanwall.dev/v1\nkind: EgressPolicy\nmetadata: {name: t}\nspec:\n  egress:\n" +
		"    - {name: warehouse, to: [{cidr: 127.0.0.1/32}], ports: [{port: 5432}], mode: open, open: {protocol: postgres, postgres: {" +
		"database: clinic, upstreamUserFile: " + userFile + ", upstreamPasswordFile: " + passFile + ", " + fields + "}}}\n"
	p, err := policy.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	c, err := policy.Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	return c.Rules[0]
}

func startProxy(t testing.TB, s *server, r *policy.Rule) *testProxy {
	t.Helper()
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	p := New(nil, m, testutil.Logger(t))
	cfg, err := p.Configure(r)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tp := &testProxy{addr: l.Addr().String(), proxy: p, report: &reporter{}, reg: reg}
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); l.Close(); wg.Wait() })
	dst := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(s.port))
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			rc := &recConn{Conn: c}
			tp.mu.Lock()
			tp.sandbox = append(tp.sandbox, rc)
			tp.mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				p.ServeStream(ctx, rc, &proxies.Flow{Sandbox: "sb1", Rule: r, Config: cfg, Dst: dst, Report: tp.report})
			}()
		}
	}()
	return tp
}

// connect is the sandbox's client: any user, any password.
func (tp *testProxy) connect(t testing.TB, mode pgx.QueryExecMode) *pgx.Conn {
	t.Helper()
	host, port, _ := net.SplitHostPort(tp.addr)
	cc, err := pgx.ParseConfig(fmt.Sprintf("host=%s port=%s user=sandbox password=whatever dbname=anything sslmode=prefer", host, port))
	if err != nil {
		t.Fatal(err)
	}
	cc.DefaultQueryExecMode = mode
	c, err := pgx.ConnectConfig(context.Background(), cc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// sent is everything the proxy sent to sandboxes.
func (tp *testProxy) sent() []byte {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	var all []byte
	for _, c := range tp.sandbox {
		c.mu.Lock()
		all = append(all, c.buf.Bytes()...)
		c.mu.Unlock()
	}
	return all
}
