"""Connections to the auth service: HTTP/1.1 keep-alive, a bounded idle pool, https.

nginx's ngx_mail_auth_http_module opens one HTTP/1.0 connection per login; with
`auth_http_keepalive = N` (ours, N > 0) the request says HTTP/1.1 and `Connection: keep-alive`,
the answer is read to its end (Content-Length or chunked) and the connection goes back to a
pool of at most N idle ones per auth service in this worker (README "auth_http client").
`auth_http_keepalive = 0` is nginx's exchange: HTTP/1.0, read the header, close.

`Pool.exchange` has the signature of auth_http's exchange step, so auth_http.query drives
it (its Auth-Wait rounds included); handler threads share one Pool (a lock guards the lists).
"""

from __future__ import annotations

import errno as _errno
import os
import selectors
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import auth_http, trace as _trace
from .auth_http import AuthHttpError, MAX_HEADER

__all__ = ['Pool', 'Unreachable', 'frame', 'read_response', 'client_context', 'IDLE_TIMEOUT',
           'MAX_BODY']

IDLE_TIMEOUT = 60.0         # seconds an idle pooled connection is kept
MAX_BODY = 65536            # a longer body is not read: the connection is closed instead


class Unreachable(AuthHttpError):
    """The service refused the connection or did not answer in time, before any byte of an
    answer: another auth_http URL may be tried (auth_client.py)."""


class _Stale(Exception):
    """A pooled connection failed before any byte of the answer: the service closed it."""


# --- request framing ----------------------------------------------------------------------------

def frame(request: bytes, keepalive: bool) -> bytes:
    """nginx's HTTP/1.0 request as sent (keepalive off), or as HTTP/1.1 with keep-alive.

    build_request writes `GET URI HTTP/1.0` then `Host:` first: the version is the request
    line's end, and `Connection: keep-alive` goes after the Host line."""
    if not keepalive:
        return request
    first = request.find(b'\r\n')
    second = request.find(b'\r\n', first + 2)
    if first < 9 or second < 0 or request[first - 9:first] != b' HTTP/1.0':
        return request
    return (request[:first - 3] + b'1.1' + request[first:second + 2]
            + b'Connection: keep-alive\r\n' + request[second + 2:])


# --- response framing ---------------------------------------------------------------------------

def _header_end(buf: bytes) -> int:
    """The offset just past the header block's empty line, or -1 when not yet arrived."""
    pos = 0
    while True:
        lf = buf.find(b'\n', pos)
        if lf < 0:
            return -1
        line = buf[pos:lf]
        pos = lf + 1
        if line in (b'', b'\r'):
            return pos


def _framing(head: bytes) -> Tuple[bool, Optional[int], bool]:
    """(keep-alive allowed, Content-Length or None, chunked) from a response header block."""
    lines = head.split(b'\n')
    status = lines[0].rstrip(b'\r')
    if status[:9] == b'HTTP/1.1 ':
        keep = True
    elif status[:9] == b'HTTP/1.0 ':
        keep = False
    else:
        return False, None, False       # no status line (nginx accepts that): not reused
    length, chunked = None, False
    for line in lines[1:]:
        name, sep, value = line.rstrip(b'\r').partition(b':')
        if not sep:
            continue
        name, value = name.strip().lower(), value.strip().lower()
        if name == b'connection':
            tokens = [t.strip() for t in value.split(b',')]
            if b'close' in tokens:
                keep = False
            elif b'keep-alive' in tokens:
                keep = True
        elif name == b'content-length':
            if not value.isdigit() or (length is not None and int(value) != length):
                return False, None, False
            length = int(value)
        elif name == b'transfer-encoding':
            chunked = value == b'chunked'
            if not chunked:
                return False, None, False
    if chunked:
        length = None
    return keep, length, chunked


