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

import base64
import errno
import socket

from . import backend, resolver, sasl
from .log import sanitize
from .clientio import Answered, BackendRejected, Close, Refused, strip_eol
from .session import Session

CRLF = b"\r\n"

OK = b"250 2.0.0 OK\r\n"
BYE = b"221 2.0.0 Bye\r\n"
START_TLS = b"220 2.0.0 Start TLS\r\n"
NEXT = b"334 \r\n"
USERNAME = b"334 " + sasl.USERNAME_PROMPT + b"\r\n"
PASSWORD = b"334 " + sasl.PASSWORD_PROMPT + b"\r\n"
INVALID = b"500 5.5.1 Invalid command\r\n"
INVALID_PIPELINING = b"503 5.5.0 Improper use of SMTP command pipelining\r\n"
INVALID_ARGUMENT = b"501 5.5.4 Invalid argument\r\n"
AUTH_REQUIRED = b"530 5.7.1 Authentication required\r\n"
BAD_SEQUENCE = b"503 5.5.1 Bad sequence of commands\r\n"
AUTH_OK = b"235 2.0.0 OK\r\n"
INTERNAL_ERROR = b"451 4.3.2 Internal server error\r\n"
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

    def __init__(self, verb, args, text):
        self.verb, self.args, self.text = verb, args, text

    def __eq__(self, other):
        return (isinstance(other, Command)
                and (self.verb, self.args, self.text) == (other.verb, other.args, other.text))

    def __repr__(self):
        return "Command(%r, %r, %r)" % (self.verb, self.args, self.text)


def _split_args(rest):
    """Space-separated arguments (only the space separates; tabs belong to an argument)."""
    return [a for a in rest.split(b" ") if a]


def parse_command(line):
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


def parse_sasl_response(line):
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


def xtext(value):
    """RFC 1891 xtext, as nginx 1.29.2+ encodes XCLIENT LOGIN: `+XX` for bytes outside
    0x21-0x7E and for `+` and `=`."""
    out = bytearray()
    for b in value:
        if b < 0x21 or b > 0x7E or b in (0x2B, 0x3D):
            out += b"+%02X" % b
        else:
            out.append(b)
    return bytes(out)


def xclient_addr(ip):
    """XCLIENT ADDR/DESTADDR value: IPv6 addresses carry the `IPV6:` prefix."""
    ip = str(ip)
    if ":" in ip:
        return b"IPV6:" + ip.encode("ascii", "replace")
    return ip.encode("ascii", "replace")


def sasl_mechanisms(methods):
    """The AUTH words for the enabled methods in nginx's fixed order ('none' adds nothing)."""
    order = (("plain", "PLAIN"), ("login", "LOGIN"), ("cram-md5", "CRAM-MD5"),
             ("external", "EXTERNAL"))
    return [word for name, word in order if name in methods]


def ehlo_reply(name, capabilities, methods, starttls="off", tls=False):
    """The EHLO reply as bytes, composed as ngx_mail_smtp_merge_srv_conf does."""
    lines = [name]
    lines += list(capabilities)
    mechs = sasl_mechanisms(methods)
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


def rejected_text(data):
    """What `client was rejected...` logs: the bytes with CR and LF shown as `_` (a copy)."""
    return sanitize(bytes(data).replace(b"\r", b"_").replace(b"\n", b"_"), 1024)


# ------------------------------------------------------------------------------------------------
# the session

Invalid = Refused     # `500 5.5.1 Invalid command`, not counted in max_errors


