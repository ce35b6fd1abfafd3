// Package postgres is the PostgreSQL privacy proxy of open rules with
// open.protocol postgres (shared/POLICY.md, "Relational data source"): the
// sandbox speaks PostgreSQL's wire protocol to it as if to the database,
// with any user and password and no TLS; the proxy logs in upstream with
// the rule's credentials (the sandbox never sees them), runs only the
// statements the rule lists, and filters what comes back by the rule's
// column and row rules.
//
// It owns the protocol on both sides of a flow (pgproto3 as the server
// for the sandbox; pgconn to connect and authenticate upstream, SCRAM or
// md5 and TLS, then Hijack to speak the protocol itself). It must not
// touch the datapath, the daemon or anything outside the flow it is given.
//
// # Statements
//
// Matching is by pg_query's fingerprint of the parsed statement
// (github.com/pganalyze/pg_query_go/v6, PostgreSQL's own parser through
// cgo): literals, $n parameters, aliases, case and whitespace may differ,
// so psycopg2's client-side interpolation matches like pgx's parameters.
// We chose the cgo binding over github.com/wasilibs/go-pgquery (the same
// parser compiled to WebAssembly, no cgo) because every statement of every
// flow is parsed on the hot path and the WebAssembly build costs about
// twenty times as much per parse, and the proxy's throughput target is
// set against pgbouncer. The price is cgo in cleanwalld's build (a C
// compiler, and about 30 s for a cold build of the parser, cached after).
// Built without cgo, the package compiles and refuses every postgres rule
// at Configure (parse_nocgo.go).
//
// The text the proxy parses is the text the server parses: the upstream
// session is pinned to client_encoding UTF8 and
// standard_conforming_strings on (both would otherwise let a client make
// the server read a string literal differently from the proxy), and SET of
// either is refused.
//
// Every constant is free, as in any fingerprint: a WHERE value, a LIMIT,
// and also an ORDER BY or GROUP BY position (GROUP BY 1 matches GROUP BY
// 2). List statements that group by name where that matters.
//
// Besides the listed statements these run without being listed, because
// clients send them on their own (psycopg's implicit BEGIN, SET of client
// parameters at connect, SHOW by drivers that probe the server):
//
//   - transaction control: BEGIN, START TRANSACTION, COMMIT, END, ROLLBACK,
//     SAVEPOINT, RELEASE, ROLLBACK TO (not PREPARE TRANSACTION or
//     COMMIT/ROLLBACK PREPARED);
//   - SET, SET LOCAL and RESET of application_name, datestyle, intervalstyle,
//     timezone, extra_float_digits, bytea_output, statement_timeout,
//     lock_timeout, idle_in_transaction_session_timeout, and
//     client_encoding to UTF8 only (never search_path, which would let a
//     listed statement read another schema's table of the same name);
//   - SHOW of those and of server_version, server_encoding,
//     standard_conforming_strings, transaction_isolation,
//     default_transaction_isolation, integer_datetimes;
//   - the empty query.
//
// Everything else is refused with SQLSTATE 42501 (insufficient_privilege)
// and a message naming the reason: not on the list (with the fingerprint),
// more than one statement, COPY, the function-call message, a denied
// column, past maxRows. The proxy sends the upstream, in place of the
// refused statement, a Describe of a statement that does not exist: the
// server fails it without running anything, so the refusal has exactly
// the effect of a failed statement (an explicit transaction is aborted; the
// rest of a pipeline is skipped until Sync) and the connection stays
// usable.
//
// # Results
//
// A result column whose name is in columns.deny fails its statement. The
// proxy looks before running: a listed statement whose target list names a
// denied column (as a column or an alias, in the listed text or in the
// sandbox's) is refused outright. Names only the result shows (SELECT *,
// a function's default name) are checked on the RowDescription: no
// description and no row reaches the sandbox, but in a pipeline that
// executes in the same batch the statement has run upstream.
//
// rows.maxRows fails a statement at its maxRows+1-th row (rows already
// sent stay sent, as with any error mid-result); the rest of its result is
// drained. rows.minCount withholds rows whose count column holds less than
// atLeast (or NULL, or a value that is not a number), adjusts the
// command tag's row count, and counts them. The count column is found by
// its name or alias in the listed statement's target list, so the
// sandbox's alias for it does not matter; for a listed statement without
// it, by name in the result.
//
// After the proxy fails a statement on its results, the rest of that
// pipeline's responses (until Sync) are dropped as PostgreSQL would skip
// them; unlike a server error they are not rolled back (they are listed
// statements, and the sandbox sees none of their results).
package postgres
