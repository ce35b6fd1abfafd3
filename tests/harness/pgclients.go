package harness

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/cleanwall/cleanwall/internal/testutil"
)

// Real PostgreSQL clients run inside a namespace (a sandbox's, or a
// direct sandbox's for the reference answers): psql, a pgx program and
// Python's psycopg and psycopg2. Each runs a list of queries on one
// connection and reports every query as a PGResult, so a test compares
// what each client got through cleanwall with what it gets directly.

// PGClient names a client.
type PGClient string

const (
	PGClientPsql     PGClient = "psql"     // Debian's psql 15, the simple protocol
	PGClientPgx      PGClient = "pgx"      // pgx v5, named stmtcache_* statements
	PGClientPgxExec  PGClient = "pgx-exec" // pgx v5, unnamed statements
	PGClientPsycopg  PGClient = "psycopg"  // psycopg 3, server-side binding
	PGClientPsycopg2 PGClient = "psycopg2" // psycopg2, literals interpolated by the client
)

// PGClients are every client, in a fixed order.
var PGClients = []PGClient{PGClientPsql, PGClientPgx, PGClientPgxExec, PGClientPsycopg, PGClientPsycopg2}

// PGQuery is one statement to run: SQL with $1, $2 placeholders (each
// client writes them its own way: psql gets literals, psycopg %s) and
// the parameters (numbers or strings).
type PGQuery struct {
	Name   string `json:"name"`
	SQL    string `json:"sql"`
	Params []any  `json:"params,omitempty"`
}

// PGResult is what a client got for one query: columns and rows as text
// (nil for NULL; psql shows NULL as an empty string), or a failure's
// SQLSTATE and message.
type PGResult struct {
	Name     string      `json:"name"`
	Columns  []string    `json:"columns"`
	Rows     [][]*string `json:"rows"`
	SQLState string      `json:"sqlstate,omitempty"`
	Error    string      `json:"error,omitempty"`
}

// RowStrings renders the rows one line each, fields joined by "|".
func (r PGResult) RowStrings() []string {
	out := make([]string, 0, len(r.Rows))
	for _, row := range r.Rows {
		f := make([]string, len(row))
		for i, v := range row {
			if v != nil {
				f[i] = *v
			}
		}
		out = append(out, strings.Join(f, "|"))
	}
	return out
}

// PGConn is where and as whom a client connects.
type PGConn struct {
	Host     string
	Port     int
	User     string
	Password string // empty: none
	Database string
}

// DSN is the connection's libpq key-value string (no TLS).
func (c PGConn) DSN() string {
	s := fmt.Sprintf("host=%s port=%d user=%s dbname=%s sslmode=disable connect_timeout=10", c.Host, c.Port, c.User, c.Database)
	if c.Password != "" {
		s += " password=" + c.Password
	}
	return s
}

// Conn is how a client logs in to p directly, with its credentials.
func (p *Postgres) Conn() PGConn {
	return PGConn{Host: p.Addr.Addr().String(), Port: int(p.Addr.Port()), User: p.User, Password: p.Password, Database: p.Database}
}

// PGClientRun is one client run: the results and everything it printed.
type PGClientRun struct {
	Results []PGResult
	Output  string // stdout and stderr as printed
}

// Result returns the result of the query called name.
func (r PGClientRun) Result(name string) (PGResult, bool) {
	for _, x := range r.Results {
		if x.Name == name {
			return x, true
		}
	}
	return PGResult{}, false
}

var (
	pgxOnce sync.Once
	pgxBin  string
	pgxErr  error
)

// pgxClient builds tests/harness/pgclient once per test process.
func pgxClient(t testing.TB) string {
	t.Helper()
	pgxOnce.Do(func() {
		root, err := moduleRoot()
		if err != nil {
			pgxErr = err
			return
		}
		dir, err := os.MkdirTemp("", "cleanwall-pgclient-")
		if err != nil {
			pgxErr = err
			return
		}
		pgxBin = filepath.Join(dir, "pgclient")
		cmd := exec.Command("go", "build", "-o", pgxBin, "./tests/harness/pgclient")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			pgxErr = fmt.Errorf("go build ./tests/harness/pgclient: %v\n%s", err, out)
		}
	})
	if pgxErr != nil {
		t.Fatal(pgxErr)
	}
	return pgxBin
}

// RunPG runs client inside the sandbox's namespace (ip netns exec) with
// the queries on one connection. A client that cannot connect or dies
// fails the test.
func (s *Sandbox) RunPG(t testing.TB, client PGClient, c PGConn, queries []PGQuery) PGClientRun {
	t.Helper()
	run, err := s.TryRunPG(t, client, c, queries)
	if err != nil {
		t.Fatalf("%s in %s: %v\n%s", client, s.Name, err, run.Output)
	}
	return run
}

