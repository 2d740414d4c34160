"""IMAP: the client side before login (ngx_mail_imap_handler.c) and the backend login
(ngx_mail_proxy_imap_handler), as state machines without I/O (conversation.py).

The command parser is imap_parse.py.  A command with literals arrives in several inputs (the
line, each literal's bytes, the line after it); the conversation keeps them and parses the
command again over them until it is whole, asking the session for what the parser lacks.
"""

from __future__ import annotations

import secrets
from typing import (TYPE_CHECKING, Collection, Iterable, List, NoReturn, Optional,
                    Tuple, Union)

from . import oauth, sasl
from .clientio import BackendRejected, Refused
from .conversation import (BackendLogin, BackendStartTLS, Conversation, LoggedIn, Peer,
                           Protocol, StartTLSRefused)
from .imap_parse import ParseError, TooLong, parse_command, parse_sasl_line, tag_of

if TYPE_CHECKING:
    from .auth_http import AuthResult
    from .conversation import Conf, ToBackend

CRLF = b"\r\n"
GREETING = b"* OK IMAP4 ready\r\n"
OK = b"OK completed\r\n"
BAD = b"BAD invalid command\r\n"
UNTAGGED = b"* "
BYE = b"* BYE\r\n"
LITERAL_CONTINUE = b"+ OK\r\n"
ID_REPLY = b"* ID NIL\r\n"

# Dovecot-style ID fields sent to the backend with `imap_client_id on` (our addition).
BACKEND_ID_TAG = b"mailproxy-id "
BACKEND_STARTTLS_TAG = b"mpTLS "        # proxy_ssl starttls
BACKEND_CAPABILITY_TAG = b"mpCAP "      # token logins: does the backend take SASL-IR?


def capability_line(capabilities: Iterable[Union[str, bytes]], methods: Collection[str],
                    starttls: str = "off", tls: bool = False) -> bytes:
    """`* CAPABILITY ...` with CRLF (the lines ngx_mail_imap_merge_srv_conf builds)."""
    words = [b"* CAPABILITY"] + [c.encode("utf-8", "surrogateescape") if isinstance(c, str)
                                 else bytes(c) for c in capabilities]
    if not tls and starttls == "only":
        words.append(b"STARTTLS LOGINDISABLED")
    else:
        words += [word.encode() for word in PROTOCOL.mechanisms(methods)]
        if not tls and starttls == "on":
            words.append(b"STARTTLS")
    return b" ".join(words) + CRLF


def backend_login_complete(buf: bytes) -> bool:
    """read_reply() completion for the final LOGIN reply: one untagged line may come first."""
    if buf.startswith(b"* "):
        i = buf.find(CRLF, 2)
        return i >= 0 and len(buf) - (i + 2) >= 4
    return True


def check_login_reply(buf: bytes, tag: bytes) -> None:
    """Raise BackendRejected unless `buf` is `<tag>OK...` (after at most one untagged line).

    The logged text starts after the untagged line and after the tag when it matched, as
    ngx_mail_proxy_read_response logs it.
    """
    p = 0
    if buf.startswith(b"* "):
        i = buf.find(CRLF, 2)
        p = i + 2 if i >= 0 else len(buf)
    if buf.startswith(tag, p):
        p += len(tag)
        if buf.startswith(b"OK", p):
            return
    raise BackendRejected(buf, buf[p:])


def _quote(value):
    value = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return '"%s"' % value


def backend_id_command(fields: Iterable[Tuple[str, object]]) -> bytes:
    """`<tag>ID ("k" "v" ...)` CRLF from [(key, value)] pairs."""
    items = " ".join("%s %s" % (_quote(k), _quote(v)) for k, v in fields)
    return BACKEND_ID_TAG + ("ID (%s)" % items).encode("ascii", "replace") + CRLF


def backend_id_complete(buf: bytes) -> bool:
    return buf.startswith(BACKEND_ID_TAG) or (b"\n" + BACKEND_ID_TAG) in buf


