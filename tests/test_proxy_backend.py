"""Backend login and relay end to end (ngx_mail_proxy_module, logs): refusals with
proxy_pass_error_message on and off, unreachable / silent / odd backends, the PROXY header,
proxy_timeout, the session-end log line."""

import re
import socket
import struct
import time

import pytest

from tests.support.auth import AuthServer
from tests.support.backends import Read, script, ScriptedBackend, Sleep
from tests.support.common import wait_for
from tests.support.mailbackends import Pop3Backend
from tests.support.process import free_port, ProxyProcess, server_block, Setup

OK_LOGGED_IN = b"+OK logged in\r\n"
INTERNAL = b"-ERR internal server error\r\n"
PROXY_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


# Every configuration the tests use, each one server block of the one proxy the module shares.
CONFIGS = [{}, {"proxy_pass_error_message": "on"}, {"proxy_pass_error_message": "off"},
           {"timeout": "500ms"}, {"proxy_buffer": "1k"}, {"proxy_timeout": "600ms"},
           {"proxy_protocol": "on"}, {"proxy_protocol": "v2"},
           {"host": "::1", "proxy_protocol": "on"}, {"host": "::1", "proxy_protocol": "v2"}]


def _key(directives):
    return tuple(sorted(directives.items()))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """start(**directives) -> Setup on the server block of that configuration (CONFIGS) in one
    proxy shared by the module; tests stay independent: each routes the auth server to its own
    backend and reads only its own session's log lines (`session_log`)."""
    auth = AuthServer()
    servers, setups = {}, {}
    for i, directives in enumerate(CONFIGS):
        directives = dict(directives)
        host = directives.pop("host", "127.0.0.1")
        if ":" in host and not _have_ipv6():
            continue
        port = free_port(host)
        directives.setdefault("auth_http", auth.url)
        directives.setdefault("timeout", "2s")
        servers[f"pop3_{i}"] = server_block("pop3", port, host=host, **directives)
        setups[_key(CONFIGS[i])] = (host, port)
    proxy = ProxyProcess(tmp_path_factory.mktemp("proxy_backend"), {"servers": servers})

    def start(**directives):
        assert _key(directives) in setups, f"add {directives} to CONFIGS"
        host, port = setups[_key(directives)]
        return Setup(proxy, host, port, auth)
    yield start
    proxy.stop()
    auth.stop()



@pytest.fixture
def pop3_setup(shared, pop3_backend):
    """start(backend=None, **directives) -> Setup on a shared proxy, auth routed to `backend`."""
    def start(backend=None, **directives):
        backend = backend or pop3_backend
        st = shared(**directives)
        st.auth.route_to(backend.port, server=backend.host)
        st.backend = backend
        return st
    return start


@pytest.fixture
def auth_server(shared):
    return shared().auth


def session_log(st, c, pattern, regex=False, timeout=3.0):
    """The first log line of client `c`'s session (c: a client or its (host, port)) matching `pattern` (the proxy is shared, so
    lines of other sessions, earlier tests' included, must not count)."""
    host, cport = c if isinstance(c, tuple) else c.sock.getsockname()[:2]
    first = st.proxy.wait_log(f"client {host}:{cport} connected to", timeout=timeout)
    ident = re.search(r" (\d+)#\d+: \*(\d+) ", first)
    mine = re.compile(rf" {ident.group(1)}#\d+: \*{ident.group(2)} ")

    def find():
        for line in st.proxy.log_lines():
            if mine.search(line) and (re.search(pattern, line) if regex else pattern in line):
                return line
        return None
    return wait_for(find, timeout, what=f"log line {pattern!r} of *{ident.group(2)}")


def login(c, user="alice", password="secret"):
    assert c.cmd(f"USER {user}") == b"+OK\r\n"
    return c.cmd(f"PASS {password}")


def _have_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# --- refusals ---------------------------------------------------------------------------------

def test_refusal_passed_verbatim_with_error_message_on(pop3_setup, pop3_backend):
    st = pop3_setup(proxy_pass_error_message="on")
    c = st.connect()
    assert login(c, "alice", "wrong") == b"-ERR [AUTH] Authentication failed.\r\n"
    assert c.closed()
    s = pop3_backend.wait_session(0)
    assert s.closed.wait(2)
    assert s.lines == [b"USER alice", b"PASS wrong"]
    line = session_log(st, c, 'upstream sent invalid response: "-ERR [AUTH] Authentication failed.')
    assert "[info]" in line
    assert 'login: "alice"' in line and f"upstream: 127.0.0.1:{pop3_backend.port}" in line


