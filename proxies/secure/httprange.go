package secure

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/proxies/internal/httpwire"
	"github.com/cleanwall/cleanwall/proxies/seal"
)

// rangeSpec is the one byte range a sandbox's GET asked for: first-last,
// first- (last < 0), or the last suffix bytes (first < 0).
type rangeSpec struct{ first, last, suffix int64 }

// singleRange reads a GET's Range field when it asks for one byte range;
// anything else (several ranges, another unit, a malformed field) is not
// a range the proxy maps, and the request goes without it: RFC 9110 lets
// a server ignore Range, and the sandbox then gets the whole object (200).
func singleRange(req *http.Request) (rangeSpec, bool) {
	vs := req.Header.Values("Range")
	if req.Method != http.MethodGet || hasBody(req) || len(vs) != 1 {
		return rangeSpec{}, false
	}
	spec, ok := strings.CutPrefix(strings.TrimSpace(vs[0]), "bytes=")
	if !ok || strings.Contains(spec, ",") {
		return rangeSpec{}, false
	}
	a, b, ok := strings.Cut(strings.TrimSpace(spec), "-")
	if !ok {
		return rangeSpec{}, false
	}
	a, b = strings.TrimSpace(a), strings.TrimSpace(b)
	if a == "" {
		n, ok := decimal(b)
		return rangeSpec{first: -1, suffix: n}, ok && n > 0
	}
	first, ok := decimal(a)
	if !ok {
		return rangeSpec{}, false
	}
	if b == "" {
		return rangeSpec{first: first, last: -1}, true
	}
	last, ok := decimal(b)
	return rangeSpec{first: first, last: last}, ok && last >= first
}

