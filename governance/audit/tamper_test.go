package audit

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// tamperLog is a signed log in several rotated files, and a way to rewrite
// it the way an attacker with write access to the files would.
type tamperLog struct {
	key   ed25519.PrivateKey
	files []string
	recs  [][]Record
}

func newTamperLog(t *testing.T) *tamperLog {
	key := newKey(t)
	path := rotatedLog(t, key, 120, 2<<10, 0)
	tl := &tamperLog{key: key, files: mustFiles(t, path)}
	if len(tl.files) < 5 {
		t.Fatalf("only %d files", len(tl.files))
	}
	for _, f := range tl.files {
		tl.recs = append(tl.recs, readRecords(t, f))
	}
	if _, err := VerifyFiles(tl.files, VerifyOptions{NodeKey: key.Public().(ed25519.PublicKey)}); err != nil {
		t.Fatal(err)
	}
	return tl
}

// copyTo writes recs into a fresh directory (same file names) and returns
// the files in chain order.
func (tl *tamperLog) write(t *testing.T, recs [][]Record, names []string) []string {
	t.Helper()
	dir := t.TempDir()
	var out []string
	for i, file := range recs {
		var b strings.Builder
		for _, r := range file {
			line, err := json.Marshal(r)
			if err != nil {
				t.Fatal(err)
			}
			b.Write(line)
			b.WriteByte('\n')
		}
		p := filepath.Join(dir, filepath.Base(names[i]))
		if err := os.WriteFile(p, []byte(b.String()), 0o600); err != nil {
			t.Fatal(err)
		}
		out = append(out, p)
	}
	return out
}

func (tl *tamperLog) clone() [][]Record {
	out := make([][]Record, len(tl.recs))
	for i, f := range tl.recs {
		for _, r := range f {
			fields := map[string]any{}
			for k, v := range r.Fields {
				fields[k] = v
			}
			r.Fields = fields
			out[i] = append(out[i], r)
		}
	}
	return out
}

// rechain recomputes every prevHash and hash, as an attacker rewriting the
// log would; each is passed to f before its hash is computed.
func rechain(recs [][]Record, f func(r *Record)) {
	prev := GenesisHash
	for i := range recs {
		for j := range recs[i] {
			r := &recs[i][j]
			r.PrevHash = prev
			if f != nil {
				f(r)
			}
			r.Hash, _ = r.ComputeHash()
			prev = r.Hash
		}
	}
}

func sign(r *Record, key ed25519.PrivateKey) {
	pub := key.Public().(ed25519.PublicKey)
	msg, _ := CheckpointMessage(r.Seq-1, r.PrevHash, r.Time, pub)
	r.Fields = map[string]any{"nodeKey": EncodeNodeKey(pub), "signature": base64.StdEncoding.EncodeToString(ed25519.Sign(key, msg))}
}

func last(f []Record) int { return len(f) - 1 }

