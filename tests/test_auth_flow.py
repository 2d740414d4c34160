"""The auth_http protocol end to end (ngx_mail_auth_http_module) with POP3 clients, and the
auth-less `proxy_pass` route (our addition)."""

import re
import signal
import time

import pytest

from tests.support.auth import auth_fail, auth_ok, AuthServer, Delay
from tests.support.clients import LineClient
from tests.support.common import CLOSE, HANG, RESET
from tests.support.mailbackends import Pop3Backend
from tests.support.process import free_port, ProxyProcess, server_block, SessionLog, Setup

OK_LOGGED_IN = b"+OK logged in\r\n"
INTERNAL = b"-ERR internal server error\r\n"


class _SharedSetup(Setup):
    """A Setup on the module's shared proxy: `proxy` is the log of this test's sessions."""

    def connect(self, timeout=5.0, greeting=True):
        c = LineClient(self.host, self.port, timeout)
        self.proxy.ports.add(c.sock.getsockname()[1])
        c.greeting = c.readline() if greeting else None
        return c


def _configs(auth):
    """The directive sets the tests use (the auth server's own port in them), each a server
    block of the shared proxy; {} is the plain one."""
    return [{}, {"auth_http_header": ["X-Secret s3cr3t", 'X-Other "a b"']},
            {"auth_http": f"127.0.0.1:{auth.port}/mail/auth.php?x=1&y=%41"},
            {"auth_http": f"127.0.0.1:{auth.port}"},
            {"auth_http_timeout": "500ms"}, {"auth_http_timeout": "2s"}]


def _key(directives):
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                        for k, v in directives.items()))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One proxy and auth server for the module: {directives key: port}, proxy, auth."""
    auth = AuthServer()
    ports, servers = {}, {}
    for i, directives in enumerate(_configs(auth)):
        ports[_key(directives)] = port = free_port()
        directives.setdefault("auth_http", auth.url)
        servers[f"pop3_{i}"] = server_block("pop3", port, timeout="2s", **directives)
    proxy = ProxyProcess(tmp_path_factory.mktemp("auth_flow"), {"servers": servers})
    yield proxy, ports, auth
    proxy.stop()
    auth.stop()



@pytest.fixture
def auth_server(shared):
    """The shared auth server, its requests and answers this test's only."""
    auth = shared[2]
    auth.requests.clear()
    auth.set_respond(None)
    return auth


@pytest.fixture
def pop3_setup(shared, auth_server, mail_setup, pop3_backend):
    """conftest's pop3_setup; with the directives of a shared server block (and unless `fresh`,
    for a test that signals the process) on the shared proxy."""
    def start(backend=None, fresh=False, **kw):
        backend = backend or pop3_backend
        proxy, ports, _ = shared
        port = ports.get(_key(kw))
        if port is None or fresh:
            return mail_setup("pop3", backend, **kw)
        auth_server.route_to(backend.port, server=backend.host)
        return _SharedSetup(SessionLog(proxy), "127.0.0.1", port, auth_server, backend)
    return start


def login(c, user="alice", password="secret"):
    assert c.cmd(f"USER {user}") == b"+OK\r\n"
    return c.cmd(f"PASS {password}")


def assert_backend_login(backend, user=b"alice", password=b"secret", i=0):
    s = backend.wait_session(i)
    assert s.wait_lines(2)[:2] == [b"USER " + user, b"PASS " + password]
    return s


# --- OK and the exact request --------------------------------------------------------------

@pytest.mark.parametrize("keepalive", ["0", "8"])
def test_request_bytes_exact(pop3_setup, auth_server, backend_factory, keepalive):
    """auth_http_keepalive = 0 sends nginx's request byte for byte; keep-alive says HTTP/1.1
    and adds Connection after Host, nothing else."""
    backend = backend_factory(Pop3Backend, users={"alice smith": "p%w "})
    st = pop3_setup(backend=backend, auth_http_header=["X-Secret s3cr3t", 'X-Other "a b"'],
                    auth_http_keepalive=keepalive)
    c = st.connect()
    assert login(c, "alice smith", "p%w ") == OK_LOGGED_IN
    req = auth_server.wait_requests(1)[0]
    sid = re.search(r"session: ([A-Za-z0-9_-]{16})", st.proxy.wait_log("connected to")).group(1)
    head = (b"GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\n" if keepalive == "0" else
            b"GET /auth HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n")
    assert req.raw == (head +
                       b"Auth-Method: plain\r\n"
                       b"Auth-User: alice%20smith\r\n"
                       b"Auth-Pass: p%25w%20\r\n"
                       b"Auth-Protocol: pop3\r\n"
                       b"Auth-Login-Attempt: 1\r\n"
                       b"Client-IP: 127.0.0.1\r\n"
                       b"Auth-Session-Id: " + sid.encode() + b"\r\n"   # ours
                       b"X-Secret: s3cr3t\r\n"
                       b"X-Other: a b\r\n"
                       b"\r\n")
    s = assert_backend_login(backend, b"alice smith", b"p%w ")
    assert s.raw_lines[:2] == [b"USER alice smith\r\n", b"PASS p%w \r\n"]
    line = st.proxy.wait_log("client logged in")
    assert 'login: "alice smith"' in line
    assert f"upstream: 127.0.0.1:{backend.port}" in line
    assert "client: 127.0.0.1" in line and f"server: 127.0.0.1:{st.port}" in line
    assert "secret" not in st.proxy.log_text() and "p%w" not in st.proxy.log_text()


