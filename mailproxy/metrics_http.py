"""`metrics_listen`: the tiny HTTP server of `GET /metrics` (metrics.py renders the answer).

The master binds the socket (`prepare`, at start and reload: kept while the address stays,
as a listen socket; a new one takes over at `commit`, when the reload succeeded) and makes the shared area before it forks; every worker accepts on the
socket in one thread of its own (`start`) and answers from the shared area, so whichever
worker answers gives the instance's sums.  Only `GET`/`HEAD /metrics` is served: another path
is 404, another method 405, anything unparsable 400; a request is read within REQUEST_LIMIT
bytes and READ_TIMEOUT seconds, and at most MAX_CLIENTS are answered at once per worker.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING, Optional, Tuple

from . import metrics
from .listeners import ListenError
from .log import addr_text

if TYPE_CHECKING:
    from .config.types import MainConf
    from .runtime import Runtime

REQUEST_LIMIT = 8192
READ_TIMEOUT = 5.0
MAX_CLIENTS = 4
POLL = 1.0                  # seconds between looks at shutting_down and the thread count

_sock: Optional[socket.socket] = None
_addr: Optional[Tuple[str, int]] = None
_next: Optional[Tuple[Optional[socket.socket], Optional[Tuple[str, int]]]] = None


def prepare(main: MainConf) -> None:
    """Master, at start and on reload, before forking: bind the socket of
    `main.metrics_listen` when the address changed, kept aside until `commit` (the start or
    reload goes on) or `abandon` (it failed: the address in use stays).  Raises ListenError
    (start: fatal; reload: the old configuration stays)."""
    global _next
    abandon()
    if main.metrics_listen != _addr:
        addr = main.metrics_listen
        _next = (_bind(addr) if addr is not None else None, addr)


def commit() -> None:
    """The configuration `prepare` saw is in use: its socket replaces the old one (old
    workers keep their copy until they end); the area is made when metrics are on."""
    global _sock, _addr, _next
    if _next is not None:
        if _sock is not None:
            _sock.close()
        (_sock, _addr), _next = _next, None
    if _addr is not None:
        metrics.setup()


def abandon() -> None:
    """The reload failed: a socket `prepare` bound for it is closed."""
    global _next
    if _next is not None and _next[0] is not None:
        _next[0].close()
    _next = None


def _bind(addr: Tuple[str, int]) -> socket.socket:
    host, port = addr
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise ListenError("bind() to %s failed (%d: %s) for metrics_listen"
                          % (addr_text(host, port), e.errno or 0, e.strerror)) from None
    sock.setblocking(False)     # shared with other workers: never block in accept()
    return sock


def start(runtime: Runtime) -> None:
    """Worker, once at start: write the slot the master gave it and, when metrics_listen is
    set, answer scrapes in a thread of its own until the worker shuts down."""
    metrics.attach()
    if _sock is not None:
        threading.Thread(target=_serve, args=(_sock, runtime), name="metrics",
                         daemon=True).start()


def _serve(sock: socket.socket, runtime: Runtime) -> None:
    clients = threading.BoundedSemaphore(MAX_CLIENTS)
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        while not runtime.shutting_down.is_set():
            metrics.threads_now()
            if not sel.select(POLL):
                continue
            try:
                conn, _peer = sock.accept()
            except OSError:             # another worker took it (EAGAIN), or it failed
                continue
            if not clients.acquire(blocking=False):
                conn.close()            # busy: a scraper retries at its next interval
                continue
            threading.Thread(target=_answer, args=(conn, clients), daemon=True).start()
    sock.close()                        # this worker's copy: others go on accepting


def _answer(conn: socket.socket, clients: threading.BoundedSemaphore) -> None:
    try:
        request = _read_request(conn)
        conn.settimeout(READ_TIMEOUT)       # sendall: a bound on the whole answer
        if request is not None:
            conn.sendall(respond(request))
    except OSError:
        pass
    finally:
        clients.release()
        conn.close()


def _read_request(conn: socket.socket) -> Optional[bytes]:
    """The request head (up to the blank line), or what came before the limit, EOF or
    READ_TIMEOUT from now (for the whole head, not each recv); None when nothing came."""
    data = b""
    deadline = time.monotonic() + READ_TIMEOUT
    while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < REQUEST_LIMIT:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        conn.settimeout(left)
        try:
            chunk = conn.recv(REQUEST_LIMIT - len(data))
        except socket.timeout:
            break
        if not chunk:
            break
        data += chunk
    return data or None


def respond(request: bytes) -> bytes:
    """The whole HTTP response to a request head."""
    head, sep, _rest = request.replace(b"\r\n", b"\n").partition(b"\n\n")
    lines = head.split(b"\n")
    parts = lines[0].split(b" ")
    if not sep or len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _reply(400, "Bad Request")
    method, target = parts[0], parts[1]
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            return _reply(400, "Bad Request")
        headers[name.lower()] = value.strip().decode("latin-1")
    if target.split(b"?")[0] != b"/metrics":
        return _reply(404, "Not Found")
    if method not in (b"GET", b"HEAD"):
        return _reply(405, "Method Not Allowed", extra="Allow: GET, HEAD\r\n")
    om = metrics.wants_openmetrics(headers.get(b"accept", ""))
    body = metrics.render_area(om).encode("utf-8")
    ctype = metrics.OPENMETRICS_TYPE if om else metrics.TEXT_TYPE
    return _reply(200, "OK", body, ctype, head_only=method == b"HEAD")


def _reply(code: int, reason: str, body: Optional[bytes] = None,
           ctype: str = "text/plain; charset=utf-8", extra: str = "",
           head_only: bool = False) -> bytes:
    if body is None:
        body = ("%d %s\n" % (code, reason)).encode("ascii")
    head = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s"
            "Connection: close\r\n\r\n" % (code, reason, ctype, len(body), extra))
    return head.encode("ascii") + (b"" if head_only else body)
