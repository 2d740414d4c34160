"""POP3 end to end: the proxy as a subprocess, a recording auth_http server, a scripted POP3
backend. Each test asserts what the client, the auth server and the backend saw.

Only what a whole process proves is here (a real client library, bytes relayed after login,
pipelining, large transfers, IPv6, timeouts, resets, the zipapp, one max_errors close, one
injection attempt); the conversation's rules are in tests/unit/test_pop3_conversation.py."""

import hashlib
import socket
import time

import pytest

from tests.support.common import b64
from tests.support.mailbackends import Pop3Backend, big_message_chunks
from tests.support.process import free_port

OK_LOGGED_IN = b"+OK logged in\r\n"
INVALID = b"-ERR invalid command\r\n"


def login_userpass(c, user="alice", password="secret"):
    assert c.cmd(f"USER {user}") == b"+OK\r\n"
    return c.cmd(f"PASS {password}")


def assert_backend_login(backend, user=b"alice", password=b"secret", i=0):
    s = backend.wait_session(i)
    lines = s.wait_lines(2)
    assert lines[:2] == [b"USER " + user, b"PASS " + password]
    assert s.raw.startswith(b"USER " + user + b"\r\nPASS " + password + b"\r\n")
    return s


# --- USER / PASS -----------------------------------------------------------------------------

