package audit

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"time"
)

// Sink protocol headers (docs/audit.md).
const (
	HeaderFirstSeq = "Cleanwall-Audit-First-Seq"
	HeaderLastSeq  = "Cleanwall-Audit-Last-Seq"
	HeaderNodeKey  = "Cleanwall-Audit-Node-Key"
	// SinkContentType is the type of a batch: the records' lines as they
	// are in the log, newline-terminated.
	SinkContentType = "application/x-ndjson"
)

// SinkAck is a sink's answer to a batch: every record up to Through is
// stored durably at the sink.
type SinkAck struct {
	Through uint64 `json:"through"`
}

// SinkOptions configures a Forwarder.
type SinkOptions struct {
	// URL is where batches are POSTed; it must be https.
	URL string
	// Roots are the CAs the sink's certificate must chain to (nil: the
	// system roots).
	Roots *x509.CertPool
	// Client overrides the HTTP client built from Roots (tests).
	Client *http.Client
	// CursorFile holds the last acknowledged seq and hash (default
	// <log>.sink-cursor).
	CursorFile string
	// MaxBatchRecords and MaxBatchBytes bound a batch (512, 1 MiB).
	MaxBatchRecords int
	MaxBatchBytes   int
	// MinBackoff and MaxBackoff bound the wait after a failed POST (250 ms,
	// 30 s), doubling from one to the other.
	MinBackoff, MaxBackoff time.Duration
	// Timeout bounds one POST (30 s).
	Timeout time.Duration
	Logger  *slog.Logger
}

// Forwarder sends a log's records to a sink, in order, each until the sink
// acknowledges it; the log's files are its spool (retention keeps what the
// sink has not acknowledged), and the acknowledged cursor is persisted after
// every acknowledgement.
type Forwarder struct {
	l    *Log
	o    SinkOptions
	http *http.Client
	log  *slog.Logger

	cursor    atomic.Uint64
	failures  atomic.Uint64
	delivered atomic.Uint64
	lastErr   atomic.Value // string

	// read position: next is the seq the next line of br holds (f nil:
	// to be located).
	f    *os.File
	br   *bufio.Reader
	next uint64

	cancel context.CancelFunc
	done   chan struct{}
}

type cursorFile struct {
	Seq  uint64 `json:"seq"`
	Hash string `json:"hash"`
}

// Forward starts forwarding l's records to a sink. Only records on disk
// (Log.Durable) are sent. Close stops it.
func (l *Log) Forward(o SinkOptions) (*Forwarder, error) {
	u, err := url.Parse(o.URL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("audit sink %q: want an https:// URL", o.URL)
	}
	if o.CursorFile == "" {
		o.CursorFile = l.path + ".sink-cursor"
	}
	if o.MaxBatchRecords <= 0 {
		o.MaxBatchRecords = 512
	}
	if o.MaxBatchBytes <= 0 {
		o.MaxBatchBytes = 1 << 20
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = 250 * time.Millisecond
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = max(30*time.Second, o.MinBackoff)
	}
	if o.Timeout <= 0 {
		o.Timeout = 30 * time.Second
	}
	fw := &Forwarder{l: l, o: o, log: o.Logger, http: o.Client, done: make(chan struct{})}
	if fw.log == nil {
		fw.log = l.log
	}
	if fw.http == nil {
		fw.http = &http.Client{
			Transport: &http.Transport{TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: o.Roots},
				ForceAttemptHTTP2: true, IdleConnTimeout: 90 * time.Second, TLSHandshakeTimeout: 10 * time.Second},
			Timeout:       o.Timeout,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	data, err := os.ReadFile(o.CursorFile)
	switch {
	case err == nil:
		var c cursorFile
		if err := json.Unmarshal(data, &c); err != nil {
			return nil, fmt.Errorf("audit sink cursor %s: %w", o.CursorFile, err)
		}
		if err := checkCursor(l, c); err != nil {
			return nil, fmt.Errorf("audit sink cursor %s: %w (remove it to send this log from its start)", o.CursorFile, err)
		}
		fw.cursor.Store(c.Seq)
	case !errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("audit sink cursor: %w", err)
	}
	fw.next = fw.cursor.Load() + 1
	fw.lastErr.Store("")
	l.mu.Lock()
	l.retain = fw.cursor.Load
	l.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	fw.cancel = cancel
	go fw.run(ctx)
	return fw, nil
}

// Backlog is the number of records on disk the sink has not acknowledged.
func (fw *Forwarder) Backlog() uint64 {
	d, c := fw.l.Durable(), fw.cursor.Load()
	if d < c {
		return 0
	}
	return d - c
}

// Cursor is the seq of the last record the sink acknowledged.
func (fw *Forwarder) Cursor() uint64 { return fw.cursor.Load() }

// Failures counts failed POSTs; Delivered counts acknowledged records.
func (fw *Forwarder) Failures() uint64  { return fw.failures.Load() }
func (fw *Forwarder) Delivered() uint64 { return fw.delivered.Load() }

// LastError is the last POST's error ("" after a success).
func (fw *Forwarder) LastError() string { return fw.lastErr.Load().(string) }

// Close stops forwarding (what is not acknowledged stays in the log, and is
// sent by the next Forwarder).
func (fw *Forwarder) Close() {
	fw.cancel()
	<-fw.done
	if fw.f != nil {
		fw.f.Close()
	}
}

func (fw *Forwarder) run(ctx context.Context) {
	defer close(fw.done)
	backoff := fw.o.MinBackoff
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		batch, err := fw.read()
		if err == nil && batch.n > 0 {
			err = fw.send(ctx, batch)
		}
		if ctx.Err() != nil {
			return
		}
		var wait <-chan time.Time
		switch {
		case err != nil:
			fw.failures.Add(1)
			fw.lastErr.Store(err.Error())
			fw.log.Warn("audit sink: records not delivered, retrying", "backlog", fw.Backlog(), "retry_in", backoff, "error", err)
			wait = time.After(backoff)
			backoff = min(2*backoff, fw.o.MaxBackoff)
		case batch.n > 0:
			backoff = fw.o.MinBackoff
			continue // more may be waiting
		default:
			wait = tick.C
		}
		select {
		case <-ctx.Done():
			return
		case <-fw.l.notify:
			if err != nil {
				// Keep the backoff: a record does not bring the sink back.
				select {
				case <-ctx.Done():
					return
				case <-wait:
				}
			}
		case <-wait:
		}
	}
}

