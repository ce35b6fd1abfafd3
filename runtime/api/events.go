package api

import (
	"fmt"
	"net/url"
	"slices"
	"strings"
)

// EventFilter selects deny events. Every non-empty list must match (any of
// its values); an empty one matches all.
type EventFilter struct {
	// Sandbox is a CNI container ID (every interface of it) or
	// containerID/ifName.
	Sandbox  string
	Verdicts []string // VerdictDrop, VerdictRefuse
	Reasons  []string // e.g. no-rule, spoofed-ip, not_allowed
	Rules    []string // egress rule names
	Protos   []string // TCP, UDP, ICMP, ICMPv6, ARP, ... (any case)
	// Headers asks for the sampled headers of dropped packets.
	Headers bool
}

// Match reports whether ev passes the filter.
func (f EventFilter) Match(ev DenyEvent) bool {
	if f.Sandbox != "" && ev.Sandbox != f.Sandbox && !strings.HasPrefix(ev.Sandbox, f.Sandbox+"/") {
		return false
	}
	in := func(list []string, v string, fold bool) bool {
		if len(list) == 0 {
			return true
		}
		return slices.ContainsFunc(list, func(want string) bool {
			return want == v || fold && strings.EqualFold(want, v)
		})
	}
	return in(f.Verdicts, ev.Verdict, false) && in(f.Reasons, ev.Reason, false) &&
		in(f.Rules, ev.Rule, false) && in(f.Protos, ev.Proto, true)
}

// Query encodes the filter for PathEvents.
func (f EventFilter) Query() url.Values {
	q := url.Values{}
	if f.Sandbox != "" {
		q.Set("sandbox", f.Sandbox)
	}
	for key, list := range map[string][]string{"verdict": f.Verdicts, "reason": f.Reasons, "rule": f.Rules, "proto": f.Protos} {
		if len(list) > 0 {
			q.Set(key, strings.Join(list, ","))
		}
	}
	if f.Headers {
		q.Set("headers", "1")
	}
	return q
}

// ParseEventFilter reads a filter from PathEvents' query (or a CLI's
// comma-separated flags), naming the parameter that is wrong.
func ParseEventFilter(q url.Values) (EventFilter, error) {
	f := EventFilter{Sandbox: q.Get("sandbox")}
	for key := range q {
		switch key {
		case "sandbox", "verdict", "reason", "rule", "proto", "headers":
		default:
			return f, &Error{Field: key, Message: "unknown filter (want sandbox, verdict, reason, rule, proto or headers)"}
		}
	}
	var err error
	if f.Verdicts, err = SplitList("verdict", q["verdict"]); err != nil {
		return f, err
	}
	for _, v := range f.Verdicts {
		if v != VerdictDrop && v != VerdictRefuse {
			return f, &Error{Field: "verdict", Message: fmt.Sprintf("%q: want %s or %s", v, VerdictDrop, VerdictRefuse)}
		}
	}
	if f.Reasons, err = SplitList("reason", q["reason"]); err != nil {
		return f, err
	}
	if f.Rules, err = SplitList("rule", q["rule"]); err != nil {
		return f, err
	}
	if f.Protos, err = SplitList("proto", q["proto"]); err != nil {
		return f, err
	}
	switch h := q.Get("headers"); h {
	case "", "0", "false":
	case "1", "true":
		f.Headers = true
	default:
		return f, &Error{Field: "headers", Message: fmt.Sprintf("%q: want 1 or 0", h)}
	}
	return f, nil
}

// SplitList splits comma-separated values (repeated or not) into a list;
// an empty item (",," or a trailing comma) is an error naming field.
func SplitList(field string, values []string) ([]string, error) {
	var out []string
	for _, v := range values {
		for item := range strings.SplitSeq(v, ",") {
			item = strings.TrimSpace(item)
			if item == "" {
				return nil, &Error{Field: field, Message: fmt.Sprintf("%q: an empty item", v)}
			}
			out = append(out, item)
		}
	}
	return out, nil
}
