"""IMAP: the client side before login (ngx_mail_imap_handler.c) and the backend login.

The command parser is a pure piece (`parse_command`, `parse_sasl_line`, `tag_of`): it reads from
any object with `readline()`, `read_exact(n)` and `continue_literal()`, so it can be tested
without sockets. It follows nginx's ngx_mail_imap_parse_command, with these corrections:

* an unterminated quoted string is a syntax error of its own line (nginx cuts it at the line
  end and leaks the "inside quotes" state into the next command);
* a tag must have at least one character (nginx takes a line starting with a space as an empty
  tag); `{}` / `{+}` (no digits) are syntax errors, and `{0}` is an empty literal (nginx takes
  one byte for it); only one CR may precede the LF after a literal announcement;
* a synchronising literal that cannot fit in `imap_client_buffer` is refused at once as a too
  long command, before `+ OK` (nginx says `+ OK`, lets the client send, then refuses);
* `ID` is parsed (a parenthesised list of strings, or NIL) and answered, as our addition.

Commands are bounded as a whole (line, literals, continuation lines) by `imap_client_buffer`,
so no command ever holds more than that in memory.
"""

import re
import secrets

from . import sasl
from .log import sanitize
from .clientio import Answered, BackendRejected, LineTooLong, Refused
from .session import Session

CRLF = b"\r\n"
GREETING = b"* OK IMAP4 ready\r\n"
OK = b"OK completed\r\n"
BAD = b"BAD invalid command\r\n"
UNTAGGED = b"* "
BYE = b"* BYE\r\n"
LITERAL_CONTINUE = b"+ OK\r\n"
PLAIN_CONTINUE = b"+ \r\n"
ID_REPLY = b"* ID NIL\r\n"
PAGE_SIZE = 4096            # nginx's default imap_client_buffer (one memory page)

MAX_TAG = 32                # tag characters (since nginx 1.21.0)
MAX_ARGS = 3                # arguments per command (nginx's args array check)

# Command words ngx_mail_imap_parse_command knows, and ID (ours); any other is a parser error.
COMMANDS = frozenset(("NOOP", "LOGIN", "LOGOUT", "STARTTLS", "CAPABILITY", "AUTHENTICATE", "ID"))

# Dovecot-style ID fields sent to the backend with `imap_client_id on` (our addition).
BACKEND_ID_TAG = b"mailproxy-id "

_TAG_RE = re.compile(rb"[A-Za-z0-9._-]{1,%d} " % MAX_TAG)
_WORD_RE = re.compile(rb"[A-Za-z]+")
_SPACES_RE = re.compile(rb" *")
_ATOM_RE = re.compile(rb"[^ \r\n]+")
_LIST_ATOM_RE = re.compile(rb"[^ ()\r\n\"{]+")
_QUOTED_RE = re.compile(rb'"((?:[^"\\\r\n]|\\[^\r\n])*)"')
_UNESCAPE_RE = re.compile(rb"\\(.)", re.S)
_LITERAL_RE = re.compile(rb"\{([0-9]+)(\+?)\}\r?\n\Z")
_MAX_DIGITS = 18            # longer literal lengths are "too long" without converting them


class ParseError(Exception):
    """A command rejected by the parser (counts towards max_errors).

    `tag` is the tag with its space when the tag was complete and valid, else None (the reply
    is then untagged). `close` is the {N+} safety rule: the line ended in a non-synchronising
    literal announcement, whose bytes would otherwise be executed as commands.
    """

    def __init__(self, tag, close=False, why=""):
        super().__init__(why or "invalid command")
        self.tag = tag
        self.close = close


class TooLong(Exception):
    """The command does not fit in the client buffer: answered, then the session closes."""

    def __init__(self, tag, data):
        super().__init__("too long command")
        self.tag = tag
        self.data = data


class Command:
    """One parsed command: tag (bytes with its space), verb (upper-case str), args (bytes)."""

    __slots__ = ("tag", "verb", "args", "size")

    def __init__(self, tag, verb, args, size):
        self.tag = tag
        self.verb = verb
        self.args = args            # ID: the list items, None standing for NIL
        self.size = size            # bytes the command took from the client

    def __repr__(self):
        return "Command(%r, %r, %r)" % (self.tag, self.verb, self.args)


