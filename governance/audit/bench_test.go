package audit

import (
	"crypto/ed25519"
	"crypto/rand"
	"path/filepath"
	"testing"
)

// go test ./governance/audit -run '^$' -bench . -benchtime 200x
func benchAppend(b *testing.B, opts Options) {
	path := filepath.Join(b.TempDir(), "audit.jsonl")
	l, err := Open(path, opts)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	fields := map[string]any{"sandbox": "c-0123456789/eth0", "policy": "results", "policyHash": "665323f45cde406b142df9054b4c4e8103667c9d1cdbaa0e82e7b21caf81a05a", "rules": 12}
	b.ResetTimer()
	for range b.N {
		if _, err := l.Append("sandbox.add", fields); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendFsync(b *testing.B) { benchAppend(b, Options{}) }
func BenchmarkAppendNoSync(b *testing.B) {
	benchAppend(b, Options{Sync: SyncNever})
}

// A checkpoint after every record and a rotation every 64 KiB: the cost of
// signing and rotating on top of the plain append.
func BenchmarkAppendNoSyncSignedRotating(b *testing.B) {
	_, key, _ := newKeyB()
	path := filepath.Join(b.TempDir(), "audit.jsonl")
	l, err := Open(path, Options{Sync: SyncNever, Signer: key, MaxSize: 64 << 10})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	b.ResetTimer()
	for range b.N {
		if _, err := l.Append("sandbox.add", map[string]any{"sandbox": "c-0123456789/eth0"}); err != nil {
			b.Fatal(err)
		}
		if _, err := l.Checkpoint(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerifyFiles(b *testing.B) {
	_, key, _ := newKeyB()
	path := filepath.Join(b.TempDir(), "audit.jsonl")
	l, err := Open(path, Options{Sync: SyncNever, Signer: key, MaxSize: 1 << 20})
	if err != nil {
		b.Fatal(err)
	}
	for i := range 20000 {
		l.Append("deny.datapath", map[string]any{"sandbox": "c-0123456789/eth0", "reason": "no-rule", "i": i})
		if i%100 == 99 {
			l.Checkpoint()
		}
	}
	l.Close()
	files, _ := Files(path)
	b.ResetTimer()
	for range b.N {
		if _, err := VerifyFiles(files, VerifyOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(20200*b.N)/b.Elapsed().Seconds(), "records/s")
}

func newKeyB() (any, ed25519.PrivateKey, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	return pub, priv, err
}
