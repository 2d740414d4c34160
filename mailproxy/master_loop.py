"""The master's wait: signals, the control socket and the workers' channels in one selector.

The master keeps its signals blocked (supervisor.HANDLED) and waits in a
`selectors.DefaultSelector` on a Linux signalfd (readable while one of them is pending; the
signal itself is then taken with `sigtimedwait(..., 0)` as before, so the sender's pid stays
in the logs), on the control socket (`[main] control_socket`) and on one channel per worker
(a socketpair made at each fork).  Without signalfd (no ctypes) it polls: `sigtimedwait` with a
short timeout, then the selector without waiting.  No threads: the master forks.

A control client sends one JSON line (`{"op": "sessions"|"kick", "user", "backend"}`); the
master forwards it to every worker, current and old (draining after a reload), gathers their
answers (live.py) for at most ANSWER_WAIT seconds and answers one JSON line:
`{"sessions": [...], "kicked": N, "missing": [pids that did not answer]}`.  A request goes
to a channel whole: what a non-blocking send leaves is queued (MAX_PENDING) and finished when
the channel is writable, so a worker slow to read never gets half a line.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import selectors
import signal
import socket
import stat
import struct
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

Pair = Tuple[socket.socket, socket.socket]

ANSWER_WAIT = 2.0           # seconds the master waits for the workers' answers
CLIENT_WAIT = 5.0           # seconds a control client has to send its request
POLL = 0.05                 # the selector's poll interval without signalfd
MAX_CLIENTS = 16            # control connections at once (the socket is the owner's only)
MAX_REQUEST = 1 << 16
MAX_ANSWER = 64 << 20       # bytes kept of one worker's answer
MAX_PENDING = 1 << 20       # bytes of requests queued for a worker's channel


def signalfd(signals: Iterable[int]) -> int:
    """A non-blocking signalfd for `signals` (blocked by the caller), or -1 when it cannot
    be had (no ctypes, not Linux, or MAILPROXY_NO_SIGNALFD=1 for the tests)."""
    if os.environ.get("MAILPROXY_NO_SIGNALFD") == "1":
        return -1
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        mask = ctypes.create_string_buffer(128)         # sigset_t: 1024 bits in glibc and musl
        libc.sigemptyset(mask)
        for sig in signals:
            libc.sigaddset(mask, int(sig))
        fd = libc.signalfd(-1, mask, os.O_NONBLOCK | os.O_CLOEXEC)
    except (ImportError, OSError, AttributeError):
        return -1
    return fd if isinstance(fd, int) and fd >= 0 else -1


class _Client:
    __slots__ = ("sock", "inbuf", "out", "deadline", "request")

    def __init__(self, sock):
        self.sock = sock
        self.inbuf = b""
        self.out = b""
        self.deadline = time.monotonic() + CLIENT_WAIT
        self.request = None


class _Request:
    __slots__ = ("client", "waiting", "answers", "deadline")

    def __init__(self, client, waiting):
        self.client = client
        self.waiting = set(waiting)     # worker pids not answered yet
        self.answers = []
        self.deadline = time.monotonic() + ANSWER_WAIT


class _Channel:
    __slots__ = ("pid", "sock", "inbuf", "out")

    def __init__(self, pid, sock):
        self.pid = pid
        self.sock = sock
        self.inbuf = b""
        self.out = b""          # what a send left of the requests: finished when writable


class Hub:
    """The master's selector and what waits in it (see the module docstring)."""

    def __init__(self, signals: Iterable[int], log: Callable[[], Any]) -> None:
        self.signals = tuple(signals)
        self.log = log                  # callable: the master's current ErrorLog
        self.sel = selectors.DefaultSelector()
        self.sigfd = signalfd(self.signals)
        if self.sigfd >= 0:
            self.sel.register(self.sigfd, selectors.EVENT_READ, "signal")
        self.path: Optional[str] = None
        self.listener: Optional[socket.socket] = None
        self._ident = None              # (st_dev, st_ino) of the socket file we made
        self.channels: Dict[int, _Channel] = {}
        self.clients: List[_Client] = []
        self.requests: Dict[int, _Request] = {}
        self._ids = itertools.count(1)

    # -- the control socket ---------------------------------------------------------------------
    def listen(self, path: Optional[str]) -> None:
        """Open the control socket at `path` (None: none), closing one at another path;
        raises OSError with a message naming the path."""
        if path == self.path and (path is None or self.listener is not None):
            return
        self.close_control()
        if path is None:
            return
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)           # created 0600: no moment with a wider mode
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(16)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, 'bind() to unix:%s failed (%d: %s)'
                          % (path, e.errno or 0, e.strerror)) from None
        finally:
            os.umask(old)
        sock.setblocking(False)
        st = os.stat(path)
        self.path, self.listener, self._ident = path, sock, (st.st_dev, st.st_ino)
        self.sel.register(sock, selectors.EVENT_READ, "listener")

    def close_control(self) -> None:
        """Close the control socket and remove its file (only the file we made)."""
        sock, self.listener = self.listener, None
        path, self.path = self.path, None
        if sock is not None:
            self._unregister(sock)
            sock.close()
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == self._ident:
                    os.unlink(path)
            except OSError:
                pass
        for c in list(self.clients):
            self._drop(c)

    def close(self) -> None:
        self.close_control()
        for ch in list(self.channels.values()):
            self._unregister(ch.sock)
            ch.sock.close()
        self.channels = {}
        if self.sigfd >= 0:
            os.close(self.sigfd)
            self.sigfd = -1
        self.sel.close()

    # -- workers' channels ------------------------------------------------------------------
    @staticmethod
    def pair() -> Pair:
        """(master end, worker end) of a new worker's channel, made before the fork."""
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def in_child(self, pair: Pair) -> socket.socket:
        """In a new worker right after fork: close every descriptor of the master's here
        (signalfd, selector, control socket and clients, other workers' channels); returns
        this worker's end of its channel."""
        for fd in [self.sigfd] + [self.sel.fileno()]:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        for sock in ([self.listener] + [c.sock for c in self.clients]
                     + [ch.sock for ch in self.channels.values()] + [pair[0]]):
            if sock is not None:
                sock.close()
        return pair[1]

    def spawned(self, pid: int, pair: Pair) -> None:
        pair[1].close()
        sock = pair[0]
        sock.setblocking(False)
        self.channels[pid] = _Channel(pid, sock)
        self.sel.register(sock, selectors.EVENT_READ, self.channels[pid])

    def gone(self, pid: int) -> None:
        """A worker exited: its channel is closed, no request waits for it any more."""
        ch = self.channels.pop(pid, None)
        if ch is not None:
            self._unregister(ch.sock)
            ch.sock.close()
        for rid, req in list(self.requests.items()):
            if pid in req.waiting:
                req.waiting.discard(pid)
                req.answers.append({"pid": pid, "gone": True})
                self._maybe_finish(rid)

    # -- the wait -------------------------------------------------------------------------------
    def wait(self, timeout: float) -> Optional[Any]:
        """Wait up to `timeout` seconds; serve the control socket and the channels meanwhile.
        Returns the siginfo of a signal taken (sigtimedwait), or None."""
        now = time.monotonic()
        for t in [c.deadline for c in self.clients] + [r.deadline for r in
                                                      self.requests.values()]:
            timeout = min(timeout, max(0.0, t - now))
        if self.sigfd < 0:
            info = signal.sigtimedwait(self.signals, min(timeout, POLL))
            if info is not None:
                return info
            timeout = 0
        try:
            events = self.sel.select(max(0.0, timeout))
        except InterruptedError:
            events = []
        got_signal = False
        for key, ev in events:
            tag = key.data
            if tag == "signal":
                got_signal = True
            elif tag == "listener":
                self._accept()
            elif isinstance(tag, _Channel):
                if ev & selectors.EVENT_WRITE:
                    self._channel_flush(tag)
                if ev & selectors.EVENT_READ:
                    self._channel_readable(tag)
            elif isinstance(tag, _Client):
                self._client_event(tag, ev)
        self._expire()
        if got_signal or self.sigfd < 0:
            return signal.sigtimedwait(self.signals, 0)
        return None

    # -- control clients --------------------------------------------------------------------------
    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.log().log("alert", "accept() on unix:%s failed (%d: %s)"
                               % (self.path, e.errno or 0, e.strerror))
                return
            if len(self.clients) >= MAX_CLIENTS or not _peer_allowed(sock):
                sock.close()
                continue
            sock.setblocking(False)
            c = _Client(sock)
            self.clients.append(c)
            self.sel.register(sock, selectors.EVENT_READ, c)

    def _client_event(self, c, ev):
        if ev & selectors.EVENT_WRITE and c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(c)
                return
            c.out = c.out[n:]
            if not c.out:
                self._drop(c)
            return
        if not ev & selectors.EVENT_READ or c.request is not None:
            return
        try:
            data = c.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        c.inbuf += data
        if b"\n" not in c.inbuf:
            if len(c.inbuf) > MAX_REQUEST:
                self._reply(c, {"error": "request too long"})
            return
        line = c.inbuf.split(b"\n", 1)[0]
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if not isinstance(request, dict) or request.get("op") not in ("sessions", "kick"):
            self._reply(c, {"error": "unknown request"})
            return
        self._forward(c, request)

    def _forward(self, c, request):
        rid = next(self._ids)
        fwd = {"id": rid, "op": request["op"]}
        for k in ("user", "backend"):
            if isinstance(request.get(k), str):
                fwd[k] = request[k]
        line = json.dumps(fwd).encode("ascii") + b"\n"
        req = _Request(c, ())
        c.request = rid
        # not read while the workers answer: a client's end-of-file (a half-close after its
        # request) would wake every wait until then
        self._unregister(c.sock)
        self.requests[rid] = req
        for pid, ch in self.channels.items():
            if self._channel_send(ch, line):
                req.waiting.add(pid)
            else:       # MAX_PENDING bytes of requests unread, or a broken channel
                req.answers.append({"pid": pid, "gone": True})
        self._maybe_finish(rid)

    def _channel_send(self, ch, line):
        """Send a whole request line to a worker: what the socket does not take now is queued
        and finished by the selector (a line is never cut: the next one would be garbage to
        the worker).  False when the queue is full or the channel is broken."""
        if len(ch.out) + len(line) > MAX_PENDING:
            return False
        ch.out += line
        return self._channel_flush(ch)

    def _channel_flush(self, ch):
        try:
            n = ch.sock.send(ch.out) if ch.out else 0
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:             # the worker is gone: _exited will say gone()
            ch.out = b""
            self._unregister(ch.sock)
            return False
        ch.out = ch.out[n:]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if ch.out else 0)
        try:
            if self.sel.get_key(ch.sock).events != events:
                self.sel.modify(ch.sock, events, ch)
        except (KeyError, ValueError):  # unregistered at its end-of-file: the line is lost
            ch.out = b""
            return False
        return True

    def _channel_readable(self, ch):
        try:
            data = ch.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:            # the worker is exiting: _exited will say gone()
            self._unregister(ch.sock)
            return
        ch.inbuf += data
        while b"\n" in ch.inbuf:
            line, ch.inbuf = ch.inbuf.split(b"\n", 1)
            try:
                ans = json.loads(line)
            except ValueError:
                continue
            req = self.requests.get(ans.get("id")) if isinstance(ans, dict) else None
            if req is not None and ch.pid in req.waiting:
                req.waiting.discard(ch.pid)
                req.answers.append(ans)
                self._maybe_finish(ans["id"])
        if len(ch.inbuf) > MAX_ANSWER:
            ch.inbuf = b""

    def _maybe_finish(self, rid, force=False):
        req = self.requests.get(rid)
        if req is None or (req.waiting and not force):
            return
        del self.requests[rid]
        for pid in req.waiting:
            self.log().log("warn", "worker process %d did not answer a control request within "
                           "%gs" % (pid, ANSWER_WAIT))
        self._reply(req.client, combine(req.answers, sorted(req.waiting)))

    def _expire(self):
        now = time.monotonic()
        for rid, req in list(self.requests.items()):
            if req.deadline <= now:
                self._maybe_finish(rid, force=True)
        for c in list(self.clients):
            if c.deadline <= now and (c.request is None or c.out):
                self._drop(c)

    def _reply(self, c, answer):
        if c not in self.clients:
            return                      # the client left meanwhile
        c.out = json.dumps(answer).encode("ascii") + b"\n"
        c.deadline = time.monotonic() + CLIENT_WAIT
        c.request = -1
        self._unregister(c.sock)
        self.sel.register(c.sock, selectors.EVENT_WRITE, c)
        self._client_event(c, selectors.EVENT_WRITE)

    def _drop(self, c):
        if c in self.clients:
            self.clients.remove(c)
            self._unregister(c.sock)
            c.sock.close()

    def _unregister(self, sock):
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass


