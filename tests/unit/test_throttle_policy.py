"""Login throttling's policy (mailproxy/throttle.py), its table (mailproxy/login_table.py) and
the Session's hooks into them, without sockets: a fake clock, the table in process, the
Session over playbook's FakeSock with auth_http.query and backend.connect faked."""

from types import SimpleNamespace

import pytest

from mailproxy import auth_http, backend, config, login_table, metrics, throttle
from mailproxy.config.types import MainConf
from mailproxy.errors import ConfigError
from mailproxy.login_table import LoginTable
from mailproxy.runtime import Runtime
from mailproxy.session import Session
from mailproxy.throttle import Record, blocked, delay, failed, penalty, recent, succeeded
from playbook import FakeSock, RecordingLog, sent


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# ---- the policy -------------------------------------------------------------------------------

def test_penalty_doubles_from_two_seconds_to_the_maximum():
    assert [penalty(n, 15.0) for n in range(6)] == [0, 2, 4, 8, 15, 15]
    assert penalty(1, 1.0) == 1.0 and penalty(10 ** 6, 15.0) == 15.0


def test_delay_counts_from_the_last_failure_and_is_forgotten():
    rec = failed(Record(), 100.0, 7, 600.0)
    assert (rec.failures, rec.window, rec.last) == (1, 1, 100.0)
    assert delay(rec, 100.0, 15.0) == 2.0 and delay(rec, 101.5, 15.0) == 0.5
    assert delay(rec, 102.0, 15.0) == 0.0
    rec = failed(failed(rec, 101.0, 8, 600.0), 102.0, 9, 600.0)
    assert rec.failures == 3 and delay(rec, 102.0, 15.0) == 8.0
    assert delay(rec, 102.0, 5.0) == 5.0                     # login_penalty_max
    assert delay(rec, 102.0 + throttle.FORGET, 10 ** 6) == 0.0
    assert failed(rec, 102.0 + throttle.FORGET, 9, 600.0).failures == 1


def test_the_same_wrong_password_does_not_raise_it():
    rec = failed(failed(Record(), 100.0, 7, 600.0), 110.0, 7, 600.0)
    assert (rec.failures, rec.window, rec.last) == (1, 1, 110.0)   # delay starts again
    rec = failed(rec, 111.0, 8, 600.0)
    assert (rec.failures, rec.window) == (2, 2)


def test_success_clears_the_penalty_not_the_block_window():
    rec = failed(failed(Record(), 100.0, 1, 600.0), 100.0, 2, 600.0)
    ok = succeeded(rec)
    assert ok.failures == 0 and delay(ok, 100.0, 15.0) == 0.0 and ok.window == 2


def test_block_counts_failures_in_a_sliding_period():
    rec, t = Record(), 0.0
    for i in range(3):
        t += 10
        rec = failed(rec, t, i, 100.0)
        assert not blocked(rec, t, (4, 100.0))
    assert blocked(rec, t, (3, 100.0)) and not blocked(rec, t, None)
    # the next window: the old failures weigh by what the period still covers of theirs
    assert recent(rec, 10.0 + 150.0, 100.0) == pytest.approx(1.5)
    assert not blocked(rec, 160.0, (3, 100.0))
    assert recent(rec, 10.0 + 200.0, 100.0) == 0.0
    rec = failed(rec, 130.0, 9, 100.0)          # a failure in the next window counts on top
    assert (rec.window, rec.previous) == (1, 3) and recent(rec, 130.0, 100.0) == pytest.approx(3.4)


def test_record_round_trip():
    rec = Record(3, 4, 5, 0xFFFFFFFF, 12.5, 10.0)
    assert Record.unpack(rec.pack()) == rec and len(rec.pack()) == login_table.PAYLOAD
    assert Record.unpack(None) == Record()


