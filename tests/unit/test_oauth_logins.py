"""OAUTHBEARER (RFC 7628) and XOAUTH2 without sockets: the parsers (oauth.py), the client
conversations of each protocol (with and without an initial response, the error challenge of
RFC 7628 section 3.2.3), the backend logins (token, or the auth service's password), the
auth_http answer's Auth-Error-SASL and Auth-Method, and the debug trace's masking."""

import base64

import pytest

from mailproxy import auth_http, oauth, trace
from mailproxy.clientio import BackendRejected
from mailproxy.conversation import Authenticate, LoggedIn, LoginError, Peer, Reply, ToBackend
from mailproxy.imap import ImapLogin, capabilities
from mailproxy.pop3 import Pop3Login
from mailproxy.sasl import SaslError
from mailproxy.smtp import SmtpLogin, auth_mechanisms
from mailproxy.protocols import PROTOCOLS
from playbook import auth_fail, closing, line, logs, reply

TOKEN = b"ya29.A0ARrdaM-secret_token~v1+/=="
PEER = Peer("192.0.2.7", 40000, ("127.0.0.1", 25))
JSON = b'{"status":"invalid_token","scope":"mail","openid-configuration":"https://x/"}'
ERROR_B64 = base64.b64encode(JSON)


def started(conf, tls=False):
    """A conversation past its greeting (SMTP's included: no resolver, no delay)."""
    conv = PROTOCOLS[conf.protocol].conversation(conf, tls=tls)
    conv.start()
    return conv


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def bearer(user=b"alice@example.com", token=TOKEN, extra=b"") -> bytes:
    gs2 = b"n,a=" + user + b"," if user is not None else b"n,,"
    return b64(gs2 + b"\x01" + extra + b"auth=Bearer " + token + b"\x01\x01")


def xoauth2(user=b"alice@example.com", token=TOKEN) -> bytes:
    return b64(b"user=" + user + b"\x01auth=Bearer " + token + b"\x01\x01")


# ---- parsing --------------------------------------------------------------------------------

@pytest.mark.parametrize("msg, user", [
    (b"n,a=alice@example.com,\x01auth=Bearer " + TOKEN + b"\x01\x01", b"alice@example.com"),
    (b"n,,\x01auth=Bearer " + TOKEN + b"\x01\x01", b""),
    (b"y,a=bob,\x01host=imap.example.com\x01port=993\x01auth=bearer  " + TOKEN + b"\x01\x01",
     b"bob"),
    (b"n,a=a=2Cb=3Dc,\x01auth=Bearer " + TOKEN + b"\x01\x01", b"a,b=c"),
])
def test_oauthbearer_valid(msg, user):
    assert oauth.decode_oauthbearer(b64(msg)) == (user, TOKEN)


@pytest.mark.parametrize("msg, what", [
    (b"\x01", "GS2 header"),                                    # the dummy response
    (b"p=tls-unique,,\x01auth=Bearer t\x01\x01", "GS2 header"),  # channel binding
    (b"n,a=bob\x01auth=Bearer t\x01\x01", "GS2 header"),
    (b"n,b=bob,\x01auth=Bearer t\x01\x01", "GS2 header"),
    (b"n,a=,\x01auth=Bearer t\x01\x01", "GS2 header"),
    (b"n,a=bob,x\x01auth=Bearer t\x01\x01", "GS2 header"),
    (b"n,a=b=41ob,\x01auth=Bearer t\x01\x01", "login"),         # only =2C and =3D
    (b"n,a=b\rob,\x01auth=Bearer t\x01\x01", "login"),
    (b"n,a=bob,\x01auth=Bearer t\x01", "key/value pairs"),      # one ^A short
    (b"n,a=bob,\x01host=x\x01\x01", "key/value pairs"),         # no auth
    (b"n,a=bob,\x01auth=Bearer t\x01auth=Bearer u\x01\x01", "key/value pairs"),
    (b"n,a=bob,\x01h0st=x\x01auth=Bearer t\x01\x01", "key/value pairs"),
    (b"n,a=bob,\x01host\x01auth=Bearer t\x01\x01", "key/value pairs"),
    (b"n,a=bob,\x01host=\x7f\x01auth=Bearer t\x01\x01", "key/value pairs"),
    (b"n,a=bob,\x01\x01", "key/value pairs"),
    (b"n,a=bob,\x01port=99x\x01auth=Bearer t\x01\x01", "port"),
    (b"n,a=bob,\x01auth=Basic dXNlcg==\x01\x01", "token"),
    (b"n,a=bob,\x01auth=Bearer\x01\x01", "token"),
    (b"n,a=bob,\x01auth=Bearer t\r\n\x01\x01", "token"),
    (b"n,a=bob,\x01auth=Bearer a=b\x01\x01", "token"),
])
def test_oauthbearer_invalid(msg, what):
    with pytest.raises(SaslError) as e:
        oauth.decode_oauthbearer(b64(msg))
    assert str(e.value) == "client sent invalid %s in AUTH OAUTHBEARER command" % what


