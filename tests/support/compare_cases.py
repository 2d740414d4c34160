"""The client conversations of the nginx side-by-side tests (tests/integration/
test_nginx_compare.py), also held by `mailproxy convert`'s round trip (tests/test_convert.py):
each Case's steps, directives, auth answer and backend, CASES and BY_ID, with converse() that
runs one against a port and normalise() that takes the random parts (APOP / CRAM-MD5 salts
and what depends on them) out of its transcript."""

import base64
import hashlib
import hmac
import re
import socket
import time

from tests.support.auth import auth_fail, auth_ok
from tests.support.mailbackends import ImapBackend, Pop3Backend, SmtpBackend
from tests.support.process import free_port

SERVER_NAME = "mx.test"


class Case:
    def __init__(self, id, protocol, steps, directives=None, auth=None, backend=None,
                 known=None):
        self.id = id
        self.protocol = protocol
        self.steps = steps
        self.directives = dict(directives or {})
        self.auth = auth            # None: OK to the case's backend; else respond(req, backend)
        self.backend = backend      # factory -> ScriptedBackend (None: the protocol's default)
        self.known = known          # key into test_nginx_compare.py's KNOWN_DIFFERENCES

    def __repr__(self):
        return self.id


def W(data, wait):
    """A step that waits up to `wait` seconds for the first reply byte (Auth-Wait, timeouts)."""
    return (data, wait)


def b64(s):
    return base64.b64encode(s if isinstance(s, bytes) else s.encode()).decode()


def cram_answer(user, password, prefix):
    """A step computing the CRAM-MD5 answer from the server's challenge line."""
    def step(last):
        m = re.search(rb"^(?:\+|334) ([A-Za-z0-9+/=]+)\r\n", last, re.M)
        challenge = base64.b64decode(m.group(1))
        digest = hmac.new(password.encode(), challenge, "md5").hexdigest()
        return prefix + base64.b64encode(f"{user} {digest}".encode()) + b"\r\n"
    return step


def apop_step(user, password):
    def step(last):
        salt = re.search(rb"<[^>]*>", last).group()
        return b"APOP %s %s\r\n" % (user.encode(), hashlib.md5(salt + password.encode())
                                     .hexdigest().encode())
    return step


def ok_with_pass(password="secret"):
    def respond(req, backend):
        return auth_ok(backend.port, password=password)
    return respond


def refuse(text="Invalid login or password", wait=None, code=None):
    def respond(req, backend):
        extra = [f"Auth-Error-Code: {code}"] if code else []
        return auth_fail(text, wait=wait, extra=extra)
    return respond


def broken_auth(req, backend):
    return b"HTTP/1.0 500 Internal Server Error\r\n\r\n"


PLAIN_ALICE = b64("\0alice\0secret")

# ---------------------------------------------------------------------------------------------
# POP3