// decimal parses 1 to 18 digits.
func decimal(s string) (int64, bool) {
	if s == "" || len(s) > 18 {
		return 0, false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
}

// resolve is the range in an object of total bytes: its offset and
// length, or false when it is not satisfiable (416).
func (r rangeSpec) resolve(total int64) (off, length int64, ok bool) {
	switch {
	case r.first < 0:
		if total == 0 {
			return 0, 0, false
		}
		n := min(r.suffix, total)
		return total - n, n, true
	case r.first >= total:
		return 0, 0, false
	case r.last < 0 || r.last >= total:
		return r.first, total - r.first, true
	}
	return r.first, r.last - r.first + 1, true
}

// contentRange parses a Content-Range field "bytes first-last/total" with
// a known total.
func contentRange(v string) (first, last, total int64, ok bool) {
	spec, ok := strings.CutPrefix(v, "bytes ")
	if !ok {
		return 0, 0, 0, false
	}
	span, t, ok := strings.Cut(spec, "/")
	if !ok {
		return 0, 0, 0, false
	}
	a, b, ok := strings.Cut(span, "-")
	if !ok {
		return 0, 0, 0, false
	}
	var ok1, ok2, ok3 bool
	first, ok1 = decimal(a)
	last, ok2 = decimal(b)
	total, ok3 = decimal(t)
	return first, last, total, ok1 && ok2 && ok3 && first <= last && last < total
}

// ranged serves a GET of one plaintext range by mapping it to the sealed
// object's segments (docs/sealing.md, "Sizes and ranges"): a first request
// asks the remote for the object's first seal.MaxHeaderSize bytes, which
// hold its header (segment size, key, context) and whose Content-Range
// gives the sealed size, hence the plaintext size; a second asks for the
// frames that hold the range (with If-Match on the first response's ETag,
// so that both come from one object), and the opener, given the header
// and those frames, checks that they are exactly the object's segments
// first to last and yields the range. An object small enough to come
// whole with the first answer needs no second request.
//
// The sandbox gets 206 with the plaintext Content-Range, or 416 with
// "bytes */N" (N the plaintext size) for a range past the end. A remote
// that ignores the range (200) or refuses the request is answered as for
// any GET; an interactive object, whose offsets do not map, is fetched
// whole and answered 200.
func (h *httpFlow) ranged(req *http.Request, key proxies.DataKey, rs rangeSpec) (bool, error) {
	resp, rf := h.roundTrip(req, key, "bytes=0-"+strconv.Itoa(seal.MaxHeaderSize-1), "")
	if rf != nil {
		return h.failed(req, rf)
	}
	if resp.StatusCode != http.StatusPartialContent {
		return h.relay(req, resp, false)
	}
	first, _, total, ok := contentRange(resp.Header.Get("Content-Range"))
	if !ok || first != 0 {
		return h.failed(req, refuseFor(http.StatusBadGateway, reasonBadUpstreamResponse, false, fmt.Errorf("the Content-Range %q for bytes 0-", truncate(resp.Header.Get("Content-Range"), 64))))
	}
	start, err := io.ReadAll(io.LimitReader(resp.Body, seal.MaxHeaderSize+1))
	if err != nil || len(start) > seal.MaxHeaderSize {
		if err == nil {
			err = errors.New("more bytes than the range asked for")
		}
		return h.failed(req, refuseFor(http.StatusBadGateway, reasonBadUpstreamResponse, false, err))
	}
	if resp.Close {
		h.closeUpstream()
	}
	hd, size, err := seal.ParseHeader(start)
	switch {
	case errors.Is(err, seal.ErrNotSealed):
		return h.failed(req, refuseFor(http.StatusBadGateway, ReasonUnsealedBody, true, err))
	case err != nil:
		return h.failed(req, refuseFor(http.StatusBadGateway, ReasonSealOpenFailed, true, err))
	}
	if err := h.acceptBody(hd); err != nil {
		return h.failed(req, refuseFor(http.StatusBadGateway, ReasonSealOpenFailed, true, err))
	}
	if hd.Interactive {
		resp, rf := h.roundTrip(req, key, "", "")
		if rf != nil {
			return h.failed(req, rf)
		}
		return h.relay(req, resp, false)
	}
	layout := hd.Layout()
	n, err := layout.PlaintextSize(total)
	if err != nil {
		return h.failed(req, refuseFor(http.StatusBadGateway, ReasonSealOpenFailed, true, err))
	}
	off, length, ok := rs.resolve(n)
	var span seal.Span
	if ok {
		span, err = layout.Range(off, length, n)
		ok = err == nil
	}
	if !ok {
		fields := http.Header{"Content-Range": {"bytes */" + strconv.FormatInt(n, 10)}}
		h.writeHead(http.StatusRequestedRangeNotSatisfiable, fields, 0, !req.Close)
		return h.end(!req.Close, !resp.Close)
	}
	fields := resp.Header.Clone()
	var frames io.Reader
	if int64(len(start)) == total {
		// The whole object came with the header.
		frames = bytes.NewReader(start[span.Start:span.End])
	} else {
		ifMatch := ""
		if etag := resp.Header.Get("ETag"); etag != "" && req.Header.Get("If-Match") == "" {
			ifMatch = etag
		}
		resp, rf = h.roundTrip(req, key, fmt.Sprintf("bytes=%d-%d", span.Start, span.End-1), ifMatch)
		if rf != nil {
			return h.failed(req, rf)
		}
		a, b, t, ok := contentRange(resp.Header.Get("Content-Range"))
		if resp.StatusCode != http.StatusPartialContent || !ok || a != span.Start || b != span.End-1 || t != total {
			return h.failed(req, refuseFor(http.StatusBadGateway, reasonBadUpstreamResponse, false,
				fmt.Errorf("asked for sealed bytes %d-%d/%d, got %d with Content-Range %q", span.Start, span.End-1, total, resp.StatusCode, truncate(resp.Header.Get("Content-Range"), 64))))
		}
		fields = resp.Header.Clone()
		frames = resp.Body
	}
	httpwire.DropFields(fields, dropResponse)
	fields.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", off, off+length-1, n))
	o := seal.NewOpener(io.MultiReader(bytes.NewReader(start[:size]), frames), h.cfg.keyFunc(h.f),
		seal.WithAccept(h.acceptBody), seal.WithRange(span))
	return h.deliver(req, resp, o, fields, length)
}
