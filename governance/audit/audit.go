// Package audit owns the clean room's hash-chained, append-only audit log:
// one JSON object per line, each record carrying the hash of the one before,
// so that removing, reordering or editing a record breaks the chain at that
// record. It knows nothing of what is audited (the key broker, the daemon's
// deny events and policy changes all use it) and must not import product
// packages.
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
// # Checkpoints
//
// With a node key (Options.Signer, an Ed25519 key, LoadOrCreateNodeKey) the
// log appends signed "audit.checkpoint" records: every
// Options.CheckpointInterval when records were added since the last one, at
// every rotation (as the last record of the rotated file) and at Close. A
// checkpoint signs the seq and hash of the record before it, its own time and
// the node's public key (see CheckpointMessage), so the chain up to it cannot
// be rewritten, even with every hash recomputed, without the node key. The
// node's public key goes into the attestation evidence when the node asks
// the key broker for a key (docs/keybroker.md §7), which ties the log to an
// attested node.
//
// # Rotation
//
// With Options.MaxSize the file is rotated before a record would take it past
// that size: a checkpoint ends it, it is renamed PATH.000001 (then .000002 and
// so on, the numbers growing with age never reused), and the chain continues
// in a new PATH: its first record's prevHash is the last hash of the rotated
// file. Options.Keep bounds the rotated files kept; the oldest go first, and
// only once an "audit.pruned" record (written and synced before the files are
// removed) names them and the seq and hash they ended with, so that a
// verifier can tell retention from a dropped file. Files whose records a sink
// has not acknowledged yet are never removed (Forwarder).
//
// # Durability (fsync policy)
//
// With SyncEveryRecord (the default) Append writes the whole line with one
// write and fsyncs the file before returning: a record whose Append returned
// nil survives a crash of the process or of the machine. With SyncNever the
// kernel flushes when it likes (tests, benchmarks); Close still fsyncs.
// Creating or renaming a file fsyncs its directory. A failed write or fsync
// fails the log: every later Append returns the error, since what reached the
// disk is then unknown. A crash during a write can leave at most one torn
// last line, which was never acknowledged; Open cuts it off and appends an
// "audit.recovered" record that says how many bytes it cut.
//
// One process writes a log at a time: Open takes an exclusive lock on
// PATH.lock and a second Open fails while the first is open.
package audit

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// GenesisHash is the prevHash of the first record.
const GenesisHash = "0000000000000000000000000000000000000000000000000000000000000000"

// Kinds the log writes itself.
const (
	// KindRecovered is the kind of the record Open appends after cutting a
	// torn last line.
	KindRecovered = "audit.recovered"
	// KindCheckpoint is a signed checkpoint (fields nodeKey, signature).
	KindCheckpoint = "audit.checkpoint"
	// KindPruned says which rotated files retention removes (fields files,
	// throughSeq, lastHash).
	KindPruned = "audit.pruned"
)

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

// Options configures Open. The zero value is valid: one file, no
// checkpoints, an fsync per record.
type Options struct {
	// Sync is the fsync policy; SyncEveryRecord if zero.
	Sync SyncPolicy
	// Now is the clock; time.Now if nil.
	Now func() time.Time
	// Signer is the node key that signs checkpoints; nil: no checkpoints.
	Signer ed25519.PrivateKey
	// CheckpointInterval is how often a checkpoint is written when records
	// were added since the last one (0: only at rotation and Close).
	CheckpointInterval time.Duration
	// MaxSize rotates the file before a record would take it past this many
	// bytes (0: never).
	MaxSize int64
	// Keep is how many rotated files are kept (0: all).
	Keep int
	// Logger reports what fails in the background (a periodic checkpoint);
	// slog.Default() if nil.
	Logger *slog.Logger
}

// Log is an open audit log. It is safe for concurrent use.
type Log struct {
	mu       sync.Mutex
	f        *os.File
	lock     *os.File
	path     string
	opts     Options
	now      func() time.Time
	log      *slog.Logger
	seq      uint64
	lastHash string
	size     int64
	// sinceCheckpoint counts records after the last checkpoint.
	sinceCheckpoint int
	closed          bool
	failed          error
	// retain, when set, is the highest seq that may be removed by
	// retention (the sink's delivered cursor).
	retain    func() uint64
	holdPrune bool

	durable atomic.Uint64 // seq of the last record known on disk
	notify  chan struct{} // a record was added (for the forwarder)
	stop    chan struct{}
	done    chan struct{}
}

