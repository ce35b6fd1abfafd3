package postgres

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/cleanwall/cleanwall/proxies"
)

// Denial reasons (proxies.Denial.Reason and the reason label).
const (
	ReasonNotListed    = "not-listed"
	ReasonMultiple     = "multiple-statements"
	ReasonCopy         = "copy"
	ReasonFunctionCall = "function-call"
	ReasonDenied       = "denied-column"
	ReasonMaxRows      = "max-rows"
)

// poisonName names the statement the proxy describes upstream in place of
// a refused one: it never exists (the sandbox may not Parse it), so the
// server fails the Describe without running anything.
const poisonName = "cleanwall.refused"

// sqlstateRefused is insufficient_privilege.
const sqlstateRefused = "42501"

// refusal is a statement the proxy refused.
type refusal struct {
	reason string
	query  string // the listed query's name, if it matched one
	detail string // fingerprint or column: never a parameter value
	msg    string
}

func (r *refusal) response() *pgproto3.ErrorResponse {
	return &pgproto3.ErrorResponse{Severity: "ERROR", SeverityUnlocalized: "ERROR", Code: sqlstateRefused, Message: "cleanwall: " + r.msg}
}

// prepared is what the proxy knows of a prepared statement or a portal.
type prepared struct {
	q       *listedQuery // nil for a built-in statement
	builtin string
}

// portal is a bound statement; rows counts what it returned over all its
// Executes, so that fetching in chunks does not escape rows.maxRows.
type portal struct {
	st   *prepared
	rows int64
}

// statementOf is the portal's statement (nil for an unknown portal).
func (p *portal) statementOf() *prepared {
	if p == nil {
		return nil
	}
	return p.st
}

// itemKind is what a message the proxy sent upstream gets back.
type itemKind int

const (
	itemParse       itemKind = iota // ParseComplete
	itemBind                        // BindComplete
	itemClose                       // CloseComplete
	itemDescribeS                   // ParameterDescription, RowDescription | NoData
	itemDescribeP                   // RowDescription | NoData
	itemExecute                     // DataRow*, CommandComplete | EmptyQueryResponse | PortalSuspended
	itemSync                        // ReadyForQuery
	itemQuery                       // results until ReadyForQuery
	itemPoison                      // ErrorResponse, replaced by the refusal
	itemHiddenClose                 // CloseComplete the sandbox did not ask for
)

// item is one expected response, in order.
type item struct {
	kind   itemKind
	hidden bool // a Describe P the proxy added: recorded, not forwarded
	res    *result
	ref    *refusal
}

// result is one statement's results as they pass.
type result struct {
	st       *prepared
	desc     *pgproto3.RowDescription // nil until described, or NoData
	countPos int                      // of rows.minCount's column, -1: none
	rows     int64                    // returned by this Execute or Query
	sent     *int64                   // returned by the portal so far (nil: rows)
	withheld int64
	failed   *refusal
}

// session is one sandbox connection.
type session struct {
	p    *Proxy
	cfg  *ruleConfig
	flow *proxies.Flow
	be   *pgproto3.Backend
	fe   *pgproto3.Frontend
	sc   *countConn
	// startup is the sandbox's StartupMessage.
	startup *pgproto3.StartupMessage

	statements map[string]*prepared
	portals    map[string]*portal

	items    []item
	skipping bool // a refusal in this pipeline: drop messages until Sync

	upstreamErr bool // the upstream failed a message: it skips until Sync
	clientSkip  bool // the proxy failed a statement: drop responses until Sync
}

// Bounds of a pipeline the proxy holds until Sync or Flush.
const (
	maxPipelineItems = 1 << 16
	maxPipelineBytes = 64 << 20
)

// errTerminate ends a session the sandbox ended.
var errTerminate = errors.New("terminated")

