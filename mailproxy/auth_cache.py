"""`auth_http_cache = valid=TIME invalid=TIME size=N` (ours): auth_http answers kept per worker.

An answer is looked up by (server block, protocol, user, keyed hash of the password): the hash
is an HMAC-SHA256 with a key drawn at random in each worker, so the password itself is never
kept and the digests mean nothing outside this process. Auth-Status OK answers are kept
`valid` seconds, refusals `invalid` seconds, answers with Auth-Wait never; at most `size`
entries, the oldest go first. Token logins (oauthbearer, xoauth2), EXTERNAL, the salted
APOP/CRAM-MD5 and SMTP without AUTH are never cached (README "auth_http client").
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ['Cache', 'CACHED_METHODS']

CACHED_METHODS = frozenset({'plain', 'login'})
_SAME = object()            # a cached Auth-Pass that was the client's own password


class Cache:
    """One worker's cache (thread-safe). `clock` is replaced by tests."""

    def __init__(self, valid: float, invalid: float, size: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.valid, self.invalid, self.size = valid, invalid, size
        self.clock = clock
        self._key = os.urandom(32)
        self._entries: 'collections.OrderedDict[tuple, Tuple[float, Any, Any]]' = \
            collections.OrderedDict()
        self._users: Dict[tuple, set] = {}      # (server, protocol, user) -> its keys
        self._lock = threading.Lock()

    def key(self, server: Any, req: Any) -> Optional[tuple]:
        """The entry's key for request `req` of server block `server`, or None when this
        login is not cached (its method)."""
        if req.method not in CACHED_METHODS:
            return None
        user, passwd = bytes(req.user or b''), bytes(req.passwd or b'')
        digest = hmac.new(self._key, b'%d:%s:%s' % (len(user), user, passwd),
                          hashlib.sha256).digest()
        return (id(server), req.protocol, user, digest)

    def get(self, key: tuple, passwd: bytes) -> Optional[Any]:
        """The cached AuthResult, or None (never cached, expired)."""
        now = self.clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires, result, backend_pass = entry
            if now >= expires:
                self._drop(key)
                return None
        if backend_pass is _SAME:
            return replace(result, passwd=passwd)
        return result

    def put(self, key: tuple, result: Any, passwd: bytes) -> bool:
        """Keep `result` (an AuthResult 'OK' or 'FAIL') for this key; False when it is not
        to be cached (Auth-Wait, or a zero time for its kind)."""
        if result.wait is not None:
            return False
        ttl = self.valid if result.status == 'OK' else self.invalid
        if ttl <= 0:
            return False
        backend_pass = result.passwd
        if backend_pass is not None and passwd and hmac.compare_digest(backend_pass, passwd):
            # an Auth-Pass equal to the client's password: keep a mark, not the password
            backend_pass = _SAME
            result = replace(result, passwd=None)
        else:
            backend_pass = None
        with self._lock:
            if result.status == 'OK':
                # a password that works now: the user's other passwords are old ones
                for other in list(self._users.get(key[:3], ())):
                    self._drop(other)
            self._drop(key)
            self._entries[key] = (self.clock() + ttl, result, backend_pass)
            self._users.setdefault(key[:3], set()).add(key)
            while len(self._entries) > self.size:
                self._drop(next(iter(self._entries)))
        return True

    def _drop(self, key: tuple) -> None:
        if self._entries.pop(key, None) is None:
            return
        keys = self._users.get(key[:3])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._users[key[:3]]

    def forget(self, user: bytes) -> int:
        """Drop every entry of `user` (mailproxy kick USER); returns how many."""
        with self._lock:
            keys = [k for k in self._entries if k[2] == user]
            for k in keys:
                self._drop(k)
        return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._users.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
