package postgres

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// The rule of most tests: POLICY.md's shape over the seeded table.
const testQueries = `queries: [
	{name: by-age, sql: 'SELECT id, region FROM patients WHERE age > $1 ORDER BY id'},
	{name: cohort, sql: 'SELECT region, count(*) AS n FROM patients GROUP BY region ORDER BY region'},
	{name: with-ssn, sql: 'SELECT id, ssn FROM patients WHERE id = $1'},
	{name: everything, sql: 'SELECT * FROM patients WHERE id = $1'},
	{name: sleep, sql: 'SELECT pg_sleep($1)'}],
	columns: {deny: [ssn, name]}, rows: {maxRows: 20, minCount: {column: n, atLeast: 10}}`

var modes = []struct {
	name string
	mode pgx.QueryExecMode
}{
	{"simple", pgx.QueryExecModeSimpleProtocol},
	{"extended", pgx.QueryExecModeCacheStatement},
	{"describe", pgx.QueryExecModeDescribeExec},
}

func ids(t *testing.T, c *pgx.Conn, sql string, args ...any) []int32 {
	t.Helper()
	rows, err := c.Query(context.Background(), sql, args...)
	if err != nil {
		t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (int32, error) {
		var id int32
		var region string
		err := r.Scan(&id, &region)
		return id, err
	})
	if err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return out
}

// Allowed statements return what the database returns directly, whatever
// the literals, parameters, case and whitespace, in both protocols.
func TestAllowedQueries(t *testing.T) {
	s := startPostgres(t)
	tp := startProxy(t, s, postgresRule(t, testQueries))
	want := ids(t, s.direct(t), "SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 40)
	if len(want) != 8 {
		t.Fatalf("direct: %v", want)
	}
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			c := tp.connect(t, m.mode)
			for _, q := range []struct {
				sql  string
				args []any
			}{
				{"SELECT id, region FROM patients WHERE age > $1 ORDER BY id", []any{40}},
				{"select ID, REGION\n from patients where AGE > $1 order by id", []any{40}},
				{"SELECT id, region FROM patients WHERE age > 40 ORDER BY id", nil},
				{"SELECT id AS patient, region AS r FROM patients p WHERE age > 40 ORDER BY id", nil},
			} {
				if got := ids(t, c, q.sql, q.args...); !slices.Equal(got, want) {
					t.Errorf("%q: %v, want %v", q.sql, got, want)
				}
			}
			// Transaction control and client SETs run unlisted.
			tx, err := c.Begin(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.Exec(context.Background(), "SET application_name = 'x'"); err != nil {
				t.Fatal(err)
			}
			if got := ids(t, c, "SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 47); len(got) != 1 {
				t.Errorf("in a transaction: %v", got)
			}
			if err := tx.Commit(context.Background()); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// Every refusal is SQLSTATE 42501 naming the reason; the statement never
// reached the server; the connection stays usable; the flow reports it.
func TestRefusals(t *testing.T) {
	s := startPostgres(t)
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			tp := startProxy(t, s, postgresRule(t, testQueries))
			c := tp.connect(t, m.mode)
			for i, tc := range []struct {
				sql, reason, msg string
			}{
				{"SELECT ssn, 'marker-%d' FROM patients", ReasonNotListed, "not on the list"},
				{"SELECT id, region FROM patients WHERE age > 1 ORDER BY id; SELECT 'marker-%d'", ReasonMultiple, "more than one statement"},
				{"COPY (SELECT 'marker-%d') TO STDOUT", ReasonCopy, "COPY"},
				{"SELECT id, ssn FROM patients WHERE id = 'marker-%d'", ReasonDenied, `column "ssn" is denied`},
				{"SELECT id AS x, ssn AS y FROM patients WHERE id = 'marker-%d'", ReasonDenied, `column "ssn" is denied`},
				{"SELECT id, region AS name FROM patients WHERE age > 'marker-%d' ORDER BY id", ReasonDenied, `column "name" is denied`},
				{"SET search_path = 'marker-%d'", ReasonNotListed, "not on the list"},
			} {
				sql := fmt.Sprintf(tc.sql, i)
				marker := fmt.Sprintf("marker-%d", i)
				_, err := c.Exec(context.Background(), sql)
				var pe *pgconn.PgError
				if !errors.As(err, &pe) || pe.Code != "42501" || !strings.Contains(pe.Message, tc.msg) {
					t.Errorf("%q: %v, want 42501 %q", sql, err, tc.msg)
				}
				if strings.Contains(s.serverLog(t), marker) {
					t.Errorf("%q reached the server", sql)
				}
				if got := ids(t, c, "SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 47); len(got) != 1 {
					t.Errorf("after %q: %v", sql, got)
				}
				if r := tp.report.reasons(); len(r) == 0 || r[len(r)-1] != tc.reason {
					t.Errorf("%q: reported %v, want %s last", sql, r, tc.reason)
				}
			}
			tp.report.mu.Lock()
			for _, d := range tp.report.denials {
				if strings.Contains(d.Detail, "marker") {
					t.Errorf("a denial carries a literal: %+v", d)
				}
			}
			tp.report.mu.Unlock()
			if bytes.Contains(tp.sent(), []byte("CANARY")) {
				t.Error("a canary reached the sandbox")
			}
		})
	}
}