def test_invalid_base64():
    for decode, mech in ((oauth.decode_oauthbearer, "OAUTHBEARER"),
                         (oauth.decode_xoauth2, "XOAUTH2")):
        with pytest.raises(SaslError) as e:
            decode(b"*")
        assert str(e.value) == "client sent invalid base64 encoding in AUTH %s command" % mech


def test_xoauth2_valid():
    assert oauth.decode_xoauth2(xoauth2()) == (b"alice@example.com", TOKEN)


@pytest.mark.parametrize("msg, what", [
    (b"user=bob\x01auth=Bearer t\x01", "response"),
    (b"user=bob\x01auth=Bearer t\x01\x01\x01", "response"),
    (b"usr=bob\x01auth=Bearer t\x01\x01", "response"),
    (b"user=bob\x01uth=Bearer t\x01\x01", "response"),
    (b"user=bob\x01host=x\x01auth=Bearer t\x01\x01", "response"),
    (b"user=\x01auth=Bearer t\x01\x01", "login"),
    (b"user=b\nob\x01auth=Bearer t\x01\x01", "login"),
    (b"user=bob\x01auth=Bearer t u\x01\x01", "token"),
])
def test_xoauth2_invalid(msg, what):
    with pytest.raises(SaslError) as e:
        oauth.decode_xoauth2(b64(msg))
    assert str(e.value) == "client sent invalid %s in AUTH XOAUTH2 command" % what


def test_encode_round_trip():
    for user in (b"a,b=c*master", b"alice"):
        assert oauth.decode_oauthbearer(oauth.encode("oauthbearer", user, TOKEN)) == (user, TOKEN)
        assert oauth.decode_xoauth2(oauth.encode("xoauth2", user, TOKEN)) == (user, TOKEN)
    assert base64.b64decode(oauth.encode_oauthbearer(b"", TOKEN)).startswith(b"n,,\x01")
    assert oauth.dummy_response("oauthbearer") == b"AQ==" == b64(b"\x01")
    assert oauth.dummy_response("xoauth2") == b""


@pytest.mark.parametrize("value, challenge", [
    (JSON, ERROR_B64),                      # raw JSON: encoded here
    (ERROR_B64, ERROR_B64),                 # already base64: as it is
    (b"  " + ERROR_B64, ERROR_B64),
    (b"eyJ9", b"eyJ9"),
    (b"eyJ", None), (b"eyJ9=", None), (b"ey J9", None), (b"", None), (b"{\x00}", None),
])
def test_error_challenge(value, challenge):
    assert oauth.error_challenge(value) == challenge


# ---- the auth service's answer --------------------------------------------------------------

def parse(*headers: bytes, protocol="imap", method="xoauth2"):
    req = auth_http.AuthRequest(method=method, user=b"alice", passwd=TOKEN, protocol=protocol)
    return auth_http.parse_response(b"HTTP/1.0 200 OK\r\n" + b"".join(h + b"\r\n" for h in headers)
                                    + b"\r\n", req, "127.0.0.1:9000")