type batch struct {
	body        []byte
	first, last uint64
	hashes      []string // of first..last
	n           int
}

// read collects the records from fw.next on, up to what is durable.
func (fw *Forwarder) read() (batch, error) {
	b := batch{first: fw.next}
	durable := fw.l.Durable()
	for fw.next <= durable && b.n < fw.o.MaxBatchRecords && len(b.body) < fw.o.MaxBatchBytes {
		if fw.f == nil {
			if err := fw.locate(); err != nil {
				return b, err
			}
			if fw.f == nil {
				break
			}
			if b.n == 0 {
				b.first = fw.next
			}
			if fw.next > durable {
				break
			}
		}
		line, err := fw.br.ReadBytes('\n')
		if err == io.EOF && len(line) == 0 {
			// The record is in a later file: this one was rotated.
			fw.drop()
			continue
		}
		if err != nil {
			fw.drop()
			return b, fmt.Errorf("reading the audit log for the sink: %w", err)
		}
		rec, perr := parseLine(line[:len(line)-1])
		if perr != nil || rec.Seq != fw.next {
			fw.drop()
			return b, fmt.Errorf("audit log record %d for the sink: unexpected line (seq %d, %v)", fw.next, rec.Seq, perr)
		}
		b.body = append(b.body, line...)
		b.hashes = append(b.hashes, rec.Hash)
		b.last = rec.Seq
		b.n++
		fw.next++
	}
	return b, nil
}

func (fw *Forwarder) drop() {
	if fw.f != nil {
		fw.f.Close()
	}
	fw.f, fw.br = nil, nil
}

// locate opens the file holding fw.next and reads up to it. Records removed
// before any sink saw them are skipped, loudly.
func (fw *Forwarder) locate() error {
	files, err := Files(fw.l.path)
	if err != nil {
		return err
	}
	for i := len(files) - 1; i >= 0; i-- {
		first, err := firstRecord(files[i])
		if err != nil {
			return err
		}
		if first == nil {
			continue
		}
		if first.Seq > fw.next {
			if i > 0 {
				continue
			}
			fw.log.Error("audit sink: records were removed before the sink acknowledged them", "from", fw.next, "to", first.Seq-1)
			fw.next = first.Seq
		}
		f, err := os.Open(files[i])
		if err != nil {
			return err
		}
		br := bufio.NewReaderSize(f, 64<<10)
		for seq := first.Seq; seq < fw.next; seq++ {
			if _, err := br.ReadSlice('\n'); err != nil {
				// Lines longer than the buffer are read whole.
				if !errors.Is(err, bufio.ErrBufferFull) {
					f.Close()
					return fmt.Errorf("audit sink: record %d not in %s", fw.next, files[i])
				}
				seq--
			}
		}
		fw.f, fw.br = f, br
		return nil
	}
	return nil // nothing on disk yet
}