// ErrClosed is returned by Append after Close.
var ErrClosed = errors.New("audit log closed")

// ErrLocked is returned by Open when another process has the log open.
var ErrLocked = errors.New("audit log is open in another process")

// Open opens the log at path, creating it (0600) if needed. It verifies the
// active file's chain (linked to the last record of the newest rotated file,
// if any) and continues it; a broken chain is an error (a *BrokenError),
// since appending to it would hide the break. So is a log whose checkpoints
// another node key signed.
func Open(path string, opts Options) (*Log, error) {
	l := &Log{path: path, opts: opts, now: opts.Now, log: opts.Logger, lastHash: GenesisHash,
		notify: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	if l.now == nil {
		l.now = time.Now
	}
	if l.log == nil {
		l.log = slog.Default()
	}
	lock, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening audit log lock: %w", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s: %w", path, ErrLocked)
		}
		return nil, fmt.Errorf("locking audit log: %w", err)
	}
	l.lock = lock
	fail := func(err error) (*Log, error) {
		if l.f != nil {
			l.f.Close()
		}
		lock.Close()
		return nil, err
	}
	start, err := lastOfNewestRotated(path)
	if err != nil {
		return fail(err)
	}
	_, statErr := os.Stat(path)
	created := errors.Is(statErr, os.ErrNotExist)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fail(fmt.Errorf("opening audit log: %w", err))
	}
	l.f = f
	if created {
		if err := syncDir(filepath.Dir(path)); err != nil {
			return fail(err)
		}
	}
	cut, keyInLog, err := l.load(start)
	if err != nil {
		return fail(err)
	}
	if keyInLog == nil {
		keyInLog = start.NodeKey // the newest rotated file's
	}
	if opts.Signer != nil && keyInLog != nil && !keyInLog.Equal(opts.Signer.Public()) {
		return fail(fmt.Errorf("audit log %s: its checkpoints are signed by node key %s, this node's key is %s: restore the node key or move the log away",
			path, EncodeNodeKey(keyInLog), EncodeNodeKey(opts.Signer.Public().(ed25519.PublicKey))))
	}
	l.durable.Store(l.seq)
	if cut > 0 {
		// No retention yet: a sink forwarder (Forward) is not there to say
		// what it has not acknowledged.
		l.holdPrune = true
		_, err := l.Append(KindRecovered, map[string]any{"truncatedBytes": cut})
		l.holdPrune = false
		if err != nil {
			return fail(err)
		}
	}
	if opts.Signer != nil && opts.CheckpointInterval > 0 {
		go l.checkpoints(opts.CheckpointInterval)
	} else {
		close(l.done)
	}
	return l, nil
}

