"""TLS session tickets shared beyond one process (ngx_ssl_session_ticket_keys,
ngx_ssl_ticket_key_callback), proven with `openssl s_client -sess_out` / `-sess_in`
(`Reused` on resumption), over TLSv1.2 and TLSv1.3:

- two instances (two masters, two ports) with the same `ssl_session_ticket_key` file resume
  each other's tickets; with different files they do not; 48- and 80-byte files both work and
  the tickets are in nginx's format; rotation: a ticket made under K1 resumes where the files
  are K2 then K1;
- without a key file, the instance's key is shared by all its workers and survives a reload;
- a key file of the wrong size is a `-t` error with file:line (nginx's message).
"""

import hashlib
import hmac
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.common import REPO
from tests.support.process import ProxyProcess, free_port
from tests.support.resumption import REUSED, line_of, reused_pids, tls_block, worker_pids

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="the openssl command is needed")

VERSIONS = ["-tls1_2", "-tls1_3"]


def _key(tmp_path, name, size):
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return str(path)


def _proxy(proxy_factory, pki, keys=None, workers=1, **block):
    port = free_port()
    p = proxy_factory({"main": {"worker_processes": str(workers)},
                       "servers": {"p": tls_block(pki, port, keys, **block)}}, log_level="debug")
    return p, port


def _s_client(pki, port, version, sess_out=None, sess_in=None):
    """One POP3 session over implicit TLS by s_client (QUIT after the greeting); True when
    s_client reports the session as `Reused`, False for `New`."""
    args = ["openssl", "s_client", "-connect", "127.0.0.1:%d" % port, "-servername", "mail.test",
            "-CAfile", pki.ca, "-verify_return_error", "-ign_eof", version]
    if sess_out:
        args += ["-sess_out", sess_out]
    if sess_in:
        args += ["-sess_in", sess_in]
    r = subprocess.run(args, input=b"QUIT\r\n", capture_output=True, timeout=15)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0 and "+OK POP3 ready" in out, (out[-1500:], r.stderr[-1500:])
    m = re.search(r"^(New|Reused), ", out, re.M)
    assert m, out[-1500:]
    if sess_out:
        assert os.path.getsize(sess_out) > 0, "s_client saved no session"
    return m.group(1) == "Reused"


def _resumes(pki, tmp_path, version, port_a, port_b):
    sess = str(tmp_path / ("sess%s-%d-%d" % (version, port_a, port_b)))
    assert not _s_client(pki, port_a, version, sess_out=sess)
    return _s_client(pki, port_b, version, sess_in=sess)


# ---------------------------------------------------------------------------------------------
# two instances and key files

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("size", [48, 80])
def test_instances_sharing_a_key_file_resume_each_others_tickets(proxy_factory, pki, tmp_path,
                                                                  version, size):
    key = _key(tmp_path, "k", size)
    a, port_a = _proxy(proxy_factory, pki, [key])
    b, port_b = _proxy(proxy_factory, pki, [key])
    assert _resumes(pki, tmp_path, version, port_a, port_b)
    assert _resumes(pki, tmp_path, version, port_b, port_a)
    assert REUSED in b.wait_log(REUSED) and REUSED in a.wait_log(REUSED)


@pytest.mark.parametrize("version", VERSIONS)
def test_instances_with_different_key_files_do_not(proxy_factory, pki, tmp_path, version):
    _a, port_a = _proxy(proxy_factory, pki, [_key(tmp_path, "k1", 80)])
    _b, port_b = _proxy(proxy_factory, pki, [_key(tmp_path, "k2", 80)])
    assert not _resumes(pki, tmp_path, version, port_a, port_b)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("other", ["certificate", "client certificates"])
