"""A raw line client (LineClient) that shows the exact bytes a server sends."""

import socket

from tests.support.common import OwnsSocket, as_line, to_bytes, track


class LineClient(OwnsSocket):
    """A raw TCP client that shows exact bytes: readline() keeps CRLF."""

    def __init__(self, host, port, timeout=5.0, family=None):
        if family is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = track(socket.socket(family, socket.SOCK_STREAM))
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.timeout = timeout
        self.buf = bytearray()
        self.received = bytearray()
        self.eof = False

    def _fill(self, timeout=None):
        if self.eof:
            return False
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            raise
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        self.received += data
        return True

    def send(self, data):
        self.sock.sendall(to_bytes(data))

    def sendline(self, data):
        self.sock.sendall(as_line(data))

    def readline(self, timeout=None):
        """Next line with its line end; b'' at EOF (partial tail returned as is)."""
        while b"\n" not in self.buf:
            if not self._fill(timeout):
                rest = bytes(self.buf)
                self.buf.clear()
                return rest
        i = self.buf.index(b"\n")
        line = bytes(self.buf[:i + 1])
        del self.buf[:i + 1]
        return line

    def cmd(self, line, timeout=None):
        """Send a line, return the reply line."""
        self.sendline(line)
        return self.readline(timeout)

    def read_multiline(self, timeout=None):
        """Lines up to and including '.\\r\\n' (POP3 multi-line)."""
        lines = []
        while True:
            line = self.readline(timeout)
            lines.append(line)
            if line in (b".\r\n", b""):
                return lines

    def read_until_closed(self, timeout=None):
        """Everything until EOF (raises socket.timeout if the peer never closes)."""
        while self._fill(timeout):
            pass
        rest = bytes(self.buf)
        self.buf.clear()
        return rest

    def closed(self, timeout=2.0):
        """True if the peer closes within `timeout` with no more data pending; data -> AssertionError."""
        try:
            rest = self.read_until_closed(timeout)
        except socket.timeout:
            return False
        if rest:
            raise AssertionError(f"unexpected data before close: {rest!r}")
        return True

    def silent(self, seconds):
        """True if nothing arrives (and no close) for `seconds`."""
        try:
            got = self._fill(seconds)
        except socket.timeout:
            return True
        return False if got or self.eof else True



# ---------------------------------------------------------------------------------------------
