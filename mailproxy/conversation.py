"""Protocol conversations without I/O: what a session feeds in and the actions it gets back.

A protocol module (pop3.py, imap.py, smtp.py) holds two state machines, as nginx's
ngx_mail_<proto>_auth_state and ngx_mail_proxy_<proto>_handler are:

* a `Conversation`, the client side before login: `start()` for the greeting, `receive(line)`
  for each client line, `too_long(data)`, `tls_started()`, `auth_failed(result, retry)`; each
  returns a list of actions (`Reply`, `Log`, `Close`, `StartTLS`, `Authenticate`, and SMTP's
  `ResolveClient` / `WaitQuiet` / `RestartTimer`);
* a `BackendLogin`, the login replayed to the backend: `receive(reply)` for each backend reply
  returns `ToBackend`, `BackendStartTLS` or `LoggedIn` actions and raises `BackendRejected` or
  `LoginError`.

session.py is the one place that performs the actions (sockets, auth service, relay); tests
feed events and compare actions (tests/unit/).  A subclass overrides `greeting()`,
`handle_line()`, the `cmd_<VERB>` methods it dispatches to, `too_long_reply()`,
`auth_failed_reply()`, `auth_request_fields()` and `backend_login()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Collection, List, NoReturn, Optional, Tuple, Type

from . import oauth, sasl
from .clientio import Refused
from .log import sanitize

if TYPE_CHECKING:
    from .auth_http import AuthResult

# A server's configuration (config.ServerConf), as Any: the config package imports the protocol
# modules (through protocols.py), so importing it here, even for annotations, is a cycle.
Conf = Any


# ---- the descriptor -------------------------------------------------------------------------

@dataclass(frozen=True)
class Protocol:
    """What the rest of the proxy needs to know of a protocol, as nginx's `ngx_mail_protocol_t`;
    each protocol module defines its own (`PROTOCOL`), protocols.py lists them."""
    name: str               # the `protocol` directive's value
    ports: Tuple[int, ...]  # listen ports that imply it when `protocol` is not set
    alpn: bytes             # its ALPN name (ngx_mail_ssl_alpn_select)
    cert_error: bytes       # after the handshake: the certificate did not verify
    no_cert: bytes          # after the handshake: a required certificate is missing
    internal_error: bytes   # a failure of ours or of the auth service / backend
    temp_failure: bytes     # instead of the greeting when a limit refuses (limits.py);
                            # `%s` is the server_name where the protocol names itself
    sasl_order: Tuple[Tuple[str, str], ...]   # (method, advertised word) in nginx's order
    conversation: Type["Conversation"]        # the client side's state machine

    def busy_reply(self, conf: Conf) -> bytes:
        """The temporary-failure greeting for a connection a limit refuses."""
        if b"%s" not in self.temp_failure:
            return self.temp_failure
        return self.temp_failure % str(conf.server_name).encode("utf-8", "surrogateescape")

    def mechanisms(self, methods: Collection[str]) -> List[str]:
        """The SASL words advertised for the enabled `methods`, in nginx's order."""
        return [word for name, word in self.sasl_order if name in methods]


# ---- actions towards the client side -------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    """Send these bytes to the client."""
    data: bytes


@dataclass(frozen=True)
class Log:
    """Log `message` at `level`; the session adds its context (client, server, login)."""
    level: str
    message: str


@dataclass(frozen=True)
class Close:
    """End the session after the actions before it."""


CLOSE = Close()


@dataclass(frozen=True)
class StartTLS:
    """Drop pipelined client input, send `reply`, then the TLS handshake; the session then calls
    `tls_started()` (ngx_mail_starttls_handler)."""
    reply: bytes


@dataclass(frozen=True)
class Authenticate:
    """Credentials are complete: ask the auth service (or take proxy_pass), then log in to the
    backend with `backend_login()`, or call `auth_failed()`."""
    method: str
    login: Optional[bytes]
    passwd: Optional[bytes]


@dataclass(frozen=True)
class ResolveClient:
    """Look up the client's name (resolver.py); the session calls `resolved(host)`."""


@dataclass(frozen=True)
class WaitQuiet:
    """Wait `seconds` for client input (smtp_greeting_delay); the session calls `quiet()`, or
    `talked_first(data)` when the client sent something."""
    seconds: float


@dataclass(frozen=True)
class RestartTimer:
    """Give the conversation a fresh `timeout` from now (ngx_mail_smtp_greeting)."""


# ---- actions towards the backend --------------------------------------------------------------

