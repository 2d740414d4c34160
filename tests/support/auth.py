"""A recording auth_http service (AuthServer over TCP or a UNIX socket) with a scripted answer
per request, and the helpers that build answers (auth_ok, auth_fail, Delay, CLOSE, RESET,
HANG). Errors it meets (a broken respond(), a request it cannot parse, an exception in a
handler thread) land in `errors`; the fixture's teardown fails the test on them."""

import http.server
import os
import re
import socket
import socketserver
import struct
import sys
import threading
import time

from tests.support.common import CLOSE, HANG, RESET

__all__ = ["AuthRequest", "AuthServer", "Delay", "CLOSE", "HANG", "RESET", "auth_ok", "auth_fail"]


class AuthRequest:
    """One request the auth server received."""

    def __init__(self, raw, peer):
        self.raw = raw                       # bytes up to and including the empty line
        self.peer = peer
        self.time = time.monotonic()
        text = raw.decode("latin-1")
        lines = text.split("\r\n") if "\r\n" in text else text.split("\n")
        if lines and lines[-1] == "":
            lines = lines[:-1]
        if lines and lines[-1] == "":
            lines = lines[:-1]
        self.lines = lines                   # str lines without line ends (latin-1 decoded)
        self.request_line = lines[0] if lines else ""
        self.headers = []                    # [(name, value)] in order, value after ': '
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers.append((name, value[1:] if value.startswith(" ") else value))

    def header(self, name, default=None):
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return default

    def header_names(self):
        return [n for n, _ in self.headers]

    def __repr__(self):
        return f"AuthRequest({self.raw!r})"


class Delay:
    """A respond() result: sleep `seconds`, then act on `then` (another respond() result)."""

    def __init__(self, seconds, then=None):
        self.seconds = seconds
        self.then = then


def auth_ok(port, server="127.0.0.1", user=None, password=None, status="OK", extra=()):
    """Header lines of a successful auth_http answer pointing at server:port."""
    lines = [f"Auth-Status: {status}", f"Auth-Server: {server}", f"Auth-Port: {port}"]
    if user is not None:
        lines.append(f"Auth-User: {user}")
    if password is not None:
        lines.append(f"Auth-Pass: {password}")
    return lines + list(extra)


def auth_fail(text, wait=None, extra=()):
    lines = [f"Auth-Status: {text}"]
    if wait is not None:
        lines.append(f"Auth-Wait: {wait}")
    return lines + list(extra)


# what ngx_mail_auth_http_create_request writes first
_REQUEST_LINE = re.compile(r"GET \S+ HTTP/1\.[01]$")


class _AuthHandler(socketserver.StreamRequestHandler):
    timeout = 10

    def setup(self):
        srv = self.server.owner
        if srv.ssl_context is not None:
            self.request.settimeout(self.timeout)
            tls = srv.ssl_context.wrap_socket(self.request, server_side=True,
                                              do_handshake_on_connect=False)
            try:
                tls.do_handshake()
            except OSError as exc:      # a refused client certificate, a client that refused us
                srv.handshake_errors.append(exc)
                tls.close()
                self.request = None
                return
            self.request = tls
        with srv.lock:
            srv.connections += 1
            self.conn_no = srv.connections
        super().setup()

    def handle(self):
        if self.request is None:
            return
        while self._one():
            pass

    def finish(self):
        if self.request is not None:
            super().finish()
            if self.server.owner.ssl_context is not None:
                self.request.close()        # the wrapper: socketserver closes the plain one

    def _one(self):
        """One request and its answer; True when the connection stays open for another
        (an HTTP/1.1 keep-alive request answered with header lines, unless `keepalive` is off)."""
        srv = self.server.owner
        raw = bytearray()
        try:
            while len(raw) < 65536:
                line = self.rfile.readline(65536)
                if not line:
                    break
                raw += line
                if line in (b"\r\n", b"\n"):
                    break
        except OSError:
            pass
        if not raw and srv.requests and getattr(self, "answered", 0):
            return False                    # a kept connection closed by the proxy
        peer = self.client_address
        req = AuthRequest(bytes(raw), peer)
        req.conn = self.conn_no
        with srv.lock:
            srv.requests.append(req)
            srv.cond.notify_all()
        if raw and not _REQUEST_LINE.match(req.request_line):
            srv.errors.append(("unparsable request", bytes(raw)))
        try:
            result = srv.respond(req)
        except Exception as exc:  # a broken test handler: record, answer nothing
            srv.errors.append(exc)
            return False
        self.answered = getattr(self, "answered", 0) + 1
        keep = (srv.keepalive and isinstance(result, list) and req.request_line.endswith("1.1")
                and (req.header("Connection") or "").lower() == "keep-alive")
        if keep:
            body = srv.body
            result = bytes(("HTTP/1.1 200 OK\r\n" + "".join(f"{h}\r\n" for h in result)
                            + "Connection: keep-alive\r\nContent-Length: %d\r\n\r\n"
                            % len(body)).encode("latin-1")) + body
        self._act(result)
        return keep and not srv.close_kept

    def _act(self, result):
        srv = self.server.owner
        while isinstance(result, Delay):
            if srv.stopping.wait(result.seconds):
                return
            result = result.then
        if result is None or result == CLOSE:
            return
        if result == RESET:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if result == HANG:
            self.connection.settimeout(0.2)
            while not srv.stopping.is_set():
                try:
                    if not self.connection.recv(4096):
                        return
                except socket.timeout:
                    continue
                except OSError:
                    return
            return
        if isinstance(result, (bytes, bytearray)):
            data = bytes(result)
        else:
            data = ("HTTP/1.0 200 OK\r\n" + "".join(f"{h}\r\n" for h in result) + "\r\n").encode("latin-1")
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            pass


