package bpf

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cleanwall/cleanwall/internal/testutil"
)

// Operators inspect the datapath with bpftool alone: every pinned map must
// keep its BTF so that dumps print field names (cilium/ebpf silently drops
// BTF for a map the kernel refuses it on, e.g. an LPM trie with a scalar key).
func TestBpftoolDumpShowsFieldNames(t *testing.T) {
	env := newTestEnv(t)
	env.listen(t, testSocketMark)
	env.run(t, build(t, syn4(remote, 8081))) // one counter entry
	bpftool, err := exec.LookPath("bpftool")
	if err != nil {
		testutil.Skip(t, "bpftool not installed (make deps)")
	}
	want := map[string][]string{
		MapSandboxes: {"ifindex", "sandbox_id", "generation", "epoch", "gateway_mac", "name"},
		MapRules:     {"prefixlen", "sandbox_id", "generation", "proto", "port", "addr", "rule_id", "listener", "expires_ns"},
		MapConfig:    {"redirect_mark", "socket_mark", "ports"},
		MapCounters:  {"sandbox_id", "rule_id", "verdict", "reason", "packets", "bytes", "flows"},
		MapVerdicts:  {"sandbox_id", "epoch", "port", "addr", "rule_id", "listener", "expires_ns"},
	}
	for m, fields := range want {
		out, err := exec.Command(bpftool, "-j", "map", "dump", "pinned", filepath.Join(env.dp.PinRoot(), "maps", m)).CombinedOutput()
		if err != nil {
			t.Fatalf("bpftool dump %s: %v\n%s", m, err, out)
		}
		var entries []map[string]any
		if err := json.Unmarshal(out, &entries); err != nil {
			t.Fatalf("bpftool dump %s: %v\n%s", m, err, out)
		}
		if len(entries) == 0 {
			t.Fatalf("bpftool dump %s: no entries", m)
		}
		text := string(out)
		if _, ok := entries[0]["formatted"]; !ok {
			t.Fatalf("%s: bpftool printed no BTF-formatted entries (BTF lost?):\n%s", m, text)
		}
		for _, f := range fields {
			if !strings.Contains(text, `"`+f+`"`) {
				t.Errorf("%s: field %q missing from bpftool dump:\n%s", m, f, text)
			}
		}
	}
}