func (s *session) serve() error {
	defer s.report()
	for {
		if idle := s.p.IdleTimeout; idle > 0 {
			s.sc.SetReadDeadline(time.Now().Add(idle))
		}
		msg, err := s.be.Receive()
		if err != nil {
			var tooBig *pgproto3.ExceededMaxBodyLenErr
			if errors.As(err, &tooBig) {
				s.be.Send(&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: "54000",
					Message: fmt.Sprintf("cleanwall: a message of more than %d bytes", MaxMessageBytes)})
				s.be.Flush()
			}
			if errors.Is(err, errTerminate) {
				return nil
			}
			return err
		}
		end, err := s.handle(msg)
		if err != nil {
			if errors.Is(err, errTerminate) {
				return nil
			}
			return err
		}
		if !end {
			if len(s.items) > maxPipelineItems || s.sc.read.Load() > maxPipelineBytes {
				// The proxy holds a pipeline until Sync or Flush: bound it.
				s.be.Send(&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: "54000",
					Message: fmt.Sprintf("cleanwall: a pipeline of more than %d messages or %d bytes without Sync or Flush", maxPipelineItems, maxPipelineBytes)})
				s.be.Flush()
				return errors.New("pipeline too long")
			}
			continue
		}
		if err := s.fe.Flush(); err != nil {
			return fmt.Errorf("writing upstream: %w", err)
		}
		if err := s.relay(); err != nil {
			return err
		}
		if err := s.be.Flush(); err != nil {
			return err
		}
		s.report()
	}
}

// report hands the bytes since the last report to the flow and metrics.
func (s *session) report() {
	in := s.sc.written.Swap(0)
	s.flow.Report.Bytes(s.sc.read.Swap(0), in)
	s.p.metrics.bytesOut(s.cfg.rule, in)
}

// handle checks one message of the sandbox's and queues what goes
// upstream; end says the batch is complete (Sync, Flush, Query,
// FunctionCall).
func (s *session) handle(msg pgproto3.FrontendMessage) (end bool, err error) {
	switch m := msg.(type) {
	case *pgproto3.Parse:
		if s.skipping {
			return false, nil
		}
		if m.Name == poisonName {
			s.refuseExtended(&refusal{reason: ReasonNotListed, detail: "reserved statement name", msg: "the statement name " + strconv.Quote(poisonName) + " is reserved"}, m.Name)
			return false, nil
		}
		st, ref := s.check(m.Query)
		if ref != nil {
			s.refuseExtended(ref, m.Name)
			return false, nil
		}
		s.statements[m.Name] = st
		s.fe.Send(m)
		s.items = append(s.items, item{kind: itemParse})
	case *pgproto3.Bind:
		if s.skipping {
			return false, nil
		}
		s.portals[m.DestinationPortal] = &portal{st: s.statements[m.PreparedStatement]}
		s.fe.Send(m)
		s.items = append(s.items, item{kind: itemBind})
	case *pgproto3.Describe:
		if s.skipping {
			return false, nil
		}
		s.fe.Send(m)
		if m.ObjectType == 'S' {
			s.items = append(s.items, item{kind: itemDescribeS, res: s.newResult(s.statements[m.Name])})
		} else {
			s.items = append(s.items, item{kind: itemDescribeP, res: s.newResult(s.portals[m.Name].statementOf())})
		}
	case *pgproto3.Execute:
		if s.skipping {
			return false, nil
		}
		// The proxy describes the portal itself: filtering needs its
		// columns and formats, whatever the sandbox asked before.
		p := s.portals[m.Portal]
		res := s.newResult(p.statementOf())
		if p != nil {
			res.sent = &p.rows
		}
		s.fe.Send(&pgproto3.Describe{ObjectType: 'P', Name: m.Portal})
		s.items = append(s.items, item{kind: itemDescribeP, hidden: true, res: res})
		s.fe.Send(m)
		s.items = append(s.items, item{kind: itemExecute, res: res})
	case *pgproto3.Close:
		if s.skipping {
			return false, nil
		}
		if m.ObjectType == 'S' {
			delete(s.statements, m.Name)
		} else {
			delete(s.portals, m.Name)
		}
		s.fe.Send(m)
		s.items = append(s.items, item{kind: itemClose})
	case *pgproto3.Sync:
		s.skipping = false
		s.fe.Send(m)
		s.items = append(s.items, item{kind: itemSync})
		return true, nil
	case *pgproto3.Flush:
		s.fe.Send(m)
		return true, nil
	case *pgproto3.Query:
		if s.skipping {
			return false, nil
		}
		st, ref := s.check(m.String)
		if ref != nil {
			s.refuseSimple(ref)
			return true, nil
		}
		s.fe.Send(m)
		s.items = append(s.items, item{kind: itemQuery, res: s.newResult(st)})
		return true, nil
	case *pgproto3.FunctionCall:
		s.refuseSimple(&refusal{reason: ReasonFunctionCall, detail: "oid " + strconv.FormatUint(uint64(m.Function), 10),
			msg: "the function-call message is not allowed"})
		return true, nil
	case *pgproto3.Terminate:
		s.fe.Send(m)
		s.fe.Flush()
		return false, errTerminate
	case *pgproto3.CopyData, *pgproto3.CopyDone, *pgproto3.CopyFail:
		// Never in copy mode (COPY is refused): PostgreSQL ignores these.
	default:
		return false, fmt.Errorf("unexpected message %T from the sandbox", msg)
	}
	return false, nil
}

