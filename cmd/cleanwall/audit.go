package main

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/cleanwall/cleanwall/governance/audit"
	"github.com/cleanwall/cleanwall/runtime/daemon"
)

const auditUsage = `usage: cleanwall audit verify [--node-key KEY|FILE] [--partial] FILE...|DIR
       cleanwall audit show [--sandbox ID] [--kind K] [--since DURATION|RFC3339] [--json] [FILE...|DIR]
       cleanwall audit sink --listen ADDR --cert FILE --key FILE --dir DIR [--node-keys FILE]`

// cmdAudit verifies or shows a hash-chained audit log.
func cmdAudit(args []string) error {
	if len(args) == 0 {
		return fail("%s", auditUsage)
	}
	switch args[0] {
	case "verify":
		return cmdAuditVerify(args[1:], os.Stdout, os.Stderr)
	case "show":
		return cmdAuditShow(args[1:], os.Stdout, os.Stderr, time.Now())
	case "sink":
		return cmdAuditSink(args[1:])
	default:
		return fail("%s", auditUsage)
	}
}

// splitArgs separates --flag VALUE pairs (and --flag=VALUE, and the bool
// flags named in bools) from the positional arguments, in any order.
func splitArgs(args []string, bools map[string]bool) (map[string]string, []string, error) {
	flags := map[string]string{}
	var pos []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			pos = append(pos, args[i+1:]...)
			break
		}
		if !strings.HasPrefix(a, "-") || a == "-" {
			pos = append(pos, a)
			continue
		}
		name := strings.TrimLeft(a, "-")
		if n, v, ok := strings.Cut(name, "="); ok {
			flags[n] = v
			continue
		}
		if bools[name] {
			flags[name] = "true"
			continue
		}
		if i+1 >= len(args) {
			return nil, nil, fmt.Errorf("--%s needs a value", name)
		}
		flags[name] = args[i+1]
		i++
	}
	return flags, pos, nil
}

func checkFlags(flags map[string]string, known ...string) error {
	for name := range flags {
		ok := false
		for _, k := range known {
			ok = ok || k == name
		}
		if !ok {
			return fmt.Errorf("unknown flag --%s", name)
		}
	}
	return nil
}

// parseNodeKeyArg reads --node-key: the key's text (base64 or hex, as
// audit records and the key broker's release records write it), a file
// holding that text, or the node key file itself.
func parseNodeKeyArg(s string) (ed25519.PublicKey, error) {
	if k, err := audit.ParseNodeKey(s); err == nil {
		return k, nil
	}
	data, err := os.ReadFile(s)
	if err != nil {
		return nil, fmt.Errorf("--node-key %q: neither a key (base64 of 32 bytes) nor a readable file: %v", s, err)
	}
	if priv, err := audit.ReadNodeKey(s); err == nil {
		return priv.Public().(ed25519.PublicKey), nil
	}
	k, err := audit.ParseNodeKey(string(data))
	if err != nil {
		return nil, fmt.Errorf("--node-key %s: %v", s, err)
	}
	return k, nil
}

func cmdAuditVerify(args []string, stdout, stderr io.Writer) error {
	flags, pos, err := splitArgs(args, map[string]bool{"partial": true})
	if err == nil {
		err = checkFlags(flags, "node-key", "partial")
	}
	if err != nil || len(pos) == 0 {
		return fail("%s", auditUsage)
	}
	opts := audit.VerifyOptions{Partial: flags["partial"] == "true"}
	if s, ok := flags["node-key"]; ok {
		if opts.NodeKey, err = parseNodeKeyArg(s); err != nil {
			return fail("%v", err)
		}
	}
	files, err := audit.ResolveFiles(pos)
	if err != nil {
		return fail("%v", err)
	}
	sum, err := audit.VerifyFiles(files, opts)
	if err != nil {
		// A *audit.BrokenError names the file, line and seq.
		fmt.Fprintln(stderr, err)
		return &exitError{1}
	}
	if opts.NodeKey != nil && sum.Checkpoints == 0 {
		fmt.Fprintf(stderr, "%d records, chain intact, but no checkpoint signed by node key %s: nothing ties the log to that node\n",
			sum.Records, audit.EncodeNodeKey(opts.NodeKey))
		return &exitError{1}
	}
	name := files[0]
	if len(files) > 1 {
		name = fmt.Sprintf("%s … %s (%d files)", files[0], filepath.Base(files[len(files)-1]), len(files))
	}
	fmt.Fprintf(stdout, "%s: %d records, chain intact", name, sum.Records)
	if sum.Records > 0 {
		fmt.Fprintf(stdout, " (seq %d-%d)", sum.FirstSeq, sum.LastSeq)
	}
	fmt.Fprintln(stdout)
	switch {
	case sum.PrunedThrough > 0:
		fmt.Fprintf(stdout, "  records 1-%d removed by retention (an audit.pruned record says so)\n", sum.PrunedThrough)
	case sum.FirstSeq > 1:
		fmt.Fprintf(stdout, "  --partial: records 1-%d are not here and were not checked\n", sum.FirstSeq-1)
	}
	if sum.Checkpoints == 0 {
		fmt.Fprintln(stdout, "  no signed checkpoints")
	} else {
		fmt.Fprintf(stdout, "  %d signed checkpoints by node key %s, the last at seq %d; %d records after it not yet signed\n",
			sum.Checkpoints, audit.EncodeNodeKey(sum.NodeKey), sum.LastCheckpoint, sum.Unsigned)
	}
	kinds := make([]string, 0, len(sum.Kinds))
	for k := range sum.Kinds {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		fmt.Fprintf(stdout, "  %-22s %d\n", k, sum.Kinds[k])
	}
	return nil
}

