package daemon

import (
	"encoding/json"
	"net/http"
	"sync"
	"time"

	"github.com/cleanwall/cleanwall/runtime/api"
)

// observerBuffer is how many events a slow observer may lag behind before
// it loses events (the daemon never waits for an observer).
const observerBuffer = 1024

// observers fans deny events out to `cleanwall observe` streams.
type observers struct {
	mu   sync.Mutex
	subs map[chan api.DenyEvent]api.EventFilter
}

func (o *observers) subscribe(filter api.EventFilter) chan api.DenyEvent {
	ch := make(chan api.DenyEvent, observerBuffer)
	o.mu.Lock()
	if o.subs == nil {
		o.subs = map[chan api.DenyEvent]api.EventFilter{}
	}
	o.subs[ch] = filter
	o.mu.Unlock()
	return ch
}

func (o *observers) unsubscribe(ch chan api.DenyEvent) {
	o.mu.Lock()
	delete(o.subs, ch)
	o.mu.Unlock()
}

// publish hands an event to every observer whose filter it passes and
// that has room; the sampled headers only to those that asked for them.
func (o *observers) publish(ev api.DenyEvent) {
	o.mu.Lock()
	defer o.mu.Unlock()
	bare := ev
	bare.Header, bare.Link = nil, ""
	for ch, filter := range o.subs {
		if !filter.Match(ev) {
			continue
		}
		out := bare
		if filter.Headers {
			out = ev
		}
		select {
		case ch <- out:
		default: // too slow: this observer loses the event
		}
	}
}

func (o *observers) active() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.subs) > 0
}

// handleEvents streams deny events as JSON lines until the client leaves.
func (d *Daemon) handleEvents(w http.ResponseWriter, r *http.Request) {
	filter, err := api.ParseEventFilter(r.URL.Query())
	if err != nil {
		writeError(w, err)
		return
	}
	ch := d.observers.subscribe(filter)
	defer d.observers.unsubscribe(ch)
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	fl, _ := w.(http.Flusher)
	if fl != nil {
		fl.Flush()
	}
	enc := json.NewEncoder(w)
	for {
		select {
		case <-r.Context().Done():
			return
		case <-d.ctx.Done():
			return
		case ev := <-ch:
			if err := enc.Encode(ev); err != nil {
				return
			}
			if fl != nil {
				fl.Flush()
			}
		}
	}
}

func now() time.Time { return time.Now().UTC() }
