package trusted

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/cleanwall/cleanwall/internal/rawsys"
	"github.com/cleanwall/cleanwall/proxies"
)

// Log field names.
const (
	logSandbox = "sandbox"
	logRule    = "rule"
	logDst     = "dst"
	logReason  = "reason"
	logStatus  = "status"
	logError   = "error"
	logFiles   = "files"
)

// maxRequestLine bounds what a refused flow reads of the sandbox to tell
// an HTTP request line.
const maxRequestLine = 8 << 10

// refuseSandbox ends a flow whose remote connection failed before any
// byte was relayed: it reads the sandbox's first bytes until deadline and,
// when they are an HTTP/1.x request line, answers 502 with the reason in
// Cleanwall-Reason and closes; any other sandbox (or none that spoke in
// time) gets a reset, which a client cannot take for an answer. report is
// called, with the status the sandbox gets (0: reset) and the request's
// method and path, before the sandbox sees anything.
func refuseSandbox(c net.Conn, deadline time.Time, reason string, report func(status int, method, path string)) {
	head := readHead(c, deadline)
	method, path, ok := requestLine(head)
	if !ok {
		report(0, "", "")
		reset(c)
		return
	}
	report(http502, method, path)
	_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, _ = io.WriteString(c, "HTTP/1.1 502 Bad Gateway\r\nCleanwall-Reason: "+reason+"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
	closeGracefully(c)
}

const http502 = 502

// readHead reads the sandbox's first bytes: up to the end of the first
// line, maxRequestLine, the sandbox's end or deadline, whichever first.
func readHead(c net.Conn, deadline time.Time) []byte {
	if min := time.Now().Add(10 * time.Millisecond); deadline.Before(min) {
		deadline = min
	}
	_ = c.SetReadDeadline(deadline)
	defer c.SetReadDeadline(time.Time{})
	buf := make([]byte, 0, 1024)
	for len(buf) < maxRequestLine && bytes.IndexByte(buf, '\n') < 0 && mayBeRequestLine(buf) {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := c.Read(buf[len(buf):min(cap(buf), maxRequestLine)])
		buf = buf[:len(buf)+n]
		if err != nil {
			break
		}
	}
	return buf
}

// mayBeRequestLine reports whether head can still grow into a request
// line, so that a sandbox speaking anything else is reset at once.
func mayBeRequestLine(head []byte) bool {
	for i, b := range head {
		switch {
		case b == ' ' && i > 0:
			return i+1 == len(head) || strings.IndexByte("/*h", head[i+1]) >= 0 || bytes.HasPrefix(head, []byte("CONNECT "))
		case (b < 'A' || b > 'Z') && b != '-' && b != '_', i >= 20:
			return false
		}
	}
	return true
}

// requestLine reports whether head starts an HTTP/1.x request: a whole
// line "METHOD SP target SP HTTP/1.x", or, before the line ended, a method
// and a space followed by the start of a request target. It returns the
// method and the path (without the query) for the denial.
func requestLine(head []byte) (method, path string, ok bool) {
	line := head
	whole := false
	if i := bytes.IndexByte(head, '\n'); i >= 0 {
		line, whole = bytes.TrimSuffix(head[:i], []byte("\r")), true
	}
	sp := bytes.IndexByte(line, ' ')
	if sp < 1 || sp > 20 {
		return "", "", false
	}
	for _, b := range line[:sp] {
		if (b < 'A' || b > 'Z') && b != '-' && b != '_' {
			return "", "", false
		}
	}
	method = string(line[:sp])
	rest := line[sp+1:]
	target := rest
	if whole {
		i := bytes.LastIndexByte(rest, ' ')
		if i < 1 {
			return "", "", false
		}
		if v := string(rest[i+1:]); v != "HTTP/1.1" && v != "HTTP/1.0" {
			return "", "", false
		}
		target = rest[:i]
	}
	switch {
	case len(target) == 0 && whole:
		return "", "", false
	case len(target) == 0:
		return method, "", true // "GET " and the target not in yet
	case target[0] != '/' && target[0] != '*' && !bytes.HasPrefix(target, []byte("http")) && method != "CONNECT":
		return "", "", false
	}
	if q := bytes.IndexAny(target, "?#"); q >= 0 {
		target = target[:q]
	}
	return method, truncate(string(target), 256), true
}

// closeGracefully half-closes c, reads what the sandbox still sends for a
// moment (closing a socket with unread bytes resets it, which could
// destroy the answer before the sandbox read it), then closes it.
func closeGracefully(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		_, _ = io.CopyN(io.Discard, c, 256<<10)
	}
	_ = c.Close()
}

// reset closes c abortively (rawsys.Reset): a refused flow never reads as
// an ended one.
func reset(c net.Conn) { rawsys.Reset(c) }

// abortive makes c's close a reset.
func abortive(c net.Conn) { rawsys.Abort(c) }

// denial is the Denial of a refused flow: no payload, the server name the
// rule verifies against, and whether the refused handshake resumed a
// session.
func denial(reason string, status int, method, path, serverName string, resumed bool) proxies.Denial {
	d := proxies.Denial{Reason: reason, Status: status, Method: truncate(method, 16), Path: path, Detail: serverName}
	if resumed {
		d.Detail += " (resumed session)"
	}
	return d
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

func logger(l *slog.Logger) *slog.Logger {
	if l != nil {
		return l
	}
	return slog.Default()
}
