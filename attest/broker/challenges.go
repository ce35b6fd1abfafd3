package broker

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/cleanwall/cleanwall/attest"
)

// ErrUsedSessionsFull is returned when the set of used sessions is full of
// sessions that have not expired yet: the broker refuses the release rather
// than forget a used session, which would let it be replayed.
var ErrUsedSessionsFull = errors.New("too many sessions used within one challenge lifetime")

// A session is a MAC'd token that carries everything the broker needs to
// check it, so issuing a challenge stores nothing:
//
//	version(1) || expiry(8, unix milliseconds, big-endian) || random(16) || key index(2) || HMAC-SHA256(macKey, the 27 bytes before)
//
// base64url without padding (79 characters, within attest.MaxSessionBytes).
// The nonce is HMAC-SHA256(nonceKey, the same 27 bytes): 32 bytes that only
// the broker can compute, so the client still sees an opaque session and a
// random nonce (docs/keybroker.md §1). Both keys are drawn at start and never
// leave memory: after a restart every earlier session is nonce-unknown, which
// is also what keeps a used session from being replayed against the next
// process, whose used set starts empty.
const (
	sessionVersion = 1
	sessionBody    = 1 + 8 + sessionIDSize + 2
	sessionSize    = sessionBody + sha256.Size
	sessionIDSize  = 16
)

type sessionID [sessionIDSize]byte

// challenge is a checked session.
type challenge struct {
	id       sessionID
	keyIndex int
	nonce    []byte
	expires  time.Time
}

// usedSession is a used session's entry: unix nanoseconds, 16 bytes, so a
// full default set stays in single-digit megabytes.
type usedSession struct {
	expires, used int64
}

// challenges issues stateless sessions and remembers the used ones until
// they expire. Memory is bounded by maxUsed, which bounds only sessions
// whose evidence verified (see consume), never what unauthenticated
// clients send.
type challenges struct {
	ttl     time.Duration
	maxUsed int
	now     func() time.Time

	macKey, nonceKey [32]byte

	mu   sync.Mutex
	used map[sessionID]usedSession
	// sweepAfter is the earliest expiry among the used sessions (zero when
	// there are none): sweeping sooner would find nothing to drop.
	sweepAfter time.Time
}

func newChallenges(ttl time.Duration, maxUsed int, now func() time.Time) *challenges {
	c := &challenges{ttl: ttl, maxUsed: maxUsed, now: now, used: map[sessionID]usedSession{}}
	rand.Read(c.macKey[:]) // crypto/rand.Read never fails (it crashes the program instead)
	rand.Read(c.nonceKey[:])
	return c
}

// issue makes a challenge for the key at keyIndex of the configuration.
func (c *challenges) issue(keyIndex int) (session string, ch challenge) {
	var body [sessionBody]byte
	ch.expires = c.now().Add(c.ttl).Truncate(time.Millisecond)
	body[0] = sessionVersion
	binary.BigEndian.PutUint64(body[1:9], uint64(ch.expires.UnixMilli()))
	rand.Read(body[9 : 9+sessionIDSize])
	binary.BigEndian.PutUint16(body[9+sessionIDSize:], uint16(keyIndex))
	copy(ch.id[:], body[9:9+sessionIDSize])
	ch.keyIndex = keyIndex
	ch.nonce = c.mac(c.nonceKey, body[:])
	token := append(body[:], c.mac(c.macKey, body[:])...)
	return base64.RawURLEncoding.EncodeToString(token), ch
}

func (c *challenges) mac(key [32]byte, body []byte) []byte {
	m := hmac.New(sha256.New, key[:])
	m.Write(body)
	return m.Sum(nil)
}

