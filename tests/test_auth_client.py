"""The auth_http client end to end (auth_pool.py, auth_client.py, auth_cache.py): keep-alive
reuse seen at the auth service, a connection the service closed, https with a trusted CA and a
client certificate, failover between auth_http URLs, and the answer cache with kick."""

import os
import ssl
import subprocess

import pytest

from tests.support.auth import AuthServer, auth_fail, auth_ok
from tests.support.mailbackends import Pop3Backend
from tests.support.process import free_port, proxy_command, server_block

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OK = b"+OK logged in\r\n"
INTERNAL = b"-ERR internal server error\r\n"


@pytest.fixture
def backend(backend_factory):
    return backend_factory(Pop3Backend, users={"alice": "secret", "bob": "secret"})


@pytest.fixture
def servers():
    started = []

    def make(**kw):
        s = AuthServer(**kw)
        started.append(s)
        return s
    yield make
    for s in started:
        s.stop()


def start(proxy_factory, auth_http, main=None, **directives):
    port = free_port()
    block = server_block("pop3", port, auth_http=auth_http, timeout="3s", **directives)
    p = proxy_factory({"servers": {"pop3": block}, "main": main or {}})
    p.port = port
    return p


def login(proxy, user="alice", password="secret"):
    from tests.support.clients import LineClient
    c = LineClient("127.0.0.1", proxy.port, 5)
    assert c.readline().startswith(b"+OK")
    assert c.cmd("USER %s" % user) == b"+OK\r\n"
    answer = c.cmd("PASS %s" % password)
    c.close()
    return answer


def test_keepalive_one_connection_for_several_logins(proxy_factory, servers, backend):
    auth = servers()
    auth.route_to(backend.port)
    p = start(proxy_factory, auth.url)
    for _ in range(3):
        assert login(p) == OK
    reqs = auth.wait_requests(3)
    assert [r.conn for r in reqs] == [1, 1, 1] and auth.connections == 1
    assert all(r.request_line.endswith("HTTP/1.1") for r in reqs)


def test_keepalive_off_one_connection_per_login(proxy_factory, servers, backend):
    auth = servers()
    auth.route_to(backend.port)
    p = start(proxy_factory, auth.url, auth_http_keepalive=0)
    for _ in range(2):
        assert login(p) == OK
    reqs = auth.wait_requests(2)
    assert [r.conn for r in reqs] == [1, 2]
    assert all(r.request_line.endswith("HTTP/1.0") for r in reqs)


def test_connection_closed_by_the_service_is_retried(proxy_factory, servers, backend):
    auth = servers(body=b"ignored body")
    auth.route_to(backend.port)
    auth.close_kept = True           # answers with keep-alive, then closes: a stale pool entry
    p = start(proxy_factory, auth.url)
    assert login(p) == OK
    assert login(p) == OK            # sent on the stale one first, then on a new connection
    reqs = auth.wait_requests(2)
    assert [r.conn for r in reqs if r.raw] == [1, 2]
    assert "[error]" not in p.log_text() and "[alert]" not in p.log_text()


