"""One client connection before it is handed to the relay: the one place that does I/O.

A `Session` runs in the listener's handler thread.  It reads the PROXY header and does the TLS
handshake when the listen says so, then drives the protocol's `Conversation` (conversation.py;
pop3.py, imap.py, smtp.py): client lines in, actions out (replies, log lines, STARTTLS,
authenticate, close).  Authentication is shared: ask the auth service (or take the static
`proxy_pass` route), connect to the backend, run the protocol's `BackendLogin` over it, and hand
the socket pair to the process's relay.

Control flow is plain blocking code; `Close` unwinds it.
"""

from __future__ import annotations

import errno as errno_mod
import socket
import time
from typing import TYPE_CHECKING, Iterable, NoReturn, Optional

from . import auth_http, backend, ktimeout, limits, metrics, resolver, throttle
from . import tls                   # implicit TLS, STARTTLS
from . import realip                # PROXY protocol header in, set_real_ip_from
from .clientio import ClientClosed, ClientTimeout, Close, HandedOver, LineReader, LineTooLong
from .conversation import (Authenticate, Log, ResolveClient, Reply, RestartTimer, StartTLS,
                           WaitQuiet, safe_credential)
from .conversation import Close as CloseAction
from .log import addr_text, sanitize
from .session_log import SessionLog
from .session_backend import BackendSide
from .protocols import PROTOCOLS

if TYPE_CHECKING:
    from .config import Listen, ServerConf
    from .runtime import Runtime


