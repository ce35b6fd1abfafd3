package consent

import (
	"encoding/json"
	"testing"
)

// FuzzParse: any body a service sends parses without panicking, an allow
// comes only from a JSON object whose decision is exactly "allow", and
// every TTL is within the protocol's bounds.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		`{"decision":"allow","ttlSeconds":30}`, `{"decision":"deny","reason":"x"}`, `{"decision":"allow"} x`,
		`{"decision":"allow","ttlSeconds":-1}`, `{"decision":"allow","ttlSeconds":1e400}`, `[]`, `null`, ``,
		`{"decision":"allow","decision":"deny"}`, `{"Decision":"allow"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		d := parse(body)
		if d.TTL < MinTTL || d.TTL > MaxTTL && d.Cause == "" {
			t.Fatalf("ttl %v out of bounds for %q", d.TTL, body)
		}
		if !d.Allow {
			return
		}
		if d.Cause != "" {
			t.Fatalf("an allow with cause %q", d.Cause)
		}
		var v map[string]json.RawMessage
		if err := json.Unmarshal(body, &v); err != nil {
			t.Fatalf("allow from a body that is not one JSON object: %q", body)
		}
		var dec string
		if err := json.Unmarshal(v["decision"], &dec); err != nil || dec != "allow" {
			t.Fatalf("allow without the exact key decision = \"allow\": %q", body)
		}
	})
}
