package httpproxy

import (
	"errors"
	"net/netip"
	"regexp"
	"strings"
	"testing"
)

func TestMatchPath(t *testing.T) {
	for _, tc := range []struct {
		pattern, path string
		want          bool
	}{
		{"/v1/results", "/v1/results", true},
		{"/v1/results", "/v1/results/", false},
		{"/v1/results", "/v1/result", false},
		{"/v1/results", "/v1/results/x", false},
		{"/v1/results/*", "/v1/results/x", true},
		{"/v1/results/*", "/v1/results/", false},
		{"/v1/results/*", "/v1/results", false},
		{"/v1/results/*", "/v1/results/x/y", false},
		{"/v1/*/items", "/v1/a/items", true},
		{"/v1/*/items", "/v1/a/b/items", false},
		{"/v1/**", "/v1", true},
		{"/v1/**", "/v1/", true},
		{"/v1/**", "/v1/a/b/c", true},
		{"/v1/**", "/v2/a", false},
		{"/v1/**", "/v10", false},
		{"/**", "/", true},
		{"/**", "/anything/at/all", true},
		{"/", "/", true},
		{"/", "/a", false},
		{"/*", "/", false},
		{"/*", "/a", true},
		{"/v1/results/", "/v1/results/", true},
	} {
		if got := matchPath(tc.pattern, tc.path); got != tc.want {
			t.Errorf("matchPath(%q, %q) = %v, want %v", tc.pattern, tc.path, got, tc.want)
		}
	}
}

func TestNormalPath(t *testing.T) {
	for _, tc := range []struct {
		raw, want string
		reason    Reason // "" when accepted
	}{
		{"/v1/results", "/v1/results", ""},
		{"/", "/", ""},
		{"/v1/results/", "/v1/results/", ""},
		{"/a%20b/%C3%A9", "/a b/\xc3\xa9", ""},
		{"/re%73ults", "/results", ""},
		{"/a%3Fb", "/a?b", ""},
		{"/a;b=c/d", "/a;b=c/d", ""},
		{"/v1/../admin", "", ReasonBadPath},
		{"/v1/..", "", ReasonBadPath},
		{"/v1/.", "", ReasonBadPath},
		{"/v1/..;x/admin", "", ReasonBadPath},
		{"/v1/%2e%2e/admin", "", ReasonBadPath},
		{"/v1/%2E/admin", "", ReasonBadPath},
		{"/v1/.%2e/admin", "", ReasonBadPath},
		{"/v1%2fadmin", "", ReasonBadPath},
		{"/v1%5cadmin", "", ReasonBadPath},
		{"/v1/%252e%252e", "", ReasonBadPath},
		{"/v1/%00", "", ReasonBadPath},
		{"/v1/%0d%0a", "", ReasonBadPath},
		{"/v1/%zz", "", ReasonBadPath},
		{"/v1/%4", "", ReasonBadPath},
		{"//v1", "", ReasonBadPath},
		{"/v1//x", "", ReasonBadPath},
		{"/v1/a|b", "", ReasonBadTarget},
		{"/v1/a\"b", "", ReasonBadTarget},
		{"/v1/{x}", "", ReasonBadTarget},
	} {
		got, rf := normalPath(tc.raw)
		switch {
		case tc.reason == "" && rf != nil:
			t.Errorf("normalPath(%q) refused: %v", tc.raw, rf)
		case tc.reason != "" && (rf == nil || rf.reason != tc.reason):
			t.Errorf("normalPath(%q) = %q, %v; want %s", tc.raw, got, rf, tc.reason)
		case tc.reason == "" && got != tc.want:
			t.Errorf("normalPath(%q) = %q, want %q", tc.raw, got, tc.want)
		}
	}
}

func TestHostMatcher(t *testing.T) {
	for _, tc := range []struct {
		dst   string
		hosts []string
		host  string
		want  bool
	}{
		{"198.51.100.10:8080", []string{"api.example.test"}, "api.example.test:8080", true},
		{"198.51.100.10:8080", []string{"api.example.test"}, "API.Example.Test:8080", true},
		{"198.51.100.10:8080", []string{"api.example.test"}, "api.example.test", false},
		{"198.51.100.10:8080", []string{"api.example.test"}, "api.example.test:08080", false},
		{"198.51.100.10:8080", []string{"api.example.test"}, "api.example.test.:8080", false},
		{"198.51.100.10:8080", []string{"api.example.test"}, "evil.example.test:8080", false},
		{"198.51.100.10:8080", []string{"api.example.test"}, "198.51.100.10:8080", false},
		{"198.51.100.10:80", []string{"api.example.test"}, "api.example.test", true},
		{"198.51.100.10:80", []string{"api.example.test"}, "api.example.test:80", true},
		{"198.51.100.10:80", []string{"198.51.100.10"}, "198.51.100.10", true},
		{"198.51.100.10:80", []string{"198.51.100.10"}, "[::ffff:198.51.100.10]", false},
		{"[2001:db8::10]:80", []string{"2001:db8::10"}, "[2001:db8::10]", true},
		{"[2001:db8::10]:80", []string{"2001:db8::10"}, "[2001:DB8:0::10]:80", true},
		{"[2001:db8::10]:80", []string{"2001:db8::10"}, "2001:db8::10", false},
		{"198.51.100.10:80", nil, "api.example.test", false},
	} {
		m, err := newHostMatcher(Flow{Dst: netip.MustParseAddrPort(tc.dst), Hosts: tc.hosts})
		if err != nil {
			t.Fatal(err)
		}
		if got := validHostPort(tc.host) && m.allows(tc.host); got != tc.want {
			t.Errorf("dst %s hosts %v: allows(%q) = %v, want %v", tc.dst, tc.hosts, tc.host, got, tc.want)
		}
	}
}

