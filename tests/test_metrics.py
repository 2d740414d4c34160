"""`metrics_listen`: GET /metrics of the whole instance (metrics.py, metrics_http.py) with two
workers: logins through both summed, OpenMetrics negotiation, 404/405/400, counts kept when a
worker is restarted, the output checked by Debian's `promtool check metrics` and scraped by a
real Prometheus server (Debian's `prometheus`, started here on loopback)."""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.support.common import wait_for
from tests.support.mailbackends import Pop3Backend
from tests.support.process import free_port, server_block
from tests.support.scrape import request, scrape, value

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
LOGGED_IN = re.compile(r"\] (\d+)#\d+: .*client logged in")


@pytest.fixture
def instance(proxy_factory, auth_server, backend_factory):
    """(proxy, mail port, metrics port): two workers, POP3 through the auth service."""
    backend = backend_factory(Pop3Backend, users={"alice": "secret"})
    auth_server.route_to(backend.port, server=backend.host)
    port, mport = free_port(), free_port()
    block = server_block("pop3", port, auth_http=auth_server.url, timeout="5s")
    proxy = proxy_factory({"main": {"worker_processes": 2,
                                    "metrics_listen": f"127.0.0.1:{mport}"},
                           "servers": {"pop3": block}})
    wait_for(lambda: scrape(mport)[0] == 200, 5, what="the metrics answer")
    return proxy, port, mport


def pop3_login(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rwb")
        assert f.readline().startswith(b"+OK")
        for cmd in (b"USER alice", b"PASS secret", b"QUIT"):
            f.write(cmd + b"\r\n")
            f.flush()
            assert f.readline().startswith(b"+OK"), cmd
        f.close()


def login_through_both_workers(proxy, port, limit=40):
    """Log in until two workers have each logged one in; the number of logins."""
    n = 0
    deadline = time.monotonic() + 20
    while n < limit and time.monotonic() < deadline:
        pop3_login(port)
        n += 1
        wait_for(lambda: len(LOGGED_IN.findall(proxy.log_text())) == n, 5,
                 what="login %d logged" % n)
        if n >= 2 and len(set(LOGGED_IN.findall(proxy.log_text()))) == 2:
            return n
    pytest.fail("%d logins all went to one worker" % n)


OK = 'mailproxy_logins_total{protocol="pop3",result="ok"}'


def test_logins_through_both_workers_are_summed(instance):
    proxy, port, mport = instance
    n = login_through_both_workers(proxy, port)
    # the sessions' ends (bytes, relayed gauge) are counted by the relay thread just after
    wait_for(lambda: value(scrape(mport)[2], 'mailproxy_relayed_sessions{protocol="pop3"}') == 0
             and value(scrape(mport)[2], OK) == n, 5, what="the logins counted")
    for _ in range(6):                  # whichever worker answers, the sums are the instance's
        status, ctype, text = request(mport)
        assert status == 200 and ctype == "text/plain; version=0.0.4; charset=utf-8"
        assert value(text, OK) == n
        assert value(text, "mailproxy_connections_accepted_total") == n
        assert value(text, "mailproxy_auth_http_duration_seconds_count") == n
        assert value(text, 'mailproxy_auth_http_duration_seconds_bucket{le="+Inf"}') == n
        assert value(text, "mailproxy_backend_connect_duration_seconds_count") == n
        assert value(text, 'mailproxy_relayed_bytes_total{direction="client_to_backend"}') > 0
        assert value(text, 'mailproxy_relayed_bytes_total{direction="backend_to_client"}') > 0
        assert value(text, 'mailproxy_prelogin_sessions{protocol="pop3"}') == 0
        assert value(text, "mailproxy_worker_processes") == 2
        assert value(text, "mailproxy_threads") >= 4
        assert 'mailproxy_build_info{version="' in text


def test_openmetrics_when_the_scraper_asks(instance):
    _proxy, _port, mport = instance
    status, ctype, text = request(mport, headers={"Accept": PROMETHEUS_ACCEPT})
    assert status == 200
    assert ctype == "application/openmetrics-text; version=1.0.0; charset=utf-8"
    assert text.endswith("\n# EOF\n")
    assert "# TYPE mailproxy_logins counter\n" in text     # the family without _total
    assert 'mailproxy_logins_total{protocol="pop3",result="ok"} 0' in text
    status, ctype, text = request(mport, headers={"Accept": "text/plain"})
    assert ctype.startswith("text/plain; version=0.0.4") and "# EOF" not in text
    assert "# TYPE mailproxy_logins_total counter\n" in text


def test_nothing_else_is_served(instance):
    _proxy, _port, mport = instance
    assert request(mport, path="/")[0] == 404
    assert request(mport, path="/metrics/x")[0] == 404
    assert request(mport, method="POST")[0] == 405
    assert request(mport, method="HEAD")[0] == 200
    with socket.create_connection(("127.0.0.1", mport), timeout=5) as s:
        s.sendall(b"nonsense\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", mport), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000)   # no end in 8 KB
        assert s.recv(100).startswith(b"HTTP/1.1 400 ")


