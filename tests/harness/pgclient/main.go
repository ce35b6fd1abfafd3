// Command pgclient is the tests' pgx client (github.com/jackc/pgx/v5): it
// runs a list of queries on one connection, the way a Go application in a
// sandbox would, and prints one JSON line per query: its columns and rows
// as text, or the SQLSTATE and message it failed with. The harness builds
// it once (harness.PGClientPgx) and runs it inside a namespace; pgclient.py
// is the same for psycopg and psycopg2.
//
// Usage: pgclient [-mode cache|describe|exec|simple] DSN QUERIES.json
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

type query struct {
	Name   string `json:"name"`
	SQL    string `json:"sql"`
	Params []any  `json:"params,omitempty"`
}

type result struct {
	Name     string      `json:"name"`
	Columns  []string    `json:"columns"`
	Rows     [][]*string `json:"rows"`
	SQLState string      `json:"sqlstate,omitempty"`
	Error    string      `json:"error,omitempty"`
}

// modes are pgx's query execution modes: cache (the default: named
// stmtcache_* prepared statements), describe, exec (unnamed statements)
// and simple (the simple protocol, parameters interpolated by pgx).
var modes = map[string]pgx.QueryExecMode{
	"cache":    pgx.QueryExecModeCacheStatement,
	"describe": pgx.QueryExecModeCacheDescribe,
	"exec":     pgx.QueryExecModeExec,
	"simple":   pgx.QueryExecModeSimpleProtocol,
}

func main() {
	mode := flag.String("mode", "cache", "query execution mode: cache, describe, exec or simple")
	flag.Parse()
	m, ok := modes[*mode]
	if flag.NArg() != 2 || !ok {
		fmt.Fprintln(os.Stderr, "usage: pgclient [-mode cache|describe|exec|simple] DSN QUERIES.json")
		os.Exit(2)
	}
	if err := run(flag.Arg(0), flag.Arg(1), m); err != nil {
		fmt.Fprintln(os.Stderr, "pgclient:", err)
		os.Exit(1)
	}
}

func run(dsn, file string, mode pgx.QueryExecMode) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	var qs []query
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	if err := d.Decode(&qs); err != nil {
		return fmt.Errorf("reading %s: %w", file, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return err
	}
	cfg.DefaultQueryExecMode = mode
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("connecting: %w", err)
	}
	defer conn.Close(context.Background())
	enc := json.NewEncoder(os.Stdout)
	for _, q := range qs {
		if err := enc.Encode(runOne(ctx, conn, q)); err != nil {
			return err
		}
	}
	return nil
}

func runOne(ctx context.Context, conn *pgx.Conn, q query) result {
	res := result{Name: q.Name, Columns: []string{}, Rows: [][]*string{}}
	args := make([]any, len(q.Params))
	for i, p := range q.Params {
		args[i] = param(p)
	}
	rows, err := conn.Query(ctx, q.SQL, args...)
	if err == nil {
		for _, f := range rows.FieldDescriptions() {
			res.Columns = append(res.Columns, f.Name)
		}
		for rows.Next() {
			vals, verr := rows.Values()
			if verr != nil {
				err = verr
				break
			}
			row := make([]*string, len(vals))
			for i, v := range vals {
				row[i] = text(v)
			}
			res.Rows = append(res.Rows, row)
		}
		rows.Close()
		if err == nil {
			err = rows.Err()
		}
	}
	if err != nil {
		res.Error = err.Error()
		var pe *pgconn.PgError
		if errors.As(err, &pe) {
			res.SQLState = pe.Code
		}
	}
	return res
}

// param turns a JSON number into an int64 where it is one: pgx encodes a
// float64 into an int4 parameter only when it has no fraction, but say so.
func param(p any) any {
	if n, ok := p.(json.Number); ok {
		if i, err := n.Int64(); err == nil {
			return i
		}
		f, _ := n.Float64()
		return f
	}
	return p
}

// text renders a value the way PostgreSQL's text output does for the
// types the tests use (integers, text, dates).
func text(v any) *string {
	var s string
	switch v := v.(type) {
	case nil:
		return nil
	case time.Time:
		s = v.Format("2006-01-02")
	case int64:
		s = strconv.FormatInt(v, 10)
	case int32:
		s = strconv.FormatInt(int64(v), 10)
	case string:
		s = v
	default:
		s = fmt.Sprint(v)
	}
	return &s
}
