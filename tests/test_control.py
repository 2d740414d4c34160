"""`mailproxy -c FILE sessions` / `kick` through `[main] control_socket` (master_loop.py,
live.py, control_cli.py): the live sessions of every worker, ended by user or backend; the
socket's mode and life; clear errors without the option or without a running instance."""

import json
import os
import signal
import socket
import stat
import subprocess

import pytest

from tests.support.common import REPO, track, wait_for
from tests.support.mailbackends import Pop3Backend
from tests.support.process import free_port, proxy_command, server_block

USERS = {"alice": "secret", "bob": "secret", "carol": "secret"}


def cli(proxy, *words, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(proxy_command() + ["-c", str(proxy.conf_path)] + list(words),
                          cwd=str(REPO), capture_output=True, text=True, timeout=30, env=e)


def listing(proxy, *words):
    r = cli(proxy, "sessions", "--json", *words)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def start(proxy_factory, backend, workers=2, env=None, **main):
    port = free_port()
    main.setdefault("control_socket", "control.sock")
    block = server_block("pop3", port, proxy_pass=f"127.0.0.1:{backend.port}",
                         access_log="access.log json")
    p = proxy_factory({"main": dict(worker_processes=workers, **main),
                       "servers": {"pop3": block}}, env=env)
    p.port = port
    return p


def login(proxy, user):
    s = track(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))
    f = track(s.makefile("rb"))
    assert f.readline().startswith(b"+OK")
    for line in (b"USER %s\r\n" % user.encode(), b"PASS secret\r\n"):
        s.sendall(line)
        assert f.readline().startswith(b"+OK")
    s.sendall(b"NOOP\r\n")          # relayed: counted by the relay both ways
    assert f.readline() == b"+OK\r\n"
    return s, f


def closed(f):
    try:
        return f.readline() == b""
    except (ConnectionResetError, socket.timeout):
        return False


def alive(s, f):
    s.sendall(b"NOOP\r\n")
    return f.readline() == b"+OK\r\n"


def test_sessions_and_kick_across_two_workers(proxy_factory, backend_factory):
    backend = backend_factory(Pop3Backend, users=USERS)
    p = start(proxy_factory, backend)
    clients = {}                    # local port -> (user, sock, file)
    # alice and bob each on both workers (the kernel spreads accepts: bounded tries)
    for i in range(24):
        user = ("alice", "bob")[i % 2]
        s, f = login(p, user)
        clients[s.getsockname()[1]] = (user, s, f)
        if i >= 3 and i % 2:
            rows = listing(p)
            where = {(r["user"], r["pid"]) for r in rows}
            if len({pid for _, pid in where}) == 2 and len(where) == 4:
                break
    else:
        pytest.fail("sessions never reached both workers: %r" % listing(p))
    # one session before login, its user known already
    pre = track(socket.create_connection(("127.0.0.1", p.port), timeout=5))
    pre_f = track(pre.makefile("rb"))
    assert pre_f.readline().startswith(b"+OK")
    pre.sendall(b"USER carol\r\n")
    assert pre_f.readline().startswith(b"+OK")

    rows = wait_for(lambda: (lambda rs: rs if len(rs) == len(clients) + 1 else None)(listing(p)),
                    what="every session listed")
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert len(r["id"]) == 16 and r["protocol"] == "pop3" and r["tls"] is None
        assert r["age"] >= 0 and r["pid"] != p.pid
        port = int(r["client"].rsplit(":", 1)[1])
        if r["user"] == "carol":
            assert r["client"] == "127.0.0.1:%d" % pre.getsockname()[1]
            assert r["backend"] is None and (r["bytes_in"], r["bytes_out"]) == (0, 0)
            continue
        assert clients[port][0] == r["user"]
        assert r["backend"] == "127.0.0.1:%d" % backend.port
        assert r["bytes_in"] >= len(b"NOOP\r\n") and r["bytes_out"] >= len(b"+OK\r\n") * 2
    # the text form: a header line, then one line a session
    text = cli(p, "sessions")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "PROTOCOL", "USER"] and len(lines) == len(rows) + 1
    assert {ln.split()[0] for ln in lines[1:]} == {r["id"] for r in rows}

    alices = [r for r in rows if r["user"] == "alice"]
    assert {r["id"] for r in listing(p, "alice")} == {r["id"] for r in alices}
    assert len({r["pid"] for r in alices}) == 2

    # kick alice: exactly her sessions, on both workers
    k = cli(p, "kick", "alice")
    assert k.returncode == 0, k.stderr
    assert k.stdout == "%d sessions kicked\n" % len(alices)
    for port, (user, s, f) in clients.items():
        if user == "alice":
            assert closed(f)
    for port, (user, s, f) in clients.items():
        if user == "bob":
            assert alive(s, f)
    p.wait_log("kicked by control command", regex=False)
    kicked = [ln for ln in p.log_lines() if "kicked by control command, client:" in ln]
    assert len([ln for ln in kicked if 'login: "alice"' in ln]) == len(alices)
    for r in alices:
        assert any("session %s kicked" % r["id"] in ln for ln in kicked)
    wait_for(lambda: not listing(p, "alice"), what="alice's sessions gone")

    # kick --backend: bob's relayed sessions, not carol's (no backend yet)
    bobs = len(listing(p, "bob"))
    k = cli(p, "kick", "--backend", "127.0.0.1:%d" % backend.port)
    assert k.stdout == "%d sessions kicked\n" % bobs and bobs >= 2
    for port, (user, s, f) in clients.items():
        if user == "bob":
            assert closed(f)
    assert alive(pre, pre_f)
    # before login: its socket is shut down
    assert cli(p, "kick", "carol").stdout == "1 session kicked\n"
    assert closed(pre_f)
    wait_for(lambda: listing(p) == [], what="no session left")
    assert cli(p, "kick", "nobody").stdout == "0 sessions kicked\n"
    # every kicked session's access_log line says so, relayed or not
    ended = [json.loads(ln) for ln in (p.dir / "access.log").read_text().splitlines()]
    assert len(ended) == len(clients) + 1
    assert {e["result"] for e in ended} == {"kicked"}


