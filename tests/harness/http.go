package harness

import (
	"io"
	"net"
	"net/http"
	"sync"
	"time"
)

// HTTPServer is a real net/http server in the remote namespace that records
// every request it received (method, path, host, body).
type HTTPServer struct {
	Addr string
	mu   sync.Mutex
	reqs []RecordedRequest
}

// RecordedRequest is one request the server received.
type RecordedRequest struct {
	Method, Path, Host string
	Header             http.Header
	Body               []byte // the first MiB
	BodyLen            int64  // every byte received
	From               string
}

// HTTPServer starts a recording server on addr in the remote namespace.
// Handlers answer "ok <path>"; handler, when set, answers instead.
func (e *Env) HTTPServer(addr string, handler http.HandlerFunc) *HTTPServer {
	e.T.Helper()
	var l net.Listener
	if err := e.InRemote(func() (err error) {
		l, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		e.T.Fatal(err)
	}
	s := &HTTPServer{Addr: l.Addr().String()}
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		rest, _ := io.Copy(io.Discard, r.Body)
		s.mu.Lock()
		s.reqs = append(s.reqs, RecordedRequest{Method: r.Method, Path: r.URL.RequestURI(), Host: r.Host, Header: r.Header.Clone(),
			Body: body, BodyLen: int64(len(body)) + rest, From: r.RemoteAddr})
		s.mu.Unlock()
		if handler != nil {
			handler(w, r)
			return
		}
		_, _ = io.WriteString(w, "ok "+r.URL.Path+"\n")
	})}
	go func() { _ = srv.Serve(l) }()
	e.onCleanup(func() { srv.Close() })
	return s
}

// Requests returns the requests received so far.
func (s *HTTPServer) Requests() []RecordedRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]RecordedRequest(nil), s.reqs...)
}
