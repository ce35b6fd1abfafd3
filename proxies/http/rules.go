package httpproxy

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
)

// Rules is one egress rule's open.http block, translated by the daemon from
// the policy. ServeConn checks it with Validate and never modifies it, so
// one Rules may serve many connections concurrently.
type Rules struct {
	// Rules: a request is allowed only if at least one RequestRule matches
	// it. No rules: every request is refused.
	Rules []RequestRule
	// MaxBodyBytes is the largest request body allowed, counted after
	// chunked decoding. 0 allows no body at all; NoBodyLimit lifts the
	// policy limit (Limits.MaxHeldBodyBytes still bounds held bodies).
	MaxBodyBytes int64
	// DenyBodyPatterns refuse a request whose decoded body matches any of
	// them. Each is matched against the whole body, which is therefore held
	// before forwarding (see the package documentation).
	DenyBodyPatterns []*regexp.Regexp
	// DenyPatterns refuse a request whose path, query, any header field
	// name or value, or decoded body matches any of them (decoded as the
	// package documentation says). Bodies are held as for
	// DenyBodyPatterns.
	DenyPatterns []*regexp.Regexp
	// AllowUpgrade lists the protocols a request may Upgrade to, compared
	// case-insensitively with the protocol name before any "/version".
	// Empty: every upgrade (websocket, h2c) is refused. After an allowed
	// 101 Switching Protocols the connection is relayed uninspected.
	AllowUpgrade []string
}

// RequestRule allows requests that match all of its non-empty lists. An
// empty list does not constrain its dimension; the policy layer decides
// whether to allow that.
type RequestRule struct {
	// Methods are compared exactly (methods are case-sensitive).
	Methods []string
	// Paths are patterns over the decoded path (never the query): literal
	// segments match exactly, "*" matches one non-empty segment, "**" (only
	// as the last segment) matches the rest of the path, including
	// nothing: "/v1/**" matches "/v1", "/v1/" and "/v1/a/b".
	Paths []string
	// ContentTypes are media types ("application/json"), compared
	// case-insensitively with the request's Content-Type without its
	// parameters. They apply to requests with a body only; a body without
	// a Content-Type matches no list.
	ContentTypes []string
}

// matchesBodies reports whether any pattern applies to request bodies:
// they are then held, decoded and matched before forwarding.
func (r *Rules) matchesBodies() bool {
	return len(r.DenyBodyPatterns) > 0 || len(r.DenyPatterns) > 0
}

// NoBodyLimit as Rules.MaxBodyBytes lifts the policy's body size limit.
const NoBodyLimit int64 = -1

// ErrInvalidRules is wrapped by the errors of Rules.Validate.
var ErrInvalidRules = errors.New("invalid http rules")

// Validate reports the first malformed entry, naming it by its path
// ("rules[0].paths[1]: ..."). ServeConn refuses to serve with invalid rules.
func (r *Rules) Validate() error {
	if r == nil {
		return fmt.Errorf("%w: no rules", ErrInvalidRules)
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidRules, fmt.Sprintf(format, args...))
	}
	for i, rr := range r.Rules {
		for j, m := range rr.Methods {
			if !isToken(m) {
				return bad("rules[%d].methods[%d]: %q is not a method", i, j, m)
			}
		}
		for j, p := range rr.Paths {
			if err := checkPattern(p); err != nil {
				return bad("rules[%d].paths[%d]: %q: %v", i, j, p, err)
			}
		}
		for j, ct := range rr.ContentTypes {
			if _, ok := mediaType(ct); !ok {
				return bad("rules[%d].contentTypes[%d]: %q is not a media type", i, j, ct)
			}
		}
	}
	if r.MaxBodyBytes < NoBodyLimit {
		return bad("maxBodyBytes: %d is negative", r.MaxBodyBytes)
	}
	for i, re := range r.DenyBodyPatterns {
		if re == nil {
			return bad("denyBodyPatterns[%d]: nil", i)
		}
	}
	for i, re := range r.DenyPatterns {
		if re == nil {
			return bad("denyPatterns[%d]: nil", i)
		}
	}
	for i, u := range r.AllowUpgrade {
		if !isToken(u) {
			return bad("allowUpgrade[%d]: %q is not a protocol name", i, u)
		}
	}
	return nil
}

