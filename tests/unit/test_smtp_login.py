"""SMTP's backend login without sockets: SmtpLogin (ngx_mail_proxy_smtp_handler) fed backend
replies after an SmtpConversation took the client's credentials, and whole sessions as Python's
smtplib plays them against the conversation; the action lists compared exactly."""

import hmac
import re
import smtplib

import pytest

from mailproxy import resolver, smtp
from mailproxy.auth_http import AuthResult
from mailproxy.clientio import BackendRejected, LineReader, LineTooLong
from mailproxy.conversation import (CLOSE, Authenticate, BackendStartTLS, LoggedIn, LoginError,
                                    Log, Peer, Reply, StartTLSRefused, ToBackend)
from mailproxy.smtp import SmtpConversation, SmtpLogin
from playbook import (SMTP_ARGUMENT as ARGUMENT, SMTP_AUTH_OK as AUTH_OK,
                      SMTP_BAD_SEQUENCE as BAD_SEQUENCE, SMTP_INVALID as INVALID,
                      SMTP_OK as OK, SMTP_PASSWORD as PASSWORD, SMTP_USERNAME as USERNAME)
from playbook import (DIGEST as CRAM_DIGEST, b64, closing, line, only, play, reply,
                      smtp_sasl_error as bad)

NAME = b"mx.example.test"
HELO_ACTION = "sending HELO/EHLO to upstream"
XCLIENT_ACTION = "sending XCLIENT to upstream"
CLIENT_HELO_ACTION = "sending client HELO/EHLO to upstream"
AUTH_ACTION = "sending AUTH to upstream"
PEER = Peer("192.0.2.7", 40000, ("127.0.0.1", 25))


# ---- the backend login ---------------------------------------------------------------------

def plain_conv(make_conv, helo=b"EHLO client.example", user=b"alice", passwd=b"secret",
               **overrides):
    conv = make_conv(**overrides)
    if helo:
        conv.receive(line(helo))
    conv.receive(b"AUTH PLAIN " + line(b64(b"\0" + user + b"\0" + passwd)))
    return conv


def step(data, action):
    return ToBackend(data, action, discard=True)


