"""The backend side of a session: connect, log in with the protocol's BackendLogin, the
PROXY header out; a base class of `Session` (session.py), as SessionLog is.

As nginx's ngx_mail_proxy_module (ngx_mail_proxy_init, ngx_mail_proxy_handler); the failures
end the session with the protocol's internal error, or the backend's refusal relayed.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, NoReturn, Optional, Tuple

from . import backend, metrics, proxy_protocol, throttle
from .clientio import BackendRejected, Close
from .conversation import BackendStartTLS, LoggedIn, LoginError, Peer, StartTLSRefused, ToBackend
from .log import sanitize

if TYPE_CHECKING:
    import ssl

    from .conversation import BackendLogin


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

    def connect_and_login(self, host: str, port: int, user: Optional[bytes],
                          passwd: Optional[bytes]) -> NoReturn:
        conf = self.conf
        self.action = "connecting to upstream"
        conn = None
        try:
            # proxy_ssl (or the auth service's Auth-SSL-Backend): implicit TLS, or the
            # protocol's STARTTLS exchange then TLS, before the backend login
            sock = metrics.timed("backend_connect_duration_seconds", backend.connect, host,
                                 port, conf.timeout)
            conn = backend.BackendConn(sock, conf.proxy_buffer, conf.timeout, timeout_set=True)
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
        except backend.BackendError as e:
            metrics.count("backend_errors", self.protocol)
            if conn is not None:
                conn.close()
            self.error(str(e))
            self.internal_error()
        except LoginError as e:
            metrics.count("backend_errors", self.protocol)
            conn.close()
            self.action = e.action
            self.error(str(e))
            self.internal_error()
        except BackendRejected as e:
            conn.close()
            self.failed_logins += 1
            text = sanitize(e.text.rstrip(b"\r\n"), 512)
            if conf.proxy_pass is not None or e.refused:
                # Our static route (or a token it refused): the backend decides, its refusal
                # is an ordinary failure.
                metrics.login(self.protocol, "failed")
                self.info('client login failed: "%s"' % text)
                throttle.after_auth(self, False, user, passwd)
                self.send_close(e.reply)
            if conf.proxy_pass_error_message:
                metrics.login(self.protocol, "failed")  # as its access_log line: auth-failed
                self.info('upstream sent invalid response: "%s"' % text)
                self.send_close(e.reply)
            self.error('upstream sent invalid response: "%s"' % text)
            self.internal_error()
        self.action = None
        if self.outcome == "kicked":    # live.kick shut the client down meanwhile
            conn.close()
            raise Close()
        metrics.login(self.protocol, "ok")
        self.info("client logged in")
        throttle.after_auth(self, True, user, passwd)
        self.hand_over(conn, reply)

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
