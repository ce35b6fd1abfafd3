package api

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// serveUnix runs h on a unix socket in a temporary directory, as cleanwalld
// serves its API, and returns the socket's path.
func serveUnix(t *testing.T, h http.Handler) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "cleanwalld.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return sock
}

// The CNI plugin tells a refusal by the daemon (it rolled back) from a call
// that broke (it must ask for a delete) by errors.As(err, *Error), through
// its own wrapping.
func TestClientErrors(t *testing.T) {
	t.Run("refused", func(t *testing.T) {
		sock := serveUnix(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte(`{"error":"required","field":"policy"}`))
		}))
		_, err := NewClient(sock).Add(context.Background(), AddRequest{ContainerID: "c"})
		var ae *Error
		if !errors.As(fmt.Errorf("cleanwall-cni: %w", err), &ae) || ae.Field != "policy" || ae.Message != "required" {
			t.Fatalf("refusal: %v (%T), want *Error{policy, required}", err, err)
		}
		if errors.Is(err, ErrUnreachable) {
			t.Fatalf("refusal %v is also ErrUnreachable", err)
		}
	})
	t.Run("no socket", func(t *testing.T) {
		err := NewClient(filepath.Join(t.TempDir(), "missing.sock")).Delete(context.Background(), "c", "eth0")
		if !errors.Is(err, ErrUnreachable) || !errors.Is(err, syscall.ENOENT) || errors.As(err, new(*Error)) {
			t.Fatalf("missing socket: %v, want ErrUnreachable wrapping ENOENT, not an *Error", err)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		release := make(chan struct{})
		sock := serveUnix(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}))
		defer close(release)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		_, err := NewClient(sock).Add(ctx, AddRequest{ContainerID: "c"})
		if !errors.Is(err, ErrUnreachable) || !errors.Is(err, context.DeadlineExceeded) || errors.As(err, new(*Error)) {
			t.Fatalf("timed-out call: %v, want ErrUnreachable wrapping context.DeadlineExceeded, not an *Error", err)
		}
	})
}
