"""Backend pools end to end: proxy_pass with two and three scripted POP3 backends, one killed
mid-run (logins move, relayed sessions on the live ones untouched, the dead one back after
fail_timeout), backups, a name resolving to two addresses (the fake DNS through `resolver`),
proxy_map with a HUP reload and `-t` errors."""

import signal
import subprocess
import time

from mailproxy.resolver import T_A
from tests.support.common import track, wait_for
from tests.support.mailbackends import Pop3Backend
from tests.support.process import free_port, proxy_command, server_block

# enough users that each of three backends gets some whatever their (random) ports: the hash
# is over the backend's text, so with 12 users one backend was left empty ~2% of the runs
USERS = {"u%d" % i: "pw" for i in range(40)}


def backends(backend_factory, n, **kw):
    return [backend_factory(Pop3Backend, users=USERS, pass_reply=b"+OK at b%d" % i, **kw)
            for i in range(n)]


def start(proxy_factory, port, main=None, **directives):
    directives.setdefault("timeout", "2s")
    directives.setdefault("pop3_auth", "plain")
    return proxy_factory({"servers": {"pop3": server_block("pop3", port, **directives)},
                          "main": main})


def login(port, user, host="127.0.0.1"):
    import poplib
    c = track(poplib.POP3(host, port, timeout=5))
    c.user(user)
    where = c.pass_("pw").decode()
    return c, where.split()[-1]


def test_three_backends_one_killed_then_back(proxy_factory, backend_factory):
    bs = backends(backend_factory, 3)
    bs[1].expect_errors = True
    port = free_port()
    p = start(proxy_factory, port, proxy_pass=" ".join(
        "%s fail_timeout=1s" % b.address for b in bs))
    sessions = {u: login(port, u) for u in USERS}
    home = {u: w for u, (_c, w) in sessions.items()}
    assert set(home.values()) == {"b0", "b1", "b2"}, home        # spread over the three
    assert {u: login(port, u)[1] for u in USERS} == home         # the same backend again
    dead_port = bs[1].port
    bs[1].stop()                                                 # killed mid-run
    for u, (c, w) in sessions.items():
        if w != "b1":
            assert c.stat()[0] == 2                              # relayed sessions untouched
    moved = {u: login(port, u)[1] for u in USERS if home[u] == "b1"}
    assert moved and all(w in ("b0", "b2") for w in moved.values())
    assert {u: login(port, u)[1] for u in USERS if home[u] != "b1"} == \
        {u: w for u, w in home.items() if w != "b1"}             # the others stay home
    p.wait_log("marked down for 1s")
    p.wait_log('failover of user "%s" from 127.0.0.1:%d to' % (next(iter(moved)), dead_port))
    assert p.log_text().count("marked down") == 1                # skipped while down
    again = backend_factory(Pop3Backend, users=USERS, pass_reply=b"+OK at b1", port=dead_port)
    time.sleep(1.1)                                              # fail_timeout passes
    assert {u: login(port, u)[1] for u in moved} == {u: "b1" for u in moved}
    p.wait_log("backend 127.0.0.1:%d is up again" % dead_port)
    assert again.sessions


def test_two_backends_backup_only_when_the_primary_is_down(proxy_factory, backend_factory):
    bs = backends(backend_factory, 2)
    bs[0].expect_errors = True
    port = free_port()
    start(proxy_factory, port, proxy_pass="%s %s backup" % (bs[0].address, bs[1].address))
    assert {login(port, u)[1] for u in USERS} == {"b0"}
    bs[0].stop()
    assert {login(port, u)[1] for u in USERS} == {"b1"}


def test_a_name_with_two_addresses_tried_in_turn(proxy_factory, backend_factory, dns):
    (b,) = backends(backend_factory, 1)
    server = dns({("pool.test", T_A): [(T_A, 60, "127.0.0.2"), (T_A, 60, "127.0.0.1")]})
    port = free_port()
    p = start(proxy_factory, port, resolver="127.0.0.1:%d ipv6=off" % server.port,
              proxy_pass="pool.test:%d 127.0.0.3:1 backup" % b.port, timeout="2s")
    assert login(port, "u1")[1] == "b0"             # 127.0.0.2 refused, then 127.0.0.1
    assert "marked down" not in p.log_text()
    queries = len(server.queries)
    for u in ("u2", "u3"):
        login(port, u)
    assert len(server.queries) == queries           # never resolved per login



