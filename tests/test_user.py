"""`[main] user`: workers drop privileges after the master has bound the listen sockets."""

import os
import pwd

import pytest

from harness import free_port, server_block, wait_for

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
