"""POP3: the client side before login (ngx_mail_pop3_handler.c) and the backend login
(ngx_mail_proxy_pop3_handler), as state machines without I/O (conversation.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, List, NoReturn, Optional, Tuple

from . import oauth, sasl
from .clientio import BackendRejected, Refused, strip_eol
from .conversation import (BackendLogin, BackendStartTLS, Conversation, LoggedIn, Peer,
                           Protocol, StartTLSRefused)

if TYPE_CHECKING:
    from .auth_http import AuthResult
    from .conversation import Conf, ToBackend

OK = b"+OK\r\n"
INVALID = b"-ERR invalid command\r\n"
BUFFER_SIZE = 128           # nginx's fixed POP3 command buffer

# Words ngx_mail_pop3_parse_command knows; any other word is a parser error.
COMMANDS = frozenset(("USER", "PASS", "APOP", "QUIT", "CAPA", "AUTH", "NOOP", "STLS"))


def parse_command(line: bytes) -> Optional[Tuple[str, List[bytes]]]:
    """(VERB, [args]) for a command line, or None for a parser error (as nginx's
    ngx_mail_pop3_parse_command)."""
    content = strip_eol(line)
    if content is None:
        return None
    word, sep, rest = content.partition(b" ")
    if len(word) != 4 or not word.isalpha() or not word.isascii():
        return None
    verb = word.upper().decode("ascii")
    if verb not in COMMANDS:
        return None
    if verb in ("USER", "PASS"):
        # Spaces belong to a user name or password: one argument, inner/trailing spaces kept.
        rest = rest.lstrip(b" ")
        return verb, [rest] if rest else []
    args = [a for a in rest.split(b" ") if a]
    if len(args) > 3:
        return None
    return verb, args


class Pop3Conversation(Conversation):
    """ngx_mail_pop3_auth_state: `state` is nginx's s->mail_state ("start" or "user", after a
    USER command), `expect` the SASL step awaiting the client's next line."""

    protocol = "pop3"
    INVALID = INVALID

    def __init__(self, conf: Conf, tls: bool = False):
        super().__init__(conf, tls)
        self.state = "start"

    def buffer_size(self) -> int:
        if any(m in oauth.METHODS for m in self.conf.pop3_auth):
            return oauth.BUFFER
        return BUFFER_SIZE

    def greeting(self) -> None:
        methods = self.conf.pop3_auth
        if "apop" in methods or "cram-md5" in methods:
            self.salt = sasl.make_salt(self.conf.server_name)
            self.say(b"+OK POP3 ready " + self.salt + b"\r\n")
        else:
            self.say(b"+OK POP3 ready\r\n")

    def reset(self) -> None:
        self.state = "start"

    def auth_failed_reply(self, result: AuthResult) -> bytes:
        return b"-ERR " + result.message + b"\r\n"

    def handle_line(self, line: bytes) -> None:
        expect, self.expect = self.expect, None
        if expect is not None:
            self._sasl_step(expect, line)
            return
        parsed = parse_command(line)
        if parsed is None:
            self.state = "start"
            self.parse_error(INVALID)
        verb, args = parsed
        if self.state == "user" and verb not in ("PASS", "CAPA", "QUIT", "NOOP"):
            handler = None
        elif self.state == "start" and verb == "PASS":
            handler = None
        else:
            handler = getattr(self, "cmd_" + verb)
        self._guarded(handler, args)

    def _guarded(self, handler, *args):
        try:
            if handler is None:
                raise Refused()
            handler(*args)
        except Refused:
            self.state = "start"
            self.say(INVALID)
        except sasl.SaslError as e:
            self.log("info", str(e))
            self.state = "start"
            self.say(INVALID)

    def _sasl_step(self, step, line):
        """The line after a `+ ` continuation: its first token is the SASL response."""
        content = strip_eol(line)
        if content is None:
            self.state = "start"
            self.parse_error(INVALID)
        self._guarded(step, content.split(b" ", 1)[0])

    def starttls_blocks_auth(self) -> bool:
        return self.conf.starttls == "only" and not self.tls

    def capability_lines(self, stls: bool) -> bytes:
        conf = self.conf
        lines = [b"+OK Capability list follows"]
        if stls and conf.starttls == "only" and not self.tls:
            lines += [c.encode() for c in conf.pop3_capabilities if c.upper() != "USER"]
            lines.append(b"STLS")
        else:
            lines += [c.encode() for c in conf.pop3_capabilities]
            lines.append(" ".join(["SASL"] + self.mechanisms(conf.pop3_auth)).encode())
            if stls and conf.starttls == "on" and not self.tls:
                lines.append(b"STLS")
        lines.append(b".")
        return b"\r\n".join(lines) + b"\r\n"

    def authenticate(self, method: str, login: Optional[bytes],
                     passwd: Optional[bytes]) -> NoReturn:
        self.state = "start"
        super().authenticate(method, login, passwd)

    # ---- commands (ngx_mail_pop3_auth_state) ---------------------------------------------------

    def cmd_USER(self, args: List[bytes]) -> None:
        if self.starttls_blocks_auth() or len(args) != 1:
            raise Refused()
        if not sasl.check_credential(args[0]):
            raise Refused()
        self.login = args[0]
        self.state = "user"
        self.say(OK)

    def cmd_PASS(self, args: List[bytes]) -> None:
        if len(args) != 1:
            raise Refused()
        self.authenticate("plain", self.login, args[0])

    def cmd_APOP(self, args: List[bytes]) -> None:
        if self.starttls_blocks_auth() or "apop" not in self.conf.pop3_auth or len(args) != 2:
            raise Refused()
        self.authenticate("apop", args[0], args[1])

    def cmd_CAPA(self, args: List[bytes]) -> None:
        self.say(self.capability_lines(stls=self.state == "start"))

    def cmd_NOOP(self, args: List[bytes]) -> None:
        self.say(OK)

    def cmd_QUIT(self, args: List[bytes]) -> None:
        self.finish(OK)

    def cmd_STLS(self, args: List[bytes]) -> None:
        # As ngx_mail_pop3_stls: only when starttls is on/only and TLS is not active yet;
        # pipelined plaintext is never executed (CVE-2011-0411).
        if self.tls or self.conf.starttls not in ("on", "only"):
            raise Refused()
        self.start_tls(OK)

    def cmd_AUTH(self, args: List[bytes]) -> None:
        if self.starttls_blocks_auth():
            raise Refused()
        methods = self.conf.pop3_auth
        if not args:
            self.say(b"+OK methods supported:\r\n"
                     + b"".join(m.encode() + b"\r\n" for m in self.mechanisms(methods))
                     + b".\r\n")
            return
        if len(args) > 2:
            raise Refused()
        mech = args[0].upper()
        initial = args[1] if len(args) == 2 else None
        if mech == b"PLAIN":
            if initial is None:
                self.challenge(b"", self.auth_plain)
            self.auth_plain(initial)
        elif mech == b"LOGIN":
            if initial is None:
                self.challenge(sasl.USERNAME_PROMPT, self.auth_login_username)
            self.auth_login_username(initial)
        elif mech == b"CRAM-MD5":
            if "cram-md5" not in methods or initial is not None:
                raise Refused()
            self.cram_md5_challenge()
        elif mech == b"EXTERNAL":
            if "external" not in methods:
                raise Refused()
            if initial is None:
                self.challenge(sasl.USERNAME_PROMPT, self.auth_external)
            self.auth_external(initial)
        elif oauth.MECHANISMS.get(mech) in methods:
            self.auth_token(mech, initial)
        else:
            raise Refused()

    def backend_login(self, user: bytes, passwd: Optional[bytes], peer: Peer,
                      starttls: bool) -> Pop3Login:
        return Pop3Login(user, passwd, starttls, self.token_mechanism())


