"""Command line, process model (master + workers, signals, reload), listeners and the zipapp.

Every proxy runs as a real subprocess on ephemeral loopback ports; teardown ends, by pid, every
process a test started (master first, then any worker it left).
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailproxy.config import Config, listen_defaults, server_defaults
from mailproxy.log import ErrorLog
from mailproxy.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = [sys.executable, str(REPO / "mailproxy.py")]
MODULE = [sys.executable, "-m", "mailproxy"]


def free_port(host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(pred, timeout=5.0, what="condition", interval=0.01):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(interval)


def children(pid):
    """Pids whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def config_text(port, pid=True, workers=1, extra_main="", extra_server="", tmp=None,
                listen=None):
    lines = ["[main]"]
    if pid:
        lines.append("pid = mailproxy.pid")
    lines += ["error_log = error.log info", "worker_processes = %s" % workers]
    if extra_main:
        lines.append(extra_main)
    lines += ["", "[server pop]", "protocol = pop3",
              "listen = %s" % (listen or "127.0.0.1:%d" % port),
              "proxy_pass = 127.0.0.1:9"]
    if extra_server:
        lines.append(extra_server)
    return "\n".join(lines) + "\n"


def greeting(port, host="127.0.0.1", timeout=3.0):
    with socket.create_connection((host, port), timeout=timeout) as s:
        return s.recv(512)


def refused(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.settimeout(1)
            return s.recv(10) == b""
    except OSError:
        return True


class Proxy:
    def __init__(self, tmp_path, text, command=None, env=None, name="mailproxy"):
        self.dir = tmp_path
        self.conf = tmp_path / (name + ".ini")
        self.conf.write_text(text)
        self.pidfile = tmp_path / "mailproxy.pid"
        self.log = tmp_path / "error.log"
        self.command = (command or LAUNCHER) + ["-c", str(self.conf)]
        self.env = env
        self.proc = None
        self.seen = set()

    def start(self, wait=True):
        self.err = open(self.dir / "stderr.txt", "wb")
        self.proc = subprocess.Popen(self.command, cwd=str(self.dir), stdin=subprocess.DEVNULL,
                                     stdout=self.err, stderr=self.err, env=self.env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=5.0):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError("proxy exited %s: %s" % (self.proc.returncode,
                                                              self.stderr()))
            return self.pidfile.exists() and self.pidfile.read_text().strip()
        wait_for(ready, timeout, "pid file")
        assert int(self.pidfile.read_text()) == self.proc.pid
        self.workers()

    @property
    def pid(self):
        return self.proc.pid

    def workers(self):
        pids = children(self.proc.pid)
        self.seen.update(pids)
        return pids

    def wait_workers(self, n, timeout=5.0):
        return wait_for(lambda: len(self.workers()) == n and self.workers(), timeout,
                        "%d workers" % n)

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def wait(self, timeout=5.0):
        return self.proc.wait(timeout)

    def stderr(self):
        return (self.dir / "stderr.txt").read_text(errors="replace")

    def log_text(self):
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, text, timeout=5.0):
        return wait_for(lambda: text in self.log_text(), timeout, "log line %r" % text)

    def stop(self):
        if self.proc is None:
            return
        self.workers()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in self.seen:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.err.close()


@pytest.fixture
def proxy(tmp_path):
    made = []

    def make(text, start=True, **kw):
        p = Proxy(tmp_path, text, **kw)
        made.append(p)
        if start:
            p.start()
        return p
    yield make
    for p in made:
        p.stop()


def run(args, cwd=None, env=None, timeout=10):
    return subprocess.run(LAUNCHER + args, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# -t -T -v -V -h and option errors

def test_test_config_ok(tmp_path):
    conf = tmp_path / "ok.ini"
    conf.write_text(config_text(free_port()))
    r = run(["-t", "-c", str(conf)])
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        "mailproxy: the configuration file %s syntax is ok" % conf,
        "mailproxy: configuration file %s test is successful" % conf]
    assert r.stdout == ""
    # -q: only errors
    r = run(["-tq", "-c", str(conf)])
    assert r.returncode == 0 and r.stderr == ""


def test_test_config_failing_names_file_and_line(tmp_path):
    conf = tmp_path / "bad.ini"
    text = config_text(free_port()).replace("proxy_pass", "no_such_directive = 1\nproxy_pass")
    conf.write_text(text)
    line = text.splitlines().index("no_such_directive = 1") + 1
    r = run(["-t", "-c", str(conf)])
    assert r.returncode == 1
    err = r.stderr.splitlines()
    assert err[0].startswith("mailproxy: [emerg] ")
    assert "%s:%d" % (conf, line) in err[0]
    assert "no_such_directive" in err[0]
    assert err[-1] == "mailproxy: configuration file %s test failed" % conf


