"""Client input before login and the exceptions that steer a conversation.

`LineReader` reads the client's command lines with nginx's buffer rules; the exceptions end
(`Close`, `ClientClosed`, `ClientTimeout`), redirect (`HandedOver`) or answer
(`Refused`, `LineTooLong`, `BackendRejected`) a command.  Kept apart from session.py so that
realip.py and tls.py can raise them without importing the session.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Callable, Optional

from . import ktimeout
from .log import sanitize

if TYPE_CHECKING:
    import socket


def strip_eol(line: bytes) -> Optional[bytes]:
    """A command line without its LF or CRLF, or None when a CR stands anywhere else.

    nginx's parsers take a bare LF as the end of a line and a CR only right before it.
    """
    if line.endswith(b"\n"):
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    if b"\r" in line:
        return None
    return line


class Refused(Exception):
    """A command refused after parsing: the protocol's invalid-command reply, not counted in
    max_errors (nginx counts only parser errors, in ngx_mail_read_command)."""


class Close(Exception):
    """End the session now (whatever had to be said to the client was said)."""


class HandedOver(Exception):
    """The sockets now belong to the relay."""


class ClientClosed(Exception):
    """The client went away; str() is the log line ("recv() failed" with `errno`)."""

    def __init__(self, text: str = "client closed connection", errno: Optional[int] = None):
        super().__init__(text)
        self.errno = errno


class ClientTimeout(Exception):
    pass


class LineTooLong(Exception):
    def __init__(self, data: bytes):
        super().__init__("too long command")
        self.data = data


class BackendRejected(Exception):
    """The backend answered a login step with something other than success."""

    def __init__(self, reply: bytes, text: Optional[bytes] = None, refused: bool = False,
                 challenge: Optional[bytes] = None):
        super().__init__("upstream sent invalid response")
        self.reply = reply              # raw bytes, relayed verbatim when allowed
        self.text = reply if text is None else text   # what is logged
        # the backend refused the client's own token (it may have expired since the auth
        # service saw it): an ordinary login failure, its reply relayed
        self.refused = refused
        # its RFC 7628 error challenge (base64), for the client before that reply
        self.challenge = challenge


class LineReader:
    """Client input before login, with nginx's rules.

    One buffer of at most `limit` bytes; a command that does not fit is "too long". Lines end at
    LF (the CR before it is the parser's business). Bytes beyond the current command stay
    buffered and are handed to the relay after login (pipelining).
    """

    def __init__(self, sock: socket.socket, limit: int, timeout: Optional[float],
                 arm: Optional[Callable[[], None]] = None):
        self.sock = sock
        self.limit = limit
        self.timeout = timeout
        self.arm = arm              # bounds the next read by the session's deadline
        self.buf = bytearray()

    def _fill(self):
        # The socket's timeout (ktimeout: the kernel's SO_RCVTIMEO, or Python's on a TLS
        # socket) is kept within the session's deadline by `arm`; either expiry is a timeout.
        room = self.limit - len(self.buf)
        if self.arm is not None:
            self.arm()
        try:
            data = self.sock.recv(max(room, 1))
        except ktimeout.TIMEOUT_ERRORS:
            raise ClientTimeout() from None
        except ssl.SSLError as e:
            raise ClientClosed("SSL_read() failed (SSL: %s)"
                               % sanitize(e.reason or str(e), 256)) from None
        except OSError as e:
            raise ClientClosed("recv() failed", e.errno) from None
        if not data:
            raise ClientClosed()
        self.buf += data

    def readline(self, limit: Optional[int] = None) -> bytes:
        """The next line including its LF; LineTooLong when the buffer fills without one.

        `limit` (IMAP: what is left of a command's budget after a literal) caps the line
        below the buffer size; None means the whole buffer.
        """
        limit = self.limit if limit is None else min(limit, self.limit)   # IMAP hook
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= limit:                                                  # IMAP hook
                raise LineTooLong(bytes(self.buf[:limit]))
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            if len(self.buf) >= limit:
                raise LineTooLong(bytes(self.buf))
            start = len(self.buf)
            self._fill()

    def read_exact(self, n: int) -> bytes:
        """Exactly n bytes (an IMAP literal); LineTooLong when n cannot fit in the buffer."""
        while len(self.buf) < n:
            if len(self.buf) >= self.limit:
                raise LineTooLong(bytes(self.buf))
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def pending(self) -> int:
        return len(self.buf)

    def take(self) -> bytes:
        """Everything still buffered (pipelined input), which leaves the buffer empty."""
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def discard(self) -> None:
        self.buf.clear()
