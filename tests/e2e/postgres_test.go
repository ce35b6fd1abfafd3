package e2e

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/cleanwall/cleanwall/tests/harness"
)

// The relational data source end to end (issue 15): Debian's PostgreSQL 15
// in the remote namespace (harness.StartPostgres: a clinic's patients with
// a canary in every name, ssn and email; statement logging on) and real
// clients inside sandboxes: psql, pgx (named and unnamed statements),
// psycopg 3 and psycopg2. A direct sandbox (no cleanwall-cni) gives the
// reference answers; a sandbox under policyWarehouse reaches the database
// only through cleanwalld's postgres privacy proxy.

// pgDays is the date k days after the first visit: visit_date >= pgDays(k)
// selects harness.PostgresVisits - k rows.
func pgDays(k int) string {
	// January 2024 has 31 days, February 29.
	switch {
	case k < 31:
		return fmt.Sprintf("2024-01-%02d", k+1)
	case k < 60:
		return fmt.Sprintf("2024-02-%02d", k-30)
	default:
		return fmt.Sprintf("2024-03-%02d", k-59)
	}
}

// pgAllowed are statements policyWarehouse lists, written as a sandbox's
// code might: parameters or literals, other case and whitespace; none
// returns more than maxRows (50) rows.
func pgAllowed() []harness.PGQuery {
	return []harness.PGQuery{
		{Name: "cohort-param", SQL: "SELECT region, count(*) AS n FROM patients WHERE age > $1 GROUP BY region", Params: []any{30}},
		{Name: "cohort-literal", SQL: "SELECT region, count(*) AS n FROM patients WHERE age > 25 GROUP BY region"},
		{Name: "cohort-case", SQL: "select  region,COUNT(*) as n\n  from PATIENTS where AGE >   $1 group by REGION", Params: []any{20}},
		{Name: "visits-param", SQL: "SELECT patient_id, visit_date, diagnosis FROM visits WHERE visit_date >= $1", Params: []any{pgDays(70)}},
		{Name: "visits-literal", SQL: "SELECT patient_id, visit_date, diagnosis FROM visits WHERE visit_date >= '" + pgDays(90) + "'"},
		{Name: "visits-at-max", SQL: "SELECT patient_id, visit_date, diagnosis FROM visits WHERE visit_date >= $1", Params: []any{pgDays(50)}},
		{Name: "visits-again", SQL: "SELECT patient_id, visit_date, diagnosis FROM visits WHERE visit_date >= $1", Params: []any{pgDays(80)}},
	}
}

// pgRows returns a result's rows sorted (the listed statements have no
// ORDER BY).
func pgRows(r harness.PGResult) []string {
	rows := r.RowStrings()
	slices.Sort(rows)
	return rows
}

// TestPostgresClientsDirect: every client, run in a direct sandbox (no
// cleanwall) with the database's credentials, gets the rows the seed
// implies for each statement (the same rows as every other client), a
// failing statement's SQLSTATE, and goes on on the same connection. This
// is what the proxy tests compare against.
func TestPostgresClientsDirect(t *testing.T) {
	env := harness.New(t)
	pg := env.StartPostgres()
	direct := env.MustAddSandbox("direct", harness.SandboxOptions{Direct: true, NoIPv6: true})
	queries := append(pgAllowed(),
		harness.PGQuery{Name: "missing-table", SQL: "SELECT id FROM no_such_table WHERE id = $1", Params: []any{1}},
		harness.PGQuery{Name: "after-failure", SQL: "SELECT id, region, age FROM patients WHERE id = $1", Params: []any{7}},
		harness.PGQuery{Name: "canary", SQL: "SELECT ssn FROM patients WHERE id = $1", Params: []any{3}},
	)
	var first map[string][]string
	for _, client := range harness.PGClients {
		run := direct.RunPG(t, client, pg.Conn(), queries)
		got := map[string][]string{}
		for _, r := range run.Results {
			if r.Name == "missing-table" {
				if r.SQLState != "42P01" {
					t.Errorf("%s: a missing table failed with SQLSTATE %q (%s), want 42P01", client, r.SQLState, r.Error)
				}
				continue
			}
			if r.SQLState != "" {
				t.Errorf("%s: %s failed: %s %s", client, r.Name, r.SQLState, r.Error)
			}
			got[r.Name] = pgRows(r)
		}
		cohort := got["cohort-param"]
		if len(cohort) != len(harness.PostgresRegions) {
			t.Errorf("%s: cohort-param returned %q, want a row per region", client, cohort)
		}
		for name, want := range map[string]int{"visits-param": 30, "visits-literal": 10, "visits-at-max": 50, "visits-again": 20} {
			if len(got[name]) != want {
				t.Errorf("%s: %s returned %d rows, want %d", client, name, len(got[name]), want)
			}
		}
		if r, _ := run.Result("after-failure"); len(r.Rows) != 1 || len(r.Columns) != 3 || r.Columns[2] != "age" {
			t.Errorf("%s: the statement after a failure returned %v %q", client, r.Columns, r.RowStrings())
		}
		if !strings.Contains(run.Output, pg.Canary+"-ssn-3") {
			t.Errorf("%s: a direct client did not see the canary it asked for:\n%s", client, run.Output)
		}
		if first == nil {
			first = got
			continue
		}
		for name, rows := range got {
			if !slices.Equal(rows, first[name]) {
				t.Errorf("%s: %s returned %q, %s returned %q", client, name, rows, harness.PGClients[0], first[name])
			}
		}
	}
	// The reference for the minCount tests: some regions have fewer than
	// ten patients at any age.
	small := 0
	for _, row := range first["cohort-literal"] {
		n, _ := strconv.Atoi(row[strings.LastIndex(row, "|")+1:])
		if n < 10 {
			small++
		}
	}
	if small == 0 {
		t.Errorf("no group below 10 in %q: the minCount tests would prove nothing", first["cohort-literal"])
	}
	if log := pg.StatementLog(); !strings.Contains(log, "no_such_table") || strings.Contains(log, pg.Password) {
		t.Errorf("the statement log should hold what the clients ran and never the password:\n%s", log)
	}
}
