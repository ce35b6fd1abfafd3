package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/runtime/cnichain"
	"github.com/cleanwall/cleanwall/runtime/daemon"
)

// recordFile is a run's ownership record, in its run directory
// (<runDir>/<pid>): who owns the run and everything `cleanwall gc` needs to
// remove what it made once that owner is gone. It is written before the
// run makes anything, and again before the embedded runtime installs its
// routing and pins.
const recordFile = "owner.json"

type runRecord struct {
	Owner owner `json:"owner"`
	// Name is the sandbox's name; Netns its namespace under /run/netns.
	Name        string `json:"name"`
	Netns       string `json:"netns"`
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
	// NodeNetns is the namespace the run's routing lives in.
	NodeNetns nsRef `json:"nodeNetns"`
	// CNI is the chain the sandbox was attached with.
	CNI cnichain.Options `json:"cni"`
	// Runtime is the embedded runtime, nil when cleanwalld served the run.
	Runtime *runtimeRecord `json:"runtime,omitempty"`
	// legacy marks a run directory made before ownership records: what
	// is known of it was reconstructed (see legacyRecord).
	legacy bool
}

// owner identifies the process that owns a run. A pid alone is not enough:
// once the owner is dead the kernel may give its pid to another process.
type owner struct {
	PID int `json:"pid"`
	// StartTime is field 22 of /proc/<pid>/stat: clock ticks after boot.
	StartTime uint64 `json:"startTime"`
	// PidNS is the inode of the owner's pid namespace: a pid means
	// nothing in another one.
	PidNS uint64 `json:"pidNS"`
}

// runtimeRecord is what an embedded runtime installs with (daemon.Config).
type runtimeRecord struct {
	Slot         int    `json:"slot"`
	Socket       string `json:"socket"`
	PinRoot      string `json:"pinRoot"`
	StateDir     string `json:"stateDir"`
	RedirectMark uint32 `json:"redirectMark"`
	SocketMark   uint32 `json:"socketMark"`
	Table        int    `json:"table"`
	RulePriority int    `json:"rulePriority"`
}

func runtimeRecordOf(slot int, c daemon.Config) *runtimeRecord {
	return &runtimeRecord{Slot: slot, Socket: c.Socket, PinRoot: c.PinRoot, StateDir: c.StateDir,
		RedirectMark: c.RedirectMark, SocketMark: c.SocketMark, Table: c.Table, RulePriority: c.RulePriority}
}

func (r *runtimeRecord) config() daemon.Config {
	return daemon.Config{Socket: r.Socket, PinRoot: r.PinRoot, StateDir: r.StateDir,
		RedirectMark: r.RedirectMark, SocketMark: r.SocketMark, Table: r.Table, RulePriority: r.RulePriority}
}

// save writes the record atomically: a reader sees the old or the new one.
func (r *runRecord) save(dir string) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, ".owner-*")
	if err != nil {
		return fmt.Errorf("writing the ownership record: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("writing the ownership record: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing the ownership record: %w", err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, recordFile)); err != nil {
		return fmt.Errorf("writing the ownership record: %w", err)
	}
	return nil
}

// loadRecord reads a run directory's record (os.ErrNotExist when none).
func loadRecord(dir string) (*runRecord, error) {
	data, err := os.ReadFile(filepath.Join(dir, recordFile))
	if err != nil {
		return nil, err
	}
	var r runRecord
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, recordFile), err)
	}
	if r.Owner.PID <= 0 {
		return nil, fmt.Errorf("%s: no owner pid", filepath.Join(dir, recordFile))
	}
	return &r, nil
}

// self describes the calling process as a run's owner.
func self() (owner, error) {
	pid := os.Getpid()
	start, _, err := processStart(pid)
	if err != nil {
		return owner{}, err
	}
	pidns, ok := statNS("/proc/self/ns/pid")
	if !ok {
		return owner{}, errors.New("reading this process's pid namespace")
	}
	return owner{PID: pid, StartTime: start, PidNS: pidns.Inode}, nil
}

// alive tells whether the owner still runs, and if not, why it is judged
// gone. When it cannot tell, the owner counts as alive: gc only ever
// removes what is certainly dead.
func (o owner) alive() (bool, string) {
	if o.PidNS != 0 {
		if mine, ok := statNS("/proc/self/ns/pid"); !ok || mine.Inode != o.PidNS {
			return true, "owner in another pid namespace"
		}
	}
	start, zombie, err := processStart(o.PID)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return false, "owner gone"
	case err != nil:
		return true, err.Error()
	case zombie:
		return false, "owner exited"
	case o.StartTime == 0:
		return true, "owner pid in use, start time unknown"
	case start != o.StartTime:
		return false, "owner gone, its pid reused"
	}
	return true, "owner alive"
}

// processStart reads a process's start time and whether it is a zombie.
func processStart(pid int) (start uint64, zombie bool, err error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, false, err
	}
	start, state, err := parseStat(string(data))
	return start, state == 'Z', err
}

// parseStat extracts the state (field 3) and start time (field 22) of a
// /proc/<pid>/stat line. The command name (field 2) is in parentheses and
// may itself hold spaces and parentheses: fields are counted after the
// last ')'.
func parseStat(stat string) (start uint64, state byte, err error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("malformed /proc stat %q", stat)
	}
	f := strings.Fields(stat[i+1:])
	if len(f) < 20 || len(f[0]) != 1 {
		return 0, 0, fmt.Errorf("malformed /proc stat %q", stat)
	}
	start, err = strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("malformed /proc stat start time %q", f[19])
	}
	return start, f[0][0], nil
}

// nsRef finds a namespace again later: its inode, and a path that named it.
type nsRef struct {
	Path  string `json:"path,omitempty"`
	Dev   uint64 `json:"dev"`
	Inode uint64 `json:"inode"`
}

func statNS(path string) (nsRef, bool) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nsRef{}, false
	}
	return nsRef{Path: path, Dev: st.Dev, Inode: st.Ino}, true
}

func (r nsRef) same(o nsRef) bool { return r.Inode != 0 && r.Inode == o.Inode && r.Dev == o.Dev }

// currentNetns describes the calling thread's network namespace, with a
// path naming it if one is known (/run/netns/*, or the host's).
func currentNetns() nsRef {
	cur, ok := statNS("/proc/thread-self/ns/net")
	if !ok {
		return nsRef{}
	}
	cur.Path = ""
	entries, _ := os.ReadDir(netns.Dir)
	for _, e := range entries {
		if r, ok := statNS(netns.Path(e.Name())); ok && r.same(cur) {
			cur.Path = r.Path
			return cur
		}
	}
	if r, ok := statNS("/proc/1/ns/net"); ok && r.same(cur) {
		cur.Path = r.Path
	}
	return cur
}

// locate tells where the recorded namespace is now: the caller's own
// (here), at its recorded path, or gone (the kernel removed it, and with
// it everything it held) or out of reach.
func (r nsRef) locate() (path string, here, found bool) {
	if cur, ok := statNS("/proc/thread-self/ns/net"); ok && cur.same(r) {
		return "", true, true
	}
	if r.Path != "" {
		if at, ok := statNS(r.Path); ok && at.same(r) {
			return r.Path, false, true
		}
	}
	return "", false, false
}
