"""Postfix as the SMTP backend: XCLIENT on and off (smtpd_authorized_xclient_hosts),
`smtp_auth none` for an MX-style flow, `proxy_smtp_auth on` against Postfix SASL through
Dovecot's auth socket; the message lands in the Maildir intact and Postfix's own log shows the
client's address and name."""

import smtplib
import uuid

import pytest

from mailproxy.resolver import T_A, T_AAAA, T_PTR
from tests.support.auth import AuthServer, auth_fail, auth_ok
from tests.support.common import b64, fail_on_errors
from tests.support.dns import DnsServer
from tests.support.process import free_port, server_block
from tests.support.realservers import CLIENT_IP, USERS

pytestmark = pytest.mark.integration

CLIENT_NAME = "client.example.test"
PTR = ".".join(reversed(CLIENT_IP.split("."))) + ".in-addr.arpa"


@pytest.fixture(scope="module")
def dns():
    srv = DnsServer({(PTR, T_PTR): [(T_PTR, 60, CLIENT_NAME)],
                     (CLIENT_NAME, T_A): [(T_A, 60, CLIENT_IP)],
                     (CLIENT_NAME, T_AAAA): []})
    yield srv
    srv.stop()
    fail_on_errors(srv, type(srv).__name__)


@pytest.fixture
def auth(postfix):
    srv = AuthServer()

    def respond(req):
        method = req.header("Auth-Method")
        user = req.header("Auth-User", "")
        if method == "none":
            return auth_ok(postfix.port)
        if USERS.get(user) == req.header("Auth-Pass"):
            return auth_ok(postfix.port)
        return auth_fail("Invalid login or password", wait=0,
                         extra=["Auth-Error-Code: 535 5.7.8"])
    srv.set_respond(respond)
    yield srv
    srv.stop()
    fail_on_errors(srv, type(srv).__name__)


@pytest.fixture
def smtp_proxy(proxy_factory, auth, dns, postfix):
    def start(**directives):
        port = free_port()
        if "proxy_pass" not in directives:
            directives.setdefault("auth_http", auth.url)
        directives.setdefault("timeout", "10s")
        directives.setdefault("server_name", "proxy.test")
        directives.setdefault("resolver", f"127.0.0.1:{dns.port}")
        directives.setdefault("resolver_timeout", "2s")
        proxy_factory({"servers": {"smtp": server_block("smtp", port, **directives)}})
        return port
    return start


def message(rcpt="bob@example.org"):
    token = uuid.uuid4().hex
    body = (f"From: alice@example.org\r\nTo: {rcpt}\r\nSubject: via mailproxy {token}\r\n"
            f"Message-ID: <{token}@test>\r\nDate: Mon, 24 Nov 2025 10:00:00 +0000\r\n"
            f"MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            f"\r\nfirst line\r\n.a line starting with a dot\r\n..two dots\r\n\r\n"
            f"caf\u00e9 \u2603\r\nlast line\r\n").encode("utf-8")
    return token, body


def delivered_message(postfix, mailbox, token):
    """The delivered file holding `token`, with CRLF line ends (Maildir files use LF)."""
    return postfix.wait_message(mailbox, token).replace(b"\n", b"\r\n")


def send_through(port, body, rcpt="bob@example.org", login=("alice", "secret"), helo=None):
    with smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(CLIENT_IP, 0),
                      local_hostname=helo or "client-helo.example") as s:
        s.ehlo()
        if login:
            s.login(*login)
        refused = s.sendmail("alice@example.org", [rcpt], body)
        assert refused == {}
        return s


def queue_id_line(postfix_log, pattern):
    """Postfix's `QUEUEID: client=...` line matching `pattern`."""
    return postfix_log.wait(r"postfix/smtpd\[\d+\]: [0-9A-F]+: client=" + pattern)


def test_xclient_on_postfix_sees_client_address_name_and_login(smtp_proxy, postfix,
                                                               postfix_log):
    port = smtp_proxy()
    token, body = message()
    send_through(port, body)
    line = queue_id_line(postfix_log, r".*")
    assert f"client={CLIENT_NAME}[{CLIENT_IP}], sasl_method=XCLIENT, sasl_username=alice" \
        in line, line
    got = delivered_message(postfix, "bob", token)
    assert got.endswith(body), got