class SmtpSession(Session):
    protocol = "smtp"
    INTERNAL_ERROR = INTERNAL_ERROR

    @classmethod
    def busy_reply(cls, conf):
        name = str(conf.server_name).encode("utf-8", "surrogateescape")
        return b"421 4.7.0 " + name + b" Too many connections, try again later\r\n"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.host = resolver.UNAVAILABLE    # Client-Host / XCLIENT NAME
        self.helo = None                    # bytes: the client's HELO/EHLO argument
        self.esmtp = False                  # the client's last greeting was EHLO
        self.smtp_from = None               # bytes: whole MAIL command (none mode)
        self.smtp_to = None                 # bytes: whole RCPT command (none mode)

    def client_buffer_size(self):
        return self.conf.smtp_client_buffer

    def _name(self):
        return str(self.conf.server_name).encode("utf-8", "surrogateescape")

    # ---- before the greeting ----------------------------------------------------------------

    def resolve_client(self):
        """Client-Host / XCLIENT NAME (resolver.py); without a resolver `[UNAVAILABLE]`."""
        conf = self.conf
        conf_resolver = getattr(conf, "resolver", None)
        if conf_resolver is None:
            self.host = resolver.UNAVAILABLE
            return
        self.action = "in resolving client address"
        host, msg = resolver.client_name(self.client_ip, conf_resolver,
                                         getattr(conf, "resolver_timeout", 30.0))
        if msg is not None:
            self.action = msg.action
            self.error(str(msg))
        self.host = host

    def delay_greeting(self, delay):
        """smtp_greeting_delay: a client that sends anything before the greeting is refused."""
        self.action = "in delay pipelining state"
        self.sock.settimeout(delay)
        try:
            data = self.sock.recv(self.client_buffer_size())
        except socket.timeout:      # not TimeoutError: on Python 3.9 it is an OSError only
            return
        except OSError as e:
            self.info("recv() failed", err=e.errno or errno.ECONNRESET)
            raise Close() from None
        finally:
            self.restore_timeout()
        if not data:
            self.info("client closed connection")
            raise Close()
        self.info('client was rejected before greeting: "%s"' % rejected_text(data))
        self.send_close(INVALID_PIPELINING)

    def greet(self):
        self.resolve_client()
        delay = getattr(self.conf, "smtp_greeting_delay", 0) or 0
        if delay > 0:
            self.delay_greeting(delay)
        self.action = "sending client greeting line"
        self.state = "start"
        # nginx arms `timeout` at the greeting (ngx_mail_smtp_greeting, and again after the
        # delay in ngx_mail_smtp_invalid_pipelining): the client name lookup and the delay
        # are not the client's time
        self.rearm()
        self.send(b"220 " + self._name() + b" ESMTP ready\r\n")

    # ---- line loop ------------------------------------------------------------------------------

    def too_long(self, data):
        return INVALID

    def handle_line(self, line):
        cmd = parse_command(line)
        if cmd is None:
            self.parse_error(INVALID)
            return
        try:
            getattr(self, "cmd_" + cmd.verb)(cmd)
        except Invalid:
            self.send(INVALID)
        except sasl.SaslError as e:
            self.info(str(e))
            self.send(INVALID)
        except Answered:
            pass
        finally:
            self.state = "start"

    def sasl_response(self):
        """The next line as one SASL response (after a 334 prompt)."""
        token = parse_sasl_response(self.next_line())
        if token is None:
            self.parse_error(INVALID)
            raise Answered()
        return token

    # ---- helpers --------------------------------------------------------------------------------

    def starttls_only(self):
        return getattr(self.conf, "starttls", "off") == "only" and not self.tls

    def after_auth_wait(self):
        self.state = "start"

    def auth_failed_reply(self, result):
        code = result.error_code
        if isinstance(code, str):
            code = code.encode("utf-8", "surrogateescape")
        message = result.message
        if isinstance(message, str):
            message = message.encode("utf-8", "surrogateescape")
        return (code or DEFAULT_ERROR_CODE) + b" " + message + CRLF

    def auth_request_extra(self, req):
        req.client_host = self.host
        if self.method == "none":
            req.smtp_helo = self.helo or b""
            req.smtp_from = self.smtp_from or b""
            req.smtp_to = self.smtp_to or b""

    # ---- commands (ngx_mail_smtp_auth_state) --------------------------------------------------

    def _greeting(self, cmd):
        if len(cmd.args) != 1:
            self.send(INVALID_ARGUMENT)
            return False
        self.helo = cmd.args[0]
        self.smtp_from = self.smtp_to = None
        return True

    def cmd_HELO(self, cmd):
        if self._greeting(cmd):
            self.esmtp = False
            self.send(b"250 " + self._name() + CRLF)

    def cmd_EHLO(self, cmd):
        if self._greeting(cmd):
            self.esmtp = True
            conf = self.conf
            self.send(ehlo_reply(self._name(), conf.smtp_capabilities, conf.smtp_auth,
                                 getattr(conf, "starttls", "off"), self.tls))

    def cmd_AUTH(self, cmd):
        if self.starttls_only():
            raise Invalid()
        args = cmd.args
        if not args:
            self.send(INVALID_ARGUMENT)
            return
        methods = self.conf.smtp_auth
        mech = args[0].upper()
        if mech == b"LOGIN":
            if len(args) > 2:
                raise Invalid()
            if len(args) == 1:
                self.state = "auth_login_username"
                self.send(USERNAME)
                login = sasl.decode_login_username(self.sasl_response())
            else:
                login = sasl.decode_login_username(args[1])
            self.state = "auth_login_password"
            self.send(PASSWORD)
            passwd = sasl.decode_login_password(self.sasl_response())
            self.start_auth("plain", login, passwd)
        elif mech == b"PLAIN":
            if len(args) > 2:
                raise Invalid()
            if len(args) == 1:
                self.state = "auth_plain"
                self.send(NEXT)
                initial = self.sasl_response()
            else:
                initial = args[1]
            login, passwd = sasl.decode_plain(initial)
            self.start_auth("plain", login, passwd)
        elif mech == b"CRAM-MD5":
            if len(args) != 1 or "cram-md5" not in methods:
                raise Invalid()
            if self.salt is None:
                self.salt = sasl.make_salt(self.conf.server_name)
            self.state = "auth_cram_md5"
            self.send(b"334 " + sasl.cram_md5_challenge(self.salt) + CRLF)
            login, digest = sasl.decode_cram_md5(self.sasl_response())
            self.start_auth("cram-md5", login, digest)
        elif mech == b"EXTERNAL":
            if len(args) > 2 or "external" not in methods:
                raise Invalid()
            if len(args) == 1:
                self.state = "auth_external"
                self.send(USERNAME)
                initial = self.sasl_response()
            else:
                initial = args[1]
            # no password: the auth service must send Auth-Pass for proxy_smtp_auth
            self.start_auth("external", sasl.decode_external(initial), None)
        else:
            raise Invalid()

    def cmd_MAIL(self, cmd):
        if "none" not in self.conf.smtp_auth:
            # log a copy: nginx's ngx_mail_smtp_log_rejected_command mangles the buffer itself
            self.info('client was rejected: "%s"' % rejected_text(cmd.text + CRLF))
            self.send(AUTH_REQUIRED)
            return
        if self.smtp_from:
            self.send(BAD_SEQUENCE)
            return
        if not cmd.args:
            self.send(INVALID_ARGUMENT)
            return
        self.smtp_from = cmd.text
        self.login = self.passwd = None        # 1.29.1: no stale credentials in none mode
        self.send(OK)

    def cmd_RCPT(self, cmd):
        if not self.smtp_from:
            self.send(BAD_SEQUENCE)
            return
        if not cmd.args:
            self.send(INVALID_ARGUMENT)
            return
        self.smtp_to = cmd.text
        self.method = "none"
        self.login = self.passwd = None
        self.authenticate()

    def cmd_RSET(self, cmd):
        self.smtp_from = self.smtp_to = None
        self.send(OK)

    def cmd_NOOP(self, cmd):
        self.send(OK)

    def cmd_QUIT(self, cmd):
        self.send_close(BYE)

    def cmd_STARTTLS(self, cmd):
        # As ngx_mail_smtp_starttls: only with `starttls on|only` and before TLS, else an
        # invalid command.
        handshake = getattr(self, "starttls_handshake", None)
        if (handshake is None or self.tls
                or getattr(self.conf, "starttls", "off") not in ("on", "only")):
            raise Invalid()
        # RFC 3207: forget what the client said before; drop pipelined input (CVE-2014-3556)
        self.helo = self.smtp_from = self.smtp_to = None
        # esmtp (the "client used EHLO" flag) is kept, as ngx_mail_smtp_starttls keeps s->esmtp
        self.reader.discard()
        self.send(START_TLS)
        handshake()

    def cmd_VRFY(self, cmd):
        raise Invalid()

    cmd_EXPN = cmd_HELP = cmd_VRFY

    # ---- backend login (ngx_mail_proxy_smtp_handler) ------------------------------------------

    def _expect(self, conn, ok, action=None):
        """Read one (multi-line) reply; BackendRejected unless ok(reply)."""
        if action is not None:
            self.action = action
        reply = conn.read_reply(backend.smtp_reply_complete)
        if not ok(reply):
            raise BackendRejected(reply)
        return reply

    def _step(self, conn, line, action):
        self.action = action
        conn.discard()
        conn.send(line)
        self.action = "reading response from upstream"

    def xclient_line(self, user):
        conf = self.conf
        parts = [b"XCLIENT ADDR=" + xclient_addr(self.client_ip)]
        extended = getattr(conf, "xclient_extended", False)
        if extended and self.client_port is not None:
            parts.append(b"PORT=%d" % int(self.client_port))
        if user and not conf.proxy_smtp_auth:
            parts.append(b"LOGIN=" + xtext(user))
        parts.append(b"NAME=" + str(self.host).encode("ascii", "replace"))
        if extended:
            try:
                dest = self.sock.getsockname()
            except OSError:
                dest = None
            if isinstance(dest, tuple) and len(dest) >= 2:
                parts.append(b"DESTADDR=" + xclient_addr(dest[0]))
                parts.append(b"DESTPORT=%d" % int(dest[1]))
        return b" ".join(parts) + CRLF

    def login_backend(self, conn, user, passwd):
        conf = self.conf
        none = self.method == "none"
        self._expect(conn, lambda r: r.startswith(b"220"))
        verb = b"EHLO " if (self.esmtp or conf.xclient) else b"HELO "
        self._step(conn, verb + self._name() + CRLF, "sending HELO/EHLO to upstream")
        self._expect(conn, lambda r: r.startswith(b"250"))
        if conf.xclient:
            self._step(conn, self.xclient_line(user), "sending XCLIENT to upstream")
            self._expect(conn, lambda r: r[:3] in (b"220", b"250"))
            if self.helo:
                self._step(conn, (b"EHLO " if self.esmtp else b"HELO ") + self.helo + CRLF,
                           "sending client HELO/EHLO to upstream")
                self._expect(conn, lambda r: r.startswith(b"250"))
        if none:
            self._step(conn, self.smtp_from + CRLF, "sending MAIL FROM to upstream")
            self._expect(conn, lambda r: r.startswith(b"250"))
            self._step(conn, self.smtp_to + CRLF, "sending RCPT TO to upstream")
            # whatever the backend says to RCPT is the client's answer
            return self._expect(conn, lambda r: True)
        if conf.proxy_smtp_auth:
            self.action = "sending AUTH to upstream"
            if passwd is None or (self.method == "cram-md5" and passwd is self.passwd):
                # CRAM-MD5 / EXTERNAL without Auth-Pass: nothing to log in with
                self.error("no password available")
                self.internal_error()
            self._step(conn, b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + passwd)
                       + CRLF, "sending AUTH to upstream")
            self._expect(conn, lambda r: r.startswith(b"235"))
        return AUTH_OK


    # ---- TLS to the backend (proxy_ssl starttls) -------------------------------------------

    def backend_starttls(self, conn):
        """proxy_ssl starttls: greeting, EHLO, STARTTLS, 220; returns the greeting (replayed,
        so login_backend() says EHLO again over TLS, as RFC 3207 requires)."""
        greeting = self._expect(conn, lambda r: r.startswith(b"220"))
        self._step(conn, b"EHLO " + self._name() + CRLF, "sending HELO/EHLO to upstream")
        self._expect(conn, lambda r: r.startswith(b"250"))
        self._step(conn, b"STARTTLS" + CRLF, "sending STARTTLS to upstream")
        reply = conn.read_reply(backend.smtp_reply_complete)
        if not reply.startswith(b"220"):
            raise backend.starttls_refused(reply)
        return greeting
