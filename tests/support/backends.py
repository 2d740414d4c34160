"""Scripted backends: ScriptedBackend, a threaded TCP server on loopback that runs a
handler(conn) per connection and records every byte (BackendConn), and `script(...)` to build
handlers from steps. Exceptions in a handler land in `errors`; the fixture's teardown fails
the test on them."""

import socket
import struct
import threading
import time

from tests.support.common import CLOSE, HANG, RESET, as_line, to_bytes

__all__ = ["BackendConn", "ScriptedBackend", "Read", "Sleep", "script", "CLOSE", "HANG", "RESET"]


class BackendConn:
    """One accepted backend connection: recording I/O for a handler script.

    Recording (thread-safe reads are fine in tests):
      raw         bytes received (after the PROXY header, which is in `proxy_header`)
      lines       complete received lines without their line end (bytes)
      raw_lines   complete received lines with their line end
      proxy_header  the PROXY v1 line (with CRLF) or v2 header bytes, or None
      sent        bytes sent to the proxy
      closed      Event set when the connection ended
      peer, local  socket addresses
    """

    def __init__(self, sock, backend):
        self.sock = sock
        self.backend = backend
        self.peer = sock.getpeername()
        self.local = sock.getsockname()
        self.raw = bytearray()
        self.lines = []
        self.raw_lines = []
        self.sent = bytearray()
        self.proxy_header = None
        self.closed = threading.Event()
        self.eof = False
        self.peer_reset = False              # the peer reset the connection
        self.data = {}                       # free for handler scripts
        self._buf = bytearray()
        self._cond = threading.Condition()
        self.sock.settimeout(backend.io_timeout)

    def looked_only(self):
        """Reset by the peer before it sent a byte: a look at the backend (the proxy's start-up
        probes.unreachable closes with a reset), not a session a test made."""
        return self.peer_reset and not self.raw and self.proxy_header is None

    # receiving -----------------------------------------------------------------------------
    def _fill(self, timeout=None):
        """Read more bytes into the buffer; False at EOF/timeout."""
        if self.eof:
            return False
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except OSError as e:
            self.peer_reset = isinstance(e, ConnectionResetError)
            data = b""
        finally:
            if timeout is not None:
                self.sock.settimeout(self.backend.io_timeout)
        if not data:
            self.eof = True
            return False
        with self._cond:
            self._buf += data
            self.raw += data
            self._cond.notify_all()
        return True

    def readline(self, timeout=None):
        """Next received line (bytes, line end kept) or None at EOF/timeout; recorded in `lines`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i + 1])
                del self._buf[:i + 1]
                with self._cond:
                    self.raw_lines.append(line)
                    self.lines.append(line.rstrip(b"\n").rstrip(b"\r") if line.endswith(b"\n") else line)
                    self._cond.notify_all()
                return line
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            if not self._fill(remaining):
                if self.eof and self._buf:
                    rest = bytes(self._buf)
                    self._buf.clear()
                    with self._cond:
                        self.raw_lines.append(rest)
                        self.lines.append(rest)
                    return rest
                if self.eof or remaining is not None:
                    return None

    def read_exact(self, n, timeout=None):
        while len(self._buf) < n:
            if not self._fill(timeout):
                return None
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def read_proxy_header(self, timeout=5.0):
        """Read a PROXY v1 line or v2 header; stored in `proxy_header` (the buffer keeps the rest)."""
        while len(self._buf) < 16:
            if not self._fill(timeout):
                break
        sig2 = b"\r\n\r\n\x00\r\nQUIT\n"
        if self._buf.startswith(sig2) and len(self._buf) >= 16:
            length = struct.unpack("!H", bytes(self._buf[14:16]))[0]
            hdr = self.read_exact(16 + length, timeout)
        elif self._buf.startswith(b"PROXY"):
            while b"\r\n" not in self._buf[:108]:
                if not self._fill(timeout):
                    break
            i = self._buf.find(b"\r\n")
            hdr = bytes(self._buf[:i + 2]) if i >= 0 else bytes(self._buf)
            del self._buf[:len(hdr)]
        else:
            hdr = None
        self.proxy_header = hdr
        # raw records what follows the header
        if hdr:
            with self._cond:
                del self.raw[:len(hdr)]
        return hdr

    def wait_lines(self, n, timeout=3.0):
        """Wait until the handler has read `n` lines; returns `lines`."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.lines) >= n, timeout):
                raise AssertionError(f"backend got lines {self.lines!r}, expected at least {n}")
            return list(self.lines)

    # sending -------------------------------------------------------------------------------
    def send(self, data):
        """Send str/bytes as is (no line end added)."""
        data = to_bytes(data)
        try:
            self.sock.sendall(data)
        except OSError as e:
            # a reset consumed here makes the next recv() an EOF: keep what it was
            self.peer_reset = self.peer_reset or isinstance(e, (ConnectionResetError,
                                                                BrokenPipeError))
            return False
        self.sent += data
        return True

    def sendline(self, data):
        """Send a line; CRLF added unless it already ends in LF."""
        return self.send(as_line(data))

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def reset(self):
        """Close with RST."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    def stall(self):
        """Say nothing more; return when the peer closes or the backend stops."""
        while not self.backend.stopping.is_set():
            if self._fill(0.1):
                continue
            if self.eof:
                return

    def drain(self):
        """Record (and line-split) everything until EOF."""
        while self.readline(0.1) is not None or not (self.eof or self.backend.stopping.is_set()):
            pass

    def __repr__(self):
        return f"<BackendConn peer={self.peer} lines={self.lines!r}>"


class ScriptedBackend:
    """A threaded TCP server on 127.0.0.1 (or ::1) that runs `handler(conn)` per connection.

    handler(conn: BackendConn) speaks the script (conn.sendline / conn.readline / ...). With
    `proxy_protocol=True` each connection first reads a PROXY v1/v2 header into
    conn.proxy_header before the handler runs (as a backend configured for it would).
    `sessions` lists every BackendConn in accept order, except the connections the proxy
    closed without sending a byte (its start-up look and health checks: `accepted` counts them).
    """

    io_timeout = 10.0

    def __init__(self, handler=None, host="127.0.0.1", port=0, proxy_protocol=False):
        self.handler = handler
        self.host = host
        self.proxy_protocol = proxy_protocol
        self.sessions = []
        self.accepted = 0                    # every connection, looks and checks included
        self.errors = []                     # unexpected: the fixture's teardown fails on them
        self.expect_errors = False
        self.stopping = threading.Event()
        self._cond = threading.Condition()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.1)
        self._threads = []
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    @property
    def address(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _accept_loop(self):
        while not self.stopping.is_set():
            try:
                sock, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = BackendConn(sock, self)
            except OSError:         # reset before the accept: the proxy's start-up look
                sock.close()
                continue
            with self._cond:
                self.sessions.append(conn)
                self._cond.notify_all()
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, conn):
        try:
            if self.proxy_protocol:
                conn.read_proxy_header()
            self.handle(conn)
        except (ConnectionResetError, BrokenPipeError) as exc:
            conn.peer_reset = True
            if not conn.looked_only():
                self.errors.append(exc)
        except Exception as exc:  # recorded; the fixture's teardown fails the test on it
            self.errors.append(exc)
        finally:
            try:
                conn.sock.close()
            except OSError:
                pass
            if conn.looked_only():
                # the proxy's start-up look at its backends (probes.unreachable): connected,
                # then reset with nothing sent; not a session of any test
                with self._cond:
                    self.sessions.remove(conn)
                    self._cond.notify_all()
            conn.closed.set()

    def handle(self, conn):
        if self.handler is not None:
            self.handler(conn)
        else:
            conn.drain()

    def wait_session(self, i=0, timeout=3.0):
        """The i-th accepted connection, waiting for it."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.sessions) > i, timeout):
                raise AssertionError(f"backend accepted {len(self.sessions)} connections, expected {i + 1}")
            return self.sessions[i]

    def stop(self):
        self.stopping.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)    # wakes the accept() at once
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        self.thread.join(2)
        for c in list(self.sessions):
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(2)


class Read:
    """Script step: read one line (recorded)."""

    def __init__(self, timeout=None):
        self.timeout = timeout


class Sleep:
    """Script step: sleep."""

    def __init__(self, seconds):
        self.seconds = seconds


def script(*steps):
    """A handler from simple steps: str/bytes -> sendline, Read(), Sleep(s), CLOSE, RESET, HANG,
    or a callable(conn). After the last step the connection is drained until EOF."""
    def handler(conn):
        for step in steps:
            if isinstance(step, Read):
                if conn.readline(step.timeout) is None:
                    return
            elif isinstance(step, Sleep):
                time.sleep(step.seconds)
            elif step == CLOSE:
                conn.close()
                return
            elif step == RESET:
                conn.reset()
                return
            elif step == HANG:
                conn.stall()
                return
            elif callable(step):
                step(conn)
            else:
                conn.sendline(step)
        conn.drain()
    return handler
