package keys

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"strings"
	"testing"
)

// Every release, and every refusal, carries the node's audit key when the
// ring has one, and the ring's audit records name it.
func TestReleasesBindTheNodeKey(t *testing.T) {
	e := newEnv(t)
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	e.ring.NodeKey = pub
	c := compile(t, securePolicy("with-node-key", "dek-a"))
	if err := e.ring.Ensure(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	e.broker.refuse = func(string, string) error { return errors.New("no") }
	if err := e.ring.Ensure(context.Background(), compile(t, securePolicy("refused", "dek-b"))); err == nil {
		t.Fatal("refused release admitted")
	}
	e.broker.mu.Lock()
	sent := append([][]byte(nil), e.broker.nodeKeys...)
	e.broker.mu.Unlock()
	if len(sent) != 2 || !bytes.Equal(sent[0], pub) || !bytes.Equal(sent[1], pub) {
		t.Fatalf("node keys sent: %x", sent)
	}
	want := base64.StdEncoding.EncodeToString(pub)
	for _, kind := range []string{AuditRelease, AuditRefuse} {
		recs := e.audit.of(kind)
		if len(recs) != 1 || recs[0].fields["nodeKey"] != want {
			t.Fatalf("%s records: %+v", kind, recs)
		}
	}

	// Without a node key nothing is sent or recorded.
	e2 := newEnv(t)
	if err := e2.ring.Ensure(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	if e2.broker.nodeKeys[0] != nil || e2.audit.of(AuditRelease)[0].fields["nodeKey"] != nil {
		t.Fatal("a node key was sent or recorded without one")
	}
}

// With AuditErr, a granted release is recorded before the key is held: a
// record that cannot be written withholds the key.
func TestReleaseWithheldWhenUnaudited(t *testing.T) {
	e := newEnv(t)
	var recorded []map[string]any
	fail := errors.New("disk on fire")
	e.ring.AuditErr = func(kind string, fields map[string]any) error {
		if kind != AuditRelease {
			t.Errorf("AuditErr got %s", kind)
		}
		if fail != nil {
			return fail
		}
		recorded = append(recorded, fields)
		return nil
	}
	c := compile(t, securePolicy("audited-release", "dek-a"))
	err := e.ring.Ensure(context.Background(), c)
	if err == nil || !strings.Contains(err.Error(), "audit record could not be written") {
		t.Fatalf("Ensure with a failing audit = %v", err)
	}
	if _, err := e.ring.For(c).Current("dek-a"); err == nil {
		t.Fatal("an unaudited key is held")
	}
	if len(e.audit.of(AuditRefuse)) != 1 || len(e.audit.of(AuditRelease)) != 0 {
		t.Fatalf("records: %+v", e.audit.records)
	}
	fail = nil
	if err := e.ring.Ensure(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	if _, err := e.ring.For(c).Current("dek-a"); err != nil || len(recorded) != 1 || recorded[0]["key"] != "dek-a" {
		t.Fatalf("after a recorded release: %v, %+v", err, recorded)
	}
	if len(e.audit.of(AuditRelease)) != 0 {
		t.Fatal("the release was recorded twice")
	}
}