def ends_with_nonsync_literal(line):
    """nginx's safety check on a skipped line: does it end in `+}` (before CR LF / LF)?"""
    if line.endswith(b"\n"):
        line = line[:-1]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line.endswith(b"+}")


def tag_of(data):
    """The tag (with its space) at the start of `data` if it is complete and valid, else None."""
    m = _TAG_RE.match(data)
    return m.group() if m else None


class _Scanner:
    """One command being parsed: the current line segment, position, and byte budget."""

    def __init__(self, line, io, limit):
        self.io = io
        self.limit = limit
        self.line = line
        self.pos = 0
        self.used = len(line)
        self.tag = None
        self.seen = [line]          # the command's segments so far (for the too-long log)
        if self.used > limit:
            raise TooLong(tag_of(line), line)

    # ---- errors ------------------------------------------------------------------------------

    def invalid(self, why=""):
        raise ParseError(self.tag, ends_with_nonsync_literal(self.line), why)

    def too_long(self, data=None):
        if data is None:
            data = b"".join(self.seen)
        raise TooLong(self.tag, data)

    # ---- small scanning steps ------------------------------------------------------------------

    def peek(self):
        line, pos = self.line, self.pos
        return line[pos:pos + 1]

    def skip_spaces(self):
        self.pos = _SPACES_RE.match(self.line, self.pos).end()

    def at_end(self):
        """True at the line end (CR LF or LF); a CR followed by anything else is invalid."""
        c = self.peek()
        if c == b"\n":
            return True
        if c == b"\r":
            if self.line[self.pos + 1:self.pos + 2] == b"\n":
                return True
            self.invalid("CR not followed by LF")
        return False

    def quoted(self):
        m = _QUOTED_RE.match(self.line, self.pos)
        if m is None:
            # unterminated (or a backslash before the line end): a syntax error of this line
            self.invalid("unterminated quoted string")
        self.pos = m.end()
        value = m.group(1)
        if b"\\" in value:
            value = _UNESCAPE_RE.sub(rb"\1", value)
        return value

    def literal(self, followers):
        """`{n}` / `{n+}` ending the line: the n bytes that follow, verbatim.

        Afterwards the scanner is on the next segment, whose first byte must be in `followers`
        (or the line end).
        """
        m = _LITERAL_RE.match(self.line, self.pos)
        if m is None:
            self.invalid("bad literal")
        digits, plus = m.group(1), m.group(2)
        room = self.limit - self.used - 1           # at least the LF must follow the data
        n = int(digits) if len(digits) <= _MAX_DIGITS else room + 1
        if n > room:
            self.too_long()
        if not plus:
            self.io.continue_literal()
        try:
            data = self.io.read_exact(n) if n else b""
            self.used += n
            self.seen.append(data)
            line = self.io.readline(self.limit - self.used)
        except LineTooLong as e:
            self.seen.append(e.data)
            self.too_long()
        self.used += len(line)
        self.seen.append(line)
        self.line, self.pos = line, 0
        if self.used > self.limit:
            self.too_long()
        c = line[:1]
        if c not in followers and c not in (b"\r", b"\n"):
            self.invalid("bad character after literal")
        return data

    # ---- the grammar -----------------------------------------------------------------------------

    def command(self):
        m = _TAG_RE.match(self.line)
        if m is None:
            self.invalid("bad tag")
        self.tag = m.group()
        self.pos = m.end()
        self.skip_spaces()
        m = _WORD_RE.match(self.line, self.pos)
        if m is None:
            self.invalid("bad command word")
        self.pos = m.end()
        if self.peek() not in (b" ", b"\r", b"\n"):
            self.invalid("bad command word")
        verb = m.group().upper().decode("ascii")
        if verb not in COMMANDS:
            self.invalid("unknown command")
        if verb == "ID":
            args = self.id_params()
        else:
            args = self.arguments()
        return Command(self.tag, verb, args, self.used)

    def arguments(self):
        """Up to three atoms, quoted strings or literals, separated by spaces."""
        args = []
        while True:
            self.skip_spaces()
            if self.at_end():
                return args
            if len(args) >= MAX_ARGS:
                self.invalid("too many arguments")
            c = self.peek()
            if c == b'"':
                args.append(self.quoted())
            elif c == b"{":
                args.append(self.literal((b" ",)))
            else:
                m = _ATOM_RE.match(self.line, self.pos)
                self.pos = m.end()
                args.append(m.group())

    def id_params(self):
        """`ID NIL` or `ID (string nstring ...)`: the items (None for NIL) or None for NIL."""
        if self.peek() != b" ":
            self.invalid("ID without arguments")
        self.skip_spaces()
        if self.peek() == b"(":
            self.pos += 1
            items = []
            while True:
                self.skip_spaces()
                c = self.peek()
                if c == b")":
                    self.pos += 1
                    break
                if c == b'"':
                    items.append(self.quoted())
                elif c == b"{":
                    items.append(self.literal((b" ", b")")))
                else:
                    m = _LIST_ATOM_RE.match(self.line, self.pos)
                    if m is None or m.group().upper() != b"NIL":
                        self.invalid("bad ID list item")
                    self.pos = m.end()
                    items.append(None)
            args = items
        else:
            m = _ATOM_RE.match(self.line, self.pos)
            if m is None or m.group().upper() != b"NIL":
                self.invalid("bad ID argument")
            self.pos = m.end()
            args = None
        self.skip_spaces()
        if not self.at_end():
            self.invalid("junk after ID arguments")
        return args


