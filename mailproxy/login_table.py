"""The login counts every worker of an instance shares (throttle.py's failures and the
sessions of `limit_sessions_per_user`), in a bounded table of shared memory; no I/O.

As the TLS session cache's zones (tls_cache.py), the table is an anonymous shared `mmap` the
master makes before it forks the first worker (`shared()`), kept for the life of the master, so
every worker of every generation (a reload) reads and writes the same counts; `ProcessLock`
serialises them.  It is a set-associative cache: a key's hash picks a set of WAYS slots, and a
new key takes the set's free slot or else its least recently updated one (the oldest goes
first), so memory is fixed (SETS * WAYS slots of 64 bytes) whatever clients send.

A slot: the key's digest (a keyed BLAKE2b of its kind and text: clients cannot aim keys at one
set), its kind, the pid of the worker holding it (seats only), when it was last updated, and 32
bytes of payload the caller packs.  Sessions of a user (`Seats`) are one total per (protocol,
user) and one count per worker; when a worker dies the master gives back what it held
(`release_pid`), so a crash never leaves a user locked out; it never waits long for the lock
(a worker stopped while holding it): a release not done is retried at its next round.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import threading
import time
from typing import Any, Callable, ContextManager, Iterator, Optional, Set, Tuple

from .tls_cache import ProcessLock

__all__ = ["LoginTable", "Seat", "shared", "ADDRESS", "USER", "SEATS", "SEAT_PID"]

# kinds of slot (0: free)
ADDRESS, USER, SEATS, SEAT_PID = 1, 2, 3, 4

SETS = 2048
WAYS = 8
_MAGIC = b"MPLOGIN1"
_HEAD = 16                                   # the magic, then padding
_SLOT = struct.Struct("<16sB3xid32s")         # digest, kind, pid, updated, payload
_COUNT = struct.Struct("<i")                  # a seat payload: sessions held
PAYLOAD = 32
EMPTY = bytes(PAYLOAD)


class LoginTable:
    """SETS * WAYS slots of shared memory.  `read`, `write`, `delete` and `slots` must be
    called holding `lock` (one lock round for what has to be seen and changed at once); the
    lock has threading.Lock's acquire(timeout=) and release (tls_cache.ProcessLock)."""

    def __init__(self, sets: int = SETS, ways: int = WAYS,
                 lock: Optional[ContextManager[Any]] = None,
                 clock: Callable[[], float] = time.monotonic, secret: Optional[bytes] = None):
        self.sets, self.ways = sets, ways
        self.lock = lock if lock is not None else threading.Lock()
        self.clock = clock
        # keys and password digests are keyed with it: the same in every worker (forked)
        self.secret = secret if secret is not None else os.urandom(16)
        self.mem = mmap.mmap(-1, _HEAD + sets * ways * _SLOT.size)   # MAP_SHARED: forks share
        self.mem[0:len(_MAGIC)] = _MAGIC

    def key(self, kind: int, *parts: bytes) -> bytes:
        """The digest naming a key of `kind` made of `parts` (never stored in clear)."""
        h = hashlib.blake2b(bytes((kind,)), digest_size=16, key=self.secret)
        for p in parts:
            h.update(len(p).to_bytes(4, "little"))
            h.update(p)
        return h.digest()

    def short_hash(self, *parts: bytes) -> int:
        """A 32-bit keyed digest (of a wrong password: throttle.py keeps only this)."""
        h = hashlib.blake2b(b"pw", digest_size=4, key=self.secret)
        for p in parts:
            h.update(len(p).to_bytes(4, "little"))
            h.update(p)
        return int.from_bytes(h.digest(), "little")

    def maybe_holds(self, kind: int, digest: bytes) -> bool:
        """Whether the key may have a slot, read WITHOUT the lock: a login with nothing
        recorded (the common case) then takes no lock at all.  A slot written meanwhile by
        another worker may be missed or misread; callers only skip work on False (as if the
        lookup had come a moment earlier) and read under the lock on True."""
        mem, off = self.mem, self._off
        for i in self._set(digest):
            at = off(i)
            if mem[at:at + 16] == digest and mem[at + 16] == kind:
                return True
        return False

    # -- under the lock ---------------------------------------------------------------------------
    def _set(self, digest: bytes) -> range:
        first = (int.from_bytes(digest[:4], "little") % self.sets) * self.ways
        return range(first, first + self.ways)

    def _off(self, i: int) -> int:
        return _HEAD + i * _SLOT.size

    def _find(self, kind: int, digest: bytes, pid: int) -> int:
        for i in self._set(digest):
            d, k, p, _u, _pl = _SLOT.unpack_from(self.mem, self._off(i))
            if k == kind and d == digest and p == pid:
                return i
        return -1

    def read(self, kind: int, digest: bytes, pid: int = 0) -> Optional[bytes]:
        """The payload of the key, or None."""
        i = self._find(kind, digest, pid)
        return None if i < 0 else _SLOT.unpack_from(self.mem, self._off(i))[4]

    def write(self, kind: int, digest: bytes, payload: bytes, pid: int = 0) -> None:
        """Store the key's payload; a new key takes a free slot of its set, else the oldest
        (sessions held are taken last: losing one only lets one more session in)."""
        i = self._find(kind, digest, pid)
        if i < 0:
            best = None
            for j in self._set(digest):
                _d, k, _p, updated, _pl = _SLOT.unpack_from(self.mem, self._off(j))
                if k == 0:
                    best = (-1, 0.0, j)
                    break
                rank = (1 if k in (SEATS, SEAT_PID) else 0, updated, j)
                if best is None or rank < best:
                    best = rank
            i = best[2]
        _SLOT.pack_into(self.mem, self._off(i), digest, kind, pid, self.clock(),
                        payload.ljust(PAYLOAD, b"\0"))

    def delete(self, kind: int, digest: bytes, pid: int = 0) -> None:
        i = self._find(kind, digest, pid)
        if i >= 0:
            self.mem[self._off(i):self._off(i + 1)] = bytes(_SLOT.size)

    def slots(self) -> Iterator[Tuple[int, bytes, int, int, bytes]]:
        """(index, digest, kind, pid, payload) of every slot in use."""
        for i in range(self.sets * self.ways):
            d, k, p, _u, pl = _SLOT.unpack_from(self.mem, self._off(i))
            if k:
                yield i, d, k, p, pl

    def __len__(self) -> int:
        with self.lock:
            return sum(1 for _ in self.slots())

    # -- sessions per user (limit_sessions_per_user) ----------------------------------------------
    def take_seat(self, protocol: str, user: bytes, limit: int,
                  pid: Optional[int] = None) -> Optional[Seat]:
        """One more session of `user` over `protocol`, or None when `limit` are held already
        (by every worker together)."""
        pid = os.getpid() if pid is None else pid
        total_key = self.key(SEATS, protocol.encode("ascii"), user)
        mine = self.key(SEAT_PID, total_key, pid.to_bytes(4, "little"))
        with self.lock:
            total = _count(self.read(SEATS, total_key))
            if total >= limit:
                return None
            self.write(SEATS, total_key, _COUNT.pack(total + 1))
            own = _count(self.read(SEAT_PID, mine, pid))
            self.write(SEAT_PID, mine, _COUNT.pack(own + 1) + total_key, pid)
        return Seat(self, total_key, mine, pid)

    def held(self, protocol: str, user: bytes) -> int:
        """The sessions `user` holds over `protocol` now (every worker)."""
        with self.lock:
            return _count(self.read(SEATS, self.key(SEATS, protocol.encode("ascii"), user)))

    def _give_back(self, total_key: bytes, mine: bytes, pid: int, n: int) -> None:
        own = _count(self.read(SEAT_PID, mine, pid))
        if own > n:
            self.write(SEAT_PID, mine, _COUNT.pack(own - n) + total_key, pid)
        else:
            self.delete(SEAT_PID, mine, pid)
        total = _count(self.read(SEATS, total_key))
        if total > n:
            self.write(SEATS, total_key, _COUNT.pack(total - n))
        else:
            self.delete(SEATS, total_key)

    def release_pid(self, pid: int, timeout: Optional[float] = None) -> Optional[int]:
        """Give back every session a worker held (it died, or ended); returns how many, or
        None when the lock was not had within `timeout` seconds (None: wait for it)."""
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            return None
        try:
            freed = 0
            held = [(d, pl) for _i, d, k, p, pl in self.slots() if k == SEAT_PID and p == pid]
            for mine, pl in held:
                n = _count(pl)
                self._give_back(pl[_COUNT.size:_COUNT.size + 16], mine, pid, n)
                freed += n
        finally:
            self.lock.release()
        return freed


