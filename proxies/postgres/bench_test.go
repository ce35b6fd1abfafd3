package postgres

import (
	"context"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"
)

// BenchmarkPointQuery: one listed point query per op, directly and through
// the proxy, with pgx's statement cache and its describe-every-time mode
// (a Parse per execution: the check cache's case).
func BenchmarkPointQuery(b *testing.B) {
	s := startPostgresB(b)
	for _, m := range []struct {
		name string
		mode pgx.QueryExecMode
	}{{"cache", pgx.QueryExecModeCacheStatement}, {"describe", pgx.QueryExecModeDescribeExec}, {"simple", pgx.QueryExecModeSimpleProtocol}} {
		b.Run("direct/"+m.name, func(b *testing.B) {
			c, err := pgx.Connect(context.Background(), fmt.Sprintf("host=127.0.0.1 port=%d user=%s password=%s dbname=clinic sslmode=disable default_query_exec_mode=%s", s.port, upstreamUser, upstreamPass, modeName(m.mode)))
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close(context.Background())
			runPoint(b, c)
		})
		b.Run("proxy/"+m.name, func(b *testing.B) {
			tp := startProxy(b, s, postgresRule(b, testQueries))
			c := tp.connect(b, m.mode)
			runPoint(b, c)
		})
	}
}

func modeName(m pgx.QueryExecMode) string {
	switch m {
	case pgx.QueryExecModeDescribeExec:
		return "describe_exec"
	case pgx.QueryExecModeSimpleProtocol:
		return "simple_protocol"
	}
	return "cache_statement"
}

func runPoint(b *testing.B, c *pgx.Conn) {
	var id int32
	var region string
	for i := 0; b.Loop(); i++ {
		if err := c.QueryRow(context.Background(), "SELECT id, region FROM patients WHERE age > $1 ORDER BY id", 47).Scan(&id, &region); err != nil {
			b.Fatal(err)
		}
	}
}
