package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cleanwall/cleanwall/policy"
)

const hashedPolicy = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata:
  name: results
spec:
  dns: {upstream: 198.51.100.53:53, allow: [results.example.test]}
  egress:
    - name: results-api
      to: [{fqdn: results.example.test}]
      ports: [{port: 8080}]
      mode: open
`

// The same policy written differently: key order, name case, a trailing
// dot, spelt-out defaults, comments.
const hashedPolicySame = `# results, reformatted
kind: EgressPolicy
apiVersion: cleanwall.dev/v1
metadata: {name: results}
spec:
  egress:
  - mode: open
    name: results-api
    ports: [{port: 8080, protocol: TCP}]
    to: [{fqdn: Results.Example.Test.}]
    open: {protocol: tcp}
  dns:
    allow: [results.example.test]
    upstream: 198.51.100.53
`

func hashOf(t *testing.T, doc string) (string, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	err := policyHash([]string{path}, &out)
	return out.String(), err
}

// TestPolicyHash: `cleanwall policy hash FILE` prints exactly the hash the
// daemon reports as policyHash for a sandbox under FILE (it parses and
// compiles the document as cleanwalld does) and the key broker compares
// with egressPolicies.
func TestPolicyHash(t *testing.T) {
	out, err := hashOf(t, hashedPolicy)
	if err != nil {
		t.Fatal(err)
	}
	// The daemon's path: policy.Parse of the bytes applied, then Compile.
	p, err := policy.Parse([]byte(hashedPolicy))
	if err != nil {
		t.Fatal(err)
	}
	c, err := policy.Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	if out != c.Hash+"\n" || c.Hash != p.Hash() {
		t.Fatalf("printed %q; Compiled.Hash %s, Policy.Hash %s", out, c.Hash, p.Hash())
	}
	if len(c.Hash) != 64 || strings.Trim(c.Hash, "0123456789abcdef") != "" {
		t.Fatalf("hash %q is not 64 lowercase hex characters", c.Hash)
	}
	same, err := hashOf(t, hashedPolicySame)
	if err != nil || same != out {
		t.Fatalf("the same policy written differently hashes to %q (%v), want %q", same, err, out)
	}
	other, err := hashOf(t, strings.Replace(hashedPolicy, "8080", "8443", 1))
	if err != nil || other == out {
		t.Fatalf("another port: %q, %v", other, err)
	}
}

func TestPolicyHashRefuses(t *testing.T) {
	// An invalid policy has no hash: exit 1, nothing on stdout.
	out, err := hashOf(t, strings.Replace(hashedPolicy, "port: 8080", "port: 70000", 1))
	var ee *exitError
	if !errors.As(err, &ee) || ee.code != 1 || out != "" {
		t.Fatalf("invalid policy: %q, %v", out, err)
	}
	var usage *usageError
	if err := policyHash(nil, &bytes.Buffer{}); !errors.As(err, &usage) || !strings.Contains(err.Error(), "cleanwall policy hash FILE") {
		t.Fatalf("no file: %v", err)
	}
	if err := policyHash([]string{filepath.Join(t.TempDir(), "missing.yaml")}, &bytes.Buffer{}); !errors.As(err, &usage) {
		t.Fatalf("missing file: %v", err)
	}
	if err := cmdPolicy([]string{"frobnicate"}); err == nil || !strings.Contains(err.Error(), "check, hash, apply or show") {
		t.Fatalf("unknown subcommand: %v", err)
	}
}
