"""The backend side of a session: connect, log in with the protocol's BackendLogin, the
PROXY header out; a base class of `Session` (session.py), as SessionLog is.

As nginx's ngx_mail_proxy_module (ngx_mail_proxy_init, ngx_mail_proxy_handler); the failures
end the session with the protocol's internal error, or the backend's refusal relayed.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, List, Optional, Tuple

from . import backend, metrics, proxy_protocol, resolver, throttle, upstreams
from .clientio import BackendRejected, Close
from .conversation import BackendStartTLS, LoggedIn, LoginError, Peer, StartTLSRefused, ToBackend
from .auth_http import AuthResult
from .log import sanitize

if TYPE_CHECKING:
    import ssl

    from .conversation import BackendLogin
    from .upstreams import Backend


class BackendSide:
    """Session's backend half: `connect_and_login()` and the pieces it uses (overridable)."""

    def peer(self) -> Peer:
        """The addresses a backend login may carry (XCLIENT, IMAP ID)."""
        hdr = self.proxy_header
        proxied = None
        if hdr and self.proxy_trusted and hdr[2] is not None:
            proxied = (hdr[2], hdr[3])      # where the client went: set_real_ip_from peers only
        return Peer(self.client_ip, self.client_port, None, proxied, self._sockname,
                    self.session_id)

    def _sockname(self) -> Optional[Tuple[str, int]]:
        try:
            name = self.sock.getsockname()
        except OSError:
            return None
        return (name[0], name[1]) if isinstance(name, tuple) else None

    # the static route's pool (proxy_pass, proxy_map): the backends of this login, the one
    # tried now and those tried before it; `greeted`: the backend's greeting came
    route: Optional[List[Backend]] = None
    pool_backend: Optional[Backend] = None
    tried: List[Backend] = []
    greeted = True

    def static_route(self, user: Optional[bytes],
                     passwd: Optional[bytes]) -> Optional[Tuple[str, int]]:
        """The first backend of the user's rank (upstreams.py); None when proxy_map has no
        line for the user: the protocol's authentication failure was sent."""
        conf = self.conf
        backends = conf.proxy_pass
        if backends is None:
            backends = conf.proxy_map.lookup(user)
            if backends is None:
                metrics.login(self.protocol, "failed")
                throttle.after_auth(self, False, user, passwd)
                self.failed_logins += 1
                self.logmsg("warn", 'no proxy_map entry for user "%s"' % sanitize(user or b""))
                self.perform(self.conv.auth_failed(
                    AuthResult("FAIL", b"Invalid login or password"), retry=False))
                return None
        self.route, self.tried = backends, []
        b = self.pool_backend = self.rt.upstreams.choose(conf, backends, user or b"", [])
        return b.host, b.port

    def fail_over(self, err: Exception, user: Optional[bytes]) -> bool:
        """A pool backend failed before its greeting: count it (nginx's max_fails) and pick
        the next one of the user's rank; False when none is left.  A pool of one backend
        keeps no health, as nginx's single-server upstream."""
        b, route = self.pool_backend, self.route
        if b is None or route is None or len(route) < 2:
            return False
        ups = self.rt.upstreams
        ups.failed(b, str(err), self.logmsg)
        self.tried.append(b)
        nxt = ups.choose(self.conf, route, user or b"", self.tried)
        if nxt is None:
            return False
        self.error(str(err))
        metrics.count("backend_failovers")
        self.logmsg("warn", 'failover of user "%s" from %s to %s'
                    % (sanitize(user or b""), b.text, nxt.text))
        self.pool_backend = nxt
        self.upstream = nxt.text
        return True

    def connect_and_login(self, host: str, port: int, user: Optional[bytes],
                          passwd: Optional[bytes]) -> None:
        conf = self.conf
        while True:
            self.action = "connecting to upstream"
            self.greeted = False
            conn = None
            pb = self.pool_backend
            try:
                # proxy_ssl (or the auth service's Auth-SSL-Backend): implicit TLS, or the
                # protocol's STARTTLS exchange then TLS, before the backend login
                more = {"addresses": pb.addrs} if pb is not None else \
                    {"resolve": self.resolve_server} if conf.resolver not in (None, "system") \
                    else {}     # a pool's backend: resolved at load
                sock = metrics.timed("backend_connect_duration_seconds", backend.connect,
                                     host, port, conf.timeout, **more)
                conn = backend.BackendConn(sock, conf.proxy_buffer, conf.timeout,
                                           timeout_set=True)
                if conf.proxy_protocol != "off":
                    self.action = "sending PROXY protocol header to upstream"
                    conn.send(self.proxy_header_out(sock))
                mode = self.backend_ssl or conf.proxy_ssl
                ctx = None
                if mode in ("on", "starttls"):
                    try:
                        ctx = backend.client_context(conf)
                    except backend.BackendTLSConfigError as e:
                        raise backend.BackendError(str(e)) from None
                tls_name = conf.proxy_ssl_name or host
                if mode == "on":
                    self.action = "SSL handshaking to upstream"
                    conn.start_tls(ctx, tls_name)
                login = self.conv.backend_login(user, passwd, self.peer(), mode == "starttls")
                reply = self.login_backend(conn, login, ctx, tls_name)
                break
            except (backend.BackendError, LoginError, BackendRejected) as e:
                if conn is not None:
                    conn.close()
                if not self.greeted and self.fail_over(e, user):
                    host, port = self.pool_backend.host, self.pool_backend.port
                    continue
                self.backend_failed(e, user, passwd)
                return          # its error challenge awaits the client's dummy response
        self.action = None
        if self.outcome == "kicked":    # live.kick shut the client down meanwhile
            conn.close()
            raise Close()
        metrics.login(self.protocol, "ok")
        self.info("client logged in")
        throttle.after_auth(self, True, user, passwd)
        self.hand_over(conn, reply)

    def resolve_server(self, host: str, port: int, timeout: float) -> list:
        """An Auth-Server name through `resolver`'s servers and their cache (its valid= or
        the TTL), as proxy_pass names: not asked again at each login."""
        try:
            return upstreams.lookup(host, port, self.conf.resolver,
                                    min(timeout, self.conf.resolver_timeout))
        except (resolver.LookupFailed, OSError) as e:
            raise backend.BackendError("%s could not be resolved (%s)" % (host, e)) from None

    def backend_failed(self, e: Exception, user: Optional[bytes],
                       passwd: Optional[bytes]) -> None:
        """The login cannot go on: log as nginx does, and the client's reply.  Returns only
        when the backend's error challenge went to the client (the session reads its dummy
        response, then the conversation closes)."""
        conf = self.conf
        if isinstance(e, backend.BackendError):
            metrics.count("backend_errors", self.protocol)
            self.error(str(e))
            self.internal_error()
        if isinstance(e, LoginError):
            metrics.count("backend_errors", self.protocol)
            self.action = e.action
            self.error(str(e))
            self.internal_error()
        self.failed_logins += 1
        text = sanitize(e.text.rstrip(b"\r\n"), 512)
        if self.route is not None or e.refused:
            # Our static route (or a token it refused): the backend decides, its refusal
            # is an ordinary failure.
            metrics.login(self.protocol, "failed")
            self.info('client login failed: "%s"' % text)
            throttle.after_auth(self, False, user, passwd)
            self.perform(self.conv.backend_refused(e.reply, e.challenge))
            return
        if conf.proxy_pass_error_message:
            metrics.login(self.protocol, "failed")  # as its access_log line: auth-failed
            self.info('upstream sent invalid response: "%s"' % text)
            self.send_close(e.reply)
        self.error('upstream sent invalid response: "%s"' % text)
        self.internal_error()

    def login_backend(self, conn: backend.BackendConn, login: BackendLogin,
                      ctx: Optional[ssl.SSLContext], tls_name: Optional[str]) -> bytes:
        """Run the protocol's BackendLogin over `conn`; return the reply owed to the client.

        Raises BackendRejected, LoginError or backend.BackendError."""
        while True:
            self.action = login.READING
            reply = conn.read_reply(login.complete)
            if self.debug:
                self.trace_backend(reply)
            try:
                actions = login.receive(reply)
            except StartTLSRefused as e:
                raise backend.starttls_refused(e.reply) from None
            if not self.greeted:        # the backend is alive (a pool's health)
                self.greeted = True
                if self.pool_backend is not None and self.route and len(self.route) > 1:
                    self.rt.upstreams.succeeded(self.pool_backend, self.logmsg)
            for act in actions:
                kind = type(act)
                if kind is ToBackend:
                    self.action = act.action
                    if act.discard:
                        conn.discard()
                    if self.debug:
                        self.trace_backend(act.data, act.action)
                    conn.send(act.data)
                elif kind is BackendStartTLS:
                    self.action = "SSL handshaking to upstream"
                    conn.start_tls(ctx, tls_name)
                elif kind is LoggedIn:
                    return act.reply
                else:
                    raise TypeError("unknown backend action %r" % (act,))

    def proxy_header_out(self, backend_sock: socket.socket) -> bytes:
        """The PROXY header for the backend: the (real) client and our listening side."""
        local = self.sock.getsockname()
        if self.conf.proxy_protocol == "v2":
            return proxy_protocol.v2_header(self.client_ip, self.client_port, local[0], local[1])
        return proxy_protocol.v1_header(self.client_ip, self.client_port, local[0], local[1])