// A refused statement inside a transaction aborts it, as a failed
// statement would; one in a pipeline skips the rest until Sync.
func TestRefusalInTransactionAndPipeline(t *testing.T) {
	s := startPostgres(t)
	tp := startProxy(t, s, postgresRule(t, testQueries))
	c := tp.connect(t, pgx.QueryExecModeCacheStatement)
	ctx := context.Background()
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "SELECT 1"); err == nil {
		t.Fatal("SELECT 1 ran")
	}
	_, err = tx.Exec(ctx, "SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 1)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "25P02" {
		t.Fatalf("after a refusal in a transaction: %v, want 25P02 (aborted)", err)
	}
	tx.Rollback(ctx)

	b := &pgx.Batch{}
	b.Queue("SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 46)
	b.Queue("SELECT 'pipelined-marker'")
	b.Queue("SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 45)
	br := c.SendBatch(ctx, b)
	br.Close()
	if strings.Contains(s.serverLog(t), "pipelined-marker") {
		t.Error("the refused statement of a batch reached the server")
	}
	if got := ids(t, c, "SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 47); len(got) != 1 {
		t.Errorf("after the batch: %v", got)
	}
}

// A denied column that only the result names (SELECT *) fails the
// statement: no description and no row reach the sandbox.
func TestDeniedColumnInResult(t *testing.T) {
	s := startPostgres(t)
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			tp := startProxy(t, s, postgresRule(t, testQueries))
			c := tp.connect(t, m.mode)
			_, err := c.Exec(context.Background(), "SELECT * FROM patients WHERE id = 3")
			var pe *pgconn.PgError
			if !errors.As(err, &pe) || pe.Code != "42501" || !strings.Contains(pe.Message, `column "ssn" is denied`) {
				t.Fatalf("SELECT *: %v", err)
			}
			if got := ids(t, c, "SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 47); len(got) != 1 {
				t.Errorf("after: %v", got)
			}
			if bytes.Contains(tp.sent(), []byte("CANARY")) {
				t.Error("a canary reached the sandbox")
			}
		})
	}
}

// Past maxRows the statement fails with 42501; the connection stays usable.
func TestMaxRows(t *testing.T) {
	s := startPostgres(t)
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			tp := startProxy(t, s, postgresRule(t, testQueries))
			c := tp.connect(t, m.mode)
			rows, _ := c.Query(context.Background(), "SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 0)
			n := 0
			for rows.Next() {
				n++
			}
			var pe *pgconn.PgError
			if err := rows.Err(); !errors.As(err, &pe) || pe.Code != "42501" || !strings.Contains(pe.Message, "more than 20 rows") {
				t.Fatalf("28 rows with maxRows 20: %v", err)
			}
			if n > 20 {
				t.Errorf("the sandbox got %d rows", n)
			}
			if got := ids(t, c, "SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 47); len(got) != 1 {
				t.Errorf("after: %v", got)
			}
			if r := tp.report.reasons(); !slices.Contains(r, ReasonMaxRows) {
				t.Errorf("reported %v", r)
			}
		})
	}
}

