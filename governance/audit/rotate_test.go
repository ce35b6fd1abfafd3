package audit

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func newKey(t *testing.T) ed25519.PrivateKey {
	t.Helper()
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// rotatedLog writes n records (8 writers at once) into a log that rotates
// every ~maxSize bytes, signed by key, and returns its active path.
func rotatedLog(t *testing.T, key ed25519.PrivateKey, n int, maxSize int64, keep int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(path, Options{Now: fixedClock(), Sync: SyncNever, Signer: key, MaxSize: maxSize, Keep: keep})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := g; i < n; i += 8 {
				if _, err := l.Append("test.event", map[string]any{"i": i, "who": fmt.Sprintf("user-%d", i)}); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func readRecords(t *testing.T, file string) []Record {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var out []Record
	for _, line := range bytes.SplitAfter(data, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var r Record
		dec := json.NewDecoder(bytes.NewReader(line))
		dec.UseNumber()
		if err := dec.Decode(&r); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		out = append(out, r)
	}
	return out
}

func TestRotationChainsAcrossFilesWithCheckpoints(t *testing.T) {
	key := newKey(t)
	path := rotatedLog(t, key, 400, 4<<10, 0)
	files, err := Files(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 5 {
		t.Fatalf("%d files, want several rotations: %v", len(files), files)
	}
	if files[len(files)-1] != path || files[0] != RotatedName(path, 1) {
		t.Fatalf("files out of order: %v", files)
	}
	var prev *Record
	for i, f := range files {
		st, _ := os.Stat(f)
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v", f, st.Mode())
		}
		recs := readRecords(t, f)
		if len(recs) == 0 {
			t.Fatalf("%s is empty", f)
		}
		last := recs[len(recs)-1]
		if last.Kind != KindCheckpoint {
			t.Errorf("%s ends with %s, want a checkpoint (rotation and Close write one)", f, last.Kind)
		}
		if i < len(files)-1 && st.Size() > 4<<10+512 {
			t.Errorf("%s has %d bytes, past the rotation size", f, st.Size())
		}
		if prev != nil && (recs[0].PrevHash != prev.Hash || recs[0].Seq != prev.Seq+1) {
			t.Fatalf("%s does not continue the chain of the file before it", f)
		}
		prev = &last
	}
	sum, err := VerifyFiles(files, VerifyOptions{NodeKey: key.Public().(ed25519.PublicKey)})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Kinds["test.event"] != 400 || sum.FirstSeq != 1 || sum.Unsigned != 0 || sum.LastCheckpoint != sum.LastSeq ||
		sum.Checkpoints != len(files) || !sum.NodeKey.Equal(key.Public()) {
		t.Fatalf("summary = %+v", sum)
	}
	// Every event is there once.
	seen := map[string]bool{}
	VerifyFiles(files, VerifyOptions{Visit: func(_ string, _ int, r Record) {
		if r.Kind == "test.event" {
			seen[fmt.Sprint(r.Fields["i"])] = true
		}
	}})
	if len(seen) != 400 {
		t.Fatalf("%d distinct events", len(seen))
	}
	// Reopening continues after the last file.
	l, err := Open(path, Options{Signer: key, MaxSize: 4 << 10})
	if err != nil {
		t.Fatal(err)
	}
	r, err := l.Append("after", nil)
	if err != nil || r.Seq != sum.LastSeq+1 || r.PrevHash != sum.LastHash {
		t.Fatalf("append after reopen = %+v, %v", r, err)
	}
	l.Close()
	if _, err := VerifyFiles(mustFiles(t, path), VerifyOptions{}); err != nil {
		t.Fatal(err)
	}
}

func mustFiles(t *testing.T, path string) []string {
	t.Helper()
	files, err := Files(path)
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// A crash between renaming the active file and creating the next one
// leaves no active file: Open continues from the newest rotated file.
func TestOpenAfterCrashMidRotation(t *testing.T) {
	key := newKey(t)
	path := rotatedLog(t, key, 50, 2<<10, 0)
	files := mustFiles(t, path)
	sum, err := VerifyFiles(files, VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rs, _ := listRotated(path)
	if err := os.Rename(path, RotatedName(path, rs[len(rs)-1].n+1)); err != nil {
		t.Fatal(err)
	}
	l, err := Open(path, Options{Signer: key})
	if err != nil {
		t.Fatal(err)
	}
	r, err := l.Append("after", nil)
	if err != nil || r.Seq != sum.LastSeq+1 {
		t.Fatalf("append = %+v, %v", r, err)
	}
	l.Close()
	if _, err := VerifyFiles(mustFiles(t, path), VerifyOptions{}); err != nil {
		t.Fatal(err)
	}
}

func TestPeriodicCheckpoint(t *testing.T) {
	key := newKey(t)
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(path, Options{Signer: key, CheckpointInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	r, err := l.Append("op", nil)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		seq, _ := l.Last()
		if seq == r.Seq+1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no checkpoint within 5s at a 10ms interval")
		}
		time.Sleep(5 * time.Millisecond)
	}
	recs := readRecords(t, path)
	cp := recs[len(recs)-1]
	if cp.Kind != KindCheckpoint || cp.Fields["nodeKey"] != EncodeNodeKey(key.Public().(ed25519.PublicKey)) {
		t.Fatalf("checkpoint = %+v", cp)
	}
	// Nothing new: no more checkpoints.
	time.Sleep(50 * time.Millisecond)
	if seq, _ := l.Last(); seq != r.Seq+1 {
		t.Fatalf("checkpoints written with nothing to cover: last seq %d", seq)
	}
	if ok, err := l.Checkpoint(); ok || err != nil {
		t.Fatalf("Checkpoint with nothing new = %v, %v", ok, err)
	}
	if _, err := l.Append(KindCheckpoint, nil); err == nil {
		t.Fatal("a caller appended an unsigned checkpoint")
	}
}

func TestRetentionRecordsWhatItRemoves(t *testing.T) {
	key := newKey(t)
	path := rotatedLog(t, key, 400, 2<<10, 2)
	files := mustFiles(t, path)
	if len(files) != 3 {
		t.Fatalf("files = %v, want 2 rotated and the active one", files)
	}
	sum, err := VerifyFiles(files, VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if sum.PrunedThrough == 0 || sum.FirstSeq != sum.PrunedThrough+1 || sum.Kinds[KindPruned] == 0 {
		t.Fatalf("summary = %+v", sum)
	}
	// Removing the oldest kept file is not retention: no record says so.
	_, err = VerifyFiles(files[1:], VerifyOptions{})
	assertBroken(t, err, filepath.Base(files[1]), 1, 0, "no audit.pruned record")
}

func assertBroken(t *testing.T, err error, file string, line int, seq uint64, reason string) {
	t.Helper()
	var b *BrokenError
	if !errors.As(err, &b) || !errors.Is(err, ErrBroken) {
		t.Fatalf("err = %v, want a BrokenError", err)
	}
	if filepath.Base(b.File) != file || b.Line != line || (seq != 0 && b.Seq != seq) || !strings.Contains(b.Reason, reason) {
		t.Fatalf("err = %v, want %s:%d seq %d %q", err, file, line, seq, reason)
	}
}

func TestSecondWriterRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path, Options{}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second Open = %v, want ErrLocked", err)
	}
	l.Close()
	l, err = Open(path, Options{})
	if err != nil {
		t.Fatalf("Open after Close: %v", err)
	}
	l.Close()
}

func TestNodeKeyFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "node.key")
	k1, created, err := LoadOrCreateNodeKey(path)
	if err != nil || !created {
		t.Fatalf("create: %v %v", created, err)
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("node key mode %v", st.Mode())
	}
	k2, created, err := LoadOrCreateNodeKey(path)
	if err != nil || created || !k1.Equal(k2) {
		t.Fatalf("reload: same=%v created=%v %v", k1.Equal(k2), created, err)
	}
	os.Chmod(path, 0o640)
	if _, _, err := LoadOrCreateNodeKey(path); err == nil || !strings.Contains(err.Error(), "0640") {
		t.Fatalf("a group-readable key was accepted: %v", err)
	}
	os.Chmod(path, 0o600)
	os.WriteFile(filepath.Join(dir, "bad.key"), []byte("hello"), 0o600)
	if _, _, err := LoadOrCreateNodeKey(filepath.Join(dir, "bad.key")); err == nil {
		t.Fatal("garbage accepted as a node key")
	}

	// A log signed by one key is not continued by another.
	logPath := filepath.Join(dir, "audit.jsonl")
	l, err := Open(logPath, Options{Signer: k1})
	if err != nil {
		t.Fatal(err)
	}
	l.Append("x", nil)
	l.Close()
	if _, err := Open(logPath, Options{Signer: newKey(t)}); err == nil || !strings.Contains(err.Error(), "signed by node key") {
		t.Fatalf("Open with another node key = %v", err)
	}
	// Also when only the rotated files are signed (the active file is new).
	rotPath := rotatedLog(t, k1, 40, 1<<10, 0)
	os.Rename(rotPath, RotatedName(rotPath, 999))
	if _, err := Open(rotPath, Options{Signer: newKey(t)}); err == nil || !strings.Contains(err.Error(), "signed by node key") {
		t.Fatalf("Open with another node key than the rotated files' = %v", err)
	}
	if l, err := Open(rotPath, Options{Signer: k1}); err != nil {
		t.Fatalf("Open with the rotated files' key: %v", err)
	} else {
		l.Close()
	}
	pub := k1.Public().(ed25519.PublicKey)
	for _, s := range []string{EncodeNodeKey(pub), fmt.Sprintf("%x", []byte(pub))} {
		if got, err := ParseNodeKey(s); err != nil || !got.Equal(pub) {
			t.Fatalf("ParseNodeKey(%q) = %v", s, err)
		}
	}
	if _, err := ParseNodeKey("AAAA"); err == nil {
		t.Fatal("a 3-byte key parsed")
	}
}
