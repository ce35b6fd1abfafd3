package daemon

import (
	"encoding/json"
	"net/http"
	"strings"
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
	subs map[chan api.DenyEvent]string // channel -> sandbox filter ("" = all)
}

func (o *observers) subscribe(filter string) chan api.DenyEvent {
	ch := make(chan api.DenyEvent, observerBuffer)
	o.mu.Lock()
	if o.subs == nil {
		o.subs = map[chan api.DenyEvent]string{}
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

// publish hands an event to every matching observer that has room.
func (o *observers) publish(ev api.DenyEvent) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for ch, filter := range o.subs {
		if filter != "" && ev.Sandbox != filter && !strings.HasPrefix(ev.Sandbox, filter+"/") {
			continue
		}
		select {
		case ch <- ev:
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
	ch := d.observers.subscribe(r.URL.Query().Get("sandbox"))
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