func TestRulesValidate(t *testing.T) {
	for _, tc := range []struct {
		rules Rules
		field string // "" when valid
	}{
		{rules: *policyRules()},
		{rules: Rules{}},
		{rules: Rules{Rules: []RequestRule{{Paths: []string{"v1"}}}}, field: "rules[0].paths[0]"},
		{rules: Rules{Rules: []RequestRule{{Paths: []string{"/v1/**/x"}}}}, field: "rules[0].paths[0]"},
		{rules: Rules{Rules: []RequestRule{{Paths: []string{"/v1/a*"}}}}, field: "rules[0].paths[0]"},
		{rules: Rules{Rules: []RequestRule{{Paths: []string{"/v1//a"}}}}, field: "rules[0].paths[0]"},
		{rules: Rules{Rules: []RequestRule{{Paths: []string{"/v1/../a"}}}}, field: "rules[0].paths[0]"},
		{rules: Rules{Rules: []RequestRule{{}, {Methods: []string{"GET", "BAD METHOD"}}}}, field: "rules[1].methods[1]"},
		{rules: Rules{Rules: []RequestRule{{ContentTypes: []string{"json"}}}}, field: "rules[0].contentTypes[0]"},
		{rules: Rules{MaxBodyBytes: -2}, field: "maxBodyBytes"},
		{rules: Rules{DenyBodyPatterns: []*regexp.Regexp{nil}}, field: "denyBodyPatterns[0]"},
		{rules: Rules{AllowUpgrade: []string{"web socket"}}, field: "allowUpgrade[0]"},
	} {
		err := tc.rules.Validate()
		switch {
		case tc.field == "" && err != nil:
			t.Errorf("%+v: %v", tc.rules, err)
		case tc.field != "" && (!errors.Is(err, ErrInvalidRules) || !strings.Contains(err.Error(), tc.field+":")):
			t.Errorf("%+v: got %v, want an error naming %s", tc.rules, err, tc.field)
		}
	}
	if err := (*Rules)(nil).Validate(); !errors.Is(err, ErrInvalidRules) {
		t.Errorf("nil rules: %v", err)
	}
}

func TestRuleMatchReasons(t *testing.T) {
	r := &Rules{Rules: []RequestRule{
		{Methods: []string{"GET"}, Paths: []string{"/a"}},
		{Methods: []string{"POST"}, Paths: []string{"/b"}, ContentTypes: []string{"application/json"}},
	}}
	for _, tc := range []struct {
		method, path, ct string
		body             bool
		want             Reason // "" when allowed
	}{
		{"GET", "/a", "", false, ""},
		{"PUT", "/a", "", false, ReasonMethod},
		{"GET", "/b", "", false, ReasonPath},
		{"POST", "/b", "application/json", true, ""},
		{"POST", "/b", "APPLICATION/JSON ; charset=utf-8", true, ""},
		{"POST", "/b", "text/plain", true, ReasonContentType},
		{"POST", "/b", "", true, ReasonContentType},
		{"POST", "/b", "", false, ""}, // content types apply to bodies only
		{"GET", "/a", "text/plain", true, ""},
	} {
		q := &request{method: tc.method, path: tc.path, rawPath: tc.path, contentType: tc.ct, contentLength: -1}
		if tc.body {
			q.contentLength = 1
		}
		var got Reason
		if rf := r.match(q); rf != nil {
			got = rf.reason
		}
		if got != tc.want {
			t.Errorf("%s %s %q body=%v: %q, want %q", tc.method, tc.path, tc.ct, tc.body, got, tc.want)
		}
	}
}

func TestEveryReasonHasAStatus(t *testing.T) {
	for r, info := range reasons {
		if info.status < 400 || info.status > 599 {
			t.Errorf("%s: status %d", r, info.status)
		}
		if info.keepable && info.status != 403 && info.status != 421 && info.status != 417 {
			t.Errorf("%s: keepable with status %d", r, info.status)
		}
	}
}
