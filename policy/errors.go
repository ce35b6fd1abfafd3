package policy

import (
	"fmt"
	"sort"
	"strings"
)

// FieldError is one problem in a policy, located by its field path
// (spec.egress[1].ports[0].port) and, when the policy came from YAML, by the
// line it was found on.
type FieldError struct {
	Path string
	Msg  string
	Line int // 0 when unknown
}

func (e *FieldError) Error() string {
	var b strings.Builder
	if e.Path != "" {
		b.WriteString(e.Path)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	if e.Line > 0 {
		fmt.Fprintf(&b, " (line %d)", e.Line)
	}
	return b.String()
}

// ErrorList is every problem found in a policy. Parse, Validate and Compile
// return it (as error) so callers can list all problems at once; use
// errors.As to get at the individual FieldErrors.
type ErrorList []*FieldError

func (l ErrorList) Error() string {
	msgs := make([]string, len(l))
	for i, e := range l {
		msgs[i] = e.Error()
	}
	return strings.Join(msgs, "\n")
}

// err returns l as an error, or nil when l is empty (a nil ErrorList in an
// error interface is not a nil error).
func (l ErrorList) err() error {
	if len(l) == 0 {
		return nil
	}
	// Problems read best in file order; errors without a line go last, in
	// the order in which they were found.
	sort.SliceStable(l, func(i, j int) bool {
		li, lj := l[i].Line, l[j].Line
		return li > 0 && (lj == 0 || li < lj)
	})
	return l
}

// Warning is a problem that does not make a policy invalid but probably
// is not what its author meant: a rule that can never match, a shadowed or
// overlapping rule, a duplicate.
type Warning struct {
	Path string
	Msg  string
	Line int // 0 when unknown
}

func (w Warning) String() string {
	return (&FieldError{Path: w.Path, Msg: w.Msg, Line: w.Line}).Error()
}
