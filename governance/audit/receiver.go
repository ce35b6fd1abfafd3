package audit

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
)

// MaxSinkBatchBytes bounds a batch a Receiver reads.
const MaxSinkBatchBytes = 8 << 20

// Receiver is a reference sink (docs/audit.md): it stores what Forwarders
// send, each node's records in a file of their own named after its node key
// (<dir>/<base64url key>.jsonl; unsigned.jsonl without one), each record
// once and in order, after checking it as a verifier would: canonical form,
// hash, seq, prevHash, and checkpoint signatures by the node key the
// forwarder names. A batch is acknowledged once it is fsynced. The files are
// logs `cleanwall audit verify` reads.
type Receiver struct {
	dir string
	log *slog.Logger

	// Allowed, when set (before serving), lists the node keys whose
	// records are stored (EncodeNodeKey text); a batch of another node, or
	// of none, is refused with 403.
	Allowed map[string]bool

	mu    sync.Mutex
	nodes map[string]*received
}

type received struct {
	f     *os.File
	chain Chain // NodeKey set: the only key accepted
}

// NewReceiver stores into dir (created 0700 if needed).
func NewReceiver(dir string, log *slog.Logger) (*Receiver, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	return &Receiver{dir: dir, log: log, nodes: map[string]*received{}}, nil
}

// Close closes the files.
func (rc *Receiver) Close() error {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	var errs []error
	for _, n := range rc.nodes {
		errs = append(errs, n.f.Close())
	}
	rc.nodes = map[string]*received{}
	return errors.Join(errs...)
}

// node opens (once) the file of a node key ("" for none).
func (rc *Receiver) node(keyText string) (*received, error) {
	if n := rc.nodes[keyText]; n != nil {
		return n, nil
	}
	name := "unsigned.jsonl"
	var key ed25519.PublicKey
	if keyText != "" {
		var err error
		if key, err = ParseNodeKey(keyText); err != nil {
			return nil, fmt.Errorf("%s: %v", HeaderNodeKey, err)
		}
		name = base64.RawURLEncoding.EncodeToString(key) + ".jsonl"
	}
	path := filepath.Join(rc.dir, name)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	n := &received{f: f, chain: Chain{NodeKey: key}}
	last, err := lastRecord(path)
	if err != nil {
		f.Close()
		return nil, err
	}
	if last != nil {
		n.chain.Seq, n.chain.Hash = last.Seq, last.Hash
	}
	rc.nodes[keyText] = n
	return n, nil
}

func (rc *Receiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST a batch of records", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxSinkBatchBytes))
	if err != nil {
		http.Error(w, "reading the batch: "+err.Error(), http.StatusRequestEntityTooLarge)
		return
	}
	first, err := strconv.ParseUint(r.Header.Get(HeaderFirstSeq), 10, 64)
	if err != nil || r.Header.Get("Content-Type") != SinkContentType {
		http.Error(w, "want "+SinkContentType+" with "+HeaderFirstSeq, http.StatusBadRequest)
		return
	}
	if rc.Allowed != nil {
		k, err := ParseNodeKey(r.Header.Get(HeaderNodeKey))
		if err != nil || !rc.Allowed[EncodeNodeKey(k)] {
			http.Error(w, "node key not allowed", http.StatusForbidden)
			return
		}
	}
	rc.mu.Lock()
	defer rc.mu.Unlock()
	n, err := rc.node(r.Header.Get(HeaderNodeKey))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	stored, bad := rc.store(n, body, first)
	if stored {
		if err := n.f.Sync(); err != nil {
			rc.log.Error("audit sink: fsync failed", "error", err)
			http.Error(w, "storage failed", http.StatusInternalServerError)
			return
		}
	}
	if bad != nil && !stored {
		rc.log.Warn("audit sink: batch refused", "node", r.Header.Get(HeaderNodeKey), "error", bad)
		http.Error(w, bad.Error(), http.StatusUnprocessableEntity)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(SinkAck{Through: n.chain.Seq})
}

// store appends the batch's new records that continue n's chain; it stops
// at the first that does not (bad says why; a gap is not bad: the forwarder
// sends again from the acknowledgement).
func (rc *Receiver) store(n *received, body []byte, first uint64) (stored bool, bad error) {
	lines := bytes.SplitAfter(body, []byte("\n"))
	for i, line := range lines {
		if len(line) == 0 {
			continue
		}
		if line[len(line)-1] != '\n' {
			return stored, errors.New("last line has no newline")
		}
		rec, err := parseLine(line[:len(line)-1])
		if err != nil {
			return stored, fmt.Errorf("record %d: %v", first+uint64(i), err)
		}
		if rec.Seq <= n.chain.Seq && n.chain.Seq > 0 {
			continue // a duplicate
		}
		anchored := n.chain.Seq > 0 || n.chain.Hash != ""
		if anchored && (rec.Seq != n.chain.Seq+1 || rec.PrevHash != n.chain.Hash) {
			if rec.Seq != n.chain.Seq+1 {
				return stored, nil // a gap
			}
			return stored, fmt.Errorf("record %d: prevHash is not the hash of record %d", rec.Seq, n.chain.Seq)
		}
		if rec.Kind == KindCheckpoint {
			key, err := checkCheckpoint(&rec)
			if err != nil {
				return stored, fmt.Errorf("record %d: checkpoint: %v", rec.Seq, err)
			}
			if n.chain.NodeKey == nil || !n.chain.NodeKey.Equal(key) {
				return stored, fmt.Errorf("record %d: checkpoint not signed by the node key the forwarder names", rec.Seq)
			}
		}
		if _, err := n.f.Write(line); err != nil {
			return stored, fmt.Errorf("storing record %d: %v", rec.Seq, err)
		}
		stored = true
		n.chain.Seq, n.chain.Hash = rec.Seq, rec.Hash
	}
	return stored, nil
}
