package broker_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/broker"
	"github.com/cleanwall/cleanwall/attest/broker/keystore"
	"github.com/cleanwall/cleanwall/attest/simulated"
	"github.com/cleanwall/cleanwall/governance/audit"
	"github.com/cleanwall/cleanwall/internal/testutil"
)

const keyID = "egress-dek"

// testCA writes broker.pem/broker.key signed by a throwaway CA.
func testCA(t testing.TB, dir string) *x509.CertPool { return testutil.TestCA(t, dir, "broker") }

// policyFor writes a release-policy entry that the simulated config c satisfies.
func policyFor(c simulated.Config) string {
	return fmt.Sprintf(`
        - tee: snp
          measurements: ["%s"]
          hostData: "%s"
          minimumTCB: {bootloader: %d, tee: %d, snp: %d, microcode: %d}
          minimumFirmware: "%d.%d"
          debug: false
          vmpl: %d
          allowedChipIDs: []`,
		hex.EncodeToString(c.Measurement[:]), hex.EncodeToString(c.HostData[:]),
		c.TCB.Bootloader, c.TCB.TEE, c.TCB.SNP, c.TCB.Microcode, c.Firmware.Major, c.Firmware.Minor, c.VMPL)
}

// clock is a settable test clock.
type clock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.off += d
	c.mu.Unlock()
}

// noNetwork fails every fetch from AMD: tests never leave the machine.
type noNetwork struct{ calls atomic.Int32 }

func (n *noNetwork) Get(url string) ([]byte, error) {
	n.calls.Add(1)
	return nil, fmt.Errorf("test forbids fetching %s", url)
}

type env struct {
	t         testing.TB
	dir       string
	cfgPath   string
	pool      *x509.CertPool
	url       string
	clock     *clock
	net       *noNetwork
	auditPath string
	stop      func()
	srv       *broker.Server
	log       *audit.Log
	// serveErrOK: Serve may fail when it stops (a test broke the audit log).
	serveErrOK bool
}

// closeAudit closes the broker's audit log under it.
func (e *env) closeAudit() {
	e.serveErrOK = true
	if err := e.log.Close(); err != nil {
		e.t.Fatal(err)
	}
}

type envOptions struct {
	allowSimulated bool
	// extraPolicy replaces the anyOf entries (YAML, indented for anyOf).
	anyOf string
	// extra top-level YAML.
	extra string
	// keepDir reuses a previous env's directory (restart).
	dir string
	// syncNever makes the audit log skip fsync (benchmarks).
	syncNever bool
	// quiet discards the broker's log (benchmarks).
	quiet bool
}

