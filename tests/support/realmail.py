"""Helpers shared by the integration tests against real mail software: the auth_http answers
for Dovecot's users, unique messages, and storing one in Dovecot over IMAP."""

import hashlib
import hmac
import imaplib
import urllib.parse
import uuid

from tests.support.auth import auth_fail, auth_ok
from tests.support.realservers import USERS


def _header_value(text):
    """A str for the test AuthServer (which writes latin-1): the UTF-8 bytes of `text`."""
    return text.encode("utf-8").decode("latin-1")


def _unescape(value):
    """An Auth-User / Auth-Pass header (the harness decodes latin-1) -> str: %XX undone, UTF-8."""
    return urllib.parse.unquote_to_bytes(value.encode("latin-1")).decode("utf-8", "replace")


def dovecot_responder(ports):
    """An auth_http service for Dovecot's users: checks the credentials as nginx's protocol
    hands them over (plain/login: the password; apop/cram-md5: the digest of the salt;
    external: the user alone) and routes to ports[protocol] with the clear-text password."""
    def respond(req):
        method = req.header("Auth-Method")
        proto = req.header("Auth-Protocol")
        user = _unescape(req.header("Auth-User", ""))
        given = _unescape(req.header("Auth-Pass", ""))
        salt = req.header("Auth-Salt", "")
        if method == "none":            # SMTP without authentication (smtp_auth none)
            return auth_ok(ports[proto])
        real = USERS.get(user)
        if real is None:
            return auth_fail("Invalid login or password", wait=0)
        if method in ("plain", "login"):
            ok = given == real
        elif method == "apop":
            ok = given == hashlib.md5(salt.encode("latin-1") + real.encode()).hexdigest()
        elif method == "cram-md5":
            ok = given == hmac.new(real.encode(), salt.encode("latin-1"), "md5").hexdigest()
        elif method == "external":
            ok = True
        else:
            ok = False
        if not ok:
            return auth_fail("Invalid login or password", wait=0)
        return auth_ok(ports[proto], user=_header_value(user), password=_header_value(real))
    return respond


def unique_message(tag=""):
    token = uuid.uuid4().hex
    body = (f"From: sender@example.com\r\nTo: alice@example.org\r\n"
            f"Subject: integration {tag} {token}\r\nMessage-ID: <{token}@test>\r\n\r\n"
            f"line one\r\n.leading dot\r\n\r\nnon-ascii: \u00e9\u00e8\r\n").encode("utf-8")
    return token, body


def smtp_message(token):
    return (f"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: {token}\r\n"
            f"Message-ID: <{token}@test>\r\nDate: Mon, 24 Nov 2025 10:00:00 +0000\r\n\r\n"
            f"body of {token}\r\n.dot line\r\n").encode()


def store_message(dovecot, user="alice"):
    token, body = unique_message("curl")
    m = imaplib.IMAP4("127.0.0.1", dovecot.ports["imap"], timeout=10)
    m.login(user, USERS[user])
    m.append("INBOX", None, None, body)
    m.select("INBOX")
    typ, data = m.uid("SEARCH", None, "HEADER", "Message-ID", f"<{token}@test>")
    uid = int(data[0].split()[-1])
    typ, data = m.search(None, "HEADER", "Message-ID", f"<{token}@test>")
    seq = int(data[0].split()[-1])
    m.logout()
    return token, body, uid, seq
