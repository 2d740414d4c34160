"""Ready-made POP3, IMAP, SMTP and ManageSieve backends (ScriptedBackend subclasses with a fake mailbox)
and the deterministic big message they stream."""

import base64
import binascii
import hashlib
import re

from tests.support.backends import ScriptedBackend
from tests.support.common import CRLF

IMAP_LOGGED_IN = b"OK [CAPABILITY IMAP4rev1 IDLE] Logged in"
IMAP_REFUSED = b"NO [AUTHENTICATIONFAILED] Authentication failed."
# what a backend answers a refused token with (RFC 7628 section 3.2.2), as its challenge
TOKEN_ERROR = base64.b64encode(b'{"status":"invalid_token","scope":"mail"}')


def token_login(mech, response):
    """(user, token) from an OAUTHBEARER / XOAUTH2 response (base64), None when malformed."""
    try:
        msg = base64.b64decode(response, validate=True)
    except binascii.Error:
        return None
    mech = mech.upper()
    if mech == b"XOAUTH2":
        m = re.fullmatch(rb"user=([^\x01]*)\x01auth=Bearer ([^\x01]+)\x01\x01", msg)
    elif mech == b"OAUTHBEARER":
        m = re.fullmatch(rb"n,a=([^,]*),\x01(?:[a-z]+=[^\x01]*\x01)*?auth=Bearer ([^\x01]+)"
                         rb"\x01(?:[a-z]+=[^\x01]*\x01)*\x01", msg)
    else:
        return None
    return (m.group(1), m.group(2)) if m else None


def check_token(tokens, mech, response, conn):
    """Record the login in conn.data['auth'] (mech, user, token); True when `tokens` (a dict
    {token: user}, bytes) holds that token for that user."""
    got = token_login(mech, response)
    conn.data["auth"] = (mech.upper(),) + (got or (None, None))
    return got is not None and tokens.get(got[1]) == got[0]


# --- the big message: deterministic, generated in chunks, never starts a line with "."

_BIG_LINE = 64


