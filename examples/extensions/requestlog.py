#!/usr/bin/python3
"""requestlog: a cleanwall extension that logs HTTP request lines.

It takes every flow cleanwalld hands it, logs the request line of each HTTP/1.x
request the sandbox sends (the flow's bytes are relayed unchanged, HTTP or not),
forwards the flow to its original destination with a plain connect from the
node, and reports the bytes and the end of each flow.

    requestlog.py [--max-flows N] SOCKET [LOGFILE]

SOCKET is the unix socket to listen on (cleanwalld --extension NAME=unix:SOCKET);
request lines go to LOGFILE, or to standard output. The wire protocol is
docs/extensions.md. Standard library only; Python 3.9 or newer (socket.recv_fds).
"""

import argparse
import json
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time

VERSION = 1
MAX_MESSAGE = 16384      # every message, both directions (docs/extensions.md)
MAX_LINE = 8192          # longest request, header or chunk-size line parsed
REPORT_EVERY = 1 << 20   # report bytes at least every MiB of a direction
CONNECT_TIMEOUT = 10     # seconds to connect to the destination
BUFFER = 64 << 10


class ProtocolError(Exception):
    """The firewall sent something this version of the protocol does not allow."""


class Log:
    """Writes whole lines, one writer at a time, flushed at once."""

    def __init__(self, path):
        self.out = open(path, "a", buffering=1) if path else sys.stdout
        self.lock = threading.Lock()

    def line(self, text):
        with self.lock:
            self.out.write(text + "\n")
            self.out.flush()


