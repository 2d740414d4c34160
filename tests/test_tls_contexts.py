"""The TLS steps without a session: `tls_contexts.prepare` (every TLS context of a loaded
configuration, at start, `-t` and reload alike) and the `Handshake` that `tls.handshake`
returns for the session to apply, on a socket pair."""

import errno
import socket
import ssl
import threading
import time

import pytest

from mailproxy import backend, config, tls, tls_contexts, tls_native
from mailproxy.protocols import PROTOCOLS
from tests.support.process import ini
from mailproxy.supervisor import load_config


def write(tmp_path, **servers):
    path = tmp_path / "t.ini"
    path.write_text(ini(servers=servers))
    return str(path)


def line_of(path, key):
    with open(path) as f:
        return next(n for n, text in enumerate(f, 1) if text.startswith(key + " ="))


def tls_block(pki, port=10995, **extra):
    block = {"listen": "127.0.0.1:%d ssl" % port, "protocol": "pop3",
             "proxy_pass": "127.0.0.1:110",
             "ssl_certificate": pki.server_rsa[0], "ssl_certificate_key": pki.server_rsa[1]}
    block.update(extra)
    return block


# ---------------------------------------------------------------------------------------------
# prepare

def test_prepare_builds_both_kinds(tmp_path, pki):
    cfg = config.load(write(tmp_path, p=tls_block(pki, proxy_ssl="on",
                                                  proxy_ssl_trusted_certificate=pki.ca)))
    conf = cfg.servers[0]
    with pytest.raises(RuntimeError):
        tls.server_tls(conf)            # loading built nothing
    tls_contexts.prepare(cfg)
    server = tls.server_context(conf)
    assert server.protocol == ssl.PROTOCOL_TLS_SERVER
    client = backend.client_context(conf)
    assert client.protocol == ssl.PROTOCOL_TLS_CLIENT and client.verify_mode == ssl.CERT_REQUIRED
    assert client is backend.client_context(conf)     # kept, never built by a session


def test_prepare_shares_backend_contexts_and_a_reload_builds_new_ones(tmp_path, pki):
    path = write(tmp_path, a=tls_block(pki, 10995, proxy_ssl="on"),
                 b=tls_block(pki, 10996, proxy_ssl="on"),
                 c={"listen": "127.0.0.1:10110", "protocol": "pop3",
                    "proxy_pass": "127.0.0.1:110"})
    first = load_config(path)
    a, b, c = first.servers
    assert backend.client_context(a) is backend.client_context(b)
    assert tls.server_context(a) is not tls.server_context(b)
    assert getattr(c, "_tls", None) is None and getattr(c, "_proxy_ssl_context", None) is None
    again = load_config(path)
    assert tls.server_context(again.servers[0]) is not tls.server_context(a)
    assert backend.client_context(again.servers[0]) is not backend.client_context(a)


def test_load_checks_values_prepare_reads_the_files(tmp_path, pki):
    missing = str(tmp_path / "missing.pem")
    path = write(tmp_path, p=tls_block(pki, ssl_certificate=missing))
    cfg = config.load(path)             # values only: the file is not read yet
    with pytest.raises(config.ConfigError) as ei:
        tls_contexts.prepare(cfg)
    e = ei.value
    assert e.message == ('cannot load certificate "%s": BIO_new_file() failed (2: No such file '
                         "or directory)" % missing)
    assert (e.file, e.line, e.key) == (path, line_of(path, "ssl_certificate"), "ssl_certificate")


@pytest.mark.parametrize("extra,key,message", [
    (dict(proxy_ssl_certificate="nope.pem", proxy_ssl_certificate_key="nope.key"),
     "proxy_ssl_certificate", 'cannot load "proxy_ssl_certificate" '),
    (dict(proxy_ssl_certificate="client.pem"),
     "proxy_ssl_certificate", 'no "proxy_ssl_certificate_key" is defined for '),
    (dict(proxy_ssl_certificate_key="client.key"),
     "proxy_ssl_certificate_key", 'no "proxy_ssl_certificate" is defined for '),
    (dict(proxy_ssl_trusted_certificate="nope-ca.pem"),
     "proxy_ssl_trusted_certificate", 'cannot load "proxy_ssl_trusted_certificate" '),
])
def test_prepare_bad_backend_setting_is_a_config_error(tmp_path, extra, key, message):
    block = {"listen": "127.0.0.1:10110", "protocol": "pop3", "proxy_pass": "127.0.0.1:110",
             "proxy_ssl": "on"}
    block.update(extra)
    path = write(tmp_path, p=block)
    cfg = config.load(path)
    with pytest.raises(config.ConfigError) as ei:
        tls_contexts.prepare(cfg)
    e = ei.value
    assert e.message.startswith(message)
    assert (e.file, e.line, e.key) == (path, line_of(path, key), key)
    assert str(e) == "%s in %s:%d" % (e.message, path, e.line)


# ---------------------------------------------------------------------------------------------
# handshake: a Handshake back, nothing done to a session

class Log(list):
    def __call__(self, level, message, err=None):
        self.append((level, message, err))


def prepared(tmp_path, pki, **extra):
    cfg = load_config(write(tmp_path, p=tls_block(pki, **extra)))
    return cfg.servers[0]


