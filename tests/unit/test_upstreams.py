"""Backend pools without sockets: the proxy_pass parser, the consistent hash (stability when a
backend is added, weights), nginx's max_fails/fail_timeout with a fake clock, backups, and
proxy_map's matching and file errors."""

import collections

import pytest

from mailproxy.config.parsers import _Ctx
from mailproxy.config.pool_parsers import p_health_check, p_proxy_map, parse_backends
from mailproxy.config.syntax import Invalid
from mailproxy.errors import ConfigError
from mailproxy.upstreams import Backend, Health, rank

USERS = [b"user%d@example.com" % i for i in range(3000)]


def ctx(key="proxy_pass"):
    return _Ctx(key, "/etc/m.ini", 7, "/etc")


def pool(*texts):
    return parse_backends(" ".join(texts).split(), ctx())


def test_parser_one_backend_as_before():
    (b,) = pool("127.0.0.1:110")
    assert (b.host, b.port, b.weight, b.max_fails, b.fail_timeout, b.backup) == \
        ("127.0.0.1", 110, 1, 1, 10.0, False)
    assert (b.file, b.line) == ("/etc/m.ini", 7) and b.tokens() == ["127.0.0.1:110"]


def test_parser_parameters():
    a, b, c = pool("[::1]:143 weight=3 max_fails=2", "mail.example:143 fail_timeout=30s",
                   "10.0.0.9:143 backup max_fails=0")
    assert (a.host, a.weight, a.max_fails) == ("::1", 3, 2)
    assert (b.host, b.fail_timeout, b.is_name()) == ("mail.example", 30.0, True)
    assert c.backup and c.max_fails == 0
    assert a.tokens() == ["[::1]:143", "weight=3", "max_fails=2"]
    assert c.tokens() == ["10.0.0.9:143", "max_fails=0", "backup"]


@pytest.mark.parametrize("text,message", [
    ("weight=2 127.0.0.1:1", 'invalid value "weight=2"'),
    ("127.0.0.1:1 weight=0", 'invalid value "weight=0"'),
    ("127.0.0.1:1 max_fails=x", 'invalid value "max_fails=x"'),
    ("127.0.0.1:1 fail_timeout=soon", 'invalid value "fail_timeout=soon"'),
    ("127.0.0.1:1 down=1", 'invalid value "down=1"'),
    ("127.0.0.1:1 127.0.0.1:1", "each backend once"),
    ("127.0.0.1", 'no port in "127.0.0.1"'),
    ("bad_host!:1", 'invalid value "bad_host!:1"'),
])
def test_parser_errors(text, message):
    with pytest.raises(Invalid) as e:
        pool(text)
    assert message in str(e.value) and '"proxy_pass"' in str(e.value)


def test_health_check_values():
    assert p_health_check(["off"], ctx()) is None
    assert p_health_check(["interval=5s"], ctx()) == 5.0
    for bad in (["interval=0"], ["5s"], ["every=5s"]):
        with pytest.raises(Invalid):
            p_health_check(bad, ctx())


# ---- the consistent hash ------------------------------------------------------------------------

def first(backends, user):
    return rank(backends, user)[0].text


def test_a_user_always_goes_to_the_same_backend():
    backends = pool("10.0.0.1:143 10.0.0.2:143 10.0.0.3:143")
    assert [first(backends, u) for u in USERS[:50]] == \
        [first(list(reversed(pool("10.0.0.1:143 10.0.0.2:143 10.0.0.3:143"))), u)
         for u in USERS[:50]]


def test_adding_a_backend_moves_only_its_share():
    three = pool("10.0.0.1:143 10.0.0.2:143 10.0.0.3:143")
    four = pool("10.0.0.1:143 10.0.0.2:143 10.0.0.3:143 10.0.0.4:143")
    before = {u: first(three, u) for u in USERS}
    after = {u: first(four, u) for u in USERS}
    moved = [u for u in USERS if before[u] != after[u]]
    assert all(after[u] == "10.0.0.4:143" for u in moved)     # only to the new one
    assert 0.20 < len(moved) / len(USERS) < 0.30               # about a quarter


def test_weights_share_users():
    backends = pool("10.0.0.1:143 weight=3 10.0.0.2:143")
    counts = collections.Counter(first(backends, u) for u in USERS)
    assert 0.70 < counts["10.0.0.1:143"] / len(USERS) < 0.80


def test_backups_rank_last():
    backends = pool("10.0.0.9:143 backup 10.0.0.1:143 10.0.0.2:143")
    for u in USERS[:20]:
        assert rank(backends, u)[-1].text == "10.0.0.9:143"