class RequestLines:
    """Finds the request lines in the bytes a sandbox sends over HTTP/1.x.

    It follows each request's framing (Content-Length, chunked) to know where
    the next request starts; a stream that is not HTTP/1.x, or a line over
    MAX_LINE, stops the parsing for the rest of the flow (the bytes are still
    forwarded).
    """

    def __init__(self, emit):
        self.emit = emit
        self.buf = b""
        self.state = "request-line"
        self.remaining = 0
        self.length = 0
        self.chunked = False

    def feed(self, data):
        if self.state == "opaque":
            return
        self.buf += data
        while self.buf and self.state != "opaque" and self.step():
            pass

    def line(self):
        i = self.buf.find(b"\n")
        if i < 0:
            if len(self.buf) > MAX_LINE:
                self.state, self.buf = "opaque", b""
            return None
        line, self.buf = self.buf[:i], self.buf[i + 1:]
        return line[:-1] if line.endswith(b"\r") else line

    def step(self):
        """Parses what it can of self.buf; False when it needs more bytes."""
        if self.state in ("body", "chunk-data"):
            n = min(self.remaining, len(self.buf))
            self.buf, self.remaining = self.buf[n:], self.remaining - n
            if self.remaining:
                return False
            self.state = "request-line" if self.state == "body" else "chunk-size"
            return True
        line = self.line()
        if line is None:
            return False
        if self.state == "request-line":
            if not line:
                return True  # empty lines between requests are allowed
            parts = line.split(b" ")
            if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith(b"HTTP/1."):
                self.state, self.buf = "opaque", b""
                return False
            self.emit(line.decode("ascii", "backslashreplace"))
            self.state, self.length, self.chunked = "headers", 0, False
        elif self.state == "headers":
            if line:
                name, _, value = line.partition(b":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == b"content-length" and value.isdigit():
                    self.length = int(value)
                elif name == b"transfer-encoding":
                    self.chunked = value.split(b",")[-1].strip() == b"chunked"
            elif self.chunked:
                self.state = "chunk-size"
            elif self.length:
                self.state, self.remaining = "body", self.length
            else:
                self.state = "request-line"
        elif self.state == "chunk-size":
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.state, self.buf = "opaque", b""
                return False
            if size == 0:
                self.state = "trailers"
            else:
                self.state, self.remaining = "chunk-data", size + 2  # data and its CRLF
        elif self.state == "trailers":
            if not line:
                self.state = "request-line"
        return True


class Flow:
    """One flow: the sandbox's socket, relayed to the original destination."""

    def __init__(self, control, meta, sandbox):
        self.control = control
        self.id = meta["id"]
        self.meta = meta
        self.sandbox = sandbox
        self.upstream = None
        self.lock = threading.Lock()
        self.aborted = False
        self.error = None

    def describe(self):
        m = self.meta
        hosts = ",".join(m.get("hosts") or []) or "-"
        return "flow=%d sandbox=%s rule=%s src=%s dst=%s hosts=%s" % (
            self.id, m["sandbox"], m["rule"], addr(m["src"]), addr(m["dst"]), hosts)

    def run(self):
        dst = self.meta["dst"]
        try:
            up = socket.create_connection((dst["ip"], dst["port"]), timeout=CONNECT_TIMEOUT)
            up.settimeout(None)
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            self.fail("connect %s: %s" % (addr(dst), e.strerror or e))
            self.finish()
            return
        with self.lock:
            self.upstream = up
            aborted = self.aborted
        if aborted:  # closed by the firewall while connecting
            self.abort()
            self.finish()
            return
        lines = RequestLines(lambda line: self.control.log.line(
            "%s %s %s" % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), self.describe(), json.dumps(line))))
        back = threading.Thread(target=self.pump, args=(up, self.sandbox, "in", None), daemon=True)
        back.start()
        self.pump(self.sandbox, up, "out", lines)
        back.join()
        self.finish()

    def pump(self, src, dst, direction, lines):
        """Copies src to dst until EOF, then half-closes dst."""
        unreported = 0
        try:
            while True:
                data = src.recv(BUFFER)
                if not data:
                    dst.shutdown(socket.SHUT_WR)  # half-close: the other direction goes on
                    break
                if lines:
                    lines.feed(data)
                dst.sendall(data)
                unreported += len(data)
                if unreported >= REPORT_EVERY:
                    self.report(direction, unreported)
                    unreported = 0
        except OSError as e:
            if not self.aborted:
                self.fail("%s: %s" % (direction, e.strerror or e))
        finally:
            self.report(direction, unreported)

    def report(self, direction, n):
        if n:
            self.control.send({"type": "bytes", "id": self.id,
                               "out": n if direction == "out" else 0,
                               "in": n if direction == "in" else 0})

    def fail(self, why):
        with self.lock:
            if self.error is None:
                self.error = why
        self.abort()

    def abort(self):
        """Resets both connections: SO_LINGER 0 makes the close send a RST, and
        shutdown wakes the pump threads blocked on them."""
        with self.lock:
            self.aborted = True
            socks = [s for s in (self.sandbox, self.upstream) if s is not None]
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def finish(self):
        """Closes both sockets (the extension owns them) and reports the end."""
        for s in (self.sandbox, self.upstream):
            if s is not None:
                s.close()
        self.control.done(self)
        if self.error is None:
            self.control.send({"type": "end", "id": self.id, "result": "closed"})
        else:
            self.control.send({"type": "end", "id": self.id, "result": "error", "error": self.error[:256]})


def addr(ep):
    ip = ep["ip"]
    return ("[%s]:%d" if ":" in ip else "%s:%d") % (ip, ep["port"])


