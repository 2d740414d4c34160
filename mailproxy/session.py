"""One client connection before it is handed to the relay.

A `Session` subclass per protocol (pop3.py, imap.py, smtp.py) speaks the client side: it greets,
reads commands with `LineReader` and dispatches them to `cmd_<VERB>` methods, collects
credentials, and then calls `authenticate()`, which is shared: ask the auth service (or take the
static `proxy_pass` route), connect to the backend, let the protocol replay the login
(`login_backend`), and hand the socket pair to the process's relay.

Control flow is plain blocking code in the listener's handler thread; `Close` unwinds it.
"""

import errno as errno_mod
import os
import time

from . import auth_http, backend, ktimeout, limits, proxy_protocol, sasl
from . import tls                   # implicit TLS, STARTTLS
from . import realip                # PROXY protocol header in, set_real_ip_from
from .clientio import (BackendRejected, ClientClosed, ClientTimeout, Close, HandedOver,
                       LineReader, LineTooLong, Refused)
from .log import addr_text, sanitize


def safe_credential(value):
    """True when a login or password (or None) can be written into a protocol line as it is."""
    return value is None or sasl.check_credential(value)


class Session:
    """State and shared flow of one client connection (one handler thread)."""

    protocol = None            # 'pop3' | 'imap' | 'smtp'
    INTERNAL_ERROR = b""       # the protocol's internal-error reply, with CRLF
    TEMP_FAILURE = b""         # greeting of a connection refused by a limit (limits.py)

    # A client socket's timeout is set again only when it would overshoot the deadline by
    # more than this (a quick login costs no extra system call).
    ARM_SLACK = 0.25

    @classmethod
    def busy_reply(cls, conf):
        """The temporary-failure greeting sent instead of the greeting when a limit refuses
        the connection."""
        return cls.TEMP_FAILURE

    def __init__(self, sock, client_address, conf, listen, runtime, timeout_set=False,
                 ticket=None, accepted=None):
        """timeout_set: `sock` has conf.timeout as its kernel timeouts already (inherited
        from the listening socket, see listeners.Listener._set_inherited).  ticket: what
        limits.Admission admitted it with; accepted: time.monotonic() of the accept."""
        self.sock = sock
        self.ticket = ticket
        # `timeout` bounds the whole conversation before login, from the accept on, as nginx
        # arms it once (ngx_mail_init_session); a failed login with Auth-Wait arms it anew.
        self.deadline = (accepted or time.monotonic()) + conf.timeout
        self._armed = conf.timeout      # the kernel timeouts now on the socket
        self.conf = conf
        self.listen = listen
        self.rt = runtime
        self.log = runtime.log_for(conf)
        self.conn = runtime.next_conn_id()
        self.client_ip = client_address[0] if client_address else None
        self.client_port = client_address[1] if client_address else None
        self.server_text = self._server_text(listen)
        # Facts filled in by the PROXY-protocol and TLS steps (run, starttls_handshake).
        self.tls = False
        self.starttls_used = False
        self.proxy_header = None        # (src_ip, src_port, dst_ip, dst_port) received
        self.proxy_trusted = False      # the header came from a set_real_ip_from peer
        self.ssl_headers = []           # Auth-SSL-* (name, value) pairs
        self.tls_handshaked = False     # handshake done (close_notify on close)
        # Credentials and auth state.
        self.login = None               # bytes
        self.passwd = None              # bytes
        self.salt = None                # bytes, without CRLF
        self.method = None              # Auth-Method
        self.attempt = 0
        self.errors = 0
        self.action = None              # the "while ..." part of log lines
        self.upstream = None
        self.quit = False
        self.reader = LineReader(sock, self.client_buffer_size(), conf.timeout, self.arm)
        # `timeout` bounds every client read and write: set once, kept by the kernel
        # (no settimeout per call; see ktimeout).  The accepted socket is blocking.
        if not timeout_set:
            try:
                ktimeout.set(sock, conf.timeout)
            except OSError:
                sock.settimeout(conf.timeout)

    def restore_timeout(self):
        """After a temporary settimeout(): back to the session's own `timeout`."""
        if self.tls_handshaked:
            self.sock.settimeout(self.conf.timeout)   # TLS sockets keep Python's timeout
        else:
            self.sock.settimeout(None)                # blocking again: the kernel's limit

    def remaining(self):
        """Seconds left before the pre-login deadline (ClientTimeout when none)."""
        if self.deadline is None:
            return self.conf.timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ClientTimeout()
        return left

    def arm(self):
        """Bound the next client read or write by the deadline: the socket's own timeout is
        lowered to what is left when it would otherwise overshoot."""
        left = self.remaining()
        sock = self.sock
        current = sock.gettimeout()
        python_timeout = current is not None        # Python's timeout (TLS sockets)
        if not python_timeout:
            current = self._armed
        if current is not None and current - left <= self.ARM_SLACK \
                and (self.deadline is not None or left - current <= self.ARM_SLACK):
            return                                  # no deadline: back to a whole `timeout`
        if python_timeout:
            sock.settimeout(left)
            return
        try:
            ktimeout.set(sock, left)
        except OSError:
            sock.settimeout(left)
        self._armed = left

    def rearm(self):
        """A fresh `timeout` for the conversation (after a failed login with Auth-Wait)."""
        self.deadline = time.monotonic() + self.conf.timeout

    # ---- overridables -------------------------------------------------------------------

    def client_buffer_size(self):
        raise NotImplementedError

    def greet(self):
        raise NotImplementedError

    def handle_line(self, line):
        """Parse and execute one command line (including its LF)."""
        raise NotImplementedError

    def too_long(self, data):
        """The reply to a command that did not fit in the buffer (then the session closes)."""
        raise NotImplementedError

    def auth_failed_reply(self, result):
        """The reply to an Auth-Status failure (bytes with CRLF)."""
        raise NotImplementedError

    def after_auth_wait(self):
        """Return to the pre-auth state after a failure with Auth-Wait."""

    def login_backend(self, conn, user, passwd):
        """Replay the login on BackendConn `conn`; return the reply owed to the client.

        Raises BackendRejected for a refusal, backend.BackendError for transport trouble.
        """
        raise NotImplementedError

    def auth_request_extra(self, req):
        """Protocol-specific fields of the auth request (SMTP: Client-Host, Auth-SMTP-*)."""

    # ---- logging --------------------------------------------------------------------------

    @staticmethod
    def _server_text(listen):
        if listen is None:
            return "-"
        return addr_text(listen.host or "0.0.0.0", listen.port)

    def context(self):
        parts = [", client: ", str(self.client_ip)]
        if self.starttls_used:
            parts.append(" using starttls")
        parts += [", server: ", self.server_text]
        if self.login is not None:
            parts += [', login: "', sanitize(self.login, 128), '"']
        if self.upstream:
            parts += [", upstream: ", self.upstream]
        return "".join(parts)

    def logmsg(self, level, message, err=None, action=True, tail=""):
        if not self.log.enabled(level):
            return
        if err is not None:
            message += " (%d: %s)" % (err, os.strerror(err))
        if action and self.action:
            message += " while " + self.action
        self.log.log(level, message + self.context() + tail, self.conn)

    def info(self, message, **kw):
        self.logmsg("info", message, **kw)

    def error(self, message, **kw):
        self.logmsg("error", message, **kw)

    # ---- I/O ------------------------------------------------------------------------------

    def send(self, data):
        """Write one reply in one call, bounded by `timeout`."""
        if not data:
            return
        try:
            self.arm()
        except ClientTimeout:
            self.info("client timed out", err=errno_mod.ETIMEDOUT)
            raise Close() from None
        try:
            self.sock.sendall(data)
        except ktimeout.TIMEOUT_ERRORS:
            self.info("client timed out", err=errno_mod.ETIMEDOUT)
            raise Close() from None
        except OSError as e:
            self.info("send() failed", err=e.errno or errno_mod.EPIPE)
            raise Close() from None

    def send_close(self, data):
        self.send(data)
        raise Close()

    def internal_error(self):
        self.send_close(self.INTERNAL_ERROR)

    def parse_error(self, reply):
        """A command rejected by the parser: counts towards max_errors (ngx_mail_read_command)."""
        self.errors += 1
        if self.errors >= self.conf.max_errors:
            self.info("client sent too many invalid commands")
            self.send_close(reply)
        self.send(reply)

    # ---- main loop --------------------------------------------------------------------------

    def run(self):
        handed = False
        try:
            if self.log.enabled("info"):
                self.log.log("info", "client %s connected to %s"
                             % (self._peer_text(), self.server_text), self.conn)
            # A load balancer's PROXY protocol header comes before anything else, TLS included
            # (ngx_mail_proxy_protocol_handler); may replace client_ip/client_port
            # (set_real_ip_from)
            if self.listen is not None and getattr(self.listen, "proxy_protocol", False):
                self.action = "reading PROXY protocol"
                self.apply_proxy_header(realip.read_header(self.sock, self.conf, self.client_ip,
                                                           self.logmsg))
                self.recount()
            # implicit TLS: the handshake right after accept (ngx_mail_ssl_init_connection)
            if self.listen is not None and getattr(self.listen, "ssl", False):
                self.action = "SSL handshaking"
                self.apply_handshake(tls.handshake(self.sock, self.conf, self.logmsg,
                                                   self.deadline))
            self.action = "sending client greeting line"
            self.greet()
            while not self.quit:
                self.action = "in auth state"
                self.handle_line(self.next_line())
        except HandedOver:
            handed = True
        except Close:
            pass
        except ClientTimeout:
            self.info("client timed out", err=errno_mod.ETIMEDOUT)
        except ClientClosed as e:
            self.info(str(e), err=e.errno)
        except Exception as e:   # a bug must never reach the client as a traceback
            self.logmsg("alert", "internal error: %s: %s" % (type(e).__name__, sanitize(str(e))))
            try:
                self.sock.settimeout(1.0)
                self.sock.sendall(self.INTERNAL_ERROR)
            except OSError:
                pass
        finally:
            if not handed:
                if self.tls_handshaked:         # close_notify first
                    tls.shutdown(self.sock)
                try:
                    self.sock.close()
                except OSError:
                    pass
                if self.ticket is not None:
                    self.ticket.release()

    def recount(self):
        """A trusted balancer's PROXY header named the real client: limit_conn_per_ip counts
        that address from now on (the balancer itself was exempt)."""
        if self.ticket is None or self.ticket.key is not None:
            return
        reason = self.ticket.retarget(self.client_ip)
        if reason is not None:
            adm = self.rt.admission
            self.action = None
            held = adm.lines.allow((reason, limits.address_key(self.client_ip)), time.monotonic())
            tls = self.listen is not None and getattr(self.listen, "ssl", False)
            if held is not None:
                self.error(limits.refusal_text(reason, adm.limit_of(reason), held, tls))
            if tls:             # as Listener.refuse: no handshake for a refused client
                raise Close()
            self.send_close(self.busy_reply(self.conf))

    def next_line(self):
        """The next client line; a command too long for the buffer is answered and closes."""
        try:
            return self.reader.readline()
        except LineTooLong as e:
            self.info('client sent too long command "%s"' % sanitize(e.data, 1024))
            self.send_close(self.too_long(e.data))

    def _peer_text(self):
        return addr_text(str(self.client_ip), self.client_port)

    # ---- STARTTLS (ngx_mail_starttls_handler) ------------------------------------------------

    def starttls_handshake(self):
        """After the positive STARTTLS/STLS reply (pipelined input already discarded)."""
        self.starttls_used = True       # nginx sets s->starttls before the handshake
        self.action = "SSL handshaking"
        self.apply_handshake(tls.handshake(self.sock, self.conf, self.logmsg, self.deadline))

    def apply_handshake(self, result):
        """Take over what tls.handshake returned: its socket (the SSLSocket even after a
        failure), then the Auth-SSL-* headers, or the refused certificate's line and close."""
        self.sock = self.reader.sock = result.sock
        self.tls_handshaked = result.done
        if result.reply is not None:
            self.send_close(result.reply)
        if not result.ok:
            raise Close()
        self.tls = True
        self.ssl_headers = result.headers
        self.action = None

    def apply_proxy_header(self, header):
        """Take over what realip.read_header returned: the header's addresses, and for a
        trusted peer (set_real_ip_from) the client's address and port."""
        if header.addrs is not None:
            self.proxy_header = header.addrs
        if header.trusted:
            self.client_ip, self.client_port = header.client
            # only a trusted header's addresses stand for the client (imap.py's ID fields)
            self.proxy_trusted = True
        self.action = None

    # ---- authentication, backend login, hand-over -----------------------------------------------

    def start_auth(self, method, login, passwd):
        """Credentials are complete: refuse CR, LF or NUL in them (nothing a client sends may
        add a line towards the backend), then authenticate()."""
        if not safe_credential(login) or not safe_credential(passwd):
            raise Refused()
        self.method, self.login, self.passwd = method, login, passwd
        self.authenticate()

    def authenticate(self):
        """Credentials are complete: route the user, log in to the backend, start relaying.

        Returns only when the client may try again (auth failure with Auth-Wait); otherwise
        raises Close or HandedOver.
        """
        conf = self.conf
        self.attempt += 1
        # The conversation's deadline stops here, as nginx deletes its timer in ngx_mail_auth:
        # the auth service and the backend login have their own; replies owed to the client
        # are bounded per write by `timeout`.
        self.deadline = None
        user, passwd = self.login, self.passwd
        if conf.auth_http is not None:
            self.action = "in http auth state"
            req = auth_http.AuthRequest(
                method=self.method, user=self.login or b"", passwd=self.passwd or b"",
                salt=self.salt, protocol=self.protocol, attempt=self.attempt,
                client_ip=self.client_ip or "", client_host=None, proxy=self.proxy_header,
                ssl=self.ssl_headers, headers=conf.auth_http_header)
            self.auth_request_extra(req)
            try:
                res = auth_http.query(conf.auth_http, req, conf.auth_http_timeout,
                                      sleep=self.rt.shutting_down.wait)
            except auth_http.AuthHttpError as e:
                self.error(str(e))
                self.internal_error()
            if res.status != "OK":
                self.info('client login failed: "%s"' % sanitize(res.message))
                if res.wait:                        # at most auth_http.MAX_AUTH_WAIT
                    if self.rt.shutting_down.wait(res.wait):
                        self.send_close(self.auth_failed_reply(res))    # no retry on the way out
                    self.rearm()
                    self.send(self.auth_failed_reply(res))
                    self.login = self.passwd = None
                    self.after_auth_wait()
                    return
                self.send_close(self.auth_failed_reply(res))
            if res.user is not None:
                user = self.login = res.user
            if res.passwd is not None:
                passwd = res.passwd
            host, port = res.server, res.port
            self.backend_ssl = res.ssl_backend      # ours: Auth-SSL-Backend (None: config)
        else:
            host, port = conf.proxy_pass
        self.upstream = addr_text(host, port)
        if not safe_credential(user) or not safe_credential(passwd):
            # Only the auth service can get here (Auth-User/Auth-Pass); clients are checked.
            self.error("auth http server sent a login or password with CR, LF or NUL")
            self.internal_error()
        self.connect_and_login(host, port, user, passwd)

    def connect_and_login(self, host, port, user, passwd):
        conf = self.conf
        self.action = "connecting to upstream"
        conn = None
        try:
            sock = backend.connect(host, port, conf.timeout)
            conn = backend.BackendConn(sock, conf.proxy_buffer, conf.timeout, timeout_set=True)
            if conf.proxy_protocol != "off":
                self.action = "sending PROXY protocol header to upstream"
                conn.send(self.proxy_header_out(sock))
            self.backend_tls(conn, host)        # ours: proxy_ssl on|starttls
            self.action = "reading response from upstream"
            reply = self.login_backend(conn, user, passwd)
        except backend.BackendError as e:
            if conn is not None:
                conn.close()
            self.error(str(e))
            self.internal_error()
        except BackendRejected as e:
            conn.close()
            text = sanitize(e.text.rstrip(b"\r\n"), 512)
            if conf.proxy_pass is not None:
                # Our static route: the backend decides, its refusal is an ordinary failure.
                self.info('client login failed: "%s"' % text)
                self.send_close(e.reply)
            if conf.proxy_pass_error_message:
                self.info('upstream sent invalid response: "%s"' % text)
                self.send_close(e.reply)
            self.error('upstream sent invalid response: "%s"' % text)
            self.internal_error()
        self.action = None
        self.info("client logged in")
        self.hand_over(conn, reply)

    # ---- TLS to the backend (proxy_ssl, Auth-SSL-Backend) -------------------------------------

    def backend_tls(self, conn, host):
        """proxy_ssl (or the auth service's Auth-SSL-Backend): implicit TLS, or the protocol's
        STARTTLS exchange (`backend_starttls`) then TLS, before the backend login.  The greeting
        read before STARTTLS is replayed to login_backend().  Raises backend.BackendError."""
        mode = getattr(self, "backend_ssl", None) or getattr(self.conf, "proxy_ssl", "off")
        if mode not in ("on", "starttls"):
            return
        try:
            ctx = backend.client_context(self.conf)
        except backend.BackendTLSConfigError as e:
            raise backend.BackendError(str(e)) from None
        name = getattr(self.conf, "proxy_ssl_name", None) or host
        greeting = None
        if mode == "starttls":
            self.action = "reading response from upstream"
            greeting = self.backend_starttls(conn)
        self.action = "SSL handshaking to upstream"
        conn.start_tls(ctx, name)
        if greeting is not None:
            conn.push_reply(greeting)

    def backend_starttls(self, conn):
        """Read the greeting, ask for TLS (STARTTLS/STLS) and read the go-ahead; return the
        greeting.  Protocol modules implement it."""
        raise backend.BackendError("STARTTLS to upstream is not available for %s"
                                   % self.protocol)

    def backend_reply(self, conn, ok_prefix=None, complete=None):
        """Read one backend reply during the login; BackendRejected unless it starts with
        `ok_prefix` (when given)."""
        self.action = "reading response from upstream"
        reply = conn.read_reply(complete)
        if ok_prefix is not None and not reply.startswith(ok_prefix):
            raise BackendRejected(reply)
        return reply

    def backend_step(self, conn, data, action, ok_prefix=None, complete=None):
        """Send one login step (logged as `action`) and read its reply, as backend_reply."""
        self.action = action
        conn.send(data)
        return self.backend_reply(conn, ok_prefix, complete)

    def proxy_header_out(self, backend_sock):
        """The PROXY header for the backend: the (real) client and our listening side."""
        local = self.sock.getsockname()
        if self.conf.proxy_protocol == "v2":
            return proxy_protocol.v2_header(self.client_ip, self.client_port, local[0], local[1])
        return proxy_protocol.v1_header(self.client_ip, self.client_port, local[0], local[1])

    def relay_client_buffer(self):
        """Limit of unsent client -> backend data in the relay: proxy_buffer, as for the other
        direction (the *_client_buffer limits are the longest command before login)."""
        return self.conf.proxy_buffer

    def hand_over(self, conn, reply):
        conf = self.conf
        pending = self.reader.take()

        def done(stats, self=self):
            # nginx's own line for a timeout or shutdown, then always the end-of-session line
            # with what nginx does not log: bytes each way and duration, in nginx stream's
            # "bytes from/to client:%O/%O" shape (ngx_stream_proxy_process): no "client: "
            # after the real client field, which greedy log filters would take instead.
            if self.ticket is not None:
                self.ticket.release()
            if stats.reason == "client timed out":
                self.action = "proxying"
                self.info("client timed out", err=errno_mod.ETIMEDOUT)
            elif stats.reason.startswith("shutdown"):
                self.action = None
                self.info("shutdown timeout")
            self.action = None
            self.info("proxied session done",
                      tail=", bytes from/to client:%d/%d, duration: %.3fs (%s)"
                      % (stats.bytes_in, stats.bytes_out, stats.duration, stats.reason))

        if self.ticket is not None:
            self.ticket.logged_in()
        try:
            self.rt.relay.add(self.sock, conn.sock, to_backend=pending, to_client=reply,
                              client_buffer=self.relay_client_buffer(),
                              proxy_buffer=conf.proxy_buffer, proxy_timeout=conf.proxy_timeout,
                              on_done=done, name="*%d" % self.conn,
                              nodelay=False)    # both have TCP_NODELAY (listener, backend.connect)
        except BaseException:
            conn.close()        # the client socket is closed by run(); the backend's is ours
            raise
        raise HandedOver()