def _chunked_end(body: bytes) -> int:
    """The offset just past a complete chunked body (trailers included), -1 when more is to
    come, -2 when it is malformed."""
    pos = 0
    while True:
        lf = body.find(b'\n', pos)
        if lf < 0:
            return -1
        size_text = body[pos:lf].rstrip(b'\r').split(b';', 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return -2
        if size < 0:
            return -2
        pos = lf + 1
        if size == 0:
            end = _header_end(body[pos:])       # trailers, then an empty line
            return -1 if end < 0 else pos + end
        if len(body) < pos + size + 2:
            return -1
        if body[pos + size:pos + size + 2] != b'\r\n':
            return -2
        pos += size + 2


def read_response(recv: Callable[[int], bytes], req: Any, peer: str, keepalive: bool,
                  trace: Optional[Callable[[str, list], Any]] = None
                  ) -> Tuple[auth_http.AuthResult, bool]:
    """Read one answer with `recv(n)` (which raises on errors and time-outs) ->
    (AuthResult, whether the connection may be used again).

    The header is read and judged as nginx does (auth_http's parser on the first 1024 bytes,
    a malformed header reported as soon as seen); with `keepalive` the body is then read by
    Content-Length or chunked, and a body without either (read to close) ends the connection.
    Raises _Stale when the connection was closed before any byte came, AuthHttpError else."""
    buf = b''
    result = None
    while result is None:
        chunk = recv(4096 if keepalive else MAX_HEADER - len(buf))
        if not chunk:
            if not buf:
                raise _Stale()
            raise AuthHttpError(auth_http._premature(peer))
        buf += chunk
        try:
            result = auth_http._parse(buf[:MAX_HEADER], req, peer)
        except auth_http._Incomplete:
            if len(buf) >= MAX_HEADER:
                raise AuthHttpError(auth_http._too_large(peer)) from None
    end = _header_end(buf[:MAX_HEADER])
    if trace is not None:
        trace('response', _trace.auth_response_lines(buf[:end]))
    if not keepalive:
        return result, False
    keep, length, chunked = _framing(buf[:end])
    if not keep or (length is None and not chunked):
        return result, False
    body = buf[end:]
    while True:
        if chunked:
            done = _chunked_end(body)
            if done == -2:
                return result, False
            if done >= 0:
                return result, done == len(body)    # bytes beyond the answer: not ours
        elif len(body) >= length:
            return result, len(body) == length
        if len(body) > MAX_BODY or (length is not None and length > MAX_BODY):
            return result, False
        try:
            chunk = recv(4096)
        except (OSError, AuthHttpError):
            return result, False            # the answer is whole; only the connection is lost
        if not chunk:
            return result, False
        body += chunk


# --- TLS ----------------------------------------------------------------------------------------

class TLSConfigError(Exception):
    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


_ctx_lock = threading.Lock()


def _tls_text(exc: Exception) -> str:
    reason = getattr(exc, 'reason', None)
    return 'SSL: %s' % reason.lower().replace('_', ' ') if reason else str(exc)


def client_context(conf: Any, shared: Optional[Dict[tuple, ssl.SSLContext]] = None
                   ) -> Optional[ssl.SSLContext]:
    """The SSLContext for `https://` auth URLs of server `conf` (None without one), built by
    tls_contexts.prepare at start and reload and kept on conf (`_auth_http_tls`): verified
    against the system's CAs or auth_http_trusted_certificate, the name checked, with the
    optional client certificate. Raises TLSConfigError naming the directive."""
    if not any(u.tls for u in conf.auth_http or ()):
        return None
    if conf._auth_http_tls is not None:
        return conf._auth_http_tls
    settings = (conf.auth_http_trusted_certificate, conf.auth_http_certificate,
                conf.auth_http_certificate_key)
    with _ctx_lock:
        ctx = shared.get(settings) if shared is not None else None
        if ctx is None:
            ctx = _build(*settings)
            if shared is not None:
                shared[settings] = ctx
        conf._auth_http_tls = ctx
    return ctx


def _build(trusted: Optional[str], cert: Optional[str], key: Optional[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)      # CERT_REQUIRED, check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if trusted:
        try:
            ctx.load_verify_locations(cafile=trusted)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError('cannot load "auth_http_trusted_certificate" "%s" (%s)'
                                 % (trusted, _tls_text(exc)),
                                 'auth_http_trusted_certificate') from None
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert or key:
        if not cert:
            raise TLSConfigError('no "auth_http_certificate" is defined for '
                                 '"auth_http_certificate_key" "%s"' % key,
                                 'auth_http_certificate_key')
        if not key:
            raise TLSConfigError('no "auth_http_certificate_key" is defined for '
                                 '"auth_http_certificate" "%s"' % cert, 'auth_http_certificate')
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError('cannot load "auth_http_certificate" "%s" with key "%s" (%s)'
                                 % (cert, key, _tls_text(exc)), 'auth_http_certificate') from None
    return ctx


# --- the pool -----------------------------------------------------------------------------------

def _oserr(e: OSError) -> Tuple[int, str]:
    code = e.errno if e.errno is not None else 0
    return code, '%d: %s' % (code, os.strerror(code) if code else str(e))


def _timed_out(peer: str) -> Unreachable:
    return Unreachable('auth http server %s timed out (%d: %s)'
                       % (peer, _errno.ETIMEDOUT, os.strerror(_errno.ETIMEDOUT)),
                       _errno.ETIMEDOUT)


def _spoke(sock: Any) -> bool:
    """An idle connection the service wrote to (or closed) since its last answer: readable
    now, as urllib3's is_connection_dropped."""
    fileno = getattr(sock, "fileno", None)
    if fileno is None:
        return False                    # nothing to poll (tests/unit's stand-ins)
    if fileno() < 0:
        return True
    with selectors.DefaultSelector() as sel:
        sel.register(fileno(), selectors.EVENT_READ)
        return bool(sel.select(0))


class Pool:
    """This worker's idle auth connections: at most `keepalive` per auth service (its address
    and TLS context), each kept IDLE_TIMEOUT seconds, the most recently used taken first (the
    least likely to have been closed by the service). Thread-safe."""

    def __init__(self, keepalive: int, clock: Callable[[], float] = time.monotonic,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.keepalive = keepalive
        self.clock = clock
        self.idle_timeout = idle_timeout
        self._idle: Dict[tuple, List[Tuple[float, Any]]] = {}
        self._lock = threading.Lock()
        self.opened = 0                 # connections made (tests, bench)

    @staticmethod
    def key(url: Any, ctx: Optional[ssl.SSLContext]) -> tuple:
        return (url.unix, url.sockaddr, id(ctx) if url.tls else None, url.host)

    def take(self, key: tuple) -> Optional[Any]:
        """An idle connection to `key` (None when there is none); expired ones are closed."""
        now = self.clock()
        closing = []
        with self._lock:
            self._sweep(now, closing)
            conns = self._idle.get(key)
            conn = None
            while conns and conn is None:
                conn = conns.pop()[1]
                if _spoke(conn):        # closed, or bytes that answer no request of ours
                    closing.append(conn)
                    conn = None
        for c in closing:
            _close(c)
        return conn

    def give(self, key: tuple, conn: Any) -> None:
        """Put a connection whose answer was read whole back, or close it when the pool of
        its service is full."""
        now = self.clock()
        closing = []
        with self._lock:
            self._sweep(now, closing)
            conns = self._idle.setdefault(key, [])
            if len(conns) < self.keepalive:
                conns.append((now, conn))
                conn = None
        if conn is not None:
            closing.append(conn)
        for c in closing:
            _close(c)

    def _sweep(self, now: float, closing: list) -> None:
        for k in list(self._idle):
            conns = self._idle[k]
            keep = [(t, c) for t, c in conns if now - t < self.idle_timeout]
            if len(keep) != len(conns):
                closing.extend(c for t, c in conns if now - t >= self.idle_timeout)
                self._idle[k] = keep
            if not self._idle[k]:
                del self._idle[k]

    def idle(self, key: Optional[tuple] = None) -> int:
        with self._lock:
            if key is not None:
                return len(self._idle.get(key, ()))
            return sum(len(v) for v in self._idle.values())

    def clear(self) -> None:
        with self._lock:
            conns = [c for v in self._idle.values() for _t, c in v]
            self._idle.clear()
        for c in conns:
            _close(c)

    # -- one exchange (auth_http.query's step) --

    def exchange(self, url: Any, request: bytes, req: Any, peer: str,
                 timeout: Optional[float], trace: Optional[Callable] = None,
                 ctx: Optional[ssl.SSLContext] = None) -> auth_http.AuthResult:
        """Send `request` and read the answer within `timeout` seconds: on an idle pooled
        connection when there is one (if it fails before any byte of the answer, the service
        had closed it: once more on a new connection), else on a new one."""
        if timeout is None:
            timeout = 60.0                      # auth_http_timeout's default
        deadline = time.monotonic() + timeout
        keepalive = self.keepalive > 0
        key = self.key(url, ctx)
        if keepalive:
            sock = self.take(key)
            if sock is not None:
                try:
                    return self._use(sock, key, request, req, peer, deadline, trace)
                except _Stale:
                    pass                        # closed by the service meanwhile
        sock = self._connect(url, peer, deadline, ctx)
        try:
            return self._use(sock, key, request, req, peer, deadline, trace)
        except _Stale:
            raise AuthHttpError(auth_http._premature(peer)) from None

    def _use(self, sock, key, request, req, peer, deadline, trace):
        keepalive = self.keepalive > 0
        reusable = False
        try:
            _settimeout(sock, deadline, peer)
            try:
                sock.sendall(request)
            except (socket.timeout, TimeoutError):
                raise _timed_out(peer) from None
            except OSError as e:
                if e.errno in (_errno.EPIPE, _errno.ECONNRESET):
                    raise _Stale() from None
                code, text = _oserr(e)
                raise AuthHttpError('send() to auth http server %s failed (%s)' % (peer, text),
                                    code) from None

            def recv(n):
                _settimeout(sock, deadline, peer)
                try:
                    return sock.recv(n)
                except (socket.timeout, TimeoutError):
                    raise _timed_out(peer) from None
                except ssl.SSLError as e:
                    if (isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError))
                            and not got[0]):
                        raise _Stale() from None
                    raise AuthHttpError('recv() from auth http server %s failed (%s)'
                                        % (peer, _tls_text(e))) from None
                except OSError as e:
                    if e.errno == _errno.ECONNRESET and not got[0]:
                        raise _Stale() from None
                    code, text = _oserr(e)
                    raise AuthHttpError('recv() from auth http server %s failed (%s)'
                                        % (peer, text), code) from None

            got = [False]

            def counted(n):
                data = recv(n)
                got[0] = got[0] or bool(data)
                return data

            result, reusable = read_response(counted, req, peer, keepalive, trace)
            return result
        finally:
            if reusable:
                self.give(key, sock)
            else:
                _close(sock)

    def _connect(self, url, peer, deadline, ctx):
        if url.unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = url.unix
        else:
            sock = socket.socket(url.family, socket.SOCK_STREAM)
            address = url.sockaddr
        try:
            _settimeout(sock, deadline, peer)
            try:
                sock.connect(address)
            except (socket.timeout, TimeoutError):
                raise _timed_out(peer) from None
            except OSError as e:
                code, text = _oserr(e)
                raise Unreachable('connect() to %s failed (%s)' % (peer, text), code) from None
            if not url.unix:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if url.tls:
                _settimeout(sock, deadline, peer)
                try:
                    sock = ctx.wrap_socket(sock, server_hostname=url.host)
                except (socket.timeout, TimeoutError):
                    raise _timed_out(peer) from None
                except (ssl.SSLError, ssl.CertificateError) as e:
                    raise AuthHttpError('SSL handshake with auth http server %s failed (%s)'
                                        % (peer, _tls_text(e))) from None
                except OSError as e:
                    code, text = _oserr(e)
                    raise AuthHttpError('SSL handshake with auth http server %s failed (%s)'
                                        % (peer, text), code) from None
            self.opened += 1
            return sock
        except BaseException:
            _close(sock)
            raise


def _settimeout(sock: Any, deadline: float, peer: str) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _timed_out(peer)
    sock.settimeout(remaining)


def _close(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass
