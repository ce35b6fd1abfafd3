// Command consent is a reference consent service for cleanwall
// (shared/GOVERNANCE.md, docs/consent.md): it answers POST /v1/consent
// over TLS from an allow-list file, which it reloads when the file
// changes, and logs every decision.
//
//	consent --listen :8443 --cert server.pem --key server.key --allow allow.txt
//
// The allow-list file has one grant per line (# starts a comment):
//
//	execute <policy> [sandbox=<id>] [ttl=<seconds>]
//	egress  <policy> <rule> [sandbox=<id>] [ttl=<seconds>]
//
// <policy> is the policy's metadata.name, <rule> an egress rule's name;
// either may be * (any). sandbox= limits the grant to one sandbox (the
// container ID cleanwall sends); ttl= is how long cleanwalld may cache the
// answer (default --ttl). Whatever no line grants is denied, with the
// same TTL. Removing a line revokes the grant: cleanwalld learns it when
// its cached answer expires (at most the TTL), or at once with
// `cleanwall consent refresh`.
//
// A file that fails to parse is not loaded: the previous list stays in
// force and the error is logged (a typo must not open, nor close,
// everything). A file that disappears denies everything.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// request is the protocol's request body.
type request struct {
	Kind         string `json:"kind"`
	Sandbox      string `json:"sandbox"`
	Policy       string `json:"policy"`
	PolicySHA256 string `json:"policySHA256"`
	Rule         string `json:"rule"`
	Destination  string `json:"destination"`
	Node         string `json:"node"`
}

// response is the protocol's answer.
type response struct {
	Decision   string `json:"decision"`
	TTLSeconds int    `json:"ttlSeconds"`
	Reason     string `json:"reason,omitempty"`
}

// grant is one line of the allow-list.
type grant struct {
	line               string
	kind, policy, rule string
	sandbox            string
	ttl                int // seconds; 0: the default
}

func (g grant) matches(r request) bool {
	match := func(pattern, v string) bool { return pattern == "*" || pattern == v }
	return g.kind == r.Kind && match(g.policy, r.Policy) &&
		(g.kind != "egress" || match(g.rule, r.Rule)) &&
		(g.sandbox == "" || g.sandbox == r.Sandbox)
}

// parse reads an allow-list, naming the line of the first error.
func parse(data []byte) ([]grant, error) {
	var out []grant
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		g := grant{line: strings.TrimSpace(line), kind: f[0]}
		var rest []string
		switch g.kind {
		case "execute":
			if len(f) < 2 {
				return nil, fmt.Errorf("line %d: want: execute <policy> [sandbox=<id>] [ttl=<seconds>]", n)
			}
			g.policy, rest = f[1], f[2:]
		case "egress":
			if len(f) < 3 {
				return nil, fmt.Errorf("line %d: want: egress <policy> <rule> [sandbox=<id>] [ttl=<seconds>]", n)
			}
			g.policy, g.rule, rest = f[1], f[2], f[3:]
		default:
			return nil, fmt.Errorf("line %d: %q: a line starts with execute or egress", n, f[0])
		}
		for _, opt := range rest {
			k, v, ok := strings.Cut(opt, "=")
			switch {
			case ok && k == "ttl":
				ttl, err := strconv.Atoi(v)
				if err != nil || ttl < 0 || ttl > 3600 {
					return nil, fmt.Errorf("line %d: ttl=%s: want 0 to 3600 seconds", n, v)
				}
				g.ttl = ttl
			case ok && k == "sandbox" && v != "":
				g.sandbox = v
			default:
				return nil, fmt.Errorf("line %d: %q: want sandbox=<id> or ttl=<seconds>", n, opt)
			}
		}
		out = append(out, g)
	}
	return out, sc.Err()
}

// list is the allow-list in force, reloaded when its file changes.
type list struct {
	path string
	log  *slog.Logger

	mu      sync.RWMutex
	grants  []grant
	modTime time.Time
	size    int64
	missing bool
}

