"""A reload (HUP) or a graceful stop (QUIT) never cuts a relayed session unless
`worker_shutdown_timeout` is set, as nginx (its default is no limit)."""

import signal
import time

from mailproxy import config
from tests.support.process import Setup, free_port, server_block


def test_worker_shutdown_timeout_default_is_no_limit(tmp_path):
    path = tmp_path / "m.ini"
    path.write_text("[server p]\nlisten = 127.0.0.1:1110\nprotocol = pop3\n"
                    "proxy_pass = 127.0.0.1:1\n")
    cfg = config.load(str(path))
    assert cfg.main.worker_shutdown_timeout is None
    assert not [l for l in cfg.dump().splitlines() if l.startswith("worker_shutdown_timeout")]


def start(proxy_factory, backend, main=None):
    port = free_port()
    block = server_block("pop3", port, timeout="2s", proxy_pass=f"127.0.0.1:{backend.port}")
    p = proxy_factory({"main": main or {}, "servers": {"pop3": block}})
    st = Setup(p, "127.0.0.1", port, None, backend)
    c = st.connect()
    c.send(b"USER alice\r\n")
    assert c.readline().startswith(b"+OK")
    c.send(b"PASS secret\r\n")
    assert c.readline().startswith(b"+OK")
    p.wait_log("client logged in")
    return p, c


def test_relayed_session_survives_reload_with_the_default(proxy_factory, pop3_backend):
    p, c = start(proxy_factory, pop3_backend)
    p.signal(signal.SIGHUP)
    p.wait_log("gracefully shutting down")
    for _ in range(6):              # 1.5 s, three times the limit the test below sets
        time.sleep(0.25)
        c.send(b"NOOP\r\n")
        assert c.readline().startswith(b"+OK")
    assert "shutdown timeout" not in p.log_text()
    c.send(b"QUIT\r\n")
    assert c.readline().startswith(b"+OK")
    p.wait_log("proxied session done")


def test_relayed_session_cut_at_the_limit_when_set(proxy_factory, pop3_backend):
    p, c = start(proxy_factory, pop3_backend, main={"worker_shutdown_timeout": "500ms"})
    t = time.monotonic()
    p.signal(signal.SIGHUP)
    p.wait_log("gracefully shutting down")
    assert c.closed(timeout=4)
    assert 0.4 < time.monotonic() - t < 3
    p.wait_log("shutdown timeout")
