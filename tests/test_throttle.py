"""Login throttling and sessions per user, whole process (throttle.py, login_table.py): failures
from several loopback addresses delay and then block the next logins of that address and user
name, a `login_trusted` address never; the counts are shared by the workers and survive a
reload; `limit_sessions_per_user` counts a user's sessions over both workers, and a worker
killed with its sessions gives them back."""

import os
import re
import signal
import socket
import time

from tests.support.auth import auth_fail, auth_ok
from tests.support.common import wait_for
from tests.support.mailbackends import Pop3Backend
from tests.support.process import free_port, server_block

INTERNAL = b"-ERR internal server error\r\n"
FAILED = b"-ERR Invalid login or password\r\n"


def start(proxy_factory, auth_server, backend_port, workers=1, **directives):
    def respond(req):
        if req.header("Auth-Pass") == "secret":
            return auth_ok(backend_port)
        return auth_fail("Invalid login or password")
    auth_server.set_respond(respond)
    port = free_port()
    directives.setdefault("timeout", "5s")
    block = server_block("pop3", port, auth_http=auth_server.url, **directives)
    p = proxy_factory({"main": {"worker_processes": workers}, "servers": {"pop3": block}})
    return p, port


def line(s):
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def login(port, source, user, password):
    """(the reply to PASS, seconds it took, the socket)."""
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    assert line(s).startswith(b"+OK")
    s.sendall(b"USER %s\r\n" % user)
    assert line(s).startswith(b"+OK")
    t = time.monotonic()
    s.sendall(b"PASS %s\r\n" % password)
    reply = line(s)
    return reply, time.monotonic() - t, s


def attempt(port, source, user, password):
    reply, took, s = login(port, source, user, password)
    s.close()
    return reply, took


def pid_of(text):
    return re.search(r"\] (\d+)#\d+: ", text).group(1)


def test_failures_delay_address_and_user_but_never_a_trusted_address(proxy_factory, auth_server,
                                                                     pop3_backend):
    p, port = start(proxy_factory, auth_server, pop3_backend.port, login_penalty="on",
                    login_penalty_max="1s", login_trusted="127.0.0.3")
    reply, took = attempt(port, "127.0.0.2", b"bob", b"bad1")
    assert reply == FAILED and took < 0.5
    # the same address, another user: the address's penalty (2s, at most login_penalty_max)
    reply, took = attempt(port, "127.0.0.2", b"carol", b"bad2")
    assert reply == FAILED and 0.7 < took < 3, took
    text = p.wait_log("login delayed")
    assert "[warn]" in text
    assert re.search(r"login delayed (1s|\d{3}ms) after 1 failed login while", text), text
    assert "client: 127.0.0.2," in text and 'login: "carol"' in text
    # another address, the user who just failed: the user's penalty
    reply, took = attempt(port, "127.0.0.4", b"carol", b"bad3")
    assert reply == FAILED and 0.7 < took < 3, took
    p.wait_log("failed login of this user while")
    # a trusted address: never delayed, whoever it logs in as
    for pw in (b"bad4", b"bad5", b"bad6"):
        reply, took = attempt(port, "127.0.0.3", b"carol", pw)
        assert reply == FAILED and took < 0.5, took
    assert "client: 127.0.0.3," not in "".join(
        ln for ln in p.log_lines() if "login delayed" in ln)
    # a fresh address and user
    reply, took = attempt(port, "127.0.0.5", b"dave", b"bad")
    assert reply == FAILED and took < 0.5
    assert len(auth_server.requests) == 7


