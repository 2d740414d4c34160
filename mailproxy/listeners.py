"""Binding `listen` addresses: one ThreadingTCPServer per bound address.

The master process binds (`bind_all`, which on reload keeps the sockets already bound); each
worker calls `Listener.start(runtime)` to run `serve_forever()` in a thread of its own. A
wildcard `*:port` and specific addresses of the same family on that port are served by the
wildcard socket alone; the server of each connection is then chosen by the connection's local
address (getsockname()), as nginx does.
"""

from __future__ import annotations

import errno as _errno
import ipaddress
import socket
import socketserver
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Tuple

from . import ktimeout, limits, metrics, realip
from .protocols import PROTOCOLS
from .session import Session
from .log import addr_text, sanitize

if TYPE_CHECKING:
    from .config import Listen, ServerConf
    from .runtime import Runtime
    Route = Tuple[ServerConf, Listen]      # the server and listen serving a connection
    BindKey = Tuple[int, str, int]          # bind_key(): (family, host, port)

_RESOURCE_ERRORS = {_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM}


class ListenError(Exception):
    """A listen socket could not be created or bound; str() is nginx-shaped."""


def _norm_ip(host):
    """Canonical text of an IP address ('' stays the v4 wildcard); v4-mapped v6 becomes v4."""
    if host in ("", "*", "0.0.0.0"):
        return ""
    h = host.strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _is_wildcard(listen):
    return _norm_ip(listen.host) in ("", "::")


def _addr_text(family, host, port):
    return addr_text(host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port)


def bind_key(listen: Listen) -> BindKey:
    """What identifies one bound socket: (family, normalized host, port)."""
    fam = listen.family
    host = _norm_ip(listen.host)
    if fam == socket.AF_INET6 and host == "":
        host = "::"
    return (int(fam), host, int(listen.port))


