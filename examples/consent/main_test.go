package main

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseAndDecide(t *testing.T) {
	grants, err := parse([]byte(`
# the results job may run, and send to its API for 10 s at a time
execute results          # any sandbox
egress  results api ttl=10
egress  results * sandbox=c1
execute other sandbox=c2 ttl=0
`))
	if err != nil {
		t.Fatal(err)
	}
	l := &list{grants: grants}
	for _, c := range []struct {
		r    request
		want string
		ttl  int
	}{
		{request{Kind: "execute", Sandbox: "c9", Policy: "results"}, "allow", 30},
		{request{Kind: "egress", Sandbox: "c9", Policy: "results", Rule: "api"}, "allow", 10},
		{request{Kind: "egress", Sandbox: "c9", Policy: "results", Rule: "db"}, "deny", 30},
		{request{Kind: "egress", Sandbox: "c1", Policy: "results", Rule: "db"}, "allow", 30},
		{request{Kind: "execute", Sandbox: "c1", Policy: "other"}, "deny", 30},
		{request{Kind: "execute", Sandbox: "c2", Policy: "other"}, "allow", 30},
		{request{Kind: "egress", Sandbox: "c2", Policy: "other", Rule: "x"}, "deny", 30},
		{request{Kind: "unknown", Sandbox: "c2", Policy: "results"}, "deny", 30},
	} {
		if got := l.decide(c.r, 30); got.Decision != c.want || got.TTLSeconds != c.ttl {
			t.Errorf("%+v: %+v, want %s ttl %d", c.r, got, c.want, c.ttl)
		}
	}
	for _, bad := range []string{"allow x", "execute", "egress p", "execute p ttl=-1", "execute p ttl=4000", "execute p color=red", "egress p r sandbox="} {
		if _, err := parse([]byte(bad)); err == nil || !strings.Contains(err.Error(), "line 1") {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

// A change is picked up; a broken file keeps the previous list; a removed
// file denies everything.
func TestReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "allow.txt")
	write := func(s string, mtime time.Time) {
		if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		_ = os.Chtimes(path, mtime, mtime)
	}
	l := &list{path: path, log: slog.New(slog.DiscardHandler)}
	exec := request{Kind: "execute", Sandbox: "c", Policy: "p"}
	now := time.Now()
	write("execute p\n", now)
	l.reload()
	if l.decide(exec, 5).Decision != "allow" {
		t.Fatal("not loaded")
	}
	write("execute q\n", now.Add(time.Second))
	l.reload()
	if l.decide(exec, 5).Decision != "deny" {
		t.Fatal("a revocation was not picked up")
	}
	write("execute p\nbroken line\n", now.Add(2*time.Second))
	l.reload()
	if l.decide(exec, 5).Decision != "deny" || len(l.grants) != 1 || l.grants[0].policy != "q" {
		t.Fatal("a broken file replaced the list in force")
	}
	os.Remove(path)
	l.reload()
	if len(l.grants) != 0 {
		t.Fatal("a removed file left grants in force")
	}
}
