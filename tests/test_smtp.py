"""SMTP end to end: smtplib / raw clients -> mailproxy -> a scripted SMTP backend that records
every line."""

import base64
import hashlib
import hmac
import smtplib
import socket
import time

import pytest

from mailproxy.resolver import T_A, T_AAAA, T_PTR
from tests.support.auth import auth_fail, auth_ok
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
# greeting, HELO / EHLO, simple commands

def test_greeting_helo_ehlo(setup):
    s = setup()
    c = raw(s)
    assert c.cmd("HELO client.example") == b"250 mx.proxy.test\r\n"
    c.sendline("EHLO client.example")
    assert c.readline() == b"250-mx.proxy.test\r\n"
    assert c.readline() == b"250 AUTH PLAIN LOGIN\r\n"
    assert c.cmd("NOOP") == b"250 2.0.0 OK\r\n"
    assert c.cmd("RSET") == b"250 2.0.0 OK\r\n"
    assert c.cmd("HELO") == b"501 5.5.4 Invalid argument\r\n"
    assert c.cmd("EHLO a b") == b"501 5.5.4 Invalid argument\r\n"
    assert c.cmd("AUTH") == b"501 5.5.4 Invalid argument\r\n"
    assert c.cmd("RCPT TO:<a@b>") == b"503 5.5.1 Bad sequence of commands\r\n"
    for verb in ("VRFY x", "EXPN x", "HELP", "STARTTLS", "DATA", "XCLIENT ADDR=1.2.3.4"):
        assert c.cmd(verb) == b"500 5.5.1 Invalid command\r\n", verb
    assert c.cmd("QUIT") == b"221 2.0.0 Bye\r\n"
    assert c.closed()


def test_ehlo_composition(setup):
    s = setup(smtp_capabilities='PIPELINING "SIZE 10485760" 8BITMIME',
              smtp_auth="external none cram-md5 login plain")
    c = raw(s)
    c.sendline("EHLO x")
    got = [c.readline() for _ in range(5)]
    assert got == [b"250-mx.proxy.test\r\n", b"250-PIPELINING\r\n", b"250-SIZE 10485760\r\n",
                   b"250-8BITMIME\r\n", b"250 AUTH PLAIN LOGIN CRAM-MD5 EXTERNAL\r\n"]


def test_ehlo_none_only(setup):
    s = setup(smtp_auth="none", smtp_capabilities="PIPELINING")
    c = raw(s)
    c.sendline("EHLO x")
    assert c.readline() == b"250-mx.proxy.test\r\n"
    assert c.readline() == b"250 PIPELINING\r\n"


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


def test_too_long_command(setup):
    s = setup(smtp_client_buffer="64")
    c = raw(s)
    c.send(b"HELO " + b"x" * 100 + b"\r\n")
    assert c.readline() == b"500 5.5.1 Invalid command\r\n"
    assert c.closed()
    s.proxy.wait_log('client sent too long command "HELO xxx')


def test_rejected_mail_keeps_pipelined_commands(setup):
    s = setup()
    c = raw(s)
    c.send(b"MAIL FROM:<a@b>\r\nNOOP\r\nQUIT\r\n")
    assert c.readline() == b"530 5.7.1 Authentication required\r\n"
    assert c.readline() == b"250 2.0.0 OK\r\n"
    assert c.readline() == b"221 2.0.0 Bye\r\n"
    assert c.closed()
    s.proxy.wait_log('client was rejected: "MAIL FROM:<a@b>__"')


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
    assert req.header_names()[:8] == ["Host", "Auth-Method", "Auth-User", "Auth-Pass",
                                      "Auth-Protocol", "Auth-Login-Attempt", "Client-IP",
                                      "Client-Host"]
    assert req.header("Auth-Method") == "plain"
    assert req.header("Auth-User") == "alice"
    assert req.header("Auth-Pass") == "secret"
    assert req.header("Auth-Protocol") == "smtp"
    assert req.header("Client-IP") == "127.0.0.1"
    assert req.header("Client-Host") == "[UNAVAILABLE]"
    assert req.header("Auth-SMTP-Helo") is None
    s.proxy.wait_log('client logged in, client: 127.0.0.1, server: 127.0.0.1:%d, login: "alice"'
                     % s.port)


