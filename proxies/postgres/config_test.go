package postgres

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Configure refuses, naming the field, what would fail every flow.
func TestConfigureRefuses(t *testing.T) {
	for _, tc := range []struct {
		name, fields, want string
	}{
		{"two statements", "queries: [{name: q, sql: 'SELECT 1; SELECT 2'}]", "open.postgres.queries[0].sql: more than one statement"},
		{"copy", "queries: [{name: q, sql: 'SELECT 1'}, {name: c, sql: 'COPY patients TO STDOUT'}]", "open.postgres.queries[1].sql: COPY is not allowed"},
		{"syntax", "queries: [{name: q, sql: 'SELEC 1'}]", "open.postgres.queries[0].sql: parsing:"},
		{"same statement", "queries: [{name: a, sql: 'SELECT 1'}, {name: b, sql: 'select 2'}]", `open.postgres.queries[1].sql: the same statement as query "a"`},
		{"builtin", "queries: [{name: q, sql: 'BEGIN'}]", "open.postgres.queries[0].sql: transaction control runs without being listed"},
		{"ca file", "queries: [{name: q, sql: 'SELECT 1'}], upstreamTLS: {caFile: /nonexistent/ca.pem}", "open.postgres.upstreamTLS.caFile"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := configure(postgresRule(t, tc.fields))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
		})
	}
	r := postgresRule(t, "queries: [{name: q, sql: 'SELECT 1'}]")
	r.Spec.Open.Postgres.UpstreamPasswordFile = filepath.Join(t.TempDir(), "missing")
	if _, err := configure(r); err == nil || !strings.HasPrefix(err.Error(), "open.postgres.upstreamPasswordFile: ") {
		t.Fatalf("missing password file: %v", err)
	}
	empty := filepath.Join(t.TempDir(), "user")
	os.WriteFile(empty, []byte("\n"), 0o600)
	r.Spec.Open.Postgres.UpstreamUserFile = empty
	if _, err := configure(r); err == nil || !strings.HasPrefix(err.Error(), "open.postgres.upstreamUserFile: ") {
		t.Fatalf("empty user file: %v", err)
	}
}

// The count column is found by its name or alias in the listed
// statement, so the sandbox's alias does not move it.
func TestConfigureCountPosition(t *testing.T) {
	cfg, err := configure(postgresRule(t, `queries: [
		{name: a, sql: 'SELECT region, count(*) AS n FROM patients GROUP BY region'},
		{name: b, sql: 'SELECT n, region FROM cohorts'},
		{name: c, sql: 'SELECT region FROM patients'},
		{name: d, sql: 'SELECT *, count(*) AS n FROM patients GROUP BY 1'}],
		rows: {minCount: {column: n, atLeast: 5}}`))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{"a": 1, "b": 0, "c": -1, "d": -1}
	for _, q := range cfg.queries {
		if q.countPos != want[q.name] {
			t.Errorf("query %s: count at %d, want %d", q.name, q.countPos, want[q.name])
		}
	}
}

// Only the listed built-ins run unlisted.
func TestBuiltins(t *testing.T) {
	for sql, want := range map[string]bool{
		"BEGIN": true, "START TRANSACTION ISOLATION LEVEL SERIALIZABLE": true, "COMMIT": true, "ROLLBACK": true,
		"SAVEPOINT s": true, "RELEASE s": true, "ROLLBACK TO s": true, "SET datestyle = 'ISO'": true,
		"SET client_encoding = 'UTF8'": true, "RESET application_name": true, "SHOW server_version": true,
		"SET client_encoding = 'SJIS'": false, "SET search_path = evil": false, "SET standard_conforming_strings = off": false,
		"SET SESSION AUTHORIZATION other": false, "RESET ALL": false, "PREPARE TRANSACTION 'x'": false,
		"SHOW data_directory": false, "SELECT 1": false,
	} {
		st, err := parseOne(sql)
		if err != nil {
			t.Fatalf("%q: %v", sql, err)
		}
		if got := st.builtin != ""; got != want {
			t.Errorf("%q: built-in %v, want %v", sql, got, want)
		}
	}
}

func TestAdjustTagAndCountValue(t *testing.T) {
	if got := string(adjustTag([]byte("SELECT 5"), 2)); got != "SELECT 3" {
		t.Errorf("tag %q", got)
	}
	if got := string(adjustTag([]byte("INSERT 0 5"), 2)); got != "INSERT 0 5" {
		t.Errorf("tag %q", got)
	}
	// numeric 12345.5 in binary: ndigits 3, weight 1, sign 0, dscale 1, digits 1 2345 5000.
	b := []byte{0, 3, 0, 1, 0, 0, 0, 1, 0, 1, 0x09, 0x29, 0x13, 0x88}
	if v, ok := countValue(b, oidNumeric, 1); !ok || v != 12345.5 {
		t.Errorf("numeric: %v %v", v, ok)
	}
	if _, ok := countValue(nil, oidInt8, 0); ok {
		t.Error("NULL counted")
	}
}
