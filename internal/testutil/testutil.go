// Package testutil holds helpers shared by tests in every room: the
// privileged-test gate and log routing. It must not import product packages.
package testutil

import (
	"io"
	"log/slog"
	"os"
	"testing"
)

// InCI reports whether the test runs under CI (CI=true). Under CI a
// privileged test must never skip: a skip there is turned into a failure.
func InCI() bool { return os.Getenv("CI") == "true" }

// Skip skips the test with reason, or fails it under CI, where nothing may
// silently stop running.
func Skip(t testing.TB, reason string) {
	t.Helper()
	if InCI() {
		t.Fatalf("CI=true forbids skipping: %s", reason)
	}
	t.Skip(reason)
}

// RequireRoot skips (or fails under CI) unless the test runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skip(t, "needs root (run with sudo make test)")
	}
}

// Logger returns a slog.Logger that writes to t.Log, so daemon and proxy logs
// show up next to the test that produced them.
func Logger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p[:len(p)-min(len(p), 1)]))
	return len(p), nil
}

var _ io.Writer = testWriter{}