def test_auth_error_sasl_raw_and_base64():
    for value in (JSON, ERROR_B64):
        res = parse(b"Auth-Status: Invalid token", b"Auth-Error-SASL: " + value)
        assert res.status == "FAIL" and res.sasl_error == ERROR_B64
    assert parse(b"Auth-Status: Invalid token").sasl_error is None


def test_auth_error_sasl_invalid_is_an_error():
    with pytest.raises(auth_http.AuthHttpError) as e:
        parse(b"Auth-Status: Invalid token", b"Auth-Error-SASL: not base64!")
    assert str(e.value) == ('auth http server 127.0.0.1:9000 sent invalid "Auth-Error-SASL" '
                            'header: "not base64!"')


def test_auth_method_plain_needs_auth_pass():
    ok = (b"Auth-Status: OK", b"Auth-Server: 127.0.0.1", b"Auth-Port: 143")
    res = parse(*ok, b"Auth-Method: PLAIN", b"Auth-Pass: master-secret",
                b"Auth-User: alice*master")
    assert (res.method, res.passwd, res.user) == ("plain", b"master-secret", b"alice*master")
    assert parse(*ok, b"Auth-Method: plain").method is None         # no password: the token
    assert parse(*ok, b"Auth-Method: cram-md5", b"Auth-Pass: x").method is None
    assert parse(*ok).method is None


def test_request_headers_for_a_token():
    req = auth_http.AuthRequest(method="oauthbearer", user=b"al ice%", passwd=TOKEN,
                                protocol="pop3")
    url = type("U", (), {"host_header": "auth", "unix": None, "uri": "/auth", "host": "a"})()
    lines = auth_http.build_request(url, req).split(b"\r\n")
    assert b"Auth-Method: oauthbearer" in lines
    assert b"Auth-User: al%20ice%25" in lines
    assert b"Auth-Pass: " + TOKEN in lines


# ---- advertising ----------------------------------------------------------------------------

def test_advertised_only_when_enabled(conf):
    imap = started(conf("imap", imap_auth="plain oauthbearer xoauth2"))
    imap_caps = imap.receive(b"a CAPABILITY\r\n")[0].data
    assert b" AUTH=PLAIN AUTH=OAUTHBEARER AUTH=XOAUTH2\r\n" in imap_caps
    plain = started(conf("imap"))
    assert b"OAUTH" not in plain.receive(b"a CAPABILITY\r\n")[0].data
    only_tls = started(conf("imap", imap_auth="xoauth2", starttls="only"))
    assert b"XOAUTH2" not in only_tls.receive(b"a CAPABILITY\r\n")[0].data
    assert b"AUTH=XOAUTH2" in started(conf("imap", imap_auth="xoauth2", starttls="only"),
                                      tls=True).receive(b"a CAPABILITY\r\n")[0].data

    pop3 = started(conf("pop3", pop3_auth="plain xoauth2 oauthbearer"))
    capa = pop3.receive(b"CAPA\r\n")[0].data
    assert b"\r\nSASL PLAIN LOGIN OAUTHBEARER XOAUTH2\r\n" in capa
    assert pop3.receive(b"AUTH\r\n")[0].data.endswith(b"OAUTHBEARER\r\nXOAUTH2\r\n.\r\n")
    assert pop3.buffer_size() == oauth.BUFFER
    assert started(conf("pop3")).buffer_size() == 128

    smtp = started(conf("smtp", smtp_auth="login xoauth2"))
    assert b"250 AUTH LOGIN XOAUTH2\r\n" in smtp.receive(b"EHLO c\r\n")[0].data
    smtp_tls = started(conf("smtp", smtp_auth="oauthbearer", starttls="only"))
    assert b"OAUTH" not in smtp_tls.receive(b"EHLO c\r\n")[0].data


# ---- the client side, each protocol ---------------------------------------------------------

def auth_of(mech, user=b"alice@example.com"):
    return [Authenticate(mech, user, TOKEN)]