// load verifies the active file from start, cuts a torn last line and
// positions at the end. It returns the number of bytes cut and the node key
// of the file's checkpoints (nil if none).
func (l *Log) load(start Chain) (int64, ed25519.PublicKey, error) {
	if _, err := l.f.Seek(0, io.SeekStart); err != nil {
		return 0, nil, fmt.Errorf("reading audit log: %w", err)
	}
	if start.Seq == 0 {
		// No rotated file: the file may still start after seq 1 (its
		// predecessors removed by retention); the verifier judges that.
		first, err := firstRecord(l.path)
		if err != nil {
			return 0, nil, err
		}
		if first != nil && first.Seq > 1 {
			start = Chain{Seq: first.Seq - 1, Hash: first.PrevHash}
		}
	}
	l.seq, l.lastHash = start.Seq, start.Hash
	rd := ContinueReader(l.f, Chain{Seq: start.Seq, Hash: start.Hash})
	rd.file = l.path
	for {
		rec, err := rd.Next()
		if err == io.EOF {
			break
		}
		var torn *BrokenError
		if errors.As(err, &torn) && torn.Torn {
			size, serr := l.f.Seek(0, io.SeekEnd)
			if serr != nil {
				return 0, nil, fmt.Errorf("reading audit log: %w", serr)
			}
			if err := l.f.Truncate(rd.offset); err != nil {
				return 0, nil, fmt.Errorf("cutting torn audit record: %w", err)
			}
			if _, err := l.f.Seek(rd.offset, io.SeekStart); err != nil {
				return 0, nil, fmt.Errorf("cutting torn audit record: %w", err)
			}
			l.size = rd.offset
			return size - rd.offset, rd.nodeKey, l.f.Sync()
		}
		if err != nil {
			return 0, nil, fmt.Errorf("audit log %s: %w", l.path, err)
		}
		l.seq, l.lastHash = rec.Seq, rec.Hash
		if rec.Kind == KindCheckpoint {
			l.sinceCheckpoint = 0
		} else {
			l.sinceCheckpoint++
		}
	}
	size, err := l.f.Seek(0, io.SeekEnd)
	if err != nil {
		return 0, nil, fmt.Errorf("reading audit log: %w", err)
	}
	l.size = size
	return 0, rd.nodeKey, nil
}

// Append adds a record of kind with fields (any JSON-encodable values) and
// returns it as written. See the package doc for when it is durable.
func (l *Log) Append(kind string, fields map[string]any) (Record, error) {
	if kind == "" {
		return Record{}, errors.New("audit record kind is empty")
	}
	if kind == KindCheckpoint {
		return Record{}, errors.New("audit record kind audit.checkpoint is the log's own (use Checkpoint)")
	}
	canon, err := canonicalFields(fields)
	if err != nil {
		return Record{}, fmt.Errorf("encoding audit fields: %w", err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.usable(); err != nil {
		return Record{}, err
	}
	rec, line, err := l.build(kind, canon)
	if err != nil {
		return Record{}, err
	}
	if l.opts.MaxSize > 0 && l.size > 0 && l.size+int64(len(line)) > l.opts.MaxSize {
		if err := l.rotateLocked(); err != nil {
			return Record{}, err
		}
		if rec, line, err = l.build(kind, canon); err != nil {
			return Record{}, err
		}
	}
	if err := l.write(rec, line); err != nil {
		return Record{}, err
	}
	return rec, nil
}

// Checkpoint appends a signed checkpoint now, if the log has a node key and
// records were added since the last checkpoint; it returns whether it did.
func (l *Log) Checkpoint() (bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.usable(); err != nil {
		return false, err
	}
	return l.checkpointLocked()
}

func (l *Log) usable() error {
	if l.closed {
		return ErrClosed
	}
	return l.failed
}

func (l *Log) checkpointLocked() (bool, error) {
	if l.opts.Signer == nil || l.sinceCheckpoint == 0 {
		return false, nil
	}
	rec, line, err := l.build(KindCheckpoint, nil)
	if err != nil {
		return false, err
	}
	return true, l.write(rec, line)
}

// build makes the next record and its line. A nil fields with kind
// KindCheckpoint makes the signed checkpoint.
func (l *Log) build(kind string, fields map[string]any) (Record, []byte, error) {
	rec := Record{
		Seq:      l.seq + 1,
		Time:     l.now().UTC().Format(time.RFC3339Nano),
		Kind:     kind,
		Fields:   fields,
		PrevHash: l.lastHash,
	}
	if kind == KindCheckpoint {
		pub := l.opts.Signer.Public().(ed25519.PublicKey)
		msg, err := CheckpointMessage(rec.Seq-1, rec.PrevHash, rec.Time, pub)
		if err != nil {
			return Record{}, nil, err
		}
		rec.Fields = map[string]any{
			"nodeKey":   EncodeNodeKey(pub),
			"signature": encodeB64(ed25519.Sign(l.opts.Signer, msg)),
		}
	}
	var err error
	if rec.Hash, err = rec.ComputeHash(); err != nil {
		return Record{}, nil, err
	}
	line, err := json.Marshal(rec)
	if err != nil {
		return Record{}, nil, fmt.Errorf("encoding audit record: %w", err)
	}
	if len(line) >= MaxLineBytes {
		return Record{}, nil, fmt.Errorf("audit record of %d bytes exceeds %d", len(line), MaxLineBytes)
	}
	return rec, append(line, '\n'), nil
}

// write appends one line and makes it durable per the sync policy. A failed
// write is cut off again; a failed fsync fails the log.
func (l *Log) write(rec Record, line []byte) error {
	if _, err := l.f.Write(line); err != nil {
		if terr := l.f.Truncate(l.size); terr != nil {
			l.failed = fmt.Errorf("audit log failed: a write failed (%v) and could not be undone: %w", err, terr)
		} else if _, serr := l.f.Seek(l.size, io.SeekStart); serr != nil {
			l.failed = fmt.Errorf("audit log failed: %w", serr)
		}
		return fmt.Errorf("writing audit record: %w", err)
	}
	if l.opts.Sync == SyncEveryRecord {
		if err := l.f.Sync(); err != nil {
			// What reached the disk is unknown after a failed fsync.
			l.failed = fmt.Errorf("audit log failed: fsync: %w", err)
			return fmt.Errorf("syncing audit log: %w", err)
		}
	}
	l.seq, l.lastHash = rec.Seq, rec.Hash
	l.size += int64(len(line))
	if rec.Kind == KindCheckpoint {
		l.sinceCheckpoint = 0
	} else {
		l.sinceCheckpoint++
	}
	l.durable.Store(rec.Seq)
	select {
	case l.notify <- struct{}{}:
	default:
	}
	return nil
}

// checkpoints writes a checkpoint every interval that had records.
func (l *Log) checkpoints(interval time.Duration) {
	defer close(l.done)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			if _, err := l.Checkpoint(); err != nil && !errors.Is(err, ErrClosed) {
				l.log.Error("audit checkpoint failed", "error", err)
			}
		}
	}
}

