"""`[main] user`: workers drop privileges after the master has bound the listen sockets."""

import os
import pwd

import pytest

from tests.support.common import wait_for
from tests.support.process import free_port, server_block

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


def worker_pids(master):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == master:
                        pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def ids(pid):
    """(real, effective) uid and gid of a process, from /proc."""
    with open("/proc/%d/status" % pid) as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    uids = [int(x) for x in fields["Uid"].split()]
    gids = [int(x) for x in fields["Gid"].split()]
    return uids[:2], gids[:2]


def test_workers_run_as_configured_user(proxy_factory, auth_server, pop3_backend):
    nobody = pwd.getpwnam("nobody")
    port = free_port()
    auth_server.route_to(pop3_backend.port, server=pop3_backend.host)
    proxy = proxy_factory({
        "main": {"user": "nobody nogroup"},
        "servers": {"pop3": server_block("pop3", port, auth_http=auth_server.url)}})
    # the worker serves a whole session (it switches user before it serves anything) ...
    import poplib
    c = poplib.POP3("127.0.0.1", port, timeout=5)
    c.user("alice")
    assert c.pass_("secret").startswith(b"+OK")
    assert c.stat()[0] >= 0
    c.quit()
    # ... as nobody, while the master keeps root (for reload and new ports)
    (worker,) = wait_for(lambda: worker_pids(proxy.pid), what="a worker")
    (uids, gids) = ids(worker)
    assert uids == [nobody.pw_uid, nobody.pw_uid]
    assert gids[0] == gids[1] != 0
    assert ids(proxy.pid)[0][1] == 0


def test_log_files_handed_to_the_user_and_reopened(proxy_factory, auth_server, pop3_backend):
    """As nginx: log files belong to the workers' user, so a worker can reopen them (USR1)."""
    import shutil
    import signal
    import tempfile
    nobody = pwd.getpwnam("nobody")
    folder = tempfile.mkdtemp(prefix="mailproxy-user-")
    try:
        os.chmod(folder, 0o755)
        log = os.path.join(folder, "error.log")
        port = free_port()
        auth_server.route_to(pop3_backend.port, server=pop3_backend.host)
        proxy = proxy_factory({
            "main": {"user": "nobody nogroup", "error_log": log + " info"},
            "servers": {"pop3": server_block("pop3", port, auth_http=auth_server.url)}})
        assert os.stat(log).st_uid == nobody.pw_uid
        wait_for(lambda: worker_pids(proxy.pid), what="a worker")
        os.rename(log, log + ".1")
        os.kill(proxy.pid, signal.SIGUSR1)
        wait_for(lambda: os.path.exists(log), what="the reopened log")
        assert os.stat(log).st_uid == nobody.pw_uid

        def served():
            import poplib
            c = poplib.POP3("127.0.0.1", port, timeout=5)
            c.quit()
            with open(log) as f:
                return "connected to" in f.read()
        # the worker writes its session lines into the new file (it reopened it as nobody)
        wait_for(served, timeout=5, interval=0.2, what="worker lines in the reopened log")
        with open(log) as f:
            assert "failed" not in f.read()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- log files in a folder the workers' user owns (nginx's Debian CVE-2016-1247) ------------------

def _folders():
    """(log folder owned by nobody, root-only folder with a root file `victim`)."""
    import tempfile
    nobody = pwd.getpwnam("nobody")
    logs = tempfile.mkdtemp(prefix="mailproxy-logs-")
    os.chmod(logs, 0o755)
    os.chown(logs, nobody.pw_uid, nobody.pw_gid)
    safe = tempfile.mkdtemp(prefix="mailproxy-root-")
    victim = os.path.join(safe, "victim")
    with open(victim, "w") as f:
        f.write("root only\n")
    os.chmod(victim, 0o600)
    return logs, safe, victim


def _untouched(victim):
    st = os.stat(victim)
    with open(victim) as f:
        return st.st_uid == 0 and f.read() == "root only\n"


def _as_nobody(*argv):
    import subprocess
    subprocess.run(argv, user="nobody", check=True, timeout=10)


def test_planted_log_symlink_is_refused_at_start(proxy_factory, auth_server, pop3_backend):
    import shutil
    logs, safe, victim = _folders()
    try:
        log = os.path.join(logs, "error.log")
        _as_nobody("ln", "-s", victim, log)
        proxy = proxy_factory({
            "main": {"user": "nobody nogroup", "error_log": log + " info"},
            "servers": {"pop3": server_block("pop3", free_port(), auth_http=auth_server.url)}},
            start=False)
        with pytest.raises(AssertionError, match="exited with 1"):
            proxy.start()
        assert 'open() "%s" failed' % log in proxy.stderr_text()
        assert _untouched(victim)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        shutil.rmtree(safe, ignore_errors=True)


def test_existing_log_file_is_not_handed_over(proxy_factory, auth_server):
    """Only a file the master created goes to the workers' user; one already there keeps its
    owner (it may be a hard link or anything else the user planted)."""
    import shutil
    logs, safe, victim = _folders()
    try:
        log = os.path.join(logs, "error.log")
        with open(log, "w"):
            pass                                          # root's, as the admin left it
        proxy_factory({
            "main": {"user": "nobody nogroup", "error_log": log + " info"},
            "servers": {"pop3": server_block("pop3", free_port(), auth_http=auth_server.url)}})
        assert os.stat(log).st_uid == 0
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        shutil.rmtree(safe, ignore_errors=True)


@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGHUP"])
def test_planted_log_symlink_is_refused_on_reopen_and_reload(proxy_factory, auth_server,
                                                            signame):
    import shutil
    import signal
    logs, safe, victim = _folders()
    try:
        log = os.path.join(logs, "error.log")
        proxy = proxy_factory({
            "main": {"user": "nobody nogroup", "error_log": log + " info"},
            "servers": {"pop3": server_block("pop3", free_port(), auth_http=auth_server.url)}})
        wait_for(lambda: worker_pids(proxy.pid), what="a worker")
        # the workers' user moves the log away and plants a link to a root file
        _as_nobody("mv", log, log + ".1")
        _as_nobody("ln", "-s", victim, log)
        os.kill(proxy.pid, getattr(signal, signame))

        def refused():
            with open(log + ".1") as f:
                return 'open() "%s" failed (40: ' % log in f.read()
        wait_for(refused, timeout=5, interval=0.05, what="the refused open in the old log")
        assert _untouched(victim)
        assert os.path.islink(log)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        shutil.rmtree(safe, ignore_errors=True)