// Groups below minCount never reach the sandbox, whatever it calls the
// count column; the command tag counts only what it got.
func TestMinCount(t *testing.T) {
	s := startPostgres(t)
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			tp := startProxy(t, s, postgresRule(t, testQueries))
			c := tp.connect(t, m.mode)
			for _, sql := range []string{
				"SELECT region, count(*) AS n FROM patients GROUP BY region ORDER BY region",
				"SELECT region AS n, count(*) AS how_many FROM patients GROUP BY region ORDER BY region",
				"SELECT region, count(*) FROM patients GROUP BY region ORDER BY region",
			} {
				rows, err := c.Query(context.Background(), sql)
				if err != nil {
					t.Fatal(err)
				}
				var got []string
				for rows.Next() {
					var region string
					var n int64
					if err := rows.Scan(&region, &n); err != nil {
						t.Fatal(err)
					}
					got = append(got, fmt.Sprintf("%s=%d", region, n))
				}
				if err := rows.Err(); err != nil {
					t.Fatal(err)
				}
				if tag := rows.CommandTag(); !slices.Equal(got, []string{"north=12", "south=12"}) || tag.RowsAffected() != 2 {
					t.Errorf("%q: %v (tag %q), want north=12 south=12 (east 3 and west 1 withheld)", sql, got, tag)
				}
			}
			m := tp.proxy.metrics
			if w, r := testutil.ToFloat64(m.withheld.WithLabelValues("warehouse", "cohort")), testutil.ToFloat64(m.rows.WithLabelValues("warehouse", "cohort")); w != 6 || r != 6 {
				t.Errorf("metrics: %v rows withheld, %v returned; want 6 and 6", w, r)
			}
			if a := testutil.ToFloat64(m.statements.WithLabelValues("warehouse", "cohort", "allowed", "")); a != 3 {
				t.Errorf("metrics: %v statements allowed, want 3", a)
			}
		})
	}
}