// checkPattern accepts "/" followed by segments that are literals (no '*',
// no "." or ".."), "*", or a final "**". An empty segment may only end the
// pattern (a trailing slash), as in the paths it matches.
func checkPattern(p string) error {
	if !strings.HasPrefix(p, "/") {
		return errors.New("does not start with /")
	}
	for s := p[1:]; ; {
		seg, next, more := strings.Cut(s, "/")
		switch {
		case seg == "**" && more:
			return errors.New(`"**" is not the last segment`)
		case seg == "" && more:
			return errors.New("empty segment")
		case seg == "." || seg == "..":
			return errors.New("dot segment")
		case seg != "*" && seg != "**" && strings.IndexByte(seg, '*') >= 0:
			return errors.New(`"*" inside a segment`)
		}
		if !more {
			return nil
		}
		s = next
	}
}

// matchPath reports whether the decoded path matches pattern. Both start
// with "/"; the path is normal (no dot or inner empty segments).
func matchPath(pattern, path string) bool {
	p, s := pattern[1:], path[1:]
	for {
		pseg, prest, pmore := strings.Cut(p, "/")
		if pseg == "**" {
			return true
		}
		sseg, srest, smore := strings.Cut(s, "/")
		if pseg == "*" {
			if sseg == "" {
				return false
			}
		} else if pseg != sseg {
			return false
		}
		switch {
		case pmore && smore:
			p, s = prest, srest
		case pmore:
			return prest == "**"
		default:
			return !smore
		}
	}
}

// mediaType returns the "type/subtype" of a Content-Type value without its
// parameters, or false when it is not one.
func mediaType(v string) (string, bool) {
	mt, _, _ := strings.Cut(v, ";")
	mt = strings.Trim(mt, " \t")
	typ, sub, ok := strings.Cut(mt, "/")
	if !ok || !isToken(typ) || !isToken(sub) {
		return "", false
	}
	return mt, true
}

// match refuses a request no rule allows. The reason names the furthest
// any rule got: the method, then the path, then the content type.
func (r *Rules) match(q *request) *refusal {
	stage := 0
	for _, rr := range r.Rules {
		if len(rr.Methods) > 0 && !slices.Contains(rr.Methods, q.method) {
			continue
		}
		stage = max(stage, 1)
		if len(rr.Paths) > 0 && !slices.ContainsFunc(rr.Paths, func(p string) bool { return matchPath(p, q.path) }) {
			continue
		}
		stage = 2
		if q.hasBody() && len(rr.ContentTypes) > 0 && !contentTypeIn(q.contentType, rr.ContentTypes) {
			continue
		}
		return nil
	}
	reason := [...]Reason{ReasonMethod, ReasonPath, ReasonContentType}[stage]
	return refuse(reason, "no rule allows %s %s", truncate(q.method, maxDenialMethod), truncate(q.rawPath, maxDenialPath))
}

func contentTypeIn(v string, list []string) bool {
	mt, ok := mediaType(v)
	if !ok {
		return false
	}
	for _, ct := range list {
		if want, _ := mediaType(ct); strings.EqualFold(mt, want) {
			return true
		}
	}
	return false
}

// allowsUpgrade reports whether an Upgrade value lists at least one
// protocol ("websocket", "foo/2") and only allowed ones.
func (r *Rules) allowsUpgrade(v string) bool {
	seen := false
	ok := eachListElement(v, func(proto string) bool {
		name, version, _ := strings.Cut(proto, "/")
		seen = true
		return isToken(name) && (version == "" || isToken(version)) &&
			slices.ContainsFunc(r.AllowUpgrade, func(a string) bool { return strings.EqualFold(a, name) })
	})
	return ok && seen
}