def test_an_auth_server_name_with_two_addresses_tried_in_turn(proxy_factory, backend_factory,
                                                              auth_server, dns):
    (b,) = backends(backend_factory, 1)
    server = dns({("mail.test", T_A): [(T_A, 60, "127.0.0.2"), (T_A, 60, "127.0.0.1")]})
    auth_server.route_to(b.port, server="mail.test")
    port = free_port()
    start(proxy_factory, port, resolver="127.0.0.1:%d ipv6=off" % server.port,
          auth_http=auth_server.url)
    assert login(port, "u1")[1] == "b0"             # 127.0.0.2 refused, then 127.0.0.1
    queries = len(server.queries)
    assert queries >= 1                             # through `resolver`'s servers
    for u in ("u2", "u3"):
        login(port, u)
    assert len(server.queries) == queries           # its cache: not resolved per login

def test_proxy_map_reloaded_on_hup(proxy_factory, backend_factory, tmp_path):
    b0, b1 = backends(backend_factory, 2)
    mapfile = tmp_path / "users.map"
    mapfile.write_text("u1  %s   # one user\n@example.org %s\n" % (b1.address, b1.address))
    port = free_port()
    p = start(proxy_factory, port, proxy_map=str(mapfile))
    assert login(port, "u1")[1] == "b1"
    import poplib
    c = track(poplib.POP3("127.0.0.1", port, timeout=5))
    c.user("u2")
    try:
        c.pass_("pw")
        raise AssertionError("no map line: refused")
    except poplib.error_proto as e:
        assert str(e) == "b'-ERR Invalid login or password'"
    p.wait_log('no proxy_map entry for user "u2"')
    mapfile.write_text("u1 %s\n* %s\n" % (b1.address, b0.address))
    p.signal(signal.SIGHUP)
    wait_for(lambda: _routes(port, "u2") == "b0", 5, 0.05, "the map reloaded")
    assert login(port, "u1")[1] == "b1"


def _routes(port, user):
    try:
        return login(port, user)[1]
    except Exception:
        return None


def test_proxy_map_errors_in_t(tmp_path):
    mapfile = tmp_path / "users.map"
    mapfile.write_text("# users\n@example.org 127.0.0.1:110 weight=x\n")
    conf = tmp_path / "m.ini"
    conf.write_text("[server pop3]\nlisten = 127.0.0.1:%d\nprotocol = pop3\n"
                    "proxy_map = users.map\n" % free_port())
    r = subprocess.run(proxy_command() + ["-t", "-c", str(conf)], capture_output=True,
                       text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert 'invalid value "weight=x" in "proxy_pass"' not in r.stderr
    assert "%s:2" % mapfile in r.stderr and "weight=x" in r.stderr, r.stderr
    mapfile.write_text("* 127.0.0.1:110\n")
    r = subprocess.run(proxy_command() + ["-t", "-c", str(conf)], capture_output=True,
                       text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr


def test_health_check_marks_a_silent_backend_down_then_up_without_logins(proxy_factory,
                                                                          backend_factory):
    bs = backends(backend_factory, 2)
    port = free_port()
    p = start(proxy_factory, port, proxy_pass="%s %s" % (bs[0].address, bs[1].address),
              proxy_health_check="interval=1s")
    silent = bs[1]
    # the start-up look, then a first check
    wait_for(lambda: silent.accepted >= 2, 3, 0.05, "a first check")
    silent.stall_at = "greeting"                        # accepts, never greets
    p.wait_log("backend %s marked down" % silent.address, timeout=5)
    assert "health check: no greeting" in p.log_text()
    assert not any(c.lines for c in silent.sessions)    # no login went to it, only checks
    home = [u for u in USERS if login(port, u)[1] == "b0"]
    assert len(home) == len(USERS)                      # every user on the live one
    assert "failover" not in p.log_text()               # skipped, not tried first
    silent.stall_at = None
    p.wait_log("backend %s is up again" % silent.address, timeout=5)
    assert "b1" in {login(port, u)[1] for u in USERS}
