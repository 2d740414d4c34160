"""OAUTHBEARER and XOAUTH2 against a real Dovecot whose oauth2 passdb asks a token
introspection service (RFC 7662, a small HTTP service of this module on loopback): through
mailproxy (auth_http says OK and passes the token on), imaplib and poplib log in with a valid
token and read a message; an expired token gets Dovecot's RFC 7628 JSON error as the error
challenge, then the failure reply; an auth service that refuses the token itself
(`Auth-Error-SASL`) gets its JSON to the client without Dovecot.  The proxy runs at debug level
and no token ever appears in its log.

Dovecot's auth penalty (anvil) delays every login from an address that failed one, growing to
15 s: the proxy sends the PROXY header to Dovecot's `haproxy = yes` listeners, so Dovecot sees
each client's own address, and each refused login here comes from an address of its own.
"""

import base64
import http.server
import itertools
import json
import poplib
import threading
import urllib.parse

import pytest

from tests.integration.conftest import IMAPFrom, POP3From
from tests.support.auth import AuthServer, auth_fail, auth_ok
from tests.support.common import fail_on_errors
from tests.support.process import free_port, server_block
from tests.support.realmail import store_message
from tests.support.realservers import CLIENT_IP, USERS, Dovecot, TempDir, need

pytestmark = pytest.mark.integration

VALID = "ya29.valid-Token_4mailproxy~1"
EXPIRED = "ya29.expired-Token_4mailproxy~2"
REVOKED = "ya29.revoked-Token_4mailproxy~3"       # the auth service itself refuses this one
AUTH_ERROR = {"status": "invalid_token", "scope": "mail",
              "openid-configuration": "https://auth.example.test/.well-known/openid"}
_addresses = itertools.count(10)


def fresh_address():
    """A client address no login came from yet (Dovecot's auth penalty is per address)."""
    return "127.0.0.%d" % next(_addresses)


class Introspection:
    """The token introspection endpoint Dovecot's oauth2 passdb POSTs `token=...` to: VALID is
    active for alice, any other token inactive (RFC 7662 section 2.2)."""

    def __init__(self, tokens):
        self.tokens = dict(tokens)
        self.asked = []             # the tokens it was asked about
        self.errors = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                try:
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    token = urllib.parse.parse_qs(body.decode()).get("token", [""])[0]
                    owner.asked.append(token)
                    user = owner.tokens.get(token)
                    answer = {"active": True, "username": user} if user else {"active": False}
                    data = json.dumps(answer).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except Exception as e:      # the test fails on it in teardown
                    owner.errors.append(e)
                    raise

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d/introspect" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def introspection():
    srv = Introspection({VALID: "alice"})
    yield srv
    srv.stop()
    assert not srv.errors, srv.errors


@pytest.fixture(scope="module")
def dovecot(introspection):
    need("dovecot")
    tmp = TempDir("mailproxy-dovecot-oauth-")
    d = Dovecot(tmp.path, USERS, oauth2=(
        "introspection_mode = post\n"
        f"introspection_url = {introspection.url}\n"
        "username_attribute = username\n"
        "active_attribute = active\n"
        "active_value = true\n"
        "force_introspection = yes\n"))
    yield d
    d.stop()
    tmp.cleanup()


@pytest.fixture
def dovecot_log(dovecot):
    dovecot.log.mark()
    return dovecot.log


@pytest.fixture
def auth(dovecot):
    """OK for every token login (the token itself goes on to Dovecot), to Dovecot's PROXY
    listeners; REVOKED refused with Auth-Error-SASL."""
    srv = AuthServer()
    ports = {"imap": dovecot.ports["imap_haproxy"], "pop3": dovecot.ports["pop3_haproxy"]}

    def respond(req):
        if req.header("Auth-Pass") == REVOKED:
            return auth_fail("Invalid token",
                             extra=["Auth-Error-SASL: " + json.dumps(AUTH_ERROR)])
        return auth_ok(ports[req.header("Auth-Protocol")])
    srv.set_respond(respond)
    yield srv
    srv.stop()
    fail_on_errors(srv, type(srv).__name__)


@pytest.fixture
def proxy(proxy_factory, auth):
    """The proxy at debug level, an IMAP and a POP3 server; `.ports[protocol]`; its log is
    checked for tokens after every test."""
    ports = {"imap": free_port(), "pop3": free_port()}
    while ports["pop3"] == ports["imap"]:
        ports["pop3"] = free_port()
    common = {"auth_http": auth.url, "proxy_protocol": "on", "timeout": "10s"}
    p = proxy_factory({"servers": {
        "imap": server_block("imap", ports["imap"], imap_auth="xoauth2 oauthbearer", **common),
        "pop3": server_block("pop3", ports["pop3"], pop3_auth="xoauth2 oauthbearer", **common),
    }}, log_level="debug")
    p.ports = ports
    yield p
    text = p.log_text()
    assert "[debug]" in text and "auth http request to" in text     # the traces were on
    for token in (VALID, EXPIRED, REVOKED):
        assert token not in text
        for mech in ("xoauth2", "oauthbearer"):
            assert response(mech, token).decode() not in text


def response(mech, token, user="alice"):
    """The client's SASL response (base64)."""
    return base64.b64encode(raw_response(mech, token, user))