def client_side(sock, ctx, data=None):
    """A TLS client (or a plain writer of `data`) on the other end, in a thread."""
    got = []

    def run():
        try:
            if data is not None:
                sock.sendall(data)
                got.append(sock.recv(1))
            else:
                got.append(ctx.wrap_socket(sock, server_hostname="mail.test"))
        except OSError as e:
            got.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def client_ctx(pki):
    return ssl.create_default_context(cafile=pki.ca)


def test_handshake_returns_socket_and_headers(tmp_path, pki):
    conf = prepared(tmp_path, pki)
    ours, theirs = socket.socketpair()
    t, got = client_side(theirs, client_ctx(pki))
    log = Log()
    result = tls.handshake(ours, conf, log, time.monotonic() + 10)
    t.join(10)
    peer = got[0]
    try:
        assert result.ok and result.done and result.reply is None and log == []
        assert isinstance(result.sock, ssl.SSLSocket)
        assert result.sock.gettimeout() == conf.timeout
        headers = dict(result.headers)
        assert result.headers[0] == ("Auth-SSL", "on")
        assert headers["Auth-SSL-Protocol"] == result.sock.version()
        assert headers["Auth-SSL-Cipher"] == result.sock.cipher()[0]
        result.sock.sendall(b"+OK\r\n")             # the returned socket speaks TLS
        assert peer.recv(16) == b"+OK\r\n"
    finally:
        result.sock.close()
        peer.close()


def test_handshake_failure_returns_the_ssl_socket_to_close(tmp_path, pki):
    conf = prepared(tmp_path, pki)
    ours, theirs = socket.socketpair()
    t, got = client_side(theirs, None, data=b"USER alice\r\n" * 8)
    log = Log()
    result = tls.handshake(ours, conf, log, time.monotonic() + 10)
    try:
        assert not result.ok and not result.done and result.reply is None
        assert isinstance(result.sock, ssl.SSLSocket)       # the session owns and closes it
        assert len(log) == 1 and log[0][0] == "info"
        assert log[0][1].startswith("SSL_do_handshake() failed")
    finally:
        result.sock.close()
        t.join(10)
        theirs.close()


def test_handshake_timeout_is_logged_and_returned(tmp_path, pki):
    conf = prepared(tmp_path, pki)
    ours, theirs = socket.socketpair()
    log = Log()
    start = time.monotonic()
    result = tls.handshake(ours, conf, log, start + 0.2)
    try:
        assert time.monotonic() - start < 5
        assert not result.ok and not result.done
        assert log == [("info", "client timed out", errno.ETIMEDOUT)]
    finally:
        result.sock.close()
        theirs.close()


@pytest.mark.skipif(tls_native.native() is None, reason="needs the native OpenSSL layer")
def test_handshake_refused_certificate_returns_the_protocol_line(tmp_path, pki):
    conf = prepared(tmp_path, pki, ssl_verify_client="on", ssl_client_certificate=pki.ca)
    ours, theirs = socket.socketpair()
    t, got = client_side(theirs, client_ctx(pki))
    log = Log()
    result = tls.handshake(ours, conf, log, time.monotonic() + 10)
    t.join(10)
    try:
        assert not result.ok and result.done and result.headers is None
        assert result.reply == PROTOCOLS["pop3"].no_cert
        assert log == [("info", "client sent no required SSL certificate", None)]
    finally:
        result.sock.close()
        if got and not isinstance(got[0], Exception):
            got[0].close()
        theirs.close()


# ---------------------------------------------------------------------------------------------
# the same step on reload (HUP), in a real master

def _served_cert(port, pki):
    ctx = client_ctx(pki)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="mail.test") as s:
            return s.getpeercert(binary_form=True)


def _der(path):
    with open(path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def test_reload_builds_the_contexts_as_the_start(proxy_factory, tmp_path, pki):
    import signal
    from tests.support.process import free_port
    port = free_port()

    def conf(cert, key):
        return {"main": {"worker_processes": "1"},
                "servers": {"p": tls_block(pki, port, ssl_certificate=cert,
                                           ssl_certificate_key=key)}}

    p = proxy_factory(conf(*pki.server_rsa))
    assert _served_cert(port, pki) == _der(pki.server_rsa[0])
    missing = str(tmp_path / "missing.pem")
    p.write_config(conf(missing, pki.server_rsa[1]))
    p.signal(signal.SIGHUP)
    p.wait_log("reload failed")
    line = line_of(str(p.conf_path), "ssl_certificate")
    emerg = [ln for ln in p.log_lines() if "[emerg]" in ln]
    assert len(emerg) == 1 and emerg[0].endswith(
        ': cannot load certificate "%s": BIO_new_file() failed (2: No such file or directory) '
        "in %s:%d" % (missing, p.conf_path, line))
    assert _served_cert(port, pki) == _der(pki.server_rsa[0])      # the old contexts stay
    p.write_config(conf(*pki.server_ec))
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while _served_cert(port, pki) != _der(pki.server_ec[0]):
        assert time.monotonic() < deadline, "the reloaded certificate is never served"
        time.sleep(0.05)
