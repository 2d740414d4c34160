"""`error_log ... debug` (session_log.py, trace.py): at main, mail or server level the log gets
the protocol steps of its sessions (client commands and replies, the auth request and response,
the backend login, the hand-over to the relay and the end), with no password, SASL response or
Auth-Pass anywhere in the log; the start notice names the nginx mail version followed."""

import base64
import re

import pytest

from mailproxy import NGINX_VERSION, __version__
from tests.support.common import wait_for
from tests.support.mailbackends import IMAP_LOGGED_IN, ImapBackend
from tests.support.process import free_port, server_block

SECRET = "s3cr3t-Pw"
PLAIN = base64.b64encode(b"\0alice\0" + SECRET.encode()).decode()


def _converse(port, backend):
    """A LOGIN refused, then a session with AUTHENTICATE PLAIN (a continuation line)."""
    from tests.support.clients import LineClient
    c = LineClient("127.0.0.1", port)
    c.readline()
    assert c.cmd("a0 LOGIN alice wrong-" + SECRET).startswith(b"a0 NO")
    c.read_until_closed()
    c.close()
    c = LineClient("127.0.0.1", port)
    c.readline()
    c.sendline("a1 AUTHENTICATE PLAIN")
    assert c.readline() == b"+ \r\n"
    assert c.cmd(PLAIN) == b"a1 " + IMAP_LOGGED_IN + b"\r\n"
    c.send(b"a2 LOGOUT\r\n")
    c.read_until_closed()
    c.close()


def _respond(backend):
    def respond(req):
        from tests.support.auth import auth_fail, auth_ok
        if req.header("Auth-Pass") != SECRET:
            return auth_fail("Invalid login or password")
        # the auth service answers with a password for the backend: masked in the trace
        return auth_ok(backend.port, password=SECRET)
    return respond


@pytest.mark.parametrize("level", ["main", "mail", "server"])
def test_debug_trace_at_each_level(level, proxy_factory, auth_server, backend_factory, tmp_path):
    backend = backend_factory(ImapBackend, users={b"alice": SECRET.encode()})
    auth_server.set_respond(_respond(backend))
    port = free_port()
    debug_log = tmp_path / "debug.log"
    block = server_block("imap", port, auth_http=auth_server.url, timeout="3s",
                         auth_http_header="X-Auth-Key shared-" + SECRET)
    mail = {}
    if level == "server":
        block["error_log"] = "%s debug" % debug_log
    elif level == "mail":
        mail["error_log"] = "%s debug" % debug_log
    p = proxy_factory({"servers": {"imap": block}, "mail": mail},
                      log_level="debug" if level == "main" else "info")
    if level == "main":
        debug_log = p.log_path
    _converse(port, backend)
    text = wait_for(lambda: "proxied session done" in debug_log.read_text()
                    and debug_log.read_text(), 3, what="the end of the session")
    assert SECRET not in text and PLAIN not in text, text
    sids = re.findall(r"connected to \S+, session: (\S+)", text)
    assert len(sids) == 2 and sids[0] != sids[1]
    debug = [x for x in text.splitlines() if "[debug]" in x]
    expected = [
        'client sent "a0 LOGIN alice ***"',
        'sent to client "* OK IMAP4 ready"',
        'auth http request to 127.0.0.1:%d "GET /auth HTTP/1.1"' % auth_server.port,
        'auth http request to 127.0.0.1:%d Connection "keep-alive"' % auth_server.port,
        'auth http request to 127.0.0.1:%d Auth-User "alice"' % auth_server.port,
        'auth http request to 127.0.0.1:%d X-Auth-Key "***"' % auth_server.port,
        'auth http request to 127.0.0.1:%d Auth-Session-Id "%s"' % (auth_server.port, sids[0]),
        'auth http response Auth-Status "Invalid login or password"',
        'auth http response Auth-Pass "***"',
        'client sent "a1 AUTHENTICATE PLAIN"',
        'sent to client "+ "',
        'client sent "***"',
        'upstream sent "* OK [CAPABILITY IMAP4rev1] Dovecot ready."',
        'sent to upstream "a1 LOGIN {5}"',
        'sent to upstream "***"',
        'handing over to the relay',
    ]
    for want in expected:
        assert any(want in x and re.search(", session: (%s|%s)$" % tuple(sids), x)
                   for x in debug), (want, debug)
    assert not any("Auth-Pass" in x for x in debug if "auth http request" in x)
    assert "bytes from/to client:" in text          # the end, at info
    if level != "main":        # the main log stays at info
        assert "[debug]" not in p.log_text()


def test_no_debug_lines_below_debug(pop3_setup):
    st = pop3_setup()
    c = st.connect()
    c.cmd("USER alice")
    c.cmd("PASS secret")
    c.send(b"QUIT\r\n")
    c.read_until_closed()
    st.proxy.wait_log("proxied session done")
    assert "[debug]" not in st.proxy.log_text() and "sent to client" not in st.proxy.log_text()


def test_start_notice_names_the_nginx_version(pop3_setup):
    st = pop3_setup()
    line = st.proxy.wait_log("[notice]")
    assert line.endswith("mailproxy/%s (nginx/%s mail)" % (__version__, NGINX_VERSION)), line
