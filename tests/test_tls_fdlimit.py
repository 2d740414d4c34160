"""TLS logins keep working when a worker holds more than 1,024 descriptors.

The handshake wait must not use select.select() (FD_SETSIZE is 1024): with 1,100 idle
connections held open, implicit TLS and STARTTLS logins of all three protocols still succeed.
"""

import ast
import imaplib
import pathlib
import poplib
import resource
import smtplib
import socket
import time

import pytest

from tests.support.auth import auth_ok
from tests.support.mailbackends import Pop3Backend
from tests.support.process import free_port
from tests.support.tls import client_ctx, readline_raw

try:
    from tests.support.mailbackends import ImapBackend
    from tests.support.mailbackends import SmtpBackend
except ImportError:            # pragma: no cover - the suites are part of the repository
    ImapBackend = SmtpBackend = None

IDLE = 1100
PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mailproxy"


@pytest.fixture
def nofile():
    """Raise this process's soft RLIMIT_NOFILE (the proxy subprocess inherits it); restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip("hard RLIMIT_NOFILE %d is below %d" % (hard, want))
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_tls_logins_with_1100_idle_connections(nofile, proxy_factory, auth_server,
                                               backend_factory, pki):
    backends = {"pop3": backend_factory(Pop3Backend, users={"alice": "secret"}),
                "imap": backend_factory(ImapBackend), "smtp": backend_factory(SmtpBackend)}
    auth_server.set_respond(lambda req: auth_ok(backends[req.header("Auth-Protocol")].port))
    ports, servers = {}, {}
    for proto in ("pop3", "imap", "smtp"):
        for mode in ("ssl", "starttls"):
            port = ports[proto, mode] = free_port()
            block = {"listen": "127.0.0.1:%d%s" % (port, " ssl" if mode == "ssl" else ""),
                     "protocol": proto, "auth_http": auth_server.url, "timeout": "30s",
                     "ssl_certificate": pki.server_rsa[0],
                     "ssl_certificate_key": pki.server_rsa[1]}
            if mode == "starttls":
                block["starttls"] = "on"
            servers["%s-%s" % (proto, mode)] = block
    # 1,100 clients before login, past the default limit_prelogin (1000)
    proxy = proxy_factory({"main": {"limit_prelogin": 2000}, "servers": servers})
    idle = []
    try:
        deadline = time.monotonic() + 20
        for _ in range(IDLE):
            assert time.monotonic() < deadline, "connecting the idle clients took too long"
            idle.append(socket.create_connection(("127.0.0.1", ports["pop3", "starttls"]), 5))
        # the proxy greets in accept order: the last greeting means all were accepted
        assert readline_raw(idle[-1]) == b"+OK POP3 ready\r\n"
        ctx = client_ctx(pki)
        host = "127.0.0.1"

        p = poplib.POP3_SSL(host, ports["pop3", "ssl"], context=ctx, timeout=5)
        p.user("alice")
        assert p.pass_("secret").startswith(b"+OK")
        p.quit()
        p = poplib.POP3(host, ports["pop3", "starttls"], timeout=5)
        assert p.stls(ctx) == b"+OK"
        p.user("alice")
        assert p.pass_("secret").startswith(b"+OK")
        p.quit()

        m = imaplib.IMAP4_SSL(host, ports["imap", "ssl"], ssl_context=ctx, timeout=5)
        assert m.login("alice", "secret")[0] == "OK"
        m.logout()
        m = imaplib.IMAP4(host, ports["imap", "starttls"], timeout=5)
        assert m.starttls(ctx)[0] == "OK"
        assert m.login("alice", "secret")[0] == "OK"
        m.logout()

        c = smtplib.SMTP_SSL(host, ports["smtp", "ssl"], context=ctx, timeout=5)
        c.ehlo("client.test")
        assert c.login("alice", "secret")[0] == 235
        c.close()
        c = smtplib.SMTP(host, ports["smtp", "starttls"], timeout=5)
        c.ehlo("client.test")
        assert c.starttls(context=ctx)[0] == 220
        c.ehlo("client.test")
        assert c.login("alice", "secret")[0] == 235
        c.close()
        assert len(auth_server.wait_requests(6)) == 6
        assert "SSL" not in proxy.log_text().replace("Auth-SSL", "")
    finally:
        for s in idle:
            s.close()


def test_no_select_select_in_the_package():
    """The project's rule: selectors (poll/epoll) only; select.select() stops at fd 1024."""
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "select" \
                    and isinstance(node.value, ast.Name) and node.value.id == "select":
                offenders.append("%s:%d" % (path.name, node.lineno))
            elif isinstance(node, ast.ImportFrom) and node.module == "select" \
                    and any(a.name == "select" for a in node.names):
                offenders.append("%s:%d" % (path.name, node.lineno))
    assert offenders == []