def test_trusted_networks():
    nets = ["192.0.2.0/24", "2001:db8::/64", "198.51.100.7"]
    assert throttle.trusted(nets, "192.0.2.200") and throttle.trusted(nets, "198.51.100.7")
    assert throttle.trusted(nets, "2001:db8::99") and throttle.trusted(nets, "::ffff:192.0.2.1")
    assert not throttle.trusted(nets, "198.51.100.8") and not throttle.trusted(nets, "2001:db9::")
    assert not throttle.trusted([], "192.0.2.1") and not throttle.trusted(nets, None)
    assert not throttle.trusted(nets, "unix:")


# ---- the table ---------------------------------------------------------------------------------

def test_table_keeps_payloads_by_kind_and_key():
    t = LoginTable(sets=4, ways=2)
    k = t.key(login_table.ADDRESS, b"192.0.2.1")
    assert k != t.key(login_table.USER, b"192.0.2.1") and len(k) == 16
    with t.lock:
        assert t.read(login_table.ADDRESS, k) is None
        t.write(login_table.ADDRESS, k, b"abc")
        assert t.read(login_table.ADDRESS, k)[:3] == b"abc"
        assert t.read(login_table.USER, k) is None
        t.delete(login_table.ADDRESS, k)
        assert t.read(login_table.ADDRESS, k) is None
    assert len(t) == 0
    assert LoginTable().key(1, b"x") != t.key(1, b"x")       # keyed per instance


def test_table_is_bounded_and_the_oldest_goes_first():
    clock = Clock()
    t = LoginTable(sets=1, ways=4, clock=clock)
    keys = [t.key(login_table.USER, b"u%d" % i) for i in range(6)]
    with t.lock:
        for i, k in enumerate(keys[:4]):
            clock.now += 1
            t.write(login_table.USER, k, bytes([i]))
        clock.now += 1
        t.write(login_table.USER, keys[0], b"\x09")     # refreshed: now the newest
        clock.now += 1
        t.write(login_table.USER, keys[4], b"\x04")
        assert t.read(login_table.USER, keys[1]) is None         # the oldest went
        assert [t.read(login_table.USER, k) is not None for k in keys] == \
            [True, False, True, True, True, False]
    assert len(t) == 4


def test_seats_are_counted_over_workers_and_a_dead_workers_are_given_back():
    t = LoginTable(sets=8, ways=4)
    a = t.take_seat("imap", b"bob", 3, pid=101)
    b = t.take_seat("imap", b"bob", 3, pid=102)
    c = t.take_seat("imap", b"bob", 3, pid=102)
    assert None not in (a, b, c) and t.held("imap", b"bob") == 3
    assert t.take_seat("imap", b"bob", 3, pid=101) is None
    assert t.take_seat("pop3", b"bob", 3, pid=101) is not None     # per protocol
    a.release()
    a.release()                                     # once only
    assert t.held("imap", b"bob") == 2
    assert t.release_pid(102) == 2 and t.held("imap", b"bob") == 0
    assert b.table.held("imap", b"bob") == 0
    b.release()                                     # after its worker's release: no harm
    assert t.held("imap", b"bob") == 0
    assert t.take_seat("imap", b"bob", 1, pid=103) is not None


def test_seats_are_evicted_last():
    t = LoginTable(sets=1, ways=3)
    assert t.take_seat("pop3", b"al", 5, pid=7) is not None     # two slots: total and pid
    with t.lock:
        for i in range(5):
            t.write(login_table.USER, t.key(login_table.USER, b"%d" % i), b"x")
    assert t.held("pop3", b"al") == 1


# ---- the directives ------------------------------------------------------------------------------

def load(tmp_path, lines):
    path = tmp_path / "t.ini"
    path.write_text("[server s]\nlisten = 127.0.0.1:1110\nprotocol = pop3\n"
                    "proxy_pass = 127.0.0.1:110\n" + lines)
    return config.load(str(path))


