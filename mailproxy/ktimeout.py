"""Socket timeouts kept by the kernel (SO_RCVTIMEO / SO_SNDTIMEO) instead of Python's.

A Python socket timeout (`settimeout`) makes the descriptor non-blocking (one `ioctl` per
call) and `poll`s before every recv/send/connect: 2-3 extra system calls per operation on
the per-session hot path.  Here a socket stays blocking and the kernel bounds each
call: `set(sock, seconds)` once, and a call that runs out of time fails with EAGAIN
(`BlockingIOError`), or EINPROGRESS for `connect()` (Linux bounds a blocking connect by
SO_SNDTIMEO).  `TIMEOUT_ERRORS` catches both this and a Python timeout (TLS sockets, whose
handshake code uses `settimeout`), so callers handle either the same way.

Like Python's per-call timeout, the limit applies to each call; callers that need one
deadline over several calls (a backend reply read in pieces, the auth_http exchange) set the
remaining time again before a further call.
"""

from __future__ import annotations

import socket
import struct
from typing import Optional

# struct timeval {time_t tv_sec; suseconds_t tv_usec;} (both C longs on Linux)
_TIMEVAL = struct.Struct('@ll')

# What a timed-out call raises: the kernel's EAGAIN/EINPROGRESS, or Python's socket.timeout.
TIMEOUT_ERRORS = (socket.timeout, BlockingIOError)


def _timeval(seconds):
    if seconds is None:
        return _TIMEVAL.pack(0, 0)          # 0: no limit
    usec = int(round(max(float(seconds), 0.0) * 1e6))
    if usec <= 0:
        usec = 1                            # 0 would mean "no limit"
    sec, usec = divmod(usec, 1000000)
    sec = min(sec, 2 ** 31 - 1)
    return _TIMEVAL.pack(sec, usec)


def set(sock: socket.socket, seconds: Optional[float], recv: bool = True,   # noqa: A001
        send: bool = True) -> None:
    """Bound each blocking recv (recv=True) and send/connect (send=True) by `seconds`.

    The socket must be in blocking mode (Python timeout None) for the limit to act; a socket
    with a Python timeout keeps working as before (poll first, then the call).
    """
    tv = _timeval(seconds)
    if recv:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    if send:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def get(sock: socket.socket, send: bool = False) -> Optional[float]:
    """The kernel's limit in seconds (None: none) for recv, or send when send=True."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO if send else socket.SO_RCVTIMEO,
                          _TIMEVAL.size)
    sec, usec = _TIMEVAL.unpack(raw)
    if not sec and not usec:
        return None
    return sec + usec / 1e6
