"""SMTP: the client side before login (ngx_mail_smtp_handler.c) and the backend login.

Client side: client host name resolution before the greeting (resolver.py), `smtp_greeting_delay`
(a client that talks first is refused), HELO/EHLO, AUTH PLAIN/LOGIN/CRAM-MD5/EXTERNAL, RSET,
NOOP, QUIT, and `smtp_auth none` (MAIL and RCPT collected; RCPT starts authentication with method
none). Commands are handled one at a time, so pipelined input works; unlike nginx, a rejected
MAIL does not damage commands pipelined after it (nginx's ngx_mail_smtp_log_rejected_command
turns CR and LF into `_` in its receive buffer; README "Differences from nginx").

Backend login: a small state machine (as ngx_mail_proxy_smtp_handler): greeting, EHLO/HELO with
`server_name`, XCLIENT (optionally with PORT/DESTADDR/DESTPORT, `xclient_extended`), the client's
HELO/EHLO replayed, then MAIL+RCPT (none), AUTH PLAIN (`proxy_smtp_auth`) or nothing;
`235 2.0.0 OK` to the client except in none mode, where the backend's RCPT reply is the answer.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Collection, Iterable, List, Optional, Union

from . import oauth, resolver, sasl
from .clientio import BackendRejected, Refused, strip_eol
from .conversation import (CLOSE, BackendLogin, BackendStartTLS, Conversation, LoggedIn,
                           LoginError, Log, Peer, Protocol, Reply, ResolveClient, RestartTimer,
                           StartTLSRefused, WaitQuiet)
from .log import sanitize

if TYPE_CHECKING:
    from .auth_http import AuthResult
    from .conversation import Conf, ToBackend

CRLF = b"\r\n"

OK = b"250 2.0.0 OK\r\n"
BYE = b"221 2.0.0 Bye\r\n"
START_TLS = b"220 2.0.0 Start TLS\r\n"
INVALID = b"500 5.5.1 Invalid command\r\n"
INVALID_PIPELINING = b"503 5.5.0 Improper use of SMTP command pipelining\r\n"
INVALID_ARGUMENT = b"501 5.5.4 Invalid argument\r\n"
AUTH_REQUIRED = b"530 5.7.1 Authentication required\r\n"
BAD_SEQUENCE = b"503 5.5.1 Bad sequence of commands\r\n"
AUTH_OK = b"235 2.0.0 OK\r\n"
DEFAULT_ERROR_CODE = b"535 5.7.0"

# The words ngx_mail_smtp_parse_command knows; any other word is a parser error.
COMMANDS = frozenset(("HELO", "EHLO", "AUTH", "QUIT", "NOOP", "MAIL", "RSET", "RCPT",
                      "VRFY", "EXPN", "HELP", "STARTTLS"))
MAX_ARGS = 11

_LETTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


# ------------------------------------------------------------------------------------------------
# parsing (pure functions)

class Command:
    """A parsed command line: `verb` (upper case str), `args` (list of bytes) and `text`, the
    command as written from the verb to the end of its last argument (what MAIL/RCPT store)."""

    __slots__ = ("verb", "args", "text")

    def __init__(self, verb: str, args: List[bytes], text: bytes):
        self.verb, self.args, self.text = verb, args, text

    def __eq__(self, other):
        return (isinstance(other, Command)
                and (self.verb, self.args, self.text) == (other.verb, other.args, other.text))

    def __repr__(self):
        return "Command(%r, %r, %r)" % (self.verb, self.args, self.text)


def _split_args(rest):
    """Space-separated arguments (only the space separates; tabs belong to an argument)."""
    return [a for a in rest.split(b" ") if a]


def parse_command(line: bytes) -> Optional[Command]:
    """A Command for one client line (with its LF), or None for a parser error.

    The command word is four letters (HELO EHLO AUTH QUIT NOOP MAIL RSET RCPT VRFY EXPN HELP)
    or STARTTLS, case-insensitive, ended by a space or the line end; at most eleven arguments.
    """
    content = strip_eol(line)
    if content is None:
        return None
    word, _sep, rest = content.partition(b" ")
    if len(word) not in (4, 8) or any(c not in _LETTERS for c in word):
        return None
    verb = word.decode("ascii").upper()
    if verb not in COMMANDS:
        return None
    args = _split_args(rest)
    if len(args) > MAX_ARGS:
        return None
    text = content.rstrip(b" ") if args else word
    return Command(verb, args, text)


def parse_sasl_response(line: bytes) -> Optional[bytes]:
    """The SASL response token of the line after a 334 prompt, or None for a parser error.

    nginx reads this line as bare arguments: the first one is the response (possibly empty),
    later ones are ignored (but there may be no more than eleven).
    """
    content = strip_eol(line)
    if content is None:
        return None
    first, _sep, rest = content.partition(b" ")
    if len(_split_args(rest)) + 1 > MAX_ARGS:
        return None
    return first


def xtext(value: bytes) -> bytes:
    """RFC 1891 xtext, as nginx 1.29.2+ encodes XCLIENT LOGIN: `+XX` for bytes outside
    0x21-0x7E and for `+` and `=`."""
    out = bytearray()
    for b in value:
        if b < 0x21 or b > 0x7E or b in (0x2B, 0x3D):
            out += b"+%02X" % b
        else:
            out.append(b)
    return bytes(out)


def xclient_addr(ip: Optional[str]) -> bytes:
    """XCLIENT ADDR/DESTADDR value: IPv6 addresses carry the `IPV6:` prefix."""
    ip = str(ip)
    if ":" in ip:
        return b"IPV6:" + ip.encode("ascii", "replace")
    return ip.encode("ascii", "replace")


def reply_complete(buf: bytes) -> bool:
    """True when the last line of `buf` (ending in CRLF) is not a `DDD-` continuation line:
    a whole (multi-line) SMTP reply from the backend."""
    end = len(buf) - 2
    start = buf.rfind(b"\n", 0, end) + 1
    line = buf[start:end]
    return not (len(line) >= 4 and line[3:4] == b"-")


def ehlo_reply(name: Union[str, bytes], capabilities: Iterable[Union[str, bytes]],
               methods: Collection[str], starttls: str = "off", tls: bool = False) -> bytes:
    """The EHLO reply as bytes, composed as ngx_mail_smtp_merge_srv_conf does."""
    lines = [name]
    lines += list(capabilities)
    mechs = PROTOCOL.mechanisms(methods)
    auth_line = ("AUTH " + " ".join(mechs)) if mechs else None
    if not tls and starttls == "only":
        lines.append("STARTTLS")
    else:
        if auth_line:
            lines.append(auth_line)
        if not tls and starttls == "on":
            lines.append("STARTTLS")
    out = []
    for i, line in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        raw = line if isinstance(line, bytes) else line.encode("utf-8", "surrogateescape")
        out.append(b"250" + sep.encode() + raw + CRLF)
    return b"".join(out)


def auth_mechanisms(reply: bytes) -> Optional[List[bytes]]:
    """The mechanisms of an EHLO reply's AUTH line (`AUTH=` too, as old servers write it), in
    upper case; None without one (nothing to choose by: nginx's AUTH PLAIN then)."""
    for line in reply.upper().split(CRLF)[1:]:
        word = line[4:]
        if word.startswith(b"AUTH ") or word.startswith(b"AUTH="):
            return word[5:].split()
    return None


def rejected_text(data: bytes) -> str:
    """What `client was rejected...` logs: the bytes with CR and LF shown as `_` (a copy)."""
    return sanitize(bytes(data).replace(b"\r", b"_").replace(b"\n", b"_"), 1024)


# ------------------------------------------------------------------------------------------------
# the client side (ngx_mail_smtp_auth_state)

class SmtpConversation(Conversation):
    """The client side before login; `expect` is the SASL step awaiting the next line."""

    protocol = "smtp"
    INVALID = INVALID
    CONTINUE = b"334 "
    EXTERNAL_PASSWD = None      # no password: the auth service must send Auth-Pass for
                                # proxy_smtp_auth

    def __init__(self, conf: Conf, tls: bool = False):
        super().__init__(conf, tls)
        self.host = resolver.UNAVAILABLE    # Client-Host / XCLIENT NAME
        self.helo: Optional[bytes] = None   # the client's HELO/EHLO argument
        self.esmtp = False                  # the client's last greeting was EHLO
        self.smtp_from: Optional[bytes] = None  # whole MAIL command (none mode)
        self.smtp_to: Optional[bytes] = None    # whole RCPT command (none mode)

    def buffer_size(self) -> int:
        return self.conf.smtp_client_buffer

    def _name(self) -> bytes:
        return str(self.conf.server_name).encode("utf-8", "surrogateescape")

    # ---- before the greeting: the client's name, smtp_greeting_delay -----------------------

    def greeting(self) -> None:
        if self.conf.resolver is None:
            self._out += self.resolved(resolver.UNAVAILABLE)
        else:
            self._out.append(ResolveClient())

    def resolved(self, host: str) -> list:
        """The client's name is known (or `[UNAVAILABLE]`/`[TEMPUNAVAIL]`)."""
        self.host = host
        delay = self.conf.smtp_greeting_delay or 0
        if delay > 0:
            return [WaitQuiet(delay)]
        return self.quiet()

    def quiet(self) -> list:
        """The client waited for the greeting: send it (with a fresh `timeout`)."""
        return [RestartTimer(), Reply(b"220 " + self._name() + b" ESMTP ready\r\n")]

    def talked_first(self, data: bytes) -> list:
        """The client sent `data` before the greeting delay ended: refused."""
        return [Log("info", 'client was rejected before greeting: "%s"' % rejected_text(data)),
                Reply(INVALID_PIPELINING), CLOSE]

    # ---- line loop --------------------------------------------------------------------------------

    def handle_line(self, line: bytes) -> None:
        expect, self.expect = self.expect, None
        if expect is not None:
            token = parse_sasl_response(line)
            if token is None:
                self.parse_error(INVALID)
            self._guarded(expect, token)
            return
        cmd = parse_command(line)
        if cmd is None:
            self.parse_error(INVALID)
        self._guarded(getattr(self, "cmd_" + cmd.verb), cmd)

    def _guarded(self, handler, arg):
        try:
            handler(arg)
        except Refused:
            self.say(INVALID)
        except sasl.SaslError as e:
            self.log("info", str(e))
            self.say(INVALID)

    def starttls_only(self) -> bool:
        return self.conf.starttls == "only" and not self.tls

    def auth_failed_reply(self, result: AuthResult) -> bytes:
        code = result.error_code
        if isinstance(code, str):
            code = code.encode("utf-8", "surrogateescape")
        message = result.message
        if isinstance(message, str):
            message = message.encode("utf-8", "surrogateescape")
        return (code or DEFAULT_ERROR_CODE) + b" " + message + CRLF

    def auth_request_fields(self) -> dict:
        fields = {"client_host": self.host}
        if self.method == "none":
            fields.update(smtp_helo=self.helo or b"", smtp_from=self.smtp_from or b"",
                          smtp_to=self.smtp_to or b"")
        return fields

    # ---- commands -------------------------------------------------------------------------------

    def _greeting(self, cmd) -> bool:
        if len(cmd.args) != 1:
            self.say(INVALID_ARGUMENT)
            return False
        self.helo = cmd.args[0]
        self.smtp_from = self.smtp_to = None
        return True

    def cmd_HELO(self, cmd: Command) -> None:
        if self._greeting(cmd):
            self.esmtp = False
            self.say(b"250 " + self._name() + CRLF)

    def cmd_EHLO(self, cmd: Command) -> None:
        if self._greeting(cmd):
            self.esmtp = True
            conf = self.conf
            self.say(ehlo_reply(self._name(), conf.smtp_capabilities, conf.smtp_auth,
                                conf.starttls, self.tls))

    def cmd_AUTH(self, cmd: Command) -> None:
        if self.starttls_only():
            raise Refused()
        args = cmd.args
        if not args:
            self.say(INVALID_ARGUMENT)
            return
        methods = self.conf.smtp_auth
        mech = args[0].upper()
        if mech == b"LOGIN":
            if len(args) > 2:
                raise Refused()
            if len(args) == 1:
                self.challenge(sasl.USERNAME_PROMPT, self.auth_login_username)
            self.auth_login_username(args[1])
        elif mech == b"PLAIN":
            if len(args) > 2:
                raise Refused()
            if len(args) == 1:
                self.challenge(b"", self.auth_plain)
            self.auth_plain(args[1])
        elif mech == b"CRAM-MD5":
            if len(args) != 1 or "cram-md5" not in methods:
                raise Refused()
            self.cram_md5_challenge()
        elif mech == b"EXTERNAL":
            if len(args) > 2 or "external" not in methods:
                raise Refused()
            if len(args) == 1:
                self.challenge(sasl.USERNAME_PROMPT, self.auth_external)
            self.auth_external(args[1])
        elif oauth.MECHANISMS.get(mech) in methods:
            if len(args) > 2:
                raise Refused()
            self.auth_token(mech, args[1] if len(args) == 2 else None)
        else:
            raise Refused()

    def cmd_MAIL(self, cmd: Command) -> None:
        if "none" not in self.conf.smtp_auth:
            # log a copy: nginx's ngx_mail_smtp_log_rejected_command mangles the buffer itself
            self.log("info", 'client was rejected: "%s"' % rejected_text(cmd.text + CRLF))
            self.say(AUTH_REQUIRED)
            return
        if self.smtp_from:
            self.say(BAD_SEQUENCE)
            return
        if not cmd.args:
            self.say(INVALID_ARGUMENT)
            return
        self.smtp_from = cmd.text
        self.login = self.passwd = None        # 1.29.1: no stale credentials in none mode
        self.say(OK)

    def cmd_RCPT(self, cmd: Command) -> None:
        if not self.smtp_from:
            self.say(BAD_SEQUENCE)
            return
        if not cmd.args:
            self.say(INVALID_ARGUMENT)
            return
        self.smtp_to = cmd.text
        self.authenticate("none", None, None)

    def cmd_RSET(self, cmd: Command) -> None:
        self.smtp_from = self.smtp_to = None
        self.say(OK)

    def cmd_NOOP(self, cmd: Command) -> None:
        self.say(OK)

    def cmd_QUIT(self, cmd: Command) -> None:
        self.finish(BYE)

    def cmd_STARTTLS(self, cmd: Command) -> None:
        # As ngx_mail_smtp_starttls: only with `starttls on|only` and before TLS, else an
        # invalid command.
        if self.tls or self.conf.starttls not in ("on", "only"):
            raise Refused()
        # RFC 3207: forget what the client said before; drop pipelined input (CVE-2014-3556)
        self.helo = self.smtp_from = self.smtp_to = None
        # esmtp (the "client used EHLO" flag) is kept, as ngx_mail_smtp_starttls keeps s->esmtp
        self.start_tls(START_TLS)

    def cmd_VRFY(self, cmd: Command) -> None:
        raise Refused()

    cmd_EXPN = cmd_HELP = cmd_VRFY

    def backend_login(self, user: bytes, passwd: Optional[bytes], peer: Peer,
                      starttls: bool) -> SmtpLogin:
        # CRAM-MD5 / EXTERNAL without Auth-Pass: nothing to log in with (the password
        # passed on is the client's own digest, or none at all)
        usable = passwd is not None and not (self.method == "cram-md5" and passwd is self.passwd)
        return SmtpLogin(self.conf, self, user, passwd if usable else None, peer, starttls)


# ------------------------------------------------------------------------------------------------
# the backend login (ngx_mail_proxy_smtp_handler)

class SmtpLogin(BackendLogin):
    """Greeting, EHLO/HELO with server_name, XCLIENT, the client's HELO/EHLO replayed, then
    MAIL+RCPT (none), AUTH PLAIN (`proxy_smtp_auth`) or nothing.  `235 2.0.0 OK` goes to the
    client, except in none mode where the backend's RCPT reply is the answer.  With
    `proxy_smtp_auth starttls`, EHLO and STARTTLS first; EHLO is said again over TLS."""

    def __init__(self, conf: Conf, conv: SmtpConversation, user: bytes, passwd: Optional[bytes],
                 peer: Peer, starttls: bool = False):
        super().__init__()
        self.complete = reply_complete
        self.conf, self.user, self.passwd, self.peer = conf, user, passwd, peer
        self.starttls = starttls
        self.none = conv.method == "none"
        self.esmtp, self.helo, self.host = conv.esmtp, conv.helo, conv.host
        self.smtp_from, self.smtp_to = conv.smtp_from, conv.smtp_to
        self.name = conv._name()
        self.mech = conv.token_mechanism()      # a token login (proxy_smtp_auth)
        self.offered: Optional[List[bytes]] = None  # AUTH mechanisms of the backend's EHLO
        self.challenge: Optional[bytes] = None      # its error challenge, for the client

    def step(self, line: bytes, action: str, state: str) -> ToBackend:
        return self.send(line, action, state, reply_complete, discard=True)

    def xclient_line(self) -> bytes:
        conf, peer = self.conf, self.peer
        parts = [b"XCLIENT ADDR=" + xclient_addr(peer.ip)]
        if conf.xclient_extended and peer.port is not None:
            parts.append(b"PORT=%d" % int(peer.port))
        if self.user and not conf.proxy_smtp_auth:
            parts.append(b"LOGIN=" + xtext(self.user))
        parts.append(b"NAME=" + str(self.host).encode("ascii", "replace"))
        if conf.xclient_extended and peer.local is not None:
            parts.append(b"DESTADDR=" + xclient_addr(peer.local[0]))
            parts.append(b"DESTPORT=%d" % int(peer.local[1]))
        return b" ".join(parts) + CRLF

    def on_greeting(self, reply: bytes) -> list:
        if not reply.startswith(b"220"):
            raise BackendRejected(reply)
        if self.starttls:
            return [self.step(b"EHLO " + self.name + CRLF, "sending HELO/EHLO to upstream",
                              "tls_ehlo")]
        return [self.say_helo()]

    def on_tls_ehlo(self, reply: bytes) -> list:
        if not reply.startswith(b"250"):
            raise BackendRejected(reply)
        return [self.step(b"STARTTLS" + CRLF, "sending STARTTLS to upstream", "starttls")]

    def on_starttls(self, reply: bytes) -> list:
        if not reply.startswith(b"220"):
            raise StartTLSRefused(reply)
        return [BackendStartTLS(), self.say_helo()]

    def say_helo(self) -> ToBackend:
        verb = b"EHLO " if (self.esmtp or self.conf.xclient) else b"HELO "
        return self.step(verb + self.name + CRLF, "sending HELO/EHLO to upstream", "helo")

    def on_helo(self, reply: bytes) -> list:
        if not reply.startswith(b"250"):
            raise BackendRejected(reply)
        if self.esmtp or self.conf.xclient:     # said EHLO (say_helo)
            self.offered = auth_mechanisms(reply)
        if self.conf.xclient:
            return [self.step(self.xclient_line(), "sending XCLIENT to upstream", "xclient")]
        return self.after_xclient()

    def on_xclient(self, reply: bytes) -> list:
        if reply[:3] not in (b"220", b"250"):
            raise BackendRejected(reply)
        if self.helo:
            return [self.step((b"EHLO " if self.esmtp else b"HELO ") + self.helo + CRLF,
                              "sending client HELO/EHLO to upstream", "client_helo")]
        return self.after_xclient()

    def on_client_helo(self, reply: bytes) -> list:
        if not reply.startswith(b"250"):
            raise BackendRejected(reply)
        if self.esmtp:                  # the client's EHLO replayed: what the backend says now
            self.offered = auth_mechanisms(reply)
        return self.after_xclient()

    def after_xclient(self) -> list:
        if self.none:
            return [self.step(self.smtp_from + CRLF, "sending MAIL FROM to upstream", "from")]
        if self.conf.proxy_smtp_auth:
            if self.passwd is None:
                raise LoginError("no password available", "sending AUTH to upstream")
            return [self.send_auth(self.choose())]
        return [LoggedIn(AUTH_OK)]

    # ---- proxy_smtp_auth: the mechanism the backend's EHLO offers --------------------------

    def choose(self) -> bytes:
        """PLAIN, else LOGIN (as Exchange offers) for a password; the client's token mechanism,
        else the other one, for a token.  Without an AUTH line to read (HELO, or an EHLO reply
        without one), the first, as nginx sends AUTH PLAIN regardless."""
        if self.mech is None:
            wanted = [b"PLAIN", b"LOGIN"]
        else:
            wanted = sorted(oauth.MECHANISMS, key=lambda m: oauth.MECHANISMS[m] != self.mech)
        if self.offered is None:
            return wanted[0]
        for mech in wanted:
            if mech in self.offered:
                return mech
        raise LoginError('upstream offers no usable AUTH mechanism for a %s login (%s needed), '
                         'it offers "%s"' % ("token" if self.mech else "password",
                                             " or ".join(m.decode() for m in wanted),
                                             sanitize(b" ".join(self.offered), 256)),
                         "sending AUTH to upstream")

    def send_auth(self, mech: bytes) -> ToBackend:
        if mech == b"PLAIN":
            line = b"AUTH PLAIN " + sasl.encode_plain(self.user, self.passwd)
            return self.step(line + CRLF, "sending AUTH to upstream", "auth")
        if mech == b"LOGIN":
            return self.step(b"AUTH LOGIN" + CRLF, "sending AUTH to upstream", "login_user")
        self.mech = oauth.MECHANISMS[mech]
        line = b"AUTH " + mech + b" " + oauth.encode(self.mech, self.user, self.passwd)
        return self.step(line + CRLF, "sending AUTH to upstream", "token")

    def on_login_user(self, reply: bytes) -> list:
        if not reply.startswith(b"334"):
            raise BackendRejected(reply)
        return [self.step(base64.b64encode(self.user) + CRLF,
                          "sending user name to upstream", "login_pass")]

    def on_login_pass(self, reply: bytes) -> list:
        if not reply.startswith(b"334"):
            raise BackendRejected(reply)
        return [self.step(base64.b64encode(self.passwd) + CRLF,
                          "sending password to upstream", "auth")]

    def on_token(self, reply: bytes) -> list:
        if reply.startswith(b"334"):    # the error challenge: the dummy response, then 535
            self.challenge = oauth.backend_challenge(reply, b"334 ")
            return [self.step(oauth.dummy_response(self.mech) + CRLF,
                              "sending token to upstream", "token_error")]
        if not reply.startswith(b"235"):
            raise BackendRejected(reply, refused=True)
        return [LoggedIn(AUTH_OK)]

    def on_token_error(self, reply: bytes) -> list:
        raise BackendRejected(reply, refused=True, challenge=self.challenge)

    def on_from(self, reply: bytes) -> list:
        if not reply.startswith(b"250"):
            raise BackendRejected(reply)
        return [self.step(self.smtp_to + CRLF, "sending RCPT TO to upstream", "to")]

    def on_to(self, reply: bytes) -> list:
        return [LoggedIn(reply)]        # whatever the backend says to RCPT is the answer

    def on_auth(self, reply: bytes) -> list:
        if not reply.startswith(b"235"):
            raise BackendRejected(reply)
        return [LoggedIn(AUTH_OK)]


PROTOCOL = Protocol(
    "smtp", (25, 465, 587), b"smtp",
    cert_error=b"421 4.7.1 SSL certificate error\r\n",
    no_cert=b"421 4.7.1 No required SSL certificate\r\n",
    internal_error=b"451 4.3.2 Internal server error\r\n",
    temp_failure=b"421 4.7.0 %s Too many connections, try again later\r\n",
    sasl_order=(("plain", "PLAIN"), ("login", "LOGIN"), ("cram-md5", "CRAM-MD5"),
                ("external", "EXTERNAL"), ("oauthbearer", "OAUTHBEARER"),
                ("xoauth2", "XOAUTH2")),
    conversation=SmtpConversation)
SmtpConversation.descriptor = PROTOCOL
