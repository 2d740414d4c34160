"""TLS towards clients: implicit TLS, STARTTLS/STLS, client certificates, Auth-SSL-*, SNI,
protocol limits, handshake timeout, configuration errors (nginx's ngx_mail_ssl_module).

Clients are the standard library's (poplib/imaplib/smtplib with an ssl.SSLContext) and raw
sockets wrapped by hand where byte-exact checks matter. Certificates come from
tests/support/certs.py.
"""

import hashlib
import imaplib
import poplib
import smtplib
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailproxy import config
from mailproxy.supervisor import load_config
from tests.support.common import REPO, b64, fail_on_errors, track
from tests.support.mailbackends import ImapBackend, Pop3Backend, SmtpBackend
from tests.support.process import ini, SharedProxy
from tests.support.tls import TLSLines, client_ctx, readline_raw

CRLF = b"\r\n"


# ---------------------------------------------------------------------------------------------
# helpers

def _config(protocol, ssl_listen=True, **directives):
    """tls_setup's arguments as a SharedProxy configuration."""
    return dict(protocol=protocol, listen_extra="ssl" if ssl_listen else "", **directives)


def _configs(pki):
    """Every configuration the tests use (tls_setup's arguments), one server block each."""
    client_on = dict(ssl_verify_client="on", ssl_client_certificate=pki.ca)
    return [_config(*args, **kw) for args, kw in [
        (("pop3",), {}), (("imap",), {}),
        (("pop3",), dict(starttls="on")), (("imap",), dict(starttls="on")),
        (("smtp",), dict(starttls="on", server_name="mx.test")),
        (("pop3",), dict(ssl_certificate=[pki.server_rsa[0], pki.server_ec[0]],
                         ssl_certificate_key=[pki.server_rsa[1], pki.server_ec[1]])),
        (("pop3",), dict(ssl_certificate_key=pki.server_rsa_enc_key,
                         ssl_password_file=pki.password_file)),
        (("imap",), dict(ssl_protocols="TLSv1.3")),
        (("pop3",), dict(ssl_protocols="TLSv1.2", ssl_ciphers="ECDHE-RSA-AES256-GCM-SHA384")),
        (("pop3",), dict(timeout="500ms")),
        (("pop3", False), dict(starttls="on")), (("pop3", False), dict(starttls="only")),
        (("pop3", False), dict(starttls="off")),
        (("imap", False), dict(starttls="on")), (("imap", False), dict(starttls="only")),
        (("smtp", False), dict(starttls="on", server_name="mx.test",
                               smtp_capabilities="PIPELINING")),
        (("smtp", False), dict(starttls="only", server_name="mx.test",
                               smtp_capabilities="PIPELINING", smtp_auth="plain none")),
        (("smtp", False), dict(starttls="on", server_name="mx.test")),
        (("pop3",), dict(client_on, auth_http_pass_client_cert="on")),
        (("pop3",), dict(client_on, ssl_crl=pki.crl)),
        (("imap", False), dict(client_on, starttls="on")),
        (("imap",), dict(client_on, imap_auth="external")),
        (("pop3",), dict(ssl_verify_client="optional", ssl_client_certificate=pki.ca)),
        (("imap",), dict(ssl_verify_client="optional", ssl_client_certificate=pki.ca)),
        (("smtp",), dict(ssl_verify_client="optional", ssl_client_certificate=pki.ca)),
        (("pop3",), dict(ssl_verify_client="optional_no_ca")),
        (("imap",), dict(ssl_certificate_sni=["imap.example.com %s %s" % pki.sni_exact,
                                              "*.example.org %s %s" % pki.sni_wild])),
    ] + [((p,), dict(ssl_verify_client="on", ssl_trusted_certificate=pki.ca))
         for p in ("pop3", "imap", "smtp")]]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, pki):
    proxy = SharedProxy(tmp_path_factory.mktemp("tls"), _configs(pki),
                        defaults=dict(timeout="2s", ssl_certificate=pki.server_rsa[0],
                                      ssl_certificate_key=pki.server_rsa[1]))
    yield proxy
    proxy.stop()