// TryRunPG is RunPG returning the client's failure.
func (s *Sandbox) TryRunPG(t testing.TB, client PGClient, c PGConn, queries []PGQuery) (PGClientRun, error) {
	t.Helper()
	dir := t.TempDir()
	ns := filepath.Base(s.NS)
	var cmd *exec.Cmd
	switch client {
	case PGClientPsql:
		if _, err := os.Stat("/usr/bin/psql"); err != nil {
			testutil.Skip(t, "needs Debian's postgresql-client (make deps installs it)")
		}
		script := filepath.Join(dir, "queries.sql")
		if err := os.WriteFile(script, []byte(psqlScript(queries)), 0o644); err != nil {
			t.Fatal(err)
		}
		cmd = exec.Command("ip", "netns", "exec", ns, "/usr/bin/psql", "-X", "-q", "-A", "-F", "\t", "-P", "footer=off",
			"-d", c.DSN(), "-f", script)
	case PGClientPgx, PGClientPgxExec:
		mode := "cache"
		if client == PGClientPgxExec {
			mode = "exec"
		}
		cmd = exec.Command("ip", "netns", "exec", ns, pgxClient(t), "-mode", mode, c.DSN(), writeQueries(t, dir, queries))
	case PGClientPsycopg, PGClientPsycopg2:
		if err := exec.Command(Python, "-c", "import "+string(client)).Run(); err != nil {
			testutil.Skip(t, "needs Debian's python3-"+string(client)+" for "+Python+" (make deps installs it)")
		}
		root, err := moduleRoot()
		if err != nil {
			t.Fatal(err)
		}
		cmd = exec.Command("ip", "netns", "exec", ns, Python, filepath.Join(root, "tests", "harness", "pgclient", "pgclient.py"),
			string(client), c.DSN(), writeQueries(t, dir, queries))
	default:
		t.Fatalf("unknown PostgreSQL client %q", client)
	}
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	run := PGClientRun{Output: stdout.String() + stderr.String()}
	if err != nil {
		return run, err
	}
	if client == PGClientPsql {
		run.Results, err = parsePsql(stdout.String())
	} else {
		run.Results, err = parseJSONLines(stdout.String())
	}
	if err == nil && len(run.Results) != len(queries) {
		err = fmt.Errorf("%d results for %d queries", len(run.Results), len(queries))
	}
	return run, err
}

func writeQueries(t testing.TB, dir string, queries []PGQuery) string {
	t.Helper()
	b, err := json.Marshal(queries)
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(dir, "queries.json")
	if err := os.WriteFile(f, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

func parseJSONLines(out string) ([]PGResult, error) {
	var rs []PGResult
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if l == "" {
			continue
		}
		var r PGResult
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			return rs, fmt.Errorf("client printed %q: %w", l, err)
		}
		rs = append(rs, r)
	}
	return rs, nil
}

// psqlLiteral is a parameter as a literal in the SQL text.
func psqlLiteral(p any) string {
	switch v := p.(type) {
	case string:
		return "'" + strings.ReplaceAll(v, "'", "''") + "'"
	case json.Number:
		return v.String()
	default:
		return fmt.Sprint(v)
	}
}

// psqlScript writes the queries for psql: parameters become literals, a
// ";" inside a query becomes "\;" (psql then sends the whole line as one
// query string, so stacked statements stay stacked), and after each query
// psql echoes its SQLSTATE and, on failure, the message.
func psqlScript(queries []PGQuery) string {
	var b strings.Builder
	b.WriteString("\\set VERBOSITY default\n")
	for _, q := range queries {
		sql := strings.TrimRight(strings.TrimSpace(q.SQL), ";")
		for i := len(q.Params); i >= 1; i-- { // $10 before $1
			sql = strings.ReplaceAll(sql, "$"+strconv.Itoa(i), psqlLiteral(q.Params[i-1]))
		}
		sql = strings.ReplaceAll(sql, ";", `\;`)
		fmt.Fprintf(&b, "\\echo '@@query %s'\n%s;\n\\echo '@@sqlstate' :SQLSTATE\n\\if :ERROR\n\\echo '@@error' :LAST_ERROR_MESSAGE\n\\endif\n", q.Name, sql)
	}
	return b.String()
}

// parsePsql reads psql's unaligned output (tab-separated, a header line,
// no footer) between the script's markers.
func parsePsql(out string) ([]PGResult, error) {
	var rs []PGResult
	var cur *PGResult
	header := false
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		l := sc.Text()
		switch {
		case strings.HasPrefix(l, "@@query "):
			rs = append(rs, PGResult{Name: strings.TrimPrefix(l, "@@query "), Columns: []string{}, Rows: [][]*string{}})
			cur, header = &rs[len(rs)-1], true
		case cur == nil:
			return rs, fmt.Errorf("psql printed %q before any query", l)
		case strings.HasPrefix(l, "@@sqlstate "):
			if st := strings.TrimPrefix(l, "@@sqlstate "); st != "00000" {
				cur.SQLState = st
			}
		case strings.HasPrefix(l, "@@error "):
			cur.Error = strings.TrimPrefix(l, "@@error ")
		case header:
			cur.Columns, header = strings.Split(l, "\t"), false
		default:
			var row []*string
			for _, f := range strings.Split(l, "\t") {
				row = append(row, &f)
			}
			cur.Rows = append(cur.Rows, row)
		}
	}
	return rs, sc.Err()
}
