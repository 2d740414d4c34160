"""A worker's auth_http client (Runtime.auth): the answer cache, failover between several
`auth_http` URLs, and the connection pools (auth_pool.py).

Several `auth_http` lines (ours) are tried in order: one that refuses the connection or does
not answer in time is marked down for DOWN_TIME seconds and skipped meanwhile, and the login
goes on to the next, all within auth_http_timeout (each try gets an equal share of what is
left, the last one all of it); when every one is down they are tried anyway, in order. An
answer, whatever it says (an HTTP error status, a malformed header), is the service's: no
failover. The state is this worker's, kept on its Runtime (README "auth_http client").
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List, Optional

from . import auth_http, auth_pool, metrics
from .auth_cache import Cache

__all__ = ['AuthClient', 'DOWN_TIME']

DOWN_TIME = 10.0            # seconds an unreachable auth URL is skipped


class _Bound:
    """auth_http.query's client: the request as framed for this pool, sent through it."""

    def __init__(self, pool: auth_pool.Pool, ctx: Any) -> None:
        self.pool, self.ctx = pool, ctx

    def frame(self, request: bytes) -> bytes:
        return auth_pool.frame(request, self.pool.keepalive > 0)

    def exchange(self, url, request, req, peer, timeout, trace=None):
        return self.pool.exchange(url, request, req, peer, timeout, trace, ctx=self.ctx)


class AuthClient:
    """Thread-safe; `clock` is replaced by tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._pools: Dict[int, auth_pool.Pool] = {}         # by auth_http_keepalive
        self._caches: Dict[int, Cache] = {}                 # by id(ServerConf)
        self._down: Dict[tuple, float] = {}                 # target -> until
        self._lock = threading.Lock()

    def pool(self, keepalive: int) -> auth_pool.Pool:
        with self._lock:
            p = self._pools.get(keepalive)
            if p is None:
                p = self._pools[keepalive] = auth_pool.Pool(keepalive)
            return p

    def cache(self, conf: Any) -> Optional[Cache]:
        if conf.auth_http_cache is None:
            return None
        with self._lock:
            c = self._caches.get(id(conf))
            if c is None:
                valid, invalid, size = conf.auth_http_cache
                c = self._caches[id(conf)] = Cache(valid, invalid, size, self.clock)
            return c

    def forget(self, user: bytes) -> int:
        """Drop the cached answers of `user` in every server block (mailproxy kick USER)."""
        with self._lock:
            caches = list(self._caches.values())
        return sum(c.forget(user) for c in caches)

    def close(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
        for p in pools:
            p.clear()

    # -- failover --

    def order(self, urls: List[Any], ctx: Any) -> List[Any]:
        """The URLs to try: those not marked down, in order; all of them when none is up."""
        now = self.clock()
        with self._lock:
            up = [u for u in urls if self._down.get(auth_pool.Pool.key(u, ctx), 0) <= now]
        return up or list(urls)

    def _mark(self, url: Any, ctx: Any, down: bool) -> bool:
        """Mark `url` down (or up); returns whether it was down before."""
        key = auth_pool.Pool.key(url, ctx)
        with self._lock:
            was = key in self._down
            if down:
                self._down[key] = self.clock() + DOWN_TIME
            else:
                self._down.pop(key, None)
        return was

    # -- one question --

    def query(self, conf: Any, req: auth_http.AuthRequest, *,
              log: Callable[..., Any],
              sleep: Callable[[float], Any] = time.sleep,
              trace: Optional[Callable[[str, list], Any]] = None) -> auth_http.AuthResult:
        """Ask the auth service of server `conf` about `req` (auth_http.query's result and
        errors), through the cache when `auth_http_cache` is set. `log(level, message)` is the
        session's."""
        cache = self.cache(conf)
        key = cache.key(conf, req) if cache is not None else None
        if key is not None:
            hit = cache.get(key, req.passwd)
            metrics.count("auth_http_cache", "hit" if hit is not None else "miss")
            if hit is not None:
                log("debug", "auth_http cache hit", action=False)
                return hit
            log("debug", "auth_http cache miss", action=False)
        result = self._ask(conf, req, log, sleep, trace)
        if key is not None:
            cache.put(key, result, req.passwd)
        return result

    def _ask(self, conf, req, log, sleep, trace):
        ctx = conf._auth_http_tls
        client = _Bound(self.pool(conf.auth_http_keepalive), ctx)
        timeout = conf.auth_http_timeout
        deadline = self.clock() + timeout
        order = self.order(conf.auth_http, ctx)
        for i, url in enumerate(order):
            last = i == len(order) - 1
            share = max(deadline - self.clock(), 0.001) / (len(order) - i)
            try:
                result = auth_http.query(url, req, share, sleep=sleep, trace=trace,
                                         client=client)
            except auth_pool.Unreachable as e:
                self._mark(url, ctx, True)
                if last:
                    raise
                log("error", "%s, marked down for %ds" % (e, DOWN_TIME))
                continue
            except auth_http.AuthHttpError:
                self._mark(url, ctx, False)
                raise
            if self._mark(url, ctx, False):
                log("notice", "auth http server %s answers again" % auth_http.peer_name(url),
                    action=False)
            return result
        raise AssertionError("no auth_http URL")       # order() is never empty