POP3 = [
    Case("pop3-user-pass-stat-quit", "pop3",
         [b"USER alice\r\n", b"PASS secret\r\n", b"STAT\r\n", b"QUIT\r\n"]),
    Case("pop3-capa-default", "pop3", [b"CAPA\r\n", b"QUIT\r\n"]),
    Case("pop3-capa-auth-all-methods", "pop3", [b"CAPA\r\n", b"AUTH\r\n", b"QUIT\r\n"],
         {"pop3_auth": "plain apop cram-md5 external"}),
    Case("pop3-noop-rset-before-login", "pop3", [b"NOOP\r\n", b"RSET\r\n", b"QUIT\r\n"]),
    Case("pop3-unknown-and-bad-commands", "pop3",
         [b"FOO\r\n", b"PASS secret\r\n", b"USER\r\n", b"USER a b\r\n", b"STAT\r\n",
          b"QUIT\r\n"], {"max_errors": 10}),
    Case("pop3-max-errors", "pop3", [b"FOO\r\n", b"BAR\r\n", b"BAZ\r\n", b"QUIT\r\n"],
         {"max_errors": 2}),
    Case("pop3-empty-line", "pop3", [b"\r\n", b"QUIT\r\n"]),
    Case("pop3-bare-lf", "pop3", [b"USER alice\n", b"PASS secret\n", b"QUIT\n"]),
    Case("pop3-lowercase-verbs", "pop3", [b"user alice\r\n", b"pass secret\r\n", b"quit\r\n"]),
    Case("pop3-apop", "pop3", [apop_step("alice", "secret"), b"STAT\r\n", b"QUIT\r\n"],
         {"pop3_auth": "plain apop"}, auth=ok_with_pass()),
    Case("pop3-apop-not-enabled", "pop3", [b"APOP alice 0123456789abcdef\r\n", b"QUIT\r\n"]),
    Case("pop3-auth-plain-initial", "pop3", [b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n",
                                             b"QUIT\r\n"]),
    Case("pop3-auth-plain-continued", "pop3", [b"AUTH PLAIN\r\n", PLAIN_ALICE.encode()
                                               + b"\r\n", b"QUIT\r\n"]),
    Case("pop3-auth-login", "pop3", [b"AUTH LOGIN\r\n", b64("alice").encode() + b"\r\n",
                                     b64("secret").encode() + b"\r\n", b"QUIT\r\n"]),
    Case("pop3-auth-login-initial-user", "pop3",
         [b"AUTH LOGIN " + b64("alice").encode() + b"\r\n", b64("secret").encode() + b"\r\n",
          b"QUIT\r\n"]),
    Case("pop3-auth-cram-md5", "pop3",
         [b"AUTH CRAM-MD5\r\n", cram_answer("alice", "secret", b""), b"QUIT\r\n"],
         {"pop3_auth": "plain cram-md5"}, auth=ok_with_pass()),
    Case("pop3-auth-cram-md5-not-enabled", "pop3", [b"AUTH CRAM-MD5\r\n", b"QUIT\r\n"]),
    Case("pop3-auth-unknown-mechanism", "pop3", [b"AUTH FOO\r\n", b"QUIT\r\n"]),
    Case("pop3-auth-bad-base64", "pop3", [b"AUTH PLAIN !!!!\r\n", b"QUIT\r\n"]),
    Case("pop3-auth-cancel", "pop3", [b"AUTH LOGIN\r\n", b"*\r\n", b"QUIT\r\n"]),
    Case("pop3-auth-external", "pop3", [b"AUTH EXTERNAL " + b64("alice").encode() + b"\r\n",
                                        b"QUIT\r\n"],
         {"pop3_auth": "plain external"}, auth=ok_with_pass()),
    Case("pop3-auth-fail-closes", "pop3", [b"USER alice\r\n", b"PASS wrong\r\n", b"QUIT\r\n"],
         auth=refuse()),
    Case("pop3-auth-fail-wait-continues", "pop3",
         [b"USER alice\r\n", W(b"PASS wrong\r\n", 3), b"USER alice\r\n", W(b"PASS x\r\n", 3),
          b"QUIT\r\n"], auth=refuse(wait=1)),
    Case("pop3-auth-error-text", "pop3", [b"USER alice\r\n", b"PASS wrong\r\n"],
         auth=refuse("Temporary server problem, try again later")),
    Case("pop3-auth-http-500", "pop3", [b"USER alice\r\n", b"PASS secret\r\n"],
         auth=broken_auth),
    Case("pop3-backend-refuses", "pop3", [b"USER alice\r\n", b"PASS secret\r\n"],
         backend=lambda: Pop3Backend(users={})),
    Case("pop3-backend-refuses-pass-error-message", "pop3",
         [b"USER alice\r\n", b"PASS secret\r\n"], {"proxy_pass_error_message": True},
         backend=lambda: Pop3Backend(users={})),
    Case("pop3-backend-bad-greeting", "pop3", [b"USER alice\r\n", b"PASS secret\r\n"],
         backend=lambda: Pop3Backend(greeting=b"-ERR go away")),
    Case("pop3-backend-down", "pop3", [b"USER alice\r\n", b"PASS secret\r\n"],
         auth=lambda req, backend: auth_ok(free_port())),
    Case("pop3-pipelined-login", "pop3", [b"USER alice\r\nPASS secret\r\nSTAT\r\n",
                                          b"QUIT\r\n"]),
    Case("pop3-auth-user-rewritten", "pop3", [b"USER alice@example.org\r\n",
                                              b"PASS secret\r\n", b"QUIT\r\n"],
         auth=lambda req, backend: auth_ok(backend.port, user="alice")),
    Case("pop3-stls-off", "pop3", [b"STLS\r\n", b"QUIT\r\n"]),
    Case("pop3-user-too-long-arg", "pop3", [b"USER " + b"a" * 300 + b"\r\n", b"QUIT\r\n"]),
    Case("pop3-proxy-protocol-to-backend", "pop3",
         [b"USER alice\r\n", b"PASS secret\r\n", b"QUIT\r\n"], {"proxy_protocol": True},
         backend=lambda: Pop3Backend(proxy_protocol=True)),
]