def _tls_server(servers, pki, cert, client_ca=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return servers(ssl_context=ctx)


def test_https_with_trusted_ca_and_client_certificate(proxy_factory, servers, backend, pki):
    auth = _tls_server(servers, pki, pki.server_rsa, client_ca=pki.ca)
    auth.route_to(backend.port)
    p = start(proxy_factory, auth.url, auth_http_trusted_certificate=pki.ca,
              auth_http_certificate=pki.client[0], auth_http_certificate_key=pki.client[1])
    assert login(p) == OK and login(p) == OK
    assert auth.connections == 1 and not auth.handshake_errors
    # without the client certificate the service refuses the handshake
    q = start(proxy_factory, auth.url, auth_http_trusted_certificate=pki.ca)
    assert login(q) == INTERNAL
    assert "auth http server 127.0.0.1:%d" % auth.port in q.wait_log("[error]")


@pytest.mark.parametrize("what", ["wrong CA", "wrong name"])
def test_https_refused_is_the_temporary_failure(proxy_factory, servers, backend, pki, what):
    if what == "wrong CA":
        auth, ca = _tls_server(servers, pki, pki.server_rsa), pki.other_ca
    else:
        auth, ca = _tls_server(servers, pki, pki.sni_exact), pki.ca   # imap.example.com only
    auth.route_to(backend.port)
    auth.expect_errors = True
    p = start(proxy_factory, auth.url, auth_http_trusted_certificate=ca)
    assert login(p) == INTERNAL
    line = p.wait_log("SSL handshake with auth http server")
    assert "127.0.0.1:%d" % auth.port in line and "certificate verify failed" in line
    assert auth.requests == []


def test_failover_to_the_next_url_and_skip_while_down(proxy_factory, servers, backend):
    live = servers()
    live.route_to(backend.port)
    dead = free_port()
    p = start(proxy_factory, ["http://127.0.0.1:%d/auth" % dead, live.url])
    assert login(p) == OK
    line = p.wait_log("connect() to 127.0.0.1:%d failed" % dead)
    assert "[error]" in line and "marked down for 10s" in line
    assert login(p) == OK and login(p) == OK
    assert p.log_text().count("connect() to 127.0.0.1:%d" % dead) == 1     # skipped while down
    assert len(live.wait_requests(3)) == 3


def test_all_down_still_tried(proxy_factory, backend):
    dead1, dead2 = free_port(), free_port()
    p = start(proxy_factory, ["127.0.0.1:%d" % dead1, "127.0.0.1:%d" % dead2])
    assert login(p) == INTERNAL
    assert login(p) == INTERNAL
    text = p.log_text()
    assert text.count("connect() to 127.0.0.1:%d" % dead1) == 2     # never fail without trying
    assert text.count("connect() to 127.0.0.1:%d" % dead2) == 2


def test_answer_errors_are_no_failover(proxy_factory, servers, backend):
    bad, live = servers(), servers()
    bad.set_respond(lambda req: b"HTTP/1.0 500 Oops\r\nBad Header\r\n\r\n")
    live.route_to(backend.port)
    p = start(proxy_factory, [bad.url, live.url])
    assert login(p) == INTERNAL
    assert live.requests == []


def kick(proxy, user):
    r = subprocess.run(proxy_command() + ["-c", str(proxy.conf_path), "kick", user], cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_cache_hit_changed_password_and_kick(proxy_factory, servers, backend):
    auth = servers()

    def respond(req):
        if req.header("Auth-Pass") == "secret":
            return auth_ok(backend.port)
        return auth_fail("Invalid login or password")
    auth.set_respond(respond)
    p = start(proxy_factory, auth.url, main={"control_socket": "control.sock"},
              auth_http_cache="valid=1m invalid=1m size=100", error_log="cache.log debug")
    assert login(p) == OK and login(p) == OK
    assert len(auth.requests) == 1                      # asked once for two logins
    assert login(p, password="wrong").startswith(b"-ERR")
    assert len(auth.requests) == 2                      # a changed password: a miss
    assert login(p, password="wrong").startswith(b"-ERR")
    assert len(auth.requests) == 2                      # the refusal is cached too
    assert login(p, user="bob") == OK
    assert len(auth.requests) == 3
    kick(p, "alice")
    assert login(p) == OK
    assert len(auth.requests) == 4                      # kick cleared alice's entries
    assert login(p, user="bob") == OK
    assert len(auth.requests) == 4                      # and only hers
    log = (p.dir / "cache.log").read_text()
    assert log.count("auth_http cache hit") == 3 and "secret" not in log


def test_an_idle_connection_that_spoke_is_never_reused():
    # bytes the service sent while the connection was idle (a late 408, garbage) are no
    # answer to the next request: that connection is closed, the next idle one is taken
    import socket

    from mailproxy import auth_pool
    pool = auth_pool.Pool(2)
    quiet, quiet_peer = socket.socketpair()
    spoke, spoke_peer = socket.socketpair()
    try:
        pool.give(("k",), quiet)
        pool.give(("k",), spoke)
        spoke_peer.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
        assert pool.take(("k",)) is quiet
        assert spoke.fileno() == -1
        pool.give(("k",), quiet)
        quiet_peer.close()                      # closed by the service: not taken either
        assert pool.take(("k",)) is None and quiet.fileno() == -1
    finally:
        for s in (quiet, quiet_peer, spoke, spoke_peer):
            s.close()
