//go:build bench

package bench

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/tests/harness"
)

const applyRules = 100_000

// benchApply measures replacing a running sandbox's policy with one of
// 100,000 cidr destinations: end to end through the daemon's API, and the
// datapath work alone on a datapath of our own: writing the new generation
// (PutRules), removing the old one (DeleteRuleEntries), and, for
// reference, one sweep of the rule map (DeleteRules, which scans every
// entry of every sandbox; the daemon sweeps on restart and after failures).
func benchApply(t *testing.T, top *topology, rep *Report) {
	docs := [2][]byte{}
	sets := [2][]netip.Prefix{}
	for i := range docs {
		sets[i] = withRemoteLast(uint64(100+i), applyRules)
		docs[i] = policyYAML("bench-100k", sets[i], connectPort)
	}
	small := policyYAML("bench", []netip.Prefix{netip.PrefixFrom(remoteServer, 32)}, connectPort)
	sb := top.env.MustAddSandbox("apply", harness.SandboxOptions{NoIPv6: true, Policy: string(small)})
	client := top.daemon.Client()

	put := rep.addRow(&Comparison{Scenario: "100k-rule policy: bpf.PutRules alone", Unit: "s", LowerBetter: true, Cleanwall: "PutRules",
		Target: "<2 s", Check: cleanwallBelow(2)})
	flip := rep.addRow(&Comparison{Scenario: "100k-rule policy: PutRules new + DeleteRuleEntries old", Unit: "s", LowerBetter: true, Cleanwall: "put+delete",
		Note: "the map writes of one 100k -> 100k replacement, made by the benchmark on its own datapath"})
	sweep := rep.addRow(&Comparison{Scenario: "rule map sweep, 100k entries (DeleteRules)", Unit: "s", LowerBetter: true, Cleanwall: "DeleteRules",
		Note: "scan of the whole rule map for one sandbox generation that holds nothing"})
	e2e := rep.addRow(&Comparison{Scenario: "100k-rule policy: ApplyPolicy end to end", Unit: "s", LowerBetter: true, Baseline: "PutRules alone", Cleanwall: "ApplyPolicy",
		Target: "<2 s", Check: cleanwallBelow(2)})

	apply := func(doc []byte) (time.Duration, api.ApplyResult, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		t0 := time.Now()
		res, err := client.ApplyPolicy(ctx, sb.ContainerID, "", api.ApplyRequest{Policy: doc, PolicySource: "bench"})
		return time.Since(t0), res, err
	}
	// The first apply grows the sandbox from one rule to 100k; it is
	// reported apart from the replacements that follow (100k → 100k).
	first, res, err := apply(docs[0])
	if err != nil {
		t.Fatalf("applying %d rules: %v", applyRules, err)
	}
	if res.Sandbox.Rules != applyRules {
		t.Fatalf("after apply the sandbox has %d datapath entries, want %d", res.Sandbox.Rules, applyRules)
	}
	rep.note("apply: first ApplyPolicy (1 rule -> 100k) took %.3f s; rows show 100k -> 100k replacements; policy YAML is %d bytes", first.Seconds(), len(docs[0]))

	dp := ownDatapath(t)
	entries := [2][]bpf.RuleEntry{ruleEntries(sets[0]), ruleEntries(sets[1])}
	const id = 1
	if err := dp.PutRules(id, 0, entries[0]); err != nil {
		t.Fatal(err)
	}
	perf := newPerfRecorder(t, top.daemon)
	for r := range rounds(3) {
		next := (r + 1) % 2 // generation slot and document of this round
		for _, side := range order(r) {
			if side == "cleanwall" {
				perf.start(fmt.Sprintf("apply-round%d", r))
				d, res, err := apply(docs[next])
				perf.stop()
				if err != nil {
					t.Fatalf("round %d: %v", r, err)
				}
				if res.Sandbox.Rules != applyRules {
					t.Fatalf("round %d: %d datapath entries after apply, want %d", r, res.Sandbox.Rules, applyRules)
				}
				e2e.Add(r, "cleanwall", d.Seconds(), nil)
				t.Logf("round %d ApplyPolicy %.3f s", r, d.Seconds())
				continue
			}
			old := 1 - next
			var steps [3]time.Duration
			timed := func(i int, f func() error) {
				t0 := time.Now()
				if err := f(); err != nil {
					t.Fatalf("round %d step %d: %v", r, i, err)
				}
				steps[i] = time.Since(t0)
			}
			timed(0, func() error { _, err := dp.DeleteRules(id, next); return err })
			timed(1, func() error { return dp.PutRules(id, uint8(next), entries[next]) })
			timed(2, func() error { return dp.DeleteRuleEntries(id, uint8(old), entries[old]) })
			sweep.Add(r, "cleanwall", steps[0].Seconds(), nil)
			put.Add(r, "cleanwall", steps[1].Seconds(), nil)
			e2e.Add(r, "baseline", steps[1].Seconds(), nil)
			flip.Add(r, "cleanwall", (steps[1] + steps[2]).Seconds(), map[string]float64{"putS": steps[1].Seconds(), "deleteOldS": steps[2].Seconds()})
			t.Logf("round %d datapath: sweep %.3f s, put %.3f s, delete old %.3f s", r, steps[0].Seconds(), steps[1].Seconds(), steps[2].Seconds())
		}
	}
}

func ruleEntries(ps []netip.Prefix) []bpf.RuleEntry {
	out := make([]bpf.RuleEntry, len(ps))
	for i, p := range ps {
		out[i] = bpf.RuleEntry{Prefix: p, Proto: unix.IPPROTO_TCP, Port: connectPort, RuleID: 1, Mode: 1, Listener: bpf.ListenerTCP}
	}
	return out
}

// ownDatapath loads the datapath on a private bpffs (nothing attached).
func ownDatapath(t *testing.T) *bpf.Datapath {
	t.Helper()
	root := t.TempDir()
	if err := bpf.EnsureBPFFS(root); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(root, unix.MNT_DETACH) })
	dp, err := bpf.Load(bpf.Options{PinRoot: filepath.Join(root, "cw")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })
	return dp
}
