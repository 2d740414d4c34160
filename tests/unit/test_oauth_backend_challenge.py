"""A token the backend refuses with an RFC 7628 error challenge (Dovecot's oauth2 passdb when
the token has expired since the auth service said OK), without sockets: the backend login keeps
the challenge (oauth.backend_challenge) on its BackendRejected, and the conversation
(`backend_refused`) gives it to the client as its own error challenge, reads the client's dummy
response, then the backend's failure reply; without a challenge, the failure reply at once."""

import base64

import pytest

from mailproxy import oauth
from mailproxy.clientio import BackendRejected
from mailproxy.conversation import Authenticate, Peer
from mailproxy.imap import ImapLogin
from mailproxy.pop3 import Pop3Login
from mailproxy.protocols import PROTOCOLS
from playbook import closing, reply

TOKEN = b"expired.token-42"
PEER = Peer("192.0.2.7", 40000, ("127.0.0.1", 25))
# what Dovecot 2.3 sends for XOAUTH2 and for OAUTHBEARER
XOAUTH2_JSON = base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"mail"}')
BEARER_JSON = base64.b64encode(b'{"status":"invalid_token"}')


def started(conf):
    """A conversation past its greeting (SMTP's RestartTimer included)."""
    conv = PROTOCOLS[conf.protocol].conversation(conf)
    conv.start()
    return conv


def xoauth2(user=b"alice", token=TOKEN):
    return base64.b64encode(b"user=" + user + b"\x01auth=Bearer " + token + b"\x01\x01")


def bearer(user=b"alice", token=TOKEN):
    return base64.b64encode(b"n,a=" + user + b",\x01auth=Bearer " + token + b"\x01\x01")


# ---- oauth.backend_challenge ------------------------------------------------------------------

@pytest.mark.parametrize("line, prefix, challenge", [
    (b"+ " + XOAUTH2_JSON + b"\r\n", b"+ ", XOAUTH2_JSON),
    (b"+ " + BEARER_JSON + b"\n", b"+ ", BEARER_JSON),
    (b"334 " + BEARER_JSON + b"\r\n", b"334 ", BEARER_JSON),
    (b"+ " + BEARER_JSON + b" \r\n", b"+ ", BEARER_JSON),     # trailing blank
    (b"+ \r\n", b"+ ", None),                                   # an empty challenge
    (b"+\r\n", b"+ ", None),
    (b"334 \r\n", b"334 ", None),
    (b"+ not base64!\r\n", b"+ ", None),
    (b"+ eyJ\r\n", b"+ ", None),                                # not canonical
    (b"+ " + BEARER_JSON + b"\r\nx\r\n", b"+ ", None),          # no second line smuggled
    (b"+ " + BEARER_JSON + b"\r\n", b"334 ", None),             # another protocol's prefix
])
def test_backend_challenge(line, prefix, challenge):
    assert oauth.backend_challenge(line, prefix) == challenge


# ---- the backend logins keep it --------------------------------------------------------------

def test_pop3_login_keeps_the_challenge():
    login = Pop3Login(b"alice", TOKEN, mech="xoauth2")
    login.receive(b"+OK [XCLIENT] Dovecot ready.\r\n")
    login.receive(b"+ " + XOAUTH2_JSON + b"\r\n")
    with pytest.raises(BackendRejected) as e:
        login.receive(b"-ERR [AUTH] Authentication failed.\r\n")
    assert (e.value.refused, e.value.challenge) == (True, XOAUTH2_JSON)
    assert e.value.reply == b"-ERR [AUTH] Authentication failed.\r\n"
    # refused at once: no challenge to forward
    login = Pop3Login(b"alice", TOKEN, mech="oauthbearer")
    login.receive(b"+OK\r\n")
    with pytest.raises(BackendRejected) as e:
        login.receive(b"-ERR [AUTH] no\r\n")
    assert (e.value.refused, e.value.challenge) == (True, None)
    # a challenge that is not base64 is not forwarded
    login = Pop3Login(b"alice", TOKEN, mech="oauthbearer")
    login.receive(b"+OK\r\n")
    login.receive(b"+ {json}\r\n")
    with pytest.raises(BackendRejected) as e:
        login.receive(b"-ERR no\r\n")
    assert e.value.challenge is None


