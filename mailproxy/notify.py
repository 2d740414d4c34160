"""sd_notify(3): tell systemd about READY=1, RELOADING=1, STOPPING=1 (Type=notify)."""

from __future__ import annotations

import os
import socket
import time


def notify(state: str) -> bool:
    """Send `state` to $NOTIFY_SOCKET (a path or an abstract '@name'); nothing when unset.

    Never raises: a missing or broken notification socket must not stop the proxy.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    if "RELOADING=1" in state and "MONOTONIC_USEC=" not in state:
        # systemd (Type=notify-reload) wants the time of the reload with RELOADING=1
        state += "\nMONOTONIC_USEC=%d" % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
        return True
    except OSError:
        return False