def test_missing_config_file(tmp_path):
    r = run(["-t", "-c", str(tmp_path / "absent.ini")])
    assert r.returncode == 1
    assert "absent.ini" in r.stderr and "test failed" in r.stderr


def test_dump_config(tmp_path):
    port = free_port()
    conf = tmp_path / "ok.ini"
    conf.write_text(config_text(port))
    r = run(["-T", "-c", str(conf)])
    assert r.returncode == 0, r.stderr
    assert "test is successful" in r.stderr
    assert "127.0.0.1:%d" % port in r.stdout
    assert "[server pop]" in r.stdout


def test_version_and_features():
    from mailproxy import __version__
    r = run(["-v"])
    assert r.returncode == 0
    assert r.stderr.strip() == "mailproxy version: mailproxy/%s" % __version__
    r = run(["-V"])
    assert r.returncode == 0
    lines = r.stderr.splitlines()
    assert lines[0] == "mailproxy version: mailproxy/%s" % __version__
    assert any(x.startswith("Python 3.") for x in lines)
    assert "protocols: pop3, imap, smtp, sieve" in lines
    # every directive of the table is supported: no line lists pending ones
    assert not any("not supported yet" in x for x in lines)


def test_help_and_bad_options():
    r = run(["-h"])
    assert r.returncode == 0 and "Usage: mailproxy" in r.stderr and "-s signal" in r.stderr
    r = run(["-x"])
    assert r.returncode == 1 and r.stderr.strip() == 'mailproxy: invalid option: "x"'
    r = run(["-s", "restart"])
    assert r.returncode == 1 and '"-s restart"' in r.stderr
    r = run(["-c"])
    assert r.returncode == 1 and 'option "-c" requires file name' in r.stderr