@pytest.fixture
def tls_setup(shared, backend_factory):
    """start(protocol, ssl_listen=True, backend=None, **directives) -> Setup on the shared
    proxy's block of that configuration (the RSA server certificate unless it names others),
    auth routed to `backend` (by default a fresh one for `protocol`)."""
    def start(protocol, ssl_listen=True, backend=None, **directives):
        if backend is None:
            backend = {"pop3": lambda: backend_factory(Pop3Backend, users={"alice": "secret"}),
                       "imap": lambda: backend_factory(ImapBackend),
                       "smtp": lambda: backend_factory(SmtpBackend)}[protocol]()
        return shared.setup(backend, **_config(protocol, ssl_listen, **directives))
    yield start
    fail_on_errors(shared.auth, "the auth service")


def tls_connect(setup, pki, cert=None, server_hostname="mail.test", ctx=None, timeout=5.0):
    ctx = ctx or client_ctx(pki, cert)
    raw = setup.raw(timeout)
    return TLSLines(ctx.wrap_socket(raw, server_hostname=server_hostname))


def raw_starttls(sock, pki, cert=None, server_hostname="mail.test"):
    ctx = client_ctx(pki, cert)
    return TLSLines(ctx.wrap_socket(sock, server_hostname=server_hostname))


def ssl_headers(req):
    return [(n, v) for n, v in req.headers if n.lower().startswith("auth-ssl")]


def auth_escape(text):
    return "".join("%%%02X" % ord(c) if ord(c) <= 0x20 or c == "%" else c for c in text)


# ---------------------------------------------------------------------------------------------
# implicit TLS

def test_implicit_tls_pop3(tls_setup, pki):
    s = tls_setup("pop3")
    p = track(poplib.POP3_SSL(s.host, s.port, context=client_ctx(pki), timeout=5))
    assert p.getwelcome() == b"+OK POP3 ready"
    resp, caps, _ = p._longcmd("CAPA")
    assert caps == [b"TOP", b"USER", b"UIDL", b"SASL PLAIN LOGIN"]     # no STLS on TLS
    p.user("alice")
    assert p.pass_("secret").startswith(b"+OK")
    req = s.auth.wait_requests(1)[0]
    assert ssl_headers(req) == [("Auth-SSL", "on"), ("Auth-SSL-Protocol", "TLSv1.3"),
                                ("Auth-SSL-Cipher", p.sock.cipher()[0])]
    assert p.stat()[0] == 2              # relayed over TLS (needs the relay's TLS endpoint)
    p.quit()


def test_implicit_tls_stls_refused(tls_setup, pki):
    s = tls_setup("pop3", starttls="on")
    c = tls_connect(s, pki)
    assert c.readline() == b"+OK POP3 ready\r\n"
    assert c.cmd(b"STLS") == b"-ERR invalid command\r\n"      # TLS is already active
    caps = [c.cmd(b"CAPA")] + [c.readline() for _ in range(5)]
    assert b"STLS\r\n" not in caps


def test_implicit_tls_imap(tls_setup, pki):
    s = tls_setup("imap", starttls="on")
    m = imaplib.IMAP4_SSL(s.host, s.port, ssl_context=client_ctx(pki), timeout=5)
    track(m, m.shutdown)
    assert m.welcome == b"* OK IMAP4 ready"
    typ, data = m.capability()
    assert data == [b"IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN"]
    with pytest.raises(m.error):
        m._simple_command("STARTTLS")
    typ, _ = m.login("alice", "secret")
    assert typ == "OK"
    req = s.auth.wait_requests(1)[0]
    assert req.header("Auth-SSL") == "on" and req.header("Auth-SSL-Protocol") == "TLSv1.3"
    m.logout()


def test_implicit_tls_smtp(tls_setup, pki):
    s = tls_setup("smtp", starttls="on", server_name="mx.test")
    c = track(smtplib.SMTP_SSL(s.host, s.port, context=client_ctx(pki), timeout=5))
    code, text = c.ehlo("client.test")
    assert code == 250 and text == b"mx.test\nAUTH PLAIN LOGIN"
    assert c.docmd("STARTTLS") == (500, b"5.5.1 Invalid command")
    assert c.login("alice", "secret")[0] == 235
    req = s.auth.wait_requests(1)[0]
    assert req.header("Auth-SSL") == "on"
    c.close()


