//go:build bench

package bench

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/broker/client"
	"github.com/cleanwall/cleanwall/attest/simulated"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// releaseClientEnv makes TestReleaseClientProcess run the release client
// (its JSON configuration is the value). The client is a process of its
// own, started with `ip netns exec` in the node namespace: the broker
// listens on that namespace's loopback, and the key broker client dials
// from its own transport, which cannot be told to enter a namespace.
const releaseClientEnv = "CLEANWALL_BENCH_RELEASE_CLIENT"

// releaseKeyID is the key the harness broker creates by default.
const releaseKeyID = "egress-dek"

type releaseClientConfig struct {
	URL    string `json:"url"`
	CAFile string `json:"caFile"`
	KeyID  string `json:"keyID"`
	N      int    `json:"n"`      // round trips per round and side
	Rounds int    `json:"rounds"` // rounds, sides alternating as order() says
	Out    string `json:"out"`    // JSON file for the results
}

// releaseRound is one side of one round, measured by the client process.
type releaseRound struct {
	Round int    `json:"round"`
	Side  string `json:"side"` // baseline: challenge only; cleanwall: challenge + release
	// Lat are the round trips in µs, in the order made.
	Lat []float64 `json:"lat"`
	// Evidence is the time the simulated attester took per release, in µs
	// (part of Lat: on hardware the SNP firmware signs instead).
	Evidence []float64          `json:"evidence,omitempty"`
	Extra    map[string]float64 `json:"extra"`
	Errors   int                `json:"errors"`
	FirstErr string             `json:"firstErr,omitempty"`
}

// benchRelease measures the key broker's challenge + release round trip
// (the real cleanwall-keybroker process, HTTPS on the node namespace's
// loopback, a kept-alive connection, simulated evidence that carries its
// certificates, so nothing is fetched) against a challenge alone on the
// same broker (one HTTPS POST, one audit record).
func benchRelease(t *testing.T, rep *Report) {
	env := harness.New(t)
	kb := env.StartKeyBroker(harness.KeyBrokerOptions{AllowSimulated: true})
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cfg := releaseClientConfig{URL: kb.URL, CAFile: kb.CAFile, KeyID: releaseKeyID, N: 300, Rounds: rounds(5), Out: filepath.Join(t.TempDir(), "release.json")}
	b, _ := json.Marshal(cfg)
	cmd := nsCommand(env.Node, self, "-test.run=^TestReleaseClientProcess$", "-test.v")
	cmd.Env = append(os.Environ(), releaseClientEnv+"="+string(b))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	p50 := rep.addRow(&Comparison{Scenario: "key release round trip p50, 1 client", Unit: "µs", LowerBetter: true,
		Baseline: "challenge only", Cleanwall: "challenge+release", ShowAdded: true})
	p99 := rep.addRow(&Comparison{Scenario: "key release round trip p99, 1 client", Unit: "µs", LowerBetter: true,
		Baseline: "challenge only", Cleanwall: "challenge+release", ShowAdded: true, Target: "<20 ms", Check: cleanwallBelow(20_000)})
	rep.Config["releaseRoundTrips"] = cfg.N
	if err := cmd.Run(); err != nil {
		t.Fatalf("release client: %v\n%s\nbroker log:\n%s", err, out.String(), kb.Log())
	}
	data, err := os.ReadFile(cfg.Out)
	if err != nil {
		t.Fatalf("release client wrote no results: %v\n%s", err, out.String())
	}
	var res []releaseRound
	if err := json.Unmarshal(data, &res); err != nil {
		t.Fatal(err)
	}
	var all, evidence []float64
	for _, r := range res {
		if r.Errors > 0 {
			t.Errorf("%s round %d: %d of %d round trips failed (first: %s)", r.Side, r.Round, r.Errors, cfg.N, r.FirstErr)
		}
		lat := toDurations(r.Lat)
		q := func(p float64) float64 { return float64(percentile(lat, p)) / float64(time.Microsecond) }
		r.Extra["p90us"], r.Extra["maxus"], r.Extra["roundTrips"] = q(90), q(100), float64(len(lat))
		if len(r.Evidence) > 0 {
			r.Extra["evidenceP50us"] = float64(percentile(toDurations(r.Evidence), 50)) / float64(time.Microsecond)
		}
		p50.Add(r.Round, r.Side, q(50), r.Extra)
		p99.Add(r.Round, r.Side, q(99), nil)
		if r.Side == "cleanwall" {
			all = append(all, r.Lat...)
			evidence = append(evidence, r.Evidence...)
		}
		t.Logf("round %d %-9s p50 %5.0f µs p99 %6.0f µs max %6.0f µs (%.0f round trips/s; host busy %.0f%% steal %.0f%%)",
			r.Round, r.Side, q(50), q(99), q(100), r.Extra["perSecond"], r.Extra["hostBusyPercent"], r.Extra["hostStealPercent"])
	}
	pooled := toDurations(all)
	rep.note("release: cleanwall-keybroker in the node namespace, client in a process of its own (attest/broker/client, simulated SEV-SNP attester signing each report); %d round trips per round and side after 20 of warm-up; over all %d releases p50 %v, p99 %v, max %v; the simulated attester took p50 %v of each (on hardware the SNP firmware signs instead); each challenge and each release appends an fsynced audit record (key store on %s)",
		cfg.N, len(pooled), percentile(pooled, 50).Round(time.Microsecond), percentile(pooled, 99).Round(time.Microsecond), percentile(pooled, 100).Round(time.Microsecond),
		percentile(toDurations(evidence), 50).Round(time.Microsecond), fsType(kb.Dir))
}