def test_user_pass_transcripts(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup()
    c = st.connect()
    assert login_userpass(c) == OK_LOGGED_IN
    req = auth_server.wait_requests(1)[0]
    assert req.headers[:8] == [("Host", "127.0.0.1"), ("Connection", "keep-alive"),
                               ("Auth-Method", "plain"), ("Auth-User", "alice"),
                               ("Auth-Pass", "secret"), ("Auth-Protocol", "pop3"),
                               ("Auth-Login-Attempt", "1"), ("Client-IP", "127.0.0.1")]
    s = assert_backend_login(pop3_backend)
    assert s.lines == [b"USER alice", b"PASS secret"]
    assert c.cmd("QUIT") == b"+OK bye\r\n"
    assert c.closed()
    s.closed.wait(2)
    assert bytes(s.raw) == b"USER alice\r\nPASS secret\r\nQUIT\r\n"
    st.proxy.wait_log("client logged in")


def test_poplib_mailbox_session(pop3_setup, pop3_backend):
    st = pop3_setup()
    p = st.pop3()
    assert p.getwelcome() == b"+OK POP3 ready"
    assert p.user("alice") == b"+OK"
    assert p.pass_("secret") == b"+OK logged in"
    assert p.stat() == (2, 102)
    resp, listing, _ = p.list()
    assert resp == b"+OK 2 messages" and listing == [b"1 44", b"2 58"]
    resp, lines, octets = p.retr(2)
    assert resp == b"+OK 58 octets"
    assert lines == [b"From: b@example.com", b"Subject: two", b"", b".leading dot", b"world"]
    assert p.quit() == b"+OK bye"
    s = pop3_backend.wait_session(0)
    s.closed.wait(2)
    assert s.lines == [b"USER alice", b"PASS secret", b"STAT", b"LIST", b"RETR 2", b"QUIT"]


def test_retr_50mb_intact(pop3_setup, backend_factory):
    size = 50 * 1024 * 1024
    backend = backend_factory(Pop3Backend, big_size=size)
    st = pop3_setup(backend=backend)
    c = st.connect(timeout=20)
    assert login_userpass(c) == OK_LOGGED_IN
    expected = hashlib.sha256()
    for chunk in big_message_chunks(size):
        expected.update(chunk)
    t0 = time.monotonic()
    c.sendline("RETR 3")
    assert c.readline() == b"+OK %d octets\r\n" % size
    need = size + 3                         # the body, then ".\r\n"
    got = 0
    h = hashlib.sha256()
    last = b""
    data = bytes(c.buf)
    c.buf.clear()
    while True:
        if data:
            take = data[:need - got]
            h.update(take[:max(0, size - got)])
            last = (last + take)[-3:]
            got += len(take)
            if got >= need:
                break
        data = c.sock.recv(1 << 20)
        assert data, f"connection closed after {got} of {need} bytes"
    elapsed = time.monotonic() - t0
    assert last == b".\r\n"
    assert h.hexdigest() == expected.hexdigest()
    assert elapsed < 30, f"50 MB took {elapsed:.1f}s"
    assert c.cmd("NOOP") == b"+OK\r\n"


# --- errors, pipelining ---------------------------------------------------------------------

def test_max_errors_counts_parser_errors_only(pop3_setup, auth_server):
    st = pop3_setup(max_errors=2)
    c = st.connect()
    # rejections decided after parsing do not count
    for cmd in ["PASS x", "USER", "AUTH FOO", "AUTH PLAIN !!!", "APOP x"]:
        assert c.cmd(cmd) == INVALID, cmd
    assert c.cmd("NOOP") == b"+OK\r\n"
    assert c.cmd("FOO") == INVALID
    assert c.cmd("NOOP") == b"+OK\r\n"
    assert c.cmd("BAR") == INVALID
    assert c.closed()
    st.proxy.wait_log("client sent too many invalid commands")
    assert auth_server.requests == []


def test_pipelined_commands_answered_in_order(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup()
    c = st.connect()
    c.send(b"CAPA\r\nNOOP\r\nFOO\r\nUSER alice\r\nPASS secret\r\nSTAT\r\nLIST 1\r\n")
    assert c.read_multiline()[0] == b"+OK Capability list follows\r\n"
    assert c.readline() == b"+OK\r\n"
    assert c.readline() == INVALID
    assert c.readline() == b"+OK\r\n"
    assert c.readline() == OK_LOGGED_IN
    assert c.readline() == b"+OK 2 102\r\n"
    assert c.readline() == b"+OK 1 44\r\n"
    s = pop3_backend.wait_session(0)
    assert s.wait_lines(4) == [b"USER alice", b"PASS secret", b"STAT", b"LIST 1"]
    assert len(auth_server.requests) == 1


def test_pipelined_bytes_after_pass_forwarded_in_order(pop3_setup, auth_server, pop3_backend):
    # the auth server answers slowly: the client's next commands arrive during authentication
    st = pop3_setup()
    from tests.support.auth import Delay, auth_ok
    auth_server.set_respond(lambda req: Delay(0.3, auth_ok(pop3_backend.port)))
    c = st.connect()
    assert c.cmd("USER alice") == b"+OK\r\n"
    c.send(b"PASS secret\r\n")
    time.sleep(0.1)
    c.send(b"STAT\r\n")
    c.send(b"RETR 1\r\nQUIT\r\n")
    assert c.readline() == OK_LOGGED_IN
    assert c.readline() == b"+OK 2 102\r\n"
    assert c.readline() == b"+OK 44 octets\r\n"
    rest = c.read_until_closed()
    assert rest == b"From: a@example.com\r\nSubject: one\r\n\r\nhello\r\n.\r\n+OK bye\r\n"
    s = pop3_backend.wait_session(0)
    s.closed.wait(2)
    assert bytes(s.raw) == b"USER alice\r\nPASS secret\r\nSTAT\r\nRETR 1\r\nQUIT\r\n"


# --- credentials with CR / LF / NUL ------------------------------------------------------------

# one case end to end; the others are tests/unit/test_pop3_conversation.py's
# test_control_bytes_never_reach_auth_or_backend
@pytest.mark.parametrize("steps, user_esc, pass_esc", [
    (["AUTH PLAIN " + b64("\0alice\0secret\r\nQUIT")], "alice", "secret%0D%0AQUIT"),
])
def test_control_bytes_never_become_extra_lines(pop3_setup, auth_server, pop3_backend,
                                                steps, user_esc, pass_esc):
    st = pop3_setup()
    c = st.connect()
    for step in steps:
        c.sendline(step)
        reply = c.readline()
    assert reply.startswith((b"+", b"-ERR")), reply
    time.sleep(0.3)
    # the proxy may refuse such credentials itself; if it asks the auth server, they are escaped
    for req in auth_server.requests:
        assert req.header("Auth-User") == user_esc
        assert req.header("Auth-Pass") == pass_esc
        assert [n for n, _ in req.headers] == ["Host", "Auth-Method", "Auth-User", "Auth-Pass",
                                               "Auth-Protocol", "Auth-Login-Attempt", "Client-IP"]
    if not auth_server.requests:
        assert reply == INVALID
        assert c.cmd("NOOP") == b"+OK\r\n"
    time.sleep(0.3)
    # whatever the proxy decided, the backend never saw an injected command line
    for s in pop3_backend.sessions:
        for line in s.lines:
            assert line.startswith((b"USER ", b"PASS ")), s.lines
        assert len(s.lines) <= 2, s.lines
        assert not any(line in (b"ce", b"QUIT", b"ret", b"DELE 1", b"RSET") for line in s.lines)


# --- IPv6 ------------------------------------------------------------------------------------

def _have_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _have_ipv6(), reason="no IPv6 loopback")
def test_ipv6_client_and_backend(pop3_setup, auth_server, backend_factory):
    backend = backend_factory(Pop3Backend, host="::1")
    st = pop3_setup(backend=backend, host="::1")
    c = st.connect()
    assert c.greeting == b"+OK POP3 ready\r\n"
    assert login_userpass(c) == OK_LOGGED_IN
    req = auth_server.wait_requests(1)[0]
    assert req.header("Client-IP") == "::1"
    s = assert_backend_login(backend)
    assert s.peer[0] == "::1"
    assert c.cmd("STAT") == b"+OK 2 102\r\n"
    line = st.proxy.wait_log("client logged in")
    assert "client: ::1" in line
    assert f"upstream: [::1]:{backend.port}" in line or f"upstream: ::1:{backend.port}" in line


# --- timeouts before login -------------------------------------------------------------------

def test_idle_client_before_login_times_out(pop3_setup, auth_server):
    st = pop3_setup(timeout="1s")
    c = st.connect()
    assert c.cmd("USER alice") == b"+OK\r\n"
    t0 = time.monotonic()
    assert c.closed(4)                        # closed without a word
    assert 0.8 <= time.monotonic() - t0 < 3
    st.proxy.wait_log("client timed out (110: Connection timed out) while in auth state")
    assert auth_server.requests == []


# --- the one-file build ----------------------------------------------------------------------

def test_zipapp_end_to_end(tmp_path, proxy_factory, auth_server, pop3_backend):
    import subprocess
    import sys
    from tests.support.common import REPO
    from tests.support.process import server_block
    pyz = tmp_path / "mailproxy.pyz"
    subprocess.run([sys.executable, str(REPO / "packaging" / "build.py"), "--output", str(pyz)],
                   check=True, cwd=str(REPO), timeout=60, capture_output=True)
    port = free_port()
    auth_server.route_to(pop3_backend.port)
    proxy_factory({"servers": {"pop": server_block("pop3", port, auth_http=auth_server.url)}},
                  command=[sys.executable, str(pyz)])
    from tests.support.clients import LineClient
    c = LineClient("127.0.0.1", port)
    assert c.readline() == b"+OK POP3 ready\r\n"
    assert login_userpass(c) == OK_LOGGED_IN
    assert c.cmd("STAT") == b"+OK 2 102\r\n"
    assert_backend_login(pop3_backend)


def test_client_reset_is_logged_with_its_errno(pop3_setup):
    """A reset is not a clean close: nginx's "recv() failed (104: ...)" line, not a silence or
    a plain "client closed connection"."""
    import struct
    st = pop3_setup()
    c = st.connect()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.send(b"USER al")
    time.sleep(0.2)
    c.close()                       # linger 0: RST
    line = st.proxy.wait_log("recv() failed (104: Connection reset by peer)")
    assert "while in auth state, client: 127.0.0.1," in line