@pytest.mark.parametrize("mech, response", [(b"OAUTHBEARER", bearer()),
                                            (b"XOAUTH2", xoauth2())])
def test_pop3_initial_response_and_continuation(conf, mech, response):
    c = conf("pop3", pop3_auth="oauthbearer xoauth2")
    conv = started(c)
    assert conv.receive(b"AUTH " + mech + b" " + response + b"\r\n") == auth_of(mech.decode()
                                                                                .lower())
    conv = started(c)
    assert conv.receive(b"AUTH " + mech.lower() + b"\r\n") == reply(b"+ \r\n")
    assert conv.receive(line(response)) == auth_of(mech.decode().lower())
    assert (conv.method, conv.login, conv.passwd) == (mech.decode().lower(),
                                                       b"alice@example.com", TOKEN)


@pytest.mark.parametrize("mech, response", [(b"OAUTHBEARER", bearer()),
                                            (b"XOAUTH2", xoauth2())])
def test_imap_initial_response_and_continuation(conf, mech, response):
    c = conf("imap", imap_auth="oauthbearer xoauth2")
    conv = started(c)
    assert conv.receive(b"a1 AUTHENTICATE " + mech + b" " + response + b"\r\n") == \
        auth_of(mech.decode().lower())
    assert conv.tag == b"a1 "
    conv = started(c)
    assert conv.receive(b"a2 AUTHENTICATE " + mech + b"\r\n") == reply(b"+ \r\n")
    assert conv.receive(line(response)) == auth_of(mech.decode().lower())
    assert started(c).receive(b"a3 AUTHENTICATE " + mech + b" x y\r\n") == \
        reply(b"a3 BAD invalid command\r\n")


@pytest.mark.parametrize("mech, response", [(b"OAUTHBEARER", bearer()),
                                            (b"XOAUTH2", xoauth2())])
def test_smtp_initial_response_and_continuation(conf, mech, response):
    c = conf("smtp", smtp_auth="oauthbearer xoauth2")
    conv = started(c)
    assert conv.receive(b"AUTH " + mech + b" " + response + b"\r\n") == \
        auth_of(mech.decode().lower())
    conv = started(c)
    assert conv.receive(b"AUTH " + mech + b"\r\n") == reply(b"334 \r\n")
    assert conv.receive(line(response)) == auth_of(mech.decode().lower())
    assert started(c).receive(b"AUTH " + mech + b" x y\r\n") == \
        reply(b"500 5.5.1 Invalid command\r\n")


@pytest.mark.parametrize("protocol, command, invalid", [
    ("pop3", b"AUTH XOAUTH2", b"-ERR invalid command\r\n"),
    ("imap", b"t AUTHENTICATE XOAUTH2", b"t BAD invalid command\r\n"),
    ("smtp", b"AUTH XOAUTH2", b"500 5.5.1 Invalid command\r\n"),
])
def test_disabled_malformed_and_cancelled(conf, protocol, command, invalid):
    # not enabled: an unknown mechanism
    assert started(conf(protocol)).receive(command + b" " + xoauth2() + b"\r\n") == \
        reply(invalid)
    c = conf(protocol, **{protocol + "_auth": "xoauth2"})
    # under `starttls only` before TLS
    locked = conf(protocol, starttls="only", **{protocol + "_auth": "xoauth2"})
    assert started(locked).receive(command + b" " + xoauth2() + b"\r\n") == reply(invalid)
    # malformed: the protocol's invalid-command reply, logged
    out = started(c).receive(command + b" " + bearer() + b"\r\n")
    assert out[-1] == Reply(invalid)
    assert logs(out) == [("info", "client sent invalid response in AUTH XOAUTH2 command")]
    # `*` cancels a continuation
    conv = started(c)
    conv.receive(command + b"\r\n")
    out = conv.receive(b"*\r\n")
    assert out[-1] == Reply(invalid) and conv.expect is None and conv.method is None


# ---- the error challenge (RFC 7628 section 3.2.3) -------------------------------------------

