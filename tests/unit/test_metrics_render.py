"""metrics.py without processes: slots summed, a dead worker's gauges zeroed and counters kept,
histograms, the text format and OpenMetrics, Accept negotiation; metrics_http.respond."""

import re
from types import SimpleNamespace

import pytest

from mailproxy import metrics, metrics_http


@pytest.fixture
def area(monkeypatch):
    """A fresh area as the master holds it (this process writes slot 0 until it attaches)."""
    a = metrics.Area(slots=8)
    monkeypatch.setattr(metrics, "_area", a)
    monkeypatch.setattr(metrics, "_mine", 0)
    monkeypatch.setattr(metrics, "_claimed", None)
    return a


def as_worker(pid):
    """What a fork does: the master claims a slot, the child attaches, the master assigns."""
    slot = metrics.claim()
    metrics.attach()
    metrics.assign(pid)
    return slot


def sample(text, name):
    m = re.search(r"^%s (\S+)$" % re.escape(name), text, re.M)
    return m and m.group(1)


def test_workers_slots_are_summed(area):
    assert as_worker(101) == 1
    metrics.login("imap", "ok")
    metrics.count("relayed_bytes", "client_to_backend", n=100)
    assert as_worker(102) == 2
    metrics.login("imap", "ok")
    metrics.login("imap", "failed")
    metrics.count("relayed_bytes", "client_to_backend", n=23)
    text = metrics.render(area.sums(), len(area.workers()))
    assert sample(text, 'mailproxy_logins_total{protocol="imap",result="ok"}') == "2"
    assert sample(text, 'mailproxy_logins_total{protocol="imap",result="failed"}') == "1"
    assert sample(text, 'mailproxy_relayed_bytes_total{direction="client_to_backend"}') == "123"
    assert sample(text, "mailproxy_worker_processes") == "2"
    assert area.workers() == [101, 102]


def test_a_dead_workers_gauges_go_counters_stay(area):
    as_worker(101)
    metrics.count("prelogin_sessions", "pop3", n=3)
    metrics.count("connections_accepted", n=5)
    metrics.threads_now()
    metrics.release(101)
    metrics.restarted()     # counted in the slot this process writes
    sums = area.sums()
    text = metrics.render(sums, len(area.workers()))
    assert sample(text, 'mailproxy_prelogin_sessions{protocol="pop3"}') == "0"
    assert sample(text, "mailproxy_threads") == "0"
    assert sample(text, "mailproxy_connections_accepted_total") == "5"
    assert sample(text, "mailproxy_worker_restarts_total") == "1"
    assert sample(text, "mailproxy_worker_processes") == "0"
    assert as_worker(103) == 1          # the free slot again: its counters go on from 5
    metrics.count("connections_accepted")
    assert sample(metrics.render(area.sums(), 1), "mailproxy_connections_accepted_total") == "6"


def test_no_slot_left_counts_nothing(monkeypatch):
    a = metrics.Area(slots=2)
    monkeypatch.setattr(metrics, "_area", a)
    monkeypatch.setattr(metrics, "_mine", 0)
    monkeypatch.setattr(metrics, "_claimed", None)
    assert as_worker(1) == 1
    assert as_worker(2) is None
    metrics.login("pop3", "ok")         # no slot: nothing, no error
    assert sample(metrics.render(a.sums(), 1),
                  'mailproxy_logins_total{protocol="pop3",result="ok"}') == "0"


def test_off_costs_nothing_and_unknown_labels_are_dropped(monkeypatch, area):
    metrics.login("nntp", "ok")                     # not a protocol of ours
    metrics.count("connections_refused", "other")   # not a refusal reason
    assert sum(area.sums()) == 0
    monkeypatch.setattr(metrics, "_mine", None)
    metrics.login("pop3", "ok")
    metrics.observe("auth_http_duration_seconds", 0.1)
    assert sum(area.sums()) == 0


