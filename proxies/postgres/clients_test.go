package postgres

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/cleanwall/cleanwall/internal/testutil"
)

// psql (the simple protocol, what it sends on its own) through the proxy:
// listed statements with literals return rows; refusals print 42501 and
// the session goes on.
func TestPsqlClient(t *testing.T) {
	s := startPostgres(t)
	if _, err := os.Stat("/usr/bin/psql"); err != nil {
		testutil.Skip(t, "psql is not installed: make deps")
	}
	tp := startProxy(t, s, postgresRule(t, testQueries))
	host, port, _ := net.SplitHostPort(tp.addr)
	script := `\set VERBOSITY sqlstate
SELECT id, region FROM patients WHERE age > 46 ORDER BY id;
SELECT ssn FROM patients;
\echo :SQLSTATE
BEGIN;
select region, COUNT(*) as c from patients group by region order by region;
COMMIT;
SELECT 1\; SELECT 2;
\echo :SQLSTATE
`
	cmd := exec.Command("/usr/bin/psql", "-X", "-A", "-t", "-h", host, "-p", port, "-U", "anyone", "-d", "clinic", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	cmd.Env = append(os.Environ(), "PGPASSWORD=", "PGSSLMODE=prefer")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("psql: %v\n%s", err, out.String())
	}
	got := out.String()
	for _, want := range []string{"27|east\n28|west\n", "42501\n", "north|12\nsouth|12\n", "42501\n42501"} {
		if !strings.Contains(got, want) {
			t.Errorf("psql output lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "east|3") || strings.Contains(got, "west|1") || strings.Contains(got, "CANARY") {
		t.Errorf("psql got what it must not:\n%s", got)
	}
}

// psycopg 3 (server-side parameters, typed Parse, implicit BEGIN) and
// psycopg2 (literals interpolated client-side) through the proxy.
func TestPsycopgClients(t *testing.T) {
	s := startPostgres(t)
	tp := startProxy(t, s, postgresRule(t, testQueries))
	host, port, _ := net.SplitHostPort(tp.addr)
	for _, mod := range []string{"psycopg", "psycopg2"} {
		t.Run(mod, func(t *testing.T) {
			if err := exec.Command("/usr/bin/python3", "-c", "import "+mod).Run(); err != nil {
				testutil.Skip(t, fmt.Sprintf("%s is not installed (python3-%s: make deps): %v", mod, mod, err))
			}
			script := `import sys, ` + mod + ` as pg
conn = pg.connect(host="` + host + `", port=` + port + `, user="anyone", dbname="clinic", sslmode="prefer")
cur = conn.cursor()
cur.execute("SELECT id, region FROM patients WHERE age > %s ORDER BY id", (46,))
print(cur.fetchall())
cur.execute("SELECT region, count(*) AS k FROM patients GROUP BY region ORDER BY region")
print(cur.fetchall())
for sql in ["SELECT ssn FROM patients", "SELECT id, ssn FROM patients WHERE id = %s"]:
    try:
        cur.execute(sql, (3,) if "%s" in sql else None)
        print("ran", cur.fetchall())
    except Exception as e:
        print("refused", getattr(e, "sqlstate", None) or getattr(e, "pgcode", None))
        conn.rollback()
cur.execute("SELECT id, region FROM patients WHERE age > %s ORDER BY id", (47,))
print(cur.fetchall())
conn.commit()
`
			out, err := exec.Command("/usr/bin/python3", "-c", script).CombinedOutput()
			if err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			want := "[(27, 'east'), (28, 'west')]\n[('north', 12), ('south', 12)]\nrefused 42501\nrefused 42501\n[(28, 'west')]\n"
			if string(out) != want {
				t.Errorf("got\n%s\nwant\n%s", out, want)
			}
		})
	}
}