def test_a_blocked_address_gets_the_temporary_failure_also_after_a_reload(
        proxy_factory, auth_server, pop3_backend):
    p, port = start(proxy_factory, auth_server, pop3_backend.port, workers=2,
                    login_block="2/10m", login_trusted="127.0.0.3")
    for pw in (b"bad1", b"bad2"):
        assert attempt(port, "127.0.0.2", b"bob", pw)[0] == FAILED
    for pw in (b"old", b"old", b"old"):     # the same wrong password counts once
        assert attempt(port, "127.0.0.5", b"alice", pw)[0] == FAILED
    for pw in (b"bad1", b"bad2", b"bad3"):  # trusted: never blocked
        assert attempt(port, "127.0.0.3", b"bob", pw)[0] == FAILED
    asked = len(auth_server.requests)
    assert asked == 8
    assert attempt(port, "127.0.0.2", b"bob", b"secret")[0] == INTERNAL
    text = p.wait_log("login blocked")
    assert "[error]" in text and "login blocked after 2 failed logins within 600s" in text
    assert "client: 127.0.0.2," in text and 'login: "bob"' in text
    assert len(auth_server.requests) == asked            # the auth service was not asked
    assert attempt(port, "127.0.0.4", b"bob", b"bad")[0] == FAILED     # another address
    assert attempt(port, "127.0.0.3", b"bob", b"bad")[0] == FAILED     # trusted
    # every worker of the next generation sees the counts
    before = len(re.findall(r"start worker process", p.log_text()))
    p.signal(signal.SIGHUP)
    wait_for(lambda: len(re.findall(r"start worker process", p.log_text())) >= before + 2, 5,
             what="the new workers")
    wait_for(lambda: p.log_text().count("exiting") >= 2, 5, what="the old workers gone")
    asked = len(auth_server.requests)
    for _ in range(4):
        assert attempt(port, "127.0.0.2", b"bob", b"secret")[0] == INTERNAL
    assert len(auth_server.requests) == asked
    reply, _took, s = login(port, "127.0.0.5", b"alice", b"secret")
    assert reply.startswith(b"+OK")
    s.close()


def test_sessions_per_user_over_two_workers_and_a_dead_workers_given_back(
        proxy_factory, auth_server, backend_factory):
    backend = backend_factory(Pop3Backend, users={"alice": "secret", "bob": "secret"})
    p, port = start(proxy_factory, auth_server, backend.port, workers=2,
                    limit_sessions_per_user="1")
    reply, _t, held = login(port, "127.0.0.2", b"alice", b"secret")
    assert reply.startswith(b"+OK")
    holder = pid_of(p.wait_log("client logged in"))
    # the other worker refuses too: the holder is stopped meanwhile, so the other one must
    # take the connection (the kernel would otherwise pick either)
    os.kill(int(holder), signal.SIGSTOP)
    try:
        reply, _t = attempt(port, "127.0.0.3", b"alice", b"secret")
    finally:
        os.kill(int(holder), signal.SIGCONT)
    assert reply == b"-ERR [IN-USE] Too many sessions for this user\r\n"
    refusers = {pid_of(ln) for ln in p.log_lines() if "limiting sessions" in ln}
    assert refusers and holder not in refusers
    text = p.wait_log("limiting sessions")
    assert "[error]" in text and 'limit_sessions_per_user (1) for user "alice"' in text
    assert "client: 127.0.0.3," in text
    reply, _t, other = login(port, "127.0.0.3", b"bob", b"secret")   # another user
    assert reply.startswith(b"+OK")
    other.close()
    # the session ends: the seat is free
    held.sendall(b"QUIT\r\n")
    line(held)
    held.close()
    wait_for(lambda: "proxied session done" in p.log_text(), 5, what="the session's end")
    reply, _t, held = login(port, "127.0.0.2", b"alice", b"secret")
    assert reply.startswith(b"+OK")
    logged = [ln for ln in p.log_lines() if "client logged in" in ln and '"alice"' in ln]
    holder = pid_of(logged[-1])
    # its worker dies with the session: the master gives the seat back
    os.kill(int(holder), signal.SIGKILL)
    p.wait_log("exited on signal 9")
    held.close()
    reply, _t, again = login(port, "127.0.0.2", b"alice", b"secret")
    assert reply.startswith(b"+OK"), reply
    again.close()


def test_a_stopped_worker_holding_the_lock_never_hangs_the_masters_release(monkeypatch):
    # the record lock of login_table's ProcessLock held by another process that is stopped:
    # the master's release is put off (bounded wait), then done once the holder has died
    import threading
    from mailproxy import login_table
    from mailproxy.tls_cache import ProcessLock
    table = login_table.LoginTable(sets=8, ways=4, lock=ProcessLock())
    monkeypatch.setattr(login_table, "_shared", table)
    table.take_seat("pop3", b"bob", 5, pid=4242)
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:                      # holds the lock, then stops
        try:
            table.lock.__enter__()
            os.write(ready_w, b"x")
            os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"x"
        got = []
        t = threading.Thread(target=lambda: got.append(login_table.release_pid(4242)),
                             daemon=True)
        started = time.monotonic()
        t.start()
        t.join(3.0)
        assert not t.is_alive(), "the master's release waited for a stopped worker's lock"
        assert got == [None] and time.monotonic() - started < 1.0
        assert login_table.release_pending() == 0       # still held: put off again
    finally:
        os.kill(child, signal.SIGKILL)  # the child this test forked
        os.waitpid(child, 0)
        os.close(ready_r)
    assert login_table.release_pending() == 1 and table.held("pop3", b"bob") == 0
