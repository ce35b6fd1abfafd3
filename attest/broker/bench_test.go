package broker_test

import (
	"context"
	"flag"
	"slices"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/attest/broker/client"
)

var (
	roundTrips = flag.Int("release.roundtrips", 0, "TestReleaseLatency: measure this many challenge+release round trips and print p50/p99 (0 skips)")
	noSync     = flag.Bool("release.nosync", false, "TestReleaseLatency: audit without fsync (to tell disk latency from CPU)")
)

// BenchmarkReleaseRoundTrip measures challenge + release over HTTPS on
// loopback with a kept-alive connection: simulated evidence signed per
// request, chain verification (certificates in the evidence, nothing
// fetched), policy, HPKE, and two fsynced audit records.
func BenchmarkReleaseRoundTrip(b *testing.B) {
	e := startBroker(b, envOptions{allowSimulated: true, quiet: true})
	c := client.New(e.url, e.pool, newSim(b, nil))
	if _, err := c.Release(context.Background(), keyID); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := c.Release(context.Background(), keyID); err != nil {
			b.Fatal(err)
		}
	}
}

// TestReleaseLatency prints p50/p99 of N round trips (it asserts nothing
// about them):
//
//	go test ./attest/broker -run '^TestReleaseLatency$' -release.roundtrips=1000 -v
func TestReleaseLatency(t *testing.T) {
	n := *roundTrips
	if n <= 0 {
		t.Skip("set -release.roundtrips=N to measure")
	}
	e := startBroker(t, envOptions{allowSimulated: true, syncNever: *noSync, quiet: true})
	c := client.New(e.url, e.pool, newSim(t, nil))
	if _, err := c.Release(context.Background(), keyID); err != nil { // handshake, warm caches
		t.Fatal(err)
	}
	lat := make([]time.Duration, 0, n)
	for range n {
		start := time.Now()
		if _, err := c.Release(context.Background(), keyID); err != nil {
			t.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	pct := func(p float64) time.Duration { return lat[min(len(lat)-1, int(float64(len(lat))*p))] }
	p50, p99 := pct(0.50), pct(0.99)
	// A diagnostic, not a check: speed targets are judged by make bench
	// (scenario release), against a baseline measured beside it.
	t.Logf("release round trip over HTTPS loopback, %d runs: p50 %v, p99 %v, max %v", n, p50, p99, lat[len(lat)-1])
}
