package audit

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// rotated is one rotated file of a log: PATH.<n>.
type rotated struct {
	path string
	n    uint64
}

// RotatedName is the name the n-th rotation of the log at path gets.
func RotatedName(path string, n uint64) string { return fmt.Sprintf("%s.%06d", path, n) }

// listRotated lists the rotated files of the log at path, oldest first.
func listRotated(path string) ([]rotated, error) {
	dir, base := filepath.Dir(path), filepath.Base(path)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("listing audit log files: %w", err)
	}
	var out []rotated
	for _, e := range entries {
		suffix, ok := strings.CutPrefix(e.Name(), base+".")
		if !ok || suffix == "" || !e.Type().IsRegular() {
			continue
		}
		n, err := strconv.ParseUint(suffix, 10, 64)
		if err != nil || strings.Trim(suffix, "0123456789") != "" {
			continue
		}
		out = append(out, rotated{filepath.Join(dir, e.Name()), n})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].n < out[j].n })
	return out, nil
}

// Files lists the files of the log whose active file is path, in chain
// order: its rotated files, oldest first, then path itself (when it exists).
func Files(path string) ([]string, error) {
	rs, err := listRotated(path)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, r := range rs {
		out = append(out, r.path)
	}
	if _, err := os.Stat(path); err == nil {
		out = append(out, path)
	}
	return out, nil
}

// firstRecord parses the first line of a file (nil for an empty file). Only
// the record itself is checked, not its place in the chain.
func firstRecord(path string) (*Record, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading audit log: %w", err)
	}
	defer f.Close()
	rd := ContinueReader(f, Chain{})
	line, err := rd.readLine()
	if err == io.EOF && len(line) == 0 {
		return nil, nil
	}
	if err != nil {
		return nil, &BrokenError{File: path, Line: 1, Reason: "first record unreadable (torn or too long)"}
	}
	rec, err := parseLine(line)
	if err != nil {
		return nil, &BrokenError{File: path, Line: 1, Seq: rec.Seq, Reason: err.Error()}
	}
	return &rec, nil
}

// lastRecord parses the last line of a file (nil for an empty file).
func lastRecord(path string) (*Record, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading audit log: %w", err)
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return nil, fmt.Errorf("reading audit log: %w", err)
	}
	if size == 0 {
		return nil, nil
	}
	from := max(0, size-MaxLineBytes-1)
	buf := make([]byte, size-from)
	if _, err := f.ReadAt(buf, from); err != nil {
		return nil, fmt.Errorf("reading audit log: %w", err)
	}
	if buf[len(buf)-1] != '\n' {
		return nil, &BrokenError{File: path, Reason: "last record has no newline (torn write)", Torn: true}
	}
	buf = buf[:len(buf)-1]
	if i := bytes.LastIndexByte(buf, '\n'); i >= 0 {
		buf = buf[i+1:]
	}
	rec, err := parseLine(buf)
	if err != nil {
		return nil, &BrokenError{File: path, Seq: rec.Seq, Reason: "last record: " + err.Error()}
	}
	return &rec, nil
}

// lastOfNewestRotated is where the active file's chain starts: after the
// last record of the newest rotated file, or at the genesis.
func lastOfNewestRotated(path string) (Chain, error) {
	rs, err := listRotated(path)
	if err != nil || len(rs) == 0 {
		return Chain{Hash: GenesisHash}, err
	}
	last, err := lastRecord(rs[len(rs)-1].path)
	if err != nil {
		return Chain{}, fmt.Errorf("audit log %s: %w", path, err)
	}
	if last == nil {
		return Chain{}, fmt.Errorf("audit log %s: rotated file %s is empty", path, rs[len(rs)-1].path)
	}
	c := Chain{Seq: last.Seq, Hash: last.Hash}
	if last.Kind == KindCheckpoint {
		// A rotated file ends with a checkpoint when the log has a node key.
		if key, err := checkCheckpoint(last); err == nil {
			c.NodeKey = key
		}
	}
	return c, nil
}

// rotateLocked ends the active file with a checkpoint, renames it to the
// next rotated name and continues in a new file; then retention runs.
func (l *Log) rotateLocked() error {
	if _, err := l.checkpointLocked(); err != nil {
		return err
	}
	if l.opts.Sync == SyncNever {
		if err := l.f.Sync(); err != nil {
			l.failed = fmt.Errorf("audit log failed: fsync: %w", err)
			return l.failed
		}
	}
	rs, err := listRotated(l.path)
	if err != nil {
		return err
	}
	n := uint64(1)
	if len(rs) > 0 {
		n = rs[len(rs)-1].n + 1
	}
	name := RotatedName(l.path, n)
	if err := os.Rename(l.path, name); err != nil {
		return fmt.Errorf("rotating audit log: %w", err)
	}
	f, err := os.OpenFile(l.path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		l.failed = fmt.Errorf("audit log failed: rotated to %s but cannot create %s: %w", name, l.path, err)
		return l.failed
	}
	old := l.f
	l.f, l.size = f, 0
	old.Close()
	if err := syncDir(filepath.Dir(l.path)); err != nil {
		l.failed = fmt.Errorf("audit log failed: %w", err)
		return l.failed
	}
	return l.pruneLocked()
}

// pruneLocked removes the oldest rotated files beyond Options.Keep whose
// records the sink (if any) has acknowledged, after recording which.
func (l *Log) pruneLocked() error {
	if l.opts.Keep <= 0 || l.holdPrune {
		return nil
	}
	rs, err := listRotated(l.path)
	if err != nil || len(rs) <= l.opts.Keep {
		return err
	}
	var names []string
	var through uint64
	var lastHash string
	for i, r := range rs[:len(rs)-l.opts.Keep] {
		next := l.path
		if i+1 < len(rs) {
			next = rs[i+1].path
		}
		first, err := firstRecord(next)
		if err != nil {
			return err
		}
		if first == nil {
			break
		}
		if l.retain != nil && first.Seq-1 > l.retain() {
			break // not delivered to the sink yet
		}
		names = append(names, filepath.Base(r.path))
		through, lastHash = first.Seq-1, first.PrevHash
	}
	if len(names) == 0 {
		return nil
	}
	fields, err := canonicalFields(map[string]any{"files": names, "throughSeq": through, "lastHash": lastHash})
	if err != nil {
		return err
	}
	rec, line, err := l.build(KindPruned, fields)
	if err != nil {
		return err
	}
	if err := l.write(rec, line); err != nil {
		return err
	}
	if l.opts.Sync == SyncNever {
		if err := l.f.Sync(); err != nil {
			l.failed = fmt.Errorf("audit log failed: fsync: %w", err)
			return l.failed
		}
	}
	for _, name := range names {
		if err := os.Remove(filepath.Join(filepath.Dir(l.path), name)); err != nil {
			l.log.Error("audit retention: removing a rotated file", "file", name, "error", err)
		}
	}
	return syncDir(filepath.Dir(l.path))
}
