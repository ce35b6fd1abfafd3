package consent

import (
	"context"
	"sync"
	"time"
)

// Asker is what the Cache asks (a *Client; a stub in tests).
type Asker interface {
	Ask(ctx context.Context, req Request) Decision
	Timeout() time.Duration
}

// Key identifies one cached answer: one question about one sandbox under
// one policy version.
type Key struct {
	Sandbox      string
	Kind         Kind
	Rule         string // "" for execute
	PolicySHA256 string
}

// KeyOf is a request's cache key (its destination is not part of it: an
// egress answer covers the rule).
func KeyOf(r Request) Key {
	return Key{Sandbox: r.Sandbox, Kind: r.Kind, Rule: r.Rule, PolicySHA256: r.PolicySHA256}
}

// Source says where a counted decision came from.
type Source string

const (
	SourceFresh  Source = "fresh"  // the service was asked (or failed)
	SourceCached Source = "cached" // a cached answer, or one another asker's call brought
)

// Cache holds the answers of the consent service, keyed by (sandbox,
// kind, rule, policy version). A question is asked once: concurrent first
// askers wait for the same call, at most the client's timeout. Each answer
// is re-asked in the background before it expires (one timeout ahead, so
// the next answer is in before the cached one runs out); meanwhile askers
// get the cached answer. An answer that expired without a new one (the
// re-ask still running) is never served: askers wait for the call.
//
// Set the hooks before the first Check; they are called without the
// cache's lock, from the goroutine of the call or of the Check.
type Cache struct {
	asker Asker
	ctx   context.Context

	// Observe is told of every decision: each fresh answer once (source
	// fresh), and each Check answered by a cached answer or by a call
	// another asker started (source cached).
	Observe func(req Request, d Decision, src Source)
	// Denied is told of every fresh deny, before the askers waiting for it
	// get it and before Refresh returns: the owner closes what the answer
	// covers. It must not call back into the cache.
	Denied func(req Request, d Decision)
	// Keep, when set, is asked before each background re-ask: an answer
	// it no longer wants (its sandbox is gone) is dropped instead.
	Keep func(Key) bool
	// now is the clock (tests).
	now func() time.Time

	mu      sync.RWMutex
	entries map[Key]*entry
}

type entry struct {
	req     Request   // the last request asked (its destination: the first flow's)
	dec     *Decision // nil until the first answer, and after a Refresh
	expires time.Time
	call    *call
	timer   *time.Timer
	seq     uint64 // the latest call's number: an older call's answer is dropped
}

type call struct {
	seq  uint64
	done chan struct{}
	dec  Decision
}

// NewCache returns a cache asking through a. Background calls end with ctx.
func NewCache(ctx context.Context, a Asker) *Cache {
	return &Cache{asker: a, ctx: ctx, now: time.Now, entries: map[Key]*entry{}}
}

// Check answers req: from the cache when a live answer is there, else by
// asking (or by waiting for the call in flight), at most the timeout.
// A ctx that ends first is a deny (cause timeout).
func (c *Cache) Check(ctx context.Context, req Request) Decision {
	k := KeyOf(req)
	if d, ok := c.Peek(k); ok { // the flow path: shared lock only
		c.observe(req, d, SourceCached)
		return d
	}
	c.mu.Lock()
	e := c.entries[k]
	if e != nil && e.dec != nil && c.now().Before(e.expires) {
		d := *e.dec
		c.mu.Unlock()
		c.observe(req, d, SourceCached)
		return d
	}
	if e == nil {
		e = &entry{req: req}
		c.entries[k] = e
	}
	cl, started := e.call, false
	if cl == nil {
		e.req = req
		cl, started = c.start(k, e), true
	}
	c.mu.Unlock()
	select {
	case <-cl.done:
		if !started {
			c.observe(req, cl.dec, SourceCached)
		}
		return cl.dec
	case <-ctx.Done():
		d := failure(CauseTimeout, "no answer before the flow's deadline: "+context.Cause(ctx).Error())
		c.observe(req, d, SourceCached)
		return d
	}
}

// Peek returns the live answer of k without asking (ok false: none).
func (c *Cache) Peek(k Key) (Decision, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if e := c.entries[k]; e != nil && e.dec != nil && c.now().Before(e.expires) {
		return *e.dec, true
	}
	return Decision{}, false
}

