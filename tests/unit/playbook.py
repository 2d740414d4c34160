"""Helpers for the unit layer (not a test module), in the spirit of mitmproxy's playbooks: feed
a conversation events and compare the actions it returns, exactly.

    conv = started(conf("pop3"))                       # greeting taken
    assert conv.receive(b"USER bob\\r\\n") == reply(b"+OK\\r\\n")
    play(conv, [(b"PASS x\\r\\n", [Authenticate("plain", b"bob", b"x")])])

`make_conf` builds a real ServerConf through config.load without touching a socket (the
`conf` fixture in conftest.py wraps it).  For session.py driven without sockets: `FakeSock`
(either side's socket) and `RecordingLog` (the error log), both writing onto one timeline.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from mailproxy import config
from mailproxy.auth_http import AuthResult
from mailproxy.config.parsers import _Ctx
from mailproxy.conversation import CLOSE, Log, Peer, Reply, ToBackend
from tests.support import common

SERVER_NAME = "mx.example.test"


class IOInUnitTest(BaseException):
    """A unit test reached for the network or a process (conftest.py's guard).  A
    BaseException, so that neither `except OSError` nor `except Exception` in the code under
    test can swallow it."""

PORTS = {"pop3": 110, "imap": 143, "smtp": 25, "sieve": 4190}


# ---- configuration ------------------------------------------------------------------------

def make_conf(folder, protocol: str = "pop3", **directives):
    """A complete ServerConf for `protocol` as config.load builds it, with `directives`
    (nginx names) on top.

    The base file routes through `auth_http unix:...` (no name lookup at load) and names the
    server `mx.example.test`.  A str value is parsed by the directive's own parser, as if
    written in the file, but without the loader's cross-checks, so `starttls="on"` needs no
    certificate (no TLS context is built: conversations only read the mode); multi-line
    directives take one occurrence per line.  Any other value is set as it is.
    """
    folder = Path(folder)
    path = folder / ("unit-%s.ini" % protocol)
    path.write_text("[server unit]\n"
                    "listen = 127.0.0.1:%d\n"
                    "protocol = %s\n"
                    "server_name = %s\n"
                    "auth_http = unix:%s:/auth\n"
                    % (PORTS[protocol], protocol, SERVER_NAME, folder / "auth.sock"))
    server = config.load(str(path)).servers[0]
    for name, value in directives.items():
        if name not in config.DIRECTIVES:
            raise KeyError("unknown directive %r" % name)
        if isinstance(value, str):
            value = parse_directive(name, value, str(path))
        setattr(server, name, value)
    return server


def parse_directive(name: str, text: str, file: str = "unit.ini"):
    """`text` (nginx tokens) through directive `name`'s parser, as the loader does."""
    d = config.DIRECTIVES[name]
    lines = text.split("\n") if d.multi else [text]
    values: list = []
    for i, line in enumerate(lines, 1):
        args = config.split_tokens(line)
        lo, hi = d.nargs
        assert lo <= len(args) and (hi is None or len(args) <= hi), (name, text)
        value = d.parse(args, _Ctx(name, file, i, str(Path(file).parent), line))
        if not d.multi:
            return value
        values.extend(value)
    return values


def auth_fail(message: bytes = b"Invalid login or password", **fields) -> AuthResult:
    """What the auth service answers for a refused login (Auth-Status: message)."""
    return AuthResult("FAIL", message=message, **fields)


# ---- reading actions ----------------------------------------------------------------------

def replies(actions: Iterable) -> List[bytes]:
    """The bytes of every Reply, in order."""
    return [a.data for a in actions if type(a) is Reply]


def only(actions: Iterable, *types) -> list:
    """The actions of these types, in order."""
    return [a for a in actions if isinstance(a, types)]


def logs(actions: Iterable) -> List[Tuple[str, str]]:
    """(level, message) of every Log action."""
    return [(a.level, a.message) for a in actions if type(a) is Log]


def reply(*data: bytes) -> list:
    """The actions of a plain answer: one Reply per argument."""
    return [Reply(d) for d in data]


def closing(*data: bytes) -> list:
    """Replies, then the session ends."""
    return reply(*data) + [CLOSE]


# ---- driving ------------------------------------------------------------------------------

def started(conf, tls: bool = False, cls=None):
    """A conversation of conf.protocol past its greeting (which must be Reply actions only)."""
    if cls is None:
        from mailproxy.protocols import PROTOCOLS
        cls = PROTOCOLS[conf.protocol].conversation
    conv = cls(conf, tls=tls)
    greeting = conv.start()
    assert greeting and all(type(a) is Reply for a in greeting), greeting
    return conv


def play(machine, steps: Sequence[Tuple[bytes, list]]):
    """Feed each input to `machine.receive` and assert the actions it returns, step by step
    (the step's index and input are in the failure message)."""
    for i, (data, expected) in enumerate(steps):
        got = machine.receive(data)
        assert got == expected, "step %d, input %r:\n  got      %r\n  expected %r" % (
            i, data, got, expected)


# ---- the session's stand-ins: one timeline of sends and log lines ------------------------

class FakeSock:
    """Either side's socket as the Session sees it, without a socket: `recv` hands out
    `incoming` chunk by chunk as a stream would (then b"": the peer closed); each `sendall`
    lands on the shared timeline `events` as (name, data), or (name, data, bytes the session's
    reader still holds) once `session` is set."""

    def __init__(self, events: list, name: str, incoming: Iterable[bytes] = (), session=None,
                 local: Tuple[str, int] = ("127.0.0.1", 110)):
        self.events, self.name = events, name
        self.incoming = list(incoming)
        self.local = local
        self.timeout = None
        self.closed = False
        self.session = session

    def recv(self, size):
        if not self.incoming:
            return b""
        chunk = self.incoming.pop(0)
        if len(chunk) > size:           # as a stream socket: the rest comes next time
            self.incoming.insert(0, chunk[size:])
        return chunk[:size]

    def sendall(self, data):
        if self.session is not None:
            self.events.append((self.name, data, self.session.reader.pending()))
        else:
            self.events.append((self.name, data))

    def gettimeout(self):
        return self.timeout

    def settimeout(self, value):
        self.timeout = value

    def setsockopt(self, *args):
        pass

    def getsockname(self):
        return self.local

    def close(self):
        self.closed = True


_SESSION_TAIL = re.compile(r", session: ([A-Za-z0-9_-]{16})\Z")


class RecordingLog(common.RecordingLog):
    """tests/support's ErrorLog stand-in ((level, message) in `lines`), here writing onto a
    timeline shared with FakeSock when given one.  `debug` lines only when asked (as a real
    error_log below debug); the session id that ends a session's line is kept apart in
    `session_ids` (one per line that had it), so lines compare as nginx's."""

    def __init__(self, lines: Optional[list] = None, debug: bool = False):
        super().__init__()
        if lines is not None:
            self.lines = lines
        self.debug = debug
        self.session_ids: List[str] = []

    def enabled(self, level):
        return level != "debug" or self.debug

    def log(self, level, message, conn=None):
        m = _SESSION_TAIL.search(message)
        if m is not None:
            self.session_ids.append(m.group(1))
            message = message[:m.start()]
        super().log(level, message, conn)


def sent(events: list, name: str = "client") -> List[bytes]:
    """What was sent to one side, in order."""
    return [e[1] for e in events if e[0] == name]


# ---- shared by a protocol's client-side and backend-login files ----------------------------

DIGEST = b"0123456789abcdef0123456789abcdef"      # a CRAM-MD5 digest, as a client sends it


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def line(data: bytes) -> bytes:
    return data + b"\r\n"


IMAP_PEER = Peer("192.0.2.7", 40000, ("127.0.0.1", 1143))


def imap_login_lines(tag: bytes, user: bytes = b"alice", passwd: bytes = b"secret") -> bytes:
    """What a backend receives for a login (as from ngx_mail_proxy_imap_handler)."""
    return (tag + b"LOGIN {%d}\r\n" % len(user) + user + b" {%d}\r\n" % len(passwd)
            + passwd + b"\r\n")


def imap_backend_lines(conv, user: bytes = b"alice", passwd: bytes = b"secret",
                       peer: Peer = IMAP_PEER) -> bytes:
    """Everything the conversation's ImapLogin sends a backend that greets and continues each
    literal."""
    login = conv.backend_login(user, passwd, peer, False)
    out = []
    for reply in (b"* OK ready\r\n", b"+ OK\r\n", b"+ OK\r\n"):
        out += login.receive(reply)
    assert all(type(a) is ToBackend for a in out), out
    return b"".join(a.data for a in out)


# the SMTP replies both SMTP files expect
SMTP_OK = b"250 2.0.0 OK\r\n"
SMTP_INVALID = b"500 5.5.1 Invalid command\r\n"
SMTP_ARGUMENT = b"501 5.5.4 Invalid argument\r\n"
SMTP_BAD_SEQUENCE = b"503 5.5.1 Bad sequence of commands\r\n"
SMTP_USERNAME = b"334 VXNlcm5hbWU6\r\n"
SMTP_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"
SMTP_AUTH_OK = b"235 2.0.0 OK\r\n"


def smtp_sasl_error(message: str) -> list:
    """What an SMTP SASL decoding error gives: nginx's info line, then the invalid-command
    reply."""
    return [Log("info", message), Reply(SMTP_INVALID)]