class _NeedMore(Exception):
    """The command goes on beyond the inputs received so far: `kind` and `size` are what to
    read next (next_input)."""

    def __init__(self, kind, size):
        super().__init__(kind)
        self.kind = kind
        self.size = size


class _Replay:
    """The parser's io over the inputs of the command so far (the first line excepted); past
    them it raises _NeedMore.  `continue_literal()` answers `+ OK` once per literal, however
    often the command is parsed again."""

    def __init__(self, conv, parts):
        self.conv = conv
        self.parts = parts
        self.index = 1
        self.literals = 0

    def _take(self, kind, size):
        if self.index >= len(self.parts):
            raise _NeedMore(kind, size)
        self.index += 1
        return self.parts[self.index - 1]

    def readline(self, limit):
        return self._take("line", limit)

    def read_exact(self, n):
        return self._take("bytes", n)

    def continue_literal(self):
        self.literals += 1
        if self.literals > self.conv.continued:
            self.conv.continued = self.literals
            self.conv.say(LITERAL_CONTINUE)


class ImapConversation(Conversation):
    """ngx_mail_imap_auth_state: `tag` is the current command's tag (with its space), kept
    through its SASL steps and the authentication; `parts` the inputs of a command awaiting a
    literal or the line after one."""

    protocol = "imap"

    def __init__(self, conf: Conf, tls: bool = False):
        super().__init__(conf, tls)
        self.tag: Optional[bytes] = None
        self.parts: List[bytes] = []
        self.wanted: Tuple[str, Optional[int]] = ("line", None)
        self.continued = 0              # `+ OK` said for this command's literals
        self.session_id: Optional[str] = None

    def buffer_size(self) -> int:
        return self.conf.imap_client_buffer

    def next_input(self) -> Tuple[str, Optional[int]]:
        # after a literal announcement: its bytes, then the rest of the command's budget
        return self.wanted if self.parts else ("line", None)

    def greeting(self) -> None:
        self.say(GREETING)

    def too_long(self, data: bytes) -> list:
        # a command with literals is logged whole, as far as it came
        data, self.parts = b"".join(self.parts) + data, []
        return super().too_long(data)

    def too_long_reply(self, data: bytes) -> bytes:
        # an AUTHENTICATE continuation line keeps its command's tag, a command its own
        return ((self.tag if self.expect is not None else tag_of(data)) or UNTAGGED) + BAD

    def auth_failed_reply(self, result: AuthResult) -> bytes:
        return (self.tag or UNTAGGED) + b"NO " + result.message + CRLF

    def handle_line(self, data: bytes) -> None:
        expect, self.expect = self.expect, None
        if expect is not None:
            self._sasl_step(expect, data)
            return
        self.parts.append(data)
        try:
            cmd = parse_command(self.parts[0], _Replay(self, self.parts), self.buffer_size())
        except _NeedMore as e:
            self.wanted = (e.kind, e.size)
            self.stop()
        except TooLong as e:            # a literal beyond the budget, refused before `+ OK`
            self.parts = []
            actions = self.too_long(e.data)     # takes what is queued: queue it again
            self._out = actions
            self.stop()
        except ParseError as e:
            self.parts, self.continued = [], 0
            self.reject(e)
        self.parts, self.continued = [], 0
        self.tag = cmd.tag
        self._guarded(getattr(self, "cmd_" + cmd.verb), cmd.args)

    def _guarded(self, handler, *args):
        try:
            handler(*args)
        except Refused:
            self.say(self.tag + BAD)
        except sasl.SaslError as e:
            self.log("info", str(e))
            self.say(self.tag + BAD)

    def reject(self, e: ParseError) -> NoReturn:
        """Answer a parser error: counted for max_errors; the {N+} rule closes at once."""
        reply = (e.tag or UNTAGGED) + BAD
        if e.close:
            self.errors += 1
            if self.errors >= self.conf.max_errors:
                self.log("info", "client sent too many invalid commands")
            self.finish(reply)
        self.parse_error(reply)

    def _sasl_step(self, step, line):
        """The line after a `+ ...` continuation: one SASL response token."""
        try:
            response = parse_sasl_line(line, self.tag)
        except ParseError as e:
            self.reject(e)
        self._guarded(step, response)

    def starttls_blocks_auth(self) -> bool:
        return self.conf.starttls == "only" and not self.tls

    # ---- commands (ngx_mail_imap_auth_state) ----------------------------------------------------

    def cmd_CAPABILITY(self, args: List[bytes]) -> None:
        conf = self.conf
        self.say(capability_line(conf.imap_capabilities, conf.imap_auth, conf.starttls,
                                 self.tls) + self.tag + OK)

    def cmd_NOOP(self, args: List[bytes]) -> None:
        self.say(self.tag + OK)

    def cmd_LOGOUT(self, args: List[bytes]) -> None:
        self.finish(BYE + self.tag + OK)

    def cmd_ID(self, args: Optional[List[Optional[bytes]]]) -> None:
        # Our addition: nginx refuses ID before login, which breaks clients that send it first.
        self.say(ID_REPLY + self.tag + OK)

    def cmd_STARTTLS(self, args: List[bytes]) -> None:
        # As ngx_mail_imap_starttls: only when starttls is on/only and TLS is not active yet;
        # pipelined plaintext is never executed (CVE-2011-0411).
        if self.tls or self.conf.starttls not in ("on", "only"):
            raise Refused()
        self.start_tls(self.tag + OK)

    def cmd_LOGIN(self, args: List[bytes]) -> None:
        if self.starttls_blocks_auth() or len(args) != 2 or not args[0]:
            raise Refused()
        self.authenticate("plain", args[0], args[1])

    def cmd_AUTHENTICATE(self, args: List[bytes]) -> None:
        if self.starttls_blocks_auth() or not args:
            raise Refused()
        mech = args[0].upper()
        n = len(args)
        methods = self.conf.imap_auth
        if mech == b"LOGIN":
            if n == 1:
                self.challenge(sasl.USERNAME_PROMPT, self.auth_login_username)
            if n != 2:
                raise Refused()
            super().auth_login_username(args[1])
        elif mech == b"PLAIN":
            if n == 1:
                self.challenge(b"", self.auth_plain)        # `+ ` and CRLF
            if n != 2:
                raise Refused()
            self.auth_plain(args[1])
        elif mech == b"CRAM-MD5":
            if "cram-md5" not in methods or n != 1:
                raise Refused()
            self.cram_md5_challenge()
        elif mech == b"EXTERNAL":
            # nginx accepts EXTERNAL with an initial response even when disabled; we do not.
            if "external" not in methods or n > 2:
                raise Refused()
            if n == 1:
                self.challenge(sasl.USERNAME_PROMPT, self.auth_external)
            self.auth_external(args[1])
        elif oauth.MECHANISMS.get(mech) in methods:
            if n > 2:
                raise Refused()
            self.auth_token(mech, args[1] if n == 2 else None)
        else:
            raise Refused()

    # ---- SASL steps -------------------------------------------------------------------------

    def auth_login_username(self, response: bytes) -> NoReturn:
        try:
            super().auth_login_username(response)
        except sasl.SaslError as e:
            # nginx quirk: ngx_mail_imap_auth_state sends this one untagged, without `*`.
            self.log("info", str(e))
            self.say(BAD)
            self.stop()

    # ---- backend login --------------------------------------------------------------------------

    def backend_id_fields(self, peer: Peer) -> List[Tuple[str, object]]:
        """Dovecot's ID fields: who the client is and where it connected (our addition); the
        session id is one per client connection: the session's own (the one in its log lines
        and its auth request), else one drawn here."""
        fields: List[Tuple[str, object]] = []
        if peer.ip is not None:
            fields += [("x-originating-ip", peer.ip), ("x-originating-port", peer.port)]
        local = peer.proxied_local or peer.local
        if local is not None:
            fields += [("x-connected-ip", local[0]), ("x-connected-port", local[1])]
        if self.session_id is None:
            self.session_id = peer.session_id or secrets.token_urlsafe(12)
        fields.append(("x-session-id", self.session_id))
        return fields

    def backend_login(self, user: bytes, passwd: Optional[bytes], peer: Peer,
                      starttls: bool) -> ImapLogin:
        fields = self.backend_id_fields(peer) if self.conf.imap_client_id else None
        return ImapLogin(self.tag, user, passwd, fields, starttls, self.token_mechanism())


