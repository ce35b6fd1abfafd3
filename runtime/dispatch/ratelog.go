package dispatch

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"
)

// LogLimiter lets through a burst of lines per key and then one per
// interval; what it holds back is counted and reported with the next line
// of that key. A sandbox can make refusals as fast as it opens flows: the
// metrics count every one, the log must not grow with them.
type LogLimiter struct {
	mu    sync.Mutex
	burst int
	every time.Duration
	keys  map[string]*logBucket
}

type logBucket struct {
	tokens     float64
	last       time.Time
	suppressed int
}

// NewLogLimiter lets burst lines of a key through at once, then one per
// every.
func NewLogLimiter(burst int, every time.Duration) *LogLimiter {
	return &LogLimiter{burst: burst, every: every, keys: map[string]*logBucket{}}
}

// maxLogKeys bounds the limiter's memory: keys are reasons and event
// kinds, a few dozen; past this, the map starts over.
const maxLogKeys = 1024

// allow reports whether a line of key may be logged now, and how many
// lines of that key were held back since the last one let through. A nil
// limiter lets everything through.
func (l *LogLimiter) allow(key string) (bool, int) {
	if l == nil {
		return true, 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	b := l.keys[key]
	if b == nil {
		if len(l.keys) >= maxLogKeys {
			l.keys = map[string]*logBucket{}
		}
		b = &logBucket{tokens: float64(l.burst), last: now}
		l.keys[key] = b
	}
	b.tokens = min(float64(l.burst), b.tokens+float64(now.Sub(b.last))/float64(l.every))
	b.last = now
	if b.tokens < 1 {
		b.suppressed++
		return false, 0
	}
	b.tokens--
	n := b.suppressed
	b.suppressed = 0
	return true, n
}

// Log logs through the limiter: level, message and key-values as slog's,
// with "suppressed" added when lines were held back.
func (l *LogLimiter) Log(log *slog.Logger, level slog.Level, key, msg string, args ...any) {
	ok, suppressed := l.allow(key)
	if !ok {
		return
	}
	if suppressed > 0 {
		args = append(args, "suppressed", suppressed)
	}
	log.Log(context.Background(), level, msg, args...)
}

// acceptBackoff is the pause after a failed accept: it doubles from 5 ms
// to 1 s while accepts keep failing (out of descriptors, say), so that a
// failing listener neither spins nor floods the log.
type acceptBackoff struct{ d time.Duration }

func (b *acceptBackoff) failed() time.Duration {
	if b.d == 0 {
		b.d = 5 * time.Millisecond
	} else if b.d < time.Second {
		b.d = min(2*b.d, time.Second)
	}
	return b.d
}

func (b *acceptBackoff) ok() { b.d = 0 }

// AcceptLoop accepts connections from l and hands each to handle, backing
// off on errors (logged through the limiter) until l is closed or ctx is
// done.
func AcceptLoop(ctx context.Context, l *net.TCPListener, what string, log *slog.Logger, logs *LogLimiter, handle func(*net.TCPConn)) {
	var backoff acceptBackoff
	for {
		c, err := l.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			wait := backoff.failed()
			logs.Log(log, slog.LevelWarn, "accept:"+what, "accept failed", "listener", what, "error", err, "retry_in", wait)
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
			continue
		}
		backoff.ok()
		handle(c)
	}
}
