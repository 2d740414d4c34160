"""TLS towards real clients: swaks (STARTTLS, implicit TLS), curl (imap/pop3/smtp with STARTTLS
required, and imaps/pop3s/smtps), `openssl s_client -starttls`, through mailproxy to Dovecot and
Postfix; the certificate is verified against the test CA."""

import subprocess
import uuid

import pytest

from tests.support.auth import AuthServer
from tests.support.common import fail_on_errors
from tests.support.process import free_port, server_block
from tests.support.realmail import dovecot_responder, smtp_message, store_message
from tests.support.realservers import CLIENT_IP, USERS, need, program

pytestmark = pytest.mark.integration


@pytest.fixture
def auth(dovecot, postfix):
    srv = AuthServer()
    srv.set_respond(dovecot_responder({"imap": dovecot.ports["imap"],
                                       "pop3": dovecot.ports["pop3"], "smtp": postfix.port}))
    yield srv
    srv.stop()
    fail_on_errors(srv, type(srv).__name__)


@pytest.fixture
def start(proxy_factory, auth, request):
    need("openssl")                 # before the pki fixture (which would only skip)
    pki = request.getfixturevalue("pki")

    def start(protocol, implicit=False, **directives):
        port = free_port()
        directives.setdefault("auth_http", auth.url)
        directives.setdefault("timeout", "10s")
        directives.setdefault("server_name", "mail.test")
        directives.setdefault("ssl_certificate", pki.server_rsa[0])
        directives.setdefault("ssl_certificate_key", pki.server_rsa[1])
        if not implicit:
            directives.setdefault("starttls", "only")
        block = server_block(protocol, port, **directives)
        if implicit:
            block["listen"] += " ssl"
        proxy_factory({"servers": {protocol: block}})
        return port
    return start


def run(argv, input=None, timeout=30):
    return subprocess.run(argv, capture_output=True, timeout=timeout, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)


def wait_delivered(postfix, mailbox, token):
    return postfix.wait_message(mailbox, token)


# ---------------------------------------------------------------------------------------------
# swaks

@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_swaks_tls_to_postfix(start, postfix, postfix_log, pki, mode):
    need("swaks")
    port = start("smtp", implicit=(mode == "implicit"), smtp_capabilities="PIPELINING")
    token = uuid.uuid4().hex
    argv = [program("swaks"), "--server", f"127.0.0.1:{port}", "--local-interface", CLIENT_IP,
            "--tls-verify", "--tls-ca-path", pki.ca, "--tls-sni", "mail.test",
            "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", USERS["alice"],
            "--from", "alice@example.org", "--to", "bob@example.org",
            "--header", f"Subject: {token}", "--body", f"tls body {token}", "--timeout", "15"]
    argv.append("--tls" if mode == "starttls" else "--tlsc")
    res = run(argv)
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, out + res.stderr.decode(errors="replace")
    assert "TLS started with cipher" in out
    assert "235 2.0.0 OK" in out
    postfix_log.wait(rf": client=.*\[{CLIENT_IP}\].*sasl_username=alice")
    assert f"tls body {token}".encode() in wait_delivered(postfix, "bob", token)


def test_swaks_login_before_starttls_is_refused(start):
    need("swaks")
    port = start("smtp")
    res = run([program("swaks"), "--server", f"127.0.0.1:{port}", "--auth", "PLAIN",
               "--auth-user", "alice", "--auth-password", USERS["alice"],
               "--to", "bob@example.org", "--timeout", "15"])
    out = res.stdout.decode(errors="replace")
    assert res.returncode != 0
    # starttls only: AUTH is not offered (nor accepted) before STARTTLS
    assert "250 STARTTLS" in out or "250-STARTTLS" in out, out


# ---------------------------------------------------------------------------------------------
# curl

def _curl(pki, *args, input=None):
    return run([program("curl"), "-sS", "--max-time", "20", "--interface", CLIENT_IP,
                "--cacert", pki.ca] + list(args),
               input=input)


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_curl_imap_tls(start, dovecot, dovecot_log, pki, mode):
    need("curl")
    port = start("imap", implicit=(mode == "implicit"))
    token, body, uid, _seq = store_message(dovecot)
    scheme = "imaps" if mode == "implicit" else "imap"
    extra = ["--ssl-reqd"] if mode == "starttls" else []
    res = _curl(pki, *extra, "--resolve", f"mail.test:{port}:127.0.0.1",
                f"{scheme}://mail.test:{port}/INBOX/;UID={uid}",
                "-u", f"alice:{USERS['alice']}")
    assert res.returncode == 0, res.stderr
    assert res.stdout == body
    dovecot_log.wait(r"imap-login: Info: Login: user=<alice>")


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_curl_pop3_tls(start, dovecot, pki, mode):
    need("curl")
    port = start("pop3", implicit=(mode == "implicit"))
    token, body, _uid, seq = store_message(dovecot)
    scheme = "pop3s" if mode == "implicit" else "pop3"
    extra = ["--ssl-reqd"] if mode == "starttls" else []
    res = _curl(pki, *extra, "--resolve", f"mail.test:{port}:127.0.0.1",
                f"{scheme}://mail.test:{port}/{seq}", "-u", f"alice:{USERS['alice']}")
    assert res.returncode == 0, res.stderr
    assert res.stdout == body


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_curl_smtp_tls(start, postfix, postfix_log, pki, mode):
    need("curl")
    port = start("smtp", implicit=(mode == "implicit"))
    token = uuid.uuid4().hex
    scheme = "smtps" if mode == "implicit" else "smtp"
    extra = ["--ssl-reqd"] if mode == "starttls" else []
    res = _curl(pki, *extra, "--resolve", f"mail.test:{port}:127.0.0.1",
                f"{scheme}://mail.test:{port}", "--mail-from", "alice@example.org",
                "--mail-rcpt", "bob@example.org", "-T", "-", "-u", f"alice:{USERS['alice']}",
                input=smtp_message(token))
    assert res.returncode == 0, res.stderr
    got = wait_delivered(postfix, "bob", token)
    assert got.replace(b"\n", b"\r\n").endswith(smtp_message(token))


