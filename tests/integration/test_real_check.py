"""`mailproxy check` against the real Dovecot and Postfix the suite starts: set up right (IMAP and
POP3 with STARTTLS verified against the test CA, SMTP with XCLIENT and AUTH), and wrong (a
Postfix without smtpd_authorized_xclient_hosts for the proxy: an error finding, exit 2)."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.process import free_port, ini
from tests.support.realservers import Postfix

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def check(tmp_path, servers):
    path = tmp_path / "check.ini"
    path.write_text(ini(main={"pid": str(tmp_path / "x.pid")}, servers=servers))
    r = subprocess.run([sys.executable, str(REPO / "mailproxy.py"), "-q", "-c", str(path),
                        "check"], capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout.splitlines()


def block(protocol, target, **kw):
    return dict({"listen": "127.0.0.1:%d" % free_port(), "protocol": protocol,
                 "proxy_pass": target, "server_name": "proxy.test"}, **kw)


def test_right_setup(tmp_path, dovecot, postfix, pki):
    code, lines = check(tmp_path, {
        "imap": block("imap", "127.0.0.1:%d" % dovecot.ports["imap"], proxy_ssl="starttls",
                      proxy_ssl_trusted_certificate=pki.ca, proxy_ssl_name="mail.test"),
        "pop3s": block("pop3", "127.0.0.1:%d" % dovecot.ports["pop3s"], proxy_ssl="on",
                       proxy_ssl_trusted_certificate=pki.ca, proxy_ssl_name="mail.test"),
        "smtp": block("smtp", "127.0.0.1:%d" % postfix.port, proxy_smtp_auth="on"),
    })
    assert code == 0, lines
    text = "\n".join(lines)
    assert "ok    [server imap] backend 127.0.0.1:%d (imap): TLS" % dovecot.ports["imap"] in text
    assert "certificate verified" in text
    assert "ok    [server pop3s] backend 127.0.0.1:%d (pop3) greets: \"+OK" \
        % dovecot.ports["pop3s"] in text
    assert "ok    [server smtp] backend 127.0.0.1:%d (smtp) accepts XCLIENT" % postfix.port in text
    assert "ok    [server smtp] backend 127.0.0.1:%d (smtp) offers AUTH PLAIN" % postfix.port \
        in text


def test_postfix_without_xclient_hosts_is_an_error(tmp_path, dovecot, children, workdir):
    p = Postfix(workdir, sasl_path=str(dovecot.auth_socket), xclient_hosts="")
    children.append(p)
    code, lines = check(tmp_path, {"smtp": block("smtp", "127.0.0.1:%d" % p.port,
                                                 proxy_smtp_auth="on")})
    assert code == 2, lines
    assert ("error [server smtp] backend 127.0.0.1:%d (smtp): no XCLIENT in its EHLO but "
            "xclient is on (Postfix: smtpd_authorized_xclient_hosts must name the proxy)"
            % p.port) in lines, lines


def test_wrong_name_for_dovecot_certificate(tmp_path, dovecot, pki):
    code, lines = check(tmp_path, {
        "imaps": block("imap", "127.0.0.1:%d" % dovecot.ports["imaps"], proxy_ssl="on",
                       proxy_ssl_trusted_certificate=pki.ca, proxy_ssl_name="wrong.test")})
    assert code == 2, lines
    assert any(x.startswith("error [server imaps] backend") and "certificate does not verify"
               in x for x in lines), lines
