package httpproxy

import (
	"hash/crc32"
	"io"
	"net/http"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// TestLargeUploadStreamsWithFlatMemory uploads 1 GiB (256 MiB with -short)
// through the proxy and checks that every byte arrived and that the heap
// did not grow with the body: a Content-Length body under a rule without
// deny patterns is streamed, never held.
func TestLargeUploadStreamsWithFlatMemory(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		size := int64(1 << 30)
		if testing.Short() {
			size = 256 << 20
		}
		rules := &Rules{
			Rules:        []RequestRule{{Methods: []string{"PUT"}, Paths: []string{"/v1/upload/**"}, ContentTypes: []string{"application/octet-stream"}}},
			MaxBodyBytes: NoBodyLimit,
		}
		h := newHarness(t, rules, mode)
		h.up.rawCap = 64 << 10 // the recorder must not grow with the body either
		cl := h.client()

		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		base := ms.HeapInuse
		var peak atomic.Uint64
		stop := make(chan struct{})
		sampled := make(chan struct{})
		go func() {
			defer close(sampled)
			var ms runtime.MemStats
			for {
				runtime.ReadMemStats(&ms)
				if ms.HeapInuse > peak.Load() {
					peak.Store(ms.HeapInuse)
				}
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Millisecond):
				}
			}
		}()

		sum := crc32.NewIEEE()
		body := io.TeeReader(io.LimitReader(newPattern(1), size), sum)
		req, err := http.NewRequest(http.MethodPut, h.url("/v1/upload/big.bin"), body)
		if err != nil {
			t.Fatal(err)
		}
		req.ContentLength = size
		req.Header.Set("Content-Type", "application/octet-stream")
		start := time.Now()
		resp, err := cl.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		elapsed := time.Since(start)
		close(stop)
		<-sampled

		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d", resp.StatusCode)
		}
		reqs := h.up.requests()
		if len(reqs) != 1 || reqs[0].BodyLen != size || reqs[0].BodyCRC != sum.Sum32() {
			t.Fatalf("upstream got %+v, want %d bytes with CRC %08x", reqs, size, sum.Sum32())
		}
		growth := int64(peak.Load()) - int64(base)
		t.Logf("%d MiB in %v (%.0f MiB/s); heap in use grew by at most %.2f MiB", size>>20, elapsed.Round(time.Millisecond), float64(size>>20)/elapsed.Seconds(), float64(growth)/(1<<20))
		if growth > 4<<20 {
			t.Fatalf("heap in use grew by %d bytes while streaming; want under 4 MiB", growth)
		}
	})
}