def test_a_restarted_worker_keeps_the_counts(instance):
    proxy, port, mport = instance
    pop3_login(port)
    pop3_login(port)
    wait_for(lambda: value(scrape(mport)[2], OK) == 2, 5, what="two logins counted")
    victim = int(LOGGED_IN.findall(proxy.log_text())[0])
    os.kill(victim, signal.SIGKILL)     # a worker of the proxy this test started
    proxy.wait_log("worker process %d exited on signal 9" % victim)
    wait_for(lambda: value(scrape(mport)[2], "mailproxy_worker_restarts_total") == 1
             and value(scrape(mport)[2], "mailproxy_worker_processes") == 2, 5,
             what="the worker restarted")
    assert value(request(mport)[2], OK) == 2       # counters only grow
    pop3_login(port)
    wait_for(lambda: value(scrape(mport)[2], OK) == 3, 5, what="the third login counted")


def test_promtool_accepts_the_output(instance):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package)")
    proxy, port, mport = instance
    pop3_login(port)
    wait_for(lambda: value(scrape(mport)[2], OK) == 1, 5, what="the login counted")
    text = request(mport)[2]
    run = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                         capture_output=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not run.stdout.strip() and not run.stderr.strip()    # no lint remark either


def test_prometheus_scrapes_the_counters(instance, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (Debian's prometheus package)")
    proxy, port, mport = instance
    pop3_login(port)
    pop3_login(port)
    wait_for(lambda: value(scrape(mport)[2], OK) == 2, 5, what="two logins counted")
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                      "scrape_configs:\n  - job_name: mailproxy\n    static_configs:\n"
                      "      - targets: ['127.0.0.1:%d']\n" % mport)
    web = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen([prometheus, "--config.file=%s" % config,
                             "--storage.tsdb.path=%s" % (tmp_path / "tsdb"),
                             "--web.listen-address=127.0.0.1:%d" % web],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = ("http://127.0.0.1:%d/api/v1/query?query=sum(mailproxy_logins_total"
               "%%7Bresult%%3D%%22ok%%22%%7D)" % web)
        seen = []

        def counted():
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    answer = json.load(r)
            except (OSError, ValueError):
                return False
            seen[:] = [answer]
            result = answer.get("data", {}).get("result", [])
            return bool(result) and float(result[0]["value"][1]) == 2
        try:
            wait_for(counted, 20, interval=0.2, what="Prometheus' query answering 2 logins")
        except AssertionError:
            raise AssertionError("last answer: %s; log: %s" % (
                seen, (tmp_path / "prometheus.log").read_text()[-2000:])) from None
        with urllib.request.urlopen("http://127.0.0.1:%d/api/v1/targets" % web, timeout=2) as r:
            target = json.load(r)["data"]["activeTargets"][0]
        assert target["health"] == "up", target
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(5)
        log.close()


def test_reload_keeps_the_counts_and_moves_the_address(instance):
    proxy, port, mport = instance
    pop3_login(port)
    wait_for(lambda: value(scrape(mport)[2], OK) == 1, 5, what="the login counted")
    new = free_port()
    proxy.conf_path.write_text(proxy.config_text.replace("127.0.0.1:%d" % mport,
                                                         "127.0.0.1:%d" % new))
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: scrape(new)[0] == 200, 5, what="metrics on the new address")
    assert value(request(new)[2], OK) == 1          # kept across the reload
    pop3_login(port)
    wait_for(lambda: value(scrape(new)[2], OK) == 2, 5, what="a login of the new workers")
    wait_for(lambda: scrape(mport)[0] is None, 5, what="the old address closed")


def test_a_failed_reload_leaves_the_metrics_address(instance):
    proxy, port, mport = instance
    workers = [int(p) for p in re.findall(r"start worker process (\d+)", proxy.log_text())]
    assert len(workers) == 2
    new = free_port()
    with socket.socket() as busy:           # the reload's mail address is taken
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        proxy.conf_path.write_text(
            proxy.config_text.replace("127.0.0.1:%d" % mport, "127.0.0.1:%d" % new)
            .replace("127.0.0.1:%d" % port, "127.0.0.1:%d" % taken))
        proxy.signal(signal.SIGHUP)
        proxy.wait_log("reload failed")
    with pytest.raises(ConnectionRefusedError):     # never bound by the master
        socket.create_connection(("127.0.0.1", new), timeout=5).close()
    # workers started after the failed reload answer on the old address
    for pid in workers:
        os.kill(pid, signal.SIGKILL)        # workers of the proxy this test started
        proxy.wait_log("worker process %d exited on signal 9" % pid)
    wait_for(lambda: value(scrape(mport)[2], "mailproxy_worker_restarts_total") == 2, 5,
             what="both workers restarted, answering on the old address")
