package extension

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/cleanwall/cleanwall/policy"
)

func TestDecode(t *testing.T) {
	for _, tc := range []struct {
		msg string
		ok  bool
	}{
		{`{"type":"hello","version":1}`, true},
		{`{"type":"hello","version":1,"reports_end":true,"future":[1,2]}`, true},
		{` {"type":"accept","id":7} `, true},
		{`{"type":"refuse","id":7,"reason":"busy"}`, true},
		{`{"type":"refuse","id":7,"reason":"policy.v2_no-route"}`, true},
		{`{"type":"bytes","id":7,"out":0,"in":9007199254740991}`, true},
		{`{"type":"deny","id":7,"reason":"pattern","status":403}`, true},
		{`{"type":"end","id":7,"result":"budget-exceeded"}`, true},

		{`{"type":"hello"}`, false},
		{`{"type":"accept","id":0}`, false},
		{`{"type":"accept","id":-1}`, false},
		{`{"type":"accept","id":9007199254740992}`, false},
		{`{"type":"accept","id":"7"}`, false},
		{`{"type":"refuse","id":7}`, false},
		{`{"type":"refuse","id":7,"reason":""}`, false},
		{`{"type":"refuse","id":7,"reason":"-busy"}`, false},
		{`{"type":"refuse","id":7,"reason":"Busy"}`, false},
		{`{"type":"bytes","id":7,"out":1}`, false},
		{`{"type":"bytes","id":7,"out":-1,"in":0}`, false},
		{`{"type":"bytes","id":7,"out":1.5,"in":0}`, false},
		{`{"type":"deny","id":7}`, false},
		{`{"type":"deny","id":7,"reason":"x","status":1000}`, false},
		{`{"type":"end","id":7}`, false},
		{`{"type":"end","id":7,"result":"policy-closed"}`, false},
		{`{"type":"Accept","id":7}`, false},
		{`{"id":7}`, false},
		{`null`, false},
		{`{"type":"accept","id":7}{"type":"accept","id":8}`, false},
		{``, false},
	} {
		_, err := decode([]byte(tc.msg))
		if (err == nil) != tc.ok {
			t.Errorf("decode(%s): %v; want ok=%v", tc.msg, err, tc.ok)
		}
		if err != nil && !errors.Is(err, errMessage) {
			t.Errorf("decode(%s): %v does not wrap errMessage", tc.msg, err)
		}
	}
}

// FuzzDecode: whatever the extension sends, decode either refuses it or
// returns a message within the protocol's bounds.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"type":"hello","version":1,"reports_end":true}`,
		`{"type":"refuse","id":7,"reason":"busy"}`,
		`{"type":"bytes","id":7,"out":3,"in":4}`,
		`{"type":"deny","id":7,"reason":"pattern","status":403,"method":"GET","path":"/x","detail":"d"}`,
		`{"type":"end","id":7,"result":"error","error":"boom"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decode(b)
		if err != nil {
			return
		}
		switch m.Type {
		case typeHello:
			if m.Version == nil {
				t.Fatal("hello without version")
			}
			return
		case typeAccept, typeRefuse, typeBytes, typeDeny, typeEnd:
		default:
			t.Fatalf("type %q accepted", m.Type)
		}
		if m.ID == nil || *m.ID == 0 || *m.ID > maxCount {
			t.Fatalf("id %v accepted", m.ID)
		}
		if (m.Type == typeRefuse || m.Type == typeDeny) && !validToken(*m.Reason) {
			t.Fatalf("reason %q accepted", *m.Reason)
		}
		if m.Type == typeBytes && (*m.Out < 0 || *m.In < 0) {
			t.Fatal("negative bytes accepted")
		}
		if m.Type == typeEnd {
			if _, ok := endResults[*m.Result]; !ok {
				t.Fatalf("result %q accepted", *m.Result)
			}
		}
	})
}

// What the proxy sends parses back to what it meant.
func TestEncodeFlowRoundTrip(t *testing.T) {
	b, err := encodeFlow(flowOut{Type: typeFlow, Version: Version, ID: 3, Sandbox: "sb", Rule: "r", Mode: "open", Protocol: "x",
		Src: endpoint{"fd00::2", 4000}, Dst: endpoint{"2001:db8::1", 443}})
	if err != nil {
		t.Fatal(err)
	}
	var back flowOut
	if err := json.Unmarshal(b, &back); err != nil || back.ID != 3 || back.Dst.IP != "2001:db8::1" || back.Hosts == nil {
		t.Fatalf("%s: %+v %v", b, back, err)
	}
	if !strings.Contains(string(b), `"hosts":[]`) {
		t.Fatalf("no hosts must encode as an empty list: %s", b)
	}
}

func TestConfigure(t *testing.T) {
	p := &Proxy{Name: "requestlog"}
	budget := int64(10)
	for _, tc := range []struct {
		name string
		rule *policy.Rule
		err  string // a prefix; "" means accepted
	}{
		{"open-with-its-protocol", testRule("requestlog"), ""},
		{"other-protocol", testRule("http"), "open.protocol: "},
		{"open-without-block", &policy.Rule{Mode: policy.ModeOpen, Spec: &policy.EgressRule{Mode: "open"}}, "open.protocol: "},
		{"secure", &policy.Rule{Mode: policy.ModeSecure, Spec: &policy.EgressRule{Mode: "secure", Secure: &policy.SecureSpec{Protocol: "tcp"}}}, "mode: "},
		{"budget", &policy.Rule{Mode: policy.ModeOpen, Spec: &policy.EgressRule{Mode: "open", Open: &policy.OpenSpec{Protocol: "requestlog", TCP: &policy.TCPSpec{MaxBytesOut: &budget}}}}, "open.tcp.maxBytesOut: "},
		{"http-block", &policy.Rule{Mode: policy.ModeOpen, Spec: &policy.EgressRule{Mode: "open", Open: &policy.OpenSpec{Protocol: "requestlog", HTTP: &policy.HTTPSpec{}}}}, "open.http: "},
	} {
		_, err := p.Configure(tc.rule)
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.err != "" && (err == nil || !strings.HasPrefix(err.Error(), tc.err)):
			t.Errorf("%s: %v; want an error starting %q", tc.name, err, tc.err)
		}
	}
	if k := p.Key(); k.Mode != "open" || k.Protocol != "requestlog" {
		t.Errorf("key %v", k)
	}
}

func TestParseSpec(t *testing.T) {
	for _, tc := range []struct {
		in, name, path string
	}{
		{"requestlog=unix:/run/cleanwall/requestlog.sock", "requestlog", "/run/cleanwall/requestlog.sock"},
		{"pg-audit=unix:/run/x/../pg.sock", "pg-audit", "/run/pg.sock"},
		{"requestlog", "", ""},
		{"requestlog=/run/x.sock", "", ""},
		{"requestlog=unix:run/x.sock", "", ""},
		{"requestlog=tcp:127.0.0.1:9", "", ""},
		{"http=unix:/run/x.sock", "", ""},
		{"tcp=unix:/run/x.sock", "", ""},
		{"Request=unix:/run/x.sock", "", ""},
		{"1x=unix:/run/x.sock", "", ""},
		{"x-=unix:/run/x.sock", "", ""},
		{"=unix:/run/x.sock", "", ""},
	} {
		name, path, err := ParseSpec(tc.in)
		if name != tc.name || path != tc.path || (err == nil) != (tc.name != "") {
			t.Errorf("ParseSpec(%q) = %q, %q, %v", tc.in, name, path, err)
		}
	}
}
