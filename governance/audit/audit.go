// Package audit owns the clean room's hash-chained, append-only audit log:
// one JSON object per line, each record carrying the hash of the one before,
// so that removing, reordering or editing a record breaks the chain at that
// record. It writes one file and reads what it is given; it knows nothing of
// what is audited (the key broker, the daemon's deny events and policy
// changes all use it) and must not import product packages.
//
// # Record
//
//	{"seq":1,"time":"2025-01-02T03:04:05.000000006Z","kind":"keybroker.release",
//	 "fields":{...},"prevHash":"00…00","hash":"…"}
//
// seq starts at 1 and grows by one. prevHash is the previous record's hash
// (64 zeros for the first record). hash is the lowercase hex SHA-256 of the
// canonical JSON of the record without its hash member: the members in the
// order above, no white space, object keys sorted, numbers written as they
// were first encoded, strings escaped by encoding/json. Fields are
// canonicalised when appended, so the line on disk is its canonical form.
//
// # Durability (fsync policy)
//
// With SyncEveryRecord (the default) Append writes the whole line with one
// write and fsyncs the file before returning: a record whose Append returned
// nil survives a crash of the process or of the machine. With SyncNever the
// kernel flushes when it likes (tests, benchmarks); Close still fsyncs.
// Creating the file fsyncs its directory. A crash during a write can leave at
// most one torn last line, which was never acknowledged; Open cuts it off and
// appends an "audit.recovered" record that says how many bytes it cut.
package audit

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// GenesisHash is the prevHash of the first record.
const GenesisHash = "0000000000000000000000000000000000000000000000000000000000000000"

// KindRecovered is the kind of the record Open appends after cutting a torn
// last line.
const KindRecovered = "audit.recovered"

// MaxLineBytes bounds one record on disk.
const MaxLineBytes = 1 << 20

// Record is one audit record.
type Record struct {
	Seq      uint64         `json:"seq"`
	Time     string         `json:"time"`
	Kind     string         `json:"kind"`
	Fields   map[string]any `json:"fields"`
	PrevHash string         `json:"prevHash"`
	Hash     string         `json:"hash"`
}

// hashed is the record without its hash, in canonical member order.
type hashed struct {
	Seq      uint64         `json:"seq"`
	Time     string         `json:"time"`
	Kind     string         `json:"kind"`
	Fields   map[string]any `json:"fields"`
	PrevHash string         `json:"prevHash"`
}

