package harness

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/attest/broker/keystore"
)

// Secure mode's far side: the key's owner, who holds the data key outside
// the Clean Room and is the other end of its closed loop, and a blob store
// that keeps whatever it is given (so that a test can show it only ever
// got ciphertext).

// DataKey returns the newest version of key id as its owner holds it: the
// raw bytes in the broker's key store, opened with the broker's master key.
// A test uses it to play the key holder outside the Clean Room (docs/sealing.md,
// "The offline tool"); nothing inside a sandbox can read it.
func (k *KeyBroker) DataKey(t testing.TB, id string) (key []byte, version int) {
	t.Helper()
	master, err := keystore.LoadMasterKey(filepath.Join(k.Dir, "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	s, err := keystore.Open(filepath.Join(k.Dir, "keys"), master)
	if err != nil {
		t.Fatal(err)
	}
	v, err := s.Latest(id)
	if err != nil {
		t.Fatal(err)
	}
	return v.Bytes, v.Number
}

// Stop ends the broker (SIGTERM) and waits for it: from then on every
// release fails, and released keys run out at their notAfter.
func (k *KeyBroker) Stop() {
	_ = k.cmd.Process.Signal(syscall.SIGTERM)
	_, _ = k.cmd.Process.Wait()
}

// BlobStore is an HTTP object store in the remote namespace: a PUT stores
// its body (Content-Length or chunked) under its path, a GET or HEAD serves
// it (with ranges and If-Match, as net/http.ServeContent does). It records
// every byte it received on any connection, before any HTTP parsing.
type BlobStore struct {
	Addr string

	mu      sync.Mutex
	objects map[string][]byte
	raw     bytes.Buffer
}

// maxBlobStoreBytes bounds what a store keeps and records.
const maxBlobStoreBytes = 64 << 20

// BlobStore starts a store on addr in the remote namespace.
func (e *Env) BlobStore(addr string) *BlobStore {
	e.T.Helper()
	var l net.Listener
	if err := e.InRemote(func() (err error) {
		l, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		e.T.Fatal(err)
	}
	s := &BlobStore{Addr: l.Addr().String(), objects: map[string][]byte{}}
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(s.serveHTTP)}
	go func() { _ = srv.Serve(&recordingListener{Listener: l, s: s}) }()
	e.onCleanup(func() { srv.Close() })
	return s
}

func (s *BlobStore) serveHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodPut:
		body, err := io.ReadAll(io.LimitReader(r.Body, maxBlobStoreBytes))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		s.Put(r.URL.Path, body)
		w.WriteHeader(http.StatusCreated)
	case http.MethodGet, http.MethodHead:
		body, ok := s.Object(r.URL.Path)
		if !ok {
			http.NotFound(w, r)
			return
		}
		sum := sha256.Sum256(body)
		w.Header().Set("ETag", `"`+hex.EncodeToString(sum[:8])+`"`)
		w.Header().Set("Content-Type", "application/octet-stream")
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(body))
	default:
		w.WriteHeader(http.StatusMethodNotAllowed)
	}
}

// Put stores body under path directly, as if someone with access to the
// store (not a sandbox) had put it there.
func (s *BlobStore) Put(path string, body []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.objects[path] = append([]byte(nil), body...)
}

// Object returns what the store holds under path.
func (s *BlobStore) Object(path string) ([]byte, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.objects[path]
	return append([]byte(nil), b...), ok
}

// Received returns every byte the store received so far, on every
// connection, in the order it read them (request heads included).
func (s *BlobStore) Received() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.raw.Bytes()...)
}

func (s *BlobStore) record(p []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.raw.Len()+len(p) <= maxBlobStoreBytes {
		s.raw.Write(p)
	}
}

// recordingListener hands out connections whose reads the store records.
type recordingListener struct {
	net.Listener
	s *BlobStore
}

func (l *recordingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &recordingConn{Conn: c, s: l.s}, nil
}

type recordingConn struct {
	net.Conn
	s *BlobStore
}

func (c *recordingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.s.record(p[:n])
	}
	return n, err
}
