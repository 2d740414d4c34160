"""What a worker admits and for how long: `timeout` bounds the whole conversation before
login, `worker_connections`, `limit_prelogin`, `limit_conn_per_ip`, and the spare handler
threads kept after a burst (limits.py, listeners.py, session.py)."""

import os
import socket
import threading
import time

import pytest

from mailproxy import limits
from mailproxy.config import Config, listen_defaults, server_defaults
from mailproxy.listeners import HandlerPool
from mailproxy.runtime import Runtime
from tests.support.common import RecordingLog, wait_for
from tests.support.mailbackends import Pop3Backend
from tests.support.process import free_port, server_block

BUSY = {
    "pop3": b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
    "imap": b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
    "smtp": b"421 4.7.0 mx.test Too many connections, try again later\r\n",
}
GREETING = {"pop3": b"+OK", "imap": b"* OK", "smtp": b"220 "}
NOOP = {"pop3": b"NOOP\r\n", "imap": b"a NOOP\r\n", "smtp": b"NOOP\r\n"}


# ---------------------------------------------------------------------------------------------
# limits.Admission, no sockets

def test_address_key_counts_ipv6_per_64():
    assert limits.address_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert limits.address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert limits.address_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert limits.address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert limits.address_key("192.0.2.7") == "192.0.2.7"


def test_admission_limits_and_release():
    adm = limits.Admission(worker_connections=8, limit_prelogin=3, limit_conn_per_ip=2)
    a, _ = adm.admit("192.0.2.1")
    b, _ = adm.admit("192.0.2.1")
    assert adm.admit("192.0.2.1") == (None, "limit_conn_per_ip")
    c, _ = adm.admit("192.0.2.2")
    assert adm.admit("192.0.2.3") == (None, "limit_prelogin")
    a.logged_in()                           # relayed: still counted per address and connection
    assert adm.admit("192.0.2.1") == (None, "limit_conn_per_ip")
    d, _ = adm.admit("192.0.2.3")
    assert adm.full() and adm.admit("192.0.2.4") == (None, "worker_connections")
    for t in (a, b, c, d, a, b):            # releasing twice is harmless
        t.release()
    assert adm.snapshot() == {"connections": 0, "prelogin": 0, "addresses": 0}
    assert not adm.full()


def test_admission_exempt_balancer_counted_by_real_address():
    adm = limits.Admission(limit_conn_per_ip=1)
    lb1, _ = adm.admit("10.0.0.1", exempt=True)
    lb2, _ = adm.admit("10.0.0.1", exempt=True)
    assert lb1.key is None and lb2.key is None
    assert lb1.retarget("192.0.2.1") is None
    assert lb2.retarget("192.0.2.1") == "limit_conn_per_ip"
    assert lb2.released and adm.snapshot()["prelogin"] == 1
    lb1.release()
    assert adm.snapshot() == {"connections": 0, "prelogin": 0, "addresses": 0}


def test_admission_wait_room_wakes_on_release():
    adm = limits.Admission(worker_connections=2)
    t, _ = adm.admit("192.0.2.1")
    assert adm.full() and not adm.wait_room(0.05)
    threading.Timer(0.05, t.release).start()
    assert adm.wait_room(2.0)


def test_handler_pool_keeps_a_bounded_spare():
    pool = HandlerPool(idle_timeout=30.0, max_spare=4)
    gate = threading.Event()
    started = threading.Semaphore(0)

    def job():
        started.release()
        gate.wait(5)
    for _ in range(40):
        pool.submit(job)
    for _ in range(40):
        assert started.acquire(timeout=5)
    assert pool.threads() == 40
    gate.set()
    wait_for(lambda: pool.threads() == 4, 5, what="spare threads trimmed to max_spare")


# ---------------------------------------------------------------------------------------------
# whole process

def start(proxy_factory, protocol, backend_port=1, main=None, **directives):
    port = free_port()
    directives.setdefault("timeout", "5s")
    directives.setdefault("server_name", "mx.test")
    if protocol == "smtp":
        directives.setdefault("proxy_smtp_auth", "on")
    block = server_block(protocol, port, proxy_pass=f"127.0.0.1:{backend_port}", **directives)
    p = proxy_factory({"main": main or {}, "servers": {protocol: block}})
    return p, port


def connect(port, source="127.0.0.1", timeout=5.0):
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def first_line(s):
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def closed_within(s, seconds):
    """Seconds until the peer closes (reading and dropping replies), or None."""
    t = time.monotonic()
    s.settimeout(0.05)
    while time.monotonic() - t < seconds:
        try:
            if not s.recv(4096):
                return time.monotonic() - t
        except socket.timeout:
            pass
        except ConnectionResetError:
            return time.monotonic() - t
    return None


