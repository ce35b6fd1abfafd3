//go:build cgo

package postgres

import pg_query "github.com/pganalyze/pg_query_go/v6"

// parseSQL and fingerprintSQL are PostgreSQL's parser (cgo).
func parseSQL(sql string) (*pg_query.ParseResult, error) { return pg_query.Parse(sql) }

func fingerprintSQL(sql string) (string, error) { return pg_query.Fingerprint(sql) }