def test_socket_mode_reload_and_exit(proxy_factory, pop3_backend, tmp_path):
    p = start(proxy_factory, pop3_backend, workers=1)
    path = tmp_path / "control.sock"
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    s, f = login(p, "alice")
    # a reload with another path: the new socket, the old one gone; the old worker's session
    # is still listed (it drains) and USR1 still reopens the logs
    p.write_config(p.config_text.replace("control.sock", "other.sock"))
    p.signal(signal.SIGHUP)
    other = tmp_path / "other.sock"
    wait_for(other.exists, what="the new control socket")
    assert not path.exists()
    assert [r["user"] for r in listing(p)] == ["alice"]
    p.signal(signal.SIGUSR1)
    p.wait_log("reopening logs")
    s.close()
    p.signal(signal.SIGTERM)
    assert p.wait(5) == 0
    assert not other.exists()
    r = cli(p, "sessions")
    assert r.returncode == 1 and "is mailproxy running?" in r.stderr
    assert r.stdout == ""


def test_without_signalfd_the_loop_polls(proxy_factory, pop3_backend):
    p = start(proxy_factory, pop3_backend, workers=1, env={"MAILPROXY_NO_SIGNALFD": "1"})
    s, f = login(p, "alice")
    assert [r["user"] for r in listing(p)] == ["alice"]
    assert cli(p, "kick", "alice").stdout == "1 session kicked\n"
    assert closed(f)
    p.signal(signal.SIGHUP)
    p.wait_log("reconfiguring")
    p.wait_log("gracefully shutting down")
    p.signal(signal.SIGTERM)
    assert p.wait(5) == 0


def test_errors_without_the_option_or_the_instance(proxy_factory, pop3_backend, tmp_path):
    conf = tmp_path / "m.ini"
    conf.write_text("[server p]\nlisten = 127.0.0.1:%d\nprotocol = pop3\n"
                    "proxy_pass = 127.0.0.1:1\n" % free_port())

    class Conf:
        conf_path = conf
    r = cli(Conf, "sessions")
    assert r.returncode == 1 and "no control socket is configured" in r.stderr
    conf.write_text("[main]\ncontrol_socket = gone.sock\n" + conf.read_text())
    r = cli(Conf, "kick", "alice")
    assert r.returncode == 1 and "unix:%s" % (tmp_path / "gone.sock") in r.stderr
    assert "is mailproxy running?" in r.stderr
    r = cli(Conf, "kick")
    assert r.returncode == 1 and "needs a user name" in r.stderr
    # a socket file left by a killed instance is replaced; a path that is not a socket stops
    # the start
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(tmp_path / "control.sock"))
    p = start(proxy_factory, pop3_backend, workers=1)
    assert listing(p) == []
    p.stop()
    (tmp_path / "control.sock").write_text("not a socket")
    with pytest.raises(AssertionError, match="not a socket"):
        start(proxy_factory, pop3_backend, workers=1)


