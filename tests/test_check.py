"""`mailproxy -c FILE check`, whole-process, against the test fakes set up right and wrong:
each finding's line and the exit status (0 all well, 1 warnings, 2 errors)."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.auth import AuthServer, auth_ok
from tests.support.mailbackends import ImapBackend, Pop3Backend, SmtpBackend
from tests.support.process import free_port, ini
from tests.support.tlsbackend import TlsBackend, server_context

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = [sys.executable, str(REPO / "mailproxy.py")]


@pytest.fixture
def auth():
    servers = []

    def make(**kw):
        s = AuthServer(**kw)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.stop()


def check(tmp_path, servers, mail=None, *extra):
    path = tmp_path / "check.ini"
    path.write_text(ini(main={"pid": str(tmp_path / "x.pid")}, mail=mail, servers=servers))
    r = subprocess.run(LAUNCHER + ["-q", "-c", str(path), "check"] + list(extra),
                       capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout.splitlines(), r.stderr


def server(protocol, **kw):
    return dict({"listen": "127.0.0.1:%d" % free_port(), "protocol": protocol}, **kw)


def line(lines, start, *parts):
    found = [x for x in lines if x.startswith(start) and all(p in x for p in parts)]
    assert found, "no line %r with %r in:\n%s" % (start, parts, "\n".join(lines))
    return found[0]


def test_right_setup_is_all_ok(tmp_path, auth, backend_factory, pki):
    a = auth()                                   # refuses every user (no route)
    pop3 = backend_factory(Pop3Backend, expect_errors=True)
    smtp = backend_factory(SmtpBackend, auth="PLAIN LOGIN", expect_errors=True)
    code, lines, err = check(tmp_path, {
        "imap": server("imap", auth_http=a.url, ssl_certificate=pki.server_ec[0],
                       ssl_certificate_key=pki.server_ec[1]),
        "pop3": server("pop3", proxy_pass=pop3.address),
        "smtp": server("smtp", proxy_pass=smtp.address, proxy_smtp_auth="on",
                       smtp_capabilities="PIPELINING 8BITMIME"),
    })
    assert code == 0, (lines, err)
    assert all(x.startswith("ok    ") for x in lines), lines
    line(lines, "ok    [server imap] auth_http %s answers" % a.url, "for an unknown user")
    assert a.requests and a.requests[0].header("Auth-User").startswith("mailproxy-check-")
    line(lines, "ok    [server pop3] backend %s (pop3) greets: \"+OK ready\"" % pop3.address)
    line(lines, "ok    [server smtp] backend %s (smtp) accepts XCLIENT" % smtp.address)
    line(lines, "ok    [server smtp] backend %s (smtp) offers AUTH PLAIN" % smtp.address)
    line(lines, 'ok    [server imap] certificate "%s" (its key matches) valid until'
         % pki.server_ec[0])
    assert pop3.sessions and smtp.sessions


def test_wrong_setup_is_errors(tmp_path, auth, backend_factory):
    a = auth(respond=lambda req: auth_ok(1))     # lets anyone in
    imap = backend_factory(ImapBackend, expect_errors=True)
    no_xclient = backend_factory(SmtpBackend, auth="LOGIN", expect_errors=True, replies={
        b"EHLO": ["250-backend.test", "250-SIZE 1000", "250-AUTH LOGIN", "250 8BITMIME"]})
    down = "127.0.0.1:%d" % free_port()
    code, lines, err = check(tmp_path, {
        "pop3": server("pop3", proxy_pass=imap.address),
        "imap": server("imap", proxy_pass=down, auth_http=None),
        "smtp": server("smtp", proxy_pass=no_xclient.address, proxy_smtp_auth="on",
                       smtp_capabilities="CHUNKING BURL \"SIZE 2000\" 8BITMIME"),
        "smtp2": server("smtp", auth_http=a.url),
    })
    assert code == 2, (lines, err)
    line(lines, "error [server pop3] backend %s (pop3): not a POP3 greeting: \"* OK"
         % imap.address)
    line(lines, "error [server imap] backend %s (imap): connect() failed (111: Connection "
         "refused)" % down)
    line(lines, "error [server smtp] backend %s (smtp): no XCLIENT in its EHLO but xclient is "
         "on (Postfix: smtpd_authorized_xclient_hosts" % no_xclient.address)
    line(lines, "error [server smtp] backend %s (smtp): no AUTH PLAIN in its EHLO but "
         "proxy_smtp_auth is on" % no_xclient.address)
    line(lines, "warn  [server smtp] backend %s (smtp) lacks CHUNKING" % no_xclient.address)
    line(lines, "warn  [server smtp] backend %s (smtp) lacks BURL" % no_xclient.address)
    line(lines, "warn  [server smtp] backend %s (smtp) takes SIZE 1000, smtp_capabilities "
         "advertises SIZE 2000" % no_xclient.address)
    assert not [x for x in lines if "lacks 8BITMIME" in x]
    line(lines, "warn  [server smtp2] auth_http %s: accepted the unknown user" % a.url)


def test_warnings_only_exit_1(tmp_path, auth):
    cert, key = tmp_path / "soon.pem", tmp_path / "soon.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "5", "-subj", "/CN=soon.test"], check=True, capture_output=True)
    a = auth()
    code, lines, err = check(tmp_path, {"imap": server("imap", auth_http=a.url,
                                                       ssl_certificate=str(cert),
                                                       ssl_certificate_key=str(key))})
    assert code == 1, (lines, err)
    line(lines, 'warn  [server imap] certificate "%s" (its key matches) expires in ' % cert,
         "days")


def test_backend_tls_verified_or_not(tmp_path, backend_factory, certs):
    ctx = server_context(certs)
    good = backend_factory(TlsBackend, "pop3", "on", ctx, expect_errors=True)
    stranger = backend_factory(TlsBackend, "pop3", "on", ctx, expect_errors=True)
    refuses = backend_factory(TlsBackend, "imap", "starttls", ctx, refuse_starttls=True,
                              expect_errors=True)
    starttls = backend_factory(TlsBackend, "imap", "starttls", ctx, expect_errors=True)
    code, lines, err = check(tmp_path, {
        "good": server("pop3", proxy_pass=good.address, proxy_ssl="on",
                       proxy_ssl_trusted_certificate=certs["ca"]),
        "stranger": server("pop3", proxy_pass=stranger.address, proxy_ssl="on",
                           proxy_ssl_trusted_certificate=certs["otherca"]),
        "refuses": server("imap", proxy_pass=refuses.address, proxy_ssl="starttls",
                          proxy_ssl_trusted_certificate=certs["ca"]),
        "starttls": server("imap", proxy_pass=starttls.address, proxy_ssl="starttls",
                           proxy_ssl_trusted_certificate=certs["ca"]),
    })
    assert code == 2, (lines, err)
    line(lines, "ok    [server good] backend %s (pop3): TLS TLSv1.3, certificate verified"
         % good.address)
    line(lines, "ok    [server good] backend %s (pop3) greets" % good.address)
    line(lines, "error [server stranger] backend %s (pop3): certificate does not verify "
         "(unable to get local issuer certificate)" % stranger.address)
    line(lines, 'error [server refuses] backend %s (imap): refused STARTTLS: "c1 BAD'
         % refuses.address)
    line(lines, "ok    [server starttls] backend %s (imap): TLS TLSv1.3, certificate verified"
         % starttls.address)


def test_bad_configuration_and_usage_exit_2(tmp_path):
    path = tmp_path / "bad.ini"
    path.write_text("[server x]\nlisten = 127.0.0.1:1\nprotocol = nope\n")
    r = subprocess.run(LAUNCHER + ["-c", str(path), "check"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "test failed" in r.stderr and r.stdout == ""
    code, lines, err = check(tmp_path, {"x": server("pop3", proxy_pass="127.0.0.1:1")}, None,
                             "--bogus")
    assert code == 2 and 'invalid option for "check": "--bogus"' in err


def test_start_says_which_static_backends_it_cannot_reach(tmp_path, backend_factory):
    from tests.support.process import ProxyProcess
    up = backend_factory(Pop3Backend)
    down = "127.0.0.1:%d" % free_port()
    proxy = ProxyProcess(tmp_path, {"servers": {
        "up": server("pop3", proxy_pass=up.address),
        "down": server("pop3", proxy_pass=down)}}, log_level="notice")
    try:
        found = proxy.wait_log("backend %s is not reachable (111: Connection refused)" % down)
        assert "[notice]" in found
        proxy.wait_log("start worker process")
        assert not [x for x in proxy.log_lines() if up.address + " is not" in x]
    finally:
        proxy.stop()


@pytest.mark.parametrize("version,header", [("on", b"PROXY UNKNOWN\r\n"),
                                            ("v2", b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")])
def test_backend_behind_proxy_protocol_gets_a_local_header(tmp_path, backend_factory, version,
                                                           header):
    # a backend that reads a PROXY header first (Dovecot's haproxy = yes) greets only after it
    pop3 = backend_factory(Pop3Backend, proxy_protocol=True, expect_errors=True)
    code, lines, err = check(tmp_path, {
        "pop3": server("pop3", proxy_pass=pop3.address, proxy_protocol=version)})
    assert code == 0, lines + [err]
    line(lines, "ok    [server pop3] backend %s (pop3) greets" % pop3.address)
    assert pop3.wait_session(0).proxy_header == header
