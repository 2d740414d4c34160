"""GET /metrics of a proxy's `metrics_listen` (tests/test_metrics.py, test_sieve_paths.py)."""

import http.client


def request(mport, method="GET", path="/metrics", headers=None):
    """(status, Content-Type, body) of one request to 127.0.0.1:mport."""
    conn = http.client.HTTPConnection("127.0.0.1", mport, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read().decode()
    finally:
        conn.close()


def scrape(mport, headers=None):
    """As request(); (None, None, "") when nothing answers."""
    try:
        return request(mport, headers=headers)
    except OSError:
        return None, None, ""


def value(text, sample):
    """The value of one sample line (name with its labels, as written), or None."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None
