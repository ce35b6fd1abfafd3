package broker

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/cleanwall/cleanwall/attest"
)

// ErrTooManyChallenges is returned when the nonce store is full of live
// challenges.
var ErrTooManyChallenges = errors.New("too many outstanding challenges")

type challenge struct {
	nonce   []byte
	keyID   string
	expires time.Time
}

type tombstone struct {
	expired bool // else used
	when    time.Time
}

// challenges is the bounded store of single-use nonces. Live challenges are
// capped; a used or expired session leaves a tombstone (as many as the cap,
// oldest forgotten first) so that a second use is told apart from a forged
// session.
type challenges struct {
	ttl time.Duration
	max int
	now func() time.Time

	mu        sync.Mutex
	live      map[string]challenge
	dead      map[string]tombstone
	deadOrder []string
}

func newChallenges(ttl time.Duration, max int, now func() time.Time) *challenges {
	return &challenges{ttl: ttl, max: max, now: now, live: map[string]challenge{}, dead: map[string]tombstone{}}
}

// issue makes a challenge for keyID.
func (c *challenges) issue(keyID string) (session string, ch challenge, err error) {
	var id [18]byte
	nonce := make([]byte, attest.NonceSize)
	if _, err := rand.Read(id[:]); err != nil {
		return "", challenge{}, fmt.Errorf("generating session: %w", err)
	}
	if _, err := rand.Read(nonce); err != nil {
		return "", challenge{}, fmt.Errorf("generating nonce: %w", err)
	}
	session = base64.RawURLEncoding.EncodeToString(id[:])
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.live) >= c.max {
		c.sweepLocked(now)
	}
	if len(c.live) >= c.max {
		return "", challenge{}, fmt.Errorf("%w (%d live, each expires %v after issue)", ErrTooManyChallenges, len(c.live), c.ttl)
	}
	ch = challenge{nonce: nonce, keyID: keyID, expires: now.Add(c.ttl)}
	c.live[session] = ch
	return session, ch, nil
}

// take consumes a session: whatever happens next, it cannot be used again.
func (c *challenges) take(session string) (challenge, error) {
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	ch, ok := c.live[session]
	if !ok {
		if t, dead := c.dead[session]; dead {
			if t.expired {
				return challenge{}, attest.Refuse(attest.CodeNonceExpired, "session expired at %s", t.when.UTC().Format(time.RFC3339))
			}
			return challenge{}, attest.Refuse(attest.CodeNonceReplayed, "session was already used at %s", t.when.UTC().Format(time.RFC3339))
		}
		return challenge{}, attest.Refuse(attest.CodeNonceUnknown, "no challenge was issued for this session (or it was forgotten)")
	}
	delete(c.live, session)
	if !now.Before(ch.expires) {
		c.buryLocked(session, tombstone{expired: true, when: ch.expires})
		return challenge{}, attest.Refuse(attest.CodeNonceExpired, "session expired at %s, %v ago", ch.expires.UTC().Format(time.RFC3339), now.Sub(ch.expires).Round(time.Millisecond))
	}
	c.buryLocked(session, tombstone{when: now})
	return ch, nil
}

func (c *challenges) sweepLocked(now time.Time) {
	for s, ch := range c.live {
		if !now.Before(ch.expires) {
			delete(c.live, s)
			c.buryLocked(s, tombstone{expired: true, when: ch.expires})
		}
	}
}

func (c *challenges) buryLocked(session string, t tombstone) {
	if _, ok := c.dead[session]; !ok {
		c.deadOrder = append(c.deadOrder, session)
	}
	c.dead[session] = t
	for len(c.deadOrder) > c.max {
		delete(c.dead, c.deadOrder[0])
		c.deadOrder = c.deadOrder[1:]
	}
}