class Session(SessionLog, BackendSide):
    """State and I/O of one client connection (one handler thread), for any protocol.

    Overridable (tests do): `run()`, `perform(actions)`, `authenticate()`,
    `connect_and_login()` (session_backend.py), `hand_over()`.
    """

    # A client socket's timeout is set again only when it would overshoot the deadline by
    # more than this (a quick login costs no extra system call).
    ARM_SLACK = 0.25

    def __init__(self, sock: socket.socket, client_address: Optional[tuple], conf: ServerConf,
                 listen: Optional[Listen], runtime: Runtime, timeout_set: bool = False,
                 ticket: Optional[limits.Ticket] = None, accepted: Optional[float] = None):
        """timeout_set: `sock` has conf.timeout as its kernel timeouts already (inherited
        from the listening socket, see listeners.Listener._set_inherited).  ticket: what
        limits.Admission admitted it with; accepted: time.monotonic() of the accept."""
        self.sock = sock
        self.ticket = ticket
        # `timeout` bounds the whole conversation before login, from the accept on, as nginx
        # arms it once (ngx_mail_init_session); a failed login with Auth-Wait arms it anew.
        self.started = accepted or time.monotonic()
        self.deadline = self.started + conf.timeout
        self._armed = conf.timeout      # the kernel timeouts now on the socket
        self.conf = conf
        self.listen = listen
        self.rt = runtime
        self.log = runtime.log_for(conf)
        self.conn = runtime.next_conn_id()
        self.session_id = runtime.new_session_id()
        self.debug = self.log.enabled("debug")      # the trace (session_log.py) costs nothing else
        self.access_log = runtime.access_logs.get(id(conf))
        self.outcome = None             # what ended it, when known (access_log.RESULTS)
        self.failed_logins = 0
        self.client_ip = client_address[0] if client_address else None
        self.client_port = client_address[1] if client_address else None
        self.server_text = self._server_text(listen)
        self.protocol = conf.protocol
        self.descriptor = PROTOCOLS[conf.protocol]
        self.conv = self.descriptor.conversation(conf)
        # Facts filled in by the PROXY-protocol and TLS steps (run, starttls_handshake).
        self.starttls_used = False
        self.proxy_header = None        # (src_ip, src_port, dst_ip, dst_port) received
        self.proxy_trusted = False      # the header came from a set_real_ip_from peer
        self.ssl_headers = []           # Auth-SSL-* (name, value) pairs
        self.tls_handshaked = False     # handshake done (close_notify on close)
        self.backend_ssl = None         # Auth-SSL-Backend (None: proxy_ssl)
        self.attempt = 0
        self.seat = None                # limit_sessions_per_user's count (throttle.take_seat)
        self.action = None              # the "while ..." part of log lines
        self.upstream = None
        self.reader = LineReader(sock, self.conv.buffer_size(), conf.timeout, self.arm)
        # `timeout` bounds every client read and write: set once, kept by the kernel
        # (no settimeout per call; see ktimeout).  The accepted socket is blocking.
        if not timeout_set:
            try:
                ktimeout.set(sock, conf.timeout)
            except OSError:
                sock.settimeout(conf.timeout)

    def restore_timeout(self) -> None:
        """After a temporary settimeout(): back to the session's own `timeout`."""
        if self.tls_handshaked:
            self.sock.settimeout(self.conf.timeout)   # TLS sockets keep Python's timeout
        else:
            self.sock.settimeout(None)                # blocking again: the kernel's limit

    def remaining(self) -> float:
        """Seconds left before the pre-login deadline (ClientTimeout when none)."""
        if self.deadline is None:
            return self.conf.timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ClientTimeout()
        return left

    def arm(self) -> None:
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

    def rearm(self) -> None:
        """A fresh `timeout` for the conversation (after a failed login with Auth-Wait)."""
        self.deadline = time.monotonic() + self.conf.timeout

    # ---- I/O ------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write one reply in one call, bounded by `timeout`."""
        if not data:
            return
        if self.debug:
            self.trace_reply(data)
        try:
            self.arm()
        except ClientTimeout:
            self.outcome = "timeout"
            self.info("client timed out", err=errno_mod.ETIMEDOUT)
            raise Close() from None
        try:
            self.sock.sendall(data)
        except ktimeout.TIMEOUT_ERRORS:
            self.outcome = "timeout"
            self.info("client timed out", err=errno_mod.ETIMEDOUT)
            raise Close() from None
        except OSError as e:
            self.info("send() failed", err=e.errno or errno_mod.EPIPE)
            raise Close() from None

    def send_close(self, data: bytes) -> NoReturn:
        self.send(data)
        raise Close()

    def internal_error(self) -> NoReturn:
        metrics.login(self.protocol, "error")       # the auth service or the backend failed
        self.outcome = "error"
        self.send_close(self.descriptor.internal_error)

    def perform(self, actions: Iterable[object]) -> None:
        """Carry out what the conversation asked for, in order: action `X` is `do_X(act)`
        (as http.server's do_<VERB>; a new action is one new method)."""
        for act in actions:
            handler = getattr(self, "do_" + type(act).__name__, None)
            if handler is None:
                raise TypeError("unknown action %r" % (act,))
            handler(act)

    def do_Reply(self, act: Reply) -> None:
        self.send(act.data)

    def do_Log(self, act: Log) -> None:
        self.logmsg(act.level, act.message)

    def do_Close(self, act: CloseAction) -> NoReturn:
        raise Close()

    def do_StartTLS(self, act: StartTLS) -> None:
        self.reader.discard()       # pipelined plaintext is never executed
        self.send(act.reply)
        self.starttls_handshake()
        self.perform(self.conv.tls_started())

    def do_Authenticate(self, act: Authenticate) -> None:
        self.authenticate()

    def do_ResolveClient(self, act: ResolveClient) -> None:
        self.perform(self.conv.resolved(self.resolve_client()))

    def do_WaitQuiet(self, act: WaitQuiet) -> None:
        self.perform(self.wait_quiet(act.seconds))

    def do_RestartTimer(self, act: RestartTimer) -> None:
        # nginx arms `timeout` at the SMTP greeting (ngx_mail_smtp_greeting): the client name
        # lookup and the greeting delay are not the client's time
        self.rearm()

    # ---- main loop --------------------------------------------------------------------------

    def run(self) -> None:
        handed = False
        self.rt.live.add(self)          # listed and kicked from now on (live.py)
        try:
            if self.log.enabled("info"):
                self.log.log("info", "client %s connected to %s, session: %s"
                             % (self._peer_text(), self.server_text, self.session_id), self.conn)
            # A load balancer's PROXY protocol header comes before anything else, TLS included
            # (ngx_mail_proxy_protocol_handler); may replace client_ip/client_port
            # (set_real_ip_from)
            if self.listen is not None and self.listen.proxy_protocol:
                self.action = "reading PROXY protocol"
                self.apply_proxy_header(realip.read_header(self.sock, self.conf, self.client_ip,
                                                           self.logmsg))
                self.recount()
            # implicit TLS: the handshake right after accept (ngx_mail_ssl_init_connection)
            if self.listen is not None and self.listen.ssl:
                self.action = "SSL handshaking"
                self.apply_handshake(tls.handshake(self.sock, self.conf, self.logmsg,
                                                   self.deadline))
            self.action = "sending client greeting line"
            self.perform(self.conv.start())
            while True:
                self.action = "in auth state"
                self.perform(self.conv.receive(self.next_input()))
        except HandedOver:
            handed = True
        except Close:
            pass
        except ClientTimeout:
            self.outcome = "timeout"
            self.info("client timed out", err=errno_mod.ETIMEDOUT)
        except ClientClosed as e:
            self.info(str(e), err=e.errno)
        except Exception as e:   # a bug must never reach the client as a traceback
            self.outcome = "error"
            self.logmsg("alert", "internal error: %s: %s" % (type(e).__name__, sanitize(str(e))))
            try:
                self.sock.settimeout(1.0)
                self.sock.sendall(self.descriptor.internal_error)
            except OSError:
                pass
        finally:
            if not handed:
                tls_info = self.tls_fields() if self.access_log is not None else None
                self.rt.live.remove(self)
                if self.tls_handshaked:         # close_notify first
                    tls.shutdown(self.sock)
                try:
                    self.sock.close()
                except OSError:
                    pass
                if self.ticket is not None:
                    self.ticket.release()
                throttle.release(self)
                self.access_prelogin(tls_info)

    def recount(self) -> None:
        """A trusted balancer's PROXY header named the real client: limit_conn_per_ip counts
        that address from now on (the balancer itself was exempt)."""
        if self.ticket is None or self.ticket.key is not None:
            return
        reason = self.ticket.retarget(self.client_ip)
        if reason is not None:
            adm = self.rt.admission
            metrics.count("connections_refused", reason)
            self.action = None
            held = adm.lines.allow((reason, limits.address_key(self.client_ip)), time.monotonic())
            tls = self.listen is not None and self.listen.ssl
            self.outcome = "refused"
            if held is not None:
                self.error(limits.refusal_text(reason, adm.limit_of(reason), held, tls))
            if tls:             # as Listener.refuse: no handshake for a refused client
                raise Close()
            self.send_close(self.descriptor.busy_reply(self.conf))

    def next_input(self) -> bytes:
        """The next client line (or the bytes of an IMAP literal, as the conversation asks);
        a command too long for the buffer is answered and closes."""
        kind, size = self.conv.next_input()
        try:
            data = (self.reader.read_exact(size) if kind == "bytes"
                    else self.reader.readline(size))
        except LineTooLong as e:
            self.perform(self.conv.too_long(e.data))
            raise Close() from None     # too_long() ends with Close: never reached
        if self.debug:
            self.trace_client(data, kind)
        return data

    # ---- STARTTLS (ngx_mail_starttls_handler) ------------------------------------------------

    def starttls_handshake(self) -> None:
        """After the positive STARTTLS/STLS reply (pipelined input already discarded)."""
        self.starttls_used = True       # nginx sets s->starttls before the handshake
        self.action = "SSL handshaking"
        self.apply_handshake(tls.handshake(self.sock, self.conf, self.logmsg, self.deadline))

    def apply_handshake(self, result: tls.Handshake) -> None:
        """Take over what tls.handshake returned: its socket (the SSLSocket even after a
        failure), then the Auth-SSL-* headers, or the refused certificate's line and close."""
        self.sock = self.reader.sock = result.sock
        self.tls_handshaked = result.done
        if result.reply is not None or not result.ok:
            self.outcome = "tls-failed"
        if result.reply is not None:
            self.send_close(result.reply)
        if not result.ok:
            raise Close()
        self.conv.tls = True            # the conversation answers as over TLS from now on
        self.ssl_headers = result.headers
        self.action = None

    def apply_proxy_header(self, header: realip.ProxyHeader) -> None:
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

    def authenticate(self) -> None:
        """Credentials are complete: route the user, log in to the backend, start relaying.

        Returns only when the client may try again (auth failure with Auth-Wait); otherwise
        raises Close or HandedOver.
        """
        conf, conv = self.conf, self.conv
        self.attempt += 1
        # The conversation's deadline stops here, as nginx deletes its timer in ngx_mail_auth:
        # the auth service and the backend login have their own; replies owed to the client
        # are bounded per write by `timeout`.
        self.deadline = None
        user, passwd = conv.login, conv.passwd
        throttle.before_auth(self)      # login_block, login_penalty (may close, or wait)
        if conf.auth_http is not None:
            self.action = "in http auth state"
            req = auth_http.AuthRequest(
                method=conv.method, user=conv.login or b"", passwd=conv.passwd or b"",
                salt=conv.salt, protocol=self.protocol, attempt=self.attempt,
                client_ip=self.client_ip or "", client_host=None, proxy=self.proxy_header,
                ssl=self.ssl_headers, headers=conf.auth_http_header, session_id=self.session_id)
            for name, value in conv.auth_request_fields().items():
                setattr(req, name, value)
            try:
                res = self.rt.auth.query(conf, req, log=self.logmsg,
                                         sleep=self.rt.shutting_down.wait,
                                         trace=self.trace_auth if self.debug else None)
            except auth_http.AuthHttpError as e:
                self.error(str(e))
                self.internal_error()
            if res.status != "OK":
                metrics.login(self.protocol, "failed")
                throttle.after_auth(self, False, user, passwd)
                self.failed_logins += 1
                self.info('client login failed: "%s"' % sanitize(res.message))
                if res.wait:                        # at most auth_http.MAX_AUTH_WAIT
                    if self.rt.shutting_down.wait(res.wait):
                        self.perform(conv.auth_failed(res, retry=False))  # not on the way out
                        return              # (an error challenge first: RFC 7628 3.2.3)
                    self.rearm()
                    self.perform(conv.auth_failed(res, retry=True))
                    return
                self.perform(conv.auth_failed(res, retry=False))
                return                      # the error challenge awaits the client's answer
            if res.user is not None:
                user = conv.login = res.user
            if res.passwd is not None:
                passwd = res.passwd
            conv.backend_method = res.method        # token logins: a password instead
            host, port = res.server, res.port
            self.backend_ssl = res.ssl_backend      # ours: Auth-SSL-Backend (None: config)
        else:
            target = self.static_route(user, passwd)    # proxy_pass or proxy_map's backends
            if target is None:
                return                      # no proxy_map line: the protocol's failure sent
            host, port = target
        self.upstream = addr_text(host, port)
        if not safe_credential(user) or not safe_credential(passwd):
            # Only the auth service can get here (Auth-User/Auth-Pass); clients are checked.
            self.error("auth http server sent a login or password with CR, LF or NUL")
            self.internal_error()
        throttle.take_seat(self, user)
        self.connect_and_login(host, port, user, passwd)

    # ---- the client's name (SMTP: Client-Host, XCLIENT NAME) ------------------------------

    def resolve_client(self) -> str:
        """resolver.py's answer for the client address; the error it reports is logged."""
        conf = self.conf
        self.action = "in resolving client address"
        host, msg = resolver.client_name(self.client_ip, conf.resolver, conf.resolver_timeout)
        if msg is not None:
            self.action = msg.action
            self.error(str(msg))
        self.action = "sending client greeting line"
        return host

    def wait_quiet(self, delay: float) -> list:
        """smtp_greeting_delay: wait for client input; the conversation's answer to either."""
        self.action = "in delay pipelining state"
        self.sock.settimeout(delay)
        try:
            data = self.sock.recv(self.reader.limit)
        except socket.timeout:      # not TimeoutError: on Python 3.9 it is an OSError only
            self.action = "sending client greeting line"
            return self.conv.quiet()
        except OSError as e:
            self.info("recv() failed", err=e.errno or errno_mod.ECONNRESET)
            raise Close() from None
        finally:
            self.restore_timeout()
        if not data:
            self.info("client closed connection")
            raise Close()
        return self.conv.talked_first(data)

    def hand_over(self, conn: backend.BackendConn, reply: bytes) -> NoReturn:
        conf = self.conf
        pending = self.reader.take()

        def done(stats, self=self):
            # nginx's own line for a timeout or shutdown, then always the end-of-session line
            # with what nginx does not log: bytes each way and duration, in nginx stream's
            # "bytes from/to client:%O/%O" shape (ngx_stream_proxy_process): no "client: "
            # after the real client field, which greedy log filters would take instead.
            if self.ticket is not None:
                self.ticket.release()
            throttle.release(self)
            self.rt.live.remove(self)
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
            self.access_relayed(stats, tls_info)

        tls_info = self.tls_fields() if self.access_log is not None else None
        if self.debug:
            self.trace("handing over to the relay, %d bytes pending to upstream, %d to client"
                       % (len(pending), len(reply)))

        if self.ticket is not None:
            self.ticket.logged_in()
        try:
            self.rt.relay.add(self.sock, conn.sock, to_backend=pending, to_client=reply,
                              client_buffer=conf.proxy_buffer,   # as the other way
                              proxy_buffer=conf.proxy_buffer, proxy_timeout=conf.proxy_timeout,
                              on_done=metrics.relayed(self.protocol, done),
                              name=self.relay_name,
                              nodelay=False)    # both have TCP_NODELAY (listener, backend.connect)
        except BaseException:
            metrics.count("relayed_sessions", self.protocol, n=-1)
            conn.close()        # the client socket is closed by run(); the backend's is ours
            raise
        self.rt.live.relayed(self)
        raise HandedOver()