def test_refusal_hidden_with_error_message_off(pop3_setup, pop3_backend):
    st = pop3_setup(proxy_pass_error_message="off")
    c = st.connect()
    assert login(c, "alice", "wrong") == INTERNAL
    assert c.closed()
    assert pop3_backend.wait_session(0).closed.wait(2)
    line = session_log(st, c, 'upstream sent invalid response: "-ERR [AUTH] Authentication failed.')
    assert "[error]" in line


def test_refusal_default_is_off(pop3_setup, pop3_backend):
    st = pop3_setup()
    c = st.connect()
    assert login(c, "alice", "wrong") == INTERNAL
    assert c.closed()


@pytest.mark.parametrize("on, reply", [("on", b"-ERR no such user\r\n"), ("off", INTERNAL)])
def test_refusal_of_user_command(pop3_setup, backend_factory, on, reply):
    backend = backend_factory(Pop3Backend, refuse_user=b"-ERR no such user")
    st = pop3_setup(backend=backend, proxy_pass_error_message=on)
    c = st.connect()
    assert login(c) == reply
    assert c.closed()
    s = backend.wait_session(0)
    assert s.closed.wait(2)
    assert s.lines == [b"USER alice"]


# --- unreachable, silent and odd backends -----------------------------------------------------

def test_backend_unreachable(pop3_setup, auth_server):
    st = pop3_setup()
    auth_server.route_to(free_port())
    c = st.connect()
    assert login(c) == INTERNAL
    assert c.closed()
    session_log(st, c, "[error]")


@pytest.mark.parametrize("stall_at, lines", [("greeting", []), ("user", [b"USER alice"]),
                                             ("pass", [b"USER alice", b"PASS secret"])])
def test_backend_silent_past_timeout(pop3_setup, backend_factory, stall_at, lines):
    backend = backend_factory(Pop3Backend, stall_at=stall_at)
    st = pop3_setup(backend=backend, timeout="500ms")
    c = st.connect()
    assert c.cmd("USER alice") == b"+OK\r\n"
    t0 = time.monotonic()
    assert c.cmd("PASS secret", timeout=5) == INTERNAL
    assert 0.45 <= time.monotonic() - t0 < 3
    assert c.closed()
    s = backend.wait_session(0)
    assert s.closed.wait(2), "backend connection left open"
    assert s.lines == lines
    session_log(st, c, "upstream timed out")


@pytest.mark.parametrize("kw", [
    dict(greeting=b"-ERR go away"),
    dict(greeting=b"+ok lowercase"),
    dict(greeting=b"* OK IMAP4 ready"),
    dict(close_after="accept"),
    dict(close_after="greeting"),
    dict(close_after="user"),
    dict(reset_at="pass"),
    dict(user_reply=b"+Ok"),
])
def test_backend_bad_dialogue_is_internal_error(pop3_setup, backend_factory, kw):
    backend = backend_factory(Pop3Backend, **kw)
    st = pop3_setup(backend=backend, proxy_pass_error_message="off")
    c = st.connect()
    assert login(c) == INTERNAL
    assert c.closed()


def test_backend_too_long_reply_line(pop3_setup, backend_factory):
    backend = backend_factory(Pop3Backend, greeting=b"+OK " + b"x" * 3000)
    st = pop3_setup(backend=backend, proxy_buffer="1k")
    c = st.connect()
    assert login(c) == INTERNAL
    assert c.closed()
    session_log(st, c, "upstream sent too long response line")


def test_backend_replies_split_across_writes(pop3_setup, backend_factory):
    def slow_pieces(conn):
        conn.send(b"+O")
        time.sleep(0.1)
        conn.send(b"K rea")
        time.sleep(0.1)
        conn.send(b"dy\r\n")
    backend = backend_factory(ScriptedBackend, script(slow_pieces, Read(), "+OK", Read(),
                                                     lambda conn: conn.send(b"+OK "),
                                                     Sleep(0.1), "welcome"))
    st = pop3_setup(backend=backend)
    c = st.connect()
    assert login(c) == b"+OK welcome\r\n"
    assert backend.wait_session(0).lines[:2] == [b"USER alice", b"PASS secret"]


