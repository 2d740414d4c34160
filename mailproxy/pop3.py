"""POP3: the client side before login (ngx_mail_pop3_handler.c) and the backend login."""

from . import sasl
from .clientio import Answered, BackendRejected, Refused, strip_eol
from .session import Session

OK = b"+OK\r\n"
INVALID = b"-ERR invalid command\r\n"
BUFFER_SIZE = 128           # nginx's fixed POP3 command buffer

# Words ngx_mail_pop3_parse_command knows; any other word is a parser error.
COMMANDS = frozenset(("USER", "PASS", "APOP", "QUIT", "CAPA", "AUTH", "NOOP", "STLS"))


Invalid = Refused     # `-ERR invalid command`, not counted in max_errors


def parse_command(line):
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


def sasl_mechanisms(methods):
    """Enabled SASL mechanism names in nginx's fixed order ('plain' enables PLAIN and LOGIN)."""
    mechs = []
    if "plain" in methods:
        mechs += ["PLAIN", "LOGIN"]
    if "cram-md5" in methods:
        mechs.append("CRAM-MD5")
    if "external" in methods:
        mechs.append("EXTERNAL")
    return mechs


class Pop3Session(Session):
    protocol = "pop3"
    INTERNAL_ERROR = b"-ERR internal server error\r\n"
    TEMP_FAILURE = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"   # RFC 3206

    def client_buffer_size(self):
        return getattr(self.conf, "pop3_client_buffer", None) or BUFFER_SIZE

    # ---- greeting and line loop -----------------------------------------------------------

    def greet(self):
        self.state = "start"
        methods = self.conf.pop3_auth
        if "apop" in methods or "cram-md5" in methods:
            self.salt = sasl.make_salt(self.conf.server_name)
            self.send(b"+OK POP3 ready " + self.salt + b"\r\n")
        else:
            self.send(b"+OK POP3 ready\r\n")

    def too_long(self, data):
        return INVALID

    def handle_line(self, line):
        parsed = parse_command(line)
        if parsed is None:
            self.state = "start"
            self.parse_error(INVALID)
            return
        verb, args = parsed
        if self.state == "user" and verb not in ("PASS", "CAPA", "QUIT", "NOOP"):
            handler = None
        elif self.state == "start" and verb == "PASS":
            handler = None
        else:
            handler = getattr(self, "cmd_" + verb)
        try:
            if handler is None:
                raise Invalid()
            handler(args)
        except Invalid:
            self.state = "start"
            self.send(INVALID)
        except sasl.SaslError as e:
            self.info(str(e))
            self.state = "start"
            self.send(INVALID)
        except Answered:
            pass

    def sasl_response(self):
        """The next line as one SASL response token (after a `+ ` continuation)."""
        content = strip_eol(self.next_line())
        if content is None:
            self.state = "start"
            self.parse_error(INVALID)
            raise Answered()
        return content.split(b" ", 1)[0]

    # ---- state helpers ----------------------------------------------------------------------

    def starttls_blocks_auth(self):
        return getattr(self.conf, "starttls", "off") == "only" and not self.tls

    def capability_lines(self, stls):
        conf = self.conf
        starttls = getattr(conf, "starttls", "off")
        lines = [b"+OK Capability list follows"]
        if stls and starttls == "only" and not self.tls:
            lines += [c.encode() for c in conf.pop3_capabilities if c.upper() != "USER"]
            lines.append(b"STLS")
        else:
            lines += [c.encode() for c in conf.pop3_capabilities]
            lines.append(" ".join(["SASL"] + sasl_mechanisms(conf.pop3_auth)).encode())
            if stls and starttls == "on" and not self.tls:
                lines.append(b"STLS")
        lines.append(b".")
        return b"\r\n".join(lines) + b"\r\n"

    def start_auth(self, method, login, passwd):
        self.state = "start"
        super().start_auth(method, login, passwd)

    def after_auth_wait(self):
        self.state = "start"

    def auth_failed_reply(self, result):
        return b"-ERR " + result.message + b"\r\n"

    # ---- commands (ngx_mail_pop3_auth_state) ---------------------------------------------------

    def cmd_USER(self, args):
        if self.starttls_blocks_auth() or len(args) != 1:
            raise Invalid()
        if not sasl.check_credential(args[0]):
            raise Invalid()
        self.login = args[0]
        self.state = "user"
        self.send(OK)

    def cmd_PASS(self, args):
        if len(args) != 1:
            raise Invalid()
        self.start_auth("plain", self.login, args[0])

    def cmd_APOP(self, args):
        if self.starttls_blocks_auth() or "apop" not in self.conf.pop3_auth or len(args) != 2:
            raise Invalid()
        self.start_auth("apop", args[0], args[1])

    def cmd_CAPA(self, args):
        self.send(self.capability_lines(stls=self.state == "start"))

    def cmd_NOOP(self, args):
        self.send(OK)

    def cmd_QUIT(self, args):
        self.send_close(OK)

    def cmd_STLS(self, args):
        # As ngx_mail_pop3_stls: only when starttls is on/only and TLS is not active yet.
        if self.tls or getattr(self.conf, "starttls", "off") not in ("on", "only"):
            raise Invalid()
        self.reader.discard()           # pipelined plaintext is never executed (CVE-2011-0411)
        self.send(OK)
        self.starttls_handshake()

    def cmd_AUTH(self, args):
        if self.starttls_blocks_auth():
            raise Invalid()
        methods = self.conf.pop3_auth
        if not args:
            mechs = sasl_mechanisms(methods)
            self.send(b"+OK methods supported:\r\n"
                      + b"".join(m.encode() + b"\r\n" for m in mechs) + b".\r\n")
            return
        if len(args) > 2:
            raise Invalid()
        mech = args[0].upper()
        initial = args[1] if len(args) == 2 else None
        if mech == b"PLAIN":
            if initial is None:
                self.send(b"+ \r\n")
                initial = self.sasl_response()
            login, passwd = sasl.decode_plain(initial)
            self.start_auth("plain", login, passwd)
        elif mech == b"LOGIN":
            if initial is None:
                self.send(b"+ " + sasl.USERNAME_PROMPT + b"\r\n")
                initial = self.sasl_response()
            login = sasl.decode_login_username(initial)
            self.send(b"+ " + sasl.PASSWORD_PROMPT + b"\r\n")
            passwd = sasl.decode_login_password(self.sasl_response())
            self.start_auth("plain", login, passwd)
        elif mech == b"CRAM-MD5":
            if "cram-md5" not in methods or initial is not None:
                raise Invalid()
            if self.salt is None:
                self.salt = sasl.make_salt(self.conf.server_name)
            self.send(b"+ " + sasl.cram_md5_challenge(self.salt) + b"\r\n")
            login, digest = sasl.decode_cram_md5(self.sasl_response())
            self.start_auth("cram-md5", login, digest)
        elif mech == b"EXTERNAL":
            if "external" not in methods:
                raise Invalid()
            if initial is None:
                self.send(b"+ " + sasl.USERNAME_PROMPT + b"\r\n")
                initial = self.sasl_response()
            self.start_auth("external", sasl.decode_external(initial), b"")
        else:
            raise Invalid()

    # ---- backend login (ngx_mail_proxy_pop3_handler) --------------------------------------------

    def login_backend(self, conn, user, passwd):
        # Only the exact "+OK" counts, at every step (ngx_mail_proxy_read_response); the last
        # reply goes to the client.
        self.backend_reply(conn, b"+OK")
        self.backend_step(conn, b"USER " + user + b"\r\n", "sending user name to upstream", b"+OK")
        return self.backend_step(conn, b"PASS " + passwd + b"\r\n", "sending password to upstream",
                                 b"+OK")

    # ---- TLS to the backend (proxy_ssl starttls) -------------------------------------------

    def backend_starttls(self, conn):
        """proxy_ssl starttls: greeting, STLS, +OK; returns the greeting (replayed later)."""
        from . import backend
        greeting = conn.read_reply()
        if not greeting.startswith(b"+OK"):
            raise BackendRejected(greeting)
        self.action = "sending STLS to upstream"
        conn.send(b"STLS\r\n")
        self.action = "reading response from upstream"
        reply = conn.read_reply()
        if not reply.startswith(b"+OK"):
            raise backend.starttls_refused(reply)
        return greeting
