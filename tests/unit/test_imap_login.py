"""IMAP's backend login without sockets: ImapLogin (ngx_mail_proxy_imap_handler) fed backend
replies after an ImapConversation took the client's credentials; its actions compared exactly."""

import re

import pytest

from mailproxy.clientio import BackendRejected
from mailproxy.conversation import (Authenticate, BackendStartTLS, LoggedIn, Peer,
                                    StartTLSRefused, ToBackend)
from mailproxy.imap import ImapLogin, backend_id_complete, backend_login_complete
from playbook import DIGEST, IMAP_PEER as PEER, b64, imap_backend_lines as backend_lines, line
from playbook import imap_login_lines as login_lines


# ---- the backend login ----------------------------------------------------------------------------

def logged_in(imap, command=b"a1 LOGIN alice secret", **directives):
    conv = imap(**directives)
    out = conv.receive(line(command))
    assert type(out[-1]) is Authenticate
    return conv


def run_login(login, replies):
    """Feed backend replies; the actions of each."""
    return [login.receive(r) for r in replies]


@pytest.mark.parametrize("methods,steps", [
    (["plain"], [b"p1 AUTHENTICATE plain", b64(b"\0alice\0secret")]),
    (["plain"], [b"p1 AUTHENTICATE LOGIN", b64(b"alice"), b64(b"secret")]),
    (["plain"], [b"p1 AUTHENTICATE LOGIN " + b64(b"alice"), b64(b"secret")]),
    (["external"], [b"p1 AUTHENTICATE EXTERNAL", b64(b"alice")]),
    (["external"], [b"p1 AUTHENTICATE EXTERNAL " + b64(b"alice")]),
    (["cram-md5"], [b"p1 AUTHENTICATE CRAM-MD5", b64(b"alice " + DIGEST)]),
])
def test_backend_login_under_the_authenticate_tag(imap, methods, steps):
    # the password towards the backend is the auth service's (Auth-Pass) for EXTERNAL and
    # CRAM-MD5; the tag stays the client's
    conv = imap(imap_auth=methods)
    for data in steps:
        out = conv.receive(line(data))
    assert type(out[-1]) is Authenticate and out[-1].login == b"alice"
    assert backend_lines(conv) == login_lines(b"p1 ")


def test_backend_login(imap):
    conv = logged_in(imap)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    assert isinstance(login, ImapLogin)
    assert login.READING == "reading response from upstream"
    assert login.complete is None
    assert login.receive(b"* OK Dovecot ready.\r\n") == [
        ToBackend(b"a1 LOGIN {5}\r\n", "sending LOGIN command to upstream")]
    assert login.complete is None
    assert login.receive(b"+ OK\r\n") == [
        ToBackend(b"alice {6}\r\n", "sending user name to upstream")]
    assert login.receive(b"+ OK\r\n") == [ToBackend(b"secret\r\n", "sending password to upstream")]
    assert login.complete is backend_login_complete
    reply = b"* CAPABILITY IMAP4rev1\r\na1 OK Logged in\r\n"
    assert login.receive(reply) == [LoggedIn(reply)]


def test_backend_login_with_auth_service_credentials(imap):
    # Auth-User / Auth-Pass replace the client's; the tag stays the client's
    conv = logged_in(imap, b"x.9 AUTHENTICATE PLAIN " + b64(b"\0alice\0secret"))
    login = conv.backend_login(b"bob@example.test", b"", PEER, False)
    assert login.receive(b"* OK\r\n") == [
        ToBackend(b"x.9 LOGIN {16}\r\n", "sending LOGIN command to upstream")]
    assert login.receive(b"+\r\n") == [
        ToBackend(b"bob@example.test {0}\r\n", "sending user name to upstream")]
    assert login.receive(b"+\r\n") == [ToBackend(b"\r\n", "sending password to upstream")]


@pytest.mark.parametrize("steps,rejected,text", [
    ([], b"* BYE busy\r\n", b"* BYE busy\r\n"),
    ([], b"* PREAUTH hello\r\n", b"* PREAUTH hello\r\n"),
    ([b"* OK\r\n"], b"a1 NO no literals\r\n", b"a1 NO no literals\r\n"),
    ([b"* OK\r\n", b"+ OK\r\n"], b"a1 BAD\r\n", b"a1 BAD\r\n"),
    ([b"* OK\r\n", b"+ OK\r\n", b"+ OK\r\n"], b"a1 NO [AUTHENTICATIONFAILED] no\r\n",
     b"NO [AUTHENTICATIONFAILED] no\r\n"),
    ([b"* OK\r\n", b"+ OK\r\n", b"+ OK\r\n"], b"* BYE x\r\na1 NO y\r\n", b"NO y\r\n"),
    ([b"* OK\r\n", b"+ OK\r\n", b"+ OK\r\n"], b"* A\r\n* B\r\na1 OK Logged in\r\n",
     b"* B\r\na1 OK Logged in\r\n"),                     # one untagged line at most
    ([b"* OK\r\n", b"+ OK\r\n", b"+ OK\r\n"], b"a2 OK wrong tag\r\n", b"a2 OK wrong tag\r\n"),
])
def test_backend_login_rejected(imap, steps, rejected, text):
    login = logged_in(imap).backend_login(b"alice", b"secret", PEER, False)
    run_login(login, steps)
    with pytest.raises(BackendRejected) as e:
        login.receive(rejected)
    assert (e.value.reply, e.value.text) == (rejected, text)