def test_login_xclient_with_client_ehlo(make_conv):
    conv = plain_conv(make_conv)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    assert isinstance(login, SmtpLogin)
    assert login.state == "greeting" and login.complete is smtp.reply_complete
    assert login.receive(b"220 backend ESMTP\r\n") == [
        step(b"EHLO mx.example.test\r\n", HELO_ACTION)]
    assert login.complete is smtp.reply_complete
    assert login.receive(b"250-backend\r\n250 XCLIENT ADDR LOGIN NAME\r\n") == [
        step(b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=[UNAVAILABLE]\r\n", XCLIENT_ACTION)]
    assert login.complete is smtp.reply_complete
    assert login.receive(b"220 backend ESMTP\r\n") == [
        step(b"EHLO client.example\r\n", CLIENT_HELO_ACTION)]
    assert login.complete is smtp.reply_complete
    assert login.receive(b"250-backend\r\n250 8BITMIME\r\n") == [LoggedIn(AUTH_OK)]


def test_login_xclient_with_client_helo(make_conv):
    conv = plain_conv(make_conv, helo=b"HELO client.example")
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    # EHLO towards an XCLIENT backend even after the client's HELO; the client's is HELO
    assert login.receive(b"220 b\r\n") == [step(b"EHLO mx.example.test\r\n", HELO_ACTION)]
    login.receive(b"250 b\r\n")
    assert login.receive(b"250 ok\r\n") == [
        step(b"HELO client.example\r\n", CLIENT_HELO_ACTION)]
    assert login.receive(b"250 b\r\n") == [LoggedIn(AUTH_OK)]


def test_login_xclient_without_client_greeting(make_conv):
    conv = plain_conv(make_conv, helo=None)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    assert login.receive(b"220 b\r\n") == [step(b"EHLO mx.example.test\r\n", HELO_ACTION)]
    login.receive(b"250 b\r\n")
    assert login.receive(b"250 ok\r\n") == [LoggedIn(AUTH_OK)]


@pytest.mark.parametrize("helo, verb", [(b"HELO c", b"HELO"), (b"EHLO c", b"EHLO"),
                                        (None, b"HELO")])
def test_login_without_xclient(make_conv, helo, verb):
    conv = plain_conv(make_conv, helo=helo, xclient=False)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    assert login.receive(b"220 b\r\n") == [step(verb + b" mx.example.test\r\n", HELO_ACTION)]
    assert login.receive(b"250 b\r\n") == [LoggedIn(AUTH_OK)]


def test_xclient_line_contents(conf):
    conf = conf("smtp", xclient_extended=True)
    conv = SmtpConversation(conf)
    conv.host = "client.example"
    conv.method = "plain"
    cases = [
        (Peer("192.0.2.7", 40000, ("127.0.0.1", 25)), b"alice",
         b"XCLIENT ADDR=192.0.2.7 PORT=40000 LOGIN=alice NAME=client.example "
         b"DESTADDR=127.0.0.1 DESTPORT=25\r\n"),
        (Peer("2001:db8::7", 40000, ("::1", 587), ("2001:db8::1", 25)), b"al ice+x=y",
         b"XCLIENT ADDR=IPV6:2001:db8::7 PORT=40000 LOGIN=al+20ice+2Bx+3Dy "
         b"NAME=client.example DESTADDR=IPV6:::1 DESTPORT=587\r\n"),
        (Peer("192.0.2.7", None, None), "us\u00e9r+x=y".encode(),
         b"XCLIENT ADDR=192.0.2.7 LOGIN=us+C3+A9r+2Bx+3Dy NAME=client.example\r\n"),
        (Peer("192.0.2.7", None, None), b"alice",
         b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=client.example\r\n"),
        (Peer("192.0.2.7", 40000, ("127.0.0.1", 25)), None,
         b"XCLIENT ADDR=192.0.2.7 PORT=40000 NAME=client.example "
         b"DESTADDR=127.0.0.1 DESTPORT=25\r\n"),
        (Peer("192.0.2.7", 40000, ("127.0.0.1", 25)), b"",
         b"XCLIENT ADDR=192.0.2.7 PORT=40000 NAME=client.example "
         b"DESTADDR=127.0.0.1 DESTPORT=25\r\n"),
    ]
    for peer, user, expected in cases:
        login = conv.backend_login(user, b"pw", peer, False)
        login.receive(b"220 b\r\n")
        assert login.receive(b"250 b\r\n") == [step(expected, XCLIENT_ACTION)]


def test_xclient_line_not_extended(make_conv):
    conv = make_conv()
    conv.host = resolver.TEMPUNAVAIL
    conv.receive(b"AUTH PLAIN " + line(b64(b"\0alice\0pw")))
    login = conv.backend_login(b"alice", b"pw", Peer("2001:db8::7", 40000, ("::1", 25)), False)
    login.receive(b"220 b\r\n")
    assert login.receive(b"250 b\r\n") == [
        step(b"XCLIENT ADDR=IPV6:2001:db8::7 LOGIN=alice NAME=[TEMPUNAVAIL]\r\n",
             XCLIENT_ACTION)]


def test_xclient_no_login_with_proxy_smtp_auth(make_conv):
    conv = plain_conv(make_conv, helo=None, proxy_smtp_auth=True)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    login.receive(b"220 b\r\n")
    assert login.receive(b"250 b\r\n") == [
        step(b"XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE]\r\n", XCLIENT_ACTION)]
    assert login.receive(b"220 b\r\n") == [
        step(b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n", AUTH_ACTION)]
    assert login.complete is smtp.reply_complete
    assert login.receive(b"235 2.7.0 Authentication successful\r\n") == [LoggedIn(AUTH_OK)]


def test_proxy_smtp_auth_with_client_helo_and_without_xclient(make_conv):
    conv = plain_conv(make_conv, helo=b"HELO c", proxy_smtp_auth=True, xclient=False)
    login = conv.backend_login(b"bob", b"fromauth", PEER, False)   # Auth-User, Auth-Pass
    assert login.receive(b"220 b\r\n") == [step(b"HELO mx.example.test\r\n", HELO_ACTION)]
    assert login.receive(b"250 b\r\n") == [
        step(b"AUTH PLAIN " + b64(b"\0bob\0fromauth") + b"\r\n", AUTH_ACTION)]
    with pytest.raises(BackendRejected) as e:
        login.receive(b"535 5.7.8 Error: authentication failed\r\n")
    assert e.value.reply == b"535 5.7.8 Error: authentication failed\r\n"


def cram_conv(make_conv, **overrides):
    conv = make_conv(smtp_auth=["cram-md5", "external"], **overrides)
    conv.receive(b"AUTH CRAM-MD5\r\n")
    conv.receive(line(b64(b"alice " + CRAM_DIGEST)))
    return conv


@pytest.mark.parametrize("xclient, reply", [(True, b"220 ok\r\n"), (False, b"250 b\r\n")])
def test_cram_md5_without_auth_pass_has_no_password(make_conv, xclient, reply):
    conv = cram_conv(make_conv, proxy_smtp_auth=True, xclient=xclient)
    login = conv.backend_login(b"alice", conv.passwd, PEER, False)     # the client's digest
    login.receive(b"220 b\r\n")
    if xclient:
        login.receive(b"250 b\r\n")
    with pytest.raises(LoginError) as e:
        login.receive(reply)
    assert str(e.value) == "no password available"
    assert e.value.action == "sending AUTH to upstream"


def test_cram_md5_with_auth_pass(make_conv):
    conv = cram_conv(make_conv, proxy_smtp_auth=True, xclient=False)
    login = conv.backend_login(b"alice", b"plainpw", PEER, False)
    login.receive(b"220 b\r\n")
    assert login.receive(b"250 b\r\n") == [
        step(b"AUTH PLAIN " + b64(b"\0alice\0plainpw") + b"\r\n", AUTH_ACTION)]


def test_cram_md5_without_proxy_smtp_auth_needs_no_password(make_conv):
    conv = cram_conv(make_conv, xclient=False)
    login = conv.backend_login(b"alice", conv.passwd, PEER, False)
    login.receive(b"220 b\r\n")
    assert login.receive(b"250 b\r\n") == [LoggedIn(AUTH_OK)]


def test_external_without_auth_pass(make_conv):
    conv = make_conv(smtp_auth=["external"], proxy_smtp_auth=True, xclient=False)
    conv.receive(b"AUTH EXTERNAL " + line(b64(b"alice")))
    login = conv.backend_login(b"alice", None, PEER, False)
    login.receive(b"220 b\r\n")
    with pytest.raises(LoginError) as e:
        login.receive(b"250 b\r\n")
    assert (str(e.value), e.value.action) == ("no password available", AUTH_ACTION)
    login = conv.backend_login(b"alice", b"fromauth", PEER, False)
    login.receive(b"220 b\r\n")
    assert login.receive(b"250 b\r\n") == [
        step(b"AUTH PLAIN " + b64(b"\0alice\0fromauth") + b"\r\n", AUTH_ACTION)]


def none_conv(make_conv, **overrides):
    conv = make_conv(smtp_auth=["none"], **overrides)
    conv.receive(b"EHLO client.example\r\n")
    conv.receive(b"MAIL FROM:<a@b> SIZE=100\r\n")
    conv.receive(b"RCPT TO:<c@d>\r\n")
    return conv


@pytest.mark.parametrize("rcpt_reply", [b"250 2.1.5 Ok\r\n", b"550 5.1.1 <c@d>: unknown\r\n",
                                        b"451-4.3.0 try\r\n451 4.3.0 later\r\n"])
def test_none_mode_replays_envelope(make_conv, rcpt_reply):
    conv = none_conv(make_conv, proxy_smtp_auth=True)      # no AUTH in none mode
    login = conv.backend_login(None, None, PEER, False)
    login.receive(b"220 b\r\n")
    assert login.receive(b"250 b\r\n") == [
        step(b"XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE]\r\n", XCLIENT_ACTION)]
    assert login.receive(b"220 b\r\n") == [
        step(b"EHLO client.example\r\n", CLIENT_HELO_ACTION)]
    assert login.receive(b"250 b\r\n") == [
        step(b"MAIL FROM:<a@b> SIZE=100\r\n", "sending MAIL FROM to upstream")]
    assert login.complete is smtp.reply_complete
    assert login.receive(b"250 2.1.0 Ok\r\n") == [
        step(b"RCPT TO:<c@d>\r\n", "sending RCPT TO to upstream")]
    assert login.complete is smtp.reply_complete
    assert login.receive(rcpt_reply) == [LoggedIn(rcpt_reply)]


def test_none_mode_without_xclient(make_conv):
    conv = none_conv(make_conv, xclient=False)
    login = conv.backend_login(None, None, PEER, False)
    assert login.receive(b"220 b\r\n") == [step(b"EHLO mx.example.test\r\n", HELO_ACTION)]
    assert login.receive(b"250 b\r\n") == [
        step(b"MAIL FROM:<a@b> SIZE=100\r\n", "sending MAIL FROM to upstream")]
    with pytest.raises(BackendRejected) as e:
        login.receive(b"452 4.3.1 full\r\n")
    assert e.value.reply == b"452 4.3.1 full\r\n"


@pytest.mark.parametrize("replies", [
    [b"554 5.3.2 go away\r\n"],                                   # greeting
    [b"220 b\r\n", b"502 5.5.2 no EHLO\r\n"],                       # EHLO
    [b"220 b\r\n", b"250 b\r\n", b"550 5.7.1 no XCLIENT\r\n"],     # XCLIENT
    [b"220 b\r\n", b"250 b\r\n", b"250 b\r\n", b"501 5.5.4 bad\r\n"],  # client EHLO
    [b"220 b\r\n", b"250 b\r\n", b"250 b\r\n", b"250 b\r\n",
     b"535 5.7.8 fail\r\n"],                                      # AUTH
])
def test_each_rejection(make_conv, replies):
    conv = plain_conv(make_conv, proxy_smtp_auth=True)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    for reply in replies[:-1]:
        assert login.receive(reply)
    with pytest.raises(BackendRejected) as e:
        login.receive(replies[-1])
    assert e.value.reply == e.value.text == replies[-1]


def test_helo_rejection_without_xclient(make_conv):
    conv = plain_conv(make_conv, xclient=False)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    login.receive(b"220 b\r\n")
    with pytest.raises(BackendRejected):
        login.receive(b"421 4.3.2 shutting down\r\n")


@pytest.mark.parametrize("helo, verb", [(b"EHLO c", b"EHLO"), (b"HELO c", b"HELO")])
def test_backend_starttls(make_conv, helo, verb):
    conv = plain_conv(make_conv, helo=helo, xclient=False)
    login = conv.backend_login(b"alice", b"secret", PEER, True)
    assert login.receive(b"220 b\r\n") == [step(b"EHLO mx.example.test\r\n", HELO_ACTION)]
    assert login.complete is smtp.reply_complete
    assert login.receive(b"250-b\r\n250 STARTTLS\r\n") == [
        step(b"STARTTLS\r\n", "sending STARTTLS to upstream")]
    assert login.complete is smtp.reply_complete
    assert login.receive(b"220 2.0.0 Ready to start TLS\r\n") == [
        BackendStartTLS(), step(verb + b" mx.example.test\r\n", HELO_ACTION)]
    assert login.receive(b"250 b\r\n") == [LoggedIn(AUTH_OK)]


def test_backend_starttls_then_xclient(make_conv):
    conv = plain_conv(make_conv, helo=b"HELO c")
    login = conv.backend_login(b"alice", b"secret", PEER, True)
    login.receive(b"220 b\r\n")
    login.receive(b"250 b\r\n")
    assert login.receive(b"220 go\r\n") == [BackendStartTLS(),
                                            step(b"EHLO mx.example.test\r\n", HELO_ACTION)]
    assert login.receive(b"250 b\r\n") == [
        step(b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=[UNAVAILABLE]\r\n", XCLIENT_ACTION)]


def test_backend_starttls_refused(make_conv):
    conv = plain_conv(make_conv)
    login = conv.backend_login(b"alice", b"secret", PEER, True)
    login.receive(b"220 b\r\n")
    login.receive(b"250 b\r\n")
    with pytest.raises(StartTLSRefused) as e:
        login.receive(b"454 4.7.0 TLS not available\r\n")
    assert e.value.reply == b"454 4.7.0 TLS not available\r\n"


@pytest.mark.parametrize("replies", [[b"421 busy\r\n"], [b"220 b\r\n", b"500 what\r\n"]])
def test_backend_starttls_rejections(make_conv, replies):
    conv = plain_conv(make_conv)
    login = conv.backend_login(b"alice", b"secret", PEER, True)
    for reply in replies[:-1]:
        login.receive(reply)
    with pytest.raises(BackendRejected) as e:
        login.receive(replies[-1])
    assert e.value.reply == replies[-1]


# ---- whole sessions, as a client plays them ------------------------------------------------

class Chunks:
    """Not a socket: `recv` hands out `data` at most `size` bytes at a time, then b""."""

    def __init__(self, data):
        self.data = data

    def recv(self, size):
        chunk, self.data = self.data[:size], self.data[size:]
        return chunk


class ReplyFile:
    """What smtplib reads its replies from (`SMTP.file`): the lines queued so far."""

    def __init__(self):
        self.lines = []

    def readline(self, limit=-1):
        return self.lines.pop(0) if self.lines else b""

    def close(self):
        pass


class SmtplibClient(smtplib.SMTP):
    """smtplib's own client logic (EHLO parsing, mechanism choice, SASL responses) talking to
    a conversation: what it sends goes to `conv.receive` line by line, the Reply actions come
    back through `file`; an Authenticate is answered as the login would be (`logged_in`)."""

    def __init__(self, conv, logged_in=AUTH_OK):
        super().__init__(local_hostname="client.example")     # no host: no connection
        self.conv, self.logged_in = conv, logged_in
        self.file = ReplyFile()
        self.sent, self.actions = [], []

    def send(self, s):
        data = s.encode("ascii") if isinstance(s, str) else s
        for text in data.splitlines(keepends=True):
            self.sent.append(text)
            acts = self.conv.receive(text)
            self.actions += acts
            for a in acts:
                if type(a) is Reply:
                    self.file.lines += a.data.splitlines(keepends=True)
                elif type(a) is Authenticate:
                    self.file.lines.append(self.logged_in)

    def authenticated(self):
        return only(self.actions, Authenticate)


def backend_lines(login, replies):
    """Feed `replies` to a backend login: the lines it sends, and its last actions."""
    sent, acts = [], []
    for reply in replies:
        acts = login.receive(reply)
        sent += [a.data for a in acts if type(a) is ToBackend]
    return sent, acts


def test_smtplib_login_plain(make_conv):
    client = SmtplibClient(make_conv())
    assert client.ehlo() == (250, b"mx.example.test\nAUTH PLAIN LOGIN")
    assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
    assert client.login("alice", "secret") == (235, b"2.0.0 OK")
    assert client.authenticated() == [Authenticate("plain", b"alice", b"secret")]
    assert client.conv.auth_request_fields() == {"client_host": resolver.UNAVAILABLE}
    login = client.conv.backend_login(b"alice", b"secret", PEER, False)
    assert backend_lines(login, [b"220 b\r\n", b"250 b\r\n", b"220 b\r\n", b"250 b\r\n"]) == (
        [b"EHLO mx.example.test\r\n",
         b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=[UNAVAILABLE]\r\n",
         b"EHLO client.example\r\n"], [LoggedIn(AUTH_OK)])


def test_smtplib_auth_login_initial_response(make_conv):
    client = SmtplibClient(make_conv())
    client.ehlo()
    client.user, client.password = "alice", "secret"
    assert client.auth("LOGIN", client.auth_login, initial_response_ok=True) == (235, b"2.0.0 OK")
    assert client.sent[-2:] == [b"AUTH LOGIN " + line(b64(b"alice")), line(b64(b"secret"))]
    assert client.authenticated() == [Authenticate("plain", b"alice", b"secret")]


def test_smtplib_prefers_cram_md5(make_conv):
    client = SmtplibClient(make_conv(smtp_auth="plain login cram-md5"))
    client.ehlo()
    assert "CRAM-MD5" in client.esmtp_features["auth"]
    assert client.login("alice", "secret") == (235, b"2.0.0 OK")
    salt = client.conv.salt
    assert re.fullmatch(rb"<\d+\.\d+@mx\.example\.test>", salt)
    digest = hmac.new(b"secret", salt, "md5").hexdigest().encode()
    assert client.authenticated() == [Authenticate("cram-md5", b"alice", digest)]


def test_smtplib_proxy_smtp_auth_with_xclient(make_conv):
    client = SmtplibClient(make_conv(proxy_smtp_auth="on"))
    client.ehlo()
    assert client.login("alice", "secret") == (235, b"2.0.0 OK")
    login = client.conv.backend_login(b"alice", b"secret", PEER, False)
    assert backend_lines(login, [b"220 b\r\n", b"250 b\r\n", b"220 b\r\n", b"250 b\r\n",
                                 b"235 2.7.0 ok\r\n"]) == (
        [b"EHLO mx.example.test\r\n", b"XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE]\r\n",
         b"EHLO client.example\r\n", b"AUTH PLAIN " + line(b64(b"\0alice\0secret"))],
        [LoggedIn(AUTH_OK)])


def test_smtplib_xclient_off(make_conv):
    client = SmtplibClient(make_conv(xclient="off"))
    client.ehlo()
    client.login("alice", "secret")
    login = client.conv.backend_login(b"alice", b"secret", PEER, False)
    assert backend_lines(login, [b"220 b\r\n", b"250 b\r\n"]) == (
        [b"EHLO mx.example.test\r\n"], [LoggedIn(AUTH_OK)])


def test_smtplib_none_mode(make_conv):
    client = SmtplibClient(make_conv(smtp_auth="none"), logged_in=b"250 2.1.5 Ok\r\n")
    assert client.ehlo() == (250, b"mx.example.test")
    assert client.mail("a@example.com") == (250, b"2.0.0 OK")
    assert client.rcpt("c@example.com") == (250, b"2.1.5 Ok")
    mail, rcpt = (text.rstrip(b"\r\n") for text in client.sent[-2:])
    assert client.authenticated() == [Authenticate("none", None, None)]
    assert client.conv.auth_request_fields() == {
        "client_host": resolver.UNAVAILABLE, "smtp_helo": b"client.example",
        "smtp_from": mail, "smtp_to": rcpt}
    assert mail.endswith(b"<a@example.com>") and rcpt.endswith(b"<c@example.com>")
    login = client.conv.backend_login(None, None, PEER, False)
    assert backend_lines(login, [b"220 b\r\n", b"250 b\r\n", b"220 b\r\n", b"250 b\r\n",
                                 b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n"]) == (
        [b"EHLO mx.example.test\r\n", b"XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE]\r\n",
         b"EHLO client.example\r\n", line(mail), line(rcpt)],
        [LoggedIn(b"250 2.1.5 Ok\r\n")])


def test_simple_commands_and_refusals(make_conv):
    conv = make_conv()
    play(conv, [
        (b"HELO client.example\r\n", reply(b"250 mx.example.test\r\n")),
        (b"EHLO client.example\r\n", reply(b"250-mx.example.test\r\n250 AUTH PLAIN LOGIN\r\n")),
        (b"NOOP\r\n", reply(OK)),
        (b"RSET\r\n", reply(OK)),
        (b"HELO\r\n", reply(ARGUMENT)),
        (b"EHLO a b\r\n", reply(ARGUMENT)),
        (b"AUTH\r\n", reply(ARGUMENT)),
        (b"RCPT TO:<a@b>\r\n", reply(BAD_SEQUENCE)),
    ] + [(line(verb), reply(INVALID)) for verb in (
        b"VRFY x", b"EXPN x", b"HELP", b"STARTTLS", b"DATA", b"XCLIENT ADDR=1.2.3.4")] + [
        (b"QUIT\r\n", closing(b"221 2.0.0 Bye\r\n")),
    ])


def test_rejected_mail_then_pipelined_commands(make_conv):
    conv = make_conv()
    play(conv, [
        (b"MAIL FROM:<a@b>\r\n", [Log("info", 'client was rejected: "MAIL FROM:<a@b>__"'),
                                  Reply(b"530 5.7.1 Authentication required\r\n")]),
        (b"NOOP\r\n", reply(OK)),
        (b"QUIT\r\n", closing(b"221 2.0.0 Bye\r\n")),
    ])


def test_too_long_for_smtp_client_buffer(conf):
    conv = SmtpConversation(conf("smtp", smtp_client_buffer="64"))
    assert conv.buffer_size() == 64
    reader = LineReader(Chunks(b"HELO " + b"x" * 100 + b"\r\n"), conv.buffer_size(), None)
    with pytest.raises(LineTooLong) as e:
        reader.readline()
    assert conv.too_long(e.value.data) == [
        Log("info", 'client sent too long command "HELO %s"' % ("x" * 59)), Reply(INVALID),
        CLOSE]


def test_sasl_errors_are_not_counted(make_conv):
    conv = make_conv(max_errors="2")
    play(conv, [
        (b"AUTH PLAIN\r\n", reply(b"334 \r\n")),
        (b"*\r\n", bad("client sent invalid base64 encoding in AUTH PLAIN command")),
        (b"AUTH PLAIN " + line(b64(b"nonul")),
         bad("client sent invalid login in AUTH PLAIN command")),
        (b"AUTH LOGIN a b\r\n", reply(INVALID)),
        (b"AUTH PLAIN %%%\r\n", bad("client sent invalid base64 encoding in AUTH PLAIN command")),
        (b"NOOP\r\n", reply(OK)),
    ])
    assert conv.errors == 0


def test_auth_login_prompts_after_helo_then_backend_login(make_conv):
    conv = make_conv()
    play(conv, [
        (b"HELO client.example\r\n", reply(b"250 mx.example.test\r\n")),
        (b"AUTH LOGIN\r\n", reply(USERNAME)),
        (line(b64(b"alice")), reply(PASSWORD)),
        (line(b64(b"secret")), [Authenticate("plain", b"alice", b"secret")]),
    ])
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    assert backend_lines(login, [b"220 b\r\n", b"250 b\r\n", b"220 b\r\n", b"250 b\r\n"]) == (
        [b"EHLO mx.example.test\r\n",
         b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=[UNAVAILABLE]\r\n",
         b"HELO client.example\r\n"], [LoggedIn(AUTH_OK)])


def test_multiline_backend_greeting(make_conv):
    conv = plain_conv(make_conv, helo=b"EHLO c.example")
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    greeting = b"220-backend.test hello\r\n220 backend.test ESMTP\r\n"
    assert not login.complete(greeting[:24]) and login.complete(greeting)
    assert backend_lines(login, [greeting, b"250-b\r\n250 8BITMIME\r\n", b"220 b\r\n",
                                 b"250 b\r\n"]) == (
        [b"EHLO mx.example.test\r\n",
         b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=[UNAVAILABLE]\r\n",
         b"EHLO c.example\r\n"], [LoggedIn(AUTH_OK)])


def test_proxy_smtp_auth_after_client_ehlo_without_xclient(make_conv):
    conv = plain_conv(make_conv, helo=b"EHLO c", passwd=b"pw", proxy_smtp_auth="on",
                      xclient="off")
    login = conv.backend_login(b"alice", b"pw", PEER, False)
    assert backend_lines(login, [b"220 b\r\n", b"250 b\r\n", b"235 2.7.0 ok\r\n"]) == (
        [b"EHLO mx.example.test\r\n", b"AUTH PLAIN AGFsaWNlAHB3\r\n"], [LoggedIn(AUTH_OK)])


def test_none_mode_spacing_kept_and_rcpt_reply_passed_on(make_conv):
    conv = make_conv(smtp_auth="none", xclient="off")
    play(conv, [
        (b"HELO h\r\n", reply(b"250 mx.example.test\r\n")),
        (b"MAIL FROM:<a@b> SIZE=100\r\n", reply(OK)),
        (b"MAIL FROM:<x@y>\r\n", reply(BAD_SEQUENCE)),
        (b"RCPT TO:<c@d>  NOTIFY=NEVER \r\n", [Authenticate("none", None, None)]),
    ])
    assert conv.auth_request_fields()["smtp_to"] == b"RCPT TO:<c@d>  NOTIFY=NEVER"
    refused = b"550 5.1.1 <c@d>: Recipient unknown\r\n"
    login = conv.backend_login(None, None, PEER, False)
    assert backend_lines(login, [b"220 b\r\n", b"250 b\r\n", b"250 2.1.0 Ok\r\n", refused]) == (
        [b"HELO mx.example.test\r\n", b"MAIL FROM:<a@b> SIZE=100\r\n",
         b"RCPT TO:<c@d>  NOTIFY=NEVER\r\n"], [LoggedIn(refused)])


def test_none_mode_errors_ask_nothing(make_conv):
    conv = make_conv(smtp_auth="none")
    play(conv, [
        (b"RCPT TO:<a@b>\r\n", reply(BAD_SEQUENCE)),
        (b"MAIL\r\n", reply(ARGUMENT)),
        (b"MAIL FROM:<a@b>\r\n", reply(OK)),
        (b"RCPT\r\n", reply(ARGUMENT)),
        (b"RSET\r\n", reply(OK)),
        (b"RCPT TO:<a@b>\r\n", reply(BAD_SEQUENCE)),
    ])


def test_none_mode_auth_wait_then_next_rcpt(make_conv):
    conv = make_conv(smtp_auth="none")
    conv.receive(b"MAIL FROM:<a@b>\r\n")
    assert conv.receive(b"RCPT TO:<bad@x>\r\n") == [Authenticate("none", None, None)]
    res = AuthResult("FAIL", b"Recipient refused", wait=1, error_code="550 5.7.1")
    assert conv.auth_failed(res, retry=True) == reply(b"550 5.7.1 Recipient refused\r\n")
    assert conv.receive(b"RCPT TO:<good@x>\r\n") == [Authenticate("none", None, None)]
    assert conv.auth_request_fields()["smtp_to"] == b"RCPT TO:<good@x>"
    login = conv.backend_login(None, None, PEER, False)
    sent, acts = backend_lines(login, [b"220 b\r\n", b"250 b\r\n", b"220 b\r\n",
                                       b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n"])
    assert sent[2:] == [b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<good@x>\r\n"]
    assert acts == [LoggedIn(b"250 2.1.5 Ok\r\n")]


def test_none_and_plain_together(make_conv):
    conv = make_conv(smtp_auth="plain none")
    assert conv.receive(b"MAIL FROM:<a@b>\r\n") == reply(OK)
    assert conv.receive(b"AUTH PLAIN " + line(b64(b"\0alice\0pw"))) == [
        Authenticate("plain", b"alice", b"pw")]
    assert conv.auth_request_fields() == {"client_host": resolver.UNAVAILABLE}
