package api

import (
	"errors"
	"net/url"
	"reflect"
	"testing"
)

func TestEventFilterMatch(t *testing.T) {
	drop := DenyEvent{Sandbox: "abc/eth0", Source: "datapath", Verdict: VerdictDrop, Reason: "flow-limit", Rule: "api", Proto: "TCP"}
	dns := DenyEvent{Sandbox: "abc/eth0", Source: "dns", Verdict: VerdictRefuse, Reason: "not_allowed", Proto: "UDP"}
	for _, c := range []struct {
		f         EventFilter
		drop, dns bool
	}{
		{EventFilter{}, true, true},
		{EventFilter{Sandbox: "abc"}, true, true},
		{EventFilter{Sandbox: "abc/eth0"}, true, true},
		{EventFilter{Sandbox: "ab"}, false, false},
		{EventFilter{Verdicts: []string{VerdictRefuse}}, false, true},
		{EventFilter{Verdicts: []string{VerdictRefuse, VerdictDrop}}, true, true},
		{EventFilter{Reasons: []string{"no-rule", "flow-limit"}}, true, false},
		{EventFilter{Rules: []string{"api"}}, true, false},
		{EventFilter{Protos: []string{"udp"}}, false, true},
		{EventFilter{Protos: []string{"tcp"}, Verdicts: []string{VerdictRefuse}}, false, false},
	} {
		if got := c.f.Match(drop); got != c.drop {
			t.Errorf("%+v matches the drop: %v", c.f, got)
		}
		if got := c.f.Match(dns); got != c.dns {
			t.Errorf("%+v matches the DNS refusal: %v", c.f, got)
		}
	}
}

func TestEventFilterQueryRoundTrip(t *testing.T) {
	f := EventFilter{Sandbox: "abc", Verdicts: []string{"drop"}, Reasons: []string{"no-rule", "spoofed-ip"}, Rules: []string{"api"}, Protos: []string{"TCP"}, Headers: true}
	got, err := ParseEventFilter(f.Query())
	if err != nil || !reflect.DeepEqual(got, f) {
		t.Fatalf("round trip: %+v, %v; want %+v", got, err, f)
	}
}

func TestParseEventFilterNamesTheParameter(t *testing.T) {
	for q, field := range map[string]string{
		"verdict=pass":      "verdict",
		"reason=no-rule,":   "reason",
		"proto=,tcp":        "proto",
		"rule=a,,b":         "rule",
		"headers=yes":       "headers",
		"sandbox=x&color=1": "color",
	} {
		v, _ := url.ParseQuery(q)
		_, err := ParseEventFilter(v)
		var ae *Error
		if !errors.As(err, &ae) || ae.Field != field {
			t.Errorf("%s: %v, want an error naming %s", q, err, field)
		}
	}
}
