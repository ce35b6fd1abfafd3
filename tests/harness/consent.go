package harness

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/cleanwall/cleanwall/internal/netns"
)

// ConsentServer is a consent service (shared/GOVERNANCE.md) in the remote
// namespace, over TLS, whose answers the test sets: grants per (kind,
// policy, rule), or a failure mode. It records every request.
type ConsentServer struct {
	URL    string // https://<addr>
	CAFile string // the CA its certificate chains to (--consent-ca)

	l   net.Listener
	srv *http.Server
	mu  sync.Mutex
	// grants maps kind/policy/rule to the allow's ttlSeconds.
	grants  map[string]int
	denyTTL int
	mode    ConsentMode
	reqs    []ConsentRequest
}

// ConsentRequest is one request the server received.
type ConsentRequest struct {
	Kind, Sandbox, Policy, PolicySHA256, Rule, Destination, Node string
	At                                                           time.Time
}

// ConsentMode makes the server fail in one way.
type ConsentMode int

const (
	ConsentAnswer  ConsentMode = iota // answer from the grants
	ConsentSlow                       // answer allow after 5 s (past any test's timeout)
	ConsentGarbage                    // 200 with a body that is not a decision
	Consent500                        // 500 with an allow in the body
)

// StartConsentServer serves the consent protocol at addr (in the remote
// namespace) with a certificate of a CA made for it.
func (e *Env) StartConsentServer(addr string) *ConsentServer {
	e.T.Helper()
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		e.T.Fatal(err)
	}
	pki := e.NewPKI("consent")
	cert := pki.Issue("consent", []string{host}, false, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
	s := &ConsentServer{CAFile: pki.CAFile, grants: map[string]int{}, denyTTL: 30}
	if err := e.InRemote(func() (err error) {
		s.l, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		e.T.Fatal(err)
	}
	s.URL = "https://" + s.l.Addr().String()
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/consent", s.handle)
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ErrorLog: log.New(io.Discard, "", 0)}
	s.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	go func() { _ = s.srv.ServeTLS(s.l, "", "") }()
	e.onCleanup(s.Stop)
	return s
}

func (s *ConsentServer) handle(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Kind, Sandbox, Policy, PolicySHA256, Rule, Destination, Node string
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&req); err != nil {
		http.Error(w, "malformed", http.StatusBadRequest)
		return
	}
	s.mu.Lock()
	s.reqs = append(s.reqs, ConsentRequest{Kind: req.Kind, Sandbox: req.Sandbox, Policy: req.Policy, PolicySHA256: req.PolicySHA256,
		Rule: req.Rule, Destination: req.Destination, Node: req.Node, At: time.Now()})
	mode := s.mode
	ttl, granted := s.grants[req.Kind+"/"+req.Policy+"/"+req.Rule]
	denyTTL := s.denyTTL
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	switch mode {
	case ConsentSlow:
		select {
		case <-time.After(5 * time.Second):
		case <-r.Context().Done():
			return
		}
		_, _ = io.WriteString(w, `{"decision":"allow","ttlSeconds":30}`)
	case ConsentGarbage:
		_, _ = io.WriteString(w, `<html>allow</html>`)
	case Consent500:
		w.WriteHeader(http.StatusInternalServerError)
		_, _ = io.WriteString(w, `{"decision":"allow","ttlSeconds":30}`)
	default:
		if granted {
			fmt.Fprintf(w, `{"decision":"allow","ttlSeconds":%d,"reason":"granted"}`, ttl)
		} else {
			fmt.Fprintf(w, `{"decision":"deny","ttlSeconds":%d,"reason":"not granted"}`, denyTTL)
		}
	}
}

// Allow grants kind for policy (and rule, for egress) with answers cached
// ttl seconds.
func (s *ConsentServer) Allow(kind, policy, rule string, ttl int) {
	s.mu.Lock()
	s.grants[kind+"/"+policy+"/"+rule] = ttl
	s.mu.Unlock()
}