# ---------------------------------------------------------------------------------------------
# IMAP

IMAP = [
    Case("imap-capability-noop-logout", "imap",
         [b"a1 CAPABILITY\r\n", b"a2 NOOP\r\n", b"a3 LOGOUT\r\n"]),
    Case("imap-capability-all-methods", "imap", [b"a1 CAPABILITY\r\n", b"a2 LOGOUT\r\n"],
         {"imap_auth": "plain login cram-md5 external"}),
    Case("imap-login-select-logout", "imap",
         [b"a1 LOGIN alice secret\r\n", b"a2 SELECT INBOX\r\n", b"a3 LOGOUT\r\n"]),
    Case("imap-login-quoted", "imap", [b'a1 LOGIN "alice" "secret"\r\n', b"a2 LOGOUT\r\n"]),
    Case("imap-login-literal", "imap",
         [b"a1 LOGIN {5}\r\n", b"alice {6}\r\n", b"secret\r\n", b"a2 LOGOUT\r\n"]),
    Case("imap-login-nonsync-literal", "imap",
         [b"a1 LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n", b"a2 LOGOUT\r\n"]),
    Case("imap-authenticate-plain", "imap",
         [b"a1 AUTHENTICATE PLAIN\r\n", PLAIN_ALICE.encode() + b"\r\n", b"a2 LOGOUT\r\n"]),
    Case("imap-authenticate-plain-initial", "imap",
         [b"a1 AUTHENTICATE PLAIN " + PLAIN_ALICE.encode() + b"\r\n", b"a2 LOGOUT\r\n"]),
    Case("imap-authenticate-login", "imap",
         [b"a1 AUTHENTICATE LOGIN\r\n", b64("alice").encode() + b"\r\n",
          b64("secret").encode() + b"\r\n", b"a2 LOGOUT\r\n"], {"imap_auth": "login"}),
    Case("imap-authenticate-login-not-enabled", "imap",
         [b"a1 AUTHENTICATE LOGIN\r\n", b"a2 LOGOUT\r\n"]),
    Case("imap-authenticate-cram-md5", "imap",
         [b"a1 AUTHENTICATE CRAM-MD5\r\n", cram_answer("alice", "secret", b""),
          b"a2 LOGOUT\r\n"], {"imap_auth": "cram-md5"}, auth=ok_with_pass()),
    Case("imap-authenticate-external", "imap",
         [b"a1 AUTHENTICATE EXTERNAL " + b64("alice").encode() + b"\r\n", b"a2 LOGOUT\r\n"],
         {"imap_auth": "external"}, auth=ok_with_pass()),
    Case("imap-authenticate-cancel", "imap",
         [b"a1 AUTHENTICATE PLAIN\r\n", b"*\r\n", b"a2 LOGOUT\r\n"]),
    Case("imap-authenticate-unknown", "imap", [b"a1 AUTHENTICATE FOO\r\n", b"a2 LOGOUT\r\n"]),
    Case("imap-unknown-command", "imap", [b"a1 FOO\r\n", b"a2 SELECT INBOX\r\n",
                                          b"a3 LOGOUT\r\n"]),
    Case("imap-no-tag", "imap", [b"LOGOUT\r\n", b"a2 LOGOUT\r\n"]),
    Case("imap-empty-line", "imap", [b"\r\n", b"a2 LOGOUT\r\n"]),
    Case("imap-login-missing-args", "imap", [b"a1 LOGIN alice\r\n", b"a2 LOGIN\r\n",
                                             b"a3 LOGOUT\r\n"]),
    Case("imap-max-errors", "imap", [b"a1 FOO\r\n", b"a2 BAR\r\n", b"a3 BAZ\r\n",
                                     b"a4 LOGOUT\r\n"], {"max_errors": 2}),
    Case("imap-id-before-login", "imap", [b'a1 ID ("name" "test")\r\n', b"a2 LOGOUT\r\n"],
         known="imap-id"),
    Case("imap-starttls-off", "imap", [b"a1 STARTTLS\r\n", b"a2 LOGOUT\r\n"]),
    Case("imap-auth-fail-closes", "imap", [b"a1 LOGIN alice wrong\r\n", b"a2 LOGOUT\r\n"],
         auth=refuse()),
    Case("imap-auth-fail-wait-continues", "imap",
         [W(b"a1 LOGIN alice wrong\r\n", 3), W(b"a2 LOGIN alice wrong\r\n", 3),
          b"a3 LOGOUT\r\n"], auth=refuse(wait=1)),
    Case("imap-auth-http-500", "imap", [b"a1 LOGIN alice secret\r\n"], auth=broken_auth),
    Case("imap-backend-refuses", "imap", [b"a1 LOGIN alice secret\r\n"],
         backend=lambda: ImapBackend(users={})),
    Case("imap-backend-refuses-pass-error-message", "imap", [b"a1 LOGIN alice secret\r\n"],
         {"proxy_pass_error_message": True}, backend=lambda: ImapBackend(users={})),
    Case("imap-backend-down", "imap", [b"a1 LOGIN alice secret\r\n"],
         auth=lambda req, backend: auth_ok(free_port())),
    Case("imap-pipelined", "imap", [b"a1 CAPABILITY\r\na2 LOGIN alice secret\r\na3 NOOP\r\n",
                                    b"a4 LOGOUT\r\n"]),
    Case("imap-login-escaped-quotes", "imap",
         [b'a1 LOGIN "al\\"ice" "se\\\\cret"\r\n', b"a2 LOGOUT\r\n"],
         backend=lambda: ImapBackend(users={b'al"ice': b"se\\cret"})),
    # parser corrections (imap.py docstring): each is a documented difference
    Case("imap-unterminated-quote", "imap", [b'a1 LOGIN "alice\r\n', b"a2 LOGOUT\r\n"]),
    Case("imap-empty-tag", "imap", [b" LOGIN alice secret\r\n", b"a2 LOGOUT\r\n"],
         known="imap-empty-tag"),
    Case("imap-zero-literal", "imap", [b"a1 LOGIN {0}\r\n", b" secret\r\n",
                                       b"a2 LOGOUT\r\n"], known="imap-zero-literal"),
    Case("imap-literal-too-big", "imap", [b"a1 LOGIN {100000}\r\n", b"a2 LOGOUT\r\n"],
         known="imap-literal-too-big"),
    Case("imap-command-too-long", "imap", [b"a1 LOGIN " + b"x" * 5000 + b" y\r\n",
                                           b"a2 LOGOUT\r\n"]),
    Case("imap-pipelined-beyond-buffer", "imap",
         [b"".join(b"n%d NOOP\r\n" % i for i in range(60)), b"a2 LOGOUT\r\n"],
         {"imap_client_buffer": "256"}, known="imap-pipelined-beyond-buffer"),
    Case("imap-proxy-protocol-to-backend", "imap",
         [b"a1 LOGIN alice secret\r\n", b"a2 LOGOUT\r\n"], {"proxy_protocol": True},
         backend=lambda: ImapBackend_pp()),
]

