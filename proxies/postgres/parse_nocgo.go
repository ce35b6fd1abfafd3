//go:build !cgo

package postgres

import (
	"errors"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// Without cgo there is no parser: the package builds (CGO_ENABLED=0
// builds of the rest keep working) and Configure refuses every rule.
var errNoParser = errors.New("this cleanwalld was built without cgo and has no PostgreSQL parser (build with CGO_ENABLED=1)")

func parseSQL(string) (*pg_query.ParseResult, error) { return nil, errNoParser }

func fingerprintSQL(string) (string, error) { return "", errNoParser }