// Every way of tampering with a signed, rotated log is detected, and the
// error names the first record that does not hold: file, line and seq.
func TestTamperingDetected(t *testing.T) {
	tl := newTamperLog(t)
	other := newKey(t)
	nodeKey := tl.key.Public().(ed25519.PublicKey)
	names := tl.files
	type result struct {
		file   int // index into the files as written
		line   int
		seq    uint64
		reason string
	}
	seqOf := func(file, line int) uint64 { return tl.recs[file][line-1].Seq }
	cases := []struct {
		name   string
		edit   func(r [][]Record) ([][]Record, []string)
		opts   VerifyOptions
		expect result
	}{
		{"edited field", func(r [][]Record) ([][]Record, []string) {
			r[1][2].Fields["who"] = "mallory"
			return r, names
		}, VerifyOptions{}, result{1, 3, seqOf(1, 3), "hash does not match"}},
		{"edited field, every hash recomputed", func(r [][]Record) ([][]Record, []string) {
			r[1][2].Fields["who"] = "mallory"
			rechain(r, nil)
			return r, names
		}, VerifyOptions{}, result{1, len(tl.recs[1]), seqOf(1, len(tl.recs[1])), "signature invalid"}},
		{"deleted record", func(r [][]Record) ([][]Record, []string) {
			r[1] = append(r[1][:2:2], r[1][3:]...)
			return r, names
		}, VerifyOptions{}, result{1, 3, seqOf(1, 4), "follows"}},
		{"reordered records", func(r [][]Record) ([][]Record, []string) {
			r[1][1], r[1][2] = r[1][2], r[1][1]
			return r, names
		}, VerifyOptions{}, result{1, 2, seqOf(1, 3), "follows"}},
		{"truncated rotated file (whole records)", func(r [][]Record) ([][]Record, []string) {
			r[1] = r[1][:3]
			return r, names
		}, VerifyOptions{}, result{2, 1, seqOf(2, 1), "follows"}},
		{"dropped rotated file", func(r [][]Record) ([][]Record, []string) {
			return append(r[:2:2], r[3:]...), append(names[:2:2], names[3:]...)
		}, VerifyOptions{}, result{2, 1, seqOf(3, 1), "follows"}},
		{"dropped oldest file", func(r [][]Record) ([][]Record, []string) {
			return r[1:], names[1:]
		}, VerifyOptions{}, result{0, 1, seqOf(1, 1), "no audit.pruned record"}},
		{"reordered files", func(r [][]Record) ([][]Record, []string) {
			r[1], r[2] = r[2], r[1]
			return r, names
		}, VerifyOptions{}, result{1, 1, seqOf(2, 1), "follows"}},
		{"forged checkpoint signature", func(r [][]Record) ([][]Record, []string) {
			cp := &r[1][last(r[1])]
			sig, _ := base64.StdEncoding.DecodeString(cp.Fields["signature"].(string))
			sig[0] ^= 1
			cp.Fields["signature"] = base64.StdEncoding.EncodeToString(sig)
			rechain(r, nil)
			return r, names
		}, VerifyOptions{}, result{1, len(tl.recs[1]), seqOf(1, len(tl.recs[1])), "signature invalid"}},
		{"checkpoint signed by another key", func(r [][]Record) ([][]Record, []string) {
			r[1][2].Fields["who"] = "mallory"
			target := r[1][last(r[1])].Seq
			rechain(r, func(rec *Record) {
				if rec.Seq == target {
					sign(rec, other)
				}
			})
			return r, names
		}, VerifyOptions{}, result{1, len(tl.recs[1]), seqOf(1, len(tl.recs[1])), "not the log's node key"}},
		{"whole log re-signed by another key, checked against the attested key", func(r [][]Record) ([][]Record, []string) {
			r[0][1].Fields["who"] = "mallory"
			rechain(r, func(rec *Record) {
				if rec.Kind == KindCheckpoint {
					sign(rec, other)
				}
			})
			return r, names
		}, VerifyOptions{NodeKey: nodeKey}, result{0, len(tl.recs[0]), seqOf(0, len(tl.recs[0])), "not the log's node key"}},
		{"checkpoint with an extra field", func(r [][]Record) ([][]Record, []string) {
			r[2][last(r[2])].Fields["note"] = "x"
			rechain(r, nil)
			return r, names
		}, VerifyOptions{}, result{2, len(tl.recs[2]), seqOf(2, len(tl.recs[2])), "exactly nodeKey and signature"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			recs, ns := tc.edit(tl.clone())
			files := tl.write(t, recs, ns)
			_, err := VerifyFiles(files, tc.opts)
			assertBroken(t, err, filepath.Base(files[tc.expect.file]), tc.expect.line, tc.expect.seq, tc.expect.reason)
			t.Logf("%v", err)
		})
	}

	// Truncated mid-record (a rotated file): a torn line, named.
	t.Run("truncated mid-record", func(t *testing.T) {
		files := tl.write(t, tl.clone(), names)
		data, _ := os.ReadFile(files[1])
		os.WriteFile(files[1], data[:len(data)-30], 0o600)
		_, err := VerifyFiles(files, VerifyOptions{})
		assertBroken(t, err, filepath.Base(files[1]), len(tl.recs[1]), 0, "torn")
	})
	// The untouched copy verifies, against the attested key too.
	files := tl.write(t, tl.clone(), names)
	if _, err := VerifyFiles(files, VerifyOptions{NodeKey: nodeKey}); err != nil {
		t.Fatal(err)
	}
	if _, err := VerifyFiles(files, VerifyOptions{NodeKey: other.Public().(ed25519.PublicKey)}); err == nil {
		t.Fatal("a log verified against a key that did not sign it")
	}
}
