"""Login throttling (`login_penalty`, `login_block`, `login_trusted`) and sessions per user
(`limit_sessions_per_user`): the policy, and the few calls Session makes into it.

Penalty, as Dovecot's auth penalty (auth-penalty.c): after N failed logins the next answer to
that client address (IPv6 per /64, limits.address_key) and to that user name waits
2 s * 2^(N-1), at most `login_penalty_max`, counted from the last failure; a failure with the
same user and password as the key's last one (a phone retrying an old password) does not raise
N; a login that succeeds clears the address's N.  Failure counts are forgotten after
FORGET seconds without a failure.

Block: failures of an address in the last `login_block` PERIOD, estimated as HAProxy's
frequency counters do (the current window plus the previous one weighted by what is left of
it); from FAILURES on, the address gets the protocol's temporary failure at once, without
asking the auth service.  Addresses of `login_trusted` are never counted, delayed or blocked.

The counts live in login_table.py's shared memory: one address hitting two workers is one
address, and a reload keeps them.  Everything here but the `Session` hooks at the end is pure
(a record and a time in, a decision out) and tested in tests/unit/test_throttle.py.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Optional, Tuple

from . import limits, login_table, metrics
from .auth_http import AuthResult
from .log import sanitize

if TYPE_CHECKING:
    from .login_table import LoginTable

BASE = 2.0                  # seconds of the first penalty (Dovecot's AUTH_PENALTY_INIT_SECS)
FORGET = 3600.0             # a failure count idle this long is gone (Dovecot's anvil: 1 h)
MAX_COUNT = 65535

_REC = struct.Struct("<H2xIIIdd")   # failures, window count, previous window's, password, last, window


@dataclass(frozen=True)
class Record:
    """What the table keeps per address or user name."""
    failures: int = 0           # raising the penalty (distinct passwords)
    window: int = 0             # failures in the current block window
    previous: int = 0           # failures in the window before
    password: int = 0           # short keyed hash of the last wrong user and password
    last: float = 0.0           # time of the last failure
    start: float = 0.0          # start of the current block window

    def pack(self) -> bytes:
        return _REC.pack(min(self.failures, MAX_COUNT), self.window, self.previous,
                         self.password, self.last, self.start)

    @classmethod
    def unpack(cls, payload: Optional[bytes]) -> Record:
        return cls() if payload is None else cls(*_REC.unpack_from(payload))


def penalty(failures: int, most: float) -> float:
    """Seconds a login waits after `failures` failed ones: 2, 4, 8 ... at most `most`."""
    if failures <= 0:
        return 0.0
    return min(most, BASE * 2.0 ** min(failures - 1, 30))


def delay(rec: Record, now: float, most: float) -> float:
    """What is left of the record's penalty at `now` (0: none)."""
    if rec.failures <= 0 or now - rec.last >= FORGET:
        return 0.0
    return max(0.0, rec.last + penalty(rec.failures, most) - now)


def _slide(rec: Record, now: float, period: float) -> Record:
    """The record with its block window moved on to the one holding `now`."""
    if rec.start <= 0 or now - rec.start >= 2 * period:
        return replace(rec, window=0, previous=0, start=now)
    if now - rec.start >= period:
        return replace(rec, window=0, previous=rec.window, start=rec.start + period)
    return rec


def recent(rec: Record, now: float, period: float) -> float:
    """Failures in the last `period`, estimated (HAProxy's freq_ctr): the current window's,
    and the previous window's share of the time the last period still covers."""
    rec = _slide(rec, now, period)
    return rec.window + rec.previous * (1.0 - (now - rec.start) / period)


def blocked(rec: Record, now: float, block: Optional[Tuple[int, float]]) -> bool:
    """`login_block` FAILURES/PERIOD reached: no more attempts for now."""
    if block is None:
        return False
    failures, period = block
    return recent(rec, now, period) >= failures


def failed(rec: Record, now: float, password: int, period: float) -> Record:
    """The record after a failed login (`password`: short hash of its user and password).
    The same wrong password again counts neither for the penalty nor for the block; its
    delay starts again from now, as Dovecot's."""
    if now - rec.last >= FORGET:
        rec = replace(rec, failures=0, password=0)
    if rec.failures > 0 and rec.password == password:
        return replace(rec, last=now)
    rec = _slide(rec, now, period)
    return replace(rec, failures=min(rec.failures + 1, MAX_COUNT), window=rec.window + 1,
                   previous=rec.previous, password=password, last=now)


def succeeded(rec: Record) -> Record:
    """A login succeeded: the penalty is gone (the block window stays)."""
    return replace(rec, failures=0, password=0)


@functools.lru_cache(maxsize=64)
def _networks(trusted: Tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(n, strict=False) for n in trusted)


def trusted(networks: Any, ip: Optional[str]) -> bool:
    """`ip` is in one of the `login_trusted` networks (IPv4-mapped IPv6 as IPv4)."""
    if not networks or not ip:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in n for n in _networks(tuple(networks)))