// ComputeHash returns the hash that r must carry.
func (r *Record) ComputeHash() (string, error) {
	b, err := json.Marshal(hashed{Seq: r.Seq, Time: r.Time, Kind: r.Kind, Fields: r.Fields, PrevHash: r.PrevHash})
	if err != nil {
		return "", fmt.Errorf("encoding record %d: %w", r.Seq, err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}

// canonicalFields re-encodes fields through their generic JSON form, so the
// writer hashes exactly what a verifier reads back: sorted keys at every
// level, numbers as json.Number text.
func canonicalFields(fields map[string]any) (map[string]any, error) {
	if fields == nil {
		return map[string]any{}, nil
	}
	b, err := json.Marshal(fields)
	if err != nil {
		return nil, err
	}
	var out map[string]any
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(&out); err != nil {
		return nil, err
	}
	return out, nil
}

// SyncPolicy says when Append makes a record durable.
type SyncPolicy int

const (
	// SyncEveryRecord fsyncs after every record (the default).
	SyncEveryRecord SyncPolicy = iota
	// SyncNever leaves flushing to the kernel; Close fsyncs.
	SyncNever
)

// Options configures Open. The zero value is valid.
type Options struct {
	// Sync is the fsync policy; SyncEveryRecord if zero.
	Sync SyncPolicy
	// Now is the clock; time.Now if nil.
	Now func() time.Time
}

// Log is an open audit log. It is safe for concurrent use.
type Log struct {
	mu       sync.Mutex
	f        *os.File
	path     string
	sync     SyncPolicy
	now      func() time.Time
	seq      uint64
	lastHash string
	closed   bool
}

// ErrClosed is returned by Append after Close.
var ErrClosed = errors.New("audit log closed")

// Open opens the log at path, creating it (0600) if needed. It verifies the
// whole existing chain and continues it; a broken chain is an error (a
// *BrokenError), since appending to it would hide the break.
func Open(path string, opts Options) (*Log, error) {
	l := &Log{path: path, sync: opts.Sync, now: opts.Now, lastHash: GenesisHash}
	if l.now == nil {
		l.now = time.Now
	}
	_, statErr := os.Stat(path)
	created := errors.Is(statErr, os.ErrNotExist)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening audit log: %w", err)
	}
	l.f = f
	if created {
		if err := syncDir(filepath.Dir(path)); err != nil {
			f.Close()
			return nil, err
		}
	}
	cut, err := l.load()
	if err != nil {
		f.Close()
		return nil, err
	}
	if cut > 0 {
		if _, err := l.Append(KindRecovered, map[string]any{"truncatedBytes": cut}); err != nil {
			f.Close()
			return nil, err
		}
	}
	return l, nil
}

// load verifies the file, cuts a torn last line and positions at the end. It
// returns the number of bytes cut.
func (l *Log) load() (int64, error) {
	if _, err := l.f.Seek(0, io.SeekStart); err != nil {
		return 0, fmt.Errorf("reading audit log: %w", err)
	}
	rd := NewReader(l.f)
	for {
		rec, err := rd.Next()
		if err == io.EOF {
			break
		}
		var torn *BrokenError
		if errors.As(err, &torn) && torn.Torn {
			size, serr := l.f.Seek(0, io.SeekEnd)
			if serr != nil {
				return 0, fmt.Errorf("reading audit log: %w", serr)
			}
			if err := l.f.Truncate(rd.offset); err != nil {
				return 0, fmt.Errorf("cutting torn audit record: %w", err)
			}
			if _, err := l.f.Seek(rd.offset, io.SeekStart); err != nil {
				return 0, fmt.Errorf("cutting torn audit record: %w", err)
			}
			return size - rd.offset, l.f.Sync()
		}
		if err != nil {
			return 0, fmt.Errorf("audit log %s: %w", l.path, err)
		}
		l.seq, l.lastHash = rec.Seq, rec.Hash
	}
	if _, err := l.f.Seek(0, io.SeekEnd); err != nil {
		return 0, fmt.Errorf("reading audit log: %w", err)
	}
	return 0, nil
}

// Append adds a record of kind with fields (any JSON-encodable values) and
// returns it as written. See the package doc for when it is durable.
func (l *Log) Append(kind string, fields map[string]any) (Record, error) {
	if kind == "" {
		return Record{}, errors.New("audit record kind is empty")
	}
	canon, err := canonicalFields(fields)
	if err != nil {
		return Record{}, fmt.Errorf("encoding audit fields: %w", err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return Record{}, ErrClosed
	}
	rec := Record{
		Seq:      l.seq + 1,
		Time:     l.now().UTC().Format(time.RFC3339Nano),
		Kind:     kind,
		Fields:   canon,
		PrevHash: l.lastHash,
	}
	if rec.Hash, err = rec.ComputeHash(); err != nil {
		return Record{}, err
	}
	line, err := json.Marshal(rec)
	if err != nil {
		return Record{}, fmt.Errorf("encoding audit record: %w", err)
	}
	if len(line) >= MaxLineBytes {
		return Record{}, fmt.Errorf("audit record of %d bytes exceeds %d", len(line), MaxLineBytes)
	}
	line = append(line, '\n')
	if _, err := l.f.Write(line); err != nil {
		return Record{}, fmt.Errorf("writing audit record: %w", err)
	}
	if l.sync == SyncEveryRecord {
		if err := l.f.Sync(); err != nil {
			return Record{}, fmt.Errorf("syncing audit log: %w", err)
		}
	}
	l.seq, l.lastHash = rec.Seq, rec.Hash
	return rec, nil
}

// Path is the file the log writes.
func (l *Log) Path() string { return l.path }

// Close fsyncs and closes the file.
func (l *Log) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	serr := l.f.Sync()
	cerr := l.f.Close()
	if serr != nil {
		return fmt.Errorf("syncing audit log: %w", serr)
	}
	return cerr
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncing audit log directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing audit log directory: %w", err)
	}
	return nil
}

// ErrBroken matches every *BrokenError.
var ErrBroken = errors.New("audit chain broken")