def test_backend_login_reply_completion(imap):
    # an untagged line may come before the tagged reply: read on until more follows it
    login = logged_in(imap).backend_login(b"alice", b"secret", PEER, False)
    run_login(login, [b"* OK\r\n", b"+ OK\r\n", b"+ OK\r\n"])
    assert not login.complete(b"* CAPABILITY IMAP4rev1 IDLE\r\n")
    assert login.complete(b"* CAPABILITY IMAP4rev1 IDLE\r\na1 OK\r\n")
    assert login.complete(b"* A\r\n* B\r\n")
    assert login.complete(b"a1 NO\r\n")
    reply = b"* CAPABILITY IMAP4rev1 IDLE\r\na1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
    assert login.receive(reply) == [LoggedIn(reply)]


ID_RE = re.compile(rb'mailproxy-id ID \("x-originating-ip" "192\.0\.2\.7" "x-originating-port" '
                   rb'"40000" "x-connected-ip" "(.*?)" "x-connected-port" "(\d+)" '
                   rb'"x-session-id" "([A-Za-z0-9_-]{16})"\)\r\n\Z')


def test_backend_id(imap):
    conv = logged_in(imap, imap_client_id=True)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    (step,) = login.receive(b"* OK\r\n")
    assert step.action == "sending ID command to upstream"
    ip, port, session_id = ID_RE.match(step.data).groups()
    assert (ip, port) == (b"127.0.0.1", b"1143")
    assert login.complete is backend_id_complete
    # whatever the backend answers (NO/BAD too), LOGIN follows
    assert login.receive(b"mailproxy-id BAD unknown\r\n") == [
        ToBackend(b"a1 LOGIN {5}\r\n", "sending LOGIN command to upstream")]
    # one session id per client connection (a retry after Auth-Wait keeps it), a new one per
    # connection
    again = conv.backend_login(b"alice", b"secret", PEER, False).receive(b"* OK\r\n")[0]
    assert ID_RE.match(again.data).group(3) == session_id
    other = logged_in(imap, imap_client_id=True).backend_login(b"a", b"b", PEER, False)
    assert ID_RE.match(other.receive(b"* OK\r\n")[0].data).group(3) != session_id


@pytest.mark.parametrize("answer", [
    b"mailproxy-id BAD unknown command\r\n",
    b"mailproxy-id NO not now\r\n",
    b'* OK something else\r\n* ID ("name" "x")\r\nmailproxy-id OK ID completed.\r\n',
])
def test_backend_id_answer_ignored(imap, answer):
    login = logged_in(imap, imap_client_id=True).backend_login(b"alice", b"secret", PEER,
                                                               False)
    assert login.receive(b"* OK\r\n")[0].action == "sending ID command to upstream"
    assert not login.complete(b"* OK something else\r\n")
    assert login.complete(answer)
    assert login.receive(answer) == [
        ToBackend(b"a1 LOGIN {5}\r\n", "sending LOGIN command to upstream")]


def test_backend_id_fields_from_the_peer(imap):
    conv = logged_in(imap, imap_client_id=True)
    proxied = Peer("192.0.2.7", 40000, ("127.0.0.1", 1143), ("198.51.100.1", 993))
    data = conv.backend_login(b"a", b"b", proxied, False).receive(b"* OK\r\n")[0].data
    assert ID_RE.match(data).groups()[:2] == (b"198.51.100.1", b"993")
    data = conv.backend_login(b"a", b"b", Peer(None, None), False).receive(b"* OK\r\n")[0].data
    assert data == (b'mailproxy-id ID ("x-session-id" "%s")\r\n' % conv.session_id.encode())


def test_backend_no_id_when_off(imap):
    conv = logged_in(imap)
    assert conv.conf.imap_client_id is False                  # the default
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    assert login.receive(b"* OK\r\n")[0].action == "sending LOGIN command to upstream"
    assert backend_lines(conv) == login_lines(b"a1 ")


@pytest.mark.parametrize("reply", [b"mpTLS OK Begin TLS\r\n",
                                   b"* CAPABILITY IMAP4rev1\r\nmpTLS OK go\r\n"])
def test_backend_starttls(imap, reply):
    login = logged_in(imap).backend_login(b"alice", b"secret", PEER, True)
    assert login.receive(b"* OK ready\r\n") == [
        ToBackend(b"mpTLS STARTTLS\r\n", "sending STARTTLS to upstream")]
    assert login.complete(b"mpTLS OK\r\n") and login.complete(b"* X\r\nmpTLS NO\r\n")
    assert not login.complete(b"* CAPABILITY IMAP4rev1\r\n")
    assert login.receive(reply) == [
        BackendStartTLS(), ToBackend(b"a1 LOGIN {5}\r\n", "sending LOGIN command to upstream")]


def test_backend_starttls_then_id(imap):
    login = logged_in(imap, imap_client_id=True).backend_login(b"alice", b"secret", PEER, True)
    login.receive(b"* OK\r\n")
    first, second = login.receive(b"mpTLS OK\r\n")
    assert first == BackendStartTLS()
    assert second.action == "sending ID command to upstream"


@pytest.mark.parametrize("reply,refused", [
    (b"mpTLS NO not here\r\n", b"mpTLS NO not here\r\n"),
    (b"* BYE x\r\nmpTLS BAD unknown\r\n", b"mpTLS BAD unknown\r\n"),
])
def test_backend_starttls_refused(imap, reply, refused):
    login = logged_in(imap).backend_login(b"alice", b"secret", PEER, True)
    login.receive(b"* OK\r\n")
    with pytest.raises(StartTLSRefused) as e:
        login.receive(reply)
    assert e.value.reply == refused


def test_backend_starttls_bad_greeting(imap):
    login = logged_in(imap).backend_login(b"alice", b"secret", PEER, True)
    with pytest.raises(BackendRejected) as e:
        login.receive(b"* BYE\r\n")
    assert e.value.reply == b"* BYE\r\n"
