"""The two sides of a relayed session: `PlainEndpoint` for a plain socket, `TLSEndpoint` for an
`ssl.SSLSocket` (non-blocking: `SSLWantReadError` / `SSLWantWriteError` change which selector
event the next recv/send waits for; `pending()` reports bytes already decrypted, which the
selector cannot see).  relay.py's loop asks an endpoint, never assumes that reading waits for
EVENT_READ or writing for EVENT_WRITE.
"""

from __future__ import annotations

import selectors
import socket
import ssl
from typing import Optional

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE


class PlainEndpoint:
    """One side of a session over a plain non-blocking socket.

    recv(n)  -> bytes (b'' at EOF) or None when it would block; raises OSError on errors.
    send(b)  -> number of bytes written (0 when it would block); raises OSError on errors.
    pending() -> bytes readable without waiting for the selector (always 0 for plain TCP).
    read_event() / write_event() -> the selector event the next recv / send waits for.
    """

    __slots__ = ('sock', 'fd', 'sess', 'mask', 'eof')

    def __init__(self, sock: socket.socket, sess: object, nodelay: bool = True) -> None:
        sock.setblocking(False)
        if nodelay and sock.family != socket.AF_UNIX:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.sock = sock
        self.fd = sock.fileno()
        self.sess = sess
        self.mask = 0        # events currently registered with the selector (0: not registered)
        self.eof = None      # None while readable; else the end reason ('client closed', ...)

    def recv(self, n: int) -> Optional[bytes]:
        try:
            return self.sock.recv(n)
        except (BlockingIOError, InterruptedError):
            return None

    def send(self, data: bytes) -> int:
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def pending(self) -> int:
        return 0

    def read_event(self) -> int:
        return EVENT_READ

    def write_event(self) -> int:
        return EVENT_WRITE

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --- TLS endpoint (relay over TLS) ----------------------------------------------------------

class TLSEndpoint(PlainEndpoint):
    """One side of a session over a non-blocking `ssl.SSLSocket` (handshake already done).

    OpenSSL may need the socket writable to go on reading (a TLS 1.3 key update, a
    renegotiation) and readable to go on writing; `SSLWantWriteError` / `SSLWantReadError`
    therefore change which selector event the next recv / send waits for.  Bytes OpenSSL has
    already decrypted are invisible to the selector: `pending()` reports them and the relay
    drains them without waiting.  A refused write is retried later with the same bytes (the
    relay keeps the unsent head of its queue), as OpenSSL requires; Python allows a moving
    buffer.  close() sends close_notify when the socket takes it at once, never waits for the
    peer's.
    """

    __slots__ = ('_rev', '_wev', 'failed')

    def __init__(self, sock: socket.socket, sess: object, nodelay: bool = True) -> None:
        PlainEndpoint.__init__(self, sock, sess, nodelay)
        self._rev = EVENT_READ      # what the next recv waits for
        self._wev = EVENT_WRITE     # what the next send waits for
        self.failed = False         # a TLS error: no close_notify then

    def recv(self, n: int) -> Optional[bytes]:
        try:
            data = self.sock.recv(n)
        except ssl.SSLWantReadError:
            self._rev = EVENT_READ
            return None
        except ssl.SSLWantWriteError:
            self._rev = EVENT_WRITE
            return None
        except (BlockingIOError, InterruptedError):
            self._rev = EVENT_READ
            return None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self._rev = EVENT_READ
            return b''              # close_notify, or a TCP close without it: EOF either way
        except ssl.SSLError:
            self.failed = True
            raise
        self._rev = EVENT_READ
        return data

    def send(self, data: bytes) -> int:
        try:
            n = self.sock.send(data)
        except ssl.SSLWantWriteError:
            self._wev = EVENT_WRITE
            return 0
        except ssl.SSLWantReadError:
            self._wev = EVENT_READ
            return 0
        except (BlockingIOError, InterruptedError):
            self._wev = EVENT_WRITE
            return 0
        except ssl.SSLError:
            self.failed = True
            raise
        self._wev = EVENT_WRITE
        return n

    def pending(self) -> int:
        try:
            return self.sock.pending()
        except (OSError, ValueError):
            return 0

    def read_event(self) -> int:
        return self._rev

    def write_event(self) -> int:
        return self._wev

    def close(self) -> None:
        if not self.failed:
            try:
                self.sock.unwrap()      # sends close_notify; on a non-blocking socket it
            except Exception:           # raises instead of waiting for the peer's one
                pass
        try:
            self.sock.close()
        except OSError:
            pass


def endpoint_for(sock: socket.socket, sess: object, nodelay: bool = True) -> PlainEndpoint:
    """The endpoint class a socket needs: TLS for an `ssl.SSLSocket`, else plain.

    nodelay=False: the caller has set TCP_NODELAY already (no setsockopt here)."""
    if isinstance(sock, ssl.SSLSocket):
        return TLSEndpoint(sock, sess, nodelay)
    return PlainEndpoint(sock, sess, nodelay)
