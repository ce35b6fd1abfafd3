package audit

import (
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
)

// VerifyOptions configures VerifyFiles.
type VerifyOptions struct {
	// NodeKey, when set, is the only key whose checkpoints are accepted (the
	// key an attested node's key release named). Nil: the first checkpoint's
	// key, and every later checkpoint must be signed by the same key.
	NodeKey ed25519.PublicKey
	// Visit, when set, is called with each record once it verified, with
	// its file and line.
	Visit func(file string, line int, rec Record)
	// Partial accepts a log that starts after seq 1 without an audit.pruned
	// record for what is before (a sink's copy begun late); those records
	// are not checked, and Summary.FirstSeq says where the check began.
	Partial bool
}

// Summary is what VerifyFiles read.
type Summary struct {
	Files    []string
	Records  int
	FirstSeq uint64
	LastSeq  uint64
	LastHash string
	// Checkpoints counts the signed checkpoints; LastCheckpoint is the seq
	// of the last one, and Unsigned the records after it (not yet covered
	// by a signature).
	Checkpoints    int
	LastCheckpoint uint64
	Unsigned       int
	NodeKey        ed25519.PublicKey
	Kinds          map[string]int
	// PrunedThrough is set when the log starts after seq 1 and an
	// audit.pruned record accounts for the records before it.
	PrunedThrough uint64
}

// VerifyFiles verifies a log kept in files, given in chain order (Files
// lists them): each file's records chain, the first record of each file
// links to the last of the file before it, and every checkpoint is signed
// by the node key. A log that starts after seq 1 must contain the
// audit.pruned record of the files retention removed before it. The error is
// a *BrokenError naming the file, line and seq of the first record that does
// not hold (a removed or reordered file is named at the first record after
// the gap).
func VerifyFiles(files []string, opts VerifyOptions) (Summary, error) {
	sum := Summary{Files: files, Kinds: map[string]int{}}
	chain := Chain{Hash: GenesisHash, NodeKey: opts.NodeKey}
	var anchor *Record
	var anchorFile string
	pruned := map[uint64]string{} // throughSeq -> lastHash
	for i, file := range files {
		if i == 0 {
			first, err := firstRecord(file)
			if err != nil {
				return sum, err
			}
			if first != nil && first.Seq > 1 {
				anchor, anchorFile = first, file
				chain.Seq, chain.Hash = first.Seq-1, first.PrevHash
			}
		}
		f, err := os.Open(file)
		if err != nil {
			return sum, fmt.Errorf("reading audit log: %w", err)
		}
		rd := ContinueReader(f, chain)
		rd.file = file
		for {
			rec, err := rd.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				f.Close()
				return sum, err
			}
			if sum.Records == 0 {
				sum.FirstSeq = rec.Seq
			}
			sum.Records++
			sum.LastSeq, sum.LastHash = rec.Seq, rec.Hash
			sum.Kinds[rec.Kind]++
			switch rec.Kind {
			case KindCheckpoint:
				sum.Checkpoints++
				sum.LastCheckpoint = rec.Seq
				sum.Unsigned = 0
			case KindPruned:
				through, hash, ok := prunedRange(rec)
				if !ok {
					f.Close()
					return sum, &BrokenError{File: file, Line: rd.Line(), Seq: rec.Seq, Reason: "audit.pruned record without throughSeq and lastHash"}
				}
				pruned[through] = hash
				sum.Unsigned++
			default:
				sum.Unsigned++
			}
			if opts.Visit != nil {
				opts.Visit(file, rd.Line(), rec)
			}
		}
		f.Close()
		chain = rd.Chain()
	}
	sum.NodeKey = chain.NodeKey
	if anchor != nil {
		if h, ok := pruned[anchor.Seq-1]; ok && h == anchor.PrevHash {
			sum.PrunedThrough = anchor.Seq - 1
		} else if !opts.Partial {
			return sum, &BrokenError{File: anchorFile, Line: 1, Seq: anchor.Seq,
				Reason: fmt.Sprintf("records 1-%d are missing (a removed file?) and no audit.pruned record accounts for them", anchor.Seq-1)}
		}
	}
	return sum, nil
}

func prunedRange(rec Record) (uint64, string, bool) {
	n, ok := rec.Fields["throughSeq"].(json.Number)
	if !ok {
		return 0, "", false
	}
	through, err := parseUint(string(n))
	hash, _ := rec.Fields["lastHash"].(string)
	return through, hash, err == nil && hash != ""
}

func parseUint(s string) (uint64, error) { return strconv.ParseUint(s, 10, 64) }

// ResolveFiles turns what a user names into a log's files in chain order: a
// directory is the log named audit.jsonl in it with its rotated files; one
// active file is itself with its rotated files; several files are taken in
// the order given.
func ResolveFiles(args []string) ([]string, error) {
	if len(args) == 0 {
		return nil, errors.New("no audit log named")
	}
	if len(args) > 1 {
		return args, nil
	}
	p := args[0]
	st, err := os.Stat(p)
	if err != nil {
		return nil, err
	}
	if st.IsDir() {
		files, err := Files(filepath.Join(p, "audit.jsonl"))
		if err != nil {
			return nil, err
		}
		if len(files) == 0 {
			return nil, fmt.Errorf("%s: no audit.jsonl and no rotated audit.jsonl.N in it (name the files)", p)
		}
		return files, nil
	}
	return Files(p)
}