def test_python_dash_m(tmp_path):
    conf = tmp_path / "ok.ini"
    conf.write_text(config_text(free_port()))
    r = subprocess.run(MODULE + ["-t", "-c", str(conf)], cwd=str(REPO), capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 0 and "test is successful" in r.stderr


# ---------------------------------------------------------------------------------------------
# start-up, pid file, stop

def test_pid_file_is_readiness_and_removed_on_exit(proxy):
    port = free_port()
    p = proxy(config_text(port))
    # the pid file exists: the port is bound and answered by a worker
    assert greeting(port).startswith(b"+OK")
    p.wait_log("start worker process")
    p.signal(signal.SIGTERM)
    assert p.wait(5) == 0
    assert not p.pidfile.exists()
    assert refused(port)


def test_port_in_use_fails_before_pid_file(proxy):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = proxy(config_text(port), start=False).start(wait=False)
        assert p.wait(5) != 0
        assert not p.pidfile.exists()
        assert "bind() to 127.0.0.1:%d failed (98: " % port in p.stderr()
        assert "Address already in use" in p.stderr()


def test_bad_config_exits_without_pid_file(proxy):
    p = proxy(config_text(free_port()) + "bogus_key = 1\n", start=False).start(wait=False)
    assert p.wait(5) == 1
    assert not p.pidfile.exists()
    assert "[emerg]" in p.stderr() and "bogus_key" in p.stderr()


def test_term_exits_promptly_with_open_session(proxy):
    port = free_port()
    p = proxy(config_text(port))
    with socket.create_connection(("127.0.0.1", port)) as c:
        assert c.recv(100).startswith(b"+OK")
        t = time.monotonic()
        p.signal(signal.SIGTERM)
        assert p.wait(5) == 0
        assert time.monotonic() - t < 1.5
        c.settimeout(2)
        try:
            assert c.recv(100) == b""     # the session went with the worker
        except ConnectionResetError:
            pass
    assert not p.pidfile.exists()
    assert "signal 15 (SIGTERM) received" in p.log_text()


def test_quit_is_graceful(proxy):
    port = free_port()
    p = proxy(config_text(port))
    c = socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        assert c.recv(100).startswith(b"+OK")
        p.signal(signal.SIGQUIT)
        p.wait_log("gracefully shutting down")
        wait_for(lambda: refused(port), 3, "listener closed")
        time.sleep(0.3)
        assert p.proc.poll() is None, "QUIT must wait for the open session"
        c.sendall(b"NOOP\r\n")
        assert c.recv(100).startswith(b"+OK")
        c.sendall(b"QUIT\r\n")
        assert c.recv(100).startswith(b"+OK")
    finally:
        c.close()
    assert p.wait(5) == 0
    assert not p.pidfile.exists()


def test_quit_bounded_by_worker_shutdown_timeout(proxy):
    port = free_port()
    p = proxy(config_text(port, extra_main="worker_shutdown_timeout = 500ms"))
    with socket.create_connection(("127.0.0.1", port), timeout=3) as c:
        assert c.recv(100).startswith(b"+OK")
        t = time.monotonic()
        p.signal(signal.SIGQUIT)
        assert p.wait(5) == 0
        assert 0.4 < time.monotonic() - t < 3


# ---------------------------------------------------------------------------------------------
# reload, reopen, -s

def test_hup_with_bad_config_keeps_running(proxy):
    port = free_port()
    p = proxy(config_text(port))
    workers = p.workers()
    p.conf.write_text(config_text(port) + "bogus_key = 1\n")
    p.signal(signal.SIGHUP)
    p.wait_log("bogus_key")
    assert "[emerg]" in p.log_text()
    time.sleep(0.2)
    assert p.proc.poll() is None
    assert p.workers() == workers
    assert greeting(port).startswith(b"+OK")


def test_hup_with_new_port_serves_it(proxy):
    old, new = free_port(), free_port()
    p = proxy(config_text(old))
    first = p.workers()
    with socket.create_connection(("127.0.0.1", old), timeout=3) as c:
        assert c.recv(100).startswith(b"+OK")
        p.conf.write_text(config_text(new))
        p.signal(signal.SIGHUP)
        wait_for(lambda: not refused(new), 5, "new port")
        assert greeting(new).startswith(b"+OK")
        # the running session is not cut by the reload
        c.sendall(b"NOOP\r\n")
        assert c.recv(100).startswith(b"+OK")
        assert any(pid in p.workers() for pid in first), "old worker still serving"
        c.sendall(b"QUIT\r\n")
        c.recv(100)
    wait_for(lambda: not any(pid in p.workers() for pid in first), 5, "old worker exit")
    wait_for(lambda: refused(old), 3, "old port closed")
    assert len(p.workers()) == 1


def test_hup_keeps_bound_port_and_reopen_logs(proxy):
    port = free_port()
    p = proxy(config_text(port))
    before = p.workers()
    p.signal(signal.SIGHUP)
    wait_for(lambda: p.workers() and not set(p.workers()) & set(before), 5, "new worker")
    assert greeting(port).startswith(b"+OK")
    # USR1: logs reopened (the renamed file keeps the old lines, the new one gets new ones)
    os.rename(p.log, p.dir / "error.log.1")
    p.signal(signal.SIGUSR1)
    wait_for(lambda: p.log.exists(), 3, "new log")
    p.signal(signal.SIGTERM)
    p.wait(5)
    assert "exit" in p.log_text()
    assert "start worker process" in (p.dir / "error.log.1").read_text()


def test_signal_option_uses_pid_file(proxy, tmp_path):
    port = free_port()
    p = proxy(config_text(port))
    before = p.workers()
    r = run(["-s", "reload", "-c", str(p.conf)])
    assert r.returncode == 0, r.stderr
    wait_for(lambda: p.workers() and not set(p.workers()) & set(before), 5, "reloaded worker")
    r = run(["-s", "stop", "-c", str(p.conf)])
    assert r.returncode == 0, r.stderr
    assert p.wait(5) == 0
    assert not p.pidfile.exists()
    r = run(["-s", "stop", "-c", str(p.conf)])
    assert r.returncode == 1
    assert 'open() "%s" failed (2: No such file or directory)' % p.pidfile in r.stderr


def test_signal_option_refuses_a_planted_pid_file(tmp_path):
    """-s signals only a master holding its pid file open, not a process the file names."""
    conf = tmp_path / "planted.ini"
    conf.write_text(config_text(free_port()))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "mailproxy.pid").write_text("%d\n" % other.pid)
        for name in ("stop", "reload"):
            r = run(["-s", name, "-c", str(conf)])
            assert r.returncode == 1
            assert "process %d named in" % other.pid in r.stderr, r.stderr
        time.sleep(0.1)
        assert other.poll() is None               # still running: never signalled
    finally:
        other.kill()
        other.wait(5)


def test_pid_file_is_never_written_through_a_link(tmp_path):
    from mailproxy.supervisor import Master
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    pidfile = tmp_path / "mailproxy.pid"
    # the old predictable temporary name, and the pid file itself, planted as links
    (tmp_path / ("mailproxy.pid.%d.tmp" % os.getpid())).symlink_to(victim)
    pidfile.symlink_to(victim)
    m = Master(str(tmp_path / "x.ini"), None)
    m._write_pid(str(pidfile))
    try:
        assert victim.read_text() == "keep\n"
        assert not pidfile.is_symlink() and pidfile.read_text() == "%d\n" % os.getpid()
        assert oct(pidfile.stat().st_mode & 0o777) == oct(0o644)
    finally:
        m._remove_pid()
    assert not pidfile.exists()


