"""Dovecot as the IMAP and POP3 backend: every login method mailproxy accepts, through
auth_http (the test AuthServer) and through proxy_pass; messages appended, stored and read
back; the real client address reaching Dovecot's own log through PROXY (v1 and v2, Dovecot
`haproxy = yes` listeners) and through the IMAP ID command (`imap_client_id on`,
Dovecot `login_trusted_networks`)."""

import base64
import hmac

import pytest

from tests.support.auth import AuthServer
from tests.support.common import fail_on_errors
from tests.support.process import free_port, server_block
from tests.support.realmail import dovecot_responder, unique_message
from tests.support.realservers import CLIENT_IP, USERS

pytestmark = pytest.mark.integration


@pytest.fixture
def auth(dovecot):
    srv = AuthServer()
    srv.set_respond(dovecot_responder({"imap": dovecot.ports["imap"],
                                       "pop3": dovecot.ports["pop3"]}))
    yield srv
    srv.stop()
    fail_on_errors(srv, type(srv).__name__)


@pytest.fixture
def proxy(proxy_factory, auth, dovecot):
    """start(protocol, mode='auth_http'|'proxy_pass', listener=None, **directives) -> port."""
    def start(protocol, mode="auth_http", listener=None, **directives):
        port = free_port()
        if mode == "auth_http":
            directives.setdefault("auth_http", auth.url)
            if listener is not None:
                ports = {"imap": dovecot.ports["imap"], "pop3": dovecot.ports["pop3"]}
                ports[protocol] = dovecot.ports[listener]
                auth.set_respond(dovecot_responder(ports))
        else:
            directives["proxy_pass"] = f"127.0.0.1:{dovecot.ports[listener or protocol]}"
        directives.setdefault("timeout", "10s")
        # listen on the wildcard of 127/8 is not needed: the client binds 127.0.0.2 and
        # connects to 127.0.0.1
        proxy_factory({"servers": {protocol: server_block(protocol, port, **directives)}})
        return port
    return start


# ---------------------------------------------------------------------------------------------
# IMAP

def _imap_login(m, method, user):
    pw = USERS[user]
    if method == "LOGIN":
        return m.login(user, pw)
    if method == "PLAIN":
        return m.authenticate("PLAIN", lambda _: b"\0" + user.encode() + b"\0" + pw.encode())
    if method == "AUTH-LOGIN":
        answers = iter([user.encode(), pw.encode()])
        return m.authenticate("LOGIN", lambda _: next(answers))
    if method == "CRAM-MD5":
        return m.authenticate("CRAM-MD5", lambda challenge: user.encode() + b" " + hmac.new(
            pw.encode(), challenge, "md5").hexdigest().encode())
    if method == "EXTERNAL":
        return m.authenticate("EXTERNAL", lambda _: user.encode())
    raise ValueError(method)


def _imap_roundtrip(m, user):
    """APPEND, SELECT, SEARCH, FETCH, STORE, EXPUNGE: the message comes back intact."""
    token, body = unique_message("imap")
    typ, _ = m.append("INBOX", None, None, body)
    assert typ == "OK"
    typ, data = m.select("INBOX")
    assert typ == "OK"
    typ, data = m.search(None, "HEADER", "Message-ID", f"<{token}@test>")
    assert typ == "OK" and data[0], data
    num = data[0].split()[-1]
    typ, data = m.fetch(num, "(BODY.PEEK[])")
    assert typ == "OK"
    assert data[0][1] == body
    typ, data = m.store(num, "+FLAGS", "(\\Flagged)")
    assert typ == "OK" and b"\\Flagged" in data[0]
    typ, data = m.fetch(num, "(FLAGS)")
    assert b"\\Flagged" in data[0]
    m.store(num, "+FLAGS", "(\\Deleted)")
    assert m.expunge()[0] == "OK"
    assert m.logout()[0] == "BYE"


IMAP_AUTH_HTTP = [("LOGIN", "alice"), ("PLAIN", "alice"), ("PLAIN", "bob"),
                  ("AUTH-LOGIN", "alice"), ("AUTH-LOGIN", "bob"), ("CRAM-MD5", "alice"),
                  ("CRAM-MD5", "bob"), ("EXTERNAL", "alice")]


