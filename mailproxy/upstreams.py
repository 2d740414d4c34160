"""Backend pools: `proxy_pass` (and `proxy_map`) with several backends, as nginx's upstream.

- `Backend`: one `host:port` with nginx upstream's parameters (weight, max_fails, fail_timeout,
  backup) and the addresses its name had when the configuration was loaded.
- `rank(backends, user)`: a consistent hash of the user name, weighted rendezvous hashing
  (each backend scores weight / -ln(hash(user, backend)) and the highest wins): a user always
  goes to the same live backend, and adding a backend moves only the users it now wins.
- `Health`: nginx's passive health per backend (ngx_http_upstream_free_round_robin_peer):
  `max_fails` failures within `fail_timeout` mark it down for `fail_timeout`; per worker, as
  nginx's upstream without a `zone` (each worker learns on its own; sharing would need a lock
  across processes for a state a few failed logins rebuild).
- `Upstreams` (Runtime.upstreams): the Health, the choice of the next backend for a login, the
  names re-resolved in the background, and the active check (`proxy_health_check`).

The configuration parses the values (config/pool_parsers.py); nothing here imports config.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import metrics, resolver
from .log import addr_text

DEFAULT_MAX_FAILS = 1
DEFAULT_FAIL_TIMEOUT = 10.0
# names re-resolved while running, with a `resolver` without valid=
RESOLVE_EVERY = 30.0
# the greetings the active check takes as alive, by protocol (any line for others)
# ManageSieve greets with its capability list: every line starts with a quoted name
GREETINGS = {"pop3": (b"+OK",), "imap": (b"* OK", b"* PREAUTH"), "smtp": (b"220",),
             "sieve": (b'"',)}
PROBE_LIMIT = 4096


@dataclass(eq=False)
class Backend:
    host: str                       # IP (normalised) or a name, as written
    port: int
    weight: int = 1
    max_fails: int = DEFAULT_MAX_FAILS
    fail_timeout: float = DEFAULT_FAIL_TIMEOUT
    backup: bool = False
    file: Optional[str] = None      # where it was written (errors of load-time resolution)
    line: Optional[int] = None
    addrs: List[tuple] = field(default_factory=list)   # [(family, sockaddr)]
    resolved: float = 0.0           # time.monotonic() of the last resolution

    @property
    def key(self) -> Tuple[str, int]:
        return (self.host, self.port)

    @property
    def text(self) -> str:
        return addr_text(self.host, self.port)

    def is_name(self) -> bool:
        return literal(self.host) is None

    def tokens(self) -> List[str]:
        """As written in the configuration (the -T dump), defaults left out."""
        out = [self.text]
        if self.weight != 1:
            out.append("weight=%d" % self.weight)
        if self.max_fails != DEFAULT_MAX_FAILS:
            out.append("max_fails=%d" % self.max_fails)
        if self.fail_timeout != DEFAULT_FAIL_TIMEOUT:
            out.append("fail_timeout=%gs" % self.fail_timeout)
        if self.backup:
            out.append("backup")
        return out


def literal(host: str) -> Optional[ipaddress._BaseAddress]:
    try:
        return ipaddress.ip_address(host.split("%")[0] if ":" in host else host)
    except ValueError:
        return None


def lookup(host: str, port: int, conf_resolver: Any, timeout: float) -> List[tuple]:
    """[(family, sockaddr)] of a backend: an IP as is, a name through `resolver` (its DNS
    servers) or the system's resolver (bounded).  Raises resolver.LookupFailed or OSError."""
    ip = literal(host)
    if ip is not None:
        return [_sockaddr(host, port)]
    if conf_resolver is not None and conf_resolver != "system":
        ips = resolver.client_for(conf_resolver).forward(host, timeout)
    else:
        def system():
            return [i[4][0] for i in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
                    if i[0] in (socket.AF_INET, socket.AF_INET6)]
        try:
            ips = resolver.bounded(system, timeout)
        except socket.gaierror as e:
            raise resolver.LookupFailed(resolver.NXDOMAIN, e.strerror or str(e)) from None
    out = []
    for a in ips:
        sa = _sockaddr(a, port)
        if sa not in out:
            out.append(sa)
    if not out:
        raise resolver.LookupFailed(resolver.NXDOMAIN)
    return out


