package trusted

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/cleanwall/cleanwall/proxies/internal/tlsconf"
)

// DefaultReloadInterval is how often at most a rule's certificate and key
// files are looked at again (a stat each, at dial time).
const DefaultReloadInterval = time.Second

// watched is a value loaded from files and loaded again when they change:
// at most once per interval, at dial time, a stat of each file (size,
// modification and change times, inode) tells whether any was rewritten
// or replaced (an atomic rename included). Polling at dial time needs no
// goroutine and no inotify watch per rule, and a rule with no flows costs
// nothing.
type watched[T any] struct {
	files []string
	every time.Duration
	load  func() (T, error)
	// keepOld: a reload that fails keeps serving the last value that
	// loaded (and tries again at the next check); otherwise the failure is
	// returned until the files load again.
	keepOld bool

	mu      sync.Mutex
	checked time.Time
	stamps  []fileStamp
	failed  []fileStamp // the files as they were when a reload last failed (logged once)
	val     T
	err     error
}

// fileStamp is what a file's stat says of its content.
type fileStamp struct {
	ok           bool
	size         int64
	mtime, ctime int64
	dev, ino     uint64
}

func stampOf(file string) fileStamp {
	fi, err := os.Stat(file)
	if err != nil {
		return fileStamp{}
	}
	s := fileStamp{ok: true, size: fi.Size(), mtime: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.ctime = st.Ctim.Nano()
		s.dev, s.ino = uint64(st.Dev), st.Ino
	}
	return s
}

// start loads the value the first time; its error is the rule's.
func (w *watched[T]) start() error {
	if w.every <= 0 {
		w.every = DefaultReloadInterval
	}
	w.stamps = w.stamp()
	w.checked = time.Now()
	w.val, w.err = w.load()
	return w.err
}

func (w *watched[T]) stamp() []fileStamp {
	s := make([]fileStamp, len(w.files))
	for i, f := range w.files {
		s[i] = stampOf(f)
	}
	return s
}

// get returns the current value, loading it again first when a check is
// due and a file changed. what names the value in log lines.
func (w *watched[T]) get(log *slog.Logger, what string) (T, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := time.Now()
	if now.Sub(w.checked) < w.every {
		return w.val, w.err
	}
	w.checked = now
	stamps := w.stamp()
	if slices.Equal(stamps, w.stamps) {
		return w.val, w.err
	}
	v, err := w.load()
	switch {
	case err == nil:
		w.stamps, w.val, w.err = stamps, v, nil
		log.Info("trusted: reloaded "+what, logFiles, w.files)
	case w.keepOld:
		// Stamps unchanged: the next check tries again (a certificate and
		// its key replaced one after the other load once both are).
		if slices.Equal(stamps, w.failed) {
			break
		}
		w.failed = stamps
		log.Warn("trusted: reloading "+what+" failed, the previous one stays in use", logFiles, w.files, logError, err)
	default:
		w.stamps, w.err = stamps, err
		log.Warn("trusted: reloading "+what+" failed, its rule's flows are refused until it loads", logFiles, w.files, logError, err)
	}
	return w.val, w.err
}

// watchedCA is a rule's caFile. A caFile that no longer loads fails
// closed: the customer's trust is what the file says now, and a file that
// says nothing usable trusts nobody (flows are refused as tls-config).
type watchedCA struct {
	watched[*x509.CertPool]
}

func newWatchedCA(file string, every time.Duration) (*watchedCA, error) {
	c := &watchedCA{watched[*x509.CertPool]{files: []string{file}, every: every,
		load: func() (*x509.CertPool, error) { return tlsconf.LoadCA(file) }}}
	return c, c.start()
}

// clientPair is a loaded client certificate and the digest of its leaf,
// which tells sessions of one certificate from another's.
type clientPair struct {
	cert *tls.Certificate
	id   [sha256.Size]byte
}

// watchedPair is a rule's clientCertFile and clientKeyFile. A pair that
// does not load keeps the previous one in use: it is the proxy's own
// identity, not the customer's trust, and a certificate and its key are
// seldom replaced at the same instant.
type watchedPair struct {
	watched[clientPair]
}

func newWatchedPair(certFile, keyFile string, every time.Duration) (*watchedPair, error) {
	p := &watchedPair{watched[clientPair]{files: []string{certFile, keyFile}, every: every, keepOld: true,
		load: func() (clientPair, error) {
			c, err := tlsconf.LoadKeyPair(certFile, keyFile)
			if err != nil {
				return clientPair{}, err
			}
			return clientPair{cert: &c, id: sha256.Sum256(c.Certificate[0])}, nil
		}}}
	return p, p.start()
}