def test_directives_defaults_and_values(tmp_path):
    s = load(tmp_path, "").servers[0]
    assert (s.login_penalty, s.login_penalty_max, s.login_block, s.login_trusted,
            s.limit_sessions_per_user) == (False, 15.0, None, [], 0)
    cfg = load(tmp_path, "login_penalty = on\nlogin_penalty_max = 1m\nlogin_block = 20/10m\n"
                         "login_trusted = 192.0.2.1 10.1.2.3/8 2001:db8::/64\n"
                         "limit_sessions_per_user = 4\n")
    s = cfg.servers[0]
    assert (s.login_penalty, s.login_penalty_max, s.login_block, s.login_trusted,
            s.limit_sessions_per_user) == (True, 60.0, (20, 600.0),
                                           ["192.0.2.1", "10.0.0.0/8", "2001:db8::/64"], 4)
    dump = cfg.dump()
    assert "login_block = 20/10m" in dump and "login_trusted = 192.0.2.1 10.0.0.0/8" in dump


@pytest.mark.parametrize("line, what", [
    ("login_block = 20", "FAILURES/PERIOD"), ("login_block = 0/1m", "FAILURES/PERIOD"),
    ("login_block = 5/0", "FAILURES/PERIOD"), ("login_block = x/1m", "FAILURES/PERIOD"),
    ("login_penalty_max = 0", "above 0"), ("login_penalty = yes", '"on" or "off"'),
    ("login_trusted = 192.0.2.1 mail.example", "ADDRESS/PREFIX"),
    ("limit_sessions_per_user = -1", "whole number"),
])
def test_bad_values_stop_with_file_line_and_key(tmp_path, line, what):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, line + "\n")
    key = line.split(" =")[0]
    assert e.value.line == 5 and e.value.key == key and what in str(e.value)
    assert str(tmp_path / "t.ini") in str(e.value)


# ---- the Session's hooks -------------------------------------------------------------------------

CLIENT = ("192.0.2.7", 5555)


@pytest.fixture
def table(monkeypatch):
    t = LoginTable(sets=16, ways=4, clock=Clock())
    monkeypatch.setattr(login_table, "_shared", t)
    return t


@pytest.fixture
def world(monkeypatch, conf):
    """world(*client_chunks, **directives) -> a POP3 Session over a FakeSock whose auth
    service answers `world.result` and whose waits land in `world.waits`."""
    box = SimpleNamespace(result=None, events=[], waits=[], requests=0)

    def query(url, req, timeout, sleep=None, trace=None, client=None):
        box.requests += 1
        return box.result

    def connect(host, port, timeout, addresses=None):
        return FakeSock(box.events, "backend", [b"+OK\r\n", b"+OK\r\n", b"+OK in\r\n"])

    monkeypatch.setattr(auth_http, "query", query)
    monkeypatch.setattr(backend, "connect", connect)

    def make(*incoming, client=CLIENT, **directives):
        c = conf("pop3", **directives)
        rt = Runtime(SimpleNamespace(main=MainConf()), RecordingLog(box.events),
                     SimpleNamespace(add=lambda *a, **kw: box.events.append(("relay", kw))))
        rt.shutting_down = SimpleNamespace(wait=lambda s: box.waits.append(s) or False)
        s = Session(FakeSock(box.events, "client", incoming), client, c, c.listen[0], rt,
                    timeout_set=True)
        return s
    box.make = make
    return box


FAIL = auth_http.AuthResult("FAIL", message=b"Invalid login or password")
OK = auth_http.AuthResult("OK", server="127.0.0.1", port=1110)
LOGIN = b"USER bob\r\nPASS %s\r\n"


def logs(world, level):
    return [e[1] for e in world.events if e[0] == level]