class Control:
    """One control connection from cleanwalld, and the flows it handed over."""

    def __init__(self, sock, log, max_flows):
        self.sock = sock
        self.log = log
        self.max_flows = max_flows
        self.send_lock = threading.Lock()
        self.lock = threading.Lock()
        self.flows = {}

    def send(self, msg):
        data = json.dumps(msg, separators=(",", ":")).encode()
        with self.send_lock:
            try:
                self.sock.send(data)  # SOCK_SEQPACKET: one message, whole
            except OSError:
                pass  # the connection is gone; serve() ends and closes the flows

    def done(self, flow):
        with self.lock:
            self.flows.pop(flow.id, None)

    def serve(self):
        try:
            if not self.hello():
                return  # closed before hello: a probe, or a firewall going away
            while True:
                data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 1, socket.MSG_CMSG_CLOEXEC)
                if not data:
                    for fd in fds:
                        os.close(fd)
                    return  # cleanwalld closed the connection
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    for fd in fds:
                        os.close(fd)
                    raise ProtocolError("message over %d bytes or too many descriptors" % MAX_MESSAGE)
                msg = json.loads(data)
                kind = msg.get("type")
                if kind == "flow":
                    if len(fds) != 1:
                        for fd in fds:
                            os.close(fd)
                        raise ProtocolError("flow without exactly one descriptor")
                    self.flow(msg, fds[0])
                    continue
                for fd in fds:
                    os.close(fd)
                if kind == "close":
                    with self.lock:
                        flow = self.flows.get(msg["id"])
                    if flow:
                        flow.abort()
                else:
                    raise ProtocolError("unknown message type %r" % kind)
        except (OSError, ValueError, KeyError, ProtocolError) as e:
            print("requestlog: control connection: %s" % e, file=sys.stderr, flush=True)
        finally:
            # Flows live only as long as the connection that handed them over:
            # the firewall can no longer follow or revoke them.
            with self.lock:
                flows = list(self.flows.values())
            for flow in flows:
                flow.abort()
            self.sock.close()

    def hello(self):
        data = self.sock.recv(MAX_MESSAGE)
        if not data:
            return False
        msg = json.loads(data)
        if msg.get("type") != "hello" or not isinstance(msg.get("version"), int):
            raise ProtocolError("expected hello, got %r" % msg.get("type"))
        if msg["version"] < VERSION:
            raise ProtocolError("firewall speaks version %d only" % msg["version"])
        self.send({"type": "hello", "version": VERSION, "reports_end": True})
        return True

    def flow(self, meta, fd):
        sandbox = socket.socket(fileno=fd)
        sandbox.setblocking(True)  # the descriptor arrives non-blocking
        if meta.get("version") != VERSION:
            sandbox.close()
            raise ProtocolError("flow of version %r" % meta.get("version"))
        with self.lock:
            busy = len(self.flows) >= self.max_flows
            if not busy:
                flow = Flow(self, meta, sandbox)
                self.flows[flow.id] = flow
        if busy:
            # Refused: close our copy; the firewall resets the connection.
            sandbox.close()
            self.send({"type": "refuse", "id": meta["id"], "reason": "busy"})
            return
        # Accept before anything else about the flow is sent.
        self.send({"type": "accept", "id": flow.id})
        threading.Thread(target=flow.run, daemon=True).start()


def listen(path):
    """Listens on path, replacing a socket that nothing answers on any more."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(path)
                sys.exit("requestlog: another extension listens on %s" % path)
            except OSError:
                os.unlink(path)  # left by a process that died
            finally:
                probe.close()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o077)  # only the firewall's user may connect
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def main():
    ap = argparse.ArgumentParser(description="cleanwall extension: log HTTP request lines, forward every flow")
    ap.add_argument("--max-flows", type=int, default=512, help="refuse flows (reason busy) above this many")
    ap.add_argument("socket", help="unix socket to listen on")
    ap.add_argument("logfile", nargs="?", help="where request lines go (default: standard output)")
    args = ap.parse_args()

    log = Log(args.logfile)
    sock = listen(args.socket)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("requestlog: listening on %s" % args.socket, file=sys.stderr, flush=True)
    try:
        while True:
            conn, _ = sock.accept()
            control = Control(conn, log, args.max_flows)
            threading.Thread(target=control.serve, daemon=True).start()
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        try:
            os.unlink(args.socket)
        except OSError:
            pass


if __name__ == "__main__":
    main()