def test_curl_imap_without_tls_is_refused_under_starttls_only(start, pki):
    need("curl")
    port = start("imap")
    res = run([program("curl"), "-sS", "--max-time", "20", f"imap://127.0.0.1:{port}/INBOX",
               "-u", f"alice:{USERS['alice']}"])
    assert res.returncode != 0


# ---------------------------------------------------------------------------------------------
# openssl s_client -starttls

@pytest.mark.parametrize("protocol,starttls,commands,expect", [
    ("imap", "imap", b"a1 LOGIN alice secret\na2 SELECT INBOX\na3 LOGOUT\n",
     [b"a1 OK", b"a2 OK", b"a3 OK"]),
    ("pop3", "pop3", b"USER alice\nPASS secret\nSTAT\nQUIT\n", [b"+OK Logged in", b"+OK "]),
    ("smtp", "smtp", b"EHLO s-client.test\nAUTH PLAIN " + b"AGFsaWNlAHNlY3JldA==" +
     b"\nQUIT\n", [b"235 2.0.0 OK", b"221 2.0.0"]),
])
def test_openssl_s_client_starttls(start, pki, protocol, starttls, commands,
                                   expect):
    need("openssl")
    port = start(protocol)
    res = run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-starttls", starttls,
               "-CAfile", pki.ca, "-verify_return_error", "-servername", "mail.test",
               "-crlf", "-ign_eof"], input=commands)
    out = res.stdout
    assert b"Verify return code: 0 (ok)" in out, out[-2000:]
    for e in expect:
        assert e in out, out[-2000:]


# ---------------------------------------------------------------------------------------------
# TLS towards the backend: proxy_ssl on (Dovecot's imaps/pop3s) and starttls, verified

@pytest.mark.parametrize("protocol", ["imap", "pop3"])
@pytest.mark.parametrize("mode", ["on", "starttls"])
def test_proxy_ssl_to_dovecot(proxy_factory, dovecot, dovecot_log, imap_from, pop3_from,
                              request, protocol, mode):
    need("openssl")
    pki = request.getfixturevalue("pki")
    listener = protocol + "s" if mode == "on" else protocol
    port = free_port()
    proxy_factory({"servers": {protocol: server_block(
        protocol, port, proxy_pass=f"127.0.0.1:{dovecot.ports[listener]}", timeout="10s",
        proxy_ssl=mode, proxy_ssl_verify=True, proxy_ssl_trusted_certificate=pki.ca,
        proxy_ssl_name="mail.test", imap_client_id=(protocol == "imap"))}})
    if protocol == "imap":
        m = imap_from(port)
        assert m.login("alice", USERS["alice"])[0] == "OK"
        assert m.select("INBOX")[0] == "OK"
        m.logout()
    else:
        p = pop3_from(port)
        p.user("alice")
        assert p.pass_(USERS["alice"]).startswith(b"+OK")
        p.stat()
        p.quit()
    line = dovecot_log.wait(rf"{protocol}-login: Info: Login: user=<alice>")
    assert "TLS" in line, line                 # Dovecot saw a TLS session from the proxy
    if protocol == "imap":
        assert f"rip={CLIENT_IP}," in line, line


def test_proxy_ssl_wrong_name_is_refused(proxy_factory, dovecot, imap_from, request):
    need("openssl")
    pki = request.getfixturevalue("pki")
    import imaplib
    port = free_port()
    proxy = proxy_factory({"servers": {"imap": server_block(
        "imap", port, proxy_pass=f"127.0.0.1:{dovecot.ports['imaps']}", timeout="10s",
        proxy_ssl="on", proxy_ssl_trusted_certificate=pki.ca, proxy_ssl_name="other.test")}})
    m = imap_from(port)
    with pytest.raises((imaplib.IMAP4.error, imaplib.IMAP4.abort, OSError)):
        m.login("alice", USERS["alice"])
    proxy.wait_log("certificate", timeout=5)
