"""The instance's metrics (`metrics_listen`): counters, gauges and histograms summed over every
worker, rendered in Prometheus' text format 0.0.4 or OpenMetrics 1.0; no sockets here.

The values live in an anonymous shared `mmap` the master makes before it forks the workers
(as tls_cache.py's zones) and keeps across reloads.  The area is a row of slots of 64-bit
integers: slot 0 is the master's (worker restarts), each worker writes only the slot the
master handed it at fork (`claim` before the fork, `attach` in the child), so no lock between
processes is needed; a worker's own threads update under one thread lock.  A worker that dies
leaves its counters in its slot (the next worker started takes a free slot and counts on,
so sums stay monotonic); the master zeroes its gauges (`release`).  Any worker answering a
scrape sums all slots: the answer is the instance's.

A metric is a fixed block of each slot: one value per combination of its label values (a
histogram: its buckets, +Inf, count and sum in microseconds).  Hooks elsewhere call `count`,
`observe` and `timed` by the metric's name; they cost nothing when metrics are off.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import platform
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from . import __version__

__all__ = ["METRICS", "Area", "count", "observe", "timed", "login", "tls_handshake",
           "relayed", "setup", "claim", "assign", "attach", "release", "restarted", "render",
           "TEXT_TYPE", "OPENMETRICS_TYPE"]

T = TypeVar("T")

PROTOCOLS = ("pop3", "imap", "smtp", "sieve")
# the refusals of limits.Admission.admit, Ticket.retarget and listeners.Listener.refuse
REFUSALS = ("worker_connections", "limit_prelogin", "limit_conn_per_ip", "threads")
LOGIN_RESULTS = ("ok", "failed", "throttled", "blocked", "limited", "error")
TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3", "other")
# seconds: a local auth service answers in milliseconds, a slow one within auth_http_timeout
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

SLOTS = 513                 # the master's and 512 workers' (old generations included)
_PID, _THREADS = 0, 1       # each slot's first values: its worker's pid, its thread count
_HEAD = 2


class Metric:
    """One family: name (without `mailproxy_` and a counter's `_total`), type, help, labels
    as (name, allowed values) pairs; `base` is its first value's index in a slot."""

    def __init__(self, name: str, kind: str, help_text: str,
                 labels: Sequence[Tuple[str, Sequence[str]]] = ()):
        self.name, self.kind, self.help = name, kind, help_text
        self.labels = tuple((n, tuple(v)) for n, v in labels)
        self.series = list(itertools.product(*[v for _n, v in self.labels]))
        self._index = {s: i for i, s in enumerate(self.series)}
        self.width = len(BUCKETS) + 3 if kind == "histogram" else 1
        self.base = 0

    def size(self) -> int:
        return len(self.series) * self.width

    def index(self, labels: Tuple[str, ...]) -> Optional[int]:
        i = self._index.get(labels)
        return None if i is None else self.base + i * self.width


METRICS: List[Metric] = [
    Metric("connections_accepted", "counter", "Client connections accepted."),
    Metric("connections_refused", "counter",
           "Client connections refused by a limit, by the limit.", [("reason", REFUSALS)]),
    Metric("prelogin_sessions", "gauge", "Client sessions before login, now.",
           [("protocol", PROTOCOLS)]),
    Metric("relayed_sessions", "gauge", "Logged-in sessions being relayed, now.",
           [("protocol", PROTOCOLS)]),
    Metric("logins", "counter", "Login attempts by result.",
           [("protocol", PROTOCOLS), ("result", LOGIN_RESULTS)]),
    Metric("auth_http_duration_seconds", "histogram",
           "Time of each auth_http request (connect, send, answer)."),
    Metric("auth_http_cache", "counter", "auth_http_cache lookups by result.",
           [("result", ("hit", "miss"))]),
    Metric("backend_connect_duration_seconds", "histogram", "Time to connect to a backend."),
    Metric("backend_errors", "counter",
           "Backend connections or logins that failed (the client got an internal error).",
           [("protocol", PROTOCOLS)]),
    Metric("backend_down", "counter",
           "Pool backends marked down (max_fails failures, or the active check)."),
    Metric("backend_failovers", "counter",
           "Logins moved to the next backend of their pool after a failed connect or greeting."),
    Metric("relayed_bytes", "counter", "Bytes relayed, by direction (counted at session end).",
           [("direction", ("client_to_backend", "backend_to_client"))]),
    Metric("tls_handshakes", "counter", "Client TLS handshakes completed.",
           [("version", TLS_VERSIONS), ("resumed", ("yes", "no"))]),
    Metric("worker_restarts", "counter", "Worker processes restarted after they died."),
]
_BY_NAME: Dict[str, Metric] = {}
_at = _HEAD
for _m in METRICS:
    _m.base = _at
    _at += _m.size()
    _BY_NAME[_m.name] = _m
WIDTH = _at                 # values per slot


class Area:
    """SLOTS slots of WIDTH signed 64-bit values in shared memory (mmap is MAP_SHARED with
    MAP_ANONYMOUS: forked children share it)."""

    def __init__(self, slots: int = SLOTS):
        self.slots = slots
        self.mem = mmap.mmap(-1, slots * WIDTH * 8)
        self.values = memoryview(self.mem).cast("q")

    def slot(self, n: int) -> int:
        return n * WIDTH

    def sums(self) -> List[int]:
        """Every value summed over the slots (the pid field is not a value)."""
        v = self.values
        return [0] + [sum(v[i::WIDTH]) for i in range(1, WIDTH)]

    def workers(self) -> List[int]:
        v = self.values
        return [v[n * WIDTH + _PID] for n in range(1, self.slots) if v[n * WIDTH + _PID] > 0]


# -- this process's state ------------------------------------------------------------------------
_area: Optional[Area] = None
_mine: Optional[int] = None         # index of this process's slot's first value
_claimed: Optional[int] = None      # master: the slot the next forked worker takes
_lock = threading.Lock()


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def setup() -> Area:
    """The master's area, made once (before the first fork that needs it), kept for good;
    the master writes slot 0."""
    global _area, _mine
    if _area is None:
        _area = Area()
        _mine = 0
    return _area


def area() -> Optional[Area]:
    return _area


def claim() -> Optional[int]:
    """Master, before forking a worker: a free slot for it (None: metrics off or all taken)."""
    global _claimed
    _claimed = None
    if _area is not None:
        v = _area.values
        for n in range(1, _area.slots):
            if v[n * WIDTH + _PID] == 0:
                v[n * WIDTH + _PID] = -1         # taken, pid to come
                _claimed = n
                break
    return _claimed


def assign(pid: int) -> None:
    """Master, after the fork: the claimed slot is the worker `pid`'s."""
    if _area is not None and _claimed is not None:
        _area.values[_claimed * WIDTH + _PID] = pid


def unclaim() -> None:
    """Master: the fork failed; the slot claimed for it is free again."""
    global _claimed
    if _area is not None and _claimed is not None:
        _area.values[_claimed * WIDTH + _PID] = 0
    _claimed = None


def attach() -> None:
    """Worker, after the fork: write the slot the master claimed for it (nothing without)."""
    global _mine
    _mine = None if _area is None or _claimed is None else _claimed * WIDTH
    threads_now()


def release(pid: int) -> None:
    """Master: the worker `pid` ended: its slot is free, its gauges zero, its counters kept."""
    if _area is None or pid <= 0:
        return
    v = _area.values
    for n in range(1, _area.slots):
        at = n * WIDTH
        if v[at + _PID] == pid:
            v[at + _THREADS] = 0
            for m in METRICS:
                if m.kind == "gauge":
                    for i in range(m.size()):
                        v[at + m.base + i] = 0
            v[at + _PID] = 0
            return


def restarted() -> None:
    """Master: a worker is started again after it died."""
    count("worker_restarts")


def threads_now() -> None:
    """Record this worker's thread count (at each scrape it answers and periodically)."""
    if _mine is not None and _area is not None:
        _area.values[_mine + _THREADS] = threading.active_count()


# -- the hooks -----------------------------------------------------------------------------------
def count(name: str, *labels: str, n: int = 1) -> None:
    """Add n to a counter or gauge (n < 0: a gauge down) of this process's slot."""
    if _mine is None:
        return
    i = _BY_NAME[name].index(labels)
    if i is not None:
        v = _area.values         # type: ignore[union-attr]
        with _lock:
            v[_mine + i] += n


def observe(name: str, seconds: float) -> None:
    """One observation of a histogram."""
    if _mine is None:
        return
    m = _BY_NAME[name]
    at = _mine + m.base
    b = 0
    while b < len(BUCKETS) and seconds > BUCKETS[b]:
        b += 1
    v = _area.values             # type: ignore[union-attr]
    with _lock:
        v[at + b] += 1                                          # its bucket (+Inf last)
        v[at + len(BUCKETS) + 1] += 1                           # count
        v[at + len(BUCKETS) + 2] += int(round(seconds * 1e6))   # sum, microseconds


def timed(name: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """func(*args, **kwargs), its duration observed in the histogram `name` (failures too)."""
    start = time.monotonic()
    try:
        return func(*args, **kwargs)
    finally:
        observe(name, time.monotonic() - start)


def login(protocol: str, result: str) -> None:
    """A login attempt's result: ok, failed, throttled (delayed by login_penalty: also
    counted by its outcome), blocked (login_block), limited (limit_sessions_per_user) or error."""
    count("logins", protocol, result)


def relayed(protocol: str, on_done: Callable[[Any], None]) -> Callable[[Any], None]:
    """A session handed to the relay: counted now; `on_done` wrapped to uncount it at the end
    and add its bytes (the relay's stats)."""
    count("relayed_sessions", protocol)

    def done(stats: Any) -> None:
        count("relayed_sessions", protocol, n=-1)
        count("relayed_bytes", "client_to_backend", n=stats.bytes_in)
        count("relayed_bytes", "backend_to_client", n=stats.bytes_out)
        on_done(stats)
    return done


def tls_handshake(version: Optional[str], resumed: bool) -> None:
    count("tls_handshakes", version if version in TLS_VERSIONS else "other",
          "yes" if resumed else "no")


# -- rendering ------------------------------------------------------------------------------------
def _num(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    if float(x).is_integer() and abs(x) < 1e15:
        return "%d" % x
    return repr(float(x))


def _labels(pairs: Sequence[Tuple[str, str]]) -> str:
    if not pairs:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
           for k, v in pairs]
    return "{%s}" % ",".join('%s="%s"' % kv for kv in esc)


def render(sums: Sequence[int], workers: int, openmetrics: bool = False,
           python: Optional[str] = None) -> str:
    """The exposition of summed values (Area.sums()); `workers` running worker processes."""
    out: List[str] = []

    def family(name, kind, help_text):
        out.append("# HELP mailproxy_%s %s" % (name, help_text))
        out.append("# TYPE mailproxy_%s %s" % (name, kind))

    for m in METRICS:
        total = m.kind == "counter"
        # OpenMetrics names the counter family without _total, its sample with it
        family(m.name if openmetrics or not total else m.name + "_total", m.kind, m.help)
        sample = "mailproxy_" + m.name + ("_total" if total else "")
        for s, values in enumerate(m.series):
            pairs = list(zip([n for n, _v in m.labels], values))
            at = m.base + s * m.width
            if m.kind != "histogram":
                out.append("%s%s %d" % (sample, _labels(pairs), sums[at]))
                continue
            cum = 0
            for b, le in enumerate(BUCKETS + (math.inf,)):
                cum += sums[at + b]
                out.append("%s_bucket%s %d" % (sample, _labels(pairs + [("le", _num(le))]), cum))
            out.append("%s_count%s %d" % (sample, _labels(pairs), sums[at + len(BUCKETS) + 1]))
            out.append("%s_sum%s %s" % (sample, _labels(pairs),
                                        _num(sums[at + len(BUCKETS) + 2] / 1e6)))
    family("worker_processes", "gauge", "Worker processes running.")
    out.append("mailproxy_worker_processes %d" % workers)
    family("threads", "gauge", "Threads of the worker processes.")
    out.append("mailproxy_threads %d" % sums[_THREADS])
    family("build_info", "gauge", "The version of mailproxy and of Python running it.")
    out.append("mailproxy_build_info%s 1" % _labels(
        [("version", __version__), ("python", python or platform.python_version())]))
    if openmetrics:
        out.append("# EOF")
    return "\n".join(out) + "\n"


def render_area(openmetrics: bool = False) -> str:
    """This instance's exposition (a worker answering a scrape)."""
    threads_now()
    if _area is None:
        return render([0] * WIDTH, 0, openmetrics)
    return render(_area.sums(), len(_area.workers()), openmetrics)


def wants_openmetrics(accept: str) -> bool:
    """Content negotiation: OpenMetrics 1.0 when the Accept header prefers it (Prometheus
    sends `application/openmetrics-text;version=1.0.0,...;q=0.75,text/plain;version=0.0.4;
    q=0.5,*/*;q=0.1`) to the text format."""
    best_om, best_text = -1.0, -1.0
    for item in accept.split(","):
        parts = [p.strip() for p in item.split(";")]
        mtype = parts[0].lower()
        q, version = 1.0, None
        for p in parts[1:]:
            k, _sep, val = p.partition("=")
            k = k.strip().lower()
            val = val.strip().strip('"')
            if k == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
            elif k == "version":
                version = val
        if mtype == "application/openmetrics-text" and version in (None, "1.0.0"):
            best_om = max(best_om, q)
        elif mtype in ("text/plain", "text/*", "*/*"):
            best_text = max(best_text, q)
    return best_om > 0 and best_om >= best_text