# ---- health with a fake clock -------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_max_fails_within_fail_timeout_marks_down_for_fail_timeout():
    clock = Clock()
    h = Health(clock)
    (b,) = pool("10.0.0.1:143 max_fails=2 fail_timeout=10s")
    assert h.failed(b) is False and not h.is_down(b)
    clock.now += 11                         # the first failure is outside fail_timeout now
    assert h.failed(b) is False and not h.is_down(b)
    clock.now += 5
    assert h.failed(b) is True and h.is_down(b)     # two within 10s: down
    clock.now += 9.9
    assert h.is_down(b)
    clock.now += 0.2
    assert not h.is_down(b)                 # fail_timeout passed: tried again
    assert h.failed(b) is True and h.is_down(b)     # one failure on trial: down again
    clock.now += 11
    assert h.succeeded(b) is True           # up again (logged at notice)
    assert h.succeeded(b) is False and not h.is_down(b)
    assert h.failed(b) is False             # max_fails counts anew


def test_max_fails_zero_never_marks_down():
    h = Health(Clock())
    (b,) = pool("10.0.0.1:143 max_fails=0")
    assert not any(h.failed(b) for _ in range(5)) and not h.is_down(b)
    assert h.failed(b, force=True) and h.is_down(b)     # the active check may


def test_down_backend_skipped_backups_only_when_all_primaries_down():
    clock = Clock()
    h = Health(clock)
    backends = pool("10.0.0.1:143 10.0.0.2:143 10.0.0.9:143 backup")
    user = USERS[0]
    order = rank(backends, user)
    p1, p2, bk = order
    assert h.choose(backends, user, []) is p1
    h.failed(p1)
    assert h.choose(backends, user, []) is p2               # the next on the user's rank
    assert h.choose(backends, user, [p2]) is None           # p1 down, no backup yet
    h.failed(p2)
    assert h.choose(backends, user, []) is bk               # every primary down
    h.failed(bk)
    assert h.choose(backends, user, []) is p1               # all down: tried anyway
    assert h.choose(backends, user, [p1]) is p2
    assert h.choose(backends, user, [p1, p2, bk]) is None
    clock.now += 10.5
    assert h.choose(backends, user, []) is p1               # back after fail_timeout


# ---- proxy_map ----------------------------------------------------------------------------------

def load_map(tmp_path, text):
    path = tmp_path / "users.map"
    path.write_text(text)
    return p_proxy_map([str(path)], _Ctx("proxy_map", str(tmp_path / "m.ini"), 3,
                                         str(tmp_path)))


def test_map_most_specific_wins(tmp_path):
    pm = load_map(tmp_path, "# users\n"
                  "alice@example.com  10.0.0.3:143   # her own\n"
                  "@Example.com 10.0.0.1:143 weight=2 10.0.0.2:143\n"
                  "*   10.0.0.9:143\n")
    assert [b.text for b in pm.lookup(b"alice@example.com")] == ["10.0.0.3:143"]
    assert [b.text for b in pm.lookup(b"Bob@EXAMPLE.com")] == ["10.0.0.1:143", "10.0.0.2:143"]
    assert pm.lookup(b"bob@example.com")[0].weight == 2
    assert [b.text for b in pm.lookup(b"carol@other.org")] == ["10.0.0.9:143"]
    assert [b.text for b in pm.lookup(b"nodomain")] == ["10.0.0.9:143"]
    assert len(pm.backends()) == 4


def test_map_without_default(tmp_path):
    pm = load_map(tmp_path, "@example.com 10.0.0.1:143\n")
    assert pm.lookup(b"x@example.org") is None and pm.lookup(b"x") is None
    assert pm.lookup(b"x@a@example.com") is not None        # the domain after the last @


@pytest.mark.parametrize("text,line,message", [
    ("\n\nalice@example.com\n", 3, '"alice@example.com" needs a backend'),
    ("al*ce 10.0.0.1:143\n", 1, 'invalid pattern "al*ce"'),
    ("@ 10.0.0.1:143\n", 1, 'invalid pattern "@"'),
    ("* 10.0.0.1:143\n* 10.0.0.2:143\n", 2, 'duplicate entry "*"'),
    ("@a.org 10.0.0.1:143 weight=x\n", 1, 'invalid value "weight=x"'),
    ("@a.org 10.0.0.1\n", 1, "no port"),
])
def test_map_errors_name_the_map_file_and_line(tmp_path, text, line, message):
    with pytest.raises(ConfigError) as e:
        load_map(tmp_path, text)
    err = e.value
    assert err.file == str(tmp_path / "users.map") and err.line == line, str(err)
    assert message in err.message and err.key == "proxy_map"


def test_map_missing_file(tmp_path):
    with pytest.raises(Invalid) as e:
        load_map(tmp_path, "").__class__    # exists
        p_proxy_map(["nope.map"], _Ctx("proxy_map", "m.ini", 3, str(tmp_path)))
    assert 'cannot read "proxy_map" file' in str(e.value)


def test_backend_sockaddr_kept_from_load():
    b = Backend("10.0.0.1", 143)
    assert b.key == ("10.0.0.1", 143) and not b.is_name() and b.addrs == []
