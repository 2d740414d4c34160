"""`ssl_session_cache shared:NAME:SIZE` (ngx_ssl_new_session, ngx_ssl_get_cached_session),
proven with `openssl s_client -no_ticket -sess_out` / `-sess_in` (`Reused` on resumption):

- a session made in one worker resumes in the other (TLSv1.2 session IDs, TLSv1.3 stateful
  tickets), alone and beside `builtin`; with `builtin` alone it does not cross workers;
- a reload keeps the zone and its sessions; server blocks naming one zone never resume each
  other's sessions (the session id context is in the key);
- `-t`: accepted forms, nginx's messages for a malformed, too small or conflicting zone, and a
  ConfigError with file:line without the native layer.  The store itself: tests/unit.
"""

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from tests.support.common import REPO
from tests.support.process import ProxyProcess, free_port
from tests.support.resumption import REUSED, line_of, reused_pids, tls_block, worker_pids

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="the openssl command is needed")

VERSIONS = ["-tls1_2", "-tls1_3"]


def _proxy(proxy_factory, pki, cache, workers=2, **extra):
    port = free_port()
    block = tls_block(pki, port, ssl_session_cache=cache, ssl_session_tickets="off", **extra)
    p = proxy_factory({"main": {"worker_processes": str(workers)}, "servers": {"p": block}},
                      log_level="debug")
    return p, port


def _s_client(pki, port, version, sess_out=None, sess_in=None):
    """One POP3 session by s_client without tickets; True when it reports `Reused`."""
    args = ["openssl", "s_client", "-connect", "127.0.0.1:%d" % port, "-servername", "mail.test",
            "-CAfile", pki.ca, "-verify_return_error", "-ign_eof", "-no_ticket", version]
    args += ["-sess_out", sess_out] if sess_out else []
    args += ["-sess_in", sess_in] if sess_in else []
    r = subprocess.run(args, input=b"QUIT\r\n", capture_output=True, timeout=15)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0 and "+OK POP3 ready" in out, (out[-1500:], r.stderr[-1500:])
    m = re.search(r"^(New|Reused), ", out, re.M)
    assert m, out[-1500:]
    return m.group(1) == "Reused"


def _workers(p, n=2):
    deadline = time.monotonic() + 5
    while len(worker_pids(p)) < n:
        assert time.monotonic() < deadline, p.diagnostics()
        time.sleep(0.05)
    return set(worker_pids(p))


def _resume_everywhere(p, pki, port, tmp_path, version):
    """Make a session, then resume it until both workers served a resumed one (bounded in count
    and time); returns (resumed count, tries, the workers that resumed)."""
    workers = _workers(p)
    sess = str(tmp_path / ("sess%s" % version))
    assert not _s_client(pki, port, version, sess_out=sess)
    deadline, reused, tries = time.monotonic() + 20, 0, 0
    while tries < 40 and time.monotonic() < deadline:
        tries += 1
        reused += _s_client(pki, port, version, sess_in=sess)
        if reused_pids(p) == workers and tries >= 6:
            break
    return reused, tries, workers


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cache", ["shared:SSL:1m", "builtin:1000 shared:SSL:1m"])
def test_a_session_resumes_in_every_worker(proxy_factory, pki, tmp_path, version, cache):
    p, port = _proxy(proxy_factory, pki, cache)
    reused, tries, workers = _resume_everywhere(p, pki, port, tmp_path, version)
    assert reused == tries and reused_pids(p) == workers, (reused, tries, reused_pids(p))


@pytest.mark.parametrize("version", VERSIONS)
def test_builtin_alone_does_not_cross_workers(proxy_factory, pki, tmp_path, version):
    p, port = _proxy(proxy_factory, pki, "builtin")
    reused, tries, workers = _resume_everywhere(p, pki, port, tmp_path, version)
    # only the worker that made the session resumes it: the other one missed at least once
    assert len(reused_pids(p)) <= 1 and reused < tries, (reused, tries, reused_pids(p))