def big_message_chunks(size, chunk_lines=1024):
    """Yield the bytes of a deterministic `size`-byte message (CRLF lines of 64 bytes, last shorter)."""
    filler = (b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-_" * 2)
    remaining = size
    n = 0
    while remaining > 0:
        parts = []
        for _ in range(chunk_lines):
            head = b"L%010d " % n
            line = head + filler[:_BIG_LINE - len(head) - 2] + CRLF
            parts.append(line)
            n += 1
        chunk = b"".join(parts)
        if len(chunk) > remaining:
            chunk = chunk[:remaining]
            if remaining >= 2:
                chunk = chunk[:-2] + CRLF
        remaining -= len(chunk)
        yield chunk


def big_message_digest(size):
    h = hashlib.sha256()
    for chunk in big_message_chunks(size):
        h.update(chunk)
    return h.hexdigest()


class Pop3Backend(ScriptedBackend):
    """A POP3 server with a fake mailbox, recording everything.

    users:        {login: password} accepted by PASS (login/password compared as str, raw bytes
                  decoded as UTF-8 with surrogateescape)
    messages:     list of message bytes (CRLF lines); RETR dot-stuffs them
    big_size:     if set, one extra last message of that many bytes, generated and streamed
    greeting:     first line (None: send nothing; a list: several lines)
    user_reply / pass_reply: replies to USER / to a correct PASS (pass_reply may be a list of lines)
    refuse:       reply line to a wrong PASS (default `-ERR [AUTH] Authentication failed.`)
    refuse_user:  if set, USER is answered with this line (e.g. `-ERR no such user`)
    close_after:  'accept' (close before greeting), 'greeting', 'user', 'pass'
    stall_at:     'greeting' (never greet), 'user', 'pass' (never answer that command)
    reset_at:     like close_after but with RST
    extra_after_pass: lines sent right after the PASS reply (unsolicited)
    """

    def __init__(self, users=None, messages=None, big_size=None, greeting=b"+OK ready",
                 user_reply=b"+OK", pass_reply=b"+OK logged in",
                 refuse=b"-ERR [AUTH] Authentication failed.", refuse_user=None,
                 close_after=None, stall_at=None, reset_at=None, extra_after_pass=(),
                 host="127.0.0.1", proxy_protocol=False, tokens=None, port=0):
        self.users = dict(users if users is not None else {"alice": "secret"})
        self.tokens = dict(tokens or {})      # AUTH OAUTHBEARER/XOAUTH2: {token: user}
        self.messages = list(messages if messages is not None else [
            b"From: a@example.com\r\nSubject: one\r\n\r\nhello\r\n",
            b"From: b@example.com\r\nSubject: two\r\n\r\n.leading dot\r\nworld\r\n",
        ])
        self.big_size = big_size
        self.greeting = greeting
        self.user_reply = user_reply
        self.pass_reply = pass_reply
        self.refuse = refuse
        self.refuse_user = refuse_user
        self.close_after = close_after
        self.stall_at = stall_at
        self.reset_at = reset_at
        self.extra_after_pass = list(extra_after_pass)
        super().__init__(None, host=host, port=port, proxy_protocol=proxy_protocol)

    def _sizes(self):
        sizes = [len(m) for m in self.messages]
        if self.big_size:
            sizes.append(self.big_size)
        return sizes

    def _stop_point(self, conn, point):
        """Apply close_after / stall_at / reset_at at `point`; True if the session must end."""
        if self.stall_at == point:
            conn.stall()
            return True
        if self.reset_at == point:
            conn.reset()
            return True
        return False

    def _after(self, conn, point):
        if self.close_after == point:
            conn.close()
            return True
        return False

    def handle(self, conn):
        if self._after(conn, "accept") or self._stop_point(conn, "greeting"):
            return
        if self.greeting is not None:
            for g in (self.greeting if isinstance(self.greeting, list) else [self.greeting]):
                conn.sendline(g)
        if self._after(conn, "greeting"):
            return
        user = None
        authed = False
        while True:
            line = conn.readline()
            if line is None:
                return
            text = line.rstrip(b"\r\n")
            verb, _, arg = text.partition(b" ")
            verb = verb.upper()
            if verb == b"USER" and not authed:
                if self._stop_point(conn, "user"):
                    return
                if self.refuse_user is not None:
                    conn.sendline(self.refuse_user)
                else:
                    user = arg.decode("utf-8", "surrogateescape")
                    conn.sendline(self.user_reply)
                if self._after(conn, "user"):
                    return
            elif verb == b"PASS" and not authed:
                if self._stop_point(conn, "pass"):
                    return
                password = arg.decode("utf-8", "surrogateescape")
                if user is not None and self.users.get(user) == password:
                    authed = True
                    conn.data["user"] = user
                    for r in (self.pass_reply if isinstance(self.pass_reply, list) else [self.pass_reply]):
                        conn.sendline(r)
                    for extra in self.extra_after_pass:
                        conn.sendline(extra)
                else:
                    conn.sendline(self.refuse)
                if self._after(conn, "pass"):
                    return
            elif verb == b"AUTH" and not authed:
                mech, _, response = arg.partition(b" ")
                if check_token(self.tokens, mech, response, conn):
                    authed = True
                    conn.sendline(self.pass_reply)
                else:
                    conn.sendline(b"+ " + TOKEN_ERROR)
                    conn.data["dummy"] = conn.readline()
                    conn.sendline(self.refuse)
            elif verb == b"QUIT":
                conn.sendline(b"+OK bye")
                conn.close()
                return
            elif verb == b"NOOP":
                conn.sendline(b"+OK")
            elif not authed:
                conn.sendline(b"-ERR not authenticated")
            elif verb == b"STAT":
                sizes = self._sizes()
                conn.sendline(b"+OK %d %d" % (len(sizes), sum(sizes)))
            elif verb == b"LIST":
                sizes = self._sizes()
                if arg:
                    n = int(arg)
                    conn.sendline(b"+OK %d %d" % (n, sizes[n - 1]))
                else:
                    conn.send(b"+OK %d messages\r\n" % len(sizes)
                              + b"".join(b"%d %d\r\n" % (i + 1, s) for i, s in enumerate(sizes))
                              + b".\r\n")
            elif verb == b"RETR":
                n = int(arg)
                sizes = self._sizes()
                if not 1 <= n <= len(sizes):
                    conn.sendline(b"-ERR no such message")
                elif n <= len(self.messages):
                    body = self.messages[n - 1]
                    stuffed = b"\r\n".join((b"." + ln if ln.startswith(b".") else ln)
                                           for ln in body.split(b"\r\n"))
                    conn.send(b"+OK %d octets\r\n" % len(body) + stuffed + b".\r\n")
                else:
                    conn.send(b"+OK %d octets\r\n" % self.big_size)
                    for chunk in big_message_chunks(self.big_size):
                        if not conn.send(chunk):
                            return
                    conn.send(b".\r\n")
            else:
                conn.sendline(b"-ERR unknown command")


# ---------------------------------------------------------------------------------------------


class ImapBackend(ScriptedBackend):
    """An IMAP server that logs users in with LOGIN (literals or atoms) and records everything.

    users:        {login: password} (bytes)
    greeting:     first line
    continuation: the reply to a literal announcement (e.g. b"+ OK"); a tagged refusal is
                  sent as `<tag><text>` when it does not start with "+"
    untagged:     an untagged line sent right before the tagged LOGIN OK
    login_ok / refuse: tagged texts for a good / bad password
    id_reply:     lines answering an ID command (`{tag}` replaced by its tag)
    big_size:     size of the body that `FETCH 1 (BODY[])` returns as one literal
    """

    def __init__(self, users=None, greeting=b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.",
                 continuation=b"+ OK", untagged=None, login_ok=IMAP_LOGGED_IN,
                 refuse=IMAP_REFUSED,
                 id_reply=(b'* ID ("name" "fake")', b"{tag}OK ID completed."), big_size=None,
                 host="127.0.0.1", tokens=None, capabilities=b"IMAP4rev1"):
        self.users = dict(users if users is not None else {b"alice": b"secret"})
        self.tokens = dict(tokens or {})      # AUTHENTICATE OAUTHBEARER/XOAUTH2: {token: user}
        self.capabilities = capabilities      # CAPABILITY's answer (SASL-IR, AUTH=...)
        self.greeting = greeting
        self.continuation = continuation
        self.untagged = untagged
        self.login_ok = login_ok
        self.refuse = refuse
        self.id_reply = id_reply
        self.big_size = big_size
        super().__init__(None, host=host)

    def _literal(self, conn, tag, announce):
        """`{n}` at the end of `announce`: continue, return the n bytes, or None."""
        m = re.search(rb"\{(\d+)\}$", announce)
        if not m:
            return None
        if self.continuation.startswith(b"+"):
            conn.sendline(self.continuation)
        else:
            conn.sendline(tag + self.continuation)
            return None
        return conn.read_exact(int(m.group(1)))

    def handle(self, conn):
        conn.sendline(self.greeting)
        authed = False
        while True:
            line = conn.readline()
            if line is None:
                return
            text = line.rstrip(b"\r\n")
            tag, _, rest = text.partition(b" ")
            tag += b" "
            verb, _, arg = rest.partition(b" ")
            verb = verb.upper()
            if verb == b"LOGIN" and not authed:
                user = self._literal(conn, tag, arg)
                if user is None:
                    return
                tail = conn.readline()
                password = self._literal(conn, tag, tail.rstrip(b"\r\n"))
                if password is None:
                    return
                conn.readline()
                conn.data["login"] = (user, password)
                if self.users.get(user) == password:
                    authed = True
                    if self.untagged:
                        conn.sendline(self.untagged)
                    conn.sendline(tag + self.login_ok)
                else:
                    conn.sendline(tag + self.refuse)
            elif verb == b"AUTHENTICATE" and not authed:
                mech, _, response = arg.partition(b" ")
                conn.data["commands"] = conn.data.get("commands", []) + [text]
                if not response:
                    conn.sendline(b"+ ")
                    response = conn.readline().rstrip(b"\r\n")
                if check_token(self.tokens, mech, response, conn):
                    authed = True
                    conn.sendline(tag + self.login_ok)
                else:
                    conn.sendline(b"+ " + TOKEN_ERROR)
                    conn.data["dummy"] = conn.readline()
                    conn.sendline(tag + self.refuse)
            elif verb == b"CAPABILITY":
                conn.sendline(b"* CAPABILITY " + self.capabilities)
                conn.sendline(tag + b"OK Capability completed.")
            elif verb == b"ID":
                for r in self.id_reply:
                    conn.sendline(r.replace(b"{tag}", tag))
            elif verb == b"LOGOUT":
                conn.send(b"* BYE Logging out\r\n" + tag + b"OK Logout completed.\r\n")
                conn.close()
                return
            elif not authed:
                conn.sendline(tag + b"NO not authenticated")
            elif verb == b"FETCH" and self.big_size:
                conn.send(b"* 1 FETCH (BODY[] {%d}\r\n" % self.big_size)
                for chunk in big_message_chunks(self.big_size):
                    if not conn.send(chunk):
                        return
                conn.send(b")\r\n" + tag + b"OK Fetch completed.\r\n")
            else:
                conn.sendline(tag + b"OK " + verb + b" completed.")


SIEVE_GREETING = (b'"IMPLEMENTATION" "Fake Pigeonhole"', b'"SIEVE" "fileinto vacation"',
                  b'"SASL" "PLAIN"', b'"STARTTLS"', b'"VERSION" "1.0"', b'OK "Fake ready."')


class SieveBackend(ScriptedBackend):
    """A ManageSieve server (RFC 5804) taking AUTHENTICATE "PLAIN" (or a token mechanism) with
    an initial response, then PUTSCRIPT (literals), LISTSCRIPTS, GETSCRIPT, LOGOUT; records
    conn.data["auth"] (the command line) and ["login"] (user, password).

    users:    {login: password} (bytes); tokens: {token: user} for OAUTHBEARER / XOAUTH2
    greeting: its lines (capabilities, then OK)
    refuse:   the line answering a bad login
    """

    def __init__(self, users=None, tokens=None, greeting=SIEVE_GREETING,
                 refuse=b'NO "Authentication failed."', host="127.0.0.1", proxy_protocol=False):
        self.users = dict(users if users is not None else {b"alice": b"secret"})
        self.tokens = dict(tokens or {})
        self.greeting = greeting
        self.refuse = refuse
        self.scripts = {}
        super().__init__(None, host=host, proxy_protocol=proxy_protocol)

    @staticmethod
    def _strings(conn, text):
        """The strings of a command line (quoted, or `{n+}` literals read on from conn)."""
        out = []
        while True:
            m = re.match(rb' *"((?:[^"\\]|\\.)*)"', text)
            if m:
                out.append(re.sub(rb"\\(.)", rb"\1", m.group(1)))
                text = text[m.end():]
                continue
            m = re.match(rb" *\{(\d+)\+?\}$", text)
            if m:
                out.append(conn.read_exact(int(m.group(1))))
                text = conn.readline().rstrip(b"\r\n")
                continue
            return out

    def handle(self, conn):
        for line in self.greeting:
            conn.sendline(line)
        authed = False
        while True:
            line = conn.readline()
            if line is None:
                return
            text = line.rstrip(b"\r\n")
            verb, _, rest = text.partition(b" ")
            verb = verb.upper()
            args = self._strings(conn, rest)
            if verb == b"AUTHENTICATE" and not authed:
                conn.data["auth"] = text
                mech = args[0].upper() if args else b""
                response = args[1] if len(args) > 1 else b""
                if mech == b"PLAIN":
                    try:
                        _, user, password = base64.b64decode(response).split(b"\0")
                    except ValueError:
                        user = password = None
                    conn.data["login"] = (user, password)
                    ok = user is not None and self.users.get(user) == password
                else:
                    ok = check_token(self.tokens, mech, response, conn)
                    if not ok:
                        conn.sendline(b'"' + TOKEN_ERROR + b'"')
                        conn.data["dummy"] = conn.readline()
                if ok:
                    authed = True
                    conn.sendline(b'OK "Logged in."')
                else:
                    conn.sendline(self.refuse)
            elif verb == b"LOGOUT":
                conn.send(b'OK "Logout completed."\r\n')
                conn.close()
                return
            elif not authed:
                conn.sendline(b'NO "Authenticate first"')
            elif verb == b"PUTSCRIPT" and len(args) == 2:
                self.scripts[args[0]] = args[1]
                conn.sendline(b'OK "PUTSCRIPT completed."')
            elif verb == b"LISTSCRIPTS":
                for name in self.scripts:
                    conn.sendline(b'"' + name + b'"')
                conn.sendline(b'OK "Listscripts completed."')
            elif verb == b"GETSCRIPT" and args and args[0] in self.scripts:
                body = self.scripts[args[0]]
                conn.send(b"{%d}\r\n" % len(body) + body + b'\r\nOK "Getscript completed."\r\n')
            else:
                conn.sendline(b'NO "Unknown command"')


class SmtpBackend(ScriptedBackend):
    """A recording SMTP server (Postfix-like: XCLIENT resets the session, which then expects
    EHLO again). `replies` overrides the reply to a verb (b'XCLIENT', b'AUTH', b'RCPT', ...,
    or 'greeting'): a line, a list of lines, or callable(conn, line) -> line(s).
    DATA bodies are hashed, not stored: conn.data['messages'] = [(size, sha256)]."""

    def __init__(self, replies=None, auth=None, tokens=None, users=None, **kw):
        self.replies = dict(replies or {})
        # auth: the mechanisms EHLO offers (e.g. "PLAIN LOGIN XOAUTH2"), checked by AUTH against
        # `users` ({user: password}) and `tokens` ({token: user}), bytes; None: AUTH as `replies`
        self.auth = auth
        self.tokens = dict(tokens or {})
        self.users = dict(users or {})
        super().__init__(None, **kw)

    def _auth(self, conn, text):
        """AUTH PLAIN / LOGIN / XOAUTH2 / OAUTHBEARER (the offered ones), recorded in
        conn.data['auth']."""
        words = text.split(b" ")
        mech = words[1].upper() if len(words) > 1 else b""
        if mech.decode() not in self.auth.upper().split():
            conn.sendline("504 5.5.4 Unrecognized authentication type")
            return
        if mech == b"PLAIN":
            _, user, password = base64.b64decode(words[2]).split(b"\0")
            conn.data["auth"] = (mech, user, password)
            ok = self.users.get(user) == password
        elif mech == b"LOGIN":
            conn.sendline("334 VXNlcm5hbWU6")
            user = base64.b64decode(conn.readline().strip())
            conn.sendline("334 UGFzc3dvcmQ6")
            password = base64.b64decode(conn.readline().strip())
            conn.data["auth"] = (mech, user, password)
            ok = self.users.get(user) == password
        else:
            ok = check_token(self.tokens, mech, words[2] if len(words) > 2 else b"", conn)
            if not ok:
                conn.sendline(b"334 " + TOKEN_ERROR)
                conn.data["dummy"] = conn.readline()
        conn.sendline("235 2.7.0 Authentication successful" if ok
                      else "535 5.7.8 Error: authentication failed")

    def _reply(self, conn, key, line, default):
        r = self.replies.get(key, default)
        if callable(r):
            r = r(conn, line)
        if r is None:
            return
        for ln in (r if isinstance(r, list) else [r]):
            conn.sendline(ln)

    def handle(self, conn):
        conn.data["messages"] = []
        self._reply(conn, "greeting", None, "220 backend.test ESMTP Postfix")
        while True:
            line = conn.readline()
            if line is None:
                return
            text = line.rstrip(b"\r\n")
            verb = text.split(b" ", 1)[0].upper()
            if verb == b"EHLO":
                offer = ["250-AUTH " + self.auth] if self.auth else []
                self._reply(conn, verb, text, ["250-backend.test", "250-PIPELINING",
                                               "250-XCLIENT ADDR LOGIN NAME"] + offer
                            + ["250 8BITMIME"])
            elif verb == b"HELO":
                self._reply(conn, verb, text, "250 backend.test")
            elif verb == b"XCLIENT":
                self._reply(conn, verb, text, "220 backend.test ESMTP Postfix")
            elif verb == b"AUTH" and self.auth is not None:
                self._auth(conn, text)
            elif verb == b"AUTH":
                self._reply(conn, verb, text, "235 2.7.0 Authentication successful")
            elif verb == b"MAIL":
                self._reply(conn, verb, text, "250 2.1.0 Ok")
            elif verb == b"RCPT":
                self._reply(conn, verb, text, "250 2.1.5 Ok")
            elif verb == b"DATA":
                conn.sendline("354 End data with <CR><LF>.<CR><LF>")
                size, digest = self._read_data(conn)
                conn.data["messages"].append((size, digest))
                conn.sendline("250 2.0.0 Ok: queued as ABC123")
            elif verb == b"QUIT":
                conn.sendline("221 2.0.0 Bye")
                conn.close()
                return
            elif verb in (b"RSET", b"NOOP"):
                conn.sendline("250 2.0.0 Ok")
            else:
                conn.sendline("502 5.5.2 Error: command not recognized")

    @staticmethod
    def _read_data(conn):
        """Read a DATA body up to CRLF.CRLF without splitting it into lines (it may be big):
        (size, sha256 hex) of the body (with the CRLF of its last line)."""
        h = hashlib.sha256()
        size = 0
        buf = b"\r\n" + bytes(conn._buf)     # the DATA line's CRLF precedes the body
        conn._buf.clear()
        hashed = 2                            # buf[:hashed] is not (or already) counted
        while True:
            i = buf.find(b"\r\n.\r\n")
            if i >= 0:
                end = max(i + 2, hashed)
                h.update(buf[hashed:end])
                size += end - hashed
                conn._buf += buf[i + 5:]
                return size, h.hexdigest()
            cut = max(hashed, len(buf) - 4)    # the last 4 bytes may start the terminator
            h.update(buf[hashed:cut])
            size += cut - hashed
            conn.sock.settimeout(10)
            data = conn.sock.recv(1 << 20)
            if not data:
                return size, h.hexdigest()
            buf = buf[cut:] + data
            hashed = 0