class _Recording:
    """socketserver's handle_error prints a handler's exception; record it instead."""

    def handle_error(self, request, client_address):
        self.owner.errors.append(sys.exc_info()[1])


class _TCPAuthServer(_Recording, http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):            # skip HTTPServer's getfqdn() (a DNS lookup)
        socketserver.TCPServer.server_bind(self)


class _TCP6AuthServer(_TCPAuthServer):
    address_family = socket.AF_INET6


class _UnixAuthServer(_Recording, socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


class AuthServer:
    """A recording auth_http server (HTTP/1.0 or 1.1 GET in, scripted answer out).

    respond(request) -> one of:
      list of header lines  -> sent after `HTTP/1.0 200 OK`, then an empty line, then close;
                               to an HTTP/1.1 keep-alive request (unless keepalive=False):
                               `HTTP/1.1 200 OK`, Content-Length, `body`, and the connection
                               waits for the next request (request.conn numbers connections);
      bytes                 -> sent raw (broken responses, custom status lines), then close;
      Delay(s, then)        -> sleep first (timeouts), then act on `then`;
      CLOSE / None, RESET, HANG.
    Default: `auth_ok(backend_port)` once `route_to(port)` was called, else Auth-Status failure.
    `requests` holds every AuthRequest in arrival order.
    """

    def __init__(self, respond=None, host="127.0.0.1", unix_path=None, ssl_context=None,
                 keepalive=True, body=b""):
        self.ssl_context = ssl_context      # https: an ssl.SSLContext (server side)
        self.keepalive = keepalive          # answer HTTP/1.1 keep-alive requests in kind
        self.body = body                    # sent after a keep-alive answer's header
        self.close_kept = False             # close after a keep-alive answer (a stale one)
        self.connections = 0                # connections accepted (TLS: handshakes done)
        self.handshake_errors = []
        self.requests = []
        self.errors = []                     # unexpected: the fixture's teardown fails on them
        self.expect_errors = False
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self._respond = respond
        self._route = None
        self.unix_path = unix_path
        if unix_path:
            self.server = _UnixAuthServer(str(unix_path), _AuthHandler)
            self.host, self.port = None, None
        else:
            cls = _TCP6AuthServer if ":" in host else _TCPAuthServer
            self.server = cls((host, 0), _AuthHandler)
            self.host, self.port = host, self.server.server_address[1]
        self.server.owner = self
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def url(self):
        """The auth_http value for the config."""
        if self.unix_path:
            return f"unix:{self.unix_path}:/auth"
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}/auth"

    def route_to(self, port, server="127.0.0.1", **kw):
        """Default answer: OK to server:port."""
        self._route = (port, server, kw)

    def reset(self):
        """Forget the requests, the answer and the route (a module-wide server, next test)."""
        with self.lock:
            self.requests.clear()
        self._respond = self._route = None

    def set_respond(self, respond):
        self._respond = respond

    def respond(self, req):
        if self._respond is not None:
            return self._respond(req)
        if self._route is not None:
            port, server, kw = self._route
            return auth_ok(port, server, **kw)
        return auth_fail("no route configured")

    def wait_requests(self, n, timeout=3.0):
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.requests) >= n, timeout):
                raise AssertionError(f"auth server got {len(self.requests)} requests, expected {n}")
            return list(self.requests)

    def stop(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
