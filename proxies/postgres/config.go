package postgres

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"

	pg_query "github.com/pganalyze/pg_query_go/v6"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies/internal/tlsconf"
)

// ruleConfig is what Configure keeps of a postgres rule (Flow.Config).
type ruleConfig struct {
	rule     string
	database string
	user     string
	password string
	tls      *tlsconf.Upstream // nil: plaintext upstream
	queries  map[string]*listedQuery
	deny     map[string]bool
	maxRows  int64 // 0: no limit
	minCount *minCount

	// checks caches check's decisions by statement text: clients send
	// the same text again and again (pgbench and pgx's describe mode parse
	// every execution), and parsing is most of the proxy's cost.
	checks checkCache
}

// checkCache maps statement texts to decisions. It is bounded: full, it
// starts over.
type checkCache struct {
	mu sync.Mutex
	m  map[string]checked
}

type checked struct {
	st  *prepared
	ref *refusal
}

// Bounds of the check cache.
const (
	checkCacheEntries = 4096
	checkCacheMaxText = 8 << 10
)

func (c *checkCache) get(sql string) (checked, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.m[sql]
	return v, ok
}

func (c *checkCache) put(sql string, v checked) {
	if len(sql) > checkCacheMaxText {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m) >= checkCacheEntries {
		c.m = make(map[string]checked)
	}
	c.m[sql] = v
}

type minCount struct {
	column  string
	atLeast int64
}

// listedQuery is one of open.postgres.queries, parsed.
type listedQuery struct {
	name        string
	fingerprint string
	// countPos is the position of rows.minCount.column in the target list,
	// -1 when the statement does not name it.
	countPos int
	// denied names a denied column the statement's target list names, if any.
	denied string
}

// configure reads r's files and parses its statements. Field paths in
// errors are relative to the rule, as proxies.Registry.Configure prefixes
// the rule's own path.
func configure(r *policy.Rule) (*ruleConfig, error) {
	if r.Mode != policy.ModeOpen {
		return nil, fmt.Errorf("mode: %s, this proxy serves mode open", r.Mode)
	}
	o := r.Spec.Open
	if o == nil || o.Protocol != "postgres" {
		return nil, errors.New("open.protocol: this proxy serves open.protocol postgres")
	}
	s := o.Postgres
	if s == nil {
		return nil, errors.New("open.postgres: required with open.protocol postgres")
	}
	if s.Database == "" {
		return nil, errors.New("open.postgres.database: required")
	}
	cfg := &ruleConfig{rule: r.Name, database: s.Database, queries: map[string]*listedQuery{}, deny: map[string]bool{}}
	var err error
	if cfg.user, err = readSecret(s.UpstreamUserFile, "open.postgres.upstreamUserFile"); err != nil {
		return nil, err
	}
	if cfg.password, err = readSecret(s.UpstreamPasswordFile, "open.postgres.upstreamPasswordFile"); err != nil {
		return nil, err
	}
	if s.UpstreamTLS != nil {
		if cfg.tls, err = tlsconf.LoadUpstream(s.UpstreamTLS, "open.postgres.upstreamTLS"); err != nil {
			return nil, err
		}
	}
	if s.Columns != nil {
		for _, c := range s.Columns.Deny {
			cfg.deny[c] = true
		}
	}
	if s.Rows != nil {
		if s.Rows.MaxRows != nil {
			cfg.maxRows = *s.Rows.MaxRows
		}
		if m := s.Rows.MinCount; m != nil {
			cfg.minCount = &minCount{column: m.Column, atLeast: m.AtLeast}
		}
	}
	if len(s.Queries) == 0 {
		return nil, errors.New("open.postgres.queries: at least one query")
	}
	for i, q := range s.Queries {
		qp := "open.postgres.queries[" + strconv.Itoa(i) + "].sql"
		st, err := parseOne(q.SQL)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", qp, err)
		}
		if st.builtin != "" {
			return nil, fmt.Errorf("%s: %s runs without being listed; list only statements that read data", qp, st.builtin)
		}
		lq := &listedQuery{name: q.Name, fingerprint: st.fingerprint, countPos: -1}
		targets := targetList(st.node)
		if cfg.minCount != nil {
			for j, t := range targets {
				if t.star {
					break // positions after a * are unknown
				}
				if t.alias == cfg.minCount.column || (t.alias == "" && t.column == cfg.minCount.column) {
					lq.countPos = j
					break
				}
			}
		}
		lq.denied = deniedTarget(cfg.deny, targets)
		if prev, dup := cfg.queries[lq.fingerprint]; dup {
			return nil, fmt.Errorf("%s: the same statement as query %q (fingerprint %s)", qp, prev.name, lq.fingerprint)
		}
		cfg.queries[lq.fingerprint] = lq
	}
	return cfg, nil
}

// readSecret reads a one-line file (a trailing newline is dropped).
func readSecret(file, field string) (string, error) {
	if file == "" {
		return "", fmt.Errorf("%s: required", field)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("%s: %w", field, err)
	}
	v := strings.TrimRight(string(b), "\r\n")
	if v == "" {
		return "", fmt.Errorf("%s: %s is empty", field, file)
	}
	return v, nil
}

// statement is one parsed statement.
type statement struct {
	fingerprint string
	node        *pg_query.Node // nil for the empty query
	// builtin names the allowed built-in kind ("transaction control", ...),
	// "" for a statement that must be listed.
	builtin string
}

// errors of parseOne that are refusals with their own reason.
var (
	errMultiple = errors.New("more than one statement")
	errCopy     = errors.New("COPY is not allowed")
	errEmpty    = errors.New("no statement")
)

