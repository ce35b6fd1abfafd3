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

// The policy comes from CNI_ARGS, else the pod annotation (CRI runtimes pass
// it in runtimeConfig when the conf declares the capability), else the conf's
// file; an empty annotation and no source at all are errors.
func TestSelectPolicy(t *testing.T) {
	const base = `{"cniVersion":"1.0.0","name":"n","type":"cleanwall-cni"`
	withAnnotations := func(extra, annotations string) string {
		return base + extra + `,"capabilities":{"io.kubernetes.cri.pod-annotations":true},"runtimeConfig":{"io.kubernetes.cri.pod-annotations":` + annotations + `}}`
	}
	cases := []struct {
		name, conf, args string
		want             policySelection
		err              string
	}{
		{"conf file", base + `,"policy":"/p.yaml"}`, "", policySelection{file: "/p.yaml", source: "/p.yaml"}, ""},
		{"CNI_ARGS over file", base + `,"policy":"/p.yaml"}`, "IgnoreUnknown=1;CLEANWALL_POLICY=a",
			policySelection{name: "a", source: "CNI_ARGS CLEANWALL_POLICY=a"}, ""},
		{"annotation over file", withAnnotations(`,"policy":"/p.yaml"`, `{"cleanwall.dev/policy":"analytics","other":"x"}`),
			"K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p", policySelection{name: "analytics", source: "pod annotation cleanwall.dev/policy=analytics"}, ""},
		{"annotation alone", withAnnotations(``, `{"cleanwall.dev/policy":" spaced "}`), "",
			policySelection{name: "spaced", source: "pod annotation cleanwall.dev/policy=spaced"}, ""},
		{"CNI_ARGS over annotation", withAnnotations(``, `{"cleanwall.dev/policy":"analytics"}`), "CLEANWALL_POLICY=b",
			policySelection{name: "b", source: "CNI_ARGS CLEANWALL_POLICY=b"}, ""},
		{"other annotations only", withAnnotations(`,"policy":"/p.yaml"`, `{"team":"x"}`), "",
			policySelection{file: "/p.yaml", source: "/p.yaml"}, ""},
		{"empty annotation", withAnnotations(`,"policy":"/p.yaml"`, `{"cleanwall.dev/policy":""}`), "", policySelection{},
			"annotation cleanwall.dev/policy is empty"},
		{"nothing", base + `}`, "K8S_POD_NAME=p", policySelection{}, "no policy"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			conf, err := parseConf([]byte(c.conf))
			if err != nil {
				t.Fatal(err)
			}
			got, err := selectPolicy(conf, c.args)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("got %+v, %v; want an error containing %q", got, err, c.err)
				}
				return
			}
			if err != nil || got != c.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, c.want)
			}
		})
	}
}

// Pod annotations that are not strings are a conf error, not ignored.
func TestPodAnnotationsMalformed(t *testing.T) {
	_, err := parseConf([]byte(`{"cniVersion":"1.0.0","name":"n","type":"cleanwall-cni","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"cleanwall.dev/policy":7}}}`))
	if err == nil || !strings.Contains(err.Error(), "network configuration") {
		t.Fatalf("got %v", err)
	}
}