func writeConfig(t testing.TB, dir string, o envOptions) string {
	t.Helper()
	anyOf := o.anyOf
	if anyOf == "" {
		anyOf = policyFor(simulated.DefaultConfig())
	}
	cfg := fmt.Sprintf(`listen: 127.0.0.1:0
tls: {certFile: broker.pem, keyFile: broker.key}
allowSimulatedTEE: %v
keyStore:
  dir: keys
  masterKeyFile: master.key
keys:
  - id: %s
    release:
      anyOf:%s
  - id: other-key
    release:
      anyOf:%s
%s`, o.allowSimulated, keyID, anyOf, policyFor(simulated.DefaultConfig()), o.extra)
	path := filepath.Join(dir, "broker.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// startBroker runs a broker on 127.0.0.1 with a fresh (or the given)
// directory, a test CA and a simulated-evidence release policy.
func startBroker(t testing.TB, o envOptions) *env {
	t.Helper()
	e := &env{t: t, dir: o.dir, clock: &clock{}, net: &noNetwork{}}
	fresh := e.dir == ""
	if fresh {
		e.dir = t.TempDir()
	}
	e.pool = testCA(t, e.dir)
	e.cfgPath = writeConfig(t, e.dir, o)
	cfg, err := broker.LoadConfig(e.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if fresh {
		if err := keystore.CreateMasterKey(cfg.KeyStore.MasterKeyFile); err != nil {
			t.Fatal(err)
		}
	}
	master, err := keystore.LoadMasterKey(cfg.KeyStore.MasterKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := keystore.Open(cfg.KeyStore.Dir, master)
	if err != nil {
		t.Fatal(err)
	}
	if fresh {
		for _, id := range []string{keyID, "other-key"} {
			if _, err := keys.Create(id); err != nil {
				t.Fatal(err)
			}
		}
	}
	e.auditPath = filepath.Join(cfg.KeyStore.Dir, "audit.jsonl")
	syncPolicy := audit.SyncEveryRecord
	if o.syncNever {
		syncPolicy = audit.SyncNever
	}
	log, err := audit.Open(e.auditPath, audit.Options{Sync: syncPolicy})
	if err != nil {
		t.Fatal(err)
	}
	logger := testutil.Logger(t)
	if o.quiet {
		logger = slog.New(slog.DiscardHandler)
	}
	srv, err := broker.New(cfg, broker.Options{Keys: keys, Audit: log, Logger: logger, Now: e.clock.now, Getter: e.net})
	if err != nil {
		t.Fatal(err)
	}
	e.srv, e.log = srv, log
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.url = "https://" + ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	var once sync.Once
	e.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil && !e.serveErrOK {
				t.Errorf("Serve: %v", err)
			}
			log.Close()
			if n := e.net.calls.Load(); n != 0 {
				t.Errorf("the broker tried to fetch from AMD %d times", n)
			}
		})
	}
	t.Cleanup(e.stop)
	return e
}

// httpClient trusts the test CA.
func (e *env) httpClient() *http.Client {
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.pool}}, Timeout: 30 * time.Second}
}

// post sends a raw body and decodes the answer into out (on 200) or returns
// the refusal.
func (e *env) post(path string, body []byte, out any) (int, *attest.ErrorResponse) {
	e.t.Helper()
	resp, err := e.httpClient().Post(e.url+path, "application/json", bytes.NewReader(body))
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		var er attest.ErrorResponse
		if err := json.Unmarshal(data, &er); err != nil {
			e.t.Fatalf("status %d with body %q", resp.StatusCode, data)
		}
		return resp.StatusCode, &er
	}
	if err := json.Unmarshal(data, out); err != nil {
		e.t.Fatal(err)
	}
	return resp.StatusCode, nil
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// records reads the audit log (verifying it).
func (e *env) records() []audit.Record {
	e.t.Helper()
	f, err := os.Open(e.auditPath)
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	var out []audit.Record
	rd := audit.NewReader(f)
	for {
		r, err := rd.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			e.t.Fatalf("audit log: %v", err)
		}
		out = append(out, r)
	}
}

// lastRecord is the newest audit record of kind.
func (e *env) lastRecord(kind string) audit.Record {
	e.t.Helper()
	recs := e.records()
	for i := len(recs) - 1; i >= 0; i-- {
		if recs[i].Kind == kind {
			return recs[i]
		}
	}
	e.t.Fatalf("no %s record", kind)
	return audit.Record{}
}

func field(r audit.Record, name string) string {
	v, ok := r.Fields[name]
	if !ok {
		return "<missing>"
	}
	return fmt.Sprint(v)
}

// mutatingAttester changes the evidence of another attester.
type mutatingAttester struct {
	attest.Attester
	mutate func([]byte) []byte
}

func (m mutatingAttester) Evidence(ctx context.Context, rd [64]byte) ([]byte, error) {
	ev, err := m.Attester.Evidence(ctx, rd)
	if err != nil {
		return nil, err
	}
	return m.mutate(ev), nil
}

func newSim(t testing.TB, mutate func(*simulated.Config)) *simulated.Attester {
	t.Helper()
	c := simulated.DefaultConfig()
	if mutate != nil {
		mutate(&c)
	}
	a, err := simulated.New(c)
	if err != nil {
		t.Fatal(err)
	}
	return a
}