def _count(payload: Optional[bytes]) -> int:
    return 0 if payload is None else max(0, _COUNT.unpack_from(payload)[0])


class Seat:
    """One session counted for limit_sessions_per_user: given back once, whichever path the
    session ends by (the session before the relay, the relay's end callback after)."""

    __slots__ = ("table", "total_key", "mine", "pid", "released")

    def __init__(self, table: LoginTable, total_key: bytes, mine: bytes, pid: int) -> None:
        self.table, self.total_key, self.mine, self.pid = table, total_key, mine, pid
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        with self.table.lock:
            self.table._give_back(self.total_key, self.mine, self.pid, 1)


_shared: Optional[LoginTable] = None
_pending: Set[int] = set()          # the master's: dead workers whose seats wait for the lock
RELEASE_WAIT = 0.05                 # seconds the master waits for the lock each time


def shared() -> LoginTable:
    """The instance's table: made by the master before it forks (supervisor.Master.run), and
    inherited by every worker; a process without one (tests in process) makes its own."""
    global _shared
    if _shared is None:
        _shared = LoginTable(lock=ProcessLock())
    return _shared


def release_pid(pid: int) -> Optional[int]:
    """The master's hook when a worker exits: what it held is free again.  The master never
    waits long for the lock (a worker stopped while holding it would hang it): None when
    put off to `release_pending`, which the master calls at each round of its loop."""
    if _shared is None:
        return 0
    _pending.add(pid)
    freed = _shared.release_pid(pid, RELEASE_WAIT)
    if freed is not None:
        _pending.discard(pid)
    return freed


def release_pending() -> int:
    """The master, each round: the releases put off so far, as far as the lock allows now;
    returns the sessions given back."""
    freed = 0
    for pid in sorted(_pending):
        n = _shared.release_pid(pid, RELEASE_WAIT) if _shared is not None else 0
        if n is None:
            break
        _pending.discard(pid)
        freed += n
    return freed