# --- relay ends --------------------------------------------------------------------------------

def test_backend_close_after_login_closes_client(pop3_setup, backend_factory):
    backend = backend_factory(Pop3Backend, close_after="pass")
    st = pop3_setup(backend=backend)
    c = st.connect()
    assert login(c) == OK_LOGGED_IN
    assert c.closed(3)
    session_log(st, c, "proxied session done")


def test_client_close_after_login_closes_backend(pop3_setup, pop3_backend):
    st = pop3_setup()
    c = st.connect()
    assert login(c) == OK_LOGGED_IN
    me = c.sock.getsockname()[:2]
    c.close()
    assert pop3_backend.wait_session(0).closed.wait(3)
    session_log(st, me, "proxied session done")


# --- PROXY protocol to the backend --------------------------------------------------------

def test_proxy_protocol_v1(pop3_setup, backend_factory):
    backend = backend_factory(Pop3Backend, proxy_protocol=True)
    st = pop3_setup(backend=backend, proxy_protocol="on")
    c = st.connect()
    cport = c.sock.getsockname()[1]
    assert login(c) == OK_LOGGED_IN
    s = backend.wait_session(0)
    assert s.proxy_header == f"PROXY TCP4 127.0.0.1 127.0.0.1 {cport} {st.port}\r\n".encode()
    assert s.wait_lines(2) == [b"USER alice", b"PASS secret"]
    assert bytes(s.raw).startswith(b"USER alice\r\n")


def test_no_proxy_header_by_default(pop3_setup, pop3_backend):
    st = pop3_setup()
    c = st.connect()
    assert login(c) == OK_LOGGED_IN
    s = pop3_backend.wait_session(0)
    assert bytes(s.raw).startswith(b"USER alice\r\nPASS secret\r\n")


@pytest.mark.skipif(not _have_ipv6(), reason="no IPv6 loopback")
def test_proxy_protocol_v1_ipv6(pop3_setup, backend_factory):
    backend = backend_factory(Pop3Backend, proxy_protocol=True, host="::1")
    st = pop3_setup(backend=backend, proxy_protocol="on", host="::1")
    c = st.connect()
    cport = c.sock.getsockname()[1]
    assert login(c) == OK_LOGGED_IN
    s = backend.wait_session(0)
    assert s.proxy_header == f"PROXY TCP6 ::1 ::1 {cport} {st.port}\r\n".encode()


def _check_v2(header, family, src, dst, sport, dport):
    assert header[:12] == PROXY_V2_SIG
    assert header[12] == 0x21                         # version 2, PROXY command
    length = struct.unpack("!H", header[14:16])[0]
    assert len(header) == 16 + length
    if family == socket.AF_INET:
        assert header[13] == 0x11                     # TCP over IPv4
        alen = 12
    else:
        assert header[13] == 0x21                     # TCP over IPv6
        alen = 36
    assert length >= alen
    body = header[16:]
    n = alen // 2 - 2
    assert body[:n] == socket.inet_pton(family, src)
    assert body[n:2 * n] == socket.inet_pton(family, dst)
    assert struct.unpack("!HH", body[2 * n:2 * n + 4]) == (sport, dport)
    tlvs = body[alen:]
    while tlvs:                                       # any TLVs must be well formed
        assert len(tlvs) >= 3
        tlen = struct.unpack("!H", tlvs[1:3])[0]
        assert len(tlvs) >= 3 + tlen
        tlvs = tlvs[3 + tlen:]


def test_proxy_protocol_v2(pop3_setup, backend_factory):
    backend = backend_factory(Pop3Backend, proxy_protocol=True)
    st = pop3_setup(backend=backend, proxy_protocol="v2")
    c = st.connect()
    cport = c.sock.getsockname()[1]
    assert login(c) == OK_LOGGED_IN
    s = backend.wait_session(0)
    _check_v2(s.proxy_header, socket.AF_INET, "127.0.0.1", "127.0.0.1", cport, st.port)
    assert s.wait_lines(2) == [b"USER alice", b"PASS secret"]


