"""README's walkthrough "A first real configuration: in front of Dovecot and Postfix" is true:
its INI, taken from README.md itself (between the `walkthrough.ini` markers) with only its
ports and file names changed, loads (`-t`), passes `mailproxy check` (exit 0) against the
suite's private Dovecot and Postfix, and carries IMAP, POP3 and SMTP submission logins to them
over TLS, the client's address reaching both. The Dovecot and Postfix settings README shows
are the ones those private servers run with."""

import imaplib
import poplib
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.process import free_port
from tests.support.realservers import CLIENT_IP, USERS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def walkthrough_ini():
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- walkthrough\.ini -->\n```ini\n(.*?)```\n<!-- /walkthrough\.ini -->",
                  text, re.S)
    assert m, "README.md lost its <!-- walkthrough.ini --> block"
    return m.group(1)


def substituted(text, subs):
    """Each (regex, replacement) must match exactly once: a README that drifts fails here."""
    for pattern, new in subs:
        text, n = re.subn(pattern, new, text, flags=re.M)
        assert n == 1, f"{pattern!r} matched {n} times in README's walkthrough INI"
    return text


@pytest.fixture
def walkthrough(proxy_factory, dovecot, postfix, pki, tmp_path):
    """The README's INI on this machine's ports and files: (ProxyProcess not started, ports)."""
    ports = {p: free_port() for p in (143, 993, 110, 995, 587, 465)}
    subs = [(rf"^    {p}( ssl)?$", rf"    127.0.0.1:{ports[p]}\1") for p in ports]
    subs += [
        (r"127\.0\.0\.1:10143$", "127.0.0.1:%d" % dovecot.ports["imap_haproxy"]),
        (r"127\.0\.0\.1:10110$", "127.0.0.1:%d" % dovecot.ports["pop3_haproxy"]),
        (r"127\.0\.0\.1:10587$", "127.0.0.1:%d" % postfix.port),
        (r"= /etc/letsencrypt/live/mail\.example\.org/fullchain\.pem$", "= " + pki.server_rsa[0]),
        (r"= /etc/letsencrypt/live/mail\.example\.org/privkey\.pem$", "= " + pki.server_rsa[1]),
        (r"= /var/log/mailproxy/access\.log$", "= %s" % (tmp_path / "access.log")),
    ]
    text = "[main]\nworker_processes = 1\n\n" + substituted(walkthrough_ini(), subs)
    proxy = proxy_factory(text, start=False, name="walkthrough")
    return proxy, ports


def run(proxy, *args):
    r = subprocess.run([sys.executable, str(REPO / "mailproxy.py"), "-c", str(proxy.conf_path)]
                       + list(args), capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


def client_context(pki):
    return ssl.create_default_context(cafile=pki.ca)     # the cert names 127.0.0.1 too


class IMAPSFrom(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(CLIENT_IP, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


class POP3SFrom(poplib.POP3_SSL):
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(CLIENT_IP, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)


def test_readme_shows_the_test_servers_settings(dovecot, postfix):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## A first real configuration"):]
    section = section[:section.index("\n## ", 1)]
    conf = dovecot.conf_path.read_text()
    for setting in ("haproxy_trusted_networks = 127.0.0.0/8", "disable_plaintext_auth = no",
                    "login_trusted_networks = 127.0.0.0/8", "haproxy = yes"):
        assert setting in section and setting in conf, setting
    main_cf = (postfix.etc / "main.cf").read_text()
    for name, value in (("smtpd_sasl_auth_enable", "yes"), ("smtpd_sasl_type", "dovecot"),
                        ("smtpd_authorized_xclient_hosts", None)):
        assert f"-o {name}=" + (value or "") in section, name
        assert re.search(rf"^{name} = {value or '.+'}$", main_cf, re.M), name


def test_walkthrough_loads_checks_and_carries_logins(walkthrough, pki, dovecot_log,
                                                      postfix_log, postfix):
    proxy, ports = walkthrough
    code, out = run(proxy, "-t")
    assert code == 0, out
    code, out = run(proxy, "check")
    assert code == 0, out
    assert "XCLIENT" in out and "AUTH PLAIN" in out, out
    proxy.start()
    ctx = client_context(pki)

    # IMAP: STARTTLS on "143" (starttls only: no LOGIN before it), then implicit TLS on "993"
    m = imaplib.IMAP4("127.0.0.1", ports[143], timeout=10)
    assert "LOGINDISABLED" in m.capabilities
    m.starttls(ssl_context=ctx)
    assert m.login("alice", USERS["alice"])[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()
    m = IMAPSFrom("127.0.0.1", ports[993], ssl_context=ctx, timeout=10)
    assert m.login("alice", USERS["alice"])[0] == "OK"
    m.logout()
    dovecot_log.wait(r"imap-login: Info: Login: user=<alice>, method=PLAIN, rip=127\.0\.0\.2")

    # POP3 on "995"
    p = POP3SFrom("127.0.0.1", ports[995], context=ctx, timeout=10)
    p.user("alice")
    p.pass_(USERS["alice"])
    p.stat()
    p.quit()
    dovecot_log.wait(r"pop3-login: Info: Login: user=<alice>, method=PLAIN, rip=127\.0\.0\.2")

    # SMTP submission on "587": STARTTLS, AUTH checked by Postfix through Dovecot, XCLIENT
    token = uuid.uuid4().hex
    body = (f"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: {token}\r\n\r\n"
            f"walkthrough\r\n")
    with smtplib.SMTP("127.0.0.1", ports[587], timeout=15,
                      source_address=(CLIENT_IP, 0)) as s:
        s.starttls(context=ctx)
        s.login("alice", USERS["alice"])
        s.sendmail("alice@example.org", ["bob@example.org"], body)
    postfix_log.wait(r"\[127\.0\.0\.2\], sasl_method=PLAIN, sasl_username=alice")
    assert postfix.wait_message("bob", token)
