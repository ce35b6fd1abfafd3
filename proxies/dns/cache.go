package dnsproxy

import (
	"container/list"
	"net/netip"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// cacheKey keys upstream answers. The entry holds the upstream's answer, not
// a sandbox's view of it: each hit is filtered again through the asking
// sandbox's allow list, so sandboxes that share an upstream share entries.
type cacheKey struct {
	upstream netip.AddrPort
	name     string // canonical
	qtype    uint16
}

// upstreamAnswer is an upstream response reduced to what may ever be shown
// to a sandbox: IN records of the question's type or CNAME in the answer
// section, SOA records in the authority section. Its records are shared and
// never modified.
type upstreamAnswer struct {
	rcode  int
	answer []dns.RR
	ns     []dns.RR
	stored time.Time
}

type cacheEntry struct {
	key     cacheKey
	ans     *upstreamAnswer
	expires time.Time
}

// answerCache is a fixed-size LRU of upstream answers with TTL expiry.
type answerCache struct {
	mu  sync.Mutex
	max int
	m   map[cacheKey]*list.Element
	lru list.List // front: most recently used
	// size, when set, is told the number of entries after each change.
	size func(int)
}

func newAnswerCache(maxEntries int, size func(int)) *answerCache {
	if maxEntries <= 0 {
		return nil
	}
	return &answerCache{max: maxEntries, m: make(map[cacheKey]*list.Element), size: size}
}

func (c *answerCache) get(k cacheKey, now time.Time) (*upstreamAnswer, bool) {
	if c == nil {
		return nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.m[k]
	if !ok {
		return nil, false
	}
	e := el.Value.(*cacheEntry)
	if !now.Before(e.expires) {
		c.lru.Remove(el)
		delete(c.m, k)
		c.report()
		return nil, false
	}
	c.lru.MoveToFront(el)
	return e.ans, true
}

func (c *answerCache) put(k cacheKey, a *upstreamAnswer, ttl time.Duration) {
	if c == nil || ttl <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	e := &cacheEntry{key: k, ans: a, expires: a.stored.Add(ttl)}
	if el, ok := c.m[k]; ok {
		el.Value = e
		c.lru.MoveToFront(el)
		return
	}
	c.m[k] = c.lru.PushFront(e)
	for c.lru.Len() > c.max {
		old := c.lru.Back()
		c.lru.Remove(old)
		delete(c.m, old.Value.(*cacheEntry).key)
	}
	c.report()
}

func (c *answerCache) report() {
	if c.size != nil {
		c.size(c.lru.Len())
	}
}

// cacheTTL is how long an upstream answer may be cached: the smallest TTL of
// its records, and for a negative answer (no records of the question's type
// at the end) the SOA's negative TTL (RFC 2308 5). Without either it is not
// cached.
func cacheTTL(a *upstreamAnswer, maxTTL time.Duration) time.Duration {
	const none = ^uint32(0)
	ttl := none
	for _, rr := range a.answer {
		ttl = min(ttl, rr.Header().Ttl)
	}
	for _, rr := range a.ns {
		if soa, ok := rr.(*dns.SOA); ok {
			ttl = min(ttl, soa.Hdr.Ttl, soa.Minttl)
		}
	}
	if ttl == none {
		return 0
	}
	return min(time.Duration(ttl)*time.Second, maxTTL)
}
