"""ManageSieve (RFC 5804): the client side before login and the backend login, as state machines
without I/O (conversation.py), shaped as imap.py (nginx never had this protocol).

A command is a word and arguments, each a quoted string, a literal (`{n+}` or `{n}` at the line
end, then n bytes; no continuation is said for either, the protocol has none) or a number; a
command with literals arrives in several inputs, kept in `parts` and parsed again until whole,
the whole bounded by `sieve_client_buffer`.  A SASL continuation is a string too (a challenge
`"base64"`, the client's answer `"base64"` or a literal, `"*"` cancels).
"""

from __future__ import annotations

import base64
import re
from typing import TYPE_CHECKING, List, NoReturn, Optional, Tuple, Union

from . import oauth, sasl
from .clientio import BackendRejected, Refused
from .conversation import (BackendLogin, BackendStartTLS, Conversation, LoggedIn, Peer,
                           Protocol, StartTLSRefused)

if TYPE_CHECKING:
    from .auth_http import AuthResult
    from .conversation import Conf, ToBackend

CRLF = b"\r\n"
GREETING_OK = b'OK "ManageSieve ready"\r\n'
INVALID = b'NO "Invalid command"\r\n'
AUTH_FIRST = b'NO "Authenticate first"\r\n'
NO_MECH = b'NO "Unsupported authentication mechanism"\r\n'
ENCRYPT_NEEDED = b'NO (ENCRYPT-NEEDED) "Use STARTTLS first"\r\n'
CANCELLED = b'NO "Authentication cancelled"\r\n'
TOO_MANY = b'BYE "Too many invalid commands"\r\n'
TOO_LONG = b'BYE "Too long command"\r\n'

MAX_QUOTED = 1024           # RFC 5804 section 4: quoted = DQUOTE *1024QUOTED-CHAR DQUOTE
MAX_ARGS = 3
# what may be said before login; the rest of RFC 5804's commands need it (AUTH_FIRST)
COMMANDS = frozenset(("AUTHENTICATE", "CAPABILITY", "STARTTLS", "NOOP", "LOGOUT"))
LATER = frozenset(("HAVESPACE", "PUTSCRIPT", "LISTSCRIPTS", "SETACTIVE", "GETSCRIPT",
                   "DELETESCRIPT", "RENAMESCRIPT", "CHECKSCRIPT", "UNAUTHENTICATE"))

_WORD = re.compile(rb"[A-Za-z]+")
_NUMBER = re.compile(rb"[0-9]{1,10}")
_QUOTED = re.compile(rb'"((?:[^"\\\r\n\x00]|\\["\\])*)"')
_LITERAL = re.compile(rb"\{([0-9]{1,10})\+?\}\r?\n\Z")     # ends its line
_STATUS = re.compile(rb"(?i)(OK|NO|BYE)(?=[ (\r\n])")

Arg = Union[bytes, int]


def quote(value: Union[str, bytes]) -> bytes:
    """A quoted string (RFC 5804 section 4), `\\` and `"` escaped."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def capability_lines(conf: Conf, tls: bool) -> bytes:
    """The capability response without its OK: `sieve_capabilities` (each `NAME value`), then
    SASL (the enabled `sieve_auth` mechanisms; none before STARTTLS with `starttls only`, RFC
    5804 section 2.1) and STARTTLS while it is offered."""
    lines = []
    for item in conf.sieve_capabilities:
        name, _, value = item.strip().partition(" ")
        value = value.strip()
        lines.append(quote(name.upper()) + (b" " + quote(value) if value else b""))
    blocked = not tls and conf.starttls == "only"
    words = [] if blocked else PROTOCOL.mechanisms(conf.sieve_auth)
    lines.append(b'"SASL" ' + quote(" ".join(words)))
    if not tls and conf.starttls in ("on", "only"):
        lines.append(b'"STARTTLS"')
    return CRLF.join(lines) + CRLF


class _NeedMore(Exception):
    """The command goes on beyond the inputs so far: read `kind` ("line"/"bytes") of `size`."""

    def __init__(self, kind: str, size: Optional[int]):
        super().__init__(kind)
        self.kind, self.size = kind, size


class ParseError(Exception):
    """A syntax error; str() is the log line's reason (no client bytes in it)."""


