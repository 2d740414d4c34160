"""The native OpenSSL layer (tls_native.py): pointers validated before OpenSSL sees them, and
with the layer off (MAILPROXY_NO_NATIVE_TLS=1) every directive that needs it is a start error.
"""

import subprocess
import sys
import textwrap

import pytest

from tests.support.common import REPO
from tests.support.process import free_port, ini


def _run(code, env=None, timeout=30):
    import os
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(REPO), env=e,
                          capture_output=True, text=True, timeout=timeout)


# A wrong object layout (simulated by shifting the offsets the layer reads) must give an error,
# never a call into OpenSSL on a bad pointer (a segfault). Run apart: a crash must not kill pytest.
_SHIFTED = """
    import ssl
    from mailproxy import tls
    n = tls.native()
    assert n is not None, tls.native_error()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    n.ssl_ptr(obj)                      # the true layout passes
    n.head += %d                        # now point at a non-pointer field
    try:
        n.%s
    except RuntimeError as e:           # PointerError is a RuntimeError
        print("refused:", e)
    else:
        print("accepted a shifted pointer")
"""


@pytest.mark.parametrize("shift,call", [
    (16, "ctx_ptr(ctx)"),               # PySSLContext: alpn_protocols_len, an int
    (32, "ctx_ptr(ctx)"),               # PySSLContext: check_hostname and protocol, ints
    (16, "ssl_ptr(obj)"),               # PySSLSocket: shutdown_seen_zero / socket_type
])
def test_wrong_layout_is_an_error_not_a_crash(shift, call):
    r = _run(_SHIFTED % (shift, call))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.startswith("refused:"), r.stdout


def test_readable():
    import ctypes
    from mailproxy import tls_native
    buf = ctypes.create_string_buffer(64)
    assert tls_native.readable(ctypes.addressof(buf), 64)
    assert not tls_native.readable(0, 8)
    assert not tls_native.readable(8, 8)                    # page zero is never mapped
    assert not tls_native.readable(ctypes.addressof(buf) + 1, 8)   # misaligned


def test_selftest_covers_the_ssl_pointer():
    from mailproxy import tls_native
    n = tls_native.native()
    assert n is not None, tls_native.native_error()
    calls = []
    real = n.ssl_ptr
    n.ssl_ptr = lambda obj: calls.append(obj) or real(obj)
    try:
        n._selftest()
    finally:
        del n.ssl_ptr
    assert calls


# ---------------------------------------------------------------------------------------------
# the layer forced off

def _config(tmp_path, pki, **extra):
    block = {"listen": "127.0.0.1:%d ssl" % free_port(), "protocol": "pop3",
             "proxy_pass": "127.0.0.1:110",
             "ssl_certificate": pki.server_rsa[0], "ssl_certificate_key": pki.server_rsa[1]}
    block.update(extra)
    path = tmp_path / "n.ini"
    path.write_text(ini(servers={"p": block}))
    return path


def _dash_t(path, off=True):
    return subprocess.run([sys.executable, "-m", "mailproxy", "-t", "-c", str(path)],
                          cwd=str(REPO), capture_output=True, text=True, timeout=30,
                          env=_env(off))


def _env(off):
    import os
    env = dict(os.environ)
    env.pop("MAILPROXY_NO_NATIVE_TLS", None)
    if off:
        env["MAILPROXY_NO_NATIVE_TLS"] = "1"
    return env


@pytest.mark.parametrize("key,extra", [
    ("ssl_verify_client", dict(ssl_verify_client="on")),
    ("ssl_verify_client", dict(ssl_verify_client="optional")),
    ("ssl_verify_client", dict(ssl_verify_client="optional_no_ca")),
    ("ssl_verify_client", dict(ssl_verify_client="on", ssl_verify_depth="3")),
    ("ssl_ecdh_curve", dict(ssl_ecdh_curve="X25519:prime256v1")),
    ("ssl_session_cache", dict(ssl_session_cache="builtin:1000")),
    ("ssl_session_timeout", dict(ssl_session_timeout="10m")),
    ("ssl_conf_command", dict(ssl_conf_command="Options PrioritizeChaCha")),
])
def test_forced_off_makes_dependent_directives_start_errors(tmp_path, pki, monkeypatch, key,
                                                           extra):
    """Loaded as a start and -t load it (supervisor.load_config), the layer off as
    MAILPROXY_NO_NATIVE_TLS=1 leaves it (the environment itself: the -t test below)."""
    from mailproxy import tls_native
    from mailproxy.errors import ConfigError
    from mailproxy.supervisor import load_config
    if extra.get("ssl_verify_client") in ("on", "optional"):
        extra = dict(extra, ssl_client_certificate=pki.ca)
    path = _config(tmp_path, pki, **extra)
    load_config(str(path))                                    # fine with the layer
    monkeypatch.setattr(tls_native, "_native", None)
    monkeypatch.setattr(tls_native, "_native_error", "turned off by %s=1" % tls_native.ENV_OFF)
    with pytest.raises(ConfigError) as ei:
        load_config(str(path))
    assert '"%s" cannot be honoured' % key in ei.value.message
    assert "MAILPROXY_NO_NATIVE_TLS=1" in str(ei.value) and "n.ini:" in str(ei.value)


def test_forced_off_by_the_environment_in_dash_t(tmp_path, pki):
    path = _config(tmp_path, pki, ssl_verify_client="on", ssl_client_certificate=pki.ca)
    assert _dash_t(path, off=False).returncode == 0           # fine with the layer
    r = _dash_t(path)
    assert r.returncode != 0, r.stderr
    assert '"ssl_verify_client" cannot be honoured' in r.stderr, r.stderr
    assert "MAILPROXY_NO_NATIVE_TLS=1" in r.stderr and "n.ini:" in r.stderr


def test_forced_off_plain_tls_still_serves(tmp_path, pki, proxy_factory):
    import socket
    import ssl
    port = free_port()
    block = {"listen": "127.0.0.1:%d ssl" % port, "protocol": "pop3",
             "proxy_pass": "127.0.0.1:%d" % free_port(), "timeout": "2s",
             "ssl_certificate": pki.server_rsa[0], "ssl_certificate_key": pki.server_rsa[1]}
    p = proxy_factory({"servers": {"p": block}}, env={"MAILPROXY_NO_NATIVE_TLS": "1"})
    # the one weaker check, which no directive names, is said at start
    assert "[warn]" in p.wait_log("TLS clients that propose another protocol by ALPN are not")
    ctx = ssl.create_default_context(cafile=pki.ca)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 5),
                         server_hostname="mail.test") as s:
        s.settimeout(5)
        assert s.recv(100) == b"+OK POP3 ready\r\n"