@pytest.mark.skipif(not _have_ipv6(), reason="no IPv6 loopback")
def test_proxy_protocol_v2_ipv6(pop3_setup, backend_factory):
    backend = backend_factory(Pop3Backend, proxy_protocol=True, host="::1")
    st = pop3_setup(backend=backend, proxy_protocol="v2", host="::1")
    c = st.connect()
    cport = c.sock.getsockname()[1]
    assert login(c) == OK_LOGGED_IN
    _check_v2(backend.wait_session(0).proxy_header, socket.AF_INET6, "::1", "::1", cport, st.port)


# --- proxy_timeout -------------------------------------------------------------------------

def test_proxy_timeout_closes_idle_session(pop3_setup, pop3_backend):
    st = pop3_setup(proxy_timeout="600ms")
    c = st.connect()
    assert login(c) == OK_LOGGED_IN
    t0 = time.monotonic()
    assert c.closed(4)
    assert 0.5 <= time.monotonic() - t0 < 3
    assert pop3_backend.wait_session(0).closed.wait(2)
    # nginx's wording (ngx_mail_proxy_handler), which log watchers match
    session_log(st, c, r"client timed out \(110: Connection timed out\) while proxying", regex=True)
    session_log(st, c, "proxied session done")


def test_proxy_timeout_rearmed_by_client_traffic(pop3_setup, pop3_backend):
    st = pop3_setup(proxy_timeout="600ms")
    c = st.connect()
    assert login(c) == OK_LOGGED_IN
    for _ in range(6):                     # 1.5 s of activity, never 0.6 s idle
        time.sleep(0.25)
        assert c.cmd("NOOP") == b"+OK\r\n"
    assert c.cmd("STAT") == b"+OK 2 102\r\n"


def test_backend_traffic_does_not_keep_silent_client_alive(pop3_setup, backend_factory):
    def push(conn):
        for i in range(40):
            if not conn.sendline(b"+OK tick %d" % i):
                return
            time.sleep(0.2)
    backend = backend_factory(ScriptedBackend, script("+OK ready", Read(), "+OK", Read(),
                                                     "+OK logged in", push))
    st = pop3_setup(backend=backend, proxy_timeout="600ms")
    c = st.connect()
    assert login(c) == OK_LOGGED_IN
    t0 = time.monotonic()
    deadline = t0 + 6
    while not c.eof and time.monotonic() < deadline:
        c._fill(deadline - time.monotonic())
    elapsed = time.monotonic() - t0
    assert c.eof, "session kept alive by backend traffic"
    assert elapsed < 3, elapsed
    assert b"+OK tick 1\r\n" in c.received


# --- logging -------------------------------------------------------------------------------

def test_session_log_lines(pop3_setup, pop3_backend):
    st = pop3_setup()
    c = st.connect()
    cport = c.sock.getsockname()[1]
    assert login(c) == OK_LOGGED_IN
    c.send(b"STAT\r\nLIST\r\nQUIT\r\n")
    expected_out = b"+OK 2 102\r\n+OK 2 messages\r\n1 44\r\n2 58\r\n.\r\n+OK bye\r\n"
    assert c.read_until_closed() == expected_out
    session_log(st, c, f"client 127.0.0.1:{cport} connected to 127.0.0.1:{st.port}")
    line = session_log(st, c, "proxied session done")
    assert re.match(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[info\] \d+#\d+: \*\d+ proxied session done", line), line
    assert "client: 127.0.0.1" in line
    assert f"server: 127.0.0.1:{st.port}" in line
    assert 'login: "alice"' in line
    assert f"upstream: 127.0.0.1:{pop3_backend.port}" in line
    n_in = len(b"STAT\r\nLIST\r\nQUIT\r\n")
    n_out = len(expected_out)
    assert re.search(rf"\b{n_in}\b", line), f"client->backend byte count {n_in} missing: {line}"
    assert (re.search(rf"\b{n_out}\b", line) or re.search(rf"\b{n_out + len(OK_LOGGED_IN)}\b", line)), \
        f"backend->client byte count {n_out} missing: {line}"
    assert "secret" not in st.proxy.log_text()
    logged_in = session_log(st, c, "client logged in")
    conn_id = re.search(r" \*(\d+) ", logged_in).group(1)
    assert f"*{conn_id} proxied session done" in line