# ---------------------------------------------------------------------------------------------
# SMTP

SMTP_MSG = [b"MAIL FROM:<alice@example.org>\r\n", b"RCPT TO:<bob@example.org>\r\n",
            b"DATA\r\n", b"Subject: hi\r\n\r\nhello\r\n.\r\n", b"QUIT\r\n"]

SMTP = [
    Case("smtp-ehlo-auth-plain-send", "smtp",
         [b"EHLO client.example\r\n", b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n"]
         + SMTP_MSG),
    Case("smtp-helo-auth-login", "smtp",
         [b"HELO client.example\r\n", b"AUTH LOGIN\r\n", b64("alice").encode() + b"\r\n",
          b64("secret").encode() + b"\r\n", b"QUIT\r\n"]),
    Case("smtp-ehlo-capabilities", "smtp", [b"EHLO client.example\r\n", b"QUIT\r\n"],
         {"smtp_capabilities": '"SIZE 10485760" 8BITMIME PIPELINING',
          "smtp_auth": "plain login cram-md5 external"}),
    Case("smtp-auth-cram-md5", "smtp",
         [b"EHLO client.example\r\n", b"AUTH CRAM-MD5\r\n", cram_answer("alice", "secret", b""),
          b"QUIT\r\n"], {"smtp_auth": "cram-md5"}, auth=ok_with_pass()),
    Case("smtp-auth-external", "smtp",
         [b"EHLO client.example\r\n", b"AUTH EXTERNAL " + b64("alice").encode() + b"\r\n",
          b"QUIT\r\n"], {"smtp_auth": "external"}, auth=ok_with_pass()),
    Case("smtp-mail-before-auth", "smtp",
         [b"EHLO client.example\r\n", b"MAIL FROM:<a@example.org>\r\n", b"QUIT\r\n"]),
    Case("smtp-auth-before-helo", "smtp",
         [b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n", b"QUIT\r\n"]),
    Case("smtp-helo-no-arg", "smtp", [b"HELO\r\n", b"EHLO\r\n", b"QUIT\r\n"]),
    Case("smtp-unknown-command", "smtp", [b"FOO\r\n", b"VRFY bob\r\n", b"EXPN list\r\n",
                                          b"HELP\r\n", b"NOOP\r\n", b"RSET\r\n", b"QUIT\r\n"]),
    Case("smtp-max-errors", "smtp", [b"FOO\r\n", b"BAR\r\n", b"BAZ\r\n", b"QUIT\r\n"],
         {"max_errors": 2}),
    Case("smtp-auth-unknown-mechanism", "smtp",
         [b"EHLO c\r\n", b"AUTH FOO\r\n", b"AUTH\r\n", b"QUIT\r\n"]),
    Case("smtp-auth-fail-error-code-wait", "smtp",
         [b"EHLO client.example\r\n", W(b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n", 3),
          b"QUIT\r\n"], auth=refuse("Bad credentials", wait=1, code="535 5.7.8")),
    Case("smtp-auth-fail-closes", "smtp",
         [b"EHLO client.example\r\n", b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n",
          b"QUIT\r\n"], auth=refuse("Bad credentials")),
    Case("smtp-auth-http-500", "smtp",
         [b"EHLO client.example\r\n", b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n"],
         auth=broken_auth),
    Case("smtp-none-mx-flow", "smtp",
         [b"EHLO mx.sender.example\r\n", b"MAIL FROM:<a@example.com> SIZE=20\r\n",
          b"RCPT TO:<alice@example.org>\r\n", b"DATA\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n",
          b"QUIT\r\n"], {"smtp_auth": "none"}),
    Case("smtp-none-rcpt-before-mail", "smtp",
         [b"EHLO mx.sender.example\r\n", b"RCPT TO:<alice@example.org>\r\n", b"QUIT\r\n"],
         {"smtp_auth": "none"}),
    Case("smtp-none-refused-by-auth", "smtp",
         [b"EHLO mx.sender.example\r\n", b"MAIL FROM:<a@example.com>\r\n",
          b"RCPT TO:<nobody@example.org>\r\n", b"QUIT\r\n"], {"smtp_auth": "none"},
         auth=refuse("No such user", code="550 5.1.1")),
    Case("smtp-xclient-off", "smtp",
         [b"EHLO client.example\r\n", b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n"]
         + SMTP_MSG, {"xclient": False}),
    Case("smtp-helo-xclient-off", "smtp",
         [b"HELO client.example\r\n", b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n",
          b"QUIT\r\n"], {"xclient": False}),
    Case("smtp-proxy-smtp-auth", "smtp",
         [b"EHLO client.example\r\n", b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n",
          b"QUIT\r\n"], {"proxy_smtp_auth": True}),
    Case("smtp-backend-refuses-xclient", "smtp",
         [b"EHLO client.example\r\n", b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n"],
         backend=lambda: SmtpBackend(replies={b"XCLIENT": "550 5.7.0 not authorized"})),
    Case("smtp-backend-refuses-pass-error-message", "smtp",
         [b"EHLO client.example\r\n", b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n"],
         {"proxy_pass_error_message": True},
         backend=lambda: SmtpBackend(replies={b"XCLIENT": "550 5.7.0 not authorized"})),
    Case("smtp-backend-bad-greeting", "smtp",
         [b"EHLO client.example\r\n", b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n"],
         backend=lambda: SmtpBackend(replies={"greeting": "554 5.3.2 busy"})),
    Case("smtp-pipelined-ehlo-auth", "smtp",
         [b"EHLO client.example\r\nAUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n",
          b"QUIT\r\n"]),
    Case("smtp-starttls-off", "smtp", [b"EHLO c\r\n", b"STARTTLS\r\n", b"QUIT\r\n"]),
    Case("smtp-auth-login-with-special-user", "smtp",
         [b"EHLO client.example\r\n",
          b"AUTH PLAIN " + b64("\0al+ice=x y\0secret").encode() + b"\r\n", b"QUIT\r\n"],
         known="xclient-login-xtext"),
    Case("smtp-mail-before-auth-pipelined", "smtp",
         [b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nNOOP\r\nRSET\r\n", b"QUIT\r\n"],
         known="smtp-rejected-mail-pipelined"),
    Case("smtp-pipelined-beyond-buffer", "smtp",
         [b"EHLO c\r\n" + b"NOOP\r\n" * 100, b"QUIT\r\n"],
         {"smtp_client_buffer": "256"}, known="smtp-pipelined-beyond-buffer"),
    Case("smtp-command-too-long", "smtp", [b"EHLO " + b"x" * 5000 + b"\r\n", b"QUIT\r\n"]),
    Case("smtp-greeting-delay", "smtp",
         [(b"EHLO early\r\n", 3), b"QUIT\r\n"], {"smtp_greeting_delay": "1s"}),
    Case("smtp-none-helo", "smtp",
         [b"HELO mx.sender.example\r\n", b"MAIL FROM:<a@example.com>\r\n",
          b"RCPT TO:<alice@example.org>\r\n", b"QUIT\r\n"], {"smtp_auth": "none"}),
    Case("smtp-none-mail-twice", "smtp",
         [b"EHLO m\r\n", b"MAIL FROM:<a@example.com>\r\n", b"MAIL FROM:<b@example.com>\r\n",
          b"MAIL\r\n", b"QUIT\r\n"], {"smtp_auth": "none"}),
    Case("smtp-proxy-protocol-to-backend", "smtp",
         [b"EHLO c\r\n", b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n", b"QUIT\r\n"],
         {"proxy_protocol": True}, backend=lambda: SmtpBackend(proxy_protocol=True)),
    Case("smtp-auth-plain-empty-initial", "smtp",
         [b"EHLO c\r\n", b"AUTH PLAIN =\r\n", b"QUIT\r\n"]),
    Case("smtp-xclient-with-helo-and-proxy-smtp-auth-off-xclient", "smtp",
         [b"HELO c.example\r\n", b"AUTH LOGIN " + b64("alice").encode() + b"\r\n",
          b64("secret").encode() + b"\r\n", b"QUIT\r\n"], {"proxy_smtp_auth": True}),
]

# STARTTLS before the handshake (the plain-text part of the conversation); {cert}/{key} are a
# self-signed pair made by test_nginx_compare.py's World
TLS = {"ssl_certificate": "{cert}", "ssl_certificate_key": "{key}"}
STARTTLS = [
    Case("imap-starttls-only-capability-login", "imap",
         [b"a1 CAPABILITY\r\n", b"a2 LOGIN alice secret\r\n",
          b"a3 AUTHENTICATE PLAIN " + PLAIN_ALICE.encode() + b"\r\n", b"a4 LOGOUT\r\n"],
         dict(TLS, starttls="only")),
    Case("imap-starttls-on-capability", "imap", [b"a1 CAPABILITY\r\n", b"a2 LOGOUT\r\n"],
         dict(TLS, starttls="on", imap_auth="plain cram-md5")),
    Case("imap-starttls-reply", "imap", [b"a1 STARTTLS\r\n"], dict(TLS, starttls="on")),
    Case("imap-starttls-pipelined-injection", "imap",
         [b"a1 STARTTLS\r\na2 LOGIN alice secret\r\n"], dict(TLS, starttls="on")),
    Case("pop3-starttls-only", "pop3",
         [b"CAPA\r\n", b"USER alice\r\n", b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n",
          b"APOP alice 0123\r\n", b"QUIT\r\n"], dict(TLS, starttls="only")),
    Case("pop3-stls-reply", "pop3", [b"STLS\r\n"], dict(TLS, starttls="on")),
    Case("smtp-starttls-only", "smtp",
         [b"EHLO c.example\r\n", b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n",
          b"MAIL FROM:<a@example.org>\r\n", b"QUIT\r\n"], dict(TLS, starttls="only")),
    Case("smtp-starttls-on-ehlo", "smtp", [b"EHLO c.example\r\n", b"HELO c.example\r\n",
                                           b"QUIT\r\n"], dict(TLS, starttls="on")),
    Case("smtp-starttls-reply", "smtp", [b"EHLO c\r\n", b"STARTTLS\r\n"],
         dict(TLS, starttls="on")),
    Case("smtp-starttls-pipelined-injection", "smtp",
         [b"EHLO c\r\n", b"STARTTLS\r\nAUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n"],
         dict(TLS, starttls="on")),
]


def ImapBackend_pp():
    b = ImapBackend()
    b.proxy_protocol = True
    return b


CASES = POP3 + IMAP + SMTP + STARTTLS
BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES)


# ---------------------------------------------------------------------------------------------
# running a conversation

def converse(port, steps, first_wait=2.0, quiet=0.15, final=0.4):
    """Run `steps` against 127.0.0.1:port; the transcript as a list of 'C: ...' / 'S: ...'
    lines (repr of the bytes), with 'closed' when the server closed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    out = []
    closed = False
    last = b""

    def receive(wait):
        nonlocal closed
        data = bytearray()
        deadline = time.monotonic() + wait
        while not closed:
            remaining = (deadline - time.monotonic()) if not data else quiet
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                closed = True
                break
            data += chunk
            if not data:
                continue
        return bytes(data)

    try:
        last = receive(first_wait)
        out.append("S: %r" % last)
        for step in steps:
            wait = first_wait
            if isinstance(step, tuple):
                step, wait = step
            if callable(step):
                step = step(last)
            if closed:
                break
            try:
                sock.sendall(step)
            except OSError:
                closed = True
                break
            out.append("C: %r" % step)
            last = receive(wait)
            if last:
                out.append("S: %r" % last)
        if not closed:
            rest = receive(final)
            if rest:
                out.append("S: %r" % rest)
    finally:
        sock.close()
    if closed:
        out.append("closed")
    return out


_SALT_RE = re.compile(rb"<[0-9]+\.[0-9]+@" + SERVER_NAME.encode() + rb">")


def normalise(text):
    """Random parts out: APOP salts and CRAM-MD5 challenges (and the answers/digests derived).
    `text` holds repr()s of bytes, so CR LF appear as the four characters \\r\\n."""
    def challenge(m):
        try:
            decoded = base64.b64decode(m.group(2))
        except Exception:
            return m.group(0)
        if _SALT_RE.fullmatch(decoded):
            return m.group(1) + b"<CHALLENGE>"
        return m.group(0)
    data = text if isinstance(text, bytes) else text.encode("latin-1")
    data = _SALT_RE.sub(b"<SALT>", data)
    # PROXY v1 towards the backend: the client's and the proxy's listen ports differ per run
    data = re.sub(rb"(PROXY TCP[46] \S+ \S+) \d+ \d+", rb"\1 <PORT> <PORT>", data)
    data = re.sub(rb"(\+ |334 )([A-Za-z0-9+/]{20,}={0,2})(?=\\r)", challenge, data)
    data = re.sub(rb"APOP alice [0-9a-f]{32}", b"APOP alice <DIGEST>", data)
    # the CRAM-MD5 answer (base64 of "alice <hex digest>") differs with the challenge
    data = re.sub(rb"(?<=C: b')(YWxpY2Ug[A-Za-z0-9+/=]{40,})", b"<CRAM-ANSWER>", data)
    data = re.sub(rb"Auth-Pass: [0-9a-f]{32}\\r\\n", rb"Auth-Pass: <DIGEST>\\r\\n", data)
    data = re.sub(rb"Auth-Salt: .*?\\r\\n", rb"Auth-Salt: <SALT>\\r\\n", data)
    return data.decode("latin-1")