// Revoke withdraws a grant: later answers deny.
func (s *ConsentServer) Revoke(kind, policy, rule string) {
	s.mu.Lock()
	delete(s.grants, kind+"/"+policy+"/"+rule)
	s.mu.Unlock()
}

// SetDenyTTL sets the ttlSeconds of denies (default 30).
func (s *ConsentServer) SetDenyTTL(ttl int) {
	s.mu.Lock()
	s.denyTTL = ttl
	s.mu.Unlock()
}

// SetMode makes the server fail (or answer again: ConsentAnswer).
func (s *ConsentServer) SetMode(m ConsentMode) {
	s.mu.Lock()
	s.mode = m
	s.mu.Unlock()
}

// Requests returns the requests received so far.
func (s *ConsentServer) Requests() []ConsentRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]ConsentRequest(nil), s.reqs...)
}

// Stop closes the server: the service is down (connections refused).
func (s *ConsentServer) Stop() { _ = s.srv.Close() }

// ExampleConsentServer is the reference consent service
// (examples/consent) running in the remote namespace, answering from an
// allow-list file the test rewrites.
type ExampleConsentServer struct {
	URL, CAFile, AllowFile string
	cmd                    *exec.Cmd
	logMu                  sync.Mutex
	log                    []byte
}

// StartExampleConsentServer builds and starts examples/consent at addr in
// the remote namespace with allow as its allow-list, polling it every
// 100 ms, and waits until it answers.
func (e *Env) StartExampleConsentServer(addr, allow string) *ExampleConsentServer {
	e.T.Helper()
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		e.T.Fatal(err)
	}
	root, err := moduleRoot()
	if err != nil {
		e.T.Fatal(err)
	}
	bin := filepath.Join(e.Dir, "consent-example")
	if out, err := exec.Command("go", "build", "-C", root, "-o", bin, "./examples/consent").CombinedOutput(); err != nil {
		e.T.Fatalf("building examples/consent: %v\n%s", err, out)
	}
	pki := e.NewPKI("consent-example")
	certFile, keyFile := pki.WriteKeyPair("consent-example", pki.Issue("consent", []string{host}, false, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)))
	s := &ExampleConsentServer{URL: "https://" + addr, CAFile: pki.CAFile, AllowFile: filepath.Join(e.Dir, "allow.txt")}
	s.SetAllowList(allow)
	s.cmd = exec.Command(bin, "--listen", addr, "--cert", certFile, "--key", keyFile, "--allow", s.AllowFile, "--poll", "100ms")
	s.cmd.Stdout, s.cmd.Stderr = s, s
	if err := netns.Do(e.Remote, s.cmd.Start); err != nil {
		e.T.Fatal(err)
	}
	e.onCleanup(func() {
		_ = s.cmd.Process.Kill()
		_ = s.cmd.Wait()
		if t, ok := e.T.(interface{ Failed() bool }); ok && t.Failed() {
			e.T.Logf("consent example log:\n%s", s.Log())
		}
	})
	if !Eventually(10*time.Second, func() bool {
		var c net.Conn
		err := e.InRemote(func() (err error) {
			c, err = net.DialTimeout("tcp", addr, 200*time.Millisecond)
			return err
		})
		if err == nil {
			c.Close()
		}
		return err == nil
	}) {
		e.T.Fatalf("examples/consent never listened on %s:\n%s", addr, s.Log())
	}
	return s
}

// SetAllowList replaces the allow-list file (a new modification time: the
// server reloads it within its poll interval).
func (s *ExampleConsentServer) SetAllowList(content string) {
	tmp := s.AllowFile + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		panic(err)
	}
	now := time.Now()
	_ = os.Chtimes(tmp, now, now)
	if err := os.Rename(tmp, s.AllowFile); err != nil {
		panic(err)
	}
}

func (s *ExampleConsentServer) Write(p []byte) (int, error) {
	s.logMu.Lock()
	s.log = append(s.log, p...)
	s.logMu.Unlock()
	return len(p), nil
}

// Log is what the server printed.
func (s *ExampleConsentServer) Log() string {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	return string(s.log)
}