def combine(answers: List[Dict[str, Any]], silent: List[int]) -> Dict[str, Any]:
    """The master's answer from its workers': sessions sorted by age (oldest first), the
    total kicked, and the workers that did not answer (or left before)."""
    sessions, kicked = [], 0
    missing = list(silent)
    for a in answers:
        if a.get("gone"):
            missing.append(a["pid"])
            continue
        sessions.extend(r for r in a.get("sessions") or () if isinstance(r, dict))
        if isinstance(a.get("kicked"), int):
            kicked += a["kicked"]
    sessions.sort(key=lambda r: -(r.get("age") or 0))
    return {"sessions": sessions, "kicked": kicked, "missing": sorted(missing),
            "workers": len(answers) + len(silent)}


def _clear_stale(path):
    """A socket file left by an instance that is gone is removed; a live one, or a file that
    is not a socket, stops us (OSError)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, 'bind() to unix:%s failed (%d: %s): not a socket'
                      % (path, errno.EEXIST, os.strerror(errno.EEXIST)))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, 'bind() to unix:%s failed (%d: %s): another process '
                  'listens there' % (path, errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)))


def _peer_allowed(sock) -> bool:
    """Only our own user or root (the mode 0600 says so already; SO_PEERCRED checks it
    again where a file system ignores modes)."""
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    except (OSError, AttributeError):
        return True
    return uid in (0, os.geteuid())
