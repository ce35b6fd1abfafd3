package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

func TestParseStat(t *testing.T) {
	// Field 22 is the start time; the command name (field 2) may hold
	// spaces and ')'. The other fields here hold their own number.
	tail := " 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 987654 23 24"
	for _, c := range []struct {
		stat  string
		start uint64
		state byte
	}{
		{"42 (sh) S" + tail, 987654, 'S'},
		{"42 (a b) c) (d) Z" + tail, 987654, 'Z'},
		{"42 ()) R" + tail + "\n", 987654, 'R'},
	} {
		start, state, err := parseStat(c.stat)
		if err != nil || start != c.start || state != c.state {
			t.Errorf("parseStat(%q) = %d, %q, %v; want %d, %q", c.stat, start, state, err, c.start, c.state)
		}
	}
	for _, bad := range []string{"", "42 sh S 1 2", "42 (sh) S 1 2 3", "42 (sh) S 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 x 23 24"} {
		if _, _, err := parseStat(bad); err == nil {
			t.Errorf("parseStat(%q) accepted", bad)
		}
	}
}

// startChild starts a process that lives until killed, and its owner record.
func startChild(t *testing.T) (*exec.Cmd, owner) {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	start, _, err := processStart(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	me, err := self()
	if err != nil {
		t.Fatal(err)
	}
	return cmd, owner{PID: cmd.Process.Pid, StartTime: start, PidNS: me.PidNS}
}

func TestOwnerAlive(t *testing.T) {
	me, err := self()
	if err != nil {
		t.Fatal(err)
	}
	if me.StartTime == 0 || me.PidNS == 0 {
		t.Fatalf("self() = %+v: start time and pid namespace missing", me)
	}
	check := func(what string, o owner, want bool) {
		t.Helper()
		if alive, why := o.alive(); alive != want {
			t.Errorf("%s: alive = %v (%s), want %v", what, alive, why, want)
		}
	}
	check("this process", me, true)
	reused := me
	reused.StartTime++
	check("this pid with another start time (the owner's pid reused)", reused, false)
	unknown := me
	unknown.StartTime = 0
	check("a live pid without a start time", unknown, true)
	elsewhere := me
	elsewhere.PidNS++
	check("an owner in another pid namespace", elsewhere, true)

	cmd, child := startChild(t)
	check("a running child", child, true)
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	// Until reaped it is a zombie: dead all the same.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, zombie, err := processStart(child.PID)
		if err == nil && zombie {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("killed child never became a zombie (%v)", err)
		}
		time.Sleep(time.Millisecond)
	}
	check("a killed child not yet reaped", child, false)
	_ = cmd.Wait()
	check("a killed and reaped child", child, false)
}

func TestRecordRoundTrip(t *testing.T) {
	dir := t.TempDir()
	if _, err := loadRecord(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("loadRecord of an empty dir: %v, want ErrNotExist", err)
	}
	me, _ := self()
	rec := &runRecord{Owner: me, Name: "n", Netns: "cleanwall-n", ContainerID: "cleanwall-n", IfName: "eth0",
		NodeNetns: currentNetns(), Runtime: &runtimeRecord{Slot: 3, Table: 3105, RedirectMark: 0x0c1e0300, PinRoot: "/sys/fs/bpf/x", StateDir: "/run/x/state"}}
	rec.CNI.Name = "cleanwall-run"
	rec.CNI.Subnet = defaultSubnet
	if err := rec.save(dir); err != nil {
		t.Fatal(err)
	}
	rec.Runtime.PinRoot = "/proc/2/root/sys/fs/bpf/x"
	if err := rec.save(dir); err != nil { // a second save replaces the first
		t.Fatal(err)
	}
	got, err := loadRecord(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Owner != me || got.Name != "n" || got.Runtime == nil || *got.Runtime != *rec.Runtime || got.CNI.Subnet != defaultSubnet || got.NodeNetns != rec.NodeNetns {
		t.Fatalf("round trip: got %+v (runtime %+v), want %+v", got, got.Runtime, rec)
	}
	if got.Runtime.config().Table != 3105 || got.Runtime.config().PinRoot != rec.Runtime.PinRoot {
		t.Fatalf("config from the record: %+v", got.Runtime.config())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("the run dir holds %d files after two saves, want only %s", len(entries), recordFile)
	}
}

// collect removes runs whose owner is gone and nothing of a live one. The
// runs here made nothing but their directory, so no root is needed.
func TestCollectJudgesOwners(t *testing.T) {
	root := t.TempDir()
	mkRun := func(pid int, rec *runRecord) string {
		t.Helper()
		dir := filepath.Join(root, strconv.Itoa(pid))
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if rec != nil {
			if err := rec.save(dir); err != nil {
				t.Fatal(err)
			}
		}
		return dir
	}
	me, _ := self()
	live := mkRun(me.PID, &runRecord{Owner: me, Name: "live"})

	cmd, child := startChild(t)
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	dead := mkRun(child.PID, &runRecord{Owner: child, Name: "dead"})

	// A dir with no record, named by a live pid: not judged, left alone.
	_, otherOwner := startChild(t)
	unjudged := mkRun(otherOwner.PID, nil)
	if err := os.WriteFile(filepath.Join(unjudged, "something"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// Slot locks and the like are not runs.
	if err := os.WriteFile(filepath.Join(root, "slot-1.lock"), nil, 0o600); err != nil {
		t.Fatal(err)
	}

	pass := collect(context.Background(), root)
	if len(pass.collected) != 1 || pass.collected[0].rec.Name != "dead" || pass.collected[0].err != nil {
		t.Fatalf("collected %+v, want the dead run only", pass.collected)
	}
	for _, d := range []string{live, unjudged} {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("%s removed: %v", d, err)
		}
	}
	if _, err := os.Stat(dead); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the dead run's directory stayed: %v", err)
	}
	names := map[string]bool{}
	for _, r := range pass.remaining {
		names[r.Name] = true
	}
	if !names["live"] || names["dead"] {
		t.Errorf("remaining runs %v: want the live one, not the dead one", names)
	}
	if _, err := os.Stat(filepath.Join(root, "slot-1.lock")); err != nil {
		t.Errorf("slot lock removed: %v", err)
	}
}