def test_uri_and_query_kept_verbatim(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup(auth_http=f"127.0.0.1:{auth_server.port}/mail/auth.php?x=1&y=%41")
    c = st.connect()
    assert login(c) == OK_LOGGED_IN
    assert auth_server.wait_requests(1)[0].request_line == "GET /mail/auth.php?x=1&y=%41 HTTP/1.1"


def test_uri_defaults_to_slash(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup(auth_http=f"127.0.0.1:{auth_server.port}")
    c = st.connect()
    assert login(c) == OK_LOGGED_IN
    assert auth_server.wait_requests(1)[0].request_line == "GET / HTTP/1.1"


def test_unix_auth_url(pop3_setup, unix_auth_server, pop3_backend):
    unix_auth_server.route_to(pop3_backend.port)
    st = pop3_setup(auth_http=unix_auth_server.url)
    c = st.connect()
    assert login(c) == OK_LOGGED_IN
    req = unix_auth_server.wait_requests(1)[0]
    assert req.request_line == "GET /auth HTTP/1.1"
    assert req.headers[0] == ("Host", "localhost")
    assert_backend_login(pop3_backend)


def test_auth_user_and_pass_override(pop3_setup, auth_server, backend_factory):
    backend = backend_factory(Pop3Backend, users={"bob@example.com": "bobpw"})
    st = pop3_setup(backend=backend)
    auth_server.route_to(backend.port, user="bob@example.com", password="bobpw")
    c = st.connect()
    assert login(c, "alice", "wrong") == OK_LOGGED_IN
    assert_backend_login(backend, b"bob@example.com", b"bobpw")
    line = st.proxy.wait_log("client logged in")
    assert 'login: "bob@example.com"' in line


@pytest.mark.parametrize("response", [
    # the status code is ignored
    b"HTTP/1.0 500 Internal Server Error\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: {port}\r\n\r\n",
    # no status line at all
    b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: {port}\r\n\r\n",
    # bare LF, case-insensitive names, values with spaces, other headers ignored
    b"HTTP/1.1 200 OK\nauth-status:   OK  \nAUTH-SERVER: 127.0.0.1\nX-Whatever: 1\nauth-port: {port}\n\n",
    # Auth-Status missing is not an error
    b"HTTP/1.0 200 OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: {port}\r\n\r\nbody is never read",
])
def test_response_variants_that_log_in(pop3_setup, auth_server, pop3_backend, response):
    st = pop3_setup()
    auth_server.set_respond(lambda req: response.replace(b"{port}", str(pop3_backend.port).encode()))
    c = st.connect()
    assert login(c) == OK_LOGGED_IN
    assert_backend_login(pop3_backend)


# --- failures ------------------------------------------------------------------------------

def test_failure_text_closes(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup()
    auth_server.set_respond(lambda req: auth_fail("Invalid login or password"))
    c = st.connect()
    assert login(c) == b"-ERR Invalid login or password\r\n"
    assert c.closed()
    st.proxy.wait_log('client login failed: "Invalid login or password"')
    assert pop3_backend.sessions == []


@pytest.mark.parametrize("lines, text", [
    (["Auth-Status: ok", "Auth-Server: 127.0.0.1", "Auth-Port: 1"], b"ok"),
    (["Auth-Status: OK", "Auth-Status: Denied", "Auth-Server: 127.0.0.1", "Auth-Port: 1"], b"Denied"),
    (["Auth-Status: Denied", "Auth-Status: OK"], b"Denied"),
    (["Auth-Status: Denied", "Auth-Wait: 0"], b"Denied"),
    (["Auth-Status: Denied", "Auth-Wait: soon"], b"Denied"),
])
def test_failure_variants(pop3_setup, auth_server, pop3_backend, lines, text):
    st = pop3_setup()
    auth_server.set_respond(lambda req: lines)
    c = st.connect()
    assert login(c) == b"-ERR " + text + b"\r\n"
    assert c.closed()
    assert pop3_backend.sessions == []


def test_auth_wait_then_retry_same_connection(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup()
    answers = [auth_fail("Try again later", wait=1), auth_ok(pop3_backend.port)]
    auth_server.set_respond(lambda req: answers[len(auth_server.requests) - 1])
    c = st.connect()
    assert c.cmd("USER alice") == b"+OK\r\n"
    t0 = time.monotonic()
    c.sendline("PASS wrong")
    assert c.silent(0.7)                      # nothing during the wait
    assert c.readline() == b"-ERR Try again later\r\n"
    assert time.monotonic() - t0 >= 0.95
    # back in the start state: PASS alone is invalid, USER must be sent again
    assert c.cmd("PASS secret") == b"-ERR invalid command\r\n"
    assert login(c) == OK_LOGGED_IN
    reqs = auth_server.wait_requests(2)
    assert len(reqs) == 2
    assert reqs[0].header("Auth-Login-Attempt") == "1" and reqs[0].header("Auth-Pass") == "wrong"
    assert reqs[1].header("Auth-Login-Attempt") == "2" and reqs[1].header("Auth-Pass") == "secret"
    assert_backend_login(pop3_backend)
    st.proxy.wait_log('client login failed: "Try again later"')


def test_wait_status_repeats_identical_request(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup()
    answers = [["Auth-Status: WAIT", "Auth-Wait: 1"], auth_ok(pop3_backend.port)]
    auth_server.set_respond(lambda req: answers[len(auth_server.requests) - 1])
    c = st.connect()
    assert c.cmd("USER alice") == b"+OK\r\n"
    t0 = time.monotonic()
    assert c.cmd("PASS secret") == OK_LOGGED_IN
    assert time.monotonic() - t0 >= 0.95
    reqs = auth_server.wait_requests(2)
    assert len(reqs) == 2
    assert reqs[0].raw == reqs[1].raw
    assert reqs[1].header("Auth-Login-Attempt") == "1"
    assert reqs[1].time - reqs[0].time >= 0.95
    assert_backend_login(pop3_backend)


def test_huge_auth_wait_is_clamped_and_ends_with_shutdown(pop3_setup, auth_server, pop3_backend):
    # an Auth-Wait beyond any timer once raised OverflowError (an internal error at once)
    st = pop3_setup(fresh=True)
    auth_server.set_respond(lambda req: auth_fail("Try later", wait=99999999999))
    c = st.connect()
    assert c.cmd("USER alice") == b"+OK\r\n"
    c.sendline("PASS secret")
    assert c.silent(0.5)                      # waiting, not failed
    st.proxy.signal(signal.SIGQUIT)           # the shutdown ends the wait: reply, then close
    assert c.readline() == b"-ERR Try later\r\n"
    assert c.closed()
    assert st.proxy.wait(5) == 0
    assert len(auth_server.requests) == 1
    assert "[alert]" not in st.proxy.log_text()


def test_wait_loop_stops_on_shutdown(pop3_setup, auth_server, pop3_backend):
    # after QUIT the WAIT loop's sleep returns at once: it must not ask again and again
    st = pop3_setup(fresh=True)
    auth_server.set_respond(lambda req: ["Auth-Status: WAIT", "Auth-Wait: 1"])
    c = st.connect()
    assert c.cmd("USER alice") == b"+OK\r\n"
    c.sendline("PASS secret")
    auth_server.wait_requests(1)
    st.proxy.signal(signal.SIGQUIT)
    assert c.readline() == INTERNAL
    assert c.closed()
    assert st.proxy.wait(5) == 0
    assert len(auth_server.requests) <= 2
    st.proxy.wait_log('sent "Auth-Status: WAIT" while shutting down')


@pytest.mark.parametrize("response, log", [
    (["Auth-Status: OK", "Auth_Server: 127.0.0.1", "Auth-Port: {port}"], "sent invalid header in response"),
    (["Auth-Status: OK", "Auth-Port: {port}"], "did not send server or port"),
    (["Auth-Status: OK", "Auth-Server: 127.0.0.1"], "did not send server or port"),
    (["Auth-Status: OK", "Auth-Server: 127.0.0.1", "Auth-Port: 70000"], 'sent invalid server port:"70000"'),
    (["Auth-Status: OK", "Auth-Server: 127.0.0.1", "Auth-Port: 0"], 'sent invalid server port:"0"'),
    (["Auth-Status: OK", "Auth-Server: 127.0.0.1", "Auth-Port: 11x"], 'sent invalid server port:"11x"'),
    (["Auth-Status: OK", "Auth-Server: bad address!", "Auth-Port: {port}"], None),
    (b"HTTP/1.0 200\rOK\r\nAuth-Status: OK\r\n\r\n", "sent invalid response"),
    (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: {port}\r\n", None),
    (b"HTTP/1.0 200 OK\r\nX-Pad: " + b"x" * 1100 + b"\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n"
     b"Auth-Port: {port}\r\n\r\n", None),
    (CLOSE, None),
    (RESET, None),
])
def test_broken_responses_are_internal_errors(pop3_setup, auth_server, pop3_backend, response, log):
    st = pop3_setup()
    port = str(pop3_backend.port)

    def respond(req):
        if isinstance(response, bytes):
            return response.replace(b"{port}", port.encode())
        if isinstance(response, list):
            return [h.replace("{port}", port) for h in response]
        return response
    auth_server.set_respond(respond)
    c = st.connect()
    assert login(c) == INTERNAL
    assert c.closed()
    if log:
        st.proxy.wait_log(f"auth http server 127.0.0.1:{auth_server.port} {log}")
    assert pop3_backend.sessions == []


def test_auth_server_unreachable(pop3_setup, pop3_backend):
    dead = free_port()
    st = pop3_setup(auth_http=f"127.0.0.1:{dead}/auth")
    c = st.connect()
    assert login(c) == INTERNAL
    assert c.closed()
    st.proxy.wait_log("[error]")
    assert pop3_backend.sessions == []


def test_auth_server_timeout(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup(auth_http_timeout="500ms")
    auth_server.set_respond(lambda req: HANG)
    c = st.connect()
    assert c.cmd("USER alice") == b"+OK\r\n"
    t0 = time.monotonic()
    assert c.cmd("PASS secret") == INTERNAL
    assert 0.45 <= time.monotonic() - t0 < 4
    assert c.closed()
    st.proxy.wait_log(f"auth http server 127.0.0.1:{auth_server.port} timed out")
    assert pop3_backend.sessions == []


def test_slow_auth_server_within_timeout(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup(auth_http_timeout="2s")
    auth_server.set_respond(lambda req: Delay(0.5, auth_ok(pop3_backend.port)))
    c = st.connect()
    assert login(c) == OK_LOGGED_IN
    assert_backend_login(pop3_backend)


def test_one_auth_connection_per_attempt(pop3_setup, auth_server, pop3_backend):
    """auth_http_keepalive = 0: nginx's one connection per request (keep-alive reuse is in
    tests/test_auth_client.py)."""
    st = pop3_setup(auth_http_keepalive="0")
    for _ in range(2):
        c = st.connect()
        assert login(c) == OK_LOGGED_IN
    reqs = auth_server.wait_requests(2)
    assert reqs[0].peer != reqs[1].peer
    assert [r.header("Auth-Login-Attempt") for r in reqs] == ["1", "1"]


# --- proxy_pass: no auth server --------------------------------------------------------------

def test_proxy_pass_backend_accepts(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup(auth=False, proxy_pass=f"127.0.0.1:{pop3_backend.port}")
    c = st.connect()
    assert login(c) == OK_LOGGED_IN
    s = assert_backend_login(pop3_backend)
    assert c.cmd("STAT") == b"+OK 2 102\r\n"
    assert c.cmd("QUIT") == b"+OK bye\r\n"
    assert c.closed()
    s.closed.wait(2)
    assert s.lines == [b"USER alice", b"PASS secret", b"STAT", b"QUIT"]
    assert auth_server.requests == []
    line = st.proxy.wait_log("client logged in")
    assert 'login: "alice"' in line and f"upstream: 127.0.0.1:{pop3_backend.port}" in line


@pytest.mark.parametrize("pass_error_message", [None, "off", "on"])
def test_proxy_pass_backend_refuses(pop3_setup, pop3_backend, pass_error_message):
    st = pop3_setup(auth=False, proxy_pass=f"127.0.0.1:{pop3_backend.port}",
                    proxy_pass_error_message=pass_error_message)
    c = st.connect()
    assert login(c, "alice", "wrong") == b"-ERR [AUTH] Authentication failed.\r\n"
    assert c.closed()
    s = pop3_backend.wait_session(0)
    assert s.wait_lines(2) == [b"USER alice", b"PASS wrong"]
    assert s.closed.wait(2)


def test_proxy_pass_sasl_plain(pop3_setup, pop3_backend):
    from tests.support.common import b64
    st = pop3_setup(auth=False, proxy_pass=f"127.0.0.1:{pop3_backend.port}")
    c = st.connect()
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0secret")) == OK_LOGGED_IN
    assert_backend_login(pop3_backend)


def test_proxy_pass_backend_down(pop3_setup):
    st = pop3_setup(auth=False, proxy_pass=f"127.0.0.1:{free_port()}")
    c = st.connect()
    assert login(c) == INTERNAL
    assert c.closed()
