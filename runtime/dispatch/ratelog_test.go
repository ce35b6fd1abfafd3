package dispatch

import (
	"testing"
	"time"
)

func TestLogLimiter(t *testing.T) {
	l := NewLogLimiter(3, time.Hour)
	for i := 0; i < 3; i++ {
		if ok, _ := l.allow("k"); !ok {
			t.Fatalf("line %d of the burst held back", i)
		}
	}
	for i := 0; i < 5; i++ {
		if ok, _ := l.allow("k"); ok {
			t.Fatal("past the burst a line got through")
		}
	}
	if ok, _ := l.allow("other"); !ok {
		t.Fatal("keys share a bucket")
	}
	l.keys["k"].last = time.Now().Add(-time.Hour)
	ok, suppressed := l.allow("k")
	if !ok || suppressed != 5 {
		t.Fatalf("after a refill: ok %v, suppressed %d, want 5", ok, suppressed)
	}
}

func TestAcceptBackoff(t *testing.T) {
	var b acceptBackoff
	want := []time.Duration{5, 10, 20, 40}
	for _, w := range want {
		if got := b.failed(); got != w*time.Millisecond {
			t.Fatalf("backoff %v, want %v", got, w*time.Millisecond)
		}
	}
	for i := 0; i < 20; i++ {
		b.failed()
	}
	if got := b.failed(); got != time.Second {
		t.Fatalf("capped at %v, want 1s", got)
	}
	b.ok()
	if got := b.failed(); got != 5*time.Millisecond {
		t.Fatalf("after a success: %v", got)
	}
}