@pytest.mark.parametrize("protocol", ["pop3", "imap", "smtp"])
def test_timeout_bounds_the_whole_prelogin_conversation(proxy_factory, protocol):
    """A client that keeps sending NOOPs is closed `timeout` after its accept, as nginx arms
    the timer once (ngx_mail_read_command); before, each command re-armed it."""
    p, port = start(proxy_factory, protocol, timeout="500ms")
    s = connect(port)
    t0 = time.monotonic()
    assert first_line(s).startswith(GREETING[protocol])
    closed = None
    s.settimeout(0.1)                   # a NOOP every 0.1 s: a re-armed timer never fires
    while closed is None and time.monotonic() - t0 < 2:
        try:
            s.sendall(NOOP[protocol])
            while s.recv(4096):
                pass
            closed = time.monotonic() - t0
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed = time.monotonic() - t0
    assert closed is not None and 0.45 < closed < 1.3, closed
    p.wait_log("client timed out")
    s.close()


@pytest.mark.parametrize("protocol", ["pop3", "imap", "smtp"])
def test_limit_prelogin_refuses_with_temporary_failure(proxy_factory, protocol):
    p, port = start(proxy_factory, protocol, main={"limit_prelogin": 3})
    held = [connect(port) for _ in range(3)]
    for s in held:
        assert first_line(s).startswith(GREETING[protocol])
    extra = connect(port, source="127.0.0.5")
    assert first_line(extra) == BUSY[protocol]
    assert closed_within(extra, 2) is not None
    line = p.wait_log("too many sessions before login")
    assert "(limit_prelogin 3), client: 127.0.0.5, server: 127.0.0.1:%d" % port in line
    assert "[error]" in line
    held.pop().close()
    wait_for(lambda: _greets(port, protocol), 3, what="a slot freed by a closed session")
    for s in held + [extra]:
        s.close()


def _greets(port, protocol):
    with connect(port) as s:
        return first_line(s).startswith(GREETING[protocol])


def test_limit_conn_per_ip_counts_relayed_sessions(proxy_factory, backend_factory):
    backend = backend_factory(Pop3Backend, users={"alice": "secret"})
    p, port = start(proxy_factory, "pop3", backend.port, main={"limit_conn_per_ip": 2})
    a = connect(port, "127.0.0.3")
    assert first_line(a).startswith(b"+OK")
    a.sendall(b"USER alice\r\n")
    assert first_line(a).startswith(b"+OK")
    a.sendall(b"PASS secret\r\n")
    assert first_line(a).startswith(b"+OK")
    p.wait_log("client logged in")
    b = connect(port, "127.0.0.3")
    assert first_line(b).startswith(b"+OK")
    c = connect(port, "127.0.0.3")
    assert first_line(c) == BUSY["pop3"]
    line = p.wait_log("too many connections from the client's address")
    assert "(limit_conn_per_ip 2), client: 127.0.0.3," in line
    other = connect(port, "127.0.0.4")             # another address is not affected
    assert first_line(other).startswith(b"+OK")
    a.sendall(b"NOOP\r\n")                         # the relayed session is unharmed
    assert first_line(a).startswith(b"+OK")
    a.sendall(b"QUIT\r\n")
    first_line(a)
    p.wait_log("proxied session done")
    wait_for(lambda: _greets_from(port, "127.0.0.3"), 3, what="the relayed session's slot freed")
    for s in (a, b, c, other):
        s.close()


def _greets_from(port, source):
    with connect(port, source) as s:
        return first_line(s).startswith(b"+OK")


def proxy_v1(src, dst="127.0.0.1", sport=40000, dport=110):
    return ("PROXY TCP4 %s %s %d %d\r\n" % (src, dst, sport, dport)).encode()


def test_limit_conn_per_ip_exempts_balancer_and_counts_real_clients(proxy_factory):
    port = free_port()
    block = server_block("pop3", port, proxy_pass="127.0.0.1:1", timeout="5s",
                         set_real_ip_from="127.0.0.0/8")
    block["listen"] = f"127.0.0.1:{port} proxy_protocol"
    p = proxy_factory({"main": {"limit_conn_per_ip": 1}, "servers": {"pop3": block}})
    first = connect(port)
    first.sendall(proxy_v1("192.0.2.10"))
    assert first_line(first).startswith(b"+OK")
    second = connect(port)                         # same balancer, another client: admitted
    second.sendall(proxy_v1("192.0.2.11"))
    assert first_line(second).startswith(b"+OK")
    third = connect(port)                          # the first client again: over its limit
    third.sendall(proxy_v1("192.0.2.10"))
    assert first_line(third) == BUSY["pop3"]
    line = p.wait_log("too many connections from the client's address")
    assert "client: 192.0.2.10," in line
    for s in (first, second, third):
        s.close()


