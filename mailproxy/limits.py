"""What a worker admits: `worker_connections`, `limit_prelogin` and `limit_conn_per_ip`.

No I/O here: the listener asks `Admission` before and after each accept, and each session
carries the `Ticket` it was admitted with until its last socket is closed (by the session
before login, by the relay after).  One Admission per worker process (a reload starts new
workers, so the limits of a new configuration come with them).

Accounting, as nginx's `worker_connections` (every connection a worker holds): a session
counts as two connections from its accept on, its client socket and the backend socket it
will open, so that admitting it can never make a session the worker already holds fail for
want of a connection.
"""

from __future__ import annotations

import ipaddress
import resource     # at import: a worker may not read the stdlib's folder once it drops privileges
import threading
from typing import Any, Dict, Hashable, Optional, Tuple

# What one session holds: its client connection and its backend connection.
PER_SESSION = 2


def address_key(ip: Optional[str]) -> Optional[str]:
    """The unit `limit_conn_per_ip` counts: an IPv4 address, or an IPv6 /64 (one site's
    network: a client may hold a whole /64 and use a new address per connection)."""
    try:
        addr = ipaddress.ip_address(ip)
    except (TypeError, ValueError):
        return ip
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network((int(addr) >> 64 << 64, 64)))
    return str(addr)


class Ticket:
    """One admitted session: released once, whatever path the session ends by."""

    __slots__ = ("adm", "key", "prelogin", "released")

    def __init__(self, adm: Admission, key: Optional[str]) -> None:
        self.adm = adm
        self.key = key              # address_key counted, None when exempt
        self.prelogin = True
        self.released = False

    def retarget(self, ip: str) -> Optional[str]:
        """The session's real client address is now known (PROXY header from a trusted
        balancer): count it instead.  Returns None, or the reason it is over its limit
        (then the ticket is released)."""
        return self.adm._retarget(self, ip)

    def logged_in(self) -> None:
        """Handed over to the relay: no longer a pre-login session."""
        self.adm._logged_in(self)

    def release(self) -> None:
        self.adm._release(self)


class Admission:
    """Counts of one worker, shared by its listener threads, handler threads and relay."""

    def __init__(self, worker_connections: int = 0, limit_prelogin: int = 0,
                 limit_conn_per_ip: int = 0) -> None:
        self.worker_connections = worker_connections    # 0: no limit
        self.limit_prelogin = limit_prelogin
        self.limit_conn_per_ip = limit_conn_per_ip
        self._cond = threading.Condition()
        self.connections = 0        # PER_SESSION for each admitted, unreleased session
        self.prelogin = 0
        self.per_ip = {}            # address_key -> sessions (pre-login and relayed)
        self.lines = LogThrottle()  # refusal lines of this worker

    @classmethod
    def from_config(cls, main: Any) -> Admission:
        return cls(main.worker_connections, main.limit_prelogin, main.limit_conn_per_ip)

    # -- the accepting thread -------------------------------------------------------------
    def full(self) -> bool:
        """No room for one more session: the listener stops accepting (as nginx when its
        free connections run out), leaving connections queued for other workers."""
        wc = self.worker_connections
        return bool(wc) and self.connections + PER_SESSION > wc

    def wait_room(self, timeout: Optional[float]) -> bool:
        """Wait until a session ends (or `timeout` seconds); True when there is room."""
        with self._cond:
            return self._cond.wait_for(lambda: not self.full(), timeout)

    def admit(self, ip: Optional[str], exempt: bool = False
              ) -> Tuple[Optional[Ticket], Optional[str]]:
        """(Ticket, None) for an admitted session, or (None, reason) when a limit refuses it.

        `exempt`: the peer is a trusted balancer (set_real_ip_from) whose PROXY header is not
        read yet; it is counted by its real address later (`Ticket.retarget`).
        """
        key = None if exempt else address_key(ip)
        with self._cond:
            if self.full():
                return None, "worker_connections"
            if self.limit_prelogin and self.prelogin >= self.limit_prelogin:
                return None, "limit_prelogin"
            if key is not None and self.limit_conn_per_ip \
                    and self.per_ip.get(key, 0) >= self.limit_conn_per_ip:
                return None, "limit_conn_per_ip"
            self.connections += PER_SESSION
            self.prelogin += 1
            if key is not None:
                self.per_ip[key] = self.per_ip.get(key, 0) + 1
            return Ticket(self, key), None

    def limit_of(self, reason: str) -> int:
        return getattr(self, reason, 0)

    # -- tickets ------------------------------------------------------------------------------
    def _uncount_ip(self, key):
        n = self.per_ip.get(key, 0) - 1
        if n > 0:
            self.per_ip[key] = n
        else:
            self.per_ip.pop(key, None)

    def _retarget(self, t, ip):
        key = address_key(ip)
        with self._cond:
            if t.released or key == t.key:
                return None
            if self.limit_conn_per_ip and self.per_ip.get(key, 0) >= self.limit_conn_per_ip:
                reason = "limit_conn_per_ip"
            else:
                reason = None
            if t.key is not None:
                self._uncount_ip(t.key)
                t.key = None
            if reason is None:
                self.per_ip[key] = self.per_ip.get(key, 0) + 1
                t.key = key
                return None
        t.release()
        return reason

    def _logged_in(self, t):
        with self._cond:
            if t.prelogin and not t.released:
                t.prelogin = False
                self.prelogin -= 1
                self._cond.notify_all()

    def _release(self, t):
        with self._cond:
            if t.released:
                return
            t.released = True
            self.connections -= PER_SESSION
            if t.prelogin:
                t.prelogin = False
                self.prelogin -= 1
            if t.key is not None:
                self._uncount_ip(t.key)
            self._cond.notify_all()

    def snapshot(self) -> Dict[str, int]:
        with self._cond:
            return {"connections": self.connections, "prelogin": self.prelogin,
                    "addresses": len(self.per_ip)}


def raise_nofile(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `needed` descriptors (at most the hard
    limit, which needs no privilege); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (OSError, ValueError):
            pass
    return soft


_REFUSALS = {"limit_conn_per_ip": "too many connections from the client's address",
             "limit_prelogin": "too many sessions before login",
             "worker_connections": "worker_connections are not enough",
             "threads": "no handler thread could be started"}


def refusal_text(reason: str, limit: int, held: int, tls: bool) -> str:
    """The log line's text of a refusal (the caller adds client and server): what was over
    its limit, the lines LogThrottle held back, and whether the greeting was left out."""
    return "%s (%s %d%s)%s" % (
        _REFUSALS[reason], reason, limit,
        "; %d more not logged since the last line" % held if held else "",
        ", closing without greeting on a TLS port" if tls else "")


class LogThrottle:
    """At most one log line per key (a limit and an address) and `interval`: one address
    reconnecting thousands of times a second must not fill the disk.  Lines held back are
    counted into the next line for that key."""

    def __init__(self, interval: float = 1.0, max_keys: int = 4096) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._keys = {}             # key -> [time of the last line, lines held back since]

    def allow(self, key: Hashable, now: float) -> Optional[int]:
        """None when the line is to be held back, else how many were held back before it."""
        with self._lock:
            entry = self._keys.get(key)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return None
            held = entry[1] if entry is not None else 0
            if entry is None and len(self._keys) >= self.max_keys:
                self._keys = {k: v for k, v in self._keys.items()
                              if now - v[0] < self.interval}
                if len(self._keys) >= self.max_keys:
                    self._keys.clear()      # bounded memory: forget the counts, not the lines
            self._keys[key] = [now, 0]
            return held
