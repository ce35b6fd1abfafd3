package cni

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestParseConf(t *testing.T) {
	cases := []struct {
		conf string
		want string // "" = valid
	}{
		{`{"cniVersion":"1.0.0","name":"n","type":"cleanwall-cni","policy":"/p.yaml","socket":"/run/x.sock"}`, ""},
		{`{"cniVersion":"1.1.0","name":"n","type":"cleanwall-cni","cni.dev/valid-attachments":[],"cni.dev/attachments":[]}`, ""},
		{`{"cniVersion":"1.0.0","name":"n","type":"cleanwall-cni","runtimeConfig":{},"args":{}}`, ""},
		{`{"cniVersion":"1.0.0","name":"n","type":"cleanwall-cni","polcy":"/p.yaml"}`, "unknown field(s) in network configuration: polcy"},
		{`{"cniVersion":"1.0.0","name":"n","type":"cleanwall-cni","timeout":"soon"}`, "field timeout"},
		{`{"cniVersion":"1.0.0","name":"n","type":"cleanwall-cni","timeout":"-1s"}`, "field timeout"},
		{`{"cniVersion":"1.0.0","name":"n","type":"cleanwall-cni","socket":"relative.sock"}`, "field socket"},
		{`{"cniVersion":"1.0.0","name":"n","type":"cleanwall-cni","policy":7}`, "network configuration"},
		{`not json`, "malformed network configuration"},
	}
	for _, c := range cases {
		_, err := parseConf([]byte(c.conf))
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s: %v", c.conf, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%s: got %v, want an error containing %q", c.conf, err, c.want)
		}
	}
}

// A runtime that calls the plugin as a library can tell what was wrong with
// the conf from the error's chain, not only from its text.
func TestParseConfErrorsWrap(t *testing.T) {
	_, err := parseConf([]byte(`not json`))
	if !errors.As(err, new(*json.SyntaxError)) {
		t.Errorf("malformed conf: %v (%T), want a *json.SyntaxError in the chain", err, err)
	}
	_, err = parseConf([]byte(`{"cniVersion":"1.0.0","name":"n","type":"cleanwall-cni","policy":7}`))
	if !errors.As(err, new(*json.UnmarshalTypeError)) {
		t.Errorf("policy of the wrong type: %v (%T), want a *json.UnmarshalTypeError in the chain", err, err)
	}
}

func TestPolicyArg(t *testing.T) {
	cases := map[string]string{
		"":                               "",
		"IgnoreUnknown=1;K8S_POD_NAME=x": "",
		"IgnoreUnknown=1;CLEANWALL_POLICY=analytics": "analytics",
		"CLEANWALL_POLICY=a;K8S_POD_NAMESPACE=b":     "a",
		" CLEANWALL_POLICY = spaced ;":               "spaced",
		"NOT_CLEANWALL_POLICY=x;CLEANWALL_POLICYX=y": "",
	}
	for args, want := range cases {
		if got := policyArg(args); got != want {
			t.Errorf("policyArg(%q) = %q, want %q", args, got, want)
		}
	}
}