def test_failures_delay_the_address_and_the_user(world, table):
    world.result = FAIL
    for pw in (b"a", b"b"):
        world.make(LOGIN % pw, login_penalty="on").run()
    assert world.waits == [2.0]              # the second login waited the first's penalty
    assert logs(world, "warn") == [
        'login delayed 2s after 1 failed login while in auth state, client: 192.0.2.7, '
        'server: 127.0.0.1:110, login: "bob"']
    table.clock.now += 1                     # another address, the same user: 4s - 1s
    world.make(LOGIN % b"c", client=("192.0.2.8", 1), login_penalty="on").run()
    assert world.waits[-1] == 3.0 and logs(world, "warn")[-1].startswith(
        "login delayed 3s after 2 failed logins of this user")
    table.clock.now += 100
    world.make(LOGIN % b"d", login_penalty="on").run()
    assert len(world.waits) == 2             # its penalty has passed
    assert world.requests == 4


def test_same_password_and_success_and_trusted(world, table):
    world.result = FAIL
    for _ in range(3):
        world.make(LOGIN % b"old", login_penalty="on").run()
    assert world.waits == [2.0, 2.0]        # not raised by the same password
    table.clock.now += 10
    world.result = OK
    world.make(LOGIN % b"good", login_penalty="on").run()
    assert ("relay" in [e[0] for e in world.events])
    world.result = FAIL
    world.make(LOGIN % b"x", client=("192.0.2.7", 2), login_penalty="on").run()
    assert len(world.waits) == 2             # the address was cleared by the success
    world.make(LOGIN % b"y", login_penalty="on", login_trusted="192.0.2.0/24").run()
    world.make(LOGIN % b"z", login_penalty="on", login_trusted="192.0.2.0/24").run()
    assert len(world.waits) == 2             # trusted: never delayed


def test_a_blocked_address_gets_the_temporary_failure_without_asking(world, table):
    world.result = FAIL
    for pw in (b"a", b"b"):
        world.make(LOGIN % pw, login_block="2/10m").run()
    assert world.requests == 2 and world.waits == []
    s = world.make(LOGIN % b"c", login_block="2/10m")
    s.run()
    assert world.requests == 2 and sent(world.events)[-1] == b"-ERR internal server error\r\n"
    assert logs(world, "error")[-1] == (
        'login blocked after 2 failed logins within 600s while in auth state, '
        'client: 192.0.2.7, server: 127.0.0.1:110, login: "bob"')
    world.make(LOGIN % b"c", client=("192.0.2.9", 1), login_block="2/10m").run()
    assert world.requests == 3               # another address
    world.make(LOGIN % b"d", login_block="2/10m", login_trusted="192.0.2.7").run()
    assert world.requests == 4               # trusted
    table.clock.now += 1200
    world.make(LOGIN % b"e", login_block="2/10m").run()
    assert world.requests == 5               # aged out


def test_throttling_results_are_counted_in_the_metrics(world, table, monkeypatch):
    area = metrics.Area(slots=2)
    monkeypatch.setattr(metrics, "_area", area)
    monkeypatch.setattr(metrics, "_mine", 0)
    world.result = FAIL
    for pw in (b"a", b"b", b"c"):
        world.make(LOGIN % pw, login_block="2/10m").run()
    world.result = OK
    world.make(LOGIN % b"pw", limit_sessions_per_user="1").run()
    world.make(LOGIN % b"pw", limit_sessions_per_user="1", client=("192.0.2.8", 1)).run()
    text = metrics.render_area()
    for result, n in (("failed", 2), ("blocked", 1), ("limited", 1), ("error", 0)):
        assert 'mailproxy_logins_total{protocol="pop3",result="%s"} %d' % (result, n) in text


def test_sessions_per_user_are_limited_and_given_back(world, table):
    world.result = OK
    first = world.make(LOGIN % b"pw", limit_sessions_per_user="1")
    first.run()
    assert table.held("pop3", b"bob") == 1 and first.seat is not None
    world.make(LOGIN % b"pw", limit_sessions_per_user="1").run()
    assert sent(world.events)[-1] == b"-ERR [IN-USE] Too many sessions for this user\r\n"
    assert logs(world, "error")[-1].startswith(
        'limiting sessions by limit_sessions_per_user (1) for user "bob"')
    throttle.release(first)                  # the relay's end
    assert table.held("pop3", b"bob") == 0
    s = world.make(b"USER bob\r\nPASS pw\r\n", limit_sessions_per_user="1")
    world.result = auth_http.AuthResult("OK", server="127.0.0.1", port=1110, user=b"bob2")
    s.run()
    assert table.held("pop3", b"bob2") == 1      # the auth service's user name counts