func (s *session) newResult(st *prepared) *result {
	return &result{st: st, countPos: -1}
}

// check decides whether sql may run: a built-in or a listed statement.
// Decisions are cached by text (a prepared and a refusal are read-only).
func (s *session) check(sql string) (*prepared, *refusal) {
	if c, ok := s.cfg.checks.get(sql); ok {
		return c.st, c.ref
	}
	st, ref := s.decide(sql)
	s.cfg.checks.put(sql, checked{st, ref})
	return st, ref
}

func (s *session) decide(sql string) (*prepared, *refusal) {
	st, err := parseOne(sql)
	switch {
	case errors.Is(err, errMultiple):
		return nil, &refusal{reason: ReasonMultiple, msg: "more than one statement in one query string"}
	case errors.Is(err, errCopy):
		return nil, &refusal{reason: ReasonCopy, msg: "COPY is not allowed"}
	case err != nil:
		return nil, &refusal{reason: ReasonNotListed, detail: "unparseable", msg: "statement not on the list of rule " + strconv.Quote(s.cfg.rule) + " (it does not parse)"}
	}
	if st.builtin != "" {
		return &prepared{builtin: st.builtin}, nil
	}
	q := s.cfg.queries[st.fingerprint]
	if q == nil {
		return nil, &refusal{reason: ReasonNotListed, detail: st.fingerprint,
			msg: fmt.Sprintf("statement not on the list of rule %q (fingerprint %s)", s.cfg.rule, st.fingerprint)}
	}
	col := q.denied
	if col == "" {
		col = deniedTarget(s.cfg.deny, targetList(st.node))
	}
	if col != "" {
		return nil, deniedColumn(q, col)
	}
	return &prepared{q: q}, nil
}

func deniedColumn(q *listedQuery, col string) *refusal {
	return &refusal{reason: ReasonDenied, query: q.name, detail: col,
		msg: fmt.Sprintf("column %q is denied (query %q)", col, q.name)}
}

// record counts and reports a refusal.
func (s *session) record(ref *refusal) {
	s.flow.Report.Deny(proxies.Denial{Reason: ref.reason, Detail: ref.detail})
	s.p.metrics.statement(s.cfg.rule, queryLabel(ref.query), ref.reason)
}

// refuseExtended refuses a Parse: the upstream describes a statement that
// does not exist in its place, and the pipeline is skipped until Sync.
func (s *session) refuseExtended(ref *refusal, name string) {
	s.record(ref)
	if name == "" {
		// A failed Parse drops the unnamed statement: so must this one,
		// or a later Bind would run the previous one.
		delete(s.statements, "")
		s.fe.Send(&pgproto3.Close{ObjectType: 'S', Name: ""})
		s.items = append(s.items, item{kind: itemHiddenClose})
	}
	s.fe.Send(&pgproto3.Describe{ObjectType: 'S', Name: poisonName})
	s.items = append(s.items, item{kind: itemPoison, ref: ref})
	s.skipping = true
}

// refuseSimple refuses a Query or FunctionCall: error, then ReadyForQuery.
func (s *session) refuseSimple(ref *refusal) {
	s.record(ref)
	s.fe.Send(&pgproto3.Describe{ObjectType: 'S', Name: poisonName})
	s.fe.Send(&pgproto3.Sync{})
	s.items = append(s.items, item{kind: itemPoison, ref: ref}, item{kind: itemSync})
}

// errProtocol is an upstream response the proxy cannot follow.
var errProtocol = errors.New("unexpected message from the upstream")

// next is the upstream's next response, async messages forwarded.
func (s *session) next() (pgproto3.BackendMessage, error) {
	for {
		msg, err := s.fe.Receive()
		if err != nil {
			return nil, fmt.Errorf("reading upstream: %w", err)
		}
		switch m := msg.(type) {
		case *pgproto3.ParameterStatus:
			s.be.Send(sandboxStatus(m, s.startup))
			continue
		case *pgproto3.NoticeResponse, *pgproto3.NotificationResponse:
			s.be.Send(msg)
			continue
		case *pgproto3.CopyInResponse, *pgproto3.CopyOutResponse, *pgproto3.CopyBothResponse:
			return nil, fmt.Errorf("%w: %T", errProtocol, msg)
		}
		return msg, nil
	}
}

