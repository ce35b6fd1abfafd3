package httpproxy

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// A refusal's detail keeps its own words and numbers and withholds every
// other argument: it is logged and becomes the flow's error
// (docs/telemetry.md).
func TestRefusalDetailWithholdsSandboxBytes(t *testing.T) {
	const canary = "cnry0123456789abcdef"
	for _, c := range []struct {
		rf   *refusal
		want string
	}{
		{refuse(ReasonBadContentLength, "Content-Length %q", canary), `Content-Length (withheld)`},
		{refuse(ReasonBadTarget, "byte %#x in the target", byte('c')), `byte (withheld) in the target`},
		{refuse(ReasonHeaderPattern, "denyPatterns[%d] matched field %s", 2, "X-"+canary), `denyPatterns[2] matched field (withheld)`},
		{refuse(ReasonUndecodableBody, "%s: %v", "gzip", errors.New("bad data "+canary)), `(withheld): (withheld)`},
		{refuse(ReasonHoldLimit, "body above the hold limit %d", int64(4096)), `body above the hold limit 4096`},
		{refuse(ReasonTimeout, "request body stalled for %v", 3*time.Second), `request body stalled for 3s`},
	} {
		if c.rf.detail != c.want || strings.Contains(c.rf.Error(), canary) {
			t.Errorf("detail %q (error %q), want %q", c.rf.detail, c.rf.Error(), c.want)
		}
	}
	for m, want := range map[string]string{"GET": "GET", "PATCH": "PATCH", "PROPFIND": "other", "CNRY01": "other", "": ""} {
		if got := SafeMethod(m); got != want {
			t.Errorf("SafeMethod(%q) = %q, want %q", m, got, want)
		}
	}
}