def test_auth_plain_two_step(setup):
    s = setup()
    c = raw(s)
    assert c.cmd("AUTH PLAIN") == b"334 \r\n"
    assert c.cmd(b64("\0alice\0secret")) == b"235 2.0.0 OK\r\n"
    # no HELO/EHLO from the client: none replayed
    assert backend_lines(s, 2) == ["EHLO mx.proxy.test",
                                   "XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=[UNAVAILABLE]"]
    assert c.cmd("NOOP") == b"250 2.0.0 Ok\r\n"          # now the backend answers
    assert backend_lines(s, 3)[2] == "NOOP"


def test_auth_login_two_step(setup):
    s = setup()
    c = raw(s)
    c.cmd("HELO client.example")
    assert c.cmd("AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
    assert c.cmd(b64("alice")) == b"334 UGFzc3dvcmQ6\r\n"
    assert c.cmd(b64("secret")) == b"235 2.0.0 OK\r\n"
    assert backend_lines(s, 3) == ["EHLO mx.proxy.test",
                                   "XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=[UNAVAILABLE]",
                                   "HELO client.example"]
    assert s.auth.requests[0].header("Auth-Method") == "plain"


def test_auth_login_inline_username(setup):
    s = setup()
    smtp = client(s)
    smtp.ehlo()
    smtp.user, smtp.password = "alice", "secret"
    assert smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=True) == (235, b"2.0.0 OK")
    req = s.auth.requests[0]
    assert (req.header("Auth-User"), req.header("Auth-Pass")) == ("alice", "secret")


def test_auth_cram_md5(setup):
    s = setup(smtp_auth="plain login cram-md5")
    s.auth.set_respond(lambda req: auth_ok(s.backend.port, password="secret"))
    smtp = client(s)
    smtp.ehlo()
    assert "CRAM-MD5" in smtp.esmtp_features["auth"]
    assert smtp.login("alice", "secret") == (235, b"2.0.0 OK")      # smtplib prefers CRAM-MD5
    req = s.auth.requests[0]
    assert req.header("Auth-Method") == "cram-md5"
    salt = req.header("Auth-Salt")
    assert salt.startswith("<") and salt.endswith("@%s>" % NAME)
    digest = hmac.new(b"secret", salt.encode(), "md5").hexdigest()
    assert req.header("Auth-Pass") == digest
    assert backend_lines(s, 2)[1] == "XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=[UNAVAILABLE]"


def test_auth_cram_md5_disabled(setup):
    s = setup()
    c = raw(s)
    assert c.cmd("AUTH CRAM-MD5") == b"500 5.5.1 Invalid command\r\n"
    assert c.cmd("AUTH EXTERNAL") == b"500 5.5.1 Invalid command\r\n"
    assert c.cmd("AUTH EXTERNAL " + b64("alice")) == b"500 5.5.1 Invalid command\r\n"


def test_auth_external(setup):
    s = setup(smtp_auth="plain external")
    c = raw(s)
    assert c.cmd("AUTH EXTERNAL") == b"334 VXNlcm5hbWU6\r\n"
    assert c.cmd(b64("alice")) == b"235 2.0.0 OK\r\n"
    req = s.auth.requests[0]
    assert (req.header("Auth-Method"), req.header("Auth-User"), req.header("Auth-Pass")) == (
        "external", "alice", "")


def test_auth_external_initial_response(setup):
    s = setup(smtp_auth="external")
    c = raw(s)
    assert c.cmd("AUTH EXTERNAL " + b64("bob")) == b"235 2.0.0 OK\r\n"
    assert backend_lines(s, 2)[1] == "XCLIENT ADDR=127.0.0.1 LOGIN=bob NAME=[UNAVAILABLE]"


def test_sasl_errors_are_invalid_commands(setup):
    s = setup(max_errors=2)
    c = raw(s)
    assert c.cmd("AUTH PLAIN") == b"334 \r\n"
    assert c.cmd("*") == b"500 5.5.1 Invalid command\r\n"                 # cancel
    assert c.cmd("AUTH PLAIN " + b64("nonul")) == b"500 5.5.1 Invalid command\r\n"
    assert c.cmd("AUTH LOGIN a b") == b"500 5.5.1 Invalid command\r\n"
    assert c.cmd("AUTH PLAIN %%%") == b"500 5.5.1 Invalid command\r\n"
    assert c.cmd("NOOP") == b"250 2.0.0 OK\r\n"       # none of these counted towards max_errors
    s.proxy.wait_log("client sent invalid base64 encoding in AUTH PLAIN command")
    s.proxy.wait_log("client sent invalid login in AUTH PLAIN command")