func cmdAuditShow(args []string, stdout, stderr io.Writer, now time.Time) error {
	flags, pos, err := splitArgs(args, map[string]bool{"json": true})
	if err == nil {
		err = checkFlags(flags, "sandbox", "kind", "since", "json")
	}
	if err != nil {
		return fail("%v\n%s", err, auditUsage)
	}
	var since time.Time
	if s, ok := flags["since"]; ok {
		if d, err := time.ParseDuration(s); err == nil && d >= 0 {
			since = now.Add(-d)
		} else if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
			since = t
		} else {
			return fail("--since %q: want a duration (1h30m) or an RFC 3339 time (2025-01-02T03:04:05Z)", s)
		}
	}
	if len(pos) == 0 {
		pos = []string{filepath.Join(daemon.DefaultStateDir, "audit.jsonl")}
	}
	files, err := audit.ResolveFiles(pos)
	if err != nil {
		return fail("%v", err)
	}
	sandbox, kind, asJSON := flags["sandbox"], flags["kind"], flags["json"] == "true"
	shown := 0
	_, err = audit.VerifyFiles(files, audit.VerifyOptions{Visit: func(_ string, _ int, r audit.Record) {
		if kind != "" && r.Kind != kind && !strings.HasPrefix(r.Kind, kind+".") {
			return
		}
		if sandbox != "" {
			s, _ := r.Fields["sandbox"].(string)
			if s != sandbox && !strings.HasPrefix(s, sandbox+"/") {
				return
			}
		}
		if !since.IsZero() {
			if t, err := time.Parse(time.RFC3339Nano, r.Time); err != nil || t.Before(since) {
				return
			}
		}
		shown++
		if asJSON {
			b, _ := json.Marshal(r)
			fmt.Fprintf(stdout, "%s\n", b)
			return
		}
		fmt.Fprintf(stdout, "%s %6d %-22s %s\n", r.Time, r.Seq, r.Kind, formatFields(r.Fields))
	}})
	if err != nil {
		// What was shown verified; the rest is not trusted.
		fmt.Fprintf(stderr, "%v\n", err)
		return &exitError{1}
	}
	if shown == 0 && !asJSON {
		fmt.Fprintln(stderr, "no matching records")
	}
	return nil
}

// formatFields writes fields as key=value, sorted, values as JSON.
func formatFields(f map[string]any) string {
	keys := make([]string, 0, len(f))
	for k := range f {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(' ')
		}
		v, _ := json.Marshal(f[k])
		b.WriteString(k)
		b.WriteByte('=')
		if s, ok := f[k].(string); ok && s != "" && !strings.ContainsAny(s, " \"=") {
			b.WriteString(s)
		} else {
			b.Write(v)
		}
	}
	return b.String()
}

// cmdAuditSink runs the reference audit sink (docs/audit.md): HTTPS on
// --listen, each node's records stored in DIR/<node key>.jsonl once they
// verify, until SIGINT or SIGTERM.
func cmdAuditSink(args []string) error {
	flags, pos, err := splitArgs(args, nil)
	if err == nil {
		err = checkFlags(flags, "listen", "cert", "key", "dir", "node-keys")
	}
	if err == nil && len(pos) > 0 {
		err = fmt.Errorf("unexpected argument %q", pos[0])
	}
	if err == nil {
		for _, f := range []string{"listen", "cert", "key", "dir"} {
			if flags[f] == "" {
				err = fmt.Errorf("--%s is required", f)
				break
			}
		}
	}
	if err != nil {
		return fail("%v\n%s", err, auditUsage)
	}
	cert, err := tls.LoadX509KeyPair(flags["cert"], flags["key"])
	if err != nil {
		return fail("--cert/--key: %v", err)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	rc, err := audit.NewReceiver(flags["dir"], logger)
	if err != nil {
		return fail("--dir: %v", err)
	}
	defer rc.Close()
	if file := flags["node-keys"]; file != "" {
		// One node key a line (base64 or hex; # comments): only their
		// records are stored.
		data, err := os.ReadFile(file)
		if err != nil {
			return fail("--node-keys: %v", err)
		}
		rc.Allowed = map[string]bool{}
		for i, line := range strings.Split(string(data), "\n") {
			line, _, _ = strings.Cut(line, "#")
			if line = strings.TrimSpace(line); line == "" {
				continue
			}
			k, err := audit.ParseNodeKey(line)
			if err != nil {
				return fail("--node-keys %s:%d: %v", file, i+1, err)
			}
			rc.Allowed[audit.EncodeNodeKey(k)] = true
		}
	}
	l, err := net.Listen("tcp", flags["listen"])
	if err != nil {
		return fail("--listen: %v", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/", rc)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	logger.Info("audit sink listening", "addr", l.Addr().String(), "dir", flags["dir"])
	if err := srv.ServeTLS(l, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
