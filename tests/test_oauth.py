"""OAUTHBEARER and XOAUTH2 end to end: imaplib, poplib (raw AUTH) and smtplib through the proxy
to the fake auth service and fake backends; the auth request's headers, the RFC 7628 error
challenge, the token (or the auth service's master password) to the backend, proxy_smtp_auth's
mechanism choice, and no token in the debug log."""

import base64
import imaplib
import json
import poplib
import smtplib

import pytest

from tests.support.auth import auth_fail, auth_ok
from tests.support.mailbackends import ImapBackend, Pop3Backend, SmtpBackend
from tests.support.process import SharedProxy

TOKEN = "ya29.a0AfH6SMC-secret_Token~42"
USER = "alice@example.com"
ERROR = {"status": "invalid_token", "scope": "https://mail.example.com/"}
ERROR_JSON = json.dumps(ERROR, separators=(",", ":"))

_CONFIGS = [
    {"protocol": "imap", "imap_auth": "plain xoauth2 oauthbearer"},
    {"protocol": "pop3", "pop3_auth": "plain xoauth2 oauthbearer"},
    {"protocol": "smtp", "smtp_auth": "plain login xoauth2 oauthbearer",
     "proxy_smtp_auth": "on", "xclient": "off"},
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    # at debug level: no test of this module may leave a token in the log
    proxy = SharedProxy(tmp_path_factory.mktemp("oauth"), _CONFIGS,
                        defaults={"timeout": "3s"}, log_level="debug")
    yield proxy
    proxy.stop()


@pytest.fixture
def setup(shared, backend_factory):
    def start(config, cls, **backend_kw):
        backend = backend_factory(cls, **backend_kw)
        return shared.setup(backend, **_CONFIGS[config])
    return start


def xoauth2_raw(user=USER, token=TOKEN):
    return "user=%s\x01auth=Bearer %s\x01\x01" % (user, token)


def xoauth2(user=USER, token=TOKEN):
    return base64.b64encode(xoauth2_raw(user, token).encode())


def bearer(user=USER, token=TOKEN):
    return base64.b64encode(("n,a=%s,\x01host=imap.example.com\x01port=143\x01"
                             "auth=Bearer %s\x01\x01" % (user, token)).encode())


def refuse_with_error(raw=True):
    value = ERROR_JSON if raw else base64.b64encode(ERROR_JSON.encode()).decode()
    return lambda req: auth_fail("Invalid token", extra=["Auth-Error-SASL: " + value,
                                                         "Auth-Error-Code: 535 5.7.8"])


def check_auth_request(s, method):
    req = s.auth.wait_requests(1)[0]
    assert req.header("Auth-Method") == method
    assert req.header("Auth-User") == USER
    assert req.header("Auth-Pass") == TOKEN


# ---- IMAP -----------------------------------------------------------------------------------

def test_imap_xoauth2_to_backend_with_sasl_ir(setup):
    s = setup(0, ImapBackend, tokens={TOKEN.encode(): USER.encode()},
              greeting=b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready")
    m = s.imap()
    assert "AUTH=XOAUTH2" in m.capabilities and "AUTH=OAUTHBEARER" in m.capabilities
    typ, _ = m.authenticate("XOAUTH2", lambda challenge: xoauth2_raw())
    assert typ == "OK"
    assert m.noop()[0] == "OK"
    check_auth_request(s, "xoauth2")
    conn = s.backend.wait_session()
    assert conn.data["auth"] == (b"XOAUTH2", USER.encode(), TOKEN.encode())
    assert conn.data["commands"][0].split(b" ")[1:3] == [b"AUTHENTICATE", b"XOAUTH2"]
    assert len(conn.data["commands"][0].split(b" ")) == 4          # the initial response


def test_imap_oauthbearer_backend_without_sasl_ir(setup):
    s = setup(0, ImapBackend, tokens={TOKEN.encode(): USER.encode()})
    m = s.imap()
    assert m.authenticate("OAUTHBEARER", lambda c: base64.b64decode(bearer()))[0] == "OK"
    check_auth_request(s, "oauthbearer")
    conn = s.backend.wait_session()
    assert conn.data["auth"] == (b"OAUTHBEARER", USER.encode(), TOKEN.encode())
    assert conn.data["commands"][0].split(b" ")[1:] == [b"AUTHENTICATE", b"OAUTHBEARER"]


@pytest.mark.parametrize("raw", [True, False])
def test_imap_error_challenge(setup, raw):
    s = setup(0, ImapBackend)
    s.auth.set_respond(refuse_with_error(raw))
    m = s.imap()
    challenges = []

    def answer(challenge):
        challenges.append(challenge)
        return xoauth2_raw() if len(challenges) == 1 else b"\x01"
    with pytest.raises(imaplib.IMAP4.error, match="Invalid token"):
        m.authenticate("XOAUTH2", answer)
    assert json.loads(challenges[1]) == ERROR
    s.proxy.wait_log('client login failed: "Invalid token"')
    assert not s.backend.sessions


def test_imap_backend_refuses_token(setup):
    s = setup(0, ImapBackend, tokens={})
    m = s.imap()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        m.authenticate("XOAUTH2", lambda c: xoauth2_raw())
    conn = s.backend.wait_session()
    assert conn.data["dummy"] == b"\r\n"            # XOAUTH2's empty dummy response
    s.proxy.wait_log('client login failed: "NO [AUTHENTICATIONFAILED]')


def test_imap_master_user_password(setup):
    s = setup(0, ImapBackend, users={b"alice@example.com*master": b"masterpw"})
    s.auth.set_respond(lambda req: auth_ok(s.backend.port, user=USER + "*master",
                                           password="masterpw",
                                           extra=["Auth-Method: plain"]))
    m = s.imap()
    assert m.authenticate("XOAUTH2", lambda c: xoauth2_raw())[0] == "OK"
    conn = s.backend.wait_session()
    assert conn.data["login"] == (b"alice@example.com*master", b"masterpw")


# ---- POP3 -------------------------------------------------------------------------------------

def test_pop3_token_with_and_without_initial_response(setup):
    s = setup(1, Pop3Backend, tokens={TOKEN.encode(): USER.encode()})
    p = s.pop3()
    assert "OAUTHBEARER" in p.capa()["SASL"] and "XOAUTH2" in p.capa()["SASL"]
    assert p._shortcmd("AUTH OAUTHBEARER " + bearer().decode()).startswith(b"+OK")
    assert p.stat()[0] == 2
    check_auth_request(s, "oauthbearer")
    assert s.backend.wait_session().data["auth"] == (b"OAUTHBEARER", USER.encode(),
                                                     TOKEN.encode())
    s.auth.requests.clear()
    p = s.pop3()
    assert p._shortcmd("AUTH XOAUTH2") == b"+ "
    assert p._shortcmd(xoauth2().decode()).startswith(b"+OK")
    check_auth_request(s, "xoauth2")


def test_pop3_error_challenge(setup):
    s = setup(1, Pop3Backend)
    s.auth.set_respond(refuse_with_error())
    p = s.pop3()
    challenge = p._shortcmd("AUTH OAUTHBEARER " + bearer().decode())
    assert challenge == b"+ " + base64.b64encode(ERROR_JSON.encode())
    with pytest.raises(poplib.error_proto, match="Invalid token"):
        p._shortcmd("AQ==")


def test_pop3_malformed_token(setup):
    s = setup(1, Pop3Backend)
    p = s.pop3()
    with pytest.raises(poplib.error_proto, match="invalid command"):
        p._shortcmd("AUTH OAUTHBEARER " + xoauth2().decode())
    s.proxy.wait_log("client sent invalid GS2 header in AUTH OAUTHBEARER command")
    assert not s.auth.requests


# ---- SMTP -------------------------------------------------------------------------------------

def test_smtp_xoauth2_to_backend(setup):
    s = setup(2, SmtpBackend, auth="PLAIN LOGIN XOAUTH2",
              tokens={TOKEN.encode(): USER.encode()})
    c = s.smtp()
    c.ehlo()
    assert "XOAUTH2" in c.esmtp_features["auth"] and "OAUTHBEARER" in c.esmtp_features["auth"]
    code, _ = c.auth("XOAUTH2", lambda challenge=None: xoauth2_raw())
    assert code == 235
    check_auth_request(s, "xoauth2")
    assert s.backend.wait_session().data["auth"] == (b"XOAUTH2", USER.encode(),
                                                     TOKEN.encode())


def test_smtp_error_challenge(setup):
    s = setup(2, SmtpBackend, auth="PLAIN")
    s.auth.set_respond(refuse_with_error())
    c = s.smtp()
    c.ehlo()
    challenges = []

    def answer(challenge=None):
        challenges.append(challenge)
        return xoauth2_raw() if challenge is None else ""
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        c.auth("XOAUTH2", answer)
    assert e.value.smtp_code == 535 and e.value.smtp_error == b"5.7.8 Invalid token"
    assert json.loads(challenges[1]) == ERROR


def test_smtp_backend_login_only_with_master_user(setup):
    # Exchange offers LOGIN only; the auth service answers with a master password
    s = setup(2, SmtpBackend, auth="LOGIN", users={b"alice@example.com*master": b"masterpw"})
    s.auth.set_respond(lambda req: auth_ok(s.backend.port, user=USER + "*master",
                                           password="masterpw",
                                           extra=["Auth-Method: plain"]))
    c = s.smtp()
    c.ehlo()
    assert c.auth("XOAUTH2", lambda challenge=None: xoauth2_raw())[0] == 235
    assert s.backend.wait_session().data["auth"] == (b"LOGIN", b"alice@example.com*master",
                                                     b"masterpw")


def test_smtp_password_login_to_login_only_backend(setup):
    s = setup(2, SmtpBackend, auth="LOGIN", users={b"bob": b"pw"})
    c = s.smtp()
    c.ehlo()
    assert c.login("bob", "pw")[0] == 235
    assert s.backend.wait_session().data["auth"] == (b"LOGIN", b"bob", b"pw")


def test_smtp_no_mechanism_fits(setup):
    s = setup(2, SmtpBackend, auth="GSSAPI CRAM-MD5")
    c = s.smtp()
    c.ehlo()
    c.user, c.password = "bob", "pw"
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        c.auth("PLAIN", c.auth_plain)
    assert e.value.smtp_code == 451
    s.proxy.wait_log('[error]')
    assert 'upstream offers no usable AUTH mechanism for a password login (PLAIN or LOGIN ' \
           'needed), it offers "GSSAPI CRAM-MD5"' in s.proxy.log_text()


def test_smtp_backend_refuses_token(setup):
    s = setup(2, SmtpBackend, auth="OAUTHBEARER", tokens={})
    c = s.smtp()
    c.ehlo()
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        c.auth("XOAUTH2", lambda challenge=None: xoauth2_raw())
    assert e.value.smtp_code == 535
    conn = s.backend.wait_session()
    assert conn.data["auth"] == (b"OAUTHBEARER", USER.encode(), TOKEN.encode())
    assert conn.data["dummy"] == b"AQ==\r\n"


# ---- last: the debug log of every session above ----------------------------------------------

def test_no_token_in_the_debug_log(shared):
    text = shared.proxy.log_text()
    # the traces are there, masked: client lines, continuations, backend lines, auth request
    for masked in ('client sent "AUTH OAUTHBEARER ***"', 'client sent "***"',
                   'sent to upstream "AUTH XOAUTH2 ***"', 'sent to upstream "***"',
                   'client sent "AUTH XOAUTH2 ***"', 'auth http request to'):
        assert masked in text
    assert TOKEN not in text and "secret_Token" not in text
    for b64 in (xoauth2(), bearer()):
        assert b64.decode() not in text
        assert b64.decode()[:40] not in text