def test_auth_failure_reply_and_close(setup):
    s = setup()
    s.auth.set_respond(lambda req: auth_fail("Invalid login or password"))
    c = raw(s)
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0bad")) == b"535 5.7.0 Invalid login or password\r\n"
    assert c.closed()
    s.proxy.wait_log('client login failed: "Invalid login or password"')


def test_auth_failure_error_code(setup):
    s = setup()
    s.auth.set_respond(lambda req: auth_fail("Temporary problem",
                                             extra=["Auth-Error-Code: 451 4.3.0"]))
    c = raw(s)
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0x")) == b"451 4.3.0 Temporary problem\r\n"
    assert c.closed()


def test_auth_failure_with_wait_allows_retry(setup):
    s = setup()

    def respond(req):
        if len(s.auth.requests) == 1:
            return auth_fail("Try again", wait=1)
        return auth_ok(s.backend.port)
    s.auth.set_respond(respond)
    c = raw(s)
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0x")) == b"535 5.7.0 Try again\r\n"
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0y")) == b"235 2.0.0 OK\r\n"
    assert s.auth.requests[1].header("Auth-Login-Attempt") == "2"


# ------------------------------------------------------------------------------------------------
# XCLIENT variants

def test_xclient_login_xtext(setup):
    s = setup()
    c = raw(s)
    c.cmd("EHLO c")
    c.readline()
    assert c.cmd("AUTH PLAIN " + b64("\0usér+x=y\0pw")) == b"235 2.0.0 OK\r\n"
    assert backend_lines(s, 2)[1] == "XCLIENT ADDR=127.0.0.1 LOGIN=us+C3+A9r+2Bx+3Dy " \
                                     "NAME=[UNAVAILABLE]"


def test_xclient_login_from_auth_user(setup):
    s = setup()
    s.auth.set_respond(lambda req: auth_ok(s.backend.port, user="al ice"))
    c = raw(s)
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == b"235 2.0.0 OK\r\n"
    assert backend_lines(s, 2)[1] == "XCLIENT ADDR=127.0.0.1 LOGIN=al+20ice NAME=[UNAVAILABLE]"


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


def test_xclient_off_ehlo(setup):
    s = setup(xclient=False)
    smtp = client(s)
    smtp.ehlo()
    smtp.login("alice", "secret")
    send_message(smtp)
    smtp.quit()
    assert backend_lines(s, 2)[:2] == ["EHLO mx.proxy.test", SMTPLIB_MAIL + "<a@example.com>"]


def test_xclient_off_helo(setup):
    s = setup(xclient=False)
    c = raw(s)
    c.cmd("HELO h.example")
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == b"235 2.0.0 OK\r\n"
    c.cmd("NOOP")
    assert backend_lines(s, 2) == ["HELO mx.proxy.test", "NOOP"]


def test_xclient_250_reply_accepted(setup, backend_factory):
    be = backend_factory(SmtpBackend, replies={b"XCLIENT": "250 2.0.0 Ok"})
    s = setup(backend=be)
    c = raw(s)
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == b"235 2.0.0 OK\r\n"


def test_multiline_greeting_and_ehlo(setup, backend_factory):
    be = backend_factory(SmtpBackend, replies={"greeting": ["220-backend.test hello",
                                                            "220 backend.test ESMTP"]})
    s = setup(backend=be)
    c = raw(s)
    c.cmd("EHLO c.example")
    c.readline()
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == b"235 2.0.0 OK\r\n"
    assert backend_lines(s, 3)[2] == "EHLO c.example"


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


def test_name_forward_disagrees(setup, dns):
    srv = dns({(PTR, T_PTR): [(T_PTR, 60, "client.example.test")],
               ("client.example.test", T_A): [(T_A, 60, "192.0.2.7")],
               ("client.example.test", T_AAAA): []})
    s = setup(resolver="127.0.0.1:%d" % srv.port)
    assert _login_and_xclient(s).endswith(" NAME=[UNAVAILABLE]")


def test_name_nxdomain(setup, dns):
    srv = dns({(PTR, T_PTR): 3})
    s = setup(resolver="127.0.0.1:%d" % srv.port)
    assert _login_and_xclient(s).endswith(" NAME=[UNAVAILABLE]")
    line = s.proxy.wait_log("127.0.0.1 could not be resolved (3: Host not found)")
    assert "[error]" in line and "while in resolving client address" in line


def test_name_servfail_and_bad_name(setup, dns):
    srv = dns({(PTR, T_PTR): [(T_PTR, 60, "bad_name.example")]})
    s = setup(resolver="127.0.0.1:%d" % srv.port)
    assert _login_and_xclient(s).endswith(" NAME=[TEMPUNAVAIL]")
    s.proxy.wait_log('127.0.0.1 resolved to invalid host name "bad_name.example"')


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