class TooLong(Exception):
    """The command does not fit in sieve_client_buffer; `data` is what came of it."""

    def __init__(self, data: bytes):
        super().__init__("too long command")
        self.data = data


class _Scanner:
    """One command over its inputs (`parts`: the first line, then each literal's bytes and the
    line after it), within `limit` bytes in all."""

    def __init__(self, parts: List[bytes], limit: int):
        self.parts, self.limit = parts, limit
        self.index = 0
        self.used = len(parts[0])
        self.line, self.pos = parts[0], 0
        if self.used > limit:
            raise TooLong(b"".join(parts))

    def _next(self, kind: str, size: int) -> bytes:
        self.index += 1
        if self.index >= len(self.parts):
            raise _NeedMore(kind, size)
        return self.parts[self.index]

    def at_end(self) -> bool:
        rest = self.line[self.pos:]
        if rest in (b"\r\n", b"\n"):
            return True
        if rest[:1] in (b"\r", b"\n"):
            raise ParseError("CR not followed by LF")
        return False

    def space(self) -> None:
        if self.line[self.pos:self.pos + 1] != b" ":
            raise ParseError("no space between arguments")
        self.pos += 1

    def word(self) -> str:
        m = _WORD.match(self.line)
        if m is None:
            raise ParseError("bad command word")
        self.pos = m.end()
        return m.group().upper().decode("ascii")

    def argument(self) -> Arg:
        c = self.line[self.pos:self.pos + 1]
        if c == b'"':
            m = _QUOTED.match(self.line, self.pos)
            if m is None:
                raise ParseError("bad quoted string")
            self.pos = m.end()
            value = m.group(1)
            if b"\\" in value:
                value = re.sub(rb"\\(.)", rb"\1", value)
            if len(value) > MAX_QUOTED:
                raise ParseError("quoted string too long")
            return value
        if c == b"{":
            return self.literal()
        m = _NUMBER.match(self.line, self.pos)
        if m is None:
            raise ParseError("bad argument")
        self.pos = m.end()
        return int(m.group())

    def literal(self) -> bytes:
        m = _LITERAL.match(self.line, self.pos)
        if m is None:
            raise ParseError("bad literal")
        n = int(m.group(1))
        if n > self.limit - self.used - 1:          # the LF after it must fit too
            raise TooLong(b"".join(self.parts[:self.index + 1]))
        data = self._next("bytes", n) if n else b""
        if n:
            self.used += n
        self.line = self._next("line", self.limit - self.used)
        self.pos = 0
        self.used += len(self.line)
        if self.used > self.limit:
            raise TooLong(b"".join(self.parts[:self.index + 1]))
        return data

    def command(self) -> Tuple[str, List[Arg]]:
        verb = self.word()
        args: List[Arg] = []
        while not self.at_end():
            if len(args) >= MAX_ARGS:
                raise ParseError("too many arguments")
            self.space()
            args.append(self.argument())
        return verb, args

    def response(self) -> Optional[bytes]:
        """A SASL continuation: one string (None for a bare `*`, the cancel some send)."""
        if self.line.rstrip(b"\r\n") == b"*":
            return None
        value = self.argument()
        if not isinstance(value, bytes) or not self.at_end():
            raise ParseError("bad SASL response")
        return value


def parse_command(parts: List[bytes], limit: int) -> Tuple[str, List[Arg]]:
    """(VERB, args) of a whole command; raises _NeedMore, ParseError or TooLong."""
    return _Scanner(parts, limit).command()


def parse_response(parts: List[bytes], limit: int) -> Optional[bytes]:
    """The string of a SASL continuation (None: `*` unquoted); raises as parse_command."""
    return _Scanner(parts, limit).response()


class _No(Exception):
    """Refuse the command with `reply` (not a parser error: max_errors does not count it)."""

    def __init__(self, reply: bytes, why: str):
        super().__init__(why)
        self.reply = reply