def test_imap_login_keeps_the_challenge():
    login = ImapLogin(b"a1 ", b"alice", TOKEN, mech="oauthbearer")
    login.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=OAUTHBEARER] ready\r\n")
    login.receive(b"+ " + BEARER_JSON + b"\r\n")
    with pytest.raises(BackendRejected) as e:
        login.receive(b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    assert (e.value.refused, e.value.challenge) == (True, BEARER_JSON)
    assert e.value.reply == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    login = ImapLogin(b"a1 ", b"alice", TOKEN, mech="xoauth2")
    login.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] ready\r\n")
    with pytest.raises(BackendRejected) as e:
        login.receive(b"a1 NO [AUTHENTICATIONFAILED] no\r\n")
    assert e.value.challenge is None


def test_smtp_login_keeps_the_challenge(conf):
    conv = started(conf("smtp", smtp_auth="xoauth2", proxy_smtp_auth="on", xclient="off"))
    conv.receive(b"EHLO client\r\n")
    conv.receive(b"AUTH XOAUTH2 " + xoauth2() + b"\r\n")
    login = conv.backend_login(b"alice", TOKEN, PEER, False)
    login.receive(b"220 backend\r\n")
    login.receive(b"250-backend\r\n250 AUTH XOAUTH2\r\n")
    login.receive(b"334 " + XOAUTH2_JSON + b"\r\n")
    with pytest.raises(BackendRejected) as e:
        login.receive(b"535 5.7.8 Authentication failed\r\n")
    assert (e.value.refused, e.value.challenge) == (True, XOAUTH2_JSON)


# ---- the conversations forward it -------------------------------------------------------------

@pytest.mark.parametrize("protocol, command, cont, failure", [
    ("pop3", b"AUTH XOAUTH2 ", b"+ ", b"-ERR [AUTH] Authentication failed.\r\n"),
    ("imap", b"a1 AUTHENTICATE XOAUTH2 ", b"+ ",
     b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
    ("smtp", b"AUTH XOAUTH2 ", b"334 ", b"535 5.7.8 Authentication failed\r\n"),
])
def test_backend_error_challenge_reaches_the_client(conf, protocol, command, cont, failure):
    c = conf(protocol, **{protocol + "_auth": "xoauth2 oauthbearer"})
    conv = started(c)
    if protocol == "smtp":
        conv.receive(b"EHLO client\r\n")
    assert conv.receive(command + xoauth2() + b"\r\n") == [
        Authenticate("xoauth2", b"alice", TOKEN)]
    # the challenge, then the client's dummy response (XOAUTH2 clients: an empty line)
    assert conv.backend_refused(failure, XOAUTH2_JSON) == reply(cont + XOAUTH2_JSON + b"\r\n")
    assert conv.expect == conv.sasl_error_response         # the debug trace masks the line
    assert conv.receive(b"\r\n") == closing(failure)
    # OAUTHBEARER's ^A, and a cancelling `*`, end the same way
    for dummy in (b"AQ==\r\n", b"*\r\n"):
        conv = started(c)
        if protocol == "smtp":
            conv.receive(b"EHLO client\r\n")
        conv.receive(command.replace(b"XOAUTH2", b"OAUTHBEARER") + bearer() + b"\r\n")
        conv.backend_refused(failure, BEARER_JSON)
        assert conv.receive(dummy) == closing(failure)
    # no challenge from the backend: the failure reply at once
    conv = started(c)
    if protocol == "smtp":
        conv.receive(b"EHLO client\r\n")
    conv.receive(command + xoauth2() + b"\r\n")
    assert conv.backend_refused(failure, None) == closing(failure)


def test_backend_refusal_of_a_password_is_the_reply_alone(conf):
    conv = started(conf("pop3"))
    conv.receive(b"USER bob\r\n")
    conv.receive(b"PASS secret\r\n")
    # a challenge can only come with a token login: never one for a password
    assert conv.backend_refused(b"-ERR [AUTH] wrong\r\n", BEARER_JSON) == \
        closing(b"-ERR [AUTH] wrong\r\n")
