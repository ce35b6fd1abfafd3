package audit

import (
	"bytes"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/base64"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The reference sink with the forwarder: every record stored once, in
// order, in a file named after the node key that verifies against it; a
// restarted receiver continues its file.
func TestReceiverWithForwarder(t *testing.T) {
	sinkDir := t.TempDir()
	rc, err := NewReceiver(sinkDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewTLSServer(rc)
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	key := newKey(t)
	pub := key.Public().(ed25519.PublicKey)
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(path, Options{Signer: key, MaxSize: 2 << 10, Sync: SyncNever})
	if err != nil {
		t.Fatal(err)
	}
	opts := SinkOptions{URL: srv.URL + "/v1/audit", Roots: roots, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, MaxBatchRecords: 9}
	fw, err := l.Forward(opts)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 60 {
		l.Append("op", map[string]any{"i": i})
		if i%10 == 9 {
			l.Checkpoint()
		}
	}
	waitFor(t, "delivery", func() bool { return fw.Backlog() == 0 })
	// The receiver restarts (same directory); the forwarder goes on.
	srv.Close()
	rc.Close()
	rc, err = NewReceiver(sinkDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	srv2 := httptest.NewUnstartedServer(rc)
	srv2.Listener.Close()
	srv2.Listener = listenOn(t, srv.Listener.Addr().String())
	srv2.StartTLS()
	defer srv2.Close()
	for i := range 30 {
		l.Append("op", map[string]any{"i": 100 + i})
	}
	waitFor(t, "delivery after the receiver's restart", func() bool { return fw.Backlog() == 0 })
	fw.Close()
	l.Close()
	stored := filepath.Join(sinkDir, base64.RawURLEncoding.EncodeToString(pub)+".jsonl")
	sum, err := VerifyFiles([]string{stored}, VerifyOptions{NodeKey: pub})
	if err != nil {
		t.Fatal(err)
	}
	seq, _ := l.Last()
	if sum.FirstSeq != 1 || sum.Kinds["op"] != 90 || sum.LastSeq+1 < seq || sum.Checkpoints < 6 {
		t.Fatalf("the sink's file: %+v (log ends at %d)", sum, seq)
	}
	// Its content is the log's, byte for byte.
	var local []byte
	for _, f := range mustFiles(t, path) {
		b, _ := os.ReadFile(f)
		local = append(local, b...)
	}
	got, _ := os.ReadFile(stored)
	if !bytes.HasPrefix(local, got) {
		t.Fatal("the sink's copy is not the log's")
	}
}

// The receiver checks what it stores as a verifier would: a duplicate is
// dropped, a gap is acknowledged through what it has, and an edited record
// or a checkpoint signed by another key is refused (422) and not stored.
func TestReceiverRefusesWhatDoesNotVerify(t *testing.T) {
	rc, err := NewReceiver(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	key := newKey(t)
	pub := EncodeNodeKey(key.Public().(ed25519.PublicKey))
	path := rotatedLog(t, key, 30, 1<<20, 0)
	data, _ := os.ReadFile(path)
	lines := strings.SplitAfter(string(data), "\n")
	lines = lines[:len(lines)-1]
	post := func(first int, body string, nodeKey string) (int, string) {
		req := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(body))
		req.Header.Set("Content-Type", SinkContentType)
		req.Header.Set(HeaderFirstSeq, strconv.Itoa(first))
		if nodeKey != "" {
			req.Header.Set(HeaderNodeKey, nodeKey)
		}
		w := httptest.NewRecorder()
		rc.ServeHTTP(w, req)
		return w.Code, strings.TrimSpace(w.Body.String())
	}
	if code, body := post(1, strings.Join(lines[:10], ""), pub); code != 200 || body != `{"through":10}` {
		t.Fatalf("first batch: %d %s", code, body)
	}
	// Duplicates and the next records: stored once.
	if code, body := post(5, strings.Join(lines[4:15], ""), pub); code != 200 || body != `{"through":15}` {
		t.Fatalf("overlapping batch: %d %s", code, body)
	}
	// A gap: acknowledged through what it has.
	if code, body := post(20, strings.Join(lines[19:25], ""), pub); code != 200 || body != `{"through":15}` {
		t.Fatalf("gap: %d %s", code, body)
	}
	// An edited record: refused.
	edited := strings.Replace(lines[15], `"i":`, `"i":1`, 1)
	if code, body := post(16, edited, pub); code != http.StatusUnprocessableEntity || !strings.Contains(body, "hash") {
		t.Fatalf("edited: %d %s", code, body)
	}
	// The last record is the checkpoint Close wrote: by another key, refused.
	other := EncodeNodeKey(newKey(t).Public().(ed25519.PublicKey))
	otherRC, _ := NewReceiver(t.TempDir(), nil)
	defer otherRC.Close()
	rc2 := rc
	rc = otherRC
	if code, body := post(1, strings.Join(lines, ""), other); code != 200 || body != `{"through":30}` {
		// the 30 op records stored; the checkpoint (31) refused
		t.Fatalf("checkpoint by another key: %d %s", code, body)
	}
	rc = rc2
	if code, body := post(16, strings.Join(lines[15:], ""), pub); code != 200 || body != `{"through":31}` {
		t.Fatalf("the rest: %d %s", code, body)
	}
	// An allow-list of node keys: others, and none, are refused.
	rc.Allowed = map[string]bool{pub: true}
	if code, _ := post(1, lines[0], other); code != http.StatusForbidden {
		t.Fatalf("a node key not allowed: %d", code)
	}
	if code, _ := post(1, lines[0], ""); code != http.StatusForbidden {
		t.Fatalf("no node key with an allow-list: %d", code)
	}
	if code, body := post(31, lines[30], pub); code != 200 || body != `{"through":31}` {
		t.Fatalf("an allowed key: %d %s", code, body)
	}
}

func listenOn(t *testing.T, addr string) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Everything at once: 8 writers, checkpoints every millisecond, rotation
// every 4 KiB, retention keeping 2 files, and a forwarder to the reference
// sink. The sink ends with the whole chain, signed, once and in order.
func TestConcurrentWritersCheckpointsRotationSink(t *testing.T) {
	sinkDir := t.TempDir()
	rc, err := NewReceiver(sinkDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	srv := httptest.NewTLSServer(rc)
	defer srv.Close()
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	key := newKey(t)
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(path, Options{Signer: key, CheckpointInterval: time.Millisecond, MaxSize: 4 << 10, Keep: 2})
	if err != nil {
		t.Fatal(err)
	}
	fw, err := l.Forward(SinkOptions{URL: srv.URL, Roots: roots, MinBackoff: 5 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 40 {
				if _, err := l.Append("op", map[string]any{"g": g, "i": i}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	l.Checkpoint()
	waitFor(t, "delivery", func() bool { return fw.Backlog() == 0 })
	// Retention runs at rotation, keeping what the sink had not acknowledged
	// then; once it has everything, the next rotations bring the files down
	// to Keep.
	for i := 0; len(mustFiles(t, path)) > 3 && i < 1000; i++ {
		l.Append("more", map[string]any{"i": i})
	}
	waitFor(t, "delivery", func() bool { return fw.Backlog() == 0 })
	fw.Close()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	files := mustFiles(t, path)
	local, err := VerifyFiles(files, VerifyOptions{NodeKey: key.Public().(ed25519.PublicKey)})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) > 3 || local.PrunedThrough == 0 {
		t.Fatalf("retention: %d files, %+v", len(files), local)
	}
	stored := filepath.Join(sinkDir, base64.RawURLEncoding.EncodeToString(key.Public().(ed25519.PublicKey))+".jsonl")
	sum, err := VerifyFiles([]string{stored}, VerifyOptions{NodeKey: key.Public().(ed25519.PublicKey)})
	if err != nil {
		t.Fatal(err)
	}
	if sum.FirstSeq != 1 || sum.Kinds["op"] != 320 || sum.LastSeq+1 < local.LastSeq || sum.Checkpoints < 2 {
		t.Fatalf("sink copy: %+v", sum)
	}
	t.Logf("%d records, %d checkpoints, %d rotations kept %d files", sum.Records, sum.Checkpoints, sum.Kinds[KindPruned], len(files))
}