def test_histogram_is_cumulative_with_count_and_sum(area):
    for seconds in (0.0005, 0.02, 0.02, 3.0, 60.0):
        metrics.observe("backend_connect_duration_seconds", seconds)
    text = metrics.render(area.sums(), 0)
    name = "mailproxy_backend_connect_duration_seconds"
    assert sample(text, name + '_bucket{le="0.001"}') == "1"
    assert sample(text, name + '_bucket{le="0.01"}') == "1"
    assert sample(text, name + '_bucket{le="0.025"}') == "3"
    assert sample(text, name + '_bucket{le="5"}') == "4"
    assert sample(text, name + '_bucket{le="10"}') == "4"
    assert sample(text, name + '_bucket{le="+Inf"}') == "5"
    assert sample(text, name + "_count") == "5"
    assert float(sample(text, name + "_sum")) == pytest.approx(63.0405)


def test_timed_observes_failures_too(area):
    def boom():
        raise ValueError("x")
    with pytest.raises(ValueError):
        metrics.timed("auth_http_duration_seconds", boom)
    assert metrics.timed("auth_http_duration_seconds", lambda a: a + 1, 1) == 2
    text = metrics.render(area.sums(), 0)
    assert sample(text, "mailproxy_auth_http_duration_seconds_count") == "2"


def test_relayed_wraps_the_end_callback(area):
    ended = []

    class Stats:
        bytes_in, bytes_out = 10, 2000
    done = metrics.relayed("smtp", ended.append)
    relayed = 'mailproxy_relayed_sessions{protocol="smtp"}'
    assert sample(metrics.render(area.sums(), 0), relayed) == "1"
    done(Stats)
    text = metrics.render(area.sums(), 0)
    assert ended == [Stats]
    assert sample(text, relayed) == "0"
    assert sample(text, 'mailproxy_relayed_bytes_total{direction="backend_to_client"}') == "2000"


def test_tls_versions(area):
    metrics.tls_handshake("TLSv1.3", True)
    metrics.tls_handshake("TLSv1.2", False)
    metrics.tls_handshake("SSLv3", False)
    text = metrics.render(area.sums(), 0)
    assert sample(text, 'mailproxy_tls_handshakes_total{version="TLSv1.3",resumed="yes"}') == "1"
    assert sample(text, 'mailproxy_tls_handshakes_total{version="TLSv1.2",resumed="no"}') == "1"
    assert sample(text, 'mailproxy_tls_handshakes_total{version="other",resumed="no"}') == "1"


def test_text_format_shape():
    text = metrics.render([0] * metrics.WIDTH, 2, python="3.11.7")
    lines = text.splitlines()
    assert text.endswith("\n") and "# EOF" not in text
    families = [l.split()[2] for l in lines if l.startswith("# TYPE ")]
    assert len(families) == len(set(families))
    for fam in families:
        assert fam.startswith("mailproxy_")
        kind = re.search(r"^# TYPE %s (\w+)$" % fam, text, re.M).group(1)
        assert ("# HELP %s " % fam) in text
        assert fam.endswith("_total") == (kind == "counter")
    for line in lines:
        assert line.startswith("#") or re.match(r'^mailproxy_\w+(\{(\w+="[^"]*",?)+\})? \S+$',
                                                line)
    assert sample(text, 'mailproxy_build_info{version="%s",python="3.11.7"}'
                  % metrics.__version__) == "1"


def test_openmetrics_shape():
    text = metrics.render([0] * metrics.WIDTH, 1, openmetrics=True)
    assert text.endswith("\n# EOF\n") and text.count("# EOF") == 1
    assert "# TYPE mailproxy_logins counter\n# " not in text
    assert "# TYPE mailproxy_logins counter\nmailproxy_logins_total{" in text
    assert "# TYPE mailproxy_worker_restarts counter\nmailproxy_worker_restarts_total 0\n" in text
    assert "_total counter" not in text
    assert "# TYPE mailproxy_auth_http_duration_seconds histogram\n" in text