def test_worker_connections_stops_accepting_without_harming_sessions(proxy_factory,
                                                                    backend_factory):
    backend = backend_factory(Pop3Backend, users={"alice": "secret"})
    p, port = start(proxy_factory, "pop3", backend.port, main={"worker_connections": 4})
    a = connect(port)
    assert first_line(a).startswith(b"+OK")
    b = connect(port)
    assert first_line(b).startswith(b"+OK")
    queued = connect(port)                         # the kernel queues it; the worker waits
    p.wait_log("4 worker_connections are not enough")
    assert "[alert]" in p.wait_log("worker_connections are not enough")
    queued.settimeout(0.25)                        # the worker said it is full: no greeting
    with pytest.raises(socket.timeout):
        queued.recv(100)
    for line in (b"USER alice\r\n", b"PASS secret\r\n", b"STAT\r\n"):
        a.sendall(line)                            # a held session logs in and relays
        assert first_line(a).startswith(b"+OK")
    b.close()
    queued.settimeout(3)
    assert first_line(queued).startswith(b"+OK")   # accepted once a session ended
    for s in (a, queued):
        s.close()


def worker_threads(master_pid):
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/status" % entry) as f:
                    status = f.read()
            except OSError:
                continue
            if "\nPPid:\t%d\n" % master_pid in status:
                return int(status.split("\nThreads:\t", 1)[1].split("\n", 1)[0])
    return None


def test_dribbling_clients_cannot_grow_threads_past_the_cap(proxy_factory):
    p, port = start(proxy_factory, "pop3", main={"limit_prelogin": 20}, timeout="10s")
    held = []
    try:
        for _ in range(60):
            held.append(connect(port))
        for s in held:
            first_line(s)
        threads = worker_threads(p.proc.pid)
        # 20 handler threads at most, plus the listener, relay and main threads
        assert threads is not None and threads <= 20 + 6, threads
    finally:
        for s in held:
            s.close()


class _NoThreads:
    def submit(self, *args):
        raise RuntimeError("can't start new thread")

    def threads(self):
        return 7


def test_no_thread_to_be_had_is_said_not_silent():
    """Under a task limit a thread cannot start: the client gets the temporary failure and the
    log says why (before: an alert naming nothing but the address)."""
    from mailproxy import listeners
    port = free_port()
    listen = listen_defaults("127.0.0.1", port, backlog=16)
    conf = server_defaults("pop3", name="p", listen=[listen], timeout=5.0)
    bound, _ = listeners.bind_all([conf])
    (lst,) = bound.values()
    log = RecordingLog()
    # a worker's Runtime (the relay is never reached: no thread, no session)
    lst.start(Runtime(Config("mailproxy.ini"), log, relay=None), poll_interval=0.05)
    lst.pool = _NoThreads()
    try:
        with connect(port) as s:
            assert first_line(s) == BUSY["pop3"]
        wait_for(lambda: len(log.lines) >= 2, 3, what="log lines")
        lines = ["[%s] %s" % entry for entry in log.lines]
        assert "cannot start a handler thread (can't start new thread; 7 running)" in lines[0]
        assert lines[0].startswith("[alert]")
        assert "no handler thread could be started" in lines[1]
        assert "client: 127.0.0.1, server: 127.0.0.1:%d" % port in lines[1]
    finally:
        lst.stop_accepting()


def test_log_throttle_one_line_per_key_and_interval():
    t = limits.LogThrottle(interval=1.0, max_keys=3)
    assert t.allow("a", 0.0) == 0
    assert t.allow("a", 0.2) is None and t.allow("a", 0.5) is None
    assert t.allow("b", 0.5) == 0
    assert t.allow("a", 1.1) == 2                   # the two held back, counted
    assert t.allow("c", 1.2) == 0 and t.allow("d", 1.3) == 0
    assert len(t._keys) <= 3                        # memory bounded


def test_refusals_of_one_address_are_logged_once_a_second(proxy_factory):
    p, port = start(proxy_factory, "pop3", main={"limit_conn_per_ip": 1})
    held = connect(port, "127.0.0.6")
    assert first_line(held).startswith(b"+OK")
    for _ in range(30):
        with connect(port, "127.0.0.6") as s:
            assert first_line(s) == BUSY["pop3"]
    time.sleep(1.1)
    with connect(port, "127.0.0.6") as s:
        assert first_line(s) == BUSY["pop3"]
    line = p.wait_log("more not logged since the last line")
    assert "(limit_conn_per_ip 1; 29 more not logged since the last line), client: 127.0.0.6," \
        in line
    refusals = [l for l in p.log_lines() if "too many connections" in l]
    assert len(refusals) == 2, refusals
    held.close()


def test_smtp_timeout_counts_from_the_greeting(proxy_factory):
    """nginx arms `timeout` at the SMTP greeting (ngx_mail_smtp_greeting): a greeting delay as
    long as `timeout` still ends in a greeting, and the client then has its whole `timeout`."""
    p, port = start(proxy_factory, "smtp", timeout="500ms", smtp_greeting_delay="600ms")
    s = connect(port)
    t0 = time.monotonic()
    assert first_line(s).startswith(b"220 mx.test")
    greeted = time.monotonic() - t0
    assert greeted >= 0.55
    closed = closed_within(s, 2)
    assert closed is not None and 0.4 < closed < 1.3, closed
    s.close()