def test_name_resolver_system(setup):
    s = setup(resolver="system")
    host = socket.gethostbyaddr("127.0.0.1")[0]
    assert _login_and_xclient(s) == "XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=%s" % host


# ------------------------------------------------------------------------------------------------
# proxy_smtp_auth

def test_proxy_smtp_auth_with_xclient(setup):
    s = setup(proxy_smtp_auth=True)
    smtp = client(s)
    smtp.ehlo()
    assert smtp.login("alice", "secret") == (235, b"2.0.0 OK")
    expect = "AUTH PLAIN " + base64.b64encode(b"\0alice\0secret").decode()
    assert backend_lines(s, 4) == ["EHLO mx.proxy.test",
                                   "XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]",
                                   "EHLO client.example", expect]


def test_proxy_smtp_auth_without_xclient(setup):
    s = setup(proxy_smtp_auth=True, xclient=False)
    c = raw(s)
    c.cmd("EHLO c")
    c.readline()
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == b"235 2.0.0 OK\r\n"
    assert backend_lines(s, 2) == ["EHLO mx.proxy.test", "AUTH PLAIN AGFsaWNlAHB3"]


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


def test_proxy_smtp_auth_refused(setup, backend_factory):
    be = backend_factory(SmtpBackend, replies={b"AUTH": "535 5.7.8 Error: authentication failed"})
    s = setup(backend=be, proxy_smtp_auth=True, proxy_pass_error_message=True)
    c = raw(s)
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == \
        b"535 5.7.8 Error: authentication failed\r\n"
    assert c.closed()


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


def test_none_mode_spacing_kept_and_rcpt_reply_relayed(setup, backend_factory):
    # no XCLIENT (so the replayed lines are all there is to see); the backend learns the
    # client from the PROXY header instead, which -t requires for smtp_auth none
    be = backend_factory(SmtpBackend, replies={b"RCPT": "550 5.1.1 <c@d>: Recipient unknown"},
                         proxy_protocol=True)
    s = setup(backend=be, smtp_auth="none", xclient=False, proxy_protocol="on")
    c = raw(s)
    assert c.cmd("HELO h") == b"250 mx.proxy.test\r\n"
    assert c.cmd("MAIL FROM:<a@b> SIZE=100") == b"250 2.0.0 OK\r\n"
    assert c.cmd("MAIL FROM:<x@y>") == b"503 5.5.1 Bad sequence of commands\r\n"
    assert c.cmd("RCPT TO:<c@d>  NOTIFY=NEVER ") == b"550 5.1.1 <c@d>: Recipient unknown\r\n"
    assert backend_lines(s, 3, 0) == ["HELO mx.proxy.test", "MAIL FROM:<a@b> SIZE=100",
                                      "RCPT TO:<c@d>  NOTIFY=NEVER"]
    assert s.auth.requests[0].header("Auth-SMTP-To") == "RCPT TO:<c@d>  NOTIFY=NEVER"
    # relaying now: the next command goes to the backend
    assert c.cmd("RSET") == b"250 2.0.0 Ok\r\n"


def test_none_mode_errors(setup):
    s = setup(smtp_auth="none")
    c = raw(s)
    assert c.cmd("RCPT TO:<a@b>") == b"503 5.5.1 Bad sequence of commands\r\n"
    assert c.cmd("MAIL") == b"501 5.5.4 Invalid argument\r\n"
    assert c.cmd("MAIL FROM:<a@b>") == b"250 2.0.0 OK\r\n"
    assert c.cmd("RCPT") == b"501 5.5.4 Invalid argument\r\n"
    assert c.cmd("RSET") == b"250 2.0.0 OK\r\n"
    assert c.cmd("RCPT TO:<a@b>") == b"503 5.5.1 Bad sequence of commands\r\n"
    assert s.auth.requests == []


def test_none_mode_auth_wait_then_next_rcpt(setup):
    s = setup(smtp_auth="none")

    def respond(req):
        if req.header("Auth-SMTP-To") == "RCPT TO:<bad@x>":
            return auth_fail("Recipient refused", wait=1,
                             extra=["Auth-Error-Code: 550 5.7.1"])
        return auth_ok(s.backend.port)
    s.auth.set_respond(respond)
    c = raw(s)
    c.cmd("MAIL FROM:<a@b>")
    assert c.cmd("RCPT TO:<bad@x>") == b"550 5.7.1 Recipient refused\r\n"
    assert c.cmd("RCPT TO:<good@x>") == b"250 2.1.5 Ok\r\n"
    assert backend_lines(s, 4)[2:] == ["MAIL FROM:<a@b>", "RCPT TO:<good@x>"]
    assert s.auth.requests[1].header("Auth-Login-Attempt") == "2"