@pytest.mark.parametrize("version", VERSIONS)
def test_a_reload_keeps_resuming(proxy_factory, pki, tmp_path, version):
    p, port = _proxy(proxy_factory, pki, "shared:SSL:1m", workers=1)
    old_pid = min(_workers(p, 1))
    sess = str(tmp_path / "sess")
    assert not _s_client(pki, port, version, sess_out=sess)
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while len(worker_pids(p)) < 2 or os.path.exists("/proc/%s" % old_pid):
        assert time.monotonic() < deadline, p.diagnostics()
        time.sleep(0.05)
    assert _s_client(pki, port, version, sess_in=sess)
    assert reused_pids(p) == {worker_pids(p)[-1]}


def test_server_blocks_sharing_a_zone_keep_their_sessions(proxy_factory, pki, tmp_path):
    a_port, b_port = free_port(), free_port()
    p = proxy_factory({"main": {"worker_processes": "1"}, "servers": {
        "a": tls_block(pki, a_port, ssl_session_cache="shared:SSL:1m", ssl_session_tickets="off"),
        "b": tls_block(pki, b_port, cert=pki.server_ec, ssl_session_cache="shared:SSL:1m",
                       ssl_session_tickets="off")}}, log_level="debug")
    sess = str(tmp_path / "sess")
    assert not _s_client(pki, a_port, "-tls1_2", sess_out=sess)
    assert not _s_client(pki, b_port, "-tls1_2", sess_in=sess)
    assert _s_client(pki, a_port, "-tls1_2", sess_in=sess)
    assert REUSED in p.wait_log(REUSED)


# ---------------------------------------------------------------------------------------------
# -t

def _dash_t(tmp_path, pki, servers, env=None, name="t"):
    p = ProxyProcess(tmp_path, {"servers": servers}, start=False, name=name)
    r = subprocess.run(p.command + ["-t", "-c", str(p.conf_path)], capture_output=True,
                       text=True, timeout=30, cwd=str(REPO), env=env)
    return p, r


@pytest.mark.parametrize("cache", ["shared:SSL:10m", "builtin:1000 shared:SSL:10m",
                                   "shared:SSL:32k builtin"])
def test_dash_t_accepts(pki, tmp_path, cache):
    _p, r = _dash_t(tmp_path, pki, {"p": tls_block(pki, free_port(), ssl_session_cache=cache)})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("cache,message", [
    ("shared:SSL", 'invalid session cache "shared:SSL"'),
    ("shared::10m", 'invalid session cache "shared::10m"'),
    ("shared:SSL:ten", 'invalid session cache "shared:SSL:ten"'),
    ("shared:SSL:16k", 'session cache "shared:SSL:16k" is too small'),
])
def test_dash_t_refuses_with_nginx_s_messages(pki, tmp_path, cache, message):
    p, r = _dash_t(tmp_path, pki, {"p": tls_block(pki, free_port(), ssl_session_cache=cache)})
    assert r.returncode != 0
    assert "%s in %s:%d" % (message, p.conf_path, line_of(p.conf_path, "ssl_session_cache")) \
        in r.stderr, r.stderr


def test_dash_t_refuses_one_zone_of_two_sizes(pki, tmp_path):
    p, r = _dash_t(tmp_path, pki, {
        "a": tls_block(pki, free_port(), ssl_session_cache="shared:SSL:1m"),
        "b": tls_block(pki, free_port(), ssl_session_cache="shared:SSL:2m")})
    assert r.returncode != 0
    assert 'the size 2097152 of shared memory zone "SSL" conflicts with already declared size ' \
        '1048576 in %s:' % p.conf_path in r.stderr, r.stderr


def test_dash_t_without_the_native_layer_is_a_config_error(pki, tmp_path):
    env = dict(os.environ, MAILPROXY_NO_NATIVE_TLS="1")
    p, r = _dash_t(tmp_path, pki, {"p": tls_block(pki, free_port(),
                                                  ssl_session_cache="shared:SSL:10m")}, env=env)
    assert r.returncode != 0
    assert '"ssl_session_cache" cannot be honoured' in r.stderr, r.stderr
    assert "in %s:%d" % (p.conf_path, line_of(p.conf_path, "ssl_session_cache")) in r.stderr