// reload loads the file if it changed since the last look.
func (l *list) reload() {
	st, err := os.Stat(l.path)
	if errors.Is(err, os.ErrNotExist) {
		l.mu.Lock()
		if !l.missing {
			l.log.Warn("allow-list is gone: everything is denied", "file", l.path)
		}
		l.grants, l.missing, l.modTime, l.size = nil, true, time.Time{}, -1
		l.mu.Unlock()
		return
	}
	if err != nil {
		l.log.Error("allow-list unreadable: the previous one stays in force", "file", l.path, "error", err)
		return
	}
	l.mu.RLock()
	same := !l.missing && st.ModTime().Equal(l.modTime) && st.Size() == l.size
	l.mu.RUnlock()
	if same {
		return
	}
	data, err := os.ReadFile(l.path)
	if err != nil {
		l.log.Error("allow-list unreadable: the previous one stays in force", "file", l.path, "error", err)
		return
	}
	grants, err := parse(data)
	l.mu.Lock()
	l.modTime, l.size, l.missing = st.ModTime(), st.Size(), false
	if err == nil {
		l.grants = grants
	}
	l.mu.Unlock()
	if err != nil {
		l.log.Error("allow-list not loaded: the previous one stays in force", "file", l.path, "error", err)
		return
	}
	l.log.Info("allow-list loaded", "file", l.path, "grants", len(grants))
}

// decide answers one request.
func (l *list) decide(r request, defaultTTL int) response {
	l.mu.RLock()
	defer l.mu.RUnlock()
	for _, g := range l.grants {
		if g.matches(r) {
			ttl := g.ttl
			if ttl == 0 {
				ttl = defaultTTL
			}
			return response{Decision: "allow", TTLSeconds: ttl, Reason: "granted by: " + g.line}
		}
	}
	return response{Decision: "deny", TTLSeconds: defaultTTL, Reason: "no grant in the allow-list"}
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "consent:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("consent", flag.ContinueOnError)
	listen := fs.String("listen", ":8443", "address to serve HTTPS on")
	cert := fs.String("cert", "", "PEM certificate (chain) of the server (required)")
	key := fs.String("key", "", "PEM private key of the server (required)")
	allow := fs.String("allow", "", "allow-list file (required; format in the package doc and README.md)")
	ttl := fs.Int("ttl", 30, "ttlSeconds of answers whose grant sets none, and of denies")
	poll := fs.Duration("poll", time.Second, "how often the allow-list file is checked for changes")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *cert == "" || *key == "" || *allow == "" {
		return errors.New("--cert, --key and --allow are required")
	}
	if *ttl < 0 || *ttl > 3600 || *poll <= 0 {
		return errors.New("--ttl: 0 to 3600; --poll: positive")
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	l := &list{path: *allow, log: log}
	l.reload()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		t := time.NewTicker(*poll)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				l.reload()
			}
		}
	}()
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/consent", func(w http.ResponseWriter, r *http.Request) {
		var req request
		dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
		if err := dec.Decode(&req); err != nil || req.Kind == "" || req.Sandbox == "" || req.Policy == "" {
			http.Error(w, "malformed consent request", http.StatusBadRequest)
			log.Warn("malformed request", "from", r.RemoteAddr)
			return
		}
		resp := l.decide(req, *ttl)
		log.Info("decision", "decision", resp.Decision, "kind", req.Kind, "sandbox", req.Sandbox, "policy", req.Policy,
			"policySHA256", req.PolicySHA256, "rule", req.Rule, "destination", req.Destination, "node", req.Node,
			"ttl", resp.TTLSeconds, "reason", resp.Reason)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(resp)
	})
	srv := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	log.Info("consent service listening", "addr", *listen, "allow", *allow)
	if err := srv.ListenAndServeTLS(*cert, *key); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
