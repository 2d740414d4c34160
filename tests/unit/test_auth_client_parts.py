"""The auth_http client without sockets: request framing, response framing (Content-Length,
chunked, close), the idle pool's bounds and expiry, the answer cache's keys, expiry and bounds,
and the failover order with a fake clock."""

import pytest

from mailproxy import auth_client, auth_http, auth_pool
from mailproxy.auth_cache import Cache
from mailproxy.auth_http import AuthHttpError, AuthRequest, AuthResult
from mailproxy.config import AuthURL, server_defaults


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def req(user=b"alice", passwd=b"secret", method="plain", protocol="imap"):
    return AuthRequest(method=method, user=user, passwd=passwd, protocol=protocol)


def recv_from(*chunks):
    """A recv(n) over the given chunks, then end of stream."""
    data = list(chunks)

    def recv(n):
        if not data:
            return b""
        head = data.pop(0)
        if len(head) > n:
            data.insert(0, head[n:])
            head = head[:n]
        return head
    recv.left = data
    return recv


OK = b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\n"


# --- request framing --------------------------------------------------------------------------

def test_frame_keepalive_and_off():
    url = AuthURL(text="x", host="127.0.0.1", port=80, uri="/auth", sockaddr=("127.0.0.1", 80))
    request = auth_http.build_request(url, req())
    assert auth_pool.frame(request, False) == request
    framed = auth_pool.frame(request, True)
    assert framed.startswith(b"GET /auth HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Connection: keep-alive\r\nAuth-Method: plain\r\n")
    assert framed.replace(b"Connection: keep-alive\r\n", b"").replace(b"1.1", b"1.0", 1) \
        == request


# --- response framing --------------------------------------------------------------------------

def read(recv, keepalive=True):
    return auth_pool.read_response(recv, req(), "127.0.0.1:80", keepalive)


def test_content_length_read_whole_and_reused():
    recv = recv_from(b"HTTP/1.1 200 OK\r\n" + OK + b"Content-Length: 5\r\n\r\nab", b"cde")
    result, reusable = read(recv)
    assert result.status == "OK" and result.port == 143 and reusable
    assert recv.left == []


def test_chunked_read_whole_and_reused():
    body = b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nTrailer: 1\r\n\r\n"
    recv = recv_from(b"HTTP/1.1 200 OK\r\n" + OK + b"Transfer-Encoding: chunked\r\n\r\n",
                     body[:7], body[7:])
    result, reusable = read(recv)
    assert result.status == "OK" and reusable and recv.left == []


@pytest.mark.parametrize("head,body", [
    (b"HTTP/1.1 200 OK\r\n" + OK, b"read to close"),                   # neither: close
    (b"HTTP/1.1 200 OK\r\n" + OK + b"Connection: close\r\nContent-Length: 0\r\n", b""),
    (b"HTTP/1.0 200 OK\r\n" + OK + b"Content-Length: 0\r\n", b""),      # 1.0 without keep-alive
    (OK, b""),                                                          # no status line
    (b"HTTP/1.1 200 OK\r\n" + OK + b"Content-Length: 2\r\n", b"abcd"),  # more than said
    (b"HTTP/1.1 200 OK\r\n" + OK + b"Content-Length: x\r\n", b""),
    (b"HTTP/1.1 200 OK\r\n" + OK + b"Transfer-Encoding: gzip\r\n", b""),
    (b"HTTP/1.1 200 OK\r\n" + OK + b"Transfer-Encoding: chunked\r\n", b"zz\r\n"),
    (b"HTTP/1.1 200 OK\r\n" + OK + b"Content-Length: 999999\r\n", b"x"),  # too long to read
])
def test_not_reused(head, body):
    result, reusable = read(recv_from(head + b"\r\n" + body))
    assert result.status == "OK" and not reusable


def test_http10_keepalive_answer_reused():
    result, reusable = read(recv_from(b"HTTP/1.0 200 OK\r\n" + OK
                                      + b"Connection: Keep-Alive\r\nContent-Length: 0\r\n\r\n"))
    assert reusable