def test_tls_version_listed(proxy_factory, pop3_backend, certs):
    import ssl
    port = free_port()
    block = server_block("pop3", port, proxy_pass=f"127.0.0.1:{pop3_backend.port}",
                         ssl_certificate=certs["server"], ssl_certificate_key=certs["server_key"])
    block["listen"] += " ssl"
    p = proxy_factory({"main": {"control_socket": "control.sock"}, "servers": {"pop3": block}})
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    s = track(ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)))
    f = track(s.makefile("rb"))
    assert f.readline().startswith(b"+OK")
    s.sendall(b"USER alice\r\nPASS secret\r\n")
    assert f.readline().startswith(b"+OK") and f.readline().startswith(b"+OK")
    rows = wait_for(lambda: listing(p) or None, what="the TLS session listed")
    assert [(r["user"], r["tls"]) for r in rows] == [("alice", s.version())]
    assert cli(p, "kick", "alice").stdout == "1 session kicked\n"
    assert closed(f)


def test_a_client_that_half_closes_gets_its_answer_without_spinning_the_master(tmp_path):
    # `nc -N` and the like shut their sending side after the request: while the workers
    # answer, that end-of-file must not wake the master's wait again and again
    import time
    from types import SimpleNamespace
    from mailproxy.master_loop import Hub
    hub = Hub((signal.SIGUSR2,), lambda: SimpleNamespace(log=lambda *a: None))
    worker, worker_end = socket.socketpair()
    try:
        hub.listen(str(tmp_path / "c.sock"))
        hub.spawned(4242, (worker, socket.socket()))   # a worker that has not answered yet
        c = track(socket.socket(socket.AF_UNIX))
        c.settimeout(5)
        c.connect(str(tmp_path / "c.sock"))
        c.sendall(b'{"op": "sessions"}\n')
        c.shutdown(socket.SHUT_WR)
        worker_end.setblocking(False)
        forwarded = b""
        for _ in range(50):
            hub.wait(0.1)
            try:
                forwarded += worker_end.recv(4096)
            except BlockingIOError:
                pass
            if forwarded.endswith(b"\n"):
                break
        request = json.loads(forwarded)
        assert request["op"] == "sessions"
        rounds, start = 0, time.monotonic()
        while time.monotonic() - start < 0.5:
            hub.wait(0.25)
            rounds += 1
        assert rounds <= 4, "the master's wait returned %d times in 0.5s" % rounds
        worker_end.sendall(json.dumps({"id": request["id"], "pid": 4242,
                                       "sessions": []}).encode() + b"\n")
        for _ in range(20):
            hub.wait(0.1)
            if not hub.clients:
                break
        assert json.loads(c.recv(65536)) == {"sessions": [], "kicked": 0, "missing": [],
                                             "workers": 1}
    finally:
        hub.close()
        worker_end.close()


class _Stingy(socket.socket):
    """A master end of a channel whose first sends write only a few bytes (a channel the
    worker has not drained yet)."""
    short = 2

    def send(self, data, *flags):
        if self.short:
            self.short -= 1
            return super().send(data[:5], *flags)
        return super().send(data, *flags)


def test_a_partly_sent_request_is_finished_and_the_next_one_answered(tmp_path):
    # a non-blocking send to a worker's channel may write only part of the line: the rest
    # goes when the channel is writable, never leaving half a line before the next request
    from types import SimpleNamespace
    from mailproxy.master_loop import Hub
    hub = Hub((signal.SIGUSR2,), lambda: SimpleNamespace(log=lambda *a: None))
    master_end, worker_end = socket.socketpair()
    worker = _Stingy(fileno=master_end.detach())
    worker_end.setblocking(False)
    path = str(tmp_path / "c.sock")
    try:
        hub.listen(path)
        hub.spawned(4242, (worker, socket.socket()))
        for op in ("sessions", "kick"):
            c = track(socket.socket(socket.AF_UNIX))
            c.settimeout(5)
            c.connect(path)
            c.sendall(json.dumps({"op": op, "user": "alice"}).encode() + b"\n")
            got, answered = b"", False
            for _ in range(50):
                hub.wait(0.05)
                try:
                    got += worker_end.recv(4096)
                except BlockingIOError:
                    pass
                while b"\n" in got:
                    line, got = got.split(b"\n", 1)
                    request = json.loads(line)      # whole lines only
                    assert request["op"] == op
                    worker_end.sendall(json.dumps({"id": request["id"], "pid": 4242,
                                                   "sessions": [], "kicked": 1}).encode()
                                       + b"\n")
                    answered = True
                if answered and not hub.clients:
                    break
            assert answered, "the worker never got a whole %s request" % op
            assert json.loads(c.recv(65536))["missing"] == []
    finally:
        hub.close()
        worker_end.close()
