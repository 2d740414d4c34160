"""SMTP end to end: smtplib / raw clients -> mailproxy -> a scripted SMTP backend that records
every line.  Only what needs a real process is here (real clients, the wire, the resolver, the
relay); every reply, SASL step and backend line of the conversation is in
tests/unit/test_smtp_conversation.py."""

import base64
import hashlib
import hmac
import smtplib
import socket
import time

import pytest

from mailproxy.resolver import T_A, T_AAAA, T_PTR
from tests.support.auth import auth_ok
from tests.support.clients import LineClient
from tests.support.common import CRLF, SMTPLIB_MAIL, SMTPLIB_RCPT, b64, track
from tests.support.mailbackends import SmtpBackend, big_message_chunks, big_message_digest
from tests.support.process import free_port, server_block

NAME = "mx.proxy.test"
INTERNAL = b"451 4.3.2 Internal server error\r\n"


# ------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture
def smtp_backend(backend_factory):
    return backend_factory(SmtpBackend)


@pytest.fixture
def setup(proxy_factory, auth_server, smtp_backend):
    """start(backend=None, auth=True, **directives) -> (proxy, port, auth_server, backend)."""
    class S:
        pass

    def start(backend=None, auth=True, host="127.0.0.1", mail=None, **directives):
        backend = backend or smtp_backend
        port = free_port(host)
        if auth:
            directives.setdefault("auth_http", auth_server.url)
            if auth_server._respond is None and auth_server._route is None:
                auth_server.route_to(backend.port, server=backend.host)
        directives.setdefault("timeout", "3s")
        directives.setdefault("server_name", NAME)
        config = {"servers": {"smtp": server_block("smtp", port, host=host, **directives)}}
        if mail is not None:
            config["mail"] = mail
        s = S()
        s.proxy = proxy_factory(config)
        s.host, s.port, s.auth, s.backend = host, port, auth_server, backend
        return s
    return start


def client(s, **kw):
    return track(smtplib.SMTP(s.host, s.port, local_hostname="client.example", timeout=5, **kw))


def raw(s):
    c = LineClient(s.host, s.port)
    assert c.readline() == b"220 " + NAME.encode() + b" ESMTP ready\r\n"
    return c


def backend_lines(s, n, i=0):
    return [ln.decode("latin-1") for ln in s.backend.wait_session(i).wait_lines(n)]


def send_message(smtp, body=b"Subject: hi\r\n\r\nhello\r\n", frm="a@example.com",
                 to=("c@example.com",)):
    return smtp.sendmail(frm, list(to), body)


# ------------------------------------------------------------------------------------------------
# max_errors: the close, end to end

def test_max_errors(setup):
    s = setup(max_errors=3)
    c = raw(s)
    assert c.cmd("FOO") == b"500 5.5.1 Invalid command\r\n"
    assert c.cmd("VRFY x") == b"500 5.5.1 Invalid command\r\n"     # refused after parsing
    assert c.cmd("AUTH FOO") == b"500 5.5.1 Invalid command\r\n"   # idem
    assert c.cmd("BAR") == b"500 5.5.1 Invalid command\r\n"
    assert c.cmd("BAZ") == b"500 5.5.1 Invalid command\r\n"
    assert c.closed()
    s.proxy.wait_log("client sent too many invalid commands")


# ------------------------------------------------------------------------------------------------
# greeting delay

def test_greeting_delay_talk_first_rejected(setup):
    s = setup(smtp_greeting_delay="500ms")
    c = LineClient(s.host, s.port)
    c.send(b"EHLO early\r\n")
    assert c.readline() == b"503 5.5.0 Improper use of SMTP command pipelining\r\n"
    assert c.closed()
    line = s.proxy.wait_log('client was rejected before greeting: "EHLO early__"')
    assert "while in delay pipelining state" in line


def test_greeting_delay_patient_client(setup):
    s = setup(smtp_greeting_delay="400ms")
    c = LineClient(s.host, s.port)
    t0 = time.monotonic()
    assert c.readline() == b"220 mx.proxy.test ESMTP ready\r\n"
    assert time.monotonic() - t0 >= 0.35
    assert c.cmd("NOOP") == b"250 2.0.0 OK\r\n"


# ------------------------------------------------------------------------------------------------
# authentication mechanisms and the XCLIENT login