def parse_command(line, io, limit):
    """Parse one command starting with `line` (a line including its LF, at most `limit` bytes).

    `io` supplies the rest of a command with literals: `continue_literal()` is called before the
    bytes of a synchronising literal are awaited (the session sends `+ OK`), `read_exact(n)` and
    `readline(limit)` return client bytes (and raise clientio.LineTooLong when no LF comes
    within `limit` bytes).
    Returns a Command; raises ParseError or TooLong.
    """
    return _Scanner(line, io, limit).command()


def parse_sasl_line(line, tag=None):
    """An AUTHENTICATE continuation line -> its first token (the base64 response).

    Raises ParseError (with `tag`) for a CR that does not end the line.
    """
    content = line[:-1] if line.endswith(b"\n") else line
    if content.endswith(b"\r"):
        content = content[:-1]
    if b"\r" in content:
        raise ParseError(tag, ends_with_nonsync_literal(line), "CR not followed by LF")
    return content.split(b" ", 1)[0]


def capability_line(capabilities, methods, starttls="off", tls=False):
    """`* CAPABILITY ...` with CRLF (the lines ngx_mail_imap_merge_srv_conf builds)."""
    words = [b"* CAPABILITY"] + [c.encode("utf-8", "surrogateescape") if isinstance(c, str)
                                 else bytes(c) for c in capabilities]
    if not tls and starttls == "only":
        words.append(b"STARTTLS LOGINDISABLED")
    else:
        for method, name in (("plain", b"AUTH=PLAIN"), ("login", b"AUTH=LOGIN"),
                             ("cram-md5", b"AUTH=CRAM-MD5"), ("external", b"AUTH=EXTERNAL")):
            if method in methods:
                words.append(name)
        if not tls and starttls == "on":
            words.append(b"STARTTLS")
    return b" ".join(words) + CRLF


def backend_login_complete(buf):
    """read_reply() completion for the final LOGIN reply: one untagged line may come first."""
    if buf.startswith(b"* "):
        i = buf.find(CRLF, 2)
        return i >= 0 and len(buf) - (i + 2) >= 4
    return True


def check_login_reply(buf, tag):
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


def backend_id_command(fields):
    """`<tag>ID ("k" "v" ...)` CRLF from [(key, value)] pairs."""
    items = " ".join("%s %s" % (_quote(k), _quote(v)) for k, v in fields)
    return BACKEND_ID_TAG + ("ID (%s)" % items).encode("ascii", "replace") + CRLF


def backend_id_complete(buf):
    return buf.startswith(BACKEND_ID_TAG) or (b"\n" + BACKEND_ID_TAG) in buf


Invalid = Refused     # `<tag>BAD invalid command`, not counted in max_errors


class _ClientIO:
    """What the parser reads literals and continuation segments through."""

    def __init__(self, session):
        self.session = session

    def readline(self, limit):
        return self.session.reader.readline(limit)

    def read_exact(self, n):
        return self.session.reader.read_exact(n)

    def continue_literal(self):
        self.session.send(LITERAL_CONTINUE)


