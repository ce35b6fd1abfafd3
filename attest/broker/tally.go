package broker

import (
	"cmp"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/governance/audit"
)

// Bounds of one challenge tally: what an interval's record may name. A flood
// from many addresses is counted, never listed address by address.
const (
	// maxTrackedRequesters is how many client addresses an interval counts
	// one by one; challenges from further addresses are counted together.
	maxTrackedRequesters = 4096
	// maxRecordedRequesters is how many of them (the busiest) the record names.
	maxRecordedRequesters = 16
)

// challengeTally aggregates challenge decisions: one audit record per
// interval with counts, instead of one record (and one fsync) per challenge,
// which let 10,000 unauthenticated challenges write 10,000 lines. A challenge
// grants nothing by itself (each release is audited on its own and names its
// session's expiry), so counts keep what an investigation needs: how many,
// for which keys, refused why, from whom.
type challengeTally struct {
	// flushMu serialises flushes (the ticker, a challenge that finds the
	// interval over, shutdown) so records leave in order.
	flushMu sync.Mutex

	mu  sync.Mutex
	cur tallyCounts
	// failed is the error of the last flush that did not reach the audit
	// log; challenges are refused until a flush succeeds.
	failed error
}

// tallyCounts is one interval's counts.
type tallyCounts struct {
	from       time.Time
	total      int
	issued     map[string]int // by configured key id
	refused    map[attest.Code]int
	requesters map[string]int // by client IP, at most maxTrackedRequesters
	untracked  int            // challenges from addresses beyond that bound
}

func newCounts(from time.Time) tallyCounts {
	return tallyCounts{from: from, issued: map[string]int{}, refused: map[attest.Code]int{}, requesters: map[string]int{}}
}

func newChallengeTally(now time.Time) *challengeTally {
	return &challengeTally{cur: newCounts(now)}
}

// add counts one challenge decision: issued for keyID when code is empty,
// else refused with code (keyID is then not recorded: it may be anything a
// client sent).
func (t *challengeTally) add(remoteAddr, keyID string, code attest.Code) {
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		host = remoteAddr
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	c := &t.cur
	c.total++
	if code == "" {
		c.issued[keyID]++
	} else {
		c.refused[code]++
	}
	if _, ok := c.requesters[host]; ok || len(c.requesters) < maxTrackedRequesters {
		c.requesters[host]++
	} else {
		c.untracked++
	}
}

// due reports whether the current interval has challenges and is over.
func (t *challengeTally) due(now time.Time, interval time.Duration) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.cur.total > 0 && now.Sub(t.cur.from) >= interval
}

// healthy is the error of the last flush if it failed, else nil.
func (t *challengeTally) healthy() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.failed
}

// flush writes the current interval's record (nothing when it had no
// challenges) and starts the next interval. When the audit log refuses the
// record its counts go back into the current interval, to be written by the
// next flush, and the error is returned.
func (t *challengeTally) flush(log *audit.Log, now time.Time) error {
	t.flushMu.Lock()
	defer t.flushMu.Unlock()
	t.mu.Lock()
	done := t.cur
	t.cur = newCounts(now)
	t.mu.Unlock()
	if done.total == 0 {
		t.mu.Lock()
		t.failed = nil
		t.mu.Unlock()
		return nil
	}
	_, err := log.Append(KindChallenge, done.record(now))
	t.mu.Lock()
	defer t.mu.Unlock()
	t.failed = err
	if err != nil {
		t.cur = done.merge(t.cur)
	}
	return err
}

// merge adds later's counts to c (a failed flush puts its interval back).
func (c tallyCounts) merge(later tallyCounts) tallyCounts {
	c.total += later.total
	c.untracked += later.untracked
	for k, n := range later.issued {
		c.issued[k] += n
	}
	for k, n := range later.refused {
		c.refused[k] += n
	}
	for a, n := range later.requesters {
		if _, ok := c.requesters[a]; ok || len(c.requesters) < maxTrackedRequesters {
			c.requesters[a] += n
		} else {
			c.untracked += n
		}
	}
	return c
}

// record is the audit record of an interval that ends at now.
func (c tallyCounts) record(now time.Time) map[string]any {
	type requester struct {
		addr string
		n    int
	}
	list := make([]requester, 0, len(c.requesters))
	for a, n := range c.requesters {
		list = append(list, requester{a, n})
	}
	slices.SortFunc(list, func(a, b requester) int {
		return cmp.Or(cmp.Compare(b.n, a.n), cmp.Compare(a.addr, b.addr))
	})
	named := map[string]int{}
	others := c.untracked
	for i, r := range list {
		if i < maxRecordedRequesters {
			named[r.addr] = r.n
		} else {
			others += r.n
		}
	}
	refused := map[string]int{}
	for code, n := range c.refused {
		refused[string(code)] = n
	}
	distinct := len(c.requesters)
	rec := map[string]any{
		fieldFrom:            c.from.UTC().Format(time.RFC3339Nano),
		fieldTo:              now.UTC().Format(time.RFC3339Nano),
		fieldChallenges:      c.total,
		fieldIssued:          c.issued,
		fieldRefused:         refused,
		fieldRequesters:      named,
		fieldOtherRequests:   others,
		fieldDistinctClients: distinct,
	}
	if c.untracked > 0 {
		// More addresses than one interval tracks: the distinct count is a
		// lower bound.
		rec[fieldDistinctAtLeast] = true
	}
	return rec
}