class Pop3Login(BackendLogin):
    """ngx_mail_proxy_pop3_handler: greeting, USER, PASS; only the exact "+OK" counts at every
    step (ngx_mail_proxy_read_response), and the last reply goes to the client.  With
    `proxy_ssl starttls`, STLS and the handshake come first.  A token login (`mech`) is
    `AUTH MECH <initial response>` instead of USER/PASS."""

    def __init__(self, user: bytes, passwd: bytes, starttls: bool = False,
                 mech: Optional[str] = None):
        super().__init__()
        self.user, self.passwd, self.starttls = user, passwd, starttls
        self.mech = mech
        self.challenge: Optional[bytes] = None      # its error challenge, for the client

    def on_greeting(self, reply: bytes) -> list:
        if not reply.startswith(b"+OK"):
            raise BackendRejected(reply)
        if self.starttls:
            return [self.send(b"STLS\r\n", "sending STLS to upstream", "stls")]
        return [self.send_user()]

    def on_stls(self, reply: bytes) -> list:
        if not reply.startswith(b"+OK"):
            raise StartTLSRefused(reply)
        return [BackendStartTLS(), self.send_user()]

    def send_user(self) -> ToBackend:
        if self.mech is not None:
            return self.send(b"AUTH %s %s\r\n" % (self.mech.upper().encode(),
                                                  oauth.encode(self.mech, self.user, self.passwd)),
                             "sending token to upstream", "token")
        return self.send(b"USER " + self.user + b"\r\n", "sending user name to upstream", "user")

    def on_user(self, reply: bytes) -> list:
        if not reply.startswith(b"+OK"):
            raise BackendRejected(reply)
        return [self.send(b"PASS " + self.passwd + b"\r\n", "sending password to upstream",
                          "pass")]

    def on_token(self, reply: bytes) -> list:
        if reply.startswith(b"+ "):         # the error challenge: the dummy response, then -ERR
            self.challenge = oauth.backend_challenge(reply, b"+ ")
            return [self.send(oauth.dummy_response(self.mech) + b"\r\n",
                              "sending token to upstream", "token_error")]
        if not reply.startswith(b"+OK"):
            raise BackendRejected(reply, refused=True)
        return [LoggedIn(reply)]

    def on_token_error(self, reply: bytes) -> list:
        raise BackendRejected(reply, refused=True, challenge=self.challenge)

    def on_pass(self, reply: bytes) -> list:
        if not reply.startswith(b"+OK"):
            raise BackendRejected(reply)
        return [LoggedIn(reply)]


PROTOCOL = Protocol(
    "pop3", (110, 995), b"pop3",
    cert_error=b"-ERR SSL certificate error\r\n",
    no_cert=b"-ERR No required SSL certificate\r\n",
    internal_error=b"-ERR internal server error\r\n",
    temp_failure=b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",  # RFC 3206
    # `pop3_auth plain` enables both (ngx_mail_pop3_merge_srv_conf)
    sasl_order=(("plain", "PLAIN"), ("plain", "LOGIN"), ("cram-md5", "CRAM-MD5"),
                ("external", "EXTERNAL"), ("oauthbearer", "OAUTHBEARER"),
                ("xoauth2", "XOAUTH2")),
    conversation=Pop3Conversation)
Pop3Conversation.descriptor = PROTOCOL