@pytest.mark.parametrize("protocol, command, challenge, failure", [
    ("pop3", b"AUTH OAUTHBEARER ", b"+ ", b"-ERR Invalid token\r\n"),
    ("imap", b"t1 AUTHENTICATE OAUTHBEARER ", b"+ ", b"t1 NO Invalid token\r\n"),
    ("smtp", b"AUTH OAUTHBEARER ", b"334 ", b"535 5.7.8 Invalid token\r\n"),
])
def test_error_challenge_then_failure(conf, protocol, command, challenge, failure):
    c = conf(protocol, **{protocol + "_auth": "oauthbearer"})
    refused = auth_fail(b"Invalid token", sasl_error=ERROR_B64, error_code="535 5.7.8")
    conv = started(c)
    assert conv.receive(command + bearer() + b"\r\n") == auth_of("oauthbearer")
    assert conv.auth_failed(refused, retry=False) == reply(challenge + ERROR_B64 + b"\r\n")
    assert conv.expect == conv.sasl_error_response           # the debug trace masks it
    assert conv.receive(b"AQ==\r\n") == closing(failure)
    # with Auth-Wait: the failure, then the client may try again
    conv = started(c)
    conv.receive(command + bearer() + b"\r\n")
    conv.auth_failed(refused, retry=True)
    assert conv.receive(b"\r\n") == reply(failure)             # XOAUTH2 clients: empty
    assert (conv.expect, conv.method, conv.login) == (None, None, None)
    assert conv.receive(command + bearer() + b"\r\n") == auth_of("oauthbearer")
    # without Auth-Error-SASL: the failure at once
    conv = started(c)
    conv.receive(command + bearer() + b"\r\n")
    assert conv.auth_failed(auth_fail(b"Invalid token", error_code="535 5.7.8"),
                            retry=False) == closing(failure)


def test_error_challenge_only_for_token_logins(conf):
    conv = started(conf("pop3"))
    conv.receive(b"USER bob\r\n")
    conv.receive(b"PASS secret\r\n")
    assert conv.auth_failed(auth_fail(b"No", sasl_error=ERROR_B64), retry=False) == \
        closing(b"-ERR No\r\n")
    # a stray call: the invalid-command reply, the session ends
    assert conv.sasl_error_response(b"x") is None
    assert conv._take() == closing(b"-ERR invalid command\r\n")


# ---- backend logins ---------------------------------------------------------------------------

def test_pop3_backend_token_login(conf):
    for mech, encode in (("oauthbearer", oauth.encode_oauthbearer),
                         ("xoauth2", oauth.encode_xoauth2)):
        login = Pop3Login(b"alice", TOKEN, mech=mech)
        data = b"AUTH %s %s\r\n" % (mech.upper().encode(), encode(b"alice", TOKEN))
        assert login.receive(b"+OK ready\r\n") == [
            ToBackend(data, "sending token to upstream")]
        assert login.receive(b"+OK logged in\r\n") == [LoggedIn(b"+OK logged in\r\n")]
    login = Pop3Login(b"alice", TOKEN, mech="oauthbearer")
    login.receive(b"+OK\r\n")
    assert login.receive(b"+ " + ERROR_B64 + b"\r\n") == [
        ToBackend(b"AQ==\r\n", "sending token to upstream")]
    with pytest.raises(BackendRejected) as e:
        login.receive(b"-ERR [AUTH] expired\r\n")
    assert e.value.refused and e.value.reply == b"-ERR [AUTH] expired\r\n"
    login = Pop3Login(b"alice", TOKEN, mech="xoauth2")
    login.receive(b"+OK\r\n")
    with pytest.raises(BackendRejected) as e:
        login.receive(b"-ERR no\r\n")
    assert e.value.refused


def test_pop3_conversation_picks_token_or_password(conf):
    conv = started(conf("pop3", pop3_auth="xoauth2"))
    conv.receive(b"AUTH XOAUTH2 " + xoauth2() + b"\r\n")
    assert conv.backend_login(b"alice", TOKEN, PEER, False).mech == "xoauth2"
    conv.backend_method = "plain"       # Auth-Method: plain with Auth-Pass: a master password
    login = conv.backend_login(b"alice*master", b"masterpw", PEER, False)
    assert login.mech is None
    assert login.receive(b"+OK\r\n") == [ToBackend(b"USER alice*master\r\n",
                                                   "sending user name to upstream")]


