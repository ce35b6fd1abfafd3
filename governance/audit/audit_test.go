package audit

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func fixedClock() func() time.Time {
	t := time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)
	var mu sync.Mutex
	return func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		t = t.Add(time.Millisecond)
		return t
	}
}

func readLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.SplitAfter(string(b), "\n")
}

func TestAppendVerifyReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(path, Options{Now: fixedClock()})
	if err != nil {
		t.Fatal(err)
	}
	r1, err := l.Append("keybroker.release", map[string]any{
		"decision": "refused", "code": "debug-not-allowed", "version": 3, "big": uint64(1) << 62,
		"html": "<a&b>", "nested": map[string]any{"z": 1, "a": []any{true, nil, 0.5}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if r1.Seq != 1 || r1.PrevHash != GenesisHash || len(r1.Hash) != 64 {
		t.Fatalf("first record = %+v", r1)
	}
	r2, err := l.Append("daemon.deny", map[string]any{"sandbox": "sb-1"})
	if err != nil {
		t.Fatal(err)
	}
	if r2.Seq != 2 || r2.PrevHash != r1.Hash {
		t.Fatalf("second record does not chain: %+v", r2)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Append("x", nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Append after Close = %v", err)
	}

	// After a restart the chain continues where it stopped.
	l, err = Open(path, Options{Now: fixedClock()})
	if err != nil {
		t.Fatal(err)
	}
	r3, err := l.Append("keybroker.start", nil)
	if err != nil {
		t.Fatal(err)
	}
	if r3.Seq != 3 || r3.PrevHash != r2.Hash {
		t.Fatalf("record after reopen does not chain: %+v", r3)
	}
	l.Close()

	f, _ := os.Open(path)
	defer f.Close()
	if err := Verify(f); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	// Large integers keep their exact value on disk.
	lines := readLines(t, path)
	if !strings.Contains(lines[0], `"big":4611686018427387904`) || !strings.Contains(lines[0], `"a":[true,null,0.5]`) {
		t.Fatalf("first line lost values: %s", lines[0])
	}
	var got Record
	if err := json.Unmarshal([]byte(lines[0]), &got); err != nil || got.Fields["code"] != "debug-not-allowed" {
		t.Fatalf("reading back: %+v, %v", got, err)
	}
}

func writeLog(t *testing.T, n int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(path, Options{Now: fixedClock(), Sync: SyncNever})
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if _, err := l.Append("test.event", map[string]any{"i": i, "who": fmt.Sprintf("user-%d", i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestVerifyNamesFirstBrokenRecord(t *testing.T) {
	path := writeLog(t, 5)
	lines := readLines(t, path)
	for _, tc := range []struct {
		name   string
		edit   func(lines []string) []string
		seq    uint64
		line   int
		reason string
	}{
		{"edited field", func(l []string) []string {
			l[2] = strings.Replace(l[2], `"user-2"`, `"user-9"`, 1)
			return l
		}, 3, 3, "hash does not match"},
		{"edited field with recomputed hash", func(l []string) []string {
			var r Record
			dec := json.NewDecoder(strings.NewReader(l[1]))
			dec.UseNumber()
			if err := dec.Decode(&r); err != nil {
				t.Fatal(err)
			}
			r.Fields["who"] = "mallory"
			r.Hash, _ = r.ComputeHash()
			b, _ := json.Marshal(r)
			l[1] = string(b) + "\n"
			return l
		}, 3, 3, "prevHash"},
		{"removed record", func(l []string) []string { return append(l[:1:1], l[2:]...) }, 3, 2, "seq 3 follows 1"},
		{"swapped records", func(l []string) []string { l[1], l[2] = l[2], l[1]; return l }, 3, 2, "seq 3 follows 1"},
		{"extra spacing", func(l []string) []string {
			l[3] = strings.Replace(l[3], `"kind":`, `"kind": `, 1)
			return l
		}, 4, 4, "canonical"},
		{"garbage line", func(l []string) []string { l[4] = "hello\n"; return l }, 0, 5, "not a record"},
		{"torn tail", func(l []string) []string { l[4] = l[4][:20]; return l }, 0, 5, "torn"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			edited := tc.edit(append([]string(nil), lines...))
			err := Verify(strings.NewReader(strings.Join(edited, "")))
			var b *BrokenError
			if !errors.As(err, &b) || !errors.Is(err, ErrBroken) {
				t.Fatalf("Verify = %v, want a BrokenError", err)
			}
			if b.Seq != tc.seq || b.Line != tc.line || !strings.Contains(b.Reason, tc.reason) {
				t.Fatalf("Verify = %v (seq %d line %d), want seq %d line %d and %q", err, b.Seq, b.Line, tc.seq, tc.line, tc.reason)
			}
		})
	}
	if err := Verify(strings.NewReader("")); err != nil {
		t.Fatalf("empty log: %v", err)
	}
}

func TestOpenRefusesBrokenChain(t *testing.T) {
	path := writeLog(t, 3)
	lines := readLines(t, path)
	lines[1] = strings.Replace(lines[1], `"user-1"`, `"user-7"`, 1)
	if err := os.WriteFile(path, []byte(strings.Join(lines, "")), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Open(path, Options{})
	if !errors.Is(err, ErrBroken) || !strings.Contains(err.Error(), "record 2") {
		t.Fatalf("Open on a tampered log = %v, want it to name record 2", err)
	}
}

func TestOpenCutsTornTail(t *testing.T) {
	path := writeLog(t, 3)
	b, _ := os.ReadFile(path)
	torn := append(b, []byte(`{"seq":4,"time":"2025-`)...)
	if err := os.WriteFile(path, torn, 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := Open(path, Options{Now: fixedClock()})
	if err != nil {
		t.Fatal(err)
	}
	rec, err := l.Append("after", nil)
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	if rec.Seq != 5 {
		t.Fatalf("seq after recovery = %d, want 5 (4 is the recovery record)", rec.Seq)
	}
	f, _ := os.Open(path)
	defer f.Close()
	rd := NewReader(f)
	var kinds []string
	for {
		r, err := rd.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		kinds = append(kinds, r.Kind)
		if r.Kind == KindRecovered && fmt.Sprint(r.Fields["truncatedBytes"]) != "22" {
			t.Fatalf("recovery record = %+v", r)
		}
	}
	if strings.Join(kinds, ",") != "test.event,test.event,test.event,audit.recovered,after" {
		t.Fatalf("kinds = %v", kinds)
	}
}

func TestConcurrentAppendsChain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(path, Options{Sync: SyncNever})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 50 {
				if _, err := l.Append("c", map[string]any{"g": g, "i": i}); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	l.Close()
	b, _ := os.ReadFile(path)
	if n := bytes.Count(b, []byte("\n")); n != 400 {
		t.Fatalf("%d records, want 400", n)
	}
	if err := Verify(bytes.NewReader(b)); err != nil {
		t.Fatal(err)
	}
}

func TestFieldsMustEncode(t *testing.T) {
	l, err := Open(filepath.Join(t.TempDir(), "a"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := l.Append("x", map[string]any{"f": func() {}}); err == nil {
		t.Fatal("a field that cannot be encoded was accepted")
	}
	if r, err := l.Append("x", nil); err != nil || r.Seq != 1 {
		t.Fatalf("the failed append consumed a seq: %+v %v", r, err)
	}
}
