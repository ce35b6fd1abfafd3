package audit

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// testSink is a sink as docs/audit.md describes one: it stores each record
// once, in order, checks the chain, and acknowledges what it stored.
type testSink struct {
	mu       sync.Mutex
	lines    [][]byte
	lastHash string
	posts    int
	dupes    int
	failing  atomic.Bool
}

func (s *testSink) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if s.failing.Load() {
		http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil || r.Header.Get("Content-Type") != SinkContentType || r.Header.Get(HeaderNodeKey) == "" {
		http.Error(w, "bad batch", http.StatusBadRequest)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.posts++
	first, _ := strconv.ParseUint(r.Header.Get(HeaderFirstSeq), 10, 64)
	for i, line := range bytes.SplitAfter(body, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var rec struct {
			Seq      uint64
			PrevHash string
			Hash     string
		}
		if err := json.Unmarshal(line, &rec); err != nil || rec.Seq != first+uint64(i) {
			break
		}
		have := uint64(len(s.lines))
		if rec.Seq <= have {
			s.dupes++
			continue
		}
		if rec.Seq != have+1 || (have > 0 && rec.PrevHash != s.lastHash) {
			break // a gap: acknowledge what we have
		}
		s.lines = append(s.lines, line)
		s.lastHash = rec.Hash
	}
	json.NewEncoder(w).Encode(SinkAck{Through: uint64(len(s.lines))})
}

func (s *testSink) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.lines)
}