class ImapSession(Session):
    protocol = "imap"
    INTERNAL_ERROR = b"* BAD internal server error\r\n"
    TEMP_FAILURE = b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"  # RFC 5530

    def client_buffer_size(self):
        return getattr(self.conf, "imap_client_buffer", None) or PAGE_SIZE

    # ---- greeting and command loop ------------------------------------------------------------

    def greet(self):
        self.tag = None
        self.session_id = None
        self.io = _ClientIO(self)
        self.send(GREETING)

    def too_long(self, data):
        # The first line of a command, or an AUTHENTICATE continuation line (tag kept).
        return (self.tag or tag_of(data) or UNTAGGED) + BAD

    def reply(self, data):
        """`<tag>data`, or `* data` when there is no tag."""
        return (self.tag or UNTAGGED) + data

    def handle_line(self, line):
        self.tag = None
        try:
            cmd = parse_command(line, self.io, self.client_buffer_size())
        except TooLong as e:
            self.info('client sent too long command "%s"' % sanitize(e.data, 1024))
            self.send_close((e.tag or UNTAGGED) + BAD)
        except ParseError as e:
            self.reject(e)
            return
        self.tag = cmd.tag
        try:
            getattr(self, "cmd_" + cmd.verb)(cmd.args)
        except Invalid:
            self.send(self.tag + BAD)
        except sasl.SaslError as e:
            self.info(str(e))
            self.send(self.tag + BAD)
        except Answered:
            pass
        self.tag = None

    def reject(self, e):
        """Answer a parser error: counted for max_errors; the {N+} rule closes at once."""
        reply = (e.tag or UNTAGGED) + BAD
        if e.close:
            self.errors += 1
            if self.errors >= self.conf.max_errors:
                self.info("client sent too many invalid commands")
            self.send_close(reply)
        self.parse_error(reply)

    def sasl_response(self):
        """The next line as one SASL response token (after a `+ ...` continuation)."""
        try:
            return parse_sasl_line(self.next_line(), self.tag)
        except ParseError as e:
            self.reject(e)
            raise Answered() from None

    # ---- state helpers ----------------------------------------------------------------------

    def starttls_mode(self):
        return getattr(self.conf, "starttls", "off") or "off"

    def starttls_blocks_auth(self):
        return self.starttls_mode() == "only" and not self.tls

    def methods(self):
        return getattr(self.conf, "imap_auth", None) or ["plain"]

    def after_auth_wait(self):
        self.method = None

    def auth_failed_reply(self, result):
        return self.reply(b"NO " + result.message + CRLF)

    # ---- commands (ngx_mail_imap_auth_state) ----------------------------------------------------

    def cmd_CAPABILITY(self, args):
        conf = self.conf
        caps = getattr(conf, "imap_capabilities", None)
        if caps is None:
            caps = ["IMAP4", "IMAP4rev1", "UIDPLUS"]
        self.send(capability_line(caps, self.methods(), self.starttls_mode(), self.tls)
                  + self.tag + OK)

    def cmd_NOOP(self, args):
        self.send(self.tag + OK)

    def cmd_LOGOUT(self, args):
        self.send_close(BYE + self.tag + OK)

    def cmd_ID(self, args):
        # Our addition: nginx refuses ID before login, which breaks clients that send it first.
        self.send(ID_REPLY + self.tag + OK)

    def cmd_STARTTLS(self, args):
        # As ngx_mail_imap_starttls: only when starttls is on/only and TLS is not active yet.
        if self.tls or self.starttls_mode() not in ("on", "only"):
            raise Invalid()
        self.reader.discard()           # pipelined plaintext is never executed (CVE-2011-0411)
        self.send(self.tag + OK)
        self.starttls_handshake()

    def cmd_LOGIN(self, args):
        if self.starttls_blocks_auth() or len(args) != 2 or not args[0]:
            raise Invalid()
        self.start_auth("plain", args[0], args[1])

    def cmd_AUTHENTICATE(self, args):
        if self.starttls_blocks_auth() or not args:
            raise Invalid()
        mech = args[0].upper()
        n = len(args)
        methods = self.methods()
        if mech == b"LOGIN":
            if n == 1:
                self.send(b"+ " + sasl.USERNAME_PROMPT + CRLF)
                try:
                    login = sasl.decode_login_username(self.sasl_response())
                except sasl.SaslError as e:
                    # nginx quirk: ngx_mail_imap_auth_state sends this one untagged, without `*`.
                    self.info(str(e))
                    self.send(BAD)
                    raise Answered() from None
            elif n == 2:
                login = sasl.decode_login_username(args[1])
            else:
                raise Invalid()
            self.send(b"+ " + sasl.PASSWORD_PROMPT + CRLF)
            passwd = sasl.decode_login_password(self.sasl_response())
            self.start_auth("plain", login, passwd)
        elif mech == b"PLAIN":
            if n == 1:
                self.send(PLAIN_CONTINUE)
                initial = self.sasl_response()
            elif n == 2:
                initial = args[1]
            else:
                raise Invalid()
            login, passwd = sasl.decode_plain(initial)
            self.start_auth("plain", login, passwd)
        elif mech == b"CRAM-MD5":
            if "cram-md5" not in methods or n != 1:
                raise Invalid()
            if self.salt is None:
                self.salt = sasl.make_salt(self.conf.server_name)
            self.send(b"+ " + sasl.cram_md5_challenge(self.salt) + CRLF)
            login, digest = sasl.decode_cram_md5(self.sasl_response())
            self.start_auth("cram-md5", login, digest)
        elif mech == b"EXTERNAL":
            # nginx accepts EXTERNAL with an initial response even when disabled; we do not.
            if "external" not in methods or n > 2:
                raise Invalid()
            if n == 1:
                self.send(b"+ " + sasl.USERNAME_PROMPT + CRLF)
                initial = self.sasl_response()
            else:
                initial = args[1]
            self.start_auth("external", sasl.decode_external(initial), b"")
        else:
            raise Invalid()

    # ---- backend login (ngx_mail_proxy_imap_handler) --------------------------------------------

    def backend_id_fields(self):
        """Dovecot's ID fields: who the client is and where it connected (our addition)."""
        fields = []
        if self.client_ip is not None:
            fields += [("x-originating-ip", self.client_ip),
                       ("x-originating-port", self.client_port)]
        local = None
        hdr = self.proxy_header
        if hdr and getattr(self, "proxy_trusted", False) and hdr[2] is not None:
            local = (hdr[2], hdr[3])    # where the client went: set_real_ip_from peers only
        else:
            try:
                name = self.sock.getsockname()
                if isinstance(name, tuple):
                    local = (name[0], name[1])
            except OSError:
                pass
        if local is not None:
            fields += [("x-connected-ip", local[0]), ("x-connected-port", local[1])]
        if self.session_id is None:
            self.session_id = secrets.token_urlsafe(12)
        fields.append(("x-session-id", self.session_id))
        return fields

    def login_backend(self, conn, user, passwd):
        tag = self.tag
        self.backend_reply(conn, b"* OK")
        if getattr(self.conf, "imap_client_id", False):
            # whatever it answers (NO/BAD too)
            self.backend_step(conn, backend_id_command(self.backend_id_fields()),
                              "sending ID command to upstream", complete=backend_id_complete)
        # LOGIN with synchronising literals: each "+" continuation before the next part
        self.backend_step(conn, tag + b"LOGIN {%d}\r\n" % len(user),
                          "sending LOGIN command to upstream", b"+")
        self.backend_step(conn, user + b" {%d}\r\n" % len(passwd),
                          "sending user name to upstream", b"+")
        reply = self.backend_step(conn, passwd + CRLF, "sending password to upstream",
                                  complete=backend_login_complete)
        check_login_reply(reply, tag)
        return reply

    # ---- TLS to the backend (proxy_ssl starttls) -------------------------------------------

    BACKEND_STARTTLS_TAG = b"mpTLS "

    def backend_starttls(self, conn):
        """proxy_ssl starttls: greeting, `mpTLS STARTTLS`, tagged OK; returns the greeting."""
        from . import backend
        tag = self.BACKEND_STARTTLS_TAG
        greeting = conn.read_reply()
        if not greeting.startswith(b"* OK"):
            raise BackendRejected(greeting)
        self.action = "sending STARTTLS to upstream"
        conn.send(tag + b"STARTTLS" + CRLF)
        self.action = "reading response from upstream"
        reply = conn.read_reply(lambda buf: buf.startswith(tag) or (b"\n" + tag) in buf)
        i = 0 if reply.startswith(tag) else reply.find(b"\n" + tag) + 1
        if not reply.startswith(tag + b"OK", i):
            raise backend.starttls_refused(reply[i:])
        return greeting