def raw_response(mech, token, user="alice"):
    if mech == "xoauth2":
        return b"user=%s\x01auth=Bearer %s\x01\x01" % (user.encode(), token.encode())
    return b"n,a=%s,\x01auth=Bearer %s\x01\x01" % (user.encode(), token.encode())


def dummy(mech):
    return b"\x01" if mech == "oauthbearer" else b""        # XOAUTH2 clients: empty


@pytest.fixture
def clients():
    made = []

    def make(protocol, port, source=CLIENT_IP):
        c = (IMAPFrom if protocol == "imap" else POP3From)("127.0.0.1", port, source)
        made.append(c)
        return c
    yield make
    for c in made:
        try:
            c.sock.close()
        except Exception:
            pass


MECHS = ["xoauth2", "oauthbearer"]


# ---- a valid token reads mail -----------------------------------------------------------------

@pytest.mark.parametrize("mech", MECHS)
def test_imap_valid_token_reads_mail(proxy, dovecot, dovecot_log, introspection, clients, mech):
    token, body, uid, _seq = store_message(dovecot, "alice")
    m = clients("imap", proxy.ports["imap"])
    typ, _ = m.authenticate(mech.upper(), lambda _: raw_response(mech, VALID))
    assert typ == "OK"
    dovecot_log.wait(rf"imap-login: Info: Login: user=<alice>, method={mech.upper()}, "
                     rf"rip={CLIENT_IP}")
    assert m.select("INBOX")[0] == "OK"
    typ, data = m.uid("FETCH", str(uid), "(BODY.PEEK[])")
    assert typ == "OK" and data[0][1] == body
    assert m.logout()[0] == "BYE"
    assert VALID in introspection.asked


@pytest.mark.parametrize("mech", MECHS)
def test_pop3_valid_token_reads_mail(proxy, dovecot, dovecot_log, clients, mech):
    token, body, _uid, _seq = store_message(dovecot, "alice")
    p = clients("pop3", proxy.ports["pop3"])
    assert p._shortcmd("AUTH %s %s" % (mech.upper(), response(mech, VALID).decode())) \
        .startswith(b"+OK")
    dovecot_log.wait(rf"pop3-login: Info: Login: user=<alice>, method={mech.upper()}, "
                     rf"rip={CLIENT_IP}")
    count, _size = p.stat()
    _resp, lines, _octets = p.retr(count)           # the newest message
    assert b"\r\n".join(lines) + b"\r\n" == body
    assert p.quit().startswith(b"+OK")


# ---- an expired token: Dovecot's JSON error, then the failure --------------------------------

@pytest.mark.parametrize("mech", MECHS)
def test_imap_expired_token_gets_dovecots_error(proxy, dovecot_log, introspection, clients,
                                                 auth, mech):
    m = clients("imap", proxy.ports["imap"], fresh_address())
    challenges = []

    def answer(challenge):
        challenges.append(challenge)
        return raw_response(mech, EXPIRED) if len(challenges) == 1 else dummy(mech)
    with pytest.raises(m.error, match="AUTHENTICATIONFAILED"):
        m.authenticate(mech.upper(), answer)
    assert len(challenges) == 2
    error = json.loads(challenges[1])               # Dovecot's RFC 7628 error
    assert error["status"] in ("invalid_token", "401"), error
    assert EXPIRED in introspection.asked
    assert auth.requests[-1].header("Auth-Method") == mech
    dovecot_log.wait(r"oauth2 failed: Introspection failed")
    proxy.wait_log('client login failed: "NO [AUTHENTICATIONFAILED] Authentication failed."')


@pytest.mark.parametrize("mech", MECHS)
def test_pop3_expired_token_gets_dovecots_error(proxy, dovecot_log, clients, mech):
    p = clients("pop3", proxy.ports["pop3"], fresh_address())
    challenge = p._shortcmd("AUTH %s %s" % (mech.upper(), response(mech, EXPIRED).decode()))
    assert challenge.startswith(b"+ ")
    error = json.loads(base64.b64decode(challenge[2:], validate=True))
    assert error["status"] in ("invalid_token", "401"), error
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed"):
        p._shortcmd(base64.b64encode(dummy(mech)).decode())
    assert p.sock.recv(1) == b""                    # then the session ends
    dovecot_log.wait(r"oauth2 failed: Introspection failed")


# ---- the auth service refuses the token itself (Auth-Error-SASL) ------------------------------

def test_imap_auth_service_refusal(proxy, introspection, clients):
    m = clients("imap", proxy.ports["imap"], fresh_address())
    challenges = []

    def answer(challenge):
        challenges.append(challenge)
        return raw_response("oauthbearer", REVOKED) if len(challenges) == 1 else b"\x01"
    with pytest.raises(m.error, match="Invalid token"):
        m.authenticate("OAUTHBEARER", answer)
    assert json.loads(challenges[1]) == AUTH_ERROR
    assert REVOKED not in introspection.asked       # Dovecot never saw it


def test_pop3_auth_service_refusal(proxy, introspection, clients):
    p = clients("pop3", proxy.ports["pop3"], fresh_address())
    # without an initial response: the empty challenge first
    assert p._shortcmd("AUTH XOAUTH2").rstrip() == b"+"
    challenge = p._shortcmd(response("xoauth2", REVOKED).decode())
    assert json.loads(base64.b64decode(challenge[2:], validate=True)) == AUTH_ERROR
    with pytest.raises(poplib.error_proto, match="-ERR Invalid token"):
        p._shortcmd("")
    assert REVOKED not in introspection.asked