// start launches a call for e. Call with the lock held.
func (c *Cache) start(k Key, e *entry) *call {
	e.seq++
	cl := &call{seq: e.seq, done: make(chan struct{})}
	e.call = cl
	req := e.req
	go c.run(k, req, cl)
	return cl
}

// run asks, stores the answer (unless a newer call or a Forget replaced
// the entry meanwhile), schedules the re-ask, tells the hooks, then the
// waiters.
func (c *Cache) run(k Key, req Request, cl *call) {
	defer close(cl.done)
	cl.dec = c.asker.Ask(c.ctx, req)
	c.mu.Lock()
	e := c.entries[k]
	current := e != nil && e.seq == cl.seq
	if current {
		d := cl.dec
		e.dec, e.call = &d, nil
		e.expires = d.At.Add(d.TTL)
		if e.timer != nil {
			e.timer.Stop()
		}
		if c.ctx.Err() == nil {
			e.timer = time.AfterFunc(c.reaskIn(d), func() { c.reask(k, cl.seq) })
		}
	}
	c.mu.Unlock()
	if !current {
		return // superseded: its askers get the answer, nobody stores or counts it
	}
	c.observe(req, cl.dec, SourceFresh)
	if !cl.dec.Allow && c.Denied != nil {
		c.Denied(req, cl.dec)
	}
}

// reaskIn is when to re-ask an answer: one timeout before it expires, so
// that the next answer arrives before it runs out; an answer shorter than
// twice the timeout is re-asked halfway.
func (c *Cache) reaskIn(d Decision) time.Duration {
	t := c.asker.Timeout()
	if d.TTL >= 2*t {
		return d.TTL - t
	}
	return d.TTL / 2
}

// reask is the timer's re-ask of the answer of call seq.
func (c *Cache) reask(k Key, seq uint64) {
	keep := c.Keep == nil || c.Keep(k) // without the lock: the owner's locks come first
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entries[k]
	if e == nil || e.seq != seq || e.call != nil || c.ctx.Err() != nil {
		return
	}
	if !keep {
		delete(c.entries, k)
		return
	}
	c.start(k, e)
}

// Refresh drops the cached answers of sandbox ("" for every sandbox) and
// asks each question again now, waiting for the answers (at most the
// timeout): when it returns, every deny among them has been handed to
// Denied. Until an answer is in, askers wait for its call.
func (c *Cache) Refresh(ctx context.Context, sandbox string) []Result {
	type pending struct {
		req Request
		cl  *call
	}
	var calls []pending
	c.mu.Lock()
	for k, e := range c.entries {
		if sandbox != "" && k.Sandbox != sandbox {
			continue
		}
		e.dec = nil
		if e.timer != nil {
			e.timer.Stop()
			e.timer = nil
		}
		calls = append(calls, pending{e.req, c.start(k, e)}) // a call in flight is superseded
	}
	c.mu.Unlock()
	out := make([]Result, 0, len(calls))
	for _, p := range calls {
		select {
		case <-p.cl.done:
			out = append(out, Result{Request: p.req, Decision: p.cl.dec})
		case <-ctx.Done():
			out = append(out, Result{Request: p.req, Decision: failure(CauseTimeout, "refresh canceled")})
		}
	}
	return out
}

// Result is one answer a Refresh brought.
type Result struct {
	Request  Request
	Decision Decision
}

// Forget drops the answers of sandbox for which drop returns true (nil:
// all of the sandbox's), stopping their re-asks.
func (c *Cache) Forget(sandbox string, drop func(Key) bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, e := range c.entries {
		if k.Sandbox != sandbox || drop != nil && !drop(k) {
			continue
		}
		if e.timer != nil {
			e.timer.Stop()
		}
		delete(c.entries, k)
	}
}

// ForgetWhere drops every answer for which drop returns true, stopping
// its re-asks.
func (c *Cache) ForgetWhere(drop func(Key) bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, e := range c.entries {
		if !drop(k) {
			continue
		}
		if e.timer != nil {
			e.timer.Stop()
		}
		delete(c.entries, k)
	}
}

// Keys lists the cached questions (tests, status).
func (c *Cache) Keys() []Key {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]Key, 0, len(c.entries))
	for k := range c.entries {
		out = append(out, k)
	}
	return out
}

// Close stops every re-ask (the context given to NewCache ends the calls).
func (c *Cache) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.entries {
		if e.timer != nil {
			e.timer.Stop()
		}
	}
}

func (c *Cache) observe(req Request, d Decision, src Source) {
	if c.Observe != nil {
		c.Observe(req, d, src)
	}
}