def test_auth_plain_xclient(setup):
    s = setup()
    smtp = client(s)
    smtp.ehlo()
    assert smtp.login("alice", "secret") == (235, b"2.0.0 OK")
    send_message(smtp)
    smtp.quit()
    # smtplib writes its verbs in lower case; the DATA body is hashed, not split into lines
    assert backend_lines(s, 7) == ["EHLO mx.proxy.test",
                                   "XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=[UNAVAILABLE]",
                                   "EHLO client.example",
                                   SMTPLIB_MAIL + "<a@example.com>",
                                   SMTPLIB_RCPT + "<c@example.com>", "data",
                                   "quit"]
    body = b"Subject: hi\r\n\r\nhello\r\n"
    assert s.backend.sessions[0].data["messages"] == [(len(body),
                                                       hashlib.sha256(body).hexdigest())]
    req = s.auth.requests[0]
    assert req.header_names()[:9] == ["Host", "Connection", "Auth-Method", "Auth-User",
                                      "Auth-Pass", "Auth-Protocol", "Auth-Login-Attempt",
                                      "Client-IP", "Client-Host"]
    assert req.header("Auth-Method") == "plain"
    assert req.header("Auth-User") == "alice"
    assert req.header("Auth-Pass") == "secret"
    assert req.header("Auth-Protocol") == "smtp"
    assert req.header("Client-IP") == "127.0.0.1"
    assert req.header("Client-Host") == "[UNAVAILABLE]"
    assert req.header("Auth-SMTP-Helo") is None
    s.proxy.wait_log('client logged in, client: 127.0.0.1, server: 127.0.0.1:%d, login: "alice"'
                     % s.port)


# ------------------------------------------------------------------------------------------------
# XCLIENT variants

def test_xclient_extended(setup):
    s = setup(xclient_extended=True)
    c = raw(s)
    cport = c.sock.getsockname()[1]
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == b"235 2.0.0 OK\r\n"
    assert backend_lines(s, 2)[1] == (
        "XCLIENT ADDR=127.0.0.1 PORT=%d LOGIN=alice NAME=[UNAVAILABLE] DESTADDR=127.0.0.1 "
        "DESTPORT=%d" % (cport, s.port))


def _has_ipv6():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as t:
            t.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
def test_xclient_ipv6_client(setup):
    s = setup(host="::1")
    c = raw(s)
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == b"235 2.0.0 OK\r\n"
    assert backend_lines(s, 2)[1] == "XCLIENT ADDR=IPV6:::1 LOGIN=alice NAME=[UNAVAILABLE]"


# ------------------------------------------------------------------------------------------------
# NAME= from the resolver

PTR = "1.0.0.127.in-addr.arpa"


def _login_and_xclient(s):
    c = raw(s)
    c.cmd("HELO client.example")
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == b"235 2.0.0 OK\r\n"
    return backend_lines(s, 2)[1]


def test_name_reverse_and_forward_agree(setup, dns):
    srv = dns({(PTR, T_PTR): [(T_PTR, 60, "client.example.test")],
               ("client.example.test", T_A): [(T_A, 60, "127.0.0.1")],
               ("client.example.test", T_AAAA): []})
    s = setup(resolver="127.0.0.1:%d" % srv.port, resolver_timeout="2s")
    assert _login_and_xclient(s) == "XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=client.example.test"
    assert s.auth.requests[0].header("Client-Host") == "client.example.test"


def test_name_nxdomain(setup, dns):
    srv = dns({(PTR, T_PTR): 3})
    s = setup(resolver="127.0.0.1:%d" % srv.port)
    assert _login_and_xclient(s).endswith(" NAME=[UNAVAILABLE]")
    line = s.proxy.wait_log("127.0.0.1 could not be resolved (3: Host not found)")
    assert "[error]" in line and "while in resolving client address" in line


def test_name_timeout(setup, dns):
    srv = dns({}, default="drop")
    s = setup(resolver="127.0.0.1:%d" % srv.port, resolver_timeout="500ms")
    t0 = time.monotonic()
    c = LineClient(s.host, s.port)
    assert c.readline() == b"220 mx.proxy.test ESMTP ready\r\n"
    assert 0.4 <= time.monotonic() - t0 < 2.5
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == b"235 2.0.0 OK\r\n"
    assert backend_lines(s, 2)[1].endswith(" NAME=[TEMPUNAVAIL]")
    s.proxy.wait_log("127.0.0.1 could not be resolved (110: Operation timed out)")


# ------------------------------------------------------------------------------------------------
# proxy_smtp_auth

def test_proxy_smtp_auth_uses_auth_pass(setup):
    s = setup(proxy_smtp_auth=True, xclient=False, smtp_auth="plain cram-md5")
    s.auth.set_respond(lambda req: auth_ok(s.backend.port, user="real", password="pw2"))
    smtp = client(s)
    smtp.ehlo()
    assert smtp.login("alice", "secret") == (235, b"2.0.0 OK")       # CRAM-MD5
    assert backend_lines(s, 2)[1] == "AUTH PLAIN " + base64.b64encode(b"\0real\0pw2").decode()


def test_proxy_smtp_auth_no_password(setup):
    s = setup(proxy_smtp_auth=True, smtp_auth="plain cram-md5")
    c = raw(s)
    reply = c.cmd("AUTH CRAM-MD5")
    assert reply.startswith(b"334 ")
    salt = base64.b64decode(reply[4:].strip())
    digest = hmac.new(b"pw", salt, "md5").hexdigest()
    assert c.cmd(b64("alice " + digest)) == INTERNAL
    assert c.closed()
    line = s.proxy.wait_log("no password available")
    assert "[error]" in line and "while sending AUTH to upstream" in line