def test_a_session_that_fails_after_its_seat_gives_it_back(world, table, monkeypatch):
    world.result = OK

    def refused(host, port, timeout):
        raise backend.BackendError("connect() failed (111: Connection refused)")
    monkeypatch.setattr(backend, "connect", refused)
    world.make(LOGIN % b"pw", limit_sessions_per_user="1").run()
    assert table.held("pop3", b"bob") == 0


def test_nothing_configured_touches_no_table(world, monkeypatch):
    monkeypatch.setattr(login_table, "_shared", None)
    world.result = FAIL
    world.make(LOGIN % b"a").run()
    assert login_table._shared is None


@pytest.mark.parametrize("protocol, reply", [
    ("imap", b"a1 NO [LIMIT] Too many sessions for this user\r\n"),
    ("pop3", b"-ERR [IN-USE] Too many sessions for this user\r\n"),
    ("smtp", b"454 4.7.0 Too many sessions for this user\r\n"),
])
def test_the_refusal_of_each_protocol(conf, protocol, reply):
    from mailproxy.protocols import PROTOCOLS
    conv = PROTOCOLS[protocol].conversation(conf(protocol))
    conv.tag = b"a1 "
    assert conv.auth_failed_reply(throttle._SEATS_FULL[protocol]) == reply


def test_the_masters_release_never_waits_long_for_the_lock(monkeypatch):
    # a worker stopped (SIGSTOP) while holding the table's lock must not hang the master:
    # the release of a dead worker's seats is put off to a later round
    import threading
    held = threading.Lock()
    t = LoginTable(sets=8, ways=4, lock=held)
    monkeypatch.setattr(login_table, "_shared", t)
    t.take_seat("imap", b"bob", 5, pid=102)
    got = []
    with held:                          # the stopped holder
        done = threading.Thread(target=lambda: got.append(login_table.release_pid(102)),
                                daemon=True)
        done.start()
        done.join(2.0)
        assert not done.is_alive(), "the master waited for the lock"
        assert got == [None] and login_table.release_pending() == 0
    assert login_table.release_pending() == 1 and t.held("imap", b"bob") == 0
    assert login_table.release_pending() == 0      # given back once


class CountingLock:
    def __init__(self):
        self.rounds = 0

    def __enter__(self):
        self.rounds += 1

    def __exit__(self, *exc):
        return False


def test_maybe_holds_sees_written_keys_only():
    t = LoginTable(sets=16, ways=4, clock=Clock())
    k = t.key(login_table.ADDRESS, b"192.0.2.7")
    assert not t.maybe_holds(login_table.ADDRESS, k)
    t.write(login_table.ADDRESS, k, b"x")
    assert t.maybe_holds(login_table.ADDRESS, k)
    assert not t.maybe_holds(login_table.USER, k)       # another kind
    t.delete(login_table.ADDRESS, k)
    assert not t.maybe_holds(login_table.ADDRESS, k)


def test_logins_with_nothing_recorded_take_no_lock(world, table):
    table.lock = lock = CountingLock()
    world.result = OK
    for _ in range(3):
        world.make(LOGIN % b"pw", login_penalty="on", login_block="2/10m").run()
    assert lock.rounds == 0 and world.waits == []
    world.result = FAIL
    world.make(LOGIN % b"bad", login_penalty="on", login_block="2/10m").run()
    assert lock.rounds == 1                  # the failure is written
    world.result = OK
    world.make(LOGIN % b"pw", login_penalty="on", login_block="2/10m").run()
    assert lock.rounds == 3                  # read before the request, cleared after it