def test_a_shared_key_file_does_not_resume_across_certificates_or_client_checks(
        proxy_factory, pki, tmp_path, version, other):
    # the session id context (ngx_ssl_session_id_context) differs: a ticket never carries
    # one block's certificate or client-certificate verdict into another's
    key = _key(tmp_path, "k", 80)
    _a, port_a = _proxy(proxy_factory, pki, [key])
    if other == "certificate":
        _b, port_b = _proxy(proxy_factory, pki, [key], cert=pki.server_ec)
    else:
        _b, port_b = _proxy(proxy_factory, pki, [key], ssl_verify_client="optional",
                            ssl_client_certificate=pki.ca)
    assert not _resumes(pki, tmp_path, version, port_a, port_b)
    assert _resumes(pki, tmp_path, version, port_b, port_b)


@pytest.mark.parametrize("version", VERSIONS)
def test_instances_without_key_files_do_not(proxy_factory, pki, tmp_path, version):
    _a, port_a = _proxy(proxy_factory, pki)
    _b, port_b = _proxy(proxy_factory, pki)
    assert not _resumes(pki, tmp_path, version, port_a, port_b)
    assert _resumes(pki, tmp_path, version, port_a, port_a)


@pytest.mark.parametrize("version", VERSIONS)
def test_rotation_the_first_key_encrypts_all_decrypt(proxy_factory, pki, tmp_path, version):
    k1, k2 = _key(tmp_path, "k1", 48), _key(tmp_path, "k2", 80)
    _old, port_old = _proxy(proxy_factory, pki, [k1])
    _new, port_new = _proxy(proxy_factory, pki, [k2, k1])
    _k2, port_k2 = _proxy(proxy_factory, pki, [k2])
    assert _resumes(pki, tmp_path, version, port_old, port_new)     # K1's ticket, decrypted
    assert _resumes(pki, tmp_path, version, port_new, port_k2)      # new tickets under K2
    assert not _resumes(pki, tmp_path, version, port_new, port_old)


def _ticket(sess):
    """The TLSv1.2 session ticket a saved session holds (`openssl sess_id -text`)."""
    text = subprocess.run(["openssl", "sess_id", "-in", sess, "-text", "-noout"],
                          capture_output=True, text=True, timeout=15).stdout
    block = text.split("TLS session ticket:")[1].split("Start Time")[0]
    rows = re.findall(r"^\s*[0-9a-f]{4} - ((?:[0-9a-f]{2}[ -]){1,16})", block, re.M)
    return bytes.fromhex("".join(rows).replace("-", " ").replace(" ", ""))


@pytest.mark.parametrize("size", [48, 80])
def test_tickets_are_nginx_s_format(proxy_factory, pki, tmp_path, size):
    """As ngx_ssl_ticket_key_callback makes them: key name | IV | AES-CBC data | HMAC-SHA256 of
    all before it, the HMAC secret at bytes 32-48 of a 48-byte file, 16-48 of an 80-byte one
    (the 48-byte layout checked against nginx 1.22's own tickets)."""
    key = _key(tmp_path, "k", size)
    raw = Path(key).read_bytes()
    _p, port = _proxy(proxy_factory, pki, [key])
    sess = str(tmp_path / "sess")
    assert not _s_client(pki, port, "-tls1_2", sess_out=sess)
    ticket = _ticket(sess)
    secret = raw[32:48] if size == 48 else raw[16:48]
    assert ticket[:16] == raw[:16]
    assert hmac.new(secret, ticket[:-32], hashlib.sha256).digest() == ticket[-32:]


# ---------------------------------------------------------------------------------------------
# one instance without a key file: its workers, its reloads

@pytest.mark.parametrize("version", VERSIONS)
def test_workers_of_one_instance_share_the_ticket_key(proxy_factory, pki, tmp_path, version):
    p, port = _proxy(proxy_factory, pki, workers=2)
    deadline = time.monotonic() + 5
    while len(worker_pids(p)) < 2:
        assert time.monotonic() < deadline, p.diagnostics()
        time.sleep(0.05)
    workers = set(worker_pids(p))
    sess = str(tmp_path / "sess")
    assert not _s_client(pki, port, version, sess_out=sess)
    deadline = time.monotonic() + 20
    for _ in range(60):                 # whichever worker accepts, the ticket resumes
        assert _s_client(pki, port, version, sess_in=sess)
        if reused_pids(p) == workers or time.monotonic() > deadline:
            break
    assert reused_pids(p) == workers, (workers, reused_pids(p))