// Path is the file the log writes.
func (l *Log) Path() string { return l.path }

// Last returns the seq and hash of the last record written.
func (l *Log) Last() (uint64, string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seq, l.lastHash
}

// Durable is the seq of the last record that is on disk (per the sync
// policy): an acknowledged record.
func (l *Log) Durable() uint64 { return l.durable.Load() }

// NodeKey is the public key that signs checkpoints (nil without a signer).
func (l *Log) NodeKey() ed25519.PublicKey {
	if l.opts.Signer == nil {
		return nil
	}
	return l.opts.Signer.Public().(ed25519.PublicKey)
}

// Close writes a last checkpoint, fsyncs and closes the file.
func (l *Log) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	var cerr error
	if l.failed == nil {
		_, cerr = l.checkpointLocked()
	}
	l.closed = true
	serr := l.f.Sync()
	ferr := l.f.Close()
	l.lock.Close()
	l.mu.Unlock()
	close(l.stop)
	<-l.done
	if serr != nil {
		return fmt.Errorf("syncing audit log: %w", serr)
	}
	if cerr != nil {
		return fmt.Errorf("last audit checkpoint: %w", cerr)
	}
	return ferr
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

// BrokenError names the first record (by file and line, and seq when it
// could be read) where the chain does not hold.
type BrokenError struct {
	File   string // empty when reading one stream
	Line   int
	Seq    uint64
	Reason string
	// Torn is set when the last line has no newline: a write cut short.
	Torn bool
}

func (e *BrokenError) Error() string {
	where := fmt.Sprintf("line %d", e.Line)
	if e.File != "" {
		where = fmt.Sprintf("%s:%d", e.File, e.Line)
	}
	if e.Seq != 0 {
		return fmt.Sprintf("audit chain broken at record %d (%s): %s", e.Seq, where, e.Reason)
	}
	return fmt.Sprintf("audit chain broken at %s: %s", where, e.Reason)
}

// Is makes errors.Is(err, ErrBroken) true.
func (e *BrokenError) Is(target error) bool { return target == ErrBroken }

// Chain is where a reader stands: the seq and hash of the last record read
// (0 and GenesisHash before the first record of a log) and the node key that
// signed its checkpoints so far (nil: none seen, and none expected).
type Chain struct {
	Seq     uint64
	Hash    string
	NodeKey ed25519.PublicKey
}