class ImapLogin(BackendLogin):
    """ngx_mail_proxy_imap_handler: greeting `* OK`, then (ours) the ID command whose answer is
    ignored, then LOGIN with synchronising literals (each `+` before the next part) under the
    client's tag; the final reply goes to the client.  With `proxy_ssl starttls`,
    `mpTLS STARTTLS` and the handshake come right after the greeting.  A token login (`mech`)
    is `AUTHENTICATE MECH`, with the response on the same line when the backend's capabilities
    (in its greeting, else asked for) include SASL-IR, else after its `+`."""

    def __init__(self, tag: bytes, user: bytes, passwd: bytes,
                 id_fields: Optional[list] = None, starttls: bool = False,
                 mech: Optional[str] = None):
        super().__init__()
        self.tag, self.user, self.passwd = tag, user, passwd
        self.id_fields = id_fields
        self.starttls = starttls
        self.mech = mech
        self.caps: Optional[List[bytes]] = None     # the backend's, once known
        self.challenge: Optional[bytes] = None      # its error challenge, for the client

    def on_greeting(self, reply: bytes) -> list:
        if not reply.startswith(b"* OK"):
            raise BackendRejected(reply)
        if not self.starttls:           # over TLS they are to be asked again (RFC 3501 6.2.1)
            self.caps = capabilities(reply)
        if self.starttls:
            return [self.send(BACKEND_STARTTLS_TAG + b"STARTTLS" + CRLF,
                              "sending STARTTLS to upstream", "starttls", _starttls_complete)]
        return [self.send_id_or_login()]

    def on_starttls(self, reply: bytes) -> list:
        tag = BACKEND_STARTTLS_TAG
        i = 0 if reply.startswith(tag) else reply.find(b"\n" + tag) + 1
        if not reply.startswith(tag + b"OK", i):
            raise StartTLSRefused(reply[i:])
        return [BackendStartTLS(), self.send_id_or_login()]

    def send_id_or_login(self) -> ToBackend:
        if self.id_fields is not None:
            return self.send(backend_id_command(self.id_fields), "sending ID command to upstream",
                             "id", backend_id_complete)
        return self.send_login()

    def on_id(self, reply: bytes) -> list:
        return [self.send_login()]          # whatever it answers (NO/BAD too)

    def send_login(self) -> ToBackend:
        if self.mech is not None:
            return self.send_token()
        return self.send(self.tag + b"LOGIN {%d}\r\n" % len(self.user),
                         "sending LOGIN command to upstream", "login")

    def on_login(self, reply: bytes) -> list:
        if not reply.startswith(b"+"):
            raise BackendRejected(reply)
        return [self.send(self.user + b" {%d}\r\n" % len(self.passwd),
                          "sending user name to upstream", "user")]

    def on_user(self, reply: bytes) -> list:
        if not reply.startswith(b"+"):
            raise BackendRejected(reply)
        return [self.send(self.passwd + CRLF, "sending password to upstream", "passwd",
                          backend_login_complete)]

    def on_passwd(self, reply: bytes) -> list:
        check_login_reply(reply, self.tag)
        return [LoggedIn(reply)]

    # ---- token logins (OAUTHBEARER, XOAUTH2) -------------------------------------------

    def send_token(self) -> ToBackend:
        if self.caps is None:
            return self.send(BACKEND_CAPABILITY_TAG + b"CAPABILITY" + CRLF,
                             "sending CAPABILITY command to upstream", "capability",
                             _capability_complete)
        command = self.tag + b"AUTHENTICATE " + self.mech.upper().encode()
        response = oauth.encode(self.mech, self.user, self.passwd)
        if b"SASL-IR" in self.caps:
            return self.send(command + b" " + response + CRLF, "sending token to upstream",
                             "token", self.tagged_or_continue)
        return self.send(command + CRLF, "sending AUTHENTICATE command to upstream",
                         "authenticate", self.tagged_or_continue)

    def tagged_or_continue(self, buf: bytes) -> bool:
        last = _last_line(buf)
        return last.startswith(b"+") or last.startswith(self.tag)

    def on_capability(self, reply: bytes) -> list:
        self.caps = capabilities(reply) or []
        return [self.send_token()]

    def on_authenticate(self, reply: bytes) -> list:
        if not _last_line(reply).startswith(b"+"):
            self.refused(reply)
        return [self.send(oauth.encode(self.mech, self.user, self.passwd) + CRLF,
                          "sending token to upstream", "token", self.tagged_or_continue)]

    def on_token(self, reply: bytes) -> list:
        last = _last_line(reply)
        if last.startswith(b"+"):       # the error challenge: the dummy response, then NO
            self.challenge = oauth.backend_challenge(last, b"+ ")
            return [self.send(oauth.dummy_response(self.mech) + CRLF,
                              "sending token to upstream", "token_error",
                              self.tagged_or_continue)]
        if not last.startswith(self.tag + b"OK"):
            self.refused(reply)
        return [LoggedIn(reply)]

    def on_token_error(self, reply: bytes) -> list:
        self.refused(reply)

    def refused(self, reply: bytes) -> NoReturn:
        last = _last_line(reply)
        raise BackendRejected(reply, last[len(self.tag):] if last.startswith(self.tag) else last,
                              refused=True, challenge=self.challenge)