// parseOne parses sql, which must hold exactly one statement (or none:
// the empty query, builtin "empty"), and fingerprints it.
func parseOne(sql string) (*statement, error) {
	tree, err := parseSQL(sql)
	if err != nil {
		return nil, fmt.Errorf("parsing: %w", err)
	}
	switch len(tree.Stmts) {
	case 0:
		return &statement{builtin: "the empty query"}, nil
	case 1:
	default:
		return nil, errMultiple
	}
	node := tree.Stmts[0].Stmt
	if node.GetCopyStmt() != nil {
		return nil, errCopy
	}
	st := &statement{node: node, builtin: builtinKind(node)}
	if st.builtin != "" {
		return st, nil
	}
	if st.fingerprint, err = fingerprintSQL(sql); err != nil {
		return nil, fmt.Errorf("fingerprinting: %w", err)
	}
	return st, nil
}

// settable are the parameters a sandbox may SET and RESET; showable adds
// what it may SHOW. Never search_path (another schema's table of the same
// name), standard_conforming_strings or client_encoding other than UTF8
// (the server would read literals differently from this proxy).
var (
	settable = map[string]bool{"application_name": true, "datestyle": true, "intervalstyle": true, "timezone": true,
		"extra_float_digits": true, "bytea_output": true, "statement_timeout": true, "lock_timeout": true,
		"idle_in_transaction_session_timeout": true, "client_encoding": true}
	showable = map[string]bool{"server_version": true, "server_encoding": true, "standard_conforming_strings": true,
		"transaction_isolation": true, "default_transaction_isolation": true, "integer_datetimes": true}
)

// builtinKind names the kind of an allowed built-in statement ("" when n
// must be listed).
func builtinKind(n *pg_query.Node) string {
	if t := n.GetTransactionStmt(); t != nil {
		switch t.Kind {
		case pg_query.TransactionStmtKind_TRANS_STMT_BEGIN, pg_query.TransactionStmtKind_TRANS_STMT_START,
			pg_query.TransactionStmtKind_TRANS_STMT_COMMIT, pg_query.TransactionStmtKind_TRANS_STMT_ROLLBACK,
			pg_query.TransactionStmtKind_TRANS_STMT_SAVEPOINT, pg_query.TransactionStmtKind_TRANS_STMT_RELEASE,
			pg_query.TransactionStmtKind_TRANS_STMT_ROLLBACK_TO:
			return "transaction control"
		}
		return ""
	}
	if s := n.GetVariableSetStmt(); s != nil {
		name := strings.ToLower(s.Name)
		switch s.Kind {
		case pg_query.VariableSetKind_VAR_SET_VALUE, pg_query.VariableSetKind_VAR_SET_DEFAULT, pg_query.VariableSetKind_VAR_RESET:
		default:
			return ""
		}
		if !settable[name] {
			return ""
		}
		if name == "client_encoding" && s.Kind == pg_query.VariableSetKind_VAR_SET_VALUE && !isUTF8(s.Args) {
			return ""
		}
		return "SET"
	}
	if s := n.GetVariableShowStmt(); s != nil {
		name := strings.ToLower(s.Name)
		if settable[name] || showable[name] {
			return "SHOW"
		}
	}
	return ""
}

// isUTF8 reports whether SET client_encoding's arguments say UTF8.
func isUTF8(args []*pg_query.Node) bool {
	if len(args) != 1 {
		return false
	}
	c := args[0].GetAConst()
	if c == nil || c.GetSval() == nil {
		return false
	}
	switch strings.ToLower(strings.ReplaceAll(c.GetSval().Sval, "-", "")) {
	case "utf8", "unicode":
		return true
	}
	return false
}

// target is one entry of a statement's target (or RETURNING) list.
type target struct {
	alias  string // AS name, "" when none
	column string // the last name of a plain column reference, "" when none
	star   bool   // * or t.*
}

// targetList is the output list of n: a SELECT's target list (the left-
// most of a set operation, which names the columns), or the RETURNING list
// of INSERT, UPDATE, DELETE.
func targetList(n *pg_query.Node) []target {
	var list []*pg_query.Node
	switch {
	case n.GetSelectStmt() != nil:
		s := n.GetSelectStmt()
		for s.Larg != nil {
			s = s.Larg
		}
		list = s.TargetList
	case n.GetInsertStmt() != nil:
		list = n.GetInsertStmt().ReturningList
	case n.GetUpdateStmt() != nil:
		list = n.GetUpdateStmt().ReturningList
	case n.GetDeleteStmt() != nil:
		list = n.GetDeleteStmt().ReturningList
	}
	out := make([]target, 0, len(list))
	for _, e := range list {
		rt := e.GetResTarget()
		if rt == nil {
			continue
		}
		t := target{alias: rt.Name}
		if cr := rt.Val.GetColumnRef(); cr != nil && len(cr.Fields) > 0 {
			last := cr.Fields[len(cr.Fields)-1]
			if last.GetAStar() != nil {
				t.star = true
			} else if s := last.GetString_(); s != nil {
				t.column = s.Sval
			}
		}
		out = append(out, t)
	}
	return out
}

// deniedTarget is the first denied name in targets (a column or an alias).
func deniedTarget(deny map[string]bool, targets []target) string {
	for _, t := range targets {
		if deny[t.alias] && t.alias != "" {
			return t.alias
		}
		if deny[t.column] && t.column != "" {
			return t.column
		}
	}
	return ""
}