// BrokenError names the first record (by line, and seq when it could be read)
// where the chain does not hold.
type BrokenError struct {
	Line   int
	Seq    uint64
	Reason string
	// Torn is set when the last line has no newline: a write cut short.
	Torn bool
}

func (e *BrokenError) Error() string {
	if e.Seq != 0 {
		return fmt.Sprintf("audit chain broken at record %d (line %d): %s", e.Seq, e.Line, e.Reason)
	}
	return fmt.Sprintf("audit chain broken at line %d: %s", e.Line, e.Reason)
}

// Is makes errors.Is(err, ErrBroken) true.
func (e *BrokenError) Is(target error) bool { return target == ErrBroken }

// Reader reads records and checks the chain as it goes.
type Reader struct {
	br       *bufio.Reader
	line     int
	offset   int64 // bytes of verified records so far
	seq      uint64
	lastHash string
	err      error
}

// NewReader returns a Reader over a log's content, starting at its first record.
func NewReader(r io.Reader) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, 64<<10), lastHash: GenesisHash}
}

// Next returns the next record after checking it against the chain, io.EOF
// at the end, or a *BrokenError for the first record that breaks the chain.
func (rd *Reader) Next() (Record, error) {
	if rd.err != nil {
		return Record{}, rd.err
	}
	rec, err := rd.next()
	if err != nil {
		rd.err = err
	}
	return rec, err
}

func (rd *Reader) next() (Record, error) {
	line, err := rd.readLine()
	if err == io.EOF && len(line) == 0 {
		return Record{}, io.EOF
	}
	rd.line++
	broken := func(seq uint64, format string, args ...any) error {
		return &BrokenError{Line: rd.line, Seq: seq, Reason: fmt.Sprintf(format, args...)}
	}
	if err == io.EOF {
		return Record{}, &BrokenError{Line: rd.line, Reason: "last record has no newline (torn write)", Torn: true}
	}
	if err != nil {
		return Record{}, broken(0, "%v", err)
	}
	var rec Record
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.UseNumber()
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rec); err != nil {
		return Record{}, broken(0, "not a record: %v", err)
	}
	if dec.More() {
		return Record{}, broken(rec.Seq, "data after the record")
	}
	if rec.Fields == nil {
		return Record{}, broken(rec.Seq, "fields missing")
	}
	if rec.Seq != rd.seq+1 {
		return Record{}, broken(rec.Seq, "seq %d follows %d", rec.Seq, rd.seq)
	}
	if rec.Kind == "" {
		return Record{}, broken(rec.Seq, "kind missing")
	}
	if _, err := time.Parse(time.RFC3339Nano, rec.Time); err != nil {
		return Record{}, broken(rec.Seq, "bad time %q", rec.Time)
	}
	if rec.PrevHash != rd.lastHash {
		return Record{}, broken(rec.Seq, "prevHash %.16s… is not the previous record's hash %.16s…", rec.PrevHash, rd.lastHash)
	}
	want, err := rec.ComputeHash()
	if err != nil {
		return Record{}, broken(rec.Seq, "%v", err)
	}
	if rec.Hash != want {
		return Record{}, broken(rec.Seq, "hash does not match the record's content")
	}
	// The line must be the canonical encoding: the hash covers a re-encoding,
	// so bytes outside it (spacing, member order, escapes) would otherwise be
	// editable unnoticed.
	canon, err := json.Marshal(rec)
	if err != nil || !bytes.Equal(canon, line) {
		return Record{}, broken(rec.Seq, "record is not in canonical form")
	}
	rd.seq, rd.lastHash = rec.Seq, rec.Hash
	rd.offset += int64(len(line)) + 1
	return rec, nil
}

// readLine reads one line without its newline, bounded by MaxLineBytes.
func (rd *Reader) readLine() ([]byte, error) {
	var buf []byte
	for {
		chunk, err := rd.br.ReadSlice('\n')
		buf = append(buf, chunk...)
		if len(buf) > MaxLineBytes {
			return nil, fmt.Errorf("line longer than %d bytes", MaxLineBytes)
		}
		switch {
		case err == nil:
			return buf[:len(buf)-1], nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		default:
			return buf, err
		}
	}
}

// Verify reads a whole log and returns nil if its chain holds, or a
// *BrokenError naming the first broken record.
func Verify(r io.Reader) error {
	rd := NewReader(r)
	for {
		_, err := rd.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}