def test_none_and_plain_together(setup):
    s = setup(smtp_auth="plain none")
    c = raw(s)
    assert c.cmd("MAIL FROM:<a@b>") == b"250 2.0.0 OK\r\n"
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == b"235 2.0.0 OK\r\n"
    assert s.auth.requests[0].header("Auth-Method") == "plain"
    assert s.auth.requests[0].header("Auth-SMTP-From") is None


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


def test_pipelined_auth_sasl_lines(setup):
    s = setup()
    c = raw(s)
    c.send(b"AUTH LOGIN\r\n" + b64("alice").encode() + b"\r\n" + b64("pw").encode()
           + b"\r\nNOOP\r\n")
    assert c.readline() == b"334 VXNlcm5hbWU6\r\n"
    assert c.readline() == b"334 UGFzc3dvcmQ6\r\n"
    assert c.readline() == b"235 2.0.0 OK\r\n"
    assert c.readline() == b"250 2.0.0 Ok\r\n"      # the backend's NOOP reply


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

@pytest.mark.parametrize("where, reply", [
    ("greeting", "554 5.3.2 not now"),
    (b"EHLO", "502 5.5.2 Error: command not recognized"),
    (b"XCLIENT", "550 5.7.0 Error: insufficient authorization"),
])
def test_backend_refusal_hidden(setup, backend_factory, where, reply):
    be = backend_factory(SmtpBackend, replies={where: reply})
    s = setup(backend=be)
    c = raw(s)
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == INTERNAL
    assert c.closed()
    # backend text is escaped like client text (it may echo it): "name: " becomes "name\x3a "
    line = s.proxy.wait_log('upstream sent invalid response: "%s"'
                            % reply.replace(": ", "\\x3a "))
    assert "[error]" in line


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


def test_backend_refuses_client_helo(setup, backend_factory):
    be = backend_factory(SmtpBackend, replies={
        b"EHLO": lambda conn, line: ("501 5.5.2 bad name" if line.endswith(b"bad..name")
                                     else ["250-backend.test", "250 8BITMIME"])})
    s = setup(backend=be, proxy_pass_error_message=True)
    c = raw(s)
    c.cmd("EHLO bad..name")
    c.readline()
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == b"501 5.5.2 bad name\r\n"


def test_none_mode_mail_refused(setup, backend_factory):
    be = backend_factory(SmtpBackend, replies={b"MAIL": "553 5.7.1 sender rejected"})
    s = setup(backend=be, smtp_auth="none")
    c = raw(s)
    c.cmd("MAIL FROM:<a@b>")
    assert c.cmd("RCPT TO:<c@d>") == INTERNAL
    assert c.closed()


def test_backend_unreachable(setup):
    s = setup()
    dead = free_port()
    s.auth.set_respond(lambda req: auth_ok(dead))
    c = raw(s)
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == INTERNAL
    assert c.closed()


def test_static_proxy_pass(setup, smtp_backend):
    """proxy_pass (with the proxy_smtp_auth it requires): the backend checks the password."""
    s = setup(auth=False, proxy_pass="127.0.0.1:%d" % smtp_backend.port, proxy_smtp_auth=True)
    c = raw(s)
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0pw")) == b"235 2.0.0 OK\r\n"
    lines = backend_lines(s, 3)
    assert lines[1] == "XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]"    # no LOGIN= vouched for
    assert lines[2] == "AUTH PLAIN " + b64("\0alice\0pw")


def test_static_proxy_pass_backend_refuses(setup, backend_factory):
    """A refused AUTH reaches the client as an ordinary authentication failure."""
    be = backend_factory(SmtpBackend, replies={b"AUTH": "535 5.7.8 Error: authentication failed"})
    s = setup(backend=be, auth=False, proxy_pass="127.0.0.1:%d" % be.port, proxy_smtp_auth=True)
    c = raw(s)
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0bad")) == \
        b"535 5.7.8 Error: authentication failed\r\n"
    assert c.closed()
    s.proxy.wait_log('client login failed: "535 5.7.8 Error\\x3a authentication failed"')