def test_xclient_off_postfix_sees_the_proxy(smtp_proxy, postfix, postfix_log):
    port = smtp_proxy(xclient=False)
    token, body = message()
    send_through(port, body)
    line = queue_id_line(postfix_log, r".*")
    assert "client=localhost[127.0.0.1]" in line, line
    assert "sasl_username" not in line
    assert delivered_message(postfix, "bob", token).endswith(body)


def test_mx_flow_smtp_auth_none(smtp_proxy, postfix, postfix_log, auth):
    port = smtp_proxy(smtp_auth="none")
    token, body = message("alice@example.org")
    send_through(port, body, rcpt="alice@example.org", login=None, helo="mx.sender.example")
    line = queue_id_line(postfix_log, r".*")
    assert f"client={CLIENT_NAME}[{CLIENT_IP}]" in line, line
    assert "sasl_username" not in line
    assert delivered_message(postfix, "alice", token).endswith(body)
    req = auth.requests[-1]
    assert req.header("Auth-Method") == "none"
    assert req.header("Auth-SMTP-Helo") == "mx.sender.example"
    # the client's command lines as sent (smtplib writes the verbs in lower case)
    assert req.header("Auth-SMTP-From") == "mail FROM:<alice@example.org>"
    assert req.header("Auth-SMTP-To") == "rcpt TO:<alice@example.org>"
    assert req.header("Client-Host") == CLIENT_NAME


def test_mx_flow_unknown_recipient_gets_postfix_refusal(smtp_proxy, postfix_log):
    port = smtp_proxy(smtp_auth="none")
    with smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(CLIENT_IP, 0)) as s:
        s.ehlo("mx.sender.example")
        assert s.mail("someone@example.com")[0] == 250
        code, text = s.rcpt("nobody@example.org")
        assert code == 550, (code, text)
        assert b"User unknown" in text or b"Recipient address rejected" in text
    postfix_log.wait(r"NOQUEUE: reject: RCPT from " + CLIENT_NAME.replace(".", r"\.")
                     + r"\[127\.0\.0\.2\]")


def test_proxy_smtp_auth_through_dovecot_sasl(smtp_proxy, postfix, postfix_log):
    port = smtp_proxy(xclient=False, proxy_smtp_auth=True)
    token, body = message()
    send_through(port, body)
    line = queue_id_line(postfix_log, r".*")
    assert "client=localhost[127.0.0.1], sasl_method=PLAIN, sasl_username=alice" in line, line
    assert delivered_message(postfix, "bob", token).endswith(body)


def test_proxy_smtp_auth_with_xclient(smtp_proxy, postfix, postfix_log):
    port = smtp_proxy(proxy_smtp_auth=True)
    token, body = message()
    send_through(port, body)
    line = queue_id_line(postfix_log, r".*")
    assert f"client={CLIENT_NAME}[{CLIENT_IP}], sasl_method=PLAIN, sasl_username=alice" \
        in line, line
    assert delivered_message(postfix, "bob", token).endswith(body)


def test_proxy_pass_replays_login_to_postfix_sasl(smtp_proxy, postfix, postfix_log):
    port = smtp_proxy(proxy_pass=f"127.0.0.1:{postfix.port}", xclient=False,
                      proxy_smtp_auth=True)
    token, body = message()
    send_through(port, body)
    line = queue_id_line(postfix_log, r".*")
    assert "sasl_method=PLAIN, sasl_username=alice" in line, line
    assert delivered_message(postfix, "bob", token).endswith(body)
    with smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(CLIENT_IP, 0)) as s:
        s.ehlo()
        # one attempt (smtplib's login() would try the next method on a closed connection)
        code, _text = s.docmd("AUTH", "PLAIN " + b64("\0alice\0wrong"))
        assert code == 535


def test_auth_failure_never_reaches_postfix(smtp_proxy, postfix_log):
    port = smtp_proxy()
    with smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(CLIENT_IP, 0)) as s:
        s.ehlo()
        # one attempt (smtplib's login() would try the next method on a closed connection)
        code, _text = s.docmd("AUTH", "PLAIN " + b64("\0alice\0wrong"))
        assert code == 535
    assert "127.0.0.2" not in postfix_log.text()
