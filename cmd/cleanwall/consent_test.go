package main

import (
	"strings"
	"testing"
	"time"
)

// cleanwall run takes the consent flags once each (a flag defined twice
// panics every run) and passes them through.
func TestRunConsentFlags(t *testing.T) {
	o, err := parseRunFlags([]string{"--policy", "p.yaml", "--consent-url", "https://consent.example:8443",
		"--consent-ca", "ca.pem", "--consent-timeout", "750ms", "--", "true"})
	if err != nil {
		t.Fatal(err)
	}
	if o.consentURL != "https://consent.example:8443" || o.consentCA != "ca.pem" || o.consentTimeout != 750*time.Millisecond {
		t.Fatalf("parsed %q %q %v", o.consentURL, o.consentCA, o.consentTimeout)
	}
	o, err = parseRunFlags([]string{"--policy", "p.yaml", "--", "true"})
	if err != nil || o.consentURL != "" || o.consentTimeout != 2*time.Second {
		t.Fatalf("defaults: %+v %v", o, err)
	}
}

func TestConsentCommandUsage(t *testing.T) {
	for _, args := range [][]string{nil, {"show"}, {"refresh", "extra"}, {"refresh", "--bogus"}} {
		if err := cmdConsent(args); err == nil || !strings.Contains(err.Error(), "usage: cleanwall consent refresh") {
			t.Errorf("%v: %v", args, err)
		}
	}
}