// Reader reads records and checks the chain, and the signatures of
// checkpoints, as it goes.
type Reader struct {
	br       *bufio.Reader
	file     string
	line     int
	offset   int64 // bytes of verified records so far
	seq      uint64
	lastHash string
	nodeKey  ed25519.PublicKey
	err      error
}

// NewReader returns a Reader over a log's content, starting at its first record.
func NewReader(r io.Reader) *Reader {
	return ContinueReader(r, Chain{Hash: GenesisHash})
}

// ContinueReader returns a Reader over content that continues the chain at
// c: a rotated file after the one that ended at c. A non-nil c.NodeKey is the
// only key whose checkpoints are accepted.
func ContinueReader(r io.Reader, c Chain) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, 64<<10), seq: c.Seq, lastHash: c.Hash, nodeKey: c.NodeKey}
}

// Chain returns where the reader stands.
func (rd *Reader) Chain() Chain { return Chain{Seq: rd.seq, Hash: rd.lastHash, NodeKey: rd.nodeKey} }

// Line is the number of the last line read.
func (rd *Reader) Line() int { return rd.line }

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
		return &BrokenError{File: rd.file, Line: rd.line, Seq: seq, Reason: fmt.Sprintf(format, args...)}
	}
	if err == io.EOF {
		return Record{}, &BrokenError{File: rd.file, Line: rd.line, Reason: "last record has no newline (torn write)", Torn: true}
	}
	if err != nil {
		return Record{}, broken(0, "%v", err)
	}
	rec, err := parseLine(line)
	if err != nil {
		return Record{}, broken(rec.Seq, "%v", err)
	}
	if rec.Seq != rd.seq+1 {
		return Record{}, broken(rec.Seq, "seq %d follows %d", rec.Seq, rd.seq)
	}
	if rec.PrevHash != rd.lastHash {
		return Record{}, broken(rec.Seq, "prevHash %.16s… is not the previous record's hash %.16s…", rec.PrevHash, rd.lastHash)
	}
	if rec.Kind == KindCheckpoint {
		key, err := checkCheckpoint(&rec)
		if err != nil {
			return Record{}, broken(rec.Seq, "checkpoint: %v", err)
		}
		if rd.nodeKey != nil && !rd.nodeKey.Equal(key) {
			return Record{}, broken(rec.Seq, "checkpoint signed by node key %s, not the log's node key %s", EncodeNodeKey(key), EncodeNodeKey(rd.nodeKey))
		}
		rd.nodeKey = key
	}
	rd.seq, rd.lastHash = rec.Seq, rec.Hash
	rd.offset += int64(len(line)) + 1
	return rec, nil
}

// parseLine decodes one line and checks what a record alone must satisfy:
// its members, its hash and its canonical form. On an error the returned
// record holds what could be read (its Seq, to name it).
func parseLine(line []byte) (Record, error) {
	var rec Record
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.UseNumber()
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rec); err != nil {
		return Record{}, fmt.Errorf("not a record: %v", err)
	}
	if dec.More() {
		return rec, errors.New("data after the record")
	}
	if rec.Fields == nil {
		return rec, errors.New("fields missing")
	}
	if rec.Kind == "" {
		return rec, errors.New("kind missing")
	}
	if _, err := time.Parse(time.RFC3339Nano, rec.Time); err != nil {
		return rec, fmt.Errorf("bad time %q", rec.Time)
	}
	want, err := rec.ComputeHash()
	if err != nil {
		return rec, err
	}
	if rec.Hash != want {
		return rec, errors.New("hash does not match the record's content")
	}
	// The line must be the canonical encoding: the hash covers a re-encoding,
	// so bytes outside it (spacing, member order, escapes) would otherwise be
	// editable unnoticed.
	canon, err := json.Marshal(rec)
	if err != nil || !bytes.Equal(canon, line) {
		return rec, errors.New("record is not in canonical form")
	}
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
// *BrokenError naming the first broken record. See VerifyFiles for a log
// in rotated files.
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