def _fmt(seconds: float) -> str:
    return ("%.0fs" % seconds) if seconds >= 1 or seconds == 0 else ("%.0fms" % (seconds * 1000))


def _plural(n: int) -> str:
    return "%d failed login%s" % (n, "" if n == 1 else "s")


# -- the Session's hooks --------------------------------------------------------------------------
# `s` is a session.Session (not imported: it imports this module); its logmsg() adds the client
# address and the sanitized login to each line.

# limit_sessions_per_user's refusal: tagged NO with RFC 5530's LIMIT code, POP3's IN-USE
# (RFC 2449), SMTP's temporary authentication failure (RFC 4954)
_SEATS_FULL = {
    "imap": AuthResult("FAIL", b"[LIMIT] Too many sessions for this user"),
    "pop3": AuthResult("FAIL", b"[IN-USE] Too many sessions for this user"),
    "smtp": AuthResult("FAIL", b"Too many sessions for this user", error_code="454 4.7.0"),
    "sieve": AuthResult("FAIL", b"Too many sessions for this user"),
}


def _keys(table: LoginTable, s: Any, user: Optional[bytes]) -> list:
    keys = [(login_table.ADDRESS, table.key(login_table.ADDRESS,
                                            str(limits.address_key(s.client_ip)).encode()))]
    if user:
        keys.append((login_table.USER, table.key(login_table.USER, user)))
    return keys


def _watched(s: Any) -> bool:
    conf = s.conf
    return ((conf.login_penalty or conf.login_block is not None)
            and s.conv.method != "none"             # smtp_auth none: no credentials to throttle
            and not trusted(conf.login_trusted, s.client_ip))


def before_auth(s: Any) -> None:
    """Before the auth request: refuse a blocked address with the protocol's temporary
    failure (as an auth service error), or wait out the penalty of the address and user."""
    if not _watched(s):
        return
    table, conf = login_table.shared(), s.conf
    keys = _keys(table, s, s.conv.login)
    if not any(table.maybe_holds(kind, key) for kind, key in keys):
        return                  # no failure recorded for the address or the user
    now = table.clock()
    with table.lock:
        recs = [Record.unpack(table.read(kind, key)) for kind, key in keys]
    if blocked(recs[0], now, conf.login_block):
        failures, period = conf.login_block
        s.error("login blocked after %s within %s" % (_plural(int(recent(recs[0], now, period))),
                                                      _fmt(period)))
        metrics.login(s.protocol, "blocked")
        s.outcome = "blocked"
        s.send_close(s.descriptor.internal_error)     # the reply of an auth service error
    if not conf.login_penalty:
        return
    waits = [delay(r, now, conf.login_penalty_max) for r in recs]
    wait = max(waits)
    rec = recs[waits.index(wait)]
    if wait > 0:
        s.logmsg("warn", "login delayed %s after %s%s" % (
            _fmt(wait), _plural(rec.failures), "" if rec is recs[0] else " of this user"))
        metrics.login(s.protocol, "throttled")
        s.action = "in login penalty delay"
        if s.rt.shutting_down.wait(wait):
            s.internal_error()


def after_auth(s: Any, ok: bool, user: Optional[bytes], passwd: Optional[bytes]) -> None:
    """Count a failed login for the address and the user name, or clear the address's
    penalty after a login that succeeded."""
    if not _watched(s):
        return
    table, conf = login_table.shared(), s.conf
    keys = _keys(table, s, None if ok else user)
    if ok and not table.maybe_holds(*keys[0]):
        return                  # a success with no failure to clear
    now = table.clock()
    period = conf.login_block[1] if conf.login_block is not None else FORGET
    pw = table.short_hash(user or b"", passwd or b"")
    with table.lock:
        for kind, key in keys:
            rec = Record.unpack(table.read(kind, key))
            rec = succeeded(rec) if ok else failed(rec, now, pw, period)
            if rec == Record() or (ok and rec.window == 0 and rec.previous == 0):
                table.delete(kind, key)
            else:
                table.write(kind, key, rec.pack())


def take_seat(s: Any, user: Optional[bytes]) -> None:
    """Before the backend: one more session of `user` (limit_sessions_per_user), or the
    protocol's refusal and close.  The seat is given back with release()."""
    limit = s.conf.limit_sessions_per_user
    if not limit or not user:
        return
    seat = login_table.shared().take_seat(s.protocol, user, limit)
    if seat is None:
        s.error("limiting sessions by limit_sessions_per_user (%d) for user \"%s\""
                % (limit, sanitize(user, 128)))
        metrics.login(s.protocol, "limited")
        s.outcome = "limited"
        s.perform(s.conv.auth_failed(_SEATS_FULL[s.protocol], retry=False))
    s.seat = seat


def release(s: Any) -> None:
    """The session ended (before or after the relay): its seat is free."""
    if s.seat is not None:
        s.seat.release()