IMAP_IR = b"a1 AUTHENTICATE XOAUTH2 " + oauth.encode_xoauth2(b"alice", TOKEN) + b"\r\n"


def imap_login(conf, caps_in_greeting=True, starttls=False, mech="xoauth2", **directives):
    conv = started(conf("imap", imap_auth="xoauth2 oauthbearer", **directives))
    conv.receive(b"a1 AUTHENTICATE XOAUTH2 " + xoauth2(b"alice") + b"\r\n")
    conv.method = mech
    return conv.backend_login(b"alice", TOKEN, PEER, starttls)


def test_imap_backend_sasl_ir_from_greeting(conf):
    login = imap_login(conf)
    assert isinstance(login, ImapLogin) and login.mech == "xoauth2"
    out = login.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n")
    assert out == [ToBackend(IMAP_IR, "sending token to upstream")]
    assert not login.complete(b"* CAPABILITY X\r\n")
    assert login.complete(b"* CAPABILITY X\r\na1 OK\r\n") and login.complete(b"+ x\r\n")
    assert login.receive(b"a1 OK [CAPABILITY IMAP4rev1] Logged in\r\n") == [
        LoggedIn(b"a1 OK [CAPABILITY IMAP4rev1] Logged in\r\n")]


def test_imap_backend_capability_then_continuation(conf):
    login = imap_login(conf)
    assert login.receive(b"* OK ready\r\n") == [
        ToBackend(b"mpCAP CAPABILITY\r\n", "sending CAPABILITY command to upstream")]
    assert not login.complete(b"* CAPABILITY IMAP4rev1\r\n")
    assert login.complete(b"* CAPABILITY IMAP4rev1\r\nmpCAP OK\r\n")
    assert login.receive(b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\nmpCAP OK done\r\n") == [
        ToBackend(b"a1 AUTHENTICATE XOAUTH2\r\n", "sending AUTHENTICATE command to upstream")]
    assert login.receive(b"+ \r\n") == [
        ToBackend(oauth.encode_xoauth2(b"alice", TOKEN) + b"\r\n", "sending token to upstream")]
    # the backend's error challenge: the dummy response, then its NO goes to the client
    assert login.receive(b"+ " + ERROR_B64 + b"\r\n") == [
        ToBackend(b"\r\n", "sending token to upstream")]
    with pytest.raises(BackendRejected) as e:
        login.receive(b"a1 NO [AUTHENTICATIONFAILED] expired\r\n")
    assert e.value.refused and e.value.text == b"NO [AUTHENTICATIONFAILED] expired\r\n"


def test_imap_backend_refusals(conf):
    login = imap_login(conf, mech="oauthbearer")
    login.receive(b"* OK ready\r\n")
    login.receive(b"mpCAP BAD no\r\n")              # no capabilities: no SASL-IR
    with pytest.raises(BackendRejected) as e:
        login.receive(b"a1 NO unknown mechanism\r\n")
    assert e.value.refused
    login = imap_login(conf)
    login.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] ready\r\n")
    with pytest.raises(BackendRejected) as e:
        login.receive(b"* BYE\r\nxx NO\r\n")
    assert e.value.refused and e.value.text == b"xx NO\r\n"


def test_imap_backend_starttls_asks_again(conf):
    login = imap_login(conf, starttls=True)
    login.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] ready\r\n")
    out = login.receive(b"mpTLS OK begin\r\n")
    assert out[-1] == ToBackend(b"mpCAP CAPABILITY\r\n", "sending CAPABILITY command to upstream")