// toDurations turns µs into sorted durations.
func toDurations(us []float64) []time.Duration {
	out := make([]time.Duration, len(us))
	for i, v := range us {
		out[i] = time.Duration(v * float64(time.Microsecond))
	}
	slices.Sort(out)
	return out
}

// fsType names the file system a path is on (from /proc/self/mounts: the
// longest mount point that contains it).
func fsType(path string) string {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return "?"
	}
	best, typ := "", "?"
	for _, l := range bytes.Split(b, []byte("\n")) {
		f := bytes.Fields(l)
		if len(f) < 3 {
			continue
		}
		mp := string(f[1])
		rel, err := filepath.Rel(mp, path)
		if err != nil || rel == ".." || (len(rel) > 2 && rel[:3] == "../") {
			continue
		}
		if len(mp) > len(best) {
			best, typ = mp, string(f[2])
		}
	}
	return typ
}

// TestReleaseClientProcess is the release client process of the release
// scenario; run on its own it skips.
func TestReleaseClientProcess(t *testing.T) {
	raw := os.Getenv(releaseClientEnv)
	if raw == "" {
		t.Skip("the release scenario's client process: runs only when TestBench starts it")
	}
	var cfg releaseClientConfig
	if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
		t.Fatal(err)
	}
	pem, err := os.ReadFile(cfg.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatalf("no certificate in %s", cfg.CAFile)
	}
	sim, err := simulated.New(simulated.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	att := &timedAttester{Attester: sim}
	rel := client.New(cfg.URL, pool, att)
	// The baseline client: the same TLS and HTTP settings as the key
	// broker client's own transport.
	plain := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}, ForceAttemptHTTP2: true, MaxIdleConnsPerHost: 64,
	}}
	ctx := context.Background()
	sides := map[string]func() error{
		"baseline": func() error { return challengeOnce(ctx, plain, cfg.URL, cfg.KeyID) },
		"cleanwall": func() error {
			_, err := rel.Release(ctx, cfg.KeyID)
			return err
		},
	}
	for _, side := range []string{"baseline", "cleanwall"} { // handshakes, warm caches
		for range 20 {
			if err := sides[side](); err != nil {
				t.Fatalf("warm-up %s: %v", side, err)
			}
		}
	}
	var res []releaseRound
	for r := range cfg.Rounds {
		for _, side := range order(r) {
			rr := releaseRound{Round: r, Side: side}
			cpu := takeCPU(0)
			start := time.Now()
			for range cfg.N {
				t0 := time.Now()
				err := sides[side]()
				d := time.Since(t0)
				if err != nil {
					rr.Errors++
					if rr.FirstErr == "" {
						rr.FirstErr = err.Error()
					}
					continue
				}
				rr.Lat = append(rr.Lat, float64(d)/float64(time.Microsecond))
				if side == "cleanwall" {
					rr.Evidence = append(rr.Evidence, float64(att.last.Load())/float64(time.Microsecond))
				}
			}
			rr.Extra = cpu.extra(0, map[string]float64{"perSecond": float64(cfg.N) / time.Since(start).Seconds()})
			res = append(res, rr)
		}
	}
	b, err := json.Marshal(res)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfg.Out, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// timedAttester remembers how long the last Evidence call took.
type timedAttester struct {
	attest.Attester
	last atomic.Int64 // ns
}

func (a *timedAttester) Evidence(ctx context.Context, rd [64]byte) ([]byte, error) {
	t0 := time.Now()
	ev, err := a.Attester.Evidence(ctx, rd)
	a.last.Store(int64(time.Since(t0)))
	return ev, err
}

// challengeOnce is one POST /v1/challenge: the first half of a release,
// without evidence, verification or sealing.
func challengeOnce(ctx context.Context, hc *http.Client, base, keyID string) error {
	body, _ := json.Marshal(attest.ChallengeRequest{KeyID: keyID})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/challenge", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("challenge: status %d: %s", resp.StatusCode, data)
	}
	var ch attest.ChallengeResponse
	if err := json.Unmarshal(data, &ch); err != nil {
		return err
	}
	if ch.Session == "" || len(ch.Nonce) != attest.NonceSize {
		return errors.New("challenge without session or nonce")
	}
	return nil
}