def test_body_cut_short_still_answers():
    result, reusable = read(recv_from(b"HTTP/1.1 200 OK\r\n" + OK
                                      + b"Content-Length: 10\r\n\r\nabc"))
    assert result.status == "OK" and not reusable


def test_keepalive_off_reads_header_only():
    recv = recv_from(b"HTTP/1.0 200 OK\r\n" + OK + b"\r\n", b"never read")
    result, reusable = read(recv, keepalive=False)
    assert result.status == "OK" and not reusable and recv.left == [b"never read"]


def test_closed_before_any_byte_is_stale_after_some_is_premature():
    with pytest.raises(auth_pool._Stale):
        read(recv_from())
    with pytest.raises(AuthHttpError, match="closed connection before the end of the header"):
        read(recv_from(b"HTTP/1.1 200 OK\r\nAuth-St"))


def test_malformed_and_too_large_header():
    with pytest.raises(AuthHttpError, match="invalid header"):
        read(recv_from(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n"))
    with pytest.raises(AuthHttpError, match="too large header"):
        read(recv_from(b"HTTP/1.1 200 OK\r\nX: " + b"x" * 2000 + b"\r\n\r\n"))


# --- the pool ------------------------------------------------------------------------------------

class FakeConn:
    def __init__(self, name):
        self.name, self.closed = name, False

    def close(self):
        self.closed = True


def test_pool_bounded_and_most_recent_first():
    clock = Clock()
    pool = auth_pool.Pool(2, clock)
    a, b, c = FakeConn("a"), FakeConn("b"), FakeConn("c")
    for conn in (a, b, c):
        pool.give("k", conn)
    assert pool.idle("k") == 2 and c.closed and not a.closed     # never more than N
    assert pool.take("k") is b and pool.take("k") is a and pool.take("k") is None
    assert pool.take("other") is None


def test_pool_idle_expiry():
    clock = Clock()
    pool = auth_pool.Pool(4, clock, idle_timeout=60)
    old, new = FakeConn("old"), FakeConn("new")
    pool.give("k", old)
    clock.now += 50
    pool.give("j", new)
    clock.now += 11                        # old: 61 s idle, new: 11 s
    assert pool.take("k") is None and old.closed
    assert pool.take("j") is new and not new.closed


def test_pool_clear_closes():
    pool = auth_pool.Pool(4, Clock())
    conns = [FakeConn(i) for i in range(3)]
    for i, conn in enumerate(conns):
        pool.give(i % 2, conn)
    pool.clear()
    assert all(c.closed for c in conns) and pool.idle() == 0


def test_pool_key_separates_services_and_tls():
    plain = AuthURL(text="a", host="h", sockaddr=("127.0.0.1", 80))
    other = AuthURL(text="b", host="h", sockaddr=("127.0.0.1", 81))
    https = AuthURL(text="c", host="h", sockaddr=("127.0.0.1", 80), tls=True)
    ctx = object()
    keys = {auth_pool.Pool.key(u, ctx) for u in (plain, other, https)}
    assert len(keys) == 3


# --- the cache -----------------------------------------------------------------------------------

def test_cache_key_hashes_the_password():
    cache = Cache(60, 10, 100, Clock())
    conf = object()
    k = cache.key(conf, req())
    assert b"secret" not in repr(k).encode() and k[:3] == (id(conf), "imap", b"alice")
    assert cache.key(conf, req(passwd=b"other")) != k
    assert cache.key(conf, req(protocol="pop3")) != k
    assert cache.key(object(), req()) != k
    assert Cache(60, 10, 100).key(conf, req()) != k                 # a key per process
    for method in ("oauthbearer", "xoauth2", "external", "apop", "cram-md5", "none"):
        assert cache.key(conf, req(method=method)) is None


def test_cache_expiry_ok_and_failure():
    clock = Clock()
    cache = Cache(60, 10, 100, clock)
    ok_key, fail_key = cache.key(1, req()), cache.key(1, req(user=b"bob"))
    assert cache.put(ok_key, AuthResult("OK", server="127.0.0.1", port=143), b"secret")
    assert cache.put(fail_key, AuthResult("FAIL", message=b"no"), b"secret")
    clock.now += 9
    assert cache.get(ok_key, b"secret").port == 143
    assert cache.get(fail_key, b"secret").message == b"no"
    clock.now += 2
    assert cache.get(fail_key, b"secret") is None
    clock.now += 50
    assert cache.get(ok_key, b"secret") is None and len(cache) == 0


def test_cache_skips_wait_and_zero_times():
    cache = Cache(60, 0, 100, Clock())
    k = cache.key(1, req())
    assert not cache.put(k, AuthResult("FAIL", message=b"no", wait=3), b"secret")
    assert not cache.put(k, AuthResult("FAIL", message=b"no"), b"secret")       # invalid=0
    assert not cache.put(k, AuthResult("OK", server="x", port=1, wait=0), b"secret")
    assert cache.get(k, b"secret") is None


def test_cache_bounded_oldest_go():
    cache = Cache(60, 60, 3, Clock())
    keys = [cache.key(1, req(user=b"u%d" % i)) for i in range(5)]
    for k in keys:
        cache.put(k, AuthResult("OK", server="x", port=1), b"p")
    assert len(cache) == 3
    assert [cache.get(k, b"p") is not None for k in keys] == [False, False, True, True, True]


def test_cache_keeps_no_password_and_forgets_old_ones():
    cache = Cache(60, 60, 10, Clock())
    k = cache.key(1, req())
    cache.put(k, AuthResult("OK", server="x", port=1, passwd=b"secret"), b"secret")
    assert b"secret" not in repr(cache._entries).encode()
    assert cache.get(k, b"secret").passwd == b"secret"               # given back at a hit
    master = cache.key(1, req(user=b"bob"))
    cache.put(master, AuthResult("OK", server="x", port=1, passwd=b"master"), b"pw")
    assert cache.get(master, b"pw").passwd == b"master"
    # a new password that works: the old one's entry goes
    new = cache.key(1, req(passwd=b"new"))
    cache.put(new, AuthResult("OK", server="x", port=1), b"new")
    assert cache.get(k, b"secret") is None and cache.get(new, b"new") is not None


def test_cache_forget_user():
    cache = Cache(60, 60, 10, Clock())
    a = cache.key(1, req())
    a2 = cache.key(2, req(protocol="pop3"))
    b = cache.key(1, req(user=b"bob"))
    for k in (a, a2, b):
        cache.put(k, AuthResult("OK", server="x", port=1), b"secret")
    assert cache.forget(b"alice") == 2
    assert cache.get(a, b"secret") is None and cache.get(b, b"secret") is not None


# --- failover ------------------------------------------------------------------------------------

def urls(n):
    return [AuthURL(text="u%d" % i, host="127.0.0.%d" % (i + 1), port=80,
                    sockaddr=("127.0.0.%d" % (i + 1), 80)) for i in range(n)]


class Script:
    """auth_http.query stand-in: per URL host, 'down' (Unreachable), 'bad' (a malformed
    answer) or an AuthResult; records (host, timeout) of each call."""

    def __init__(self, monkeypatch, clock, answers, cost=0.0):
        self.answers, self.calls, self.clock, self.cost = answers, [], clock, cost
        monkeypatch.setattr(auth_client.auth_http, "query", self)

    def __call__(self, url, req, timeout, **kw):
        self.calls.append((url.host, timeout))
        self.clock.now += self.cost
        a = self.answers[url.host]
        if a == "down":
            raise auth_pool.Unreachable("connect() to %s:80 failed (111: refused)" % url.host)
        if a == "bad":
            raise AuthHttpError("auth http server %s:80 sent invalid header" % url.host)
        return a


def setup_failover(monkeypatch, n, answers, cost=0.0, timeout=60.0):
    clock = Clock()
    client = auth_client.AuthClient(clock)
    conf = server_defaults("imap", auth_http=urls(n), auth_http_timeout=timeout)
    logs = []
    script = Script(monkeypatch, clock, answers, cost)
    ask = lambda: client.query(conf, req(), log=lambda lvl, msg, **kw: logs.append((lvl, msg)))
    return clock, script, logs, ask


OK_RESULT = AuthResult("OK", server="127.0.0.1", port=143)


def test_failover_to_next_and_skip_while_down(monkeypatch):
    answers = {"127.0.0.1": "down", "127.0.0.2": OK_RESULT}
    clock, script, logs, ask = setup_failover(monkeypatch, 2, answers)
    assert ask() is OK_RESULT
    assert [h for h, _ in script.calls] == ["127.0.0.1", "127.0.0.2"]
    assert logs == [("error", "connect() to 127.0.0.1:80 failed (111: refused), "
                              "marked down for 10s")]
    script.calls.clear()
    clock.now += 9
    assert ask() is OK_RESULT
    assert [h for h, _ in script.calls] == ["127.0.0.2"]           # skipped while down
    script.calls.clear()
    clock.now += 2                                                  # down time over
    answers["127.0.0.1"] = OK_RESULT
    logs.clear()
    assert ask() is OK_RESULT
    assert [h for h, _ in script.calls] == ["127.0.0.1"]
    assert logs == [("notice", "auth http server 127.0.0.1:80 answers again")]


def test_all_down_tried_anyway_in_order(monkeypatch):
    answers = {"127.0.0.1": "down", "127.0.0.2": "down", "127.0.0.3": "down"}
    clock, script, logs, ask = setup_failover(monkeypatch, 3, answers)
    with pytest.raises(auth_pool.Unreachable, match="127.0.0.3"):
        ask()
    assert [h for h, _ in script.calls] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert [lvl for lvl, _ in logs] == ["error", "error"]          # the last: the session's
    script.calls.clear()
    answers["127.0.0.2"] = OK_RESULT
    assert ask() is OK_RESULT                                       # all down: still tried
    assert [h for h, _ in script.calls] == ["127.0.0.1", "127.0.0.2"]


def test_answer_errors_are_no_failover(monkeypatch):
    answers = {"127.0.0.1": "bad", "127.0.0.2": OK_RESULT}
    clock, script, logs, ask = setup_failover(monkeypatch, 2, answers)
    with pytest.raises(AuthHttpError, match="invalid header"):
        ask()
    assert [h for h, _ in script.calls] == ["127.0.0.1"] and logs == []
    answers["127.0.0.1"] = AuthResult("FAIL", message=b"Invalid login")
    assert ask().status == "FAIL"


def test_failover_within_the_timeout(monkeypatch):
    answers = {"127.0.0.1": "down", "127.0.0.2": "down", "127.0.0.3": OK_RESULT}
    clock, script, logs, ask = setup_failover(monkeypatch, 3, answers, cost=10.0, timeout=60.0)
    assert ask() is OK_RESULT
    # an equal share of what is left for each, the last one all of it
    assert script.calls == [("127.0.0.1", 20.0), ("127.0.0.2", 25.0), ("127.0.0.3", 40.0)]


def test_cache_through_the_client(monkeypatch):
    clock = Clock()
    client = auth_client.AuthClient(clock)
    conf = server_defaults("imap", auth_http=urls(1), auth_http_cache=(60.0, 0.0, 10))
    script = Script(monkeypatch, clock, {"127.0.0.1": OK_RESULT})
    logs = []

    def ask(**kw):
        return client.query(conf, req(**kw), log=lambda lvl, msg, **k: logs.append((lvl, msg)))
    assert ask() is OK_RESULT and ask() is OK_RESULT
    assert len(script.calls) == 1
    assert ("debug", "auth_http cache hit") in logs and ("debug", "auth_http cache miss") in logs
    ask(passwd=b"changed")
    assert len(script.calls) == 2                                   # a changed password: miss
    ask(method="oauthbearer")
    ask(method="oauthbearer")
    assert len(script.calls) == 4                                   # tokens never cached
    assert client.forget(b"alice") == 1
    ask(passwd=b"changed")
    assert len(script.calls) == 5