// The sandbox cancels a running statement with the proxy's key; the
// proxy forwards the upstream's.
func TestCancelRequest(t *testing.T) {
	s := startPostgres(t)
	tp := startProxy(t, s, postgresRule(t, testQueries))
	c := tp.connect(t, pgx.QueryExecModeCacheStatement)
	done := make(chan struct{})
	go func() {
		// Again until the statement returns: a cancel that arrives before
		// the statement runs cancels nothing.
		for {
			select {
			case <-done:
				return
			case <-time.After(300 * time.Millisecond):
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			c.PgConn().CancelRequest(ctx)
			cancel()
		}
	}()
	start := time.Now()
	_, err := c.Exec(context.Background(), "SELECT pg_sleep($1)", 10)
	close(done)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57014" {
		t.Fatalf("pg_sleep(10): %v, want 57014 (canceled)", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("canceled after %v", d)
	}
}

// The sandbox never sees the upstream login, in any byte it receives.
func TestSandboxNeverSeesTheLogin(t *testing.T) {
	s := startPostgres(t)
	tp := startProxy(t, s, postgresRule(t, testQueries))
	for _, m := range modes {
		c := tp.connect(t, m.mode)
		ids(t, c, "SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 40)
		c.Exec(context.Background(), "SELECT current_user")
	}
	sent := tp.sent()
	if len(sent) == 0 {
		t.Fatal("recorded nothing")
	}
	for _, secret := range []string{upstreamPass, upstreamUser} {
		if bytes.Contains(sent, []byte(secret)) {
			t.Errorf("the sandbox received %q", secret)
		}
	}
	tp.mu.Lock()
	for _, c := range tp.sandbox {
		c.Close() // the flows end and report their last bytes
	}
	tp.mu.Unlock()
	time.Sleep(100 * time.Millisecond)
	tp.report.mu.Lock()
	defer tp.report.mu.Unlock()
	if tp.report.in == 0 || tp.report.out == 0 {
		t.Errorf("bytes reported: out %d in %d", tp.report.out, tp.report.in)
	}
}

// rawConn speaks the protocol to the proxy directly, for what client
// libraries do not send.
func rawConn(t *testing.T, tp *testProxy) (*pgproto3.Frontend, net.Conn) {
	t.Helper()
	nc, err := net.Dial("tcp", tp.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	fe := pgproto3.NewFrontend(nc, nc)
	fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: map[string]string{"user": "x"}})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	until(t, fe, 'Z')
	return fe, nc
}

// until reads messages up to one of type typ; it returns the error
// responses on the way.
func until(t *testing.T, fe *pgproto3.Frontend, typ byte) []*pgproto3.ErrorResponse {
	t.Helper()
	var errs []*pgproto3.ErrorResponse
	for {
		msg, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		if e, ok := msg.(*pgproto3.ErrorResponse); ok {
			c := *e
			errs = append(errs, &c)
		}
		b, _ := msg.Encode(nil)
		if b[0] == typ {
			return errs
		}
	}
}

// The function-call message is refused; a message past the size limit
// closes the connection with an error.
func TestFunctionCallAndMessageSize(t *testing.T) {
	s := startPostgres(t)
	tp := startProxy(t, s, postgresRule(t, testQueries))
	fe, _ := rawConn(t, tp)
	fe.Send(&pgproto3.FunctionCall{Function: 1598, ResultFormatCode: 0}) // random()
	fe.Flush()
	errs := until(t, fe, 'Z')
	if len(errs) != 1 || errs[0].Code != "42501" || !strings.Contains(errs[0].Message, "function-call") {
		t.Fatalf("function call: %+v", errs)
	}
	fe.Send(&pgproto3.Query{String: "SELECT id, region FROM patients WHERE age > 47 ORDER BY id"})
	fe.Flush()
	if errs := until(t, fe, 'Z'); len(errs) != 0 {
		t.Fatalf("after the function call: %+v", errs)
	}

	fe.Send(&pgproto3.Query{String: "SELECT '" + strings.Repeat("x", MaxMessageBytes) + "'"})
	fe.Flush()
	msg, err := fe.Receive()
	if e, ok := msg.(*pgproto3.ErrorResponse); err != nil || !ok || e.Code != "54000" {
		t.Fatalf("an oversized message: %T %v", msg, err)
	}
	if _, err := fe.Receive(); err == nil {
		t.Fatal("the connection stayed open")
	}
}

// Unnamed statements: a refused Parse drops the previous unnamed
// statement, as PostgreSQL's failed Parse does.
func TestRefusedParseDropsUnnamedStatement(t *testing.T) {
	s := startPostgres(t)
	tp := startProxy(t, s, postgresRule(t, testQueries))
	fe, _ := rawConn(t, tp)
	fe.Send(&pgproto3.Parse{Query: "SELECT id, region FROM patients WHERE age > $1 ORDER BY id"})
	fe.Send(&pgproto3.Sync{})
	fe.Send(&pgproto3.Parse{Query: "SELECT id, ssn, name FROM patients"})
	fe.Send(&pgproto3.Sync{})
	fe.Send(&pgproto3.Bind{Parameters: [][]byte{[]byte("0")}})
	fe.Send(&pgproto3.Execute{})
	fe.Send(&pgproto3.Sync{})
	fe.Flush()
	if errs := until(t, fe, 'Z'); len(errs) != 0 {
		t.Fatalf("parse: %+v", errs)
	}
	if errs := until(t, fe, 'Z'); len(errs) != 1 || errs[0].Code != "42501" {
		t.Fatalf("refused parse: %+v", errs)
	}
	errs := until(t, fe, 'Z')
	if len(errs) != 1 || errs[0].Code != "26000" {
		t.Fatalf("bind of the unnamed statement after a refused parse: %+v, want 26000", errs)
	}
}

// maxRows counts a portal's rows over all its Executes: fetching in
// chunks does not escape it.
func TestMaxRowsAcrossExecutes(t *testing.T) {
	s := startPostgres(t)
	tp := startProxy(t, s, postgresRule(t, testQueries))
	fe, _ := rawConn(t, tp)
	fe.Send(&pgproto3.Query{String: "BEGIN"})
	fe.Flush()
	until(t, fe, 'Z')
	fe.Send(&pgproto3.Parse{Name: "s", Query: "SELECT id, region FROM patients WHERE age > $1 ORDER BY id"})
	fe.Send(&pgproto3.Bind{DestinationPortal: "p", PreparedStatement: "s", Parameters: [][]byte{[]byte("0")}})
	fe.Send(&pgproto3.Execute{Portal: "p", MaxRows: 15})
	fe.Send(&pgproto3.Flush{})
	fe.Flush()
	rows := 0
	for {
		msg, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := msg.(*pgproto3.DataRow); ok {
			rows++
		}
		if _, ok := msg.(*pgproto3.PortalSuspended); ok {
			break
		}
		if e, ok := msg.(*pgproto3.ErrorResponse); ok {
			t.Fatalf("first chunk: %s", e.Message)
		}
	}
	fe.Send(&pgproto3.Execute{Portal: "p", MaxRows: 15})
	fe.Send(&pgproto3.Sync{})
	fe.Flush()
	for {
		msg, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		switch m := msg.(type) {
		case *pgproto3.DataRow:
			rows++
		case *pgproto3.ErrorResponse:
			if m.Code != "42501" || !strings.Contains(m.Message, "rows.maxRows") {
				t.Fatalf("second chunk: %s %s", m.Code, m.Message)
			}
		case *pgproto3.ReadyForQuery:
			if rows != 20 {
				t.Fatalf("the sandbox got %d rows, maxRows is 20", rows)
			}
			return
		}
	}
}

// upstreamTLS: the proxy verifies the server (CA and name) and logs in
// over TLS; a server its CA did not sign is refused, and the sandbox gets
// a FATAL error instead of a session.
func TestUpstreamTLS(t *testing.T) {
	s := startPostgres(t)
	good := startProxy(t, s, postgresRule(t, testQueries+", upstreamTLS: {caFile: "+s.dir+"/ca.pem, serverName: db.test, minVersion: '1.3'}"))
	c := good.connect(t, pgx.QueryExecModeCacheStatement)
	if got := ids(t, c, "SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 47); len(got) != 1 {
		t.Fatalf("over TLS: %v", got)
	}
	for name, tlsField := range map[string]string{
		"another CA": "upstreamTLS: {caFile: " + s.dir + "/other-ca.pem, serverName: db.test}",
		"wrong name": "upstreamTLS: {caFile: " + s.dir + "/ca.pem, serverName: other.test}",
	} {
		bad := startProxy(t, s, postgresRule(t, testQueries+", "+tlsField))
		host, port, _ := net.SplitHostPort(bad.addr)
		_, err := pgx.Connect(context.Background(), fmt.Sprintf("host=%s port=%s user=x sslmode=disable", host, port))
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "08006" {
			t.Errorf("%s: %v, want 08006", name, err)
		}
	}
}

// A session the sandbox leaves idle ends after IdleTimeout, as idle.
func TestIdleTimeout(t *testing.T) {
	s := startPostgres(t)
	tp := startProxy(t, s, postgresRule(t, testQueries))
	tp.proxy.IdleTimeout = 200 * time.Millisecond
	c := tp.connect(t, pgx.QueryExecModeCacheStatement)
	ids(t, c, "SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 47)
	time.Sleep(500 * time.Millisecond)
	if _, err := c.Exec(context.Background(), "SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 47); err == nil {
		t.Fatal("the idle session still runs statements")
	}
}