// emit forwards msg unless the proxy failed a statement of this pipeline.
func (s *session) emit(msg pgproto3.BackendMessage) {
	if !s.clientSkip {
		s.be.Send(msg)
	}
}

// relay forwards the responses of the queued items, filtering results.
func (s *session) relay() error {
	items := s.items
	s.items = s.items[:0]
	for i := range items {
		if err := s.relayItem(&items[i]); err != nil {
			return err
		}
	}
	return nil
}

func (s *session) relayItem(it *item) error {
	if s.upstreamErr && it.kind != itemSync {
		return nil // the upstream skips until Sync, and answers nothing
	}
	if it.kind == itemQuery {
		return s.relayQuery(it.res)
	}
	for {
		msg, err := s.next()
		if err != nil {
			return err
		}
		if e, ok := msg.(*pgproto3.ErrorResponse); ok {
			if it.kind == itemSync {
				// Committing the implicit transaction failed: the error,
				// then ReadyForQuery.
				s.be.Send(e)
				continue
			}
			s.upstreamErr = true
			if it.kind == itemPoison {
				s.emit(it.ref.response())
			} else {
				s.emit(e)
			}
			if it.res != nil && it.kind == itemExecute {
				s.p.metrics.statement(s.cfg.rule, s.queryName(it.res), "upstream-error")
			}
			return nil
		}
		switch it.kind {
		case itemParse, itemBind, itemClose, itemHiddenClose:
			switch msg.(type) {
			case *pgproto3.ParseComplete, *pgproto3.BindComplete, *pgproto3.CloseComplete:
				if it.kind != itemHiddenClose {
					s.emit(msg)
				}
				return nil
			}
		case itemSync:
			if z, ok := msg.(*pgproto3.ReadyForQuery); ok {
				s.upstreamErr, s.clientSkip = false, false
				s.be.Send(z)
				return nil
			}
		case itemDescribeS:
			switch m := msg.(type) {
			case *pgproto3.ParameterDescription:
				// Held back until the columns are checked.
				pd := &pgproto3.ParameterDescription{ParameterOIDs: append([]uint32(nil), m.ParameterOIDs...)}
				next, err := s.next()
				if err != nil {
					return err
				}
				if e, ok := next.(*pgproto3.ErrorResponse); ok {
					s.upstreamErr = true
					s.emit(e)
					return nil
				}
				if rd, ok := next.(*pgproto3.RowDescription); ok {
					if ref := s.deniedIn(it.res, rd); ref != nil {
						s.fail(it.res, ref)
						return nil
					}
				}
				s.emit(pd)
				s.emit(next)
				return nil
			}
		case itemDescribeP:
			switch m := msg.(type) {
			case *pgproto3.RowDescription:
				if ref := s.deniedIn(it.res, m); ref != nil {
					if s.clientSkip {
						it.res.failed = ref // refused already in this pipeline
					} else {
						s.fail(it.res, ref)
					}
					return nil
				}
				if it.hidden {
					it.res.describe(s.cfg, copyRowDescription(m))
				} else {
					s.emit(m)
				}
				return nil
			case *pgproto3.NoData:
				if it.hidden {
					it.res.describe(s.cfg, nil)
				} else {
					s.emit(m)
				}
				return nil
			}
		case itemExecute:
			done, err := s.result(it.res, msg, true)
			if done || err != nil {
				return err
			}
			continue
		case itemPoison:
			// The nonexistent statement described: impossible, but then
			// the refusal stands all the same.
		}
		if it.kind == itemPoison {
			continue
		}
		return fmt.Errorf("%w: %T", errProtocol, msg)
	}
}