def test_command_line_apart_from_the_supervisor():
    # cli.py imports supervisor.py, never the other way round, and neither grows past ~600 lines
    import ast
    pkg = REPO / "mailproxy"
    tree = ast.parse((pkg / "supervisor.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.update([node.module or ""] + [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not {"cli", "mailproxy.cli"} & imported, imported
    from mailproxy import cli, supervisor
    assert cli.Master is supervisor.Master and hasattr(supervisor, "Worker")
    for name in ("cli.py", "supervisor.py"):
        assert len((pkg / name).read_text().splitlines()) <= 600, name


def test_signal_option_without_pid_directive(tmp_path):
    conf = tmp_path / "nopid.ini"
    conf.write_text(config_text(free_port(), pid=False))
    r = run(["-s", "quit", "-c", str(conf)])
    assert r.returncode == 1 and "no pid file" in r.stderr


# ---------------------------------------------------------------------------------------------
# workers

def test_two_workers_and_restart_of_a_killed_one(proxy):
    port = free_port()
    p = proxy(config_text(port, workers=2))
    first = p.wait_workers(2)
    assert greeting(port).startswith(b"+OK")
    os.kill(first[0], signal.SIGKILL)
    now = wait_for(lambda: len(p.workers()) == 2 and first[0] not in p.workers()
                   and p.workers(), 5, "restarted worker")
    assert first[1] in now
    p.wait_log("worker process %d exited on signal 9" % first[0])
    assert greeting(port).startswith(b"+OK")
    p.signal(signal.SIGTERM)
    assert p.wait(5) == 0
    for pid in now:
        wait_for(lambda: not alive(pid), 3, "worker exit")


def _cpus_allowed(pid):
    """The CPUs every thread of process `pid` may run on, one set per thread."""
    found = []
    for tid in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
            line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
        found.append(line.split(":", 1)[1].strip())
    return set(found)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPUs")
def test_worker_cpu_affinity_auto_binds_each_worker_and_its_restart(proxy):
    port = free_port()
    cpus = sorted(os.sched_getaffinity(0))
    p = proxy(config_text(port, workers=2, extra_main="worker_cpu_affinity = auto"))
    first = p.wait_workers(2)
    assert greeting(port).startswith(b"+OK")        # the session's threads exist too
    bound = sorted(_cpus_allowed(pid).pop() for pid in first)
    assert all(len(_cpus_allowed(pid)) == 1 for pid in first)
    assert bound == sorted(str(c) for c in cpus[:2])
    assert _cpus_allowed(p.pid) == {"%d-%d" % (cpus[0], cpus[-1])} or len(cpus) > 2
    p.wait_log("sched_setaffinity(): using cpu #%d" % cpus[0])
    p.wait_log("sched_setaffinity(): using cpu #%d" % cpus[1])
    # a restarted worker takes the number, hence the CPU, of the one it replaces
    lost = _cpus_allowed(first[0])
    os.kill(first[0], signal.SIGKILL)
    now = wait_for(lambda: len(p.workers()) == 2 and first[0] not in p.workers()
                   and p.workers(), 5, "restarted worker")
    new = [pid for pid in now if pid != first[1]][0]
    assert _cpus_allowed(new) == lost


def test_notify_socket(proxy, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        env = dict(os.environ, NOTIFY_SOCKET=path)
        port = free_port()
        p = proxy(config_text(port), env=env)
        assert sock.recv(4096).split(b"\n")[0] == b"READY=1"
        p.signal(signal.SIGHUP)
        assert sock.recv(4096).split(b"\n")[0] == b"RELOADING=1"
        assert sock.recv(4096).split(b"\n")[0] == b"READY=1"
        p.signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        p.wait(5)
    finally:
        sock.close()


# ---------------------------------------------------------------------------------------------
# the zipapp

def test_zipapp_build_version_and_test(tmp_path):
    out = tmp_path / "mailproxy.pyz"
    r = subprocess.run([sys.executable, str(REPO / "packaging" / "build.py"), "--output",
                        str(out)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    again = tmp_path / "again.pyz"
    subprocess.run([sys.executable, str(REPO / "packaging" / "build.py"), "--output",
                    str(again)], check=True, capture_output=True, timeout=30)
    assert out.read_bytes() == again.read_bytes(), "build is not deterministic"
    assert out.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    import zipfile
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
    assert names == sorted(names) and "__main__.py" in names and "mailproxy/cli.py" in names
    assert all(n == "__main__.py" or (n.startswith("mailproxy/") and n.endswith(".py"))
               for n in names)
    r = subprocess.run([sys.executable, str(out), "-V"], capture_output=True, text=True,
                       timeout=10, cwd=str(tmp_path))
    assert r.returncode == 0 and "mailproxy version: mailproxy/" in r.stderr
    conf = tmp_path / "z.ini"
    conf.write_text(config_text(free_port()))
    r = subprocess.run([sys.executable, str(out), "-t", "-c", str(conf)], capture_output=True,
                       text=True, timeout=10, cwd=str(tmp_path))
    assert r.returncode == 0 and "test is successful" in r.stderr


def test_zipapp_serves(proxy, tmp_path):
    out = tmp_path / "mailproxy.pyz"
    subprocess.run([sys.executable, str(REPO / "packaging" / "build.py"), "--output",
                    str(out)], check=True, capture_output=True, timeout=30)
    port = free_port()
    p = proxy(config_text(port), command=[sys.executable, str(out)])
    assert greeting(port).startswith(b"+OK")


# ---------------------------------------------------------------------------------------------
# listeners (in-process, with a stub session class)

class _EchoSession:
    def __init__(self, sock, client_address, conf, listen, runtime, **kw):
        self.sock, self.conf = sock, conf

    def run(self):
        try:
            nodelay = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            self.sock.sendall(("%s nodelay=%d\r\n" % (self.conf.name, nodelay)).encode())
        finally:
            self.sock.close()


def _runtime():
    """A worker's Runtime as the listeners get it (the relay is never reached: the stub session
    answers by itself) with an error log writing nowhere."""
    return Runtime(Config("mailproxy.ini"), ErrorLog([]), relay=None)


@pytest.fixture
def stub_sessions(monkeypatch):
    from mailproxy import listeners
    monkeypatch.setattr(listeners.Listener, "session_class", _EchoSession)


def test_wildcard_and_specific_share_one_socket(stub_sessions):
    from mailproxy import listeners
    port = free_port()
    wild = server_defaults("pop3", name="wild", listen=[listen_defaults("", port, backlog=2048)])
    spec = server_defaults("pop3", name="spec", listen=[listen_defaults("127.0.0.1", port)])
    other_port = free_port()
    alone = server_defaults("pop3", name="alone",
                            listen=[listen_defaults("127.0.0.1", other_port,
                                                    so_keepalive=(30, 10, 3), rcvbuf=65536)])
    bound, removed = listeners.bind_all([wild, spec, alone])
    assert removed == []
    try:
        assert len(bound) == 2
        rt = _runtime()
        for lst in bound.values():
            lst.start(rt, poll_interval=0.05)
        assert greeting(port, "127.0.0.1") == b"spec nodelay=1\r\n"
        assert greeting(port, "127.0.0.2") == b"wild nodelay=1\r\n"
        assert greeting(other_port) == b"alone nodelay=1\r\n"
        by_port = {k[2]: v for k, v in bound.items()}
        assert by_port[port].request_queue_size == 2048
        s = by_port[other_port].socket
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        # reload: swap routes without rebinding, drop the other port
        spec2 = server_defaults("pop3", name="spec2", listen=[listen_defaults("127.0.0.1", port)])
        again, removed = listeners.bind_all([wild, spec2], bound)
        assert again[next(iter(k for k in again))] is by_port[port]
        assert removed == [by_port[other_port]]
        assert greeting(port, "127.0.0.1") == b"spec2 nodelay=1\r\n"
    finally:
        for lst in bound.values():
            lst.stop_accepting()


def test_bind_error_message(stub_sessions):
    from mailproxy import listeners
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        conf = server_defaults("pop3", name="x", listen=[listen_defaults("127.0.0.1", port)])
        with pytest.raises(listeners.ListenError) as e:
            listeners.bind_all([conf])
        assert str(e.value) == "bind() to 127.0.0.1:%d failed (98: Address already in use)" % port


def test_ipv6_listener(stub_sessions):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    from mailproxy import listeners
    try:
        port = free_port("::1")
    except OSError:
        pytest.skip("no ::1")
    conf = server_defaults("pop3", name="six", listen=[listen_defaults("::1", port)])
    bound, _ = listeners.bind_all([conf])
    try:
        for lst in bound.values():
            lst.start(_runtime(), poll_interval=0.05)
        assert greeting(port, "::1") == b"six nodelay=1\r\n"
    finally:
        for lst in bound.values():
            lst.stop_accepting()