def _sockaddr(ip: str, port: int) -> tuple:
    if ":" in ip:
        return (socket.AF_INET6, (ip, port, 0, 0))
    return (socket.AF_INET, (ip, port))


# ---- the consistent hash -------------------------------------------------------------------

def _score(user: bytes, b: Backend) -> float:
    digest = hashlib.blake2b(user + b"\0" + b.text.encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / 2.0 ** 64        # in (0, 1)
    return b.weight / -math.log(u)


def rank(backends: Sequence[Backend], user: bytes) -> List[Backend]:
    """The user's order of preference: primaries by score, then backups by score."""
    scored = sorted(backends, key=lambda b: (b.backup, -_score(user, b), b.text))
    return scored


# ---- passive health --------------------------------------------------------------------------

class _State:
    __slots__ = ("fails", "checked", "down_until", "marked")

    def __init__(self) -> None:
        self.fails = 0
        self.checked = 0.0
        self.down_until = 0.0
        self.marked = False         # marked down, no success since


class Health:
    """Failures and down marks per backend (host, port) of one worker."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._st: Dict[Tuple[str, int], _State] = {}
        self._lock = threading.Lock()

    def is_down(self, b: Backend, now: Optional[float] = None) -> bool:
        st = self._st.get(b.key)
        return st is not None and st.down_until > (self.clock() if now is None else now)

    def failed(self, b: Backend, force: bool = False) -> bool:
        """A failed connect or greeting; True when it marks the backend down now (the caller
        logs it).  max_fails=0 never marks down (nginx), unless `force` (the active check)."""
        if b.max_fails == 0 and not force:
            return False
        now = self.clock()
        with self._lock:
            st = self._st.get(b.key)
            if st is None:
                st = self._st[b.key] = _State()
            if st.marked or force:
                st.fails = max(b.max_fails, 1)      # back on trial and failed: down again
            else:
                if now - st.checked > b.fail_timeout:
                    st.fails = 0                    # failures count within fail_timeout
                st.fails += 1
            st.checked = now
            if st.fails >= max(b.max_fails, 1):
                newly = st.down_until <= now
                st.down_until = now + b.fail_timeout
                st.marked = True
                return newly
        return False

    def succeeded(self, b: Backend) -> bool:
        """A greeting came; True when the backend had been marked down (up again)."""
        if b.key not in self._st:
            return False
        with self._lock:
            st = self._st.pop(b.key, None)
        return st is not None and st.marked

    def choose(self, backends: Sequence[Backend], user: bytes,
               tried: Sequence[Backend]) -> Optional[Backend]:
        """The next backend for this login: the first live primary of the user's rank not yet
        tried; backups only when every primary is down; when every backend is down, each
        in turn anyway (nginx resets them then).  None when all were tried."""
        now = self.clock()
        order = rank(backends, user)
        untried = [b for b in order if b not in tried]
        if not untried:
            return None
        primaries = [b for b in order if not b.backup]
        for b in untried:
            if b.backup and not all(self.is_down(p, now) for p in primaries):
                break
            if not self.is_down(b, now):
                return b
        if all(self.is_down(b, now) for b in order):
            return untried[0]
        return None


# ---- a worker's pools ------------------------------------------------------------------------

class Upstreams:
    """Runtime.upstreams: the worker's Health, re-resolution of names and the active check."""

    def __init__(self, config: Any, log: Any, stop: threading.Event,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.health = Health(clock)
        self.log = log
        self.stop = stop
        self._resolving: set = set()
        self._lock = threading.Lock()
        targets = []
        for conf in getattr(config, "servers", ()):
            if conf.proxy_health_check:
                for b in all_backends(conf):
                    targets.append((conf, b))
        if targets:
            threading.Thread(target=self._check_loop, args=(targets,), name="health-check",
                             daemon=True).start()

    def choose(self, conf: Any, backends: Sequence[Backend], user: bytes,
               tried: Sequence[Backend]) -> Optional[Backend]:
        b = self.health.choose(backends, user, tried)
        if b is not None:
            self.refresh(conf, b)
        return b

    def failed(self, b: Backend, reason: str, log: Callable[[str, str], None],
               force: bool = False) -> None:
        if self.health.failed(b, force):
            metrics.count("backend_down")
            log("error", "backend %s marked down for %gs: %s" % (b.text, b.fail_timeout, reason))

    def succeeded(self, b: Backend, log: Callable[[str, str], None]) -> None:
        if self.health.succeeded(b):
            log("notice", "backend %s is up again" % b.text)

    # -- names re-resolved in the background, at most every `valid=` (never per login) -----

    def refresh(self, conf: Any, b: Backend) -> None:
        if conf.resolver is None or not b.is_name():
            return
        every = getattr(conf.resolver, "valid", None) or RESOLVE_EVERY
        now = time.monotonic()
        if now - b.resolved < every:
            return
        with self._lock:
            if b in self._resolving:
                return
            self._resolving.add(b)
        threading.Thread(target=self._resolve, args=(conf, b), name="resolve-backend",
                         daemon=True).start()

    def _resolve(self, conf: Any, b: Backend) -> None:
        try:
            b.addrs = lookup(b.host, b.port, conf.resolver, conf.resolver_timeout)
        except (resolver.LookupFailed, OSError) as e:
            # the addresses it had stay: a resolver that fails does not take a backend away
            self.log.log("warn", "backend %s could not be resolved again (%s), kept %d "
                         "address(es)" % (b.text, e, len(b.addrs)))
        finally:
            b.resolved = time.monotonic()
            with self._lock:
                self._resolving.discard(b)

    # -- proxy_health_check: connect, read the greeting --------------------------------------

    def _check_loop(self, targets: list) -> None:
        due = [0.0] * len(targets)
        while not self.stop.is_set():
            now = time.monotonic()
            for i, (conf, b) in enumerate(targets):
                if due[i] <= now and not self.stop.is_set():
                    due[i] = now + conf.proxy_health_check
                    self.probe(conf, b)
            wait = min(due) - time.monotonic()
            if self.stop.wait(max(wait, 0.05)):
                return

    def probe(self, conf: Any, b: Backend) -> bool:
        """One check of `b` as `conf`'s backend: alive when it greets within `timeout`
        (at most the check's interval); marks it down or up."""
        log = self.log.log
        limit = min(conf.timeout, conf.proxy_health_check)
        self.refresh(conf, b)
        try:
            sock = _connect(b, limit)
        except OSError as e:
            self.failed(b, "health check: connect() failed (%s)" % (e.strerror or e), log,
                        force=True)
            return False
        try:
            if conf.proxy_protocol == "on":
                sock.sendall(b"PROXY UNKNOWN\r\n")
            elif conf.proxy_protocol == "v2":   # the LOCAL command: no addresses
                sock.sendall(b"\r\n\r\n\x00\r\nQUIT\n" + b"\x20\x00\x00\x00")
            if conf.proxy_ssl == "on":
                ok = True                       # implicit TLS: the connect is the check
            else:
                greeting = _read_line(sock, limit)
                ok = greeting.startswith(GREETINGS.get(conf.protocol, (b"",))) \
                    and greeting.endswith(b"\n")
        except OSError:
            ok = False
        finally:
            sock.close()
        if ok:
            self.succeeded(b, log)
        else:
            self.failed(b, "health check: no greeting", log, force=True)
        return ok


def _connect(b: Backend, timeout: float) -> socket.socket:
    """The check's connect: each address of `b` in turn, all within `timeout`."""
    deadline = time.monotonic() + timeout
    addrs = b.addrs or [_sockaddr(b.host, b.port)]
    err: OSError = OSError("no address")
    for family, sockaddr in addrs:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(left)
        try:
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            err = e
    raise err


def _read_line(sock: socket.socket, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data and len(data) < PROBE_LIMIT:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        chunk = sock.recv(PROBE_LIMIT - len(data))
        if not chunk:
            break
        data += chunk
    return data


def all_backends(conf: Any) -> List[Backend]:
    """Every backend a server may use: its proxy_pass, or every line of its proxy_map."""
    if conf.proxy_pass:
        return list(conf.proxy_pass)
    pm = getattr(conf, "proxy_map", None)
    return pm.backends() if pm is not None else []
