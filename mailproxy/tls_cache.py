"""The shared TLS session cache of `ssl_session_cache shared:NAME:SIZE` (nginx's
ngx_ssl_new_session / ngx_ssl_get_cached_session / ngx_ssl_remove_session), without I/O.

A zone is an anonymous shared `mmap` made by the master before it forks the workers, so a
session one worker stores resumes in every other; the master keeps a zone across reloads while
its NAME and SIZE stay (`zone()`), as nginx keeps its shared zones.  tls_native.py's session
callbacks call `put`, `get` and `remove` with the DER of the session (i2d_SSL_SESSION).

Layout: a header, a hash table of bucket heads, one byte per cell (1: an entry starts here)
and the cells of CELL bytes.  Entries are written one after the other around the cells as a
ring, so the one overwritten is always the oldest (nginx's expire queue drops the oldest
first); an entry is its header (the key digest, expiry, next entry of its bucket, DER length,
cells, CRC) and the DER, CELL-aligned.  A key is the SHA-256 of the session id context
(ngx_ssl_session_id_context) and the session id: sessions never cross server blocks.
A typical TLSv1.2 session (150-200 bytes of DER) takes 4 cells: about 3,900 per megabyte.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
import threading
import time
import zlib
from typing import Any, Callable, ContextManager, Dict, Optional

__all__ = ["SessionStore", "ProcessLock", "zone", "MIN_SIZE", "MAX_DER"]

CELL = 64
MAX_DER = 4096                      # NGX_SSL_MAX_SESSION_SIZE: longer sessions are not cached
MIN_SIZE = 8 * mmap.PAGESIZE        # ngx_mail_ssl_session_cache: "is too small" below
_MAGIC = b"MPSSLC1\0"
_HEAD = struct.Struct("<8sIIII")    # magic, cells, buckets, next cell to write, entries
_ENTRY = struct.Struct("<32sdiHHI")  # digest, expiry, next entry in bucket, DER bytes, cells, CRC
_EHDR = 56                          # _ENTRY.size (52) rounded up to 8
_I32 = struct.Struct("<i")


class ProcessLock:
    """A lock between the threads of a process and between processes: fcntl.lockf on a
    temporary file (unlinked) the master opens before forking.  POSIX record locks are per
    process, so a thread lock (made anew in each process) serialises threads first; a dying
    holder releases its record lock with its process."""

    def __init__(self):
        self._file = tempfile.TemporaryFile(prefix="mailproxy-sslcache-")
        self._threads = threading.Lock()
        # a forked worker starts with a fresh thread lock, before any of its threads runs
        # (never one a thread of the master held at the fork)
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self):
        self._threads = threading.Lock()

    def __enter__(self):
        self._threads.acquire()
        try:
            fcntl.lockf(self._file, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """As threading.Lock's: within `timeout` seconds (retrying the record lock without
        blocking), for a caller that must never wait on a stopped holder (the master)."""
        if blocking and timeout < 0:
            self.__enter__()
            return True
        deadline = time.monotonic() + max(0.0, timeout if blocking else 0.0)
        if not self._threads.acquire(True, max(0.0, deadline - time.monotonic())):
            return False
        try:
            while True:
                try:
                    fcntl.lockf(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except (BlockingIOError, PermissionError):     # held elsewhere
                    if time.monotonic() >= deadline:
                        break
                time.sleep(0.005)
        except BaseException:
            self._threads.release()
            raise
        self._threads.release()
        return False

    def release(self) -> None:
        try:
            fcntl.lockf(self._file, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def __del__(self):
        self._file.close()


def _key(sid_ctx: bytes, sid: bytes) -> bytes:
    return hashlib.sha256(bytes((len(sid_ctx),)) + sid_ctx + sid).digest()


class SessionStore:
    """Sessions by (session id context, session id) in `size` bytes of shared memory."""

    def __init__(self, size: int, lock: Optional[ContextManager[Any]] = None,
                 clock: Callable[[], float] = time.monotonic):
        if size < _HEAD.size + 4 + 2 * (CELL + 1):
            raise ValueError("a session cache of %d bytes holds nothing" % size)
        self.size = size
        self.lock = lock if lock is not None else threading.Lock()
        self.clock = clock
        self.mem = mmap.mmap(-1, size)          # MAP_SHARED | MAP_ANONYMOUS: forks share it
        avail = size - _HEAD.size
        buckets = 1
        while buckets < avail // (4 * (CELL + 1) + 4):   # about one bucket per 4 cells
            buckets *= 2
        self.buckets = buckets
        self.cells = (avail - 4 * buckets) // (CELL + 1)
        self._kind = _HEAD.size + 4 * buckets               # one byte per cell
        self._data = self._kind + self.cells
        self.mem[_HEAD.size:self._kind] = b"\xff" * (4 * buckets)    # every bucket empty: -1
        _HEAD.pack_into(self.mem, 0, _MAGIC, self.cells, buckets, 0, 0)

    # -- the interface (each call takes the lock once) ------------------------------------------
    def put(self, sid_ctx: bytes, sid: bytes, der: bytes, timeout: float) -> bool:
        """Store a session for `timeout` seconds; False when it is not cached (too long)."""
        need = max(2, -(-(_EHDR + len(der)) // CELL))
        if not sid or len(sid) > 32 or len(der) > MAX_DER or need > self.cells:
            return False
        key = _key(sid_ctx, sid)
        crc = zlib.crc32(der)
        with self.lock:
            found = self._find(key)
            if found >= 0:
                self._unlink(found)
            at = self._next()
            if at + need > self.cells:          # no room before the end: the tail is oldest
                self._evict(at, self.cells)
                at = 0
            self._evict(at, at + need)
            b = self._bucket(key)
            _ENTRY.pack_into(self.mem, self._cell(at), key, self.clock() + timeout,
                             self._get_bucket(b), len(der), need, crc)
            start = self._cell(at) + _EHDR
            self.mem[start:start + len(der)] = der
            self.mem[self._kind + at] = 1
            self._set_bucket(b, at)
            self._set_next((at + need) % self.cells, +1)
        return True

    def get(self, sid_ctx: bytes, sid: bytes) -> Optional[bytes]:
        """The DER of an unexpired session, or None (an expired one is dropped)."""
        key = _key(sid_ctx, sid)
        with self.lock:
            at = self._find(key)
            if at < 0:
                return None
            _k, expire, _n, length, _c, crc = _ENTRY.unpack_from(self.mem, self._cell(at))
            start = self._cell(at) + _EHDR
            der = self.mem[start:start + length]
            if expire <= self.clock() or zlib.crc32(der) != crc:
                self._unlink(at)
                return None
            return der

    def remove(self, sid_ctx: bytes, sid: bytes) -> bool:
        key = _key(sid_ctx, sid)
        with self.lock:
            at = self._find(key)
            if at >= 0:
                self._unlink(at)
            return at >= 0

    def __len__(self) -> int:
        return _HEAD.unpack_from(self.mem, 0)[4]

    # -- under the lock ---------------------------------------------------------------------------
    def _cell(self, at):
        return self._data + at * CELL

    def _bucket(self, key):
        return int.from_bytes(key[:4], "little") & (self.buckets - 1)

    def _get_bucket(self, b):
        return _I32.unpack_from(self.mem, _HEAD.size + 4 * b)[0]

    def _set_bucket(self, b, at):
        _I32.pack_into(self.mem, _HEAD.size + 4 * b, at)

    def _next(self):
        at = _HEAD.unpack_from(self.mem, 0)[3]
        return at if 0 <= at < self.cells else 0

    def _set_next(self, at, counted):
        magic, cells, buckets, _at, n = _HEAD.unpack_from(self.mem, 0)
        _HEAD.pack_into(self.mem, 0, magic, cells, buckets, at, max(0, n + counted))

    def _entry_ok(self, at):
        return 0 <= at < self.cells and self.mem[self._kind + at] == 1

    def _find(self, key):
        at, hops = self._get_bucket(self._bucket(key)), 0
        while self._entry_ok(at) and hops <= self.cells:
            k, _e, nxt, _l, _c, _crc = _ENTRY.unpack_from(self.mem, self._cell(at))
            if k == key:
                return at
            at, hops = nxt, hops + 1
        return -1

    def _unlink(self, at):
        """Take the entry at cell `at` out of its bucket's chain and free its cells."""
        key, _e, nxt, _l, _c, _crc = _ENTRY.unpack_from(self.mem, self._cell(at))
        b = self._bucket(key)
        cur, prev, hops = self._get_bucket(b), -1, 0
        while self._entry_ok(cur) and cur != at and hops <= self.cells:
            prev, hops = cur, hops + 1
            cur = _ENTRY.unpack_from(self.mem, self._cell(cur))[2]
        if cur == at:
            if prev < 0:
                self._set_bucket(b, nxt)
            else:
                _I32.pack_into(self.mem, self._cell(prev) + 40, nxt)    # the `next` field
        self.mem[self._kind + at] = 0
        self._set_next(self._next(), -1)

    def _evict(self, lo, hi):
        """Drop every entry starting in cells [lo, hi): the oldest, about to be overwritten."""
        for at in range(lo, hi):
            if self.mem[self._kind + at] == 1:
                self._unlink(at)


# ---------------------------------------------------------------------------------------------
# the zones of this instance

_zones: Dict[str, SessionStore] = {}


def zone(name: str, size: int) -> SessionStore:
    """The zone NAME of SIZE bytes: the one already made when its size is the same (so a
    reload keeps the sessions), else a new one (the old workers keep theirs until they end).
    Called while the master builds the TLS contexts, before any fork."""
    z = _zones.get(name)
    if z is None or z.size != size:
        z = _zones[name] = SessionStore(size, ProcessLock())
    return z