class SieveConversation(Conversation):
    """The client side before login; `parts` holds the inputs of a command (or SASL response)
    not yet whole, `wanted` what to read for it next."""

    protocol = "sieve"
    INVALID = INVALID

    def __init__(self, conf: Conf, tls: bool = False):
        super().__init__(conf, tls)
        self.parts: List[bytes] = []
        self.wanted: Tuple[str, Optional[int]] = ("line", None)

    def buffer_size(self) -> int:
        return self.conf.sieve_client_buffer

    def next_input(self) -> Tuple[str, Optional[int]]:
        return self.wanted if self.parts else ("line", None)

    def continuation(self, text: bytes) -> bytes:
        return quote(text) + CRLF

    def capabilities(self) -> bytes:
        return capability_lines(self.conf, self.tls)

    def greeting(self) -> None:
        self.say(self.capabilities() + GREETING_OK)

    def tls_started(self) -> list:
        # RFC 5804 section 2.2: the capabilities again, unasked, after the handshake
        self.tls = True
        self.say(self.capabilities() + b'OK "TLS negotiation successful"\r\n')
        return self._take()

    def too_long(self, data: bytes) -> list:
        data, self.parts = b"".join(self.parts) + data, []
        return super().too_long(data)

    def too_long_reply(self, data: bytes) -> bytes:
        return TOO_LONG

    def auth_failed_reply(self, result: AuthResult) -> bytes:
        return b"NO " + quote(result.message) + CRLF

    def receive(self, line: bytes) -> list:
        # every input, a SASL response after an error challenge too, is parsed here: it may be
        # a literal that comes in several inputs
        return self._run(self.handle_line, line)

    def parse_error(self, reply: bytes, why: str = "invalid command") -> NoReturn:
        """Counted for max_errors; the last one is BYE and closes.  A bad SASL response ends
        its exchange."""
        self.parts, self.expect = [], None
        self.log("info", "client sent invalid command: %s" % why)
        self.errors += 1
        if self.errors >= self.conf.max_errors:
            self.log("info", "client sent too many invalid commands")
            self.finish(TOO_MANY)
        self.say(reply)
        self.stop()

    def _parse(self, parser, line: bytes, lenient: bool = False):
        """The command (or SASL response) once whole; a parser error is answered (None when
        `lenient`)."""
        self.parts.append(line)
        try:
            value = parser(self.parts, self.buffer_size())
        except _NeedMore as e:
            self.wanted = (e.kind, e.size)
            self.stop()
        except TooLong as e:
            self.parts = []
            self._out = self.too_long(e.data)   # takes what is queued: queue it again
            self.stop()
        except ParseError as e:
            if not lenient:
                self.parse_error(INVALID, str(e))
            value = None
        self.parts = []
        return value

    def handle_line(self, line: bytes) -> None:
        expect = self.expect
        if expect is None:
            verb, args = self._parse(parse_command, line)
            if verb in LATER:
                self.parse_error(AUTH_FIRST, "%s before login" % verb)
            if verb not in COMMANDS:
                self.parse_error(INVALID, "unknown command")
            self._guarded(getattr(self, "cmd_" + verb), args)
        elif expect == self.sasl_error_response:
            # whatever the answer to the error challenge, the failure reply comes now
            self._parse(parse_response, line, lenient=True)
            self.expect = None
            self.sasl_error_response(line)
        else:
            response = self._parse(parse_response, line)
            self.expect = None
            if response in (None, b"*"):
                self.log("info", "client cancelled authentication")
                self.sasl_user = None
                self.say(CANCELLED)
                return
            self._guarded(expect, response)

    def _guarded(self, handler, *args) -> None:
        try:
            handler(*args)
        except _No as e:
            self.log("info", "client sent invalid command: %s" % e)
            self.say(e.reply)
        except Refused:
            self.log("info", "client sent invalid command: unsafe credentials")
            self.say(INVALID)
        except sasl.SaslError as e:
            self.log("info", str(e))
            self.say(INVALID)

    # ---- commands ---------------------------------------------------------------------------

    def cmd_CAPABILITY(self, args: List[Arg]) -> None:
        if args:
            raise _No(INVALID, "CAPABILITY with arguments")
        self.say(self.capabilities() + b'OK "Capability completed"\r\n')

    def cmd_NOOP(self, args: List[Arg]) -> None:
        # RFC 5804 section 2.14: a tag argument comes back in a TAG response code
        if not args:
            self.say(b'OK "NOOP completed"\r\n')
            return
        tag = args[0]
        if len(args) > 1 or not isinstance(tag, bytes) or len(tag) > MAX_QUOTED \
                or any(c in tag for c in b"\r\n\x00"):
            raise _No(INVALID, "bad NOOP argument")
        self.say(b"OK (TAG " + quote(tag) + b') "Done"\r\n')

    def cmd_LOGOUT(self, args: List[Arg]) -> None:
        self.finish(b'OK "Logout completed"\r\n')

    def cmd_STARTTLS(self, args: List[Arg]) -> None:
        # pipelined plaintext is never executed (CVE-2011-0411): the session drops it
        if args or self.tls or self.conf.starttls not in ("on", "only"):
            raise _No(INVALID, "STARTTLS not offered")
        self.start_tls(b'OK "Begin TLS negotiation now"\r\n')

    def cmd_AUTHENTICATE(self, args: List[Arg]) -> None:
        if self.conf.starttls == "only" and not self.tls:
            raise _No(ENCRYPT_NEEDED, "AUTHENTICATE before STARTTLS")
        if not 1 <= len(args) <= 2 or not all(isinstance(a, bytes) for a in args):
            raise _No(INVALID, "bad AUTHENTICATE arguments")
        mech = bytes(args[0]).upper()
        initial = bytes(args[1]) if len(args) == 2 else None
        methods = self.conf.sieve_auth
        if mech == b"PLAIN" and "plain" in methods:
            if initial is None:
                self.challenge(b"", self.auth_plain)
            self.auth_plain(initial)
        elif mech == b"LOGIN" and "login" in methods:
            if initial is None:
                self.challenge(sasl.USERNAME_PROMPT, self.auth_login_username)
            self.auth_login_username(initial)
        elif mech == b"CRAM-MD5" and "cram-md5" in methods and initial is None:
            self.cram_md5_challenge()
        elif mech == b"EXTERNAL" and "external" in methods:
            if initial is None:
                self.challenge(sasl.USERNAME_PROMPT, self.auth_external)
            self.auth_external(initial)
        elif oauth.MECHANISMS.get(mech) in methods:
            self.auth_token(mech, initial)
        raise _No(NO_MECH, "unsupported mechanism")

    def backend_login(self, user: bytes, passwd: Optional[bytes], peer: Peer,
                      starttls: bool) -> SieveLogin:
        return SieveLogin(user, passwd or b"", starttls, self.token_mechanism())