@pytest.mark.parametrize("version", VERSIONS)
def test_tickets_survive_a_reload(proxy_factory, pki, tmp_path, version):
    p, port = _proxy(proxy_factory, pki)
    old = p.wait_log(r"start worker process \d+", regex=True)
    old_pid = re.search(r"start worker process (\d+)", old).group(1)
    sess = str(tmp_path / "sess")
    assert not _s_client(pki, port, version, sess_out=sess)
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while len(worker_pids(p)) < 2 or os.path.exists("/proc/%s" % old_pid):
        assert time.monotonic() < deadline, "no new worker, or the old one stays\n" + \
            p.diagnostics()
        time.sleep(0.05)
    new_pid = worker_pids(p)[-1]
    assert _s_client(pki, port, version, sess_in=sess)
    assert reused_pids(p) == {new_pid}


# ---------------------------------------------------------------------------------------------
# -t

def _dash_t(p):
    return subprocess.run(p.command + ["-t", "-c", str(p.conf_path)], capture_output=True,
                          text=True, timeout=30, cwd=str(REPO))


@pytest.mark.parametrize("size", [0, 47, 49, 79, 81, 128])
def test_wrong_key_size_is_a_config_error(pki, tmp_path, size):
    bad = _key(tmp_path, "bad", size)
    good = _key(tmp_path, "good", 80)
    p = ProxyProcess(tmp_path, {"servers": {"p": tls_block(pki, free_port(), [good, bad])}},
                     start=False, name="badkey")
    r = _dash_t(p)
    assert r.returncode != 0
    line = line_of(p.conf_path, "ssl_session_ticket_key")
    want = '"%s" must be 48 or 80 bytes in %s:%d' % (bad, p.conf_path, line)
    assert want in r.stderr, r.stderr


def test_missing_key_file_is_a_config_error(pki, tmp_path):
    missing = str(tmp_path / "missing")
    p = ProxyProcess(tmp_path, {"servers": {"p": tls_block(pki, free_port(), [missing])}},
                     start=False, name="nokey")
    r = _dash_t(p)
    assert r.returncode != 0
    assert 'open() "%s" failed (2: No such file or directory) in %s:%d' % (
        missing, p.conf_path, line_of(p.conf_path, "ssl_session_ticket_key")) in r.stderr, r.stderr


def test_good_key_files_pass_dash_t(pki, tmp_path):
    p = ProxyProcess(tmp_path, {"servers": {"p": tls_block(
        pki, free_port(), [_key(tmp_path, "a", 48), _key(tmp_path, "b", 80)])}},
        start=False, name="goodkeys")
    r = _dash_t(p)
    assert r.returncode == 0, r.stderr


def test_key_file_without_the_native_layer_is_a_config_error(pki, tmp_path):
    p = ProxyProcess(tmp_path, {"servers": {"p": tls_block(pki, free_port(),
                                                           [_key(tmp_path, "k", 80)])}},
                     start=False, name="nonative")
    env = dict(os.environ, MAILPROXY_NO_NATIVE_TLS="1")
    r = subprocess.run(p.command + ["-t", "-c", str(p.conf_path)], capture_output=True,
                       text=True, timeout=30, cwd=str(REPO), env=env)
    assert r.returncode != 0
    assert '"ssl_session_ticket_key" cannot be honoured' in r.stderr, r.stderr
    assert "in %s:%d" % (p.conf_path, line_of(p.conf_path, "ssl_session_ticket_key")) \
        in r.stderr, r.stderr