def test_implicit_tls_ecdsa_and_rsa_certificates(tls_setup, pki):
    s = tls_setup("pop3", ssl_certificate=[pki.server_rsa[0], pki.server_ec[0]],
                  ssl_certificate_key=[pki.server_rsa[1], pki.server_ec[1]])
    for cipher, want in (("ECDHE-ECDSA-AES128-GCM-SHA256", "EC"),
                         ("ECDHE-RSA-AES128-GCM-SHA256", "RSA")):
        ctx = client_ctx(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
        ctx.set_ciphers(cipher)
        c = tls_connect(s, pki, ctx=ctx)
        der = c.sock.getpeercert(binary_form=True)
        own = Path(pki.server_ec[0] if want == "EC" else pki.server_rsa[0]).read_text()
        assert der == ssl.PEM_cert_to_DER_cert(own)
        assert c.readline() == b"+OK POP3 ready\r\n"
        c.sock.close()


def test_encrypted_key_with_password_file(tls_setup, pki):
    s = tls_setup("pop3", ssl_certificate_key=pki.server_rsa_enc_key,
                  ssl_password_file=pki.password_file)
    c = tls_connect(s, pki)
    assert c.readline() == b"+OK POP3 ready\r\n"


def test_failed_handshake_logged_at_info_and_closed(tls_setup, pki):
    s = tls_setup("imap", ssl_protocols="TLSv1.3")
    ctx = client_ctx(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError):
        tls_connect(s, pki, ctx=ctx)
    line = s.proxy.wait_log("SSL_do_handshake() failed")
    assert "[info]" in line and "while SSL handshaking, client: 127.0.0.1" in line
    # a TLSv1.3 client is fine
    c = tls_connect(s, pki)
    assert c.readline() == b"* OK IMAP4 ready\r\n"
    assert c.sock.version() == "TLSv1.3"


def test_tls12_only_config_and_ciphers(tls_setup, pki):
    s = tls_setup("pop3", ssl_protocols="TLSv1.2", ssl_ciphers="ECDHE-RSA-AES256-GCM-SHA384")
    c = tls_connect(s, pki)
    assert c.readline() == b"+OK POP3 ready\r\n"
    assert c.sock.version() == "TLSv1.2"
    assert c.sock.cipher()[0] == "ECDHE-RSA-AES256-GCM-SHA384"
    ctx = client_ctx(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    with pytest.raises(ssl.SSLError):
        tls_connect(s, pki, ctx=ctx)


def test_stalled_handshake_cut_by_timeout(tls_setup, pki):
    s = tls_setup("pop3", timeout="500ms")
    raw = s.raw()
    raw.sendall(b"\x16\x03\x01")          # the start of a ClientHello, then nothing
    start = time.monotonic()
    raw.settimeout(5)
    assert raw.recv(100) == b""           # closed without any protocol message
    assert 0.4 < time.monotonic() - start < 2.5
    line = s.proxy.wait_log("client timed out")
    assert "[info]" in line and "(110: Connection timed out) while SSL handshaking" in line


def test_alpn(tls_setup, pki):
    s = tls_setup("imap")
    ctx = client_ctx(pki)
    ctx.set_alpn_protocols(["imap"])
    c = tls_connect(s, pki, ctx=ctx)
    assert c.sock.selected_alpn_protocol() == "imap"
    assert c.readline() == b"* OK IMAP4 ready\r\n"
    ctx = client_ctx(pki)
    ctx.set_alpn_protocols(["pop3", "h2"])
    with pytest.raises(ssl.SSLError, match="NO_APPLICATION_PROTOCOL|no application protocol"):
        tls_connect(s, pki, ctx=ctx)


# ---------------------------------------------------------------------------------------------
# STARTTLS / STLS

def test_pop3_stls(tls_setup, pki):
    s = tls_setup("pop3", ssl_listen=False, starttls="on")
    p = track(poplib.POP3(s.host, s.port, timeout=5))
    assert p._longcmd("CAPA")[1] == [b"TOP", b"USER", b"UIDL", b"SASL PLAIN LOGIN", b"STLS"]
    assert p.stls(client_ctx(pki)) == b"+OK"
    assert p._longcmd("CAPA")[1] == [b"TOP", b"USER", b"UIDL", b"SASL PLAIN LOGIN"]
    p.user("alice")
    assert p.pass_("secret").startswith(b"+OK")
    req = s.auth.wait_requests(1)[0]
    assert req.header("Auth-SSL") == "on"
    line = s.proxy.wait_log("client logged in")
    assert "client: 127.0.0.1 using starttls, server: 127.0.0.1:%d" % s.port in line
    assert p.stat()[0] == 2              # relayed over TLS (needs the relay's TLS endpoint)


def test_pop3_starttls_only(tls_setup, pki):
    s = tls_setup("pop3", ssl_listen=False, starttls="only")
    p = track(poplib.POP3(s.host, s.port, timeout=5))
    assert p._longcmd("CAPA")[1] == [b"TOP", b"UIDL", b"STLS"]
    for cmd in ("USER alice", "AUTH", "AUTH PLAIN " + b64("\0alice\0secret"), "APOP a b"):
        with pytest.raises(poplib.error_proto, match="invalid command"):
            p._shortcmd(cmd)
    assert p.stls(client_ctx(pki)) == b"+OK"
    assert p._longcmd("CAPA")[1] == [b"TOP", b"USER", b"UIDL", b"SASL PLAIN LOGIN"]
    assert p.user("alice") == b"+OK"
    assert p.pass_("secret").startswith(b"+OK")


def test_pop3_stls_refused_when_off_and_in_user_state(tls_setup, pki):
    s = tls_setup("pop3", ssl_listen=False, starttls="off")
    c = s.raw()
    assert readline_raw(c) == b"+OK POP3 ready\r\n"
    c.sendall(b"STLS\r\n")
    assert readline_raw(c) == b"-ERR invalid command\r\n"


def test_pop3_stls_injection_defence(tls_setup, pki):
    s = tls_setup("pop3", ssl_listen=False, starttls="on")
    c = s.raw()
    assert readline_raw(c) == b"+OK POP3 ready\r\n"
    c.sendall(b"STLS\r\nUSER evil\r\n")             # one write: USER must never run
    assert readline_raw(c) == b"+OK\r\n"
    t = raw_starttls(c, pki)
    # had USER run after the upgrade, this PASS would start a login
    assert t.cmd(b"PASS pw") == b"-ERR invalid command\r\n"
    assert t.cmd(b"NOOP") == b"+OK\r\n"
    time.sleep(0.1)
    assert s.auth.requests == []


def test_imap_starttls(tls_setup, pki):
    s = tls_setup("imap", ssl_listen=False, starttls="on")
    m = imaplib.IMAP4(s.host, s.port, timeout=5)
    track(m, m.shutdown)
    assert m.capability()[1] == [b"IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN STARTTLS"]
    assert m.starttls(client_ctx(pki))[0] == "OK"
    assert m.capability()[1] == [b"IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN"]
    assert m.login("alice", "secret")[0] == "OK"
    assert s.auth.wait_requests(1)[0].header("Auth-SSL") == "on"


def test_imap_starttls_only(tls_setup, pki):
    s = tls_setup("imap", ssl_listen=False, starttls="only")
    c = s.raw()
    assert readline_raw(c) == b"* OK IMAP4 ready\r\n"
    c.sendall(b"a CAPABILITY\r\n")
    assert readline_raw(c) == b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS STARTTLS LOGINDISABLED\r\n"
    assert readline_raw(c) == b"a OK completed\r\n"
    c.sendall(b"b LOGIN alice secret\r\n")
    assert readline_raw(c) == b"b BAD invalid command\r\n"
    c.sendall(b"c AUTHENTICATE PLAIN\r\n")
    assert readline_raw(c) == b"c BAD invalid command\r\n"
    c.sendall(b"d STARTTLS\r\n")
    assert readline_raw(c) == b"d OK completed\r\n"
    t = raw_starttls(c, pki)
    assert t.cmd(b"e CAPABILITY") == b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN\r\n"
    assert t.readline() == b"e OK completed\r\n"
    assert t.cmd(b"f STARTTLS") == b"f BAD invalid command\r\n"


def test_imap_starttls_injection_defence(tls_setup, pki):
    s = tls_setup("imap", ssl_listen=False, starttls="on")
    c = s.raw()
    assert readline_raw(c) == b"* OK IMAP4 ready\r\n"
    c.sendall(b"a STARTTLS\r\nb LOGIN evil pw\r\n")
    assert readline_raw(c) == b"a OK completed\r\n"
    t = raw_starttls(c, pki)
    assert t.cmd(b"c NOOP") == b"c OK completed\r\n"     # no reply to b was ever sent
    time.sleep(0.1)
    assert s.auth.requests == []


def test_smtp_starttls(tls_setup, pki):
    s = tls_setup("smtp", ssl_listen=False, starttls="on", server_name="mx.test",
                  smtp_capabilities="PIPELINING")
    c = track(smtplib.SMTP(s.host, s.port, timeout=5))
    code, text = c.ehlo("client.test")
    assert text == b"mx.test\nPIPELINING\nAUTH PLAIN LOGIN\nSTARTTLS"
    assert c.starttls(context=client_ctx(pki))[0] == 220
    code, text = c.ehlo("client.test")
    assert text == b"mx.test\nPIPELINING\nAUTH PLAIN LOGIN"
    assert c.login("alice", "secret")[0] == 235
    assert s.auth.wait_requests(1)[0].header("Auth-SSL") == "on"


def test_smtp_starttls_only_and_forgets_helo_mail(tls_setup, pki):
    s = tls_setup("smtp", ssl_listen=False, starttls="only", server_name="mx.test",
                  smtp_capabilities="PIPELINING", smtp_auth="plain none")
    c = s.raw()
    assert readline_raw(c).startswith(b"220 ")
    c.sendall(b"EHLO client.test\r\n")
    assert [readline_raw(c) for _ in range(3)] == [b"250-mx.test\r\n", b"250-PIPELINING\r\n",
                                                   b"250 STARTTLS\r\n"]
    c.sendall(b"AUTH PLAIN " + b64("\0alice\0secret").encode() + b"\r\n")
    assert readline_raw(c) == b"500 5.5.1 Invalid command\r\n"
    c.sendall(b"MAIL FROM:<a@b.test>\r\n")       # allowed before TLS (as in ngx_mail_smtp_mail)
    assert readline_raw(c) == b"250 2.0.0 OK\r\n"
    c.sendall(b"STARTTLS\r\n")
    assert readline_raw(c) == b"220 2.0.0 Start TLS\r\n"
    t = raw_starttls(c, pki)
    # MAIL was forgotten: RCPT has no MAIL to follow
    assert t.cmd(b"RCPT TO:<c@d.test>") == b"503 5.5.1 Bad sequence of commands\r\n"
    assert t.cmd(b"STARTTLS") == b"500 5.5.1 Invalid command\r\n"
    t.send(b"EHLO client.test\r\n")
    assert [t.readline() for _ in range(3)] == [b"250-mx.test\r\n", b"250-PIPELINING\r\n",
                                                b"250 AUTH PLAIN\r\n"]


def test_smtp_starttls_injection_defence(tls_setup, pki):
    s = tls_setup("smtp", ssl_listen=False, starttls="on", server_name="mx.test")
    c = s.raw()
    assert readline_raw(c).startswith(b"220 ")
    c.sendall(b"EHLO c\r\nSTARTTLS\r\nQUIT\r\n")       # one write
    assert readline_raw(c) == b"250-mx.test\r\n"
    assert readline_raw(c) == b"250-AUTH PLAIN LOGIN\r\n"
    assert readline_raw(c) == b"250 STARTTLS\r\n"
    assert readline_raw(c) == b"220 2.0.0 Start TLS\r\n"
    t = raw_starttls(c, pki)
    assert t.cmd(b"NOOP") == b"250 2.0.0 OK\r\n"       # QUIT was discarded, not executed


def test_starttls_handshake_failure_closes(tls_setup, pki):
    s = tls_setup("pop3", ssl_listen=False, starttls="on")
    c = s.raw()
    readline_raw(c)
    c.sendall(b"STLS\r\n")
    assert readline_raw(c) == b"+OK\r\n"
    c.sendall(b"this is not TLS\r\n")
    c.settimeout(3)
    try:
        while c.recv(100):          # at most a TLS alert record, then the close
            pass
    except ConnectionResetError:    # our unread garbage makes the kernel send RST
        pass
    line = s.proxy.wait_log("SSL_do_handshake() failed")
    assert "[info]" in line and "using starttls" in line


# ---------------------------------------------------------------------------------------------
# client certificates


def test_client_cert_valid_headers(tls_setup, pki):
    s = tls_setup("pop3", ssl_verify_client="on", ssl_client_certificate=pki.ca,
                  auth_http_pass_client_cert="on")
    c = tls_connect(s, pki, cert=pki.client)
    assert c.readline() == b"+OK POP3 ready\r\n"
    assert c.cmd(b"USER alice") == b"+OK\r\n"
    c.send(b"PASS secret\r\n")
    req = s.auth.wait_requests(1)[0]
    pem = Path(pki.client[0]).read_text()
    der = ssl.PEM_cert_to_DER_cert(pem)
    assert ssl_headers(req) == [
        ("Auth-SSL", "on"), ("Auth-SSL-Protocol", "TLSv1.3"),
        ("Auth-SSL-Cipher", c.sock.cipher()[0]),
        ("Auth-SSL-Verify", "SUCCESS"),
        ("Auth-SSL-Subject", "O=Client Org,CN=client.test"),
        ("Auth-SSL-Issuer", "CN=Test CA,O=Test Org"),
        ("Auth-SSL-Serial", pki.client_serial),
        ("Auth-SSL-Fingerprint", hashlib.sha1(der).hexdigest()),
        ("Auth-SSL-Cert", auth_escape(ssl.DER_cert_to_PEM_cert(der))),
    ]


@pytest.mark.parametrize("protocol,reply", [
    ("pop3", b"-ERR No required SSL certificate\r\n"),
    ("imap", b"* BYE No required SSL certificate\r\n"),
    ("smtp", b"421 4.7.1 No required SSL certificate\r\n"),
])
def test_client_cert_missing_with_on(tls_setup, pki, protocol, reply):
    s = tls_setup(protocol, ssl_verify_client="on", ssl_trusted_certificate=pki.ca)
    c = tls_connect(s, pki)
    assert c.readline() == reply
    assert c.closed()
    s.proxy.wait_log("client sent no required SSL certificate")


@pytest.mark.parametrize("which,code", [
    ("expired", "10:certificate has expired"),
    ("revoked", "23:certificate revoked"),
    ("stranger", "21:unable to verify the first certificate"),
])
def test_client_cert_rejected(tls_setup, pki, which, code):
    s = tls_setup("pop3", ssl_verify_client="on", ssl_client_certificate=pki.ca,
                  ssl_crl=pki.crl)
    c = tls_connect(s, pki, cert=getattr(pki, which))
    assert c.readline() == b"-ERR SSL certificate error\r\n"
    assert c.closed()
    line = s.proxy.wait_log("client SSL certificate verify error: (%s)" % code)
    assert "[info]" in line


@pytest.mark.parametrize("protocol,reply", [
    ("imap", b"* BYE SSL certificate error\r\n"),
    ("smtp", b"421 4.7.1 SSL certificate error\r\n"),
])
def test_client_cert_error_lines(tls_setup, pki, protocol, reply):
    s = tls_setup(protocol, ssl_verify_client="optional", ssl_client_certificate=pki.ca)
    c = tls_connect(s, pki, cert=pki.expired)
    assert c.readline() == reply
    assert c.closed()


def test_client_cert_error_after_starttls(tls_setup, pki):
    s = tls_setup("imap", ssl_listen=False, starttls="on", ssl_verify_client="on",
                  ssl_client_certificate=pki.ca)
    c = s.raw()
    readline_raw(c)
    c.sendall(b"a STARTTLS\r\n")
    assert readline_raw(c) == b"a OK completed\r\n"
    t = raw_starttls(c, pki, cert=pki.stranger)
    assert t.readline() == b"* BYE SSL certificate error\r\n"


def test_client_cert_optional(tls_setup, pki):
    s = tls_setup("pop3", ssl_verify_client="optional", ssl_client_certificate=pki.ca)
    c = tls_connect(s, pki)
    assert c.readline() == b"+OK POP3 ready\r\n"
    c.cmd(b"USER alice")
    c.send(b"PASS secret\r\n")
    req = s.auth.wait_requests(1)[0]
    assert req.header("Auth-SSL-Verify") == "NONE"
    assert req.header("Auth-SSL-Subject") is None and req.header("Auth-SSL-Cert") is None


def test_client_cert_optional_no_ca(tls_setup, pki):
    s = tls_setup("pop3", ssl_verify_client="optional_no_ca")
    c = tls_connect(s, pki, cert=pki.stranger)
    assert c.readline() == b"+OK POP3 ready\r\n"
    c.cmd(b"USER alice")
    c.send(b"PASS secret\r\n")
    req = s.auth.wait_requests(1)[0]
    assert req.header("Auth-SSL-Verify") == "FAILED:unable to verify the first certificate"
    assert req.header("Auth-SSL-Subject") == "CN=stranger.test"
    assert req.header("Auth-SSL-Issuer") == "CN=Other CA,O=Other Org"


def test_sasl_external_with_client_cert(tls_setup, pki):
    s = tls_setup("imap", ssl_verify_client="on", ssl_client_certificate=pki.ca,
                  imap_auth="external")
    c = tls_connect(s, pki, cert=pki.client)
    assert c.readline() == b"* OK IMAP4 ready\r\n"
    assert c.cmd(b"a CAPABILITY") == b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=EXTERNAL\r\n"
    c.readline()
    c.send(b"b AUTHENTICATE EXTERNAL " + b64("alice").encode() + b"\r\n")
    req = s.auth.wait_requests(1)[0]
    assert req.header("Auth-Method") == "external" and req.header("Auth-User") == "alice"
    assert req.header("Auth-Pass") == ""
    assert req.header("Auth-SSL-Verify") == "SUCCESS"
    assert req.header("Auth-SSL-Subject") == "O=Client Org,CN=client.test"


# ---------------------------------------------------------------------------------------------
# SNI (our addition)

def test_sni_certificate_choice(tls_setup, pki):
    s = tls_setup("imap", ssl_certificate_sni=[
        "imap.example.com %s %s" % pki.sni_exact, "*.example.org %s %s" % pki.sni_wild])

    def subject_cn(name):
        c = tls_connect(s, pki, server_hostname=name, ctx=client_ctx(pki, check_hostname=False))
        cert = c.sock.getpeercert()
        assert c.readline() == b"* OK IMAP4 ready\r\n"
        c.sock.close()
        return dict(x[0] for x in cert["subject"])["commonName"]

    assert subject_cn("imap.example.com") == "imap.example.com"
    assert subject_cn("IMAP.Example.COM") == "imap.example.com"
    assert subject_cn("mx.example.org") == "*.example.org"
    assert subject_cn("a.b.example.org") == "*.example.org"
    assert subject_cn("example.org") == "mail.test"
    assert subject_cn("other.test") == "mail.test"
    c = tls_connect(s, pki, server_hostname="mx.example.org")
    c.readline()
    c.send(b"a LOGIN alice secret\r\n")
    req = s.auth.wait_requests(1)[0]
    assert req.header("Auth-SSL-Server-Name") == "mx.example.org"


# ---------------------------------------------------------------------------------------------
# configuration

def _conf_error(tmp_path, **directives):
    block = {"listen": "127.0.0.1:10995 ssl", "protocol": "pop3",
             "proxy_pass": "127.0.0.1:110"}
    block.update(directives)
    path = tmp_path / "tls.ini"
    path.write_text(ini(servers={"p": block}))
    with pytest.raises(config.ConfigError) as ei:
        load_config(str(path))          # the values, then the files and contexts
    return ei.value


def test_config_missing_certificate(tmp_path, pki):
    err = _conf_error(tmp_path)
    assert err.message == 'no "ssl_certificate" is defined for the "listen ... ssl" directive'
    assert err.line == 2
    err = _conf_error(tmp_path, listen="127.0.0.1:10110", starttls="on")
    assert err.message == 'no "ssl_certificate" is defined for the "starttls" directive'
    assert err.line == 5
    err = _conf_error(tmp_path, ssl_certificate=pki.server_rsa[0])
    assert err.message == 'no "ssl_certificate_key" is defined for the "listen ... ssl" directive'


def test_config_errors(tmp_path, pki):
    cert = dict(ssl_certificate=pki.server_rsa[0], ssl_certificate_key=pki.server_rsa[1])
    cases = [
        (dict(ssl_verify_client="on"),
         "no ssl_client_certificate or ssl_trusted_certificate for ssl_verify_client"),
        (dict(ssl_certificate=str(tmp_path / "nope.pem")), 'cannot load certificate "'),
        (dict(ssl_certificate_key=pki.server_ec[1]), "cannot load certificate"),
        (dict(ssl_certificate_key=pki.server_rsa_enc_key), "cannot load certificate"),
        (dict(ssl_protocols="SSLv3 TLSv1.2"), '"ssl_protocols SSLv3 TLSv1.2" is not supported'),
        (dict(ssl_ciphers="NOSUCHCIPHER"), 'invalid "ssl_ciphers" value'),
        (dict(ssl_ecdh_curve="nosuchcurve"), 'unknown curve "nosuchcurve"'),
        (dict(ssl_session_ticket_key=str(tmp_path / "t.key")),
         'open() "%s" failed' % (tmp_path / "t.key")),
        (dict(ssl_certificate_compression="on"), '"ssl_certificate_compression on" is not'),
        (dict(ssl_conf_command="NoSuchCommand x"), 'SSL_CONF_cmd("NoSuchCommand") failed'),
        (dict(ssl_client_certificate=str(tmp_path / "ca.pem"), ssl_verify_client="on"),
         'cannot load "ssl_client_certificate" file'),
    ]
    for extra, message in cases:
        d = dict(cert)
        d.update(extra)
        err = _conf_error(tmp_path, **d)
        assert message in err.message, (extra, err.message)
        assert err.file and err.line, extra


def test_config_accepts_what_python_can_honour(tmp_path, pki):
    block = {"listen": "127.0.0.1:10995 ssl", "protocol": "pop3", "proxy_pass": "127.0.0.1:110",
             "ssl_certificate": pki.server_rsa[0], "ssl_certificate_key": pki.server_rsa[1],
             "ssl_session_cache": "builtin:1000", "ssl_session_timeout": "10m",
             "ssl_session_tickets": "off", "ssl_ecdh_curve": "X25519:prime256v1",
             "ssl_prefer_server_ciphers": "on", "ssl_verify_client": "optional",
             "ssl_trusted_certificate": pki.ca, "ssl_verify_depth": "2", "ssl_crl": pki.crl,
             "ssl_conf_command": "Options PrioritizeChaCha",
             "ssl_protocols": "TLSv1.2 TLSv1.3"}
    path = tmp_path / "ok.ini"
    path.write_text(ini(servers={"p": block}))
    cfg = load_config(str(path))
    from mailproxy import tls
    ctx = tls.server_context(cfg.servers[0])
    assert ctx.options & ssl.OP_NO_TICKET
    assert ctx is tls.server_context(cfg.servers[0])          # built once


def test_dash_t_catches_bad_certificate_path(tmp_path, pki):
    path = tmp_path / "t.ini"
    path.write_text(ini(servers={"p": {
        "listen": "127.0.0.1:10995 ssl", "protocol": "pop3", "proxy_pass": "127.0.0.1:110",
        "ssl_certificate": str(tmp_path / "missing.pem"), "ssl_certificate_key": pki.server_rsa[1]}}))
    r = subprocess.run([sys.executable, "-m", "mailproxy", "-t", "-c", str(path)], cwd=str(REPO),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert 'cannot load certificate "%s"' % (tmp_path / "missing.pem") in r.stderr
    assert "t.ini:" in r.stderr