@dataclass(frozen=True)
class ToBackend:
    """Send `data` to the backend (logged as `action`); `discard` drops what the backend sent
    beyond the reply read so far (ngx_mail_proxy_smtp_handler resets its buffer)."""
    data: bytes
    action: str
    discard: bool = False


@dataclass(frozen=True)
class BackendStartTLS:
    """The backend agreed to STARTTLS/STLS: the TLS handshake now (proxy_ssl starttls)."""


@dataclass(frozen=True)
class LoggedIn:
    """The backend accepted the login; `reply` is owed to the client before relaying."""
    reply: bytes


class LoginError(Exception):
    """The backend login cannot go on; str() is the error-level log line, `action` what the
    proxy was doing (the client gets the protocol's internal error)."""

    def __init__(self, message: str, action: str = "reading response from upstream"):
        super().__init__(message)
        self.action = action


class StartTLSRefused(Exception):
    """The backend did not agree to STARTTLS/STLS; `reply` is what it said."""

    def __init__(self, reply: bytes):
        super().__init__("upstream refused STARTTLS")
        self.reply = reply


class Peer:
    """Where the client is and where it connected: the addresses a backend login may carry
    (XCLIENT, IMAP ID).  `local` is our accepting address, asked of `sockname` (the session's
    getsockname) only when a login reads it: most logins never do, and it is a system call;
    `proxied_local` is the destination a trusted PROXY header named (set_real_ip_from);
    `session_id` the session's id (Runtime.new_session_id), for IMAP ID's x-session-id."""

    __slots__ = ("ip", "port", "proxied_local", "session_id", "_local", "_sockname")

    def __init__(self, ip: Optional[str], port: Optional[int],
                 local: Optional[Tuple[str, int]] = None,
                 proxied_local: Optional[Tuple[str, int]] = None,
                 sockname: Optional[Callable[[], Optional[Tuple[str, int]]]] = None,
                 session_id: Optional[str] = None):
        self.ip, self.port, self.proxied_local = ip, port, proxied_local
        self.session_id = session_id
        self._local, self._sockname = local, sockname

    @property
    def local(self) -> Optional[Tuple[str, int]]:
        if self._local is None and self._sockname is not None:
            self._local, self._sockname = self._sockname(), None
        return self._local


# ---- the client side ------------------------------------------------------------------------

class _Stop(Exception):
    """Unwinds a command handler once its last action is queued; `_run` catches it, so a
    handler's helpers (finish, challenge, authenticate...) end the line wherever they stand."""