def _last_line(buf: bytes) -> bytes:
    return buf[buf.rfind(b"\n", 0, len(buf) - 2) + 1:]


def capabilities(reply: bytes) -> Optional[List[bytes]]:
    """The capabilities in a `* CAPABILITY` line or a greeting's `[CAPABILITY ...]` code
    (upper case), None when the reply has neither."""
    for line in reply.upper().split(CRLF):
        if line.startswith(b"* CAPABILITY "):
            return line.split()[2:]
        if line.startswith(b"* OK [CAPABILITY "):
            return line[len(b"* OK [CAPABILITY "):].partition(b"]")[0].split()
    return None


def _capability_complete(buf: bytes) -> bool:
    return buf.startswith(BACKEND_CAPABILITY_TAG) or (b"\n" + BACKEND_CAPABILITY_TAG) in buf


def _starttls_complete(buf):
    return buf.startswith(BACKEND_STARTTLS_TAG) or (b"\n" + BACKEND_STARTTLS_TAG) in buf


PROTOCOL = Protocol(
    "imap", (143, 993), b"imap",
    cert_error=b"* BYE SSL certificate error\r\n",
    no_cert=b"* BYE No required SSL certificate\r\n",
    internal_error=b"* BAD internal server error\r\n",
    temp_failure=b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",  # RFC 5530
    sasl_order=(("plain", "AUTH=PLAIN"), ("login", "AUTH=LOGIN"), ("cram-md5", "AUTH=CRAM-MD5"),
                ("external", "AUTH=EXTERNAL"), ("oauthbearer", "AUTH=OAUTHBEARER"),
                ("xoauth2", "AUTH=XOAUTH2")),
    conversation=ImapConversation)
ImapConversation.descriptor = PROTOCOL
