package policy

import (
	"errors"
	"os"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// FuzzParse feeds Parse arbitrary documents (seeds in
// testdata/fuzz/FuzzParse; run with go test -fuzz FuzzParse ./policy). It
// must never panic; whatever it accepts must compile, match its own
// entries, and survive a round trip through YAML with the same hash.
func FuzzParse(f *testing.F) {
	example, err := os.ReadFile("testdata/policy-md-example.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	f.Add([]byte(strings.Replace(string(example), "          maxBodyBytes: 1048576\n", "          maxBodyBytes: 1048576\n"+denyPatternsExample, 1)))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse(data)
		if err != nil {
			var list ErrorList
			if !errors.As(err, &list) || len(list) == 0 {
				t.Fatalf("error %T is not a non-empty ErrorList: %v", err, err)
			}
			for _, e := range list {
				if e.Msg == "" {
					t.Fatalf("error without a message: %+v", e)
				}
			}
			return
		}
		c, err := Compile(p)
		if err != nil {
			t.Fatalf("parsed policy does not compile: %v", err)
		}
		if c.Hash != p.Hash() {
			t.Fatal("compiled hash differs from the policy's")
		}
		for _, e := range c.Entries {
			if r, ok := c.Match(e.Prefix.Addr(), e.Proto, e.Port); !ok || e.Prefix.IsSingleIP() && r.ID != e.RuleID {
				t.Fatalf("entry %v: Match = %v, %v", e, r, ok)
			}
		}
		out, err := yaml.Marshal(p)
		if err != nil {
			t.Fatalf("encoding: %v", err)
		}
		p2, err := Parse(out)
		if err != nil {
			t.Fatalf("normal form does not parse: %v\n%s", err, out)
		}
		if p2.Hash() != p.Hash() {
			t.Fatalf("round trip changed the policy:\n%s", out)
		}
	})
}