# ------------------------------------------------------------------------------------------------
# smtp_auth none

def test_none_mode_several_rcpts(setup):
    s = setup(smtp_auth="none")
    smtp = client(s)
    smtp.ehlo()
    refused = smtp.sendmail("a@example.com", ["c@example.com", "d@example.com", "e@example.com"],
                            b"Subject: x\r\n\r\nbody\r\n")
    assert refused == {}
    smtp.quit()
    # MAIL and the first RCPT are replayed verbatim (smtplib's lower-case verbs included)
    assert backend_lines(s, 9) == ["EHLO mx.proxy.test",
                                   "XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]",
                                   "EHLO client.example", SMTPLIB_MAIL + "<a@example.com>",
                                   SMTPLIB_RCPT + "<c@example.com>",
                                   SMTPLIB_RCPT + "<d@example.com>",
                                   SMTPLIB_RCPT + "<e@example.com>", "data", "quit"]
    req = s.auth.requests[0]
    assert len(s.auth.requests) == 1
    assert req.header("Auth-Method") == "none"
    assert req.header("Auth-User") == "" and req.header("Auth-Pass") == ""
    assert req.header("Auth-SMTP-Helo") == "client.example"
    assert req.header("Auth-SMTP-From") == SMTPLIB_MAIL + "<a@example.com>"
    assert req.header("Auth-SMTP-To") == SMTPLIB_RCPT + "<c@example.com>"
    assert req.header("Client-Host") == "[UNAVAILABLE]"
    assert s.backend.sessions[0].data["messages"][0][0] == len(b"Subject: x\r\n\r\nbody\r\n")


# ------------------------------------------------------------------------------------------------
# pipelining

def test_pipelined_commands(setup):
    s = setup(smtp_capabilities="PIPELINING")
    c = raw(s)
    c.send(b"EHLO c.example\r\nNOOP\r\nAUTH PLAIN " + b64("\0alice\0pw").encode()
           + b"\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    assert c.readline() == b"250-mx.proxy.test\r\n"
    assert c.readline() == b"250-PIPELINING\r\n"
    assert c.readline() == b"250 AUTH PLAIN LOGIN\r\n"
    assert c.readline() == b"250 2.0.0 OK\r\n"
    assert c.readline() == b"235 2.0.0 OK\r\n"
    assert c.readline() == b"250 2.1.0 Ok\r\n"
    assert c.readline() == b"250 2.1.5 Ok\r\n"
    assert backend_lines(s, 5) == ["EHLO mx.proxy.test",
                                   "XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=[UNAVAILABLE]",
                                   "EHLO c.example", "MAIL FROM:<a@b>", "RCPT TO:<c@d>"]


def test_pipelined_none_mode(setup):
    s = setup(smtp_auth="none")
    c = raw(s)
    c.send(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n")
    got = [c.readline() for _ in range(5)]
    assert got == [b"250 mx.proxy.test\r\n", b"250 2.0.0 OK\r\n", b"250 2.1.5 Ok\r\n",
                   b"250 2.1.5 Ok\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"]
    assert backend_lines(s, 7)[3:] == ["MAIL FROM:<a@b>", "RCPT TO:<c@d>", "RCPT TO:<e@f>",
                                       "DATA"]


# ------------------------------------------------------------------------------------------------
# the relay: a big message

def test_50mb_data_relayed_intact(setup):
    size = 50 * 1024 * 1024
    s = setup()
    smtp = client(s)
    smtp.ehlo()
    smtp.login("alice", "secret")
    smtp.mail("a@example.com")
    smtp.rcpt("c@example.com")
    code, _ = smtp.docmd("DATA")
    assert code == 354
    for chunk in big_message_chunks(size):
        smtp.sock.sendall(chunk)
    smtp.sock.sendall(b".\r\n")
    code, msg = smtp.getreply()
    assert (code, msg) == (250, b"2.0.0 Ok: queued as ABC123")
    smtp.quit()
    size_got, digest = s.backend.sessions[0].data["messages"][0]
    assert size_got == size
    assert digest == big_message_digest(size)


# ------------------------------------------------------------------------------------------------
# backend refusals

def test_backend_refusal_passed_on(setup, backend_factory):
    reply = "550 5.7.0 Error: insufficient authorization"
    be = backend_factory(SmtpBackend, replies={b"XCLIENT": reply})
    s = setup(backend=be, proxy_pass_error_message=True)
    c = raw(s)
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == reply.encode() + CRLF
    assert c.closed()
    # backend text is escaped like client text (it may echo it): "name: " becomes "name\x3a "
    line = s.proxy.wait_log('upstream sent invalid response: "%s"'
                            % reply.replace(": ", "\\x3a "))
    assert "[info]" in line and "while reading response from upstream" in line