class Conversation:
    """One client's side of a protocol before login, as a state machine without I/O.

    Subclasses set `protocol`, `INVALID` and override `greeting()`, `handle_line(line)`,
    `too_long_reply(data)`, `auth_failed_reply(result)`; optionally `reset()` (back to the
    state after the greeting), `auth_request_fields()`, `backend_login(...)`.
    """

    protocol = ""
    INVALID = b""
    descriptor: Protocol        # set by the protocol module, next to its PROTOCOL

    def __init__(self, conf: Conf, tls: bool = False):
        self.conf = conf
        self.tls = tls                  # TLS is active (implicit TLS or after STARTTLS)
        self.errors = 0                 # parser errors, for max_errors
        self.login: Optional[bytes] = None
        self.passwd: Optional[bytes] = None
        self.salt: Optional[bytes] = None
        self.method: Optional[str] = None
        self.expect: Optional[Callable[[bytes], None]] = None  # the next line is a SASL response
        self.sasl_user: Optional[bytes] = None   # AUTH LOGIN's user name, before the password
        # the auth service's Auth-Method for the backend login ('plain': its Auth-Pass is a
        # password, not the client's token); set by the session with the answer
        self.backend_method: Optional[str] = None
        self._failure: Optional[Tuple[bytes, bool]] = None  # owed after an error challenge
        self._out: List[object] = []

    # ---- events -------------------------------------------------------------------------------

    def start(self) -> list:
        """The greeting."""
        return self._run(self.greeting)

    def receive(self, line: bytes) -> list:
        """One client line, with its LF."""
        if self.expect == self.sasl_error_response:
            self.expect = None
            return self._run(self.sasl_error_response, line)
        return self._run(self.handle_line, line)

    def too_long(self, data: bytes) -> list:
        """A command that did not fit in the client buffer: answered, then the session ends."""
        self.log("info", 'client sent too long command "%s"' % sanitize(data, 1024))
        self.say(self.too_long_reply(data))
        self._out.append(CLOSE)
        return self._take()

    def tls_started(self) -> list:
        """The STARTTLS handshake succeeded."""
        self.tls = True
        return self._take()

    def auth_failed(self, result: AuthResult, retry: bool) -> list:
        """The auth service refused the login; `retry`: Auth-Wait passed, the client may try
        again (ngx_mail_auth_http_process_headers), else the session ends.  A token login
        refused with Auth-Error-SASL gets the error challenge first (RFC 7628 section 3.2.3);
        the failure reply follows the client's dummy response."""
        challenge = result.sasl_error if self.method in oauth.METHODS else None
        self._refused(self.auth_failed_reply(result), retry, challenge)
        return self._take()

    def backend_refused(self, reply: bytes, challenge: Optional[bytes]) -> list:
        """The backend refused the login (BackendRejected relayed as a failure): its `reply`
        ends the session.  A token it refused with an error challenge (clientio's
        BackendRejected.challenge) gets that challenge as ours first, as the auth service's
        Auth-Error-SASL: the backend's failure reply follows the client's dummy response."""
        self._refused(reply, False, challenge)
        return self._take()

    def _refused(self, reply: bytes, retry: bool, challenge: Optional[bytes]) -> None:
        if challenge and self.method in oauth.METHODS:     # RFC 7628 section 3.2.3
            self._failure = (reply, retry)
            self.say(self.continuation(challenge))
            self.expect = self.sasl_error_response
            return
        self._failed(reply, retry)

    def sasl_error_response(self, line: bytes) -> None:
        """The line after the error challenge: ^A (XOAUTH2 clients send an empty line, some
        cancel with `*`); whatever it holds, the failure reply comes now."""
        reply, retry = self._failure or (self.INVALID, False)
        self._failure = None
        self._failed(reply, retry)

    def _failed(self, reply: bytes, retry: bool) -> None:
        self.say(reply)
        if not retry:
            self._out.append(CLOSE)
            return
        self.login = self.passwd = self.method = self.sasl_user = None
        self.expect = None
        self.reset()

    def next_input(self) -> Tuple[str, Optional[int]]:
        """What to read next: ("line", LIMIT) for a line of at most LIMIT bytes (None: the
        whole client buffer), or ("bytes", N) for exactly N bytes (an IMAP literal)."""
        return ("line", None)

    def buffer_size(self) -> int:
        """The client buffer: the longest command before login."""
        raise NotImplementedError

    # ---- overridables -------------------------------------------------------------------------

    def greeting(self) -> None:
        raise NotImplementedError

    def handle_line(self, line: bytes) -> None:
        raise NotImplementedError

    def too_long_reply(self, data: bytes) -> bytes:
        return self.INVALID

    def auth_failed_reply(self, result: AuthResult) -> bytes:
        raise NotImplementedError

    def reset(self) -> None:
        """Back to the state after the greeting (after a failed login with Auth-Wait)."""

    def auth_request_fields(self) -> dict:
        """Protocol fields of the auth request (AuthRequest attributes, e.g. SMTP's)."""
        return {}

    def backend_login(self, user: bytes, passwd: Optional[bytes], peer: Peer,
                      starttls: bool) -> "BackendLogin":
        raise NotImplementedError

    # ---- helpers for subclasses ------------------------------------------------------------

    def say(self, data: bytes) -> None:
        if data:
            self._out.append(Reply(data))

    def log(self, level: str, message: str) -> None:
        self._out.append(Log(level, message))

    def finish(self, data: bytes = b"") -> NoReturn:
        """Send `data`, then end the session."""
        self.say(data)
        self._out.append(CLOSE)
        raise _Stop()

    def stop(self) -> NoReturn:
        """The command is answered: nothing more to do for this line."""
        raise _Stop()

    def parse_error(self, reply: bytes) -> NoReturn:
        """A line rejected by the parser: counts towards max_errors (ngx_mail_read_command)."""
        self.errors += 1
        if self.errors >= self.conf.max_errors:
            self.log("info", "client sent too many invalid commands")
            self.finish(reply)
        self.say(reply)
        raise _Stop()

    def start_tls(self, reply: bytes) -> NoReturn:
        self._out.append(StartTLS(reply))
        raise _Stop()

    def authenticate(self, method: str, login: Optional[bytes],
                     passwd: Optional[bytes]) -> NoReturn:
        """Credentials are complete: refuse CR, LF or NUL in them (nothing a client sends may
        add a line towards the backend), then ask for authentication."""
        if not safe_credential(login) or not safe_credential(passwd):
            raise Refused()
        self.method, self.login, self.passwd = method, login, passwd
        self._out.append(Authenticate(method, login, passwd))
        raise _Stop()

    def mechanisms(self, methods: Collection[str]) -> List[str]:
        """The enabled SASL mechanism words in the protocol's advertising order."""
        return self.descriptor.mechanisms(methods)

    # ---- SASL steps shared by the protocols (nginx's ngx_mail_auth_plain, ..._login_username,
    # ..._login_password, ..._cram_md5, ..._external); a challenge is CONTINUE + text + CRLF

    CONTINUE = b"+ "            # SMTP: b"334 "
    EXTERNAL_PASSWD: Optional[bytes] = b""   # SMTP: None (the auth service must send one)

    def continuation(self, text: bytes) -> bytes:
        """A challenge line with `text` (base64); ManageSieve's is a quoted string."""
        return self.CONTINUE + text + b"\r\n"

    def challenge(self, text: bytes, step: Callable[[bytes], None]) -> NoReturn:
        """Send a continuation with `text` (base64); the client's next line goes to `step`."""
        self.say(self.continuation(text))
        self.expect = step
        raise _Stop()

    def auth_plain(self, response: bytes) -> NoReturn:
        login, passwd = sasl.decode_plain(response)
        self.authenticate("plain", login, passwd)

    def auth_login_username(self, response: bytes) -> NoReturn:
        # kept apart until the password comes: log lines name a login only once it is whole
        self.sasl_user = sasl.decode_login_username(response)
        self.challenge(sasl.PASSWORD_PROMPT, self.auth_login_password)

    def auth_login_password(self, response: bytes) -> NoReturn:
        self.authenticate("plain", self.sasl_user, sasl.decode_login_password(response))

    def auth_cram_md5(self, response: bytes) -> NoReturn:
        login, digest = sasl.decode_cram_md5(response)
        self.authenticate("cram-md5", login, digest)

    def auth_external(self, response: bytes) -> NoReturn:
        self.authenticate("external", sasl.decode_external(response), self.EXTERNAL_PASSWD)

    def auth_token(self, mech: bytes, initial: Optional[bytes]) -> NoReturn:
        """OAUTHBEARER / XOAUTH2 (`mech`): the initial response, or first an empty challenge."""
        step = self.auth_oauthbearer if mech == b"OAUTHBEARER" else self.auth_xoauth2
        if initial is None:
            self.challenge(b"", step)
        step(initial)

    def auth_oauthbearer(self, response: bytes) -> NoReturn:
        user, token = oauth.decode_oauthbearer(response)
        self.authenticate("oauthbearer", user, token)

    def auth_xoauth2(self, response: bytes) -> NoReturn:
        user, token = oauth.decode_xoauth2(response)
        self.authenticate("xoauth2", user, token)

    def token_mechanism(self) -> Optional[str]:
        """The backend login's token mechanism: the client's, unless the auth service answered
        with a password (Auth-Method: plain with Auth-Pass); None for a password login."""
        if self.method not in oauth.METHODS or self.backend_method == "plain":
            return None
        return self.method

    def cram_md5_challenge(self) -> NoReturn:
        """The CRAM-MD5 challenge, with the session's salt (made once, as nginx's s->salt)."""
        if self.salt is None:
            self.salt = sasl.make_salt(self.conf.server_name)
        self.challenge(sasl.cram_md5_challenge(self.salt), self.auth_cram_md5)

    def _run(self, handler, *args) -> list:
        try:
            handler(*args)
        except _Stop:
            pass
        return self._take()

    def _take(self) -> list:
        out, self._out = self._out, []
        return out


def safe_credential(value: Optional[bytes]) -> bool:
    """True when a login or password (or None) can be written into a protocol line as it is."""
    return value is None or sasl.check_credential(value)


# ---- the backend login -----------------------------------------------------------------------

class BackendLogin:
    """The login replayed to a backend, as a state machine without I/O.

    The session reads one backend reply at a time (with `complete` deciding when a reply is
    whole; None means one line) and passes it to `receive()`, which returns the actions to
    take before the next read.  `state` is the name of the step awaiting that reply.
    """

    READING = "reading response from upstream"

    def __init__(self):
        self.complete: Optional[Callable[[bytes], bool]] = None
        self.state = "greeting"

    def receive(self, reply: bytes) -> list:
        return getattr(self, "on_" + self.state)(reply)

    def send(self, data: bytes, action: str, state: str,
             complete: Optional[Callable[[bytes], bool]] = None,
             discard: bool = False) -> ToBackend:
        """The next step: send `data`, then await a reply in `state`."""
        self.state = state
        self.complete = complete
        return ToBackend(data, action, discard)