// relayQuery forwards a simple query's results up to ReadyForQuery.
func (s *session) relayQuery(res *result) error {
	for {
		msg, err := s.next()
		if err != nil {
			return err
		}
		switch m := msg.(type) {
		case *pgproto3.ReadyForQuery:
			s.clientSkip = false
			s.be.Send(m)
			return nil
		case *pgproto3.RowDescription:
			res.rows, res.withheld, res.failed = 0, 0, nil
			if ref := s.deniedIn(res, m); ref != nil {
				s.fail(res, ref)
				continue
			}
			// The RowDescription stays valid until the next Receive:
			// keep a copy for the rows.
			res.describe(s.cfg, copyRowDescription(m))
			s.emit(m)
		case *pgproto3.ErrorResponse:
			if res.failed == nil {
				s.emit(m)
			}
			s.clientSkip = false
		default:
			if _, err := s.result(res, msg, false); err != nil {
				return err
			}
		}
	}
}

// result handles one message of a statement's result: DataRow filtered,
// CommandComplete adjusted; done at the statement's end.
func (s *session) result(res *result, msg pgproto3.BackendMessage, extended bool) (done bool, err error) {
	switch m := msg.(type) {
	case *pgproto3.DataRow:
		if res.failed != nil {
			return false, nil
		}
		if !res.meetsMinCount(s.cfg, m) {
			res.withheld++
			return false, nil
		}
		res.rows++
		total := res.rows
		if res.sent != nil {
			*res.sent++
			total = *res.sent
		}
		if s.cfg.maxRows > 0 && total > s.cfg.maxRows && res.st != nil && res.st.q != nil {
			q := res.st.q
			s.fail(res, &refusal{reason: ReasonMaxRows, query: q.name, detail: q.fingerprint,
				msg: fmt.Sprintf("query %q returned more than %d rows (rows.maxRows)", q.name, s.cfg.maxRows)})
			return false, nil
		}
		s.emit(m)
		return false, nil
	case *pgproto3.CommandComplete:
		s.finish(res)
		if res.failed == nil {
			s.emit(&pgproto3.CommandComplete{CommandTag: adjustTag(m.CommandTag, res.withheld)})
		}
		return true, nil
	case *pgproto3.EmptyQueryResponse, *pgproto3.PortalSuspended:
		s.finish(res)
		if res.failed == nil {
			s.emit(m)
		}
		return true, nil
	}
	return false, fmt.Errorf("%w: %T in a result", errProtocol, msg)
}

// finish counts a statement that ran to its end.
func (s *session) finish(res *result) {
	if res.failed != nil {
		return // counted when it failed
	}
	q := s.queryName(res)
	s.p.metrics.statement(s.cfg.rule, q, "")
	s.p.metrics.rowsOut(s.cfg.rule, q, res.rows, res.withheld)
}

func (s *session) queryName(res *result) string {
	if res.st == nil {
		return queryLabel("")
	}
	if res.st.q == nil {
		return "builtin"
	}
	return res.st.q.name
}

// fail ends a statement with a refusal on its results: the sandbox gets
// the error, and (extended protocol) nothing more until Sync.
func (s *session) fail(res *result, ref *refusal) {
	if res.failed != nil {
		return
	}
	res.failed = ref
	s.record(ref)
	s.emit(ref.response())
	s.clientSkip = true
}

// deniedIn is the refusal of a result with a denied column, if any.
func (s *session) deniedIn(res *result, rd *pgproto3.RowDescription) *refusal {
	if res.st != nil && res.st.builtin != "" {
		return nil
	}
	for _, f := range rd.Fields {
		if s.cfg.deny[string(f.Name)] {
			q := &listedQuery{name: queryLabel("")}
			if res.st != nil && res.st.q != nil {
				q = res.st.q
			}
			return deniedColumn(q, string(f.Name))
		}
	}
	return nil
}

func copyRowDescription(m *pgproto3.RowDescription) *pgproto3.RowDescription {
	c := &pgproto3.RowDescription{Fields: make([]pgproto3.FieldDescription, len(m.Fields))}
	for i, f := range m.Fields {
		f.Name = append([]byte(nil), f.Name...)
		c.Fields[i] = f
	}
	return c
}

// adjustTag takes withheld rows off a SELECT or FETCH command tag.
func adjustTag(tag []byte, withheld int64) []byte {
	if withheld == 0 {
		return tag
	}
	verb, n, ok := strings.Cut(string(tag), " ")
	if !ok || (verb != "SELECT" && verb != "FETCH") {
		return tag
	}
	rows, err := strconv.ParseInt(n, 10, 64)
	if err != nil {
		return tag
	}
	return []byte(verb + " " + strconv.FormatInt(max(rows-withheld, 0), 10))
}

func queryLabel(name string) string {
	if name == "" {
		return "-"
	}
	return name
}
