package broker

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/simulated"
	"github.com/cleanwall/cleanwall/attest/snp"
)

func TestSessionToken(t *testing.T) {
	now := time.Unix(1e9, 0)
	c := newChallenges(time.Minute, 10, func() time.Time { return now })
	session, ch := c.issue(3)
	if len(session) > attest.MaxSessionBytes || len(ch.nonce) != attest.NonceSize {
		t.Fatalf("session of %d bytes, nonce of %d", len(session), len(ch.nonce))
	}
	got, err := c.check(session)
	if err != nil || got.keyIndex != 3 || !got.expires.Equal(now.Add(time.Minute)) || string(got.nonce) != string(ch.nonce) {
		t.Fatalf("check = %+v, %v", got, err)
	}
	s2, ch2 := c.issue(3)
	if s2 == session || string(ch2.nonce) == string(ch.nonce) {
		t.Fatal("two challenges share a session or a nonce")
	}
	// Another broker (another key) does not know the session.
	other := newChallenges(time.Minute, 10, func() time.Time { return now })
	if _, err := other.check(session); !errors.Is(err, attest.CodeNonceUnknown) {
		t.Fatalf("another broker's session: %v", err)
	}
	for _, bad := range []string{"", "!!", session[:len(session)-1], session + "A"} {
		if _, err := c.check(bad); !errors.Is(err, attest.CodeNonceUnknown) {
			t.Errorf("%q: %v", bad, err)
		}
	}
	if err := c.consume(got); err != nil {
		t.Fatal(err)
	}
	if _, err := c.check(session); !errors.Is(err, attest.CodeNonceReplayed) {
		t.Fatalf("used session: %v", err)
	}
	if err := c.consume(got); !errors.Is(err, attest.CodeNonceReplayed) {
		t.Fatalf("consumed twice: %v", err)
	}
	now = now.Add(time.Minute)
	if _, err := c.check(session); !errors.Is(err, attest.CodeNonceExpired) {
		t.Fatalf("expired session: %v", err)
	}
	// A session checked before its expiry and consumed after is refused.
	now = now.Add(-time.Second)
	s3, _ := c.issue(0)
	ch3, err := c.check(s3)
	if err != nil {
		t.Fatal(err)
	}
	now = now.Add(2 * time.Minute)
	if err := c.consume(ch3); !errors.Is(err, attest.CodeNonceExpired) {
		t.Fatalf("consumed after expiry: %v", err)
	}
	c.sweep()
	if c.usedCount() != 0 {
		t.Fatalf("%d used sessions after they all expired", c.usedCount())
	}
}

// TestUsedSessionSizing measures what DefaultMaxUsed rests on: the memory
// of a full used set, and how fast this machine verifies evidence (a
// session is consumed only after its evidence verified, so that rate bounds
// how fast the set fills).
func TestUsedSessionSizing(t *testing.T) {
	if testing.Short() {
		t.Skip("measurement")
	}
	now := time.Now()
	c := newChallenges(DefaultChallengeTTL, DefaultMaxUsed, func() time.Time { return now })
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range DefaultMaxUsed {
		_, ch := c.issue(0)
		if err := c.consume(ch); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	_, ch := c.issue(0)
	if err := c.consume(ch); !errors.Is(err, ErrUsedSessionsFull) {
		t.Fatalf("consume into a full set: %v", err)
	}
	perEntry := float64(after.HeapAlloc-before.HeapAlloc) / DefaultMaxUsed
	t.Logf("used set: %d sessions in %.1f MiB (%.0f bytes each)", DefaultMaxUsed, float64(after.HeapAlloc-before.HeapAlloc)/(1<<20), perEntry)
	if perEntry > 75 {
		t.Errorf("%.0f bytes per used session: DefaultMaxUsed's documented footprint no longer holds", perEntry)
	}
	// Expired sessions make room, whatever the fill.
	now = now.Add(DefaultChallengeTTL + time.Millisecond)
	_, ch = c.issue(0)
	if err := c.consume(ch); err != nil || c.usedCount() != 1 {
		t.Fatalf("after expiry: %v, %d kept", err, c.usedCount())
	}

	a, err := simulated.New(simulated.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	ev, err := a.Evidence(context.Background(), [64]byte{})
	if err != nil {
		t.Fatal(err)
	}
	v := &snp.Verifier{AllowSimulated: true}
	const n = 200
	start := time.Now()
	for range n {
		if _, err := v.Verify(context.Background(), ev); err != nil {
			t.Fatal(err)
		}
	}
	rate := n / time.Since(start).Seconds()
	t.Logf("evidence verification: %.0f/s on one goroutine; the default set holds %.0f/s for %v",
		rate, float64(DefaultMaxUsed)/DefaultChallengeTTL.Seconds(), DefaultChallengeTTL)
}

// FuzzSessionCheck: whatever a client sends as a session, check answers
// with a refusal unless the broker issued it, and never panics; an issued
// session with any byte changed is refused.
const base64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

func FuzzSessionCheck(f *testing.F) {
	now := time.Unix(1e9, 0)
	c := newChallenges(time.Minute, 10, func() time.Time { return now })
	issued, _ := c.issue(1)
	f.Add(issued)
	f.Add("")
	f.Add(issued[:40])
	// The same bytes spelt otherwise: the last character's two unused bits set.
	last := strings.IndexByte(base64URL, issued[len(issued)-1])
	f.Add(issued[:len(issued)-1] + string(base64URL[last|3]))
	f.Fuzz(func(t *testing.T, session string) {
		ch, err := c.check(session)
		if err == nil {
			if session != issued || ch.keyIndex != 1 {
				t.Fatalf("a session the broker did not issue passed: %q", session)
			}
			return
		}
		var r *attest.Refusal
		if !errors.As(err, &r) || r.Code != attest.CodeNonceUnknown {
			t.Fatalf("refusal %v, want nonce-unknown", err)
		}
	})
}