@pytest.mark.parametrize("method,user", IMAP_AUTH_HTTP)
def test_imap_auth_http_every_method(proxy, imap_from, dovecot_log, method, user):
    port = proxy("imap", imap_auth="plain login cram-md5 external")
    m = imap_from(port)
    typ, _ = _imap_login(m, method, user)
    assert typ == "OK"
    dovecot_log.wait(rf"imap-login: Info: Login: user=<{user}>, method=PLAIN, rip=127\.0\.0\.1")
    _imap_roundtrip(m, user)


@pytest.mark.parametrize("method,user", [("LOGIN", "alice"), ("PLAIN", "alice"),
                                         ("PLAIN", "bob"), ("AUTH-LOGIN", "bob")])
def test_imap_proxy_pass_every_method(proxy, imap_from, dovecot_log, method, user):
    port = proxy("imap", mode="proxy_pass", imap_auth="plain login")
    m = imap_from(port)
    typ, _ = _imap_login(m, method, user)
    assert typ == "OK"
    dovecot_log.wait(rf"Login: user=<{user}>")
    _imap_roundtrip(m, user)


def test_imap_proxy_pass_wrong_password_is_refused(proxy, imap_from, dovecot_log):
    import imaplib
    port = proxy("imap", mode="proxy_pass")
    m = imap_from(port)
    with pytest.raises(imaplib.IMAP4.error) as err:
        m.login("alice", "wrong")
    assert "Authentication failed" in str(err.value) or "AUTHENTICATIONFAILED" in str(err.value)
    dovecot_log.wait(r"imap-login: Info: (Aborted login|Disconnected).*user=<alice>"
                     r"|auth: Info: passwd-file\(alice,127\.0\.0\.1.*\): Password mismatch")


def test_imap_auth_http_wrong_password_never_reaches_dovecot(proxy, imap_from, auth):
    import imaplib
    port = proxy("imap")
    m = imap_from(port)
    with pytest.raises(imaplib.IMAP4.error):
        m.login("alice", "wrong")
    assert auth.requests[-1].header("Client-IP") == CLIENT_IP


# ---------------------------------------------------------------------------------------------
# POP3

def _pop3_login(p, method, user):
    import poplib
    pw = USERS[user]
    if method == "USER":
        p.user(user)
        return p.pass_(pw)
    if method == "APOP":
        return p.apop(user, pw)
    if method == "PLAIN":
        return p._shortcmd("AUTH PLAIN " + base64.b64encode(
            b"\0" + user.encode() + b"\0" + pw.encode()).decode())
    if method == "AUTH-LOGIN":
        assert p._shortcmd("AUTH LOGIN").startswith(b"+ ")
        assert p._shortcmd(base64.b64encode(user.encode()).decode()).startswith(b"+ ")
        return p._shortcmd(base64.b64encode(pw.encode()).decode())
    if method == "CRAM-MD5":
        challenge = p._shortcmd("AUTH CRAM-MD5")
        assert challenge.startswith(b"+ ")
        salt = base64.b64decode(challenge[2:])
        answer = user.encode() + b" " + hmac.new(pw.encode(), salt, "md5").hexdigest().encode()
        return p._shortcmd(base64.b64encode(answer).decode())
    if method == "EXTERNAL":
        return p._shortcmd("AUTH EXTERNAL " + base64.b64encode(user.encode()).decode())
    raise poplib.error_proto(method)


def _store_via_imap(dovecot, user, tag="pop3"):
    """Put a message in `user`'s INBOX straight at Dovecot (not through the proxy)."""
    import imaplib
    token, body = unique_message(tag)
    m = imaplib.IMAP4("127.0.0.1", dovecot.ports["imap"], timeout=10)
    m.authenticate("PLAIN", lambda _: b"\0" + user.encode() + b"\0" + USERS[user].encode())
    assert m.append("INBOX", None, None, body)[0] == "OK"
    m.logout()
    return token, body


def _pop3_find_and_delete(p, token, body):
    count, _size = p.stat()
    assert count >= 1
    for i in range(count, 0, -1):
        resp, lines, _octets = p.retr(i)
        got = b"\r\n".join(lines) + b"\r\n"
        if token.encode() in got:
            assert got == body
            p.dele(i)
            break
    else:
        raise AssertionError("message not found over POP3")
    assert p.quit().startswith(b"+OK")


POP3_AUTH_HTTP = [("USER", "alice"), ("USER", "bob"), ("APOP", "alice"), ("PLAIN", "alice"),
                  ("PLAIN", "bob"), ("AUTH-LOGIN", "bob"), ("CRAM-MD5", "alice"),
                  ("EXTERNAL", "alice")]