def test_imap_master_password_login(conf):
    conv = started(conf("imap", imap_auth="xoauth2"))
    conv.receive(b"a1 AUTHENTICATE XOAUTH2 " + xoauth2(b"alice") + b"\r\n")
    conv.backend_method = "plain"
    login = conv.backend_login(b"alice*master", b"masterpw", PEER, False)
    assert login.mech is None
    assert login.receive(b"* OK\r\n") == [ToBackend(b"a1 LOGIN {12}\r\n",
                                                    "sending LOGIN command to upstream")]
    assert login.receive(b"+ OK\r\n")[0].data == b"alice*master {8}\r\n"


def test_imap_capabilities():
    assert capabilities(b"* OK [CAPABILITY IMAP4rev1 sasl-ir] hi\r\n") == [b"IMAP4REV1",
                                                                            b"SASL-IR"]
    assert capabilities(b"* CAPABILITY A B\r\nt OK\r\n") == [b"A", b"B"]
    assert capabilities(b"* OK hi\r\n") is None


NAME = b"mx.example.test"


def smtp_login(conf, method="plain", backend_method=None, helo=b"EHLO client", **directives):
    conv = started(conf("smtp", smtp_auth="plain xoauth2 oauthbearer", proxy_smtp_auth="on",
                        xclient="off",
                        **directives))
    if helo:
        conv.receive(helo + b"\r\n")
    if method == "plain":
        conv.receive(b"AUTH PLAIN " + b64(b"\0alice\0pw") + b"\r\n")
    else:
        conv.receive(b"AUTH %s %s\r\n" % (method.upper().encode(), bearer(b"alice")))
        conv.method = method
    conv.backend_method = backend_method
    return conv.backend_login(b"alice*master" if backend_method else b"alice",
                              b"pw" if method == "plain" or backend_method else TOKEN,
                              PEER, False)


def to_auth(login, ehlo: bytes) -> list:
    assert login.receive(b"220 backend\r\n")[0].data == b"EHLO " + NAME + b"\r\n"
    return login.receive(ehlo)


def step(data, action):
    return ToBackend(data, action, discard=True)


def test_smtp_backend_mechanism_choice(conf):
    login = smtp_login(conf)
    assert to_auth(login, b"250-b\r\n250 AUTH LOGIN PLAIN\r\n") == [
        step(b"AUTH PLAIN " + b64(b"\0alice\0pw") + b"\r\n", "sending AUTH to upstream")]
    # Exchange: LOGIN only
    login = smtp_login(conf)
    assert to_auth(login, b"250-b\r\n250-AUTH GSSAPI NTLM LOGIN\r\n250 8BITMIME\r\n") == [
        step(b"AUTH LOGIN\r\n", "sending AUTH to upstream")]
    assert login.receive(b"334 VXNlcm5hbWU6\r\n") == [
        step(b64(b"alice") + b"\r\n", "sending user name to upstream")]
    assert login.receive(b"334 UGFzc3dvcmQ6\r\n") == [
        step(b64(b"pw") + b"\r\n", "sending password to upstream")]
    assert login.receive(b"235 2.7.0 ok\r\n") == [LoggedIn(b"235 2.0.0 OK\r\n")]
    for state_reply in (b"535 no\r\n",):
        login = smtp_login(conf)
        to_auth(login, b"250-b\r\n250 AUTH=LOGIN\r\n")
        with pytest.raises(BackendRejected):
            login.receive(state_reply)
        login = smtp_login(conf)
        to_auth(login, b"250-b\r\n250 AUTH=LOGIN\r\n")
        login.receive(b"334 VXNlcm5hbWU6\r\n")
        with pytest.raises(BackendRejected):
            login.receive(state_reply)
    # HELO to the backend: no AUTH line to read, AUTH PLAIN as nginx
    login = smtp_login(conf, helo=b"HELO client")
    assert login.receive(b"220 b\r\n")[0].data == b"HELO " + NAME + b"\r\n"
    assert login.receive(b"250 b\r\n")[0].data.startswith(b"AUTH PLAIN ")