// send POSTs one batch and moves the cursor to what the sink acknowledged.
func (fw *Forwarder) send(ctx context.Context, b batch) error {
	ctx, cancel := context.WithTimeout(ctx, fw.o.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, fw.o.URL, bytes.NewReader(b.body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", SinkContentType)
	req.Header.Set(HeaderFirstSeq, strconv.FormatUint(b.first, 10))
	req.Header.Set(HeaderLastSeq, strconv.FormatUint(b.last, 10))
	if k := fw.l.NodeKey(); k != nil {
		req.Header.Set(HeaderNodeKey, EncodeNodeKey(k))
	}
	resp, err := fw.http.Do(req)
	if err != nil {
		fw.rewind(b.first)
		return err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		fw.rewind(b.first)
		return fmt.Errorf("sink answered %s: %.200s", resp.Status, bytes.TrimSpace(data))
	}
	var ack SinkAck
	if err := json.Unmarshal(data, &ack); err != nil {
		fw.rewind(b.first)
		return fmt.Errorf("sink answer is not {\"through\": N}: %v", err)
	}
	through := min(ack.Through, b.last)
	if ack.Through+1 < b.first {
		// The sink has less than it acknowledged before: send again from
		// what it has.
		fw.log.Error("audit sink acknowledges less than before; sending again", "through", ack.Through, "cursor", b.first-1)
		if err := fw.persist(ack.Through, ""); err != nil {
			return err
		}
		fw.rewind(ack.Through + 1)
		return fmt.Errorf("sink acknowledges only through %d (sent %d-%d): sending again from there", ack.Through, b.first, b.last)
	}
	if through+1 == b.first {
		fw.rewind(b.first)
		return fmt.Errorf("sink acknowledged none of records %d-%d", b.first, b.last)
	}
	if err := fw.persist(through, b.hashes[through-b.first]); err != nil {
		fw.rewind(b.first)
		return err
	}
	fw.delivered.Add(through - b.first + 1)
	fw.lastErr.Store("")
	if through < b.last {
		fw.rewind(through + 1)
	}
	return nil
}

// rewind makes the next read start at seq.
func (fw *Forwarder) rewind(seq uint64) {
	fw.drop()
	fw.next = seq
}

// persist writes the cursor durably, then moves it.
func (fw *Forwarder) persist(seq uint64, hash string) error {
	data, _ := json.Marshal(cursorFile{Seq: seq, Hash: hash})
	dir := filepath.Dir(fw.o.CursorFile)
	tmp, err := os.CreateTemp(dir, ".sink-cursor-*")
	if err != nil {
		return fmt.Errorf("audit sink cursor: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, werr := tmp.Write(append(data, '\n'))
	if werr == nil {
		werr = tmp.Sync()
	}
	if cerr := tmp.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(tmp.Name(), fw.o.CursorFile)
	}
	if werr == nil {
		werr = syncDir(dir)
	}
	if werr != nil {
		return fmt.Errorf("audit sink cursor: %w", werr)
	}
	fw.cursor.Store(seq)
	return nil
}

// checkCursor makes sure a persisted cursor belongs to this log: its seq is
// not past the log's end and, where the record is still on disk, it has the
// hash the cursor names. A cursor of another log would make the forwarder
// skip records, or send a chain the sink cannot continue.
func checkCursor(l *Log, c cursorFile) error {
	last, _ := l.Last()
	if c.Seq > last {
		return fmt.Errorf("at seq %d, past the log's last record %d: another log's cursor", c.Seq, last)
	}
	if c.Seq == 0 || c.Hash == "" {
		return nil
	}
	files, err := Files(l.path)
	if err != nil {
		return err
	}
	for i := len(files) - 1; i >= 0; i-- {
		first, err := firstRecord(files[i])
		if err != nil {
			return err
		}
		if first == nil || first.Seq > c.Seq {
			continue
		}
		f, err := os.Open(files[i])
		if err != nil {
			return err
		}
		defer f.Close()
		rd := ContinueReader(f, Chain{Seq: first.Seq - 1, Hash: first.PrevHash})
		for {
			rec, err := rd.Next()
			if err != nil {
				return fmt.Errorf("record %d not found: %v", c.Seq, err)
			}
			if rec.Seq == c.Seq {
				if rec.Hash != c.Hash {
					return fmt.Errorf("record %d has hash %.16s…, the cursor %.16s…: another log's cursor", c.Seq, rec.Hash, c.Hash)
				}
				return nil
			}
		}
	}
	return nil // removed by retention after the sink acknowledged it
}