// check authenticates a session and refuses it when it expired or was used.
// It does not consume it: see consume.
func (c *challenges) check(session string) (challenge, error) {
	// Strict: one token has one spelling (the last character's unused bits
	// must be zero), so the session audited is the session issued.
	token, err := base64.RawURLEncoding.Strict().DecodeString(session)
	if err != nil || len(token) != sessionSize || token[0] != sessionVersion {
		return challenge{}, attest.Refuse(attest.CodeNonceUnknown, "not a session this broker issued")
	}
	body := token[:sessionBody]
	if !hmac.Equal(token[sessionBody:], c.mac(c.macKey, body)) {
		return challenge{}, attest.Refuse(attest.CodeNonceUnknown, "not a session this broker issued (or one issued before it restarted)")
	}
	ch := challenge{
		keyIndex: int(binary.BigEndian.Uint16(body[9+sessionIDSize:])),
		expires:  time.UnixMilli(int64(binary.BigEndian.Uint64(body[1:9]))),
		nonce:    c.mac(c.nonceKey, body),
	}
	copy(ch.id[:], body[9:9+sessionIDSize])
	now := c.now()
	if !now.Before(ch.expires) {
		return challenge{}, expired(ch, now)
	}
	c.mu.Lock()
	u, used := c.used[ch.id]
	c.mu.Unlock()
	if used {
		return challenge{}, replayed(u)
	}
	return ch, nil
}

// consume marks a checked session used, atomically: of two requests racing
// with one session only the first gets nil. The broker calls it once the
// evidence's signature chain verified, so only attested requests take room
// in the used set; when that set is full of unexpired sessions it refuses
// (ErrUsedSessionsFull) instead of forgetting one.
func (c *challenges) consume(ch challenge) error {
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if u, used := c.used[ch.id]; used {
		return replayed(u)
	}
	if !now.Before(ch.expires) {
		// It expired while its evidence was being verified.
		return expired(ch, now)
	}
	if len(c.used) >= c.maxUsed {
		c.sweepLocked(now)
	}
	if len(c.used) >= c.maxUsed {
		return fmt.Errorf("%w (%d sessions, each kept until it expires %v after issue)", ErrUsedSessionsFull, len(c.used), c.ttl)
	}
	c.used[ch.id] = usedSession{expires: ch.expires.UnixNano(), used: now.UnixNano()}
	if c.sweepAfter.IsZero() || ch.expires.Before(c.sweepAfter) {
		c.sweepAfter = ch.expires
	}
	return nil
}

// sweep drops expired used sessions now (the broker calls it every audit
// interval, so the set shrinks after a burst instead of staying at its peak).
func (c *challenges) sweep() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sweepLocked(c.now())
}

// retryAfter is how long until the used set has room again.
func (c *challenges) retryAfter() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	d := c.sweepAfter.Sub(c.now())
	if d < time.Second {
		d = time.Second
	}
	return d
}

// sweepLocked drops the used sessions that have expired: an expired session
// is refused by its own expiry, so remembering it adds nothing. A sweep is
// O(len(used)); sweepAfter keeps a full set of live sessions from being
// swept on every request.
func (c *challenges) sweepLocked(now time.Time) {
	if now.Before(c.sweepAfter) {
		return
	}
	var earliest time.Time
	for id, u := range c.used {
		exp := time.Unix(0, u.expires)
		if !now.Before(exp) {
			delete(c.used, id)
		} else if earliest.IsZero() || exp.Before(earliest) {
			earliest = exp
		}
	}
	c.sweepAfter = earliest
}

// usedCount is the size of the used set (tests, metrics).
func (c *challenges) usedCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.used)
}

func expired(ch challenge, now time.Time) error {
	return attest.Refuse(attest.CodeNonceExpired, "session expired at %s, %v ago",
		ch.expires.UTC().Format(time.RFC3339Nano), now.Sub(ch.expires).Round(time.Millisecond))
}

func replayed(u usedSession) error {
	return attest.Refuse(attest.CodeNonceReplayed, "session was already used at %s", time.Unix(0, u.used).UTC().Format(time.RFC3339Nano))
}