# ---- the backend ------------------------------------------------------------------------------

def reply_lines(buf: bytes) -> List[bytes]:
    """The whole lines of a server's reply, a line with literals (`{n}` CRLF and n bytes) taken
    as one."""
    lines, start, pos = [], 0, 0
    while True:
        end = buf.find(b"\n", pos) + 1
        if not end:
            return lines
        m = _LITERAL.search(buf, pos, end)
        if m is not None:
            pos = end + int(m.group(1))
            if pos > len(buf):
                return lines
            continue
        lines.append(buf[start:end])
        start = pos = end


def status_complete(buf: bytes) -> bool:
    """read_reply's completion: a whole OK, NO or BYE line has come."""
    return any(_STATUS.match(line) for line in reply_lines(buf))


def step_complete(buf: bytes) -> bool:
    """After AUTHENTICATE: the status line, or a challenge (a line that is a string)."""
    return any(_STATUS.match(line) or line[:1] in (b'"', b"{") for line in reply_lines(buf))


def _is_ok(line: bytes) -> bool:
    m = _STATUS.match(line)
    return m is not None and m.group(1).upper() == b"OK"


def _final(reply: bytes) -> bytes:
    lines = reply_lines(reply)
    return lines[-1] if lines else reply


class SieveLogin(BackendLogin):
    """The backend login: its greeting (capabilities, then OK), with `proxy_ssl starttls` the
    STARTTLS, handshake and capabilities said again, then `AUTHENTICATE "PLAIN"` with the
    initial response (a token login: its mechanism; an error challenge gets the dummy
    response, then NO); the final OK goes to the client."""

    def __init__(self, user: bytes, passwd: bytes, starttls: bool = False,
                 mech: Optional[str] = None):
        super().__init__()
        self.user, self.passwd, self.starttls, self.mech = user, passwd, starttls, mech
        self.complete = status_complete
        self.challenge: Optional[bytes] = None      # its error challenge, for the client

    def expect_ok(self, reply: bytes) -> None:
        final = _final(reply)
        if not _is_ok(final):
            raise BackendRejected(reply, final)

    def on_greeting(self, reply: bytes) -> list:
        self.expect_ok(reply)
        if self.starttls:
            return [self.send(b"STARTTLS\r\n", "sending STARTTLS to upstream", "starttls",
                              status_complete)]
        return [self.send_login()]

    def on_starttls(self, reply: bytes) -> list:
        if not _is_ok(_final(reply)):
            raise StartTLSRefused(reply)
        self.state, self.complete = "capabilities", status_complete
        return [BackendStartTLS()]

    def on_capabilities(self, reply: bytes) -> list:
        self.expect_ok(reply)
        return [self.send_login()]

    def send_login(self) -> ToBackend:
        if self.mech is not None:
            response = oauth.encode(self.mech, self.user, self.passwd)
            return self.send(b"AUTHENTICATE " + quote(self.mech.upper()) + b" " + quote(response)
                             + CRLF, "sending token to upstream", "token", step_complete)
        response = base64.b64encode(b"\x00" + self.user + b"\x00" + self.passwd)
        return self.send(b'AUTHENTICATE "PLAIN" ' + quote(response) + CRLF,
                         "sending password to upstream", "auth", step_complete)

    def on_auth(self, reply: bytes) -> list:
        self.expect_ok(reply)
        return [LoggedIn(reply)]

    def on_token(self, reply: bytes) -> list:
        final = _final(reply)
        if final[:1] in (b'"', b"{"):       # the error challenge: the dummy response, then NO
            self.challenge = oauth.canonical(_string(reply))   # for the client, before NO
            return [self.send(quote(oauth.dummy_response(self.mech)) + CRLF,
                              "sending token to upstream", "token_error", status_complete)]
        if not _is_ok(final):
            raise BackendRejected(reply, final, refused=True)
        return [LoggedIn(reply)]

    def on_token_error(self, reply: bytes) -> list:
        raise BackendRejected(reply, _final(reply), refused=True, challenge=self.challenge)


def _string(reply: bytes) -> Optional[bytes]:
    """The one string (quoted or a literal) of a backend's challenge; None when it is not."""
    parts = [reply]
    m = re.match(rb"\{(\d+)\+?\}\r?\n", reply)
    if m is not None:
        end = m.end() + int(m.group(1))
        parts = [reply[:m.end()], reply[m.end():end], reply[end:]]
    try:
        return parse_response(parts, len(reply))
    except (ParseError, TooLong, _NeedMore):
        return None


PROTOCOL = Protocol(
    "sieve", (4190,), b"managesieve",
    cert_error=b'BYE "SSL certificate error"\r\n',
    no_cert=b'BYE "No required SSL certificate"\r\n',
    internal_error=b'BYE (TRYLATER) "Internal server error"\r\n',
    temp_failure=b'BYE (TRYLATER) "Too many connections, try again later"\r\n',
    sasl_order=(("plain", "PLAIN"), ("login", "LOGIN"), ("cram-md5", "CRAM-MD5"),
                ("external", "EXTERNAL"), ("oauthbearer", "OAUTHBEARER"),
                ("xoauth2", "XOAUTH2")),
    conversation=SieveConversation)
SieveConversation.descriptor = PROTOCOL