def test_smtp_backend_none_fits(conf):
    login = smtp_login(conf)
    with pytest.raises(LoginError) as e:
        to_auth(login, b"250-b\r\n250 AUTH GSSAPI XOAUTH2\r\n")
    assert str(e.value) == ('upstream offers no usable AUTH mechanism for a password login '
                            '(PLAIN or LOGIN needed), it offers "GSSAPI XOAUTH2"')
    assert e.value.action == "sending AUTH to upstream"
    login = smtp_login(conf, method="xoauth2")
    with pytest.raises(LoginError) as e:
        to_auth(login, b"250-b\r\n250 AUTH PLAIN\r\n")
    assert str(e.value) == ('upstream offers no usable AUTH mechanism for a token login '
                            '(XOAUTH2 or OAUTHBEARER needed), it offers "PLAIN"')


def test_smtp_backend_token(conf):
    login = smtp_login(conf, method="xoauth2")
    assert to_auth(login, b"250-b\r\n250 AUTH PLAIN XOAUTH2 OAUTHBEARER\r\n") == [
        step(b"AUTH XOAUTH2 " + oauth.encode_xoauth2(b"alice", TOKEN) + b"\r\n",
             "sending AUTH to upstream")]
    assert login.receive(b"235 ok\r\n") == [LoggedIn(b"235 2.0.0 OK\r\n")]
    # the other token mechanism when the backend lacks the client's
    login = smtp_login(conf, method="xoauth2")
    assert to_auth(login, b"250-b\r\n250 AUTH OAUTHBEARER\r\n") == [
        step(b"AUTH OAUTHBEARER " + oauth.encode_oauthbearer(b"alice", TOKEN) + b"\r\n",
             "sending AUTH to upstream")]
    assert login.receive(b"334 " + ERROR_B64 + b"\r\n") == [
        step(b"AQ==\r\n", "sending token to upstream")]
    with pytest.raises(BackendRejected) as e:
        login.receive(b"535 5.7.8 expired\r\n")
    assert e.value.refused and e.value.reply == b"535 5.7.8 expired\r\n"
    login = smtp_login(conf, method="oauthbearer")
    to_auth(login, b"250-b\r\n250 AUTH OAUTHBEARER\r\n")
    with pytest.raises(BackendRejected) as e:
        login.receive(b"535 no\r\n")
    assert e.value.refused


def test_smtp_backend_master_user(conf):
    login = smtp_login(conf, method="xoauth2", backend_method="plain")
    assert to_auth(login, b"250-b\r\n250 AUTH PLAIN XOAUTH2\r\n") == [
        step(b"AUTH PLAIN " + b64(b"\0alice*master\0pw") + b"\r\n", "sending AUTH to upstream")]


def test_auth_mechanisms():
    assert auth_mechanisms(b"250-b\r\n250-auth=plain login\r\n250 X\r\n") == [b"PLAIN",
                                                                              b"LOGIN"]
    assert auth_mechanisms(b"250-b\r\n250 8BITMIME\r\n") is None
    assert auth_mechanisms(b"250 b\r\n") is None


# ---- the debug trace masks tokens -----------------------------------------------------------

def test_trace_masks_tokens():
    ir = xoauth2()
    assert trace.client_line("imap", b"a AUTHENTICATE XOAUTH2 " + ir + b"\r\n") == \
        "a AUTHENTICATE XOAUTH2 ***"
    assert trace.client_line("smtp", b"AUTH OAUTHBEARER " + ir + b"\r\n") == \
        "AUTH OAUTHBEARER ***"
    assert trace.client_line("pop3", ir + b"\r\n", sasl=True) == "***"
    assert trace.backend_line(IMAP_IR, "sending token to upstream") == "***"
    assert trace.backend_line(b"a1 AUTHENTICATE XOAUTH2 " + ir + b"\r\n",
                              "sending AUTHENTICATE command to upstream") == \
        "a1 AUTHENTICATE XOAUTH2 ***"
    assert trace.backend_line(b"AUTH XOAUTH2 " + ir + b"\r\n", "sending AUTH to upstream") == \
        "AUTH XOAUTH2 ***"
    assert trace.backend_line(ir + b"\r\n", "sending token to upstream") == "***"