class HandlerPool:
    """Cached handler threads, shared by every listener of a process.

    A connection goes to an idle thread when there is one, else to a new thread: the pool
    grows on demand (the threads busy are bounded by `limit_prelogin`, see limits.py); at
    most `max_spare` idle threads are kept after a burst, and a thread idle for
    `idle_timeout` seconds ends.  Reusing threads saves creating one per connection
    (clone3, mmap, the Thread.start hand-shake: ~10 system calls and ~10% of a short
    session's CPU).  The hand-off is one lock release to the chosen thread.
    """

    def __init__(self, idle_timeout: float = 30.0, max_spare: int = 32):
        self.idle_timeout = idle_timeout
        self.max_spare = max_spare
        self._lock = threading.Lock()
        self._idle = []             # [_PoolThread] waiting for work (last in, first out)
        self._threads = 0

    def submit(self, func: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                self._threads += 1
        if worker is not None:
            worker.job = (func, args)
            worker.wake.release()
            return
        worker = _PoolThread(self, (func, args))
        try:
            worker.start()
        except BaseException:
            with self._lock:
                self._threads -= 1
            raise

    def threads(self) -> int:
        return self._threads

    def _park(self, worker):
        """Wait for the next job; False when the thread should end (idle too long)."""
        with self._lock:
            if len(self._idle) >= self.max_spare:
                self._threads -= 1
                return False
            self._idle.append(worker)
        while True:
            if worker.wake.acquire(timeout=self.idle_timeout):
                return True
            with self._lock:
                if worker in self._idle:        # nobody chose it meanwhile: end
                    self._idle.remove(worker)
                    self._threads -= 1
                    return False
            # chosen just now: the job and the release are on their way


class _PoolThread(threading.Thread):
    def __init__(self, pool, job):
        threading.Thread.__init__(self, name="mailproxy-handler", daemon=True)
        self.pool = pool
        self.job = job
        self.wake = threading.Lock()
        self.wake.acquire()

    def run(self):
        pool = self.pool
        while True:
            func, args = self.job
            self.job = None
            try:
                func(*args)
            except BaseException:
                pass
            func = args = None
            if not pool._park(self):
                return


_pool = None
_pool_lock = threading.Lock()


def handler_pool() -> HandlerPool:
    """This process's HandlerPool (created on first use, i.e. in a worker after the fork)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = HandlerPool()
        return _pool


class Listener(socketserver.ThreadingTCPServer):
    """One bound, listening address; each connection runs a `session_class` (the one Session,
    whatever the protocol; tests put a stub here)."""

    session_class = Session
    daemon_threads = True
    pool = None                 # HandlerPool, set by start()
    _nodelay_inherited = False  # set by start()
    _timeout_inherited = None
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, listen: Listen, routes: Tuple[Route, Dict[str, Route]]):
        """Create, configure, bind and listen. `routes` is ((conf, listen), {ip: (conf, listen)})."""
        self.listen_conf = listen
        self.key = bind_key(listen)
        self.address_family = self.key[0]
        self.request_queue_size = listen.backlog
        self.routes = routes
        self.runtime = None
        self.thread = None
        self._active = 0
        self._last_accept_error = 0.0
        self._last_full_alert = 0.0
        self._active_cond = threading.Condition()
        host = self.key[1]
        if self.address_family == socket.AF_INET and host == "":
            host = "0.0.0.0"
        address = (host, self.key[2])
        self.text = _addr_text(self.address_family, self.key[1], self.key[2])
        socketserver.BaseServer.__init__(self, address, None)
        proto = 0
        if listen.multipath:
            proto = getattr(socket, "IPPROTO_MPTCP", 262)
        try:
            self.socket = socket.socket(self.address_family, socket.SOCK_STREAM, proto)
        except OSError as e:
            raise ListenError("socket() %s%s failed (%d: %s)"
                              % (self.text, " multipath" if proto else "", e.errno or 0,
                                 e.strerror)) from None
        try:
            self.server_bind()
            self.server_activate()
        except ListenError:
            self.socket.close()
            raise
        except OSError as e:
            self.socket.close()
            raise ListenError("bind() to %s failed (%d: %s)"
                              % (self.text, e.errno or 0, e.strerror)) from None
        self.socket.setblocking(False)   # shared with other workers: never block in accept()

    # -- socket set-up --------------------------------------------------------------------------
    def _setopt(self, level, opt, value, name):
        try:
            self.socket.setsockopt(level, opt, value)
        except OSError as e:
            raise ListenError("setsockopt(%s) %s failed (%d: %s)"
                              % (name, self.text, e.errno or 0, e.strerror)) from None

    def server_bind(self) -> None:
        listen = self.listen_conf
        s = socket
        self._setopt(s.SOL_SOCKET, s.SO_REUSEADDR, 1, "SO_REUSEADDR")
        if self.address_family == s.AF_INET6:
            self._setopt(s.IPPROTO_IPV6, s.IPV6_V6ONLY, int(listen.ipv6only), "IPV6_V6ONLY")
        if listen.rcvbuf:
            self._setopt(s.SOL_SOCKET, s.SO_RCVBUF, listen.rcvbuf, "SO_RCVBUF")
        if listen.sndbuf:
            self._setopt(s.SOL_SOCKET, s.SO_SNDBUF, listen.sndbuf, "SO_SNDBUF")
        ka = listen.so_keepalive
        if ka is not None:
            if ka is False:
                self._setopt(s.SOL_SOCKET, s.SO_KEEPALIVE, 0, "SO_KEEPALIVE")
            else:
                self._setopt(s.SOL_SOCKET, s.SO_KEEPALIVE, 1, "SO_KEEPALIVE")
                if isinstance(ka, (tuple, list)):
                    idle, intvl, cnt = (list(ka) + [None, None, None])[:3]
                    for opt, val, name in (("TCP_KEEPIDLE", idle, "TCP_KEEPIDLE"),
                                           ("TCP_KEEPINTVL", intvl, "TCP_KEEPINTVL"),
                                           ("TCP_KEEPCNT", cnt, "TCP_KEEPCNT")):
                        if val and hasattr(s, opt):
                            self._setopt(s.IPPROTO_TCP, getattr(s, opt), int(val), name)
        self._set_inherited()
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()

    def _set_inherited(self):
        """Options an accepted socket inherits from the listening one (Linux copies them):
        TCP_NODELAY, and SO_RCVTIMEO/SO_SNDTIMEO when every server on this address has the
        same `timeout`: then no session sets them again (3 system calls each).
        Set once when the socket is created, never changed on reload (old workers may still
        accept on it); a worker reads what is set (`start`) and sets the rest per session."""
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        default, specific = self.routes
        timeouts = {conf.timeout for conf, _ in [default] + list(specific.values())}
        if len(timeouts) == 1 and None not in timeouts:
            try:
                ktimeout.set(self.socket, timeouts.pop())
            except (OSError, TypeError, ValueError):
                pass

    def server_activate(self) -> None:
        try:
            self.socket.listen(self.request_queue_size)
        except OSError as e:
            raise ListenError("listen() to %s, backlog %d failed (%d: %s)"
                              % (self.text, self.request_queue_size, e.errno or 0,
                                 e.strerror)) from None

    def set_backlog(self, backlog: int) -> None:
        """Apply a changed backlog (reload) to the already listening socket."""
        if backlog != self.request_queue_size:
            self.request_queue_size = backlog
            try:
                self.socket.listen(backlog)
            except OSError:
                pass

    # -- serving ------------------------------------------------------------------------------
    def get_request(self) -> Tuple[socket.socket, Any]:
        try:
            sock, addr = self.socket.accept()
        except OSError as e:
            if e.errno in _RESOURCE_ERRORS:
                # out of descriptors or memory: report, and let others finish before retrying
                # (the socket stays readable, so without a pause this would spin)
                now = time.monotonic()
                if now - self._last_accept_error > 1.0:
                    self._last_accept_error = now
                    self._log("alert", "accept() on %s failed (%d: %s)"
                              % (self.text, e.errno, e.strerror))
                time.sleep(0.05)
            raise
        # accept4() gives a blocking descriptor and the socket object has no Python timeout
        # (the listener's timeout is 0, socket.accept() then leaves the new one alone): no
        # setblocking() needed; the session sets its kernel timeouts (ktimeout).
        if not self._nodelay_inherited:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        return sock, addr

    def route(self, sock: socket.socket) -> Route:
        """(ServerConf, Listen) serving a new connection accepted on this socket."""
        default, specific = self.routes
        if specific:
            try:
                local = _norm_ip(sock.getsockname()[0])
            except OSError:
                return default
            return specific.get(local, default)
        return default

    def process_request_thread(self, request: socket.socket, client_address: Any,
                               routed: Optional[Route] = None,
                               ticket: Optional[limits.Ticket] = None,
                               accepted: Optional[float] = None) -> None:
        with self._active_cond:
            self._active += 1
        try:
            try:
                conf, listen = routed or self.route(request)
                cls = self.session_class
                t = self._timeout_inherited
                session = cls(request, client_address, conf, listen, self.runtime,
                              timeout_set=t is not None and t == conf.timeout,
                              ticket=ticket, accepted=accepted)
            except Exception as e:
                self._log("alert", "cannot start session on %s: %s: %s"
                          % (self.text, type(e).__name__, sanitize(str(e))))
                request.close()
                if ticket is not None:
                    ticket.release()
                return
            metrics.count("prelogin_sessions", conf.protocol)
            try:
                session.run()   # the session owns the socket from here: it closes or hands it on
            finally:
                metrics.count("prelogin_sessions", conf.protocol, n=-1)
        except Exception as e:
            self._log("alert", "session on %s ended by %s: %s"
                      % (self.text, type(e).__name__, sanitize(str(e))))
        finally:
            with self._active_cond:
                self._active -= 1
                if self._active == 0:
                    self._active_cond.notify_all()

    def _log(self, level, message):
        self.runtime.log.log(level, message)

    def _handle_request_noblock(self):
        # nginx stops taking connections when its free ones run out (ngx_event_accept): the
        # queued ones wait in the backlog (or go to another worker) instead of failing here.
        adm = self.runtime.admission
        if adm.full():
            now = time.monotonic()
            if now - self._last_full_alert > 1.0:
                self._last_full_alert = now
                self._log("alert", "%d worker_connections are not enough"
                          % adm.worker_connections)
            adm.wait_room(0.1)
            return
        socketserver.ThreadingTCPServer._handle_request_noblock(self)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Admit the connection (limits.py), then hand it to a handler thread from the
        process's pool (not a new thread per connection)."""
        accepted = time.monotonic()
        metrics.count("connections_accepted")
        routed = self.route(request)
        conf, listen = routed
        ip = client_address[0] if client_address else None
        exempt = bool(listen.proxy_protocol and conf.set_real_ip_from
                      and realip.trusted(conf, ip, self.address_family))
        ticket, reason = self.runtime.admission.admit(ip, exempt)
        if ticket is None:
            self.refuse(request, client_address, conf, listen, reason)
            return
        pool = self.pool
        if pool is None:
            pool = self.pool = handler_pool()
        try:
            pool.submit(self.process_request_thread, request, client_address, routed, ticket,
                        accepted)
        except RuntimeError as e:       # "can't start new thread": a task or memory limit
            if ticket is not None:
                ticket.release()
            self._log("alert", "cannot start a handler thread (%s; %d running): lower "
                      "limit_prelogin below the system's task limit"
                      % (sanitize(str(e)), pool.threads()))
            self.refuse(request, client_address, routed[0], routed[1], "threads")
        except BaseException:
            if ticket is not None:
                ticket.release()
            raise

    def refuse(self, request: socket.socket, client_address: Any, conf: ServerConf,
               listen: Listen, reason: str) -> None:
        """Over a limit: the protocol's temporary-failure greeting and a log line naming the
        client.  On an implicit-TLS port the greeting would need a TLS handshake, the very cost
        the limit exists to avoid: there the connection is closed after the log line."""
        adm = self.runtime.admission
        metrics.count("connections_refused", reason)
        tls = listen.ssl
        log = self.runtime.log_for(conf)
        ip = client_address[0] if client_address else "-"
        held = adm.lines.allow((reason, limits.address_key(ip)), time.monotonic())
        if held is not None and log.enabled("error"):
            log.log("error", "%s, client: %s, server: %s"
                    % (limits.refusal_text(reason, adm.limit_of(reason), held, tls),
                       ip, self.text))
        try:
            request.setblocking(False)
            if not tls:
                request.send(PROTOCOLS[conf.protocol].busy_reply(conf))
            # read what the client sent already (a balancer's PROXY header): closing with
            # unread input sends a reset, which may destroy the greeting before it is read
            request.recv(4096)
        except OSError:
            pass
        finally:
            request.close()

    def handle_error(self, request: socket.socket, client_address: Any) -> None:
        self._log("alert", "error handling connection from %s on %s" % (client_address, self.text))

    def shutdown_request(self, request: socket.socket) -> None:
        pass                    # the session owns the socket

    def close_request(self, request: socket.socket) -> None:
        pass

    def active(self) -> int:
        """Handler threads still running (sessions before their relay hand-over)."""
        return self._active

    def wait_idle(self, timeout: Optional[float]) -> bool:
        """Wait until no handler thread runs; True when idle."""
        with self._active_cond:
            return self._active_cond.wait_for(lambda: self._active == 0, timeout)

    def start(self, runtime: Runtime, poll_interval: float = 0.25) -> None:
        """Serve in a daemon thread of this process (a worker)."""
        self.runtime = runtime
        self.pool = handler_pool()
        # what accepted sockets inherit (see _set_inherited), read once in this worker
        try:
            self._nodelay_inherited = bool(
                self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            rcv, snd = ktimeout.get(self.socket), ktimeout.get(self.socket, send=True)
            self._timeout_inherited = rcv if rcv == snd else None
        except OSError:
            self._nodelay_inherited, self._timeout_inherited = False, None
        self.thread = threading.Thread(target=self.serve_forever, args=(poll_interval,),
                                       name="listen %s" % self.text, daemon=True)
        self.thread.start()

    def stop_accepting(self) -> None:
        """Stop serve_forever (if running) and close this process's copy of the socket."""
        if self.thread is not None:
            self.shutdown()
            self.thread = None
        self.server_close()


def plan(servers: Iterable[ServerConf]) -> Dict[BindKey, Tuple[Listen, Route, Dict[str, Route]]]:
    """{bind_key: (listen to bind with, default route, {ip: route})} for all servers' listens.

    A specific address is folded into a wildcard of the same family and port.
    """
    wild = {}
    specific = []
    for conf in servers:
        for listen in conf.listen:
            key = bind_key(listen)
            if key[1] in ("", "::") and not listen.bind:
                wild.setdefault(key, (listen, (conf, listen), {}))
            else:
                specific.append((key, conf, listen))
    result = dict(wild)
    for key, conf, listen in specific:
        wkey = (key[0], "::" if key[0] == socket.AF_INET6 else "", key[2])
        if wkey in wild and not listen.bind:
            result[wkey][2].setdefault(key[1], (conf, listen))
        else:
            result.setdefault(key, (listen, (conf, listen), {}))
    return result


def bind_all(servers: Iterable[ServerConf], existing: Optional[Dict[BindKey, Listener]] = None
             ) -> Tuple[Dict[BindKey, Listener], List[Listener]]:
    """Bind every listen of `servers`, reusing sockets in `existing` ({key: Listener}).

    Returns ({key: Listener} now in use, [Listener no longer needed]). On failure closes
    what it bound itself (never what it reused) and raises ListenError.
    """
    existing = dict(existing or {})
    wanted = plan(servers)
    result = {}
    created = []
    reuse = []
    try:
        for key in sorted(wanted, key=lambda k: (k[2], k[0], k[1])):
            listen, default, specific = wanted[key]
            old = existing.pop(key, None)
            if old is not None:
                reuse.append((old, listen, (default, specific)))
                result[key] = old
            else:
                lst = Listener(listen, (default, specific))
                created.append(lst)
                result[key] = lst
    except BaseException:
        for lst in created:
            lst.server_close()
        raise
    for old, listen, routes in reuse:       # only once everything is bound
        old.routes = routes
        old.listen_conf = listen
        old.set_backlog(listen.backlog)
    return result, list(existing.values())


def describe_bind_error(listen: Listen, exc: OSError) -> str:
    """nginx's wording for a failed bind of `listen`."""
    key = bind_key(listen)
    return "bind() to %s failed (%d: %s)" % (_addr_text(*key), exc.errno or 0,
                                             exc.strerror or _errno.errorcode.get(exc.errno, exc))
