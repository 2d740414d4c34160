"""The shared TLS session store (mailproxy/tls_cache.py) on its own: no socket, no fork.

Keys are (session id context, session id); SIZE bounds what it holds, the oldest going first;
expired, corrupted, removed and too long sessions are never returned."""

import threading

import pytest

from mailproxy import tls_cache
from mailproxy.tls_cache import CELL, MAX_DER, ProcessLock, SessionStore

CTX = b"\x01" * 20


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def der(i, n=200):
    return (b"%08d" % i) * (n // 8)


def sid(i):
    return b"%032d" % i


def test_round_trip_and_keys_per_context():
    s = SessionStore(tls_cache.MIN_SIZE)
    assert s.put(CTX, sid(1), der(1), 300)
    assert s.get(CTX, sid(1)) == der(1)
    assert s.get(b"\x02" * 20, sid(1)) is None        # another server block's context
    assert s.get(CTX, sid(2)) is None
    assert s.put(CTX, sid(1), der(9), 300)            # the same key replaced, not doubled
    assert s.get(CTX, sid(1)) == der(9) and len(s) == 1
    assert s.remove(CTX, sid(1)) and not s.remove(CTX, sid(1))
    assert s.get(CTX, sid(1)) is None and len(s) == 0


def test_expired_sessions_are_dropped():
    clock = Clock()
    s = SessionStore(tls_cache.MIN_SIZE, clock=clock)
    s.put(CTX, sid(1), der(1), 300)
    clock.now += 299
    assert s.get(CTX, sid(1)) == der(1)
    clock.now += 1
    assert s.get(CTX, sid(1)) is None and len(s) == 0


def test_too_long_sessions_and_ids_are_not_cached():
    s = SessionStore(tls_cache.MIN_SIZE)
    assert not s.put(CTX, sid(1), b"x" * (MAX_DER + 1), 300)
    assert not s.put(CTX, b"i" * 33, der(1), 300)
    assert not s.put(CTX, b"", der(1), 300)
    assert s.put(CTX, sid(1), b"x" * MAX_DER, 300)
    assert s.get(CTX, sid(1)) == b"x" * MAX_DER


def test_a_tiny_zone_evicts_the_oldest_first():
    s = SessionStore(4096)
    per = -(-(56 + 200) // CELL)
    room = s.cells // per
    assert 5 <= room < 20
    for i in range(room * 3 + 1):
        assert s.put(CTX, sid(i), der(i), 300)
        held = [k for k in range(i + 1) if s.get(CTX, sid(k)) is not None]
        # exactly the newest ones, as many as fit (the ring may leave a tail unused)
        assert held == list(range(i + 1 - len(held), i + 1)), (i, held)
        assert len(held) >= min(i + 1, room - 1) and len(s) == len(held)
    assert s.get(CTX, sid(0)) is None


def test_mixed_sizes_keep_the_chains_consistent():
    s = SessionStore(8192)
    sizes = [40, 700, 120, 1500, 200, 64, 3000, 90]
    for i in range(200):
        s.put(CTX, sid(i), der(i, sizes[i % len(sizes)]), 300)
        if i % 7 == 3:
            s.remove(CTX, sid(i - 1))
    held = [k for k in range(200) if s.get(CTX, sid(k)) is not None]
    assert held and held[-1] == 199
    for k in held:
        assert s.get(CTX, sid(k)) == der(k, sizes[k % len(sizes)])


def test_a_corrupted_entry_is_not_returned():
    s = SessionStore(tls_cache.MIN_SIZE)
    s.put(CTX, sid(1), der(1), 300)
    at = s._find(tls_cache._key(CTX, sid(1)))
    s.mem[s._cell(at) + 56 + 10] ^= 0xFF
    assert s.get(CTX, sid(1)) is None


def test_zones_are_kept_while_name_and_size_stay(monkeypatch):
    monkeypatch.setattr(tls_cache, "_zones", {})
    a = tls_cache.zone("SSL", 65536)
    assert tls_cache.zone("SSL", 65536) is a
    assert tls_cache.zone("SSL", 131072) is not a
    assert tls_cache.zone("OTHER", 131072) is not tls_cache.zone("SSL", 131072)


def test_threads_share_a_process_lock():
    s = SessionStore(1 << 20, ProcessLock())
    errors = []

    def work(t):
        try:
            for i in range(300):
                k = t * 1000 + i
                s.put(CTX, sid(k), der(k), 300)
                got = s.get(CTX, sid(k))
                if got not in (None, der(k)):
                    errors.append(k)
        except Exception as e:      # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(s) == 1200


@pytest.mark.parametrize("size", [0, 100])
def test_sizes_that_hold_nothing_are_refused(size):
    with pytest.raises(ValueError):
        SessionStore(size)