@pytest.mark.parametrize("method,user", POP3_AUTH_HTTP)
def test_pop3_auth_http_every_method(proxy, pop3_from, dovecot, dovecot_log, method, user):
    token, body = _store_via_imap(dovecot, user)
    port = proxy("pop3", pop3_auth="plain apop cram-md5 external")
    p = pop3_from(port)
    assert _pop3_login(p, method, user).startswith(b"+OK")
    dovecot_log.wait(rf"pop3-login: Info: Login: user=<{user}>, method=PLAIN, rip=127\.0\.0\.1")
    _pop3_find_and_delete(p, token, body)


@pytest.mark.parametrize("method,user", [("USER", "alice"), ("USER", "bob"), ("PLAIN", "bob"),
                                         ("AUTH-LOGIN", "alice")])
def test_pop3_proxy_pass_every_method(proxy, pop3_from, dovecot, dovecot_log, method, user):
    token, body = _store_via_imap(dovecot, user)
    port = proxy("pop3", mode="proxy_pass")
    p = pop3_from(port)
    assert _pop3_login(p, method, user).startswith(b"+OK")
    dovecot_log.wait(rf"pop3-login: Info: Login: user=<{user}>")
    _pop3_find_and_delete(p, token, body)


def test_pop3_proxy_pass_wrong_password_is_refused(proxy, pop3_from):
    import poplib
    port = proxy("pop3", mode="proxy_pass")
    p = pop3_from(port)
    p.user("alice")
    with pytest.raises(poplib.error_proto) as err:
        p.pass_("wrong")
    assert str(err.value).startswith("b'-ERR")


def test_imap_append_then_pop3_retr_through_the_proxy(proxy, imap_from, pop3_from):
    """One message written over IMAP and read over POP3, both through mailproxy."""
    imap_port = proxy("imap")
    pop3_port = proxy("pop3")
    token, body = unique_message("cross")
    m = imap_from(imap_port)
    m.login("alice", USERS["alice"])
    assert m.append("INBOX", None, None, body)[0] == "OK"
    m.logout()
    p = pop3_from(pop3_port)
    p.user("alice")
    p.pass_(USERS["alice"])
    _pop3_find_and_delete(p, token, body)


# ---------------------------------------------------------------------------------------------
# the real client address in Dovecot's log

@pytest.mark.parametrize("version", ["on", "v2"])
@pytest.mark.parametrize("mode", ["auth_http", "proxy_pass"])
def test_imap_proxy_protocol_shows_client_address(proxy, imap_from, dovecot_log, version, mode):
    port = proxy("imap", mode=mode, listener="imap_haproxy", proxy_protocol=version)
    m = imap_from(port)
    assert m.login("alice", USERS["alice"])[0] == "OK"
    line = dovecot_log.wait(r"imap-login: Info: Login: user=<alice>")
    assert f"rip={CLIENT_IP}," in line, line
    m.logout()


@pytest.mark.parametrize("version", ["on", "v2"])
def test_pop3_proxy_protocol_shows_client_address(proxy, pop3_from, dovecot_log, version):
    port = proxy("pop3", listener="pop3_haproxy", proxy_protocol=version)
    p = pop3_from(port)
    p.user("alice")
    assert p.pass_(USERS["alice"]).startswith(b"+OK")
    line = dovecot_log.wait(r"pop3-login: Info: Login: user=<alice>")
    assert f"rip={CLIENT_IP}," in line, line
    p.quit()


def test_without_proxy_protocol_dovecot_sees_the_proxy(proxy, imap_from, dovecot_log):
    """The baseline that makes the two tests around it mean something."""
    port = proxy("imap")
    m = imap_from(port)
    assert m.login("alice", USERS["alice"])[0] == "OK"
    line = dovecot_log.wait(r"imap-login: Info: Login: user=<alice>")
    assert "rip=127.0.0.1," in line, line
    m.logout()


@pytest.mark.parametrize("mode", ["auth_http", "proxy_pass"])
def test_imap_client_id_shows_client_address(proxy, imap_from, dovecot_log, mode):
    port = proxy("imap", mode=mode, imap_client_id=True)
    m = imap_from(port)
    assert m.login("alice", USERS["alice"])[0] == "OK"
    line = dovecot_log.wait(r"imap-login: Info: Login: user=<alice>")
    assert f"rip={CLIENT_IP}," in line, line
    # the local address the client reached: the proxy's listen address
    assert "lip=127.0.0.1," in line, line
    assert m.select("INBOX")[0] == "OK"
    m.logout()