// serveSink serves s over TLS on addr ("" for any port).
func serveSink(t *testing.T, s *testSink, addr string) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(s)
	if addr != "" {
		srv.Listener.Close()
		l, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		srv.Listener = l
	}
	srv.StartTLS()
	return srv
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Sink down: nothing is lost, the backlog grows, retention keeps what the
// sink has not acknowledged; sink back: every record arrives once, in order.
func TestSinkOutageThenRecovery(t *testing.T) {
	sink := &testSink{}
	srv := serveSink(t, sink, "")
	addr := srv.Listener.Addr().String()
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	key := newKey(t)
	l, err := Open(path, Options{Signer: key, MaxSize: 2 << 10, Keep: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	opts := SinkOptions{URL: "https://" + addr + "/audit", Roots: roots, MinBackoff: 10 * time.Millisecond, MaxBackoff: 100 * time.Millisecond, MaxBatchRecords: 7}
	if _, err := l.Forward(SinkOptions{URL: "http://" + addr}); err == nil {
		t.Fatal("a plain-http sink was accepted")
	}
	fw, err := l.Forward(opts)
	if err != nil {
		t.Fatal(err)
	}
	appendN := func(n int) {
		for i := range n {
			if _, err := l.Append("op", map[string]any{"i": i, "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}); err != nil {
				t.Fatal(err)
			}
		}
	}
	appendN(30)
	waitFor(t, "the first records at the sink", func() bool { return fw.Backlog() == 0 && sink.count() == int(l.Durable()) })

	// Outage 1: the sink is gone (connection refused).
	srv.Close()
	appendN(60)
	waitFor(t, "failed deliveries", func() bool { return fw.Failures() >= 2 })
	if fw.Backlog() < 60 {
		t.Fatalf("backlog %d with the sink down, want >= 60", fw.Backlog())
	}
	files := mustFiles(t, path)
	if len(files) < 3 {
		t.Fatalf("retention removed files the sink has not acknowledged: %v", files)
	}
	if _, err := VerifyFiles(files, VerifyOptions{}); err != nil {
		t.Fatal(err)
	}
	srv = serveSink(t, sink, addr)
	waitFor(t, "recovery", func() bool { return fw.Backlog() == 0 })

	// Outage 2: the sink answers 503.
	sink.failing.Store(true)
	before := fw.Failures()
	appendN(20)
	waitFor(t, "503s", func() bool { return fw.Failures() > before })
	sink.failing.Store(false)
	waitFor(t, "recovery after 503", func() bool { return fw.Backlog() == 0 })

	// A new forwarder resumes from the persisted cursor.
	fw.Close()
	appendN(10)
	fw, err = l.Forward(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer fw.Close()
	waitFor(t, "delivery after restart", func() bool { return fw.Backlog() == 0 })
	// Retention runs at rotation and keeps what the sink had not
	// acknowledged then: rotate until the files are down to keep 1.
	for i := 0; len(mustFiles(t, path)) > 3 && i < 1000; i++ {
		appendN(1)
	}
	waitFor(t, "delivery of the last records", func() bool { return fw.Backlog() == 0 })
	srv.Close()

	seq, _ := l.Last()
	sink.mu.Lock()
	defer sink.mu.Unlock()
	if uint64(len(sink.lines)) != seq || sink.dupes != 0 {
		t.Fatalf("sink has %d records (%d duplicates), the log %d", len(sink.lines), sink.dupes, seq)
	}
	// The sink's copy is the whole chain, from the genesis, byte for byte.
	if err := Verify(bytes.NewReader(bytes.Join(sink.lines, nil))); err != nil {
		t.Fatalf("the sink's copy does not verify: %v", err)
	}
	// Once the sink has everything, retention removes the old files.
	if files := mustFiles(t, path); len(files) > 3 {
		t.Fatalf("after delivery %d files remain with keep 1", len(files))
	}
	t.Logf("%d records delivered in %d posts, %d failed posts", len(sink.lines), sink.posts, fw.Failures())
}

// A sink that lost its copy acknowledges less than it did: the forwarder
// sends again from there, and the sink ends with the whole chain.
func TestSinkLostCopyIsResent(t *testing.T) {
	sink := &testSink{}
	srv := serveSink(t, sink, "")
	defer srv.Close()
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	l, err := Open(filepath.Join(t.TempDir(), "audit.jsonl"), Options{Signer: newKey(t), MaxSize: 2 << 10, Sync: SyncNever})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fw, err := l.Forward(SinkOptions{URL: srv.URL, Roots: roots, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer fw.Close()
	for i := range 40 {
		l.Append("op", map[string]any{"i": i})
	}
	waitFor(t, "delivery", func() bool { return fw.Backlog() == 0 })
	sink.mu.Lock()
	sink.lines, sink.lastHash = nil, ""
	sink.mu.Unlock()
	l.Append("op", map[string]any{"i": "after the loss"})
	seq, _ := l.Last()
	waitFor(t, "the whole chain again", func() bool { return sink.count() == int(seq) })
	sink.mu.Lock()
	defer sink.mu.Unlock()
	if err := Verify(bytes.NewReader(bytes.Join(sink.lines, nil))); err != nil {
		t.Fatal(err)
	}
}

// A cursor left from another log is refused, not followed.
func TestSinkCursorOfAnotherLog(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.jsonl")
	l, err := Open(path, Options{Sync: SyncNever})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for i := range 5 {
		l.Append("op", map[string]any{"i": i})
	}
	opts := SinkOptions{URL: "https://127.0.0.1:1/"}
	for name, cursor := range map[string]string{
		"past the end": `{"seq":9,"hash":""}`,
		"another hash": `{"seq":3,"hash":"` + strings.Repeat("ab", 32) + `"}`,
	} {
		os.WriteFile(path+".sink-cursor", []byte(cursor), 0o600)
		if fw, err := l.Forward(opts); err == nil || !strings.Contains(err.Error(), "another log's cursor") {
			if fw != nil {
				fw.Close()
			}
			t.Errorf("%s: Forward = %v", name, err)
		}
	}
	recs := readRecords(t, path)
	os.WriteFile(path+".sink-cursor", []byte(`{"seq":3,"hash":"`+recs[2].Hash+`"}`), 0o600)
	fw, err := l.Forward(opts)
	if err != nil {
		t.Fatalf("this log's cursor: %v", err)
	}
	if fw.Cursor() != 3 || fw.Backlog() != 2 {
		t.Fatalf("cursor %d backlog %d", fw.Cursor(), fw.Backlog())
	}
	fw.Close()
}
