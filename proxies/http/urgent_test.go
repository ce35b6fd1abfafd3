package httpproxy

import (
	"bufio"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestUrgentDataDoesNotStall: a TCP read stops at the urgent mark with
// bytes still queued behind it, so a short read does not always mean the
// socket is empty. A request queued behind urgent data is still served.
func TestUrgentDataDoesNotStall(t *testing.T) {
	eachIO(t, func(t *testing.T, mode harnessOption) {
		rules := &Rules{Rules: []RequestRule{{Methods: []string{"GET"}, Paths: []string{"/v1/**"}}}}
		h := newHarness(t, rules, mode)
		c, err := net.Dial("tcp", h.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		get := func(path string) string { return h.raw("GET " + path + " HTTP/1.1\r\nHost: {host}\r\n\r\n") }
		rc, err := c.(*net.TCPConn).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(c)
		if _, err := io.WriteString(c, get("/v1/0")); err != nil {
			t.Fatal(err)
		}
		if resp, _ := readResponseT(t, br, "GET"); resp.StatusCode != 200 {
			t.Fatalf("first request: %d", resp.StatusCode)
		}
		var serr error
		if err := rc.Control(func(fd uintptr) {
			// Request 1 and a urgent byte, then request 2 behind the mark,
			// before the proxy reads: its read returns request 1 alone.
			if serr = syscall.Sendto(int(fd), []byte(get("/v1/1")+"!"), syscall.MSG_OOB, nil); serr != nil {
				return
			}
			_, serr = syscall.Write(int(fd), []byte(get("/v1/2")))
		}); err != nil || serr != nil {
			t.Fatal(err, serr)
		}
		for _, uri := range []string{"/v1/1", "/v1/2"} {
			resp, body := readResponseT(t, br, "GET")
			if resp.StatusCode != 200 || !strings.Contains(string(body), strconv.Quote(uri)) {
				t.Fatalf("response for %s: %d %s", uri, resp.StatusCode, body)
			}
		}
	})
}