@pytest.mark.parametrize("accept, om", [
    ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1", True),          # Prometheus 2.x
    ("application/openmetrics-text; version=1.0.0", True),
    ("application/openmetrics-text", True),
    ("text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5", False),
    ("application/openmetrics-text;version=2.0.0", False),
    ("application/openmetrics-text;q=0", False),
    ("text/plain", False), ("*/*", False), ("", False), ("garbage;;q=x", False),
])
def test_accept_negotiation(accept, om):
    assert metrics.wants_openmetrics(accept) is om


def status(response):
    return int(response.split(b" ", 2)[1])


def test_http_answers(area):
    ok = metrics_http.respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(ok) == 200 and b"Content-Type: text/plain; version=0.0.4" in ok
    head, body = ok.split(b"\r\n\r\n", 1)
    assert b"Content-Length: %d\r\n" % len(body) in head and b"mailproxy_logins_total" in body
    om = metrics_http.respond(b"GET /metrics?x=1 HTTP/1.0\r\nAccept: application/openmetrics-"
                              b"text;version=1.0.0\r\n\r\n")
    assert b"application/openmetrics-text; version=1.0.0" in om and om.endswith(b"# EOF\n")
    head_only = metrics_http.respond(b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status(head_only) == 200 and head_only.endswith(b"\r\n\r\n")
    assert status(metrics_http.respond(b"GET / HTTP/1.1\r\n\r\n")) == 404
    assert status(metrics_http.respond(b"GET /metricsx HTTP/1.1\r\n\r\n")) == 404
    not_allowed = metrics_http.respond(b"POST /metrics HTTP/1.1\r\n\r\n")
    assert status(not_allowed) == 405 and b"Allow: GET, HEAD\r\n" in not_allowed
    for bad in (b"GET /metrics\r\n\r\n", b"GET /metrics HTTP/1.1\r\n", b"\x00\xff\r\n\r\n",
                b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n", b"GET  /metrics HTTP/1.1\r\n\r\n",
                b"GET /metrics SPDY/3\r\n\r\n", b"GET /metrics HTTP/1.1\r\n : x\r\n\r\n"):
        assert status(metrics_http.respond(bad)) == 400, bad



def test_a_slow_scraper_gets_read_timeout_in_all(monkeypatch):
    # one byte a second never ends the head: READ_TIMEOUT bounds the whole read, not each
    # recv (MAX_CLIENTS such clients would otherwise keep every scrape out for hours)
    clock = [1000.0]

    class Trickle:
        def __init__(self):
            self.timeouts = []

        def settimeout(self, t):
            self.timeouts.append(t)

        def recv(self, n):
            clock[0] += 1.0
            return b"G"
    monkeypatch.setattr(metrics_http, "time", SimpleNamespace(monotonic=lambda: clock[0]),
                        raising=False)
    conn = Trickle()
    data = metrics_http._read_request(conn)
    assert data is not None and len(data) <= metrics_http.READ_TIMEOUT + 1
    assert clock[0] - 1000.0 <= metrics_http.READ_TIMEOUT + 1
    assert conn.timeouts and all(0 < t <= metrics_http.READ_TIMEOUT for t in conn.timeouts)


def test_a_failed_fork_gives_its_slot_back(area, monkeypatch):
    import errno
    import os
    from mailproxy.supervisor import Master

    class End:
        closed = False

        def close(self):
            self.closed = True
    ends = (End(), End())

    def no_fork():
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
    monkeypatch.setattr(os, "fork", no_fork)
    master = Master("m.ini", SimpleNamespace())
    master.hub = SimpleNamespace(pair=lambda: ends)
    with pytest.raises(OSError):
        master._spawn()
    assert area.workers() == [] and area.values[metrics.WIDTH + metrics._PID] == 0
    assert all(e.closed for e in ends)             # nor does its channel stay open
    assert as_worker(101) == 1                      # the slot is there for the next fork
