"""The shared relay: one selector thread per process copies bytes for every logged-in session.

Handler threads negotiate and log in, then hand the socket pair over with `Relay.add()`.
From then on a session costs no thread and no standing buffer: its two sockets, one small
`_Session` object, two small endpoint objects and their selector keys.  Unsent data is held
only as the `bytes` objects that `recv()` returned (or memoryview slices of them after a
partial write), and only while it is unsent.

nginx semantics (ngx_mail_proxy_handler):
  * two directions, each bounded by its own buffer: client -> backend by `client_buffer`,
    backend -> client by `proxy_buffer` (sessions pass proxy_buffer for both: README
    "Differences from nginx"); a side is not read while its peer's unsent data is at the
    limit (back-pressure), and reads never ask for more than the free space;
  * `proxy_timeout` is ONE timer on the client side, re-armed only by client events (client
    readable, or client writable after a blocked write); backend -> client data written
    without blocking does not extend it;
  * no half-close: both sockets are closed when the client hit EOF/error and all it sent has
    been written to the backend, or the backend hit EOF/error and all it sent has been written
    to the client, or on any write error.

The per-side I/O lives in an endpoint object (endpoints.py: `PlainEndpoint`, and `TLSEndpoint`
for an `ssl.SSLSocket`, chosen automatically); endpoints holding bytes already decrypted are
serviced on the next loop pass without waiting.
"""

from __future__ import annotations

import heapq
import selectors
import socket
import threading
import time
import traceback
from typing import Any, Callable, Optional, Union

from .endpoints import PlainEndpoint, endpoint_for
from .log import errno_text

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
# One `selectors.DefaultSelector` (epoll on Linux) for the whole process; each endpoint is
# registered with `data` = the endpoint itself, and unregistered before its socket is closed.

# Upper bound of reads done for one side in one event before the loop services others.
_MAX_READS_PER_EVENT = 16
# Longest the loop sleeps in select() (so a lost wake-up could never stall it for long).
_MAX_SLEEP = 60.0


def _oserror_text(exc):
    """'(104: Connection reset by peer)'-style text, as nginx writes errno values."""
    return '(%s)' % errno_text(exc)


class Stats:
    """What `on_done` receives."""

    __slots__ = ('name', 'bytes_in', 'bytes_out', 'started', 'duration', 'reason')

    def __init__(self, name: str, bytes_in: int, bytes_out: int, started: float,
                 duration: float, reason: str) -> None:
        self.name = name
        self.bytes_in = bytes_in      # client -> backend, including the pipelined to_backend
        self.bytes_out = bytes_out    # backend -> client, including to_client
        self.started = started        # time.time() when add() handed the session over
        self.duration = duration      # seconds in the relay
        self.reason = reason          # why it ended

    def __repr__(self):
        return ('Stats(name=%r, bytes_in=%d, bytes_out=%d, duration=%.3f, reason=%r)'
                % (self.name, self.bytes_in, self.bytes_out, self.duration, self.reason))


class _Session:
    __slots__ = ('c', 'b',                 # endpoints: client, backend
                 'c2b', 'c2b_len', 'b2c', 'b2c_len',   # unsent data: None or list of buffers
                 'cbuf', 'pbuf',           # per-direction limits
                 'timeout', 'deadline',    # proxy_timeout and the client timer's expiry
                 'bytes_in', 'bytes_out',
                 't0', 'on_done', 'name', 'closed', 'nodelay')

    def __lt__(self, other):
        # heap entries are (deadline, session); equal deadlines compare sessions
        return id(self) < id(other)


class Relay:
    """One per process; see the module docstring."""

    def __init__(self, log: Union[Callable[[str, str], Any], Any, None] = None,
                 endpoint_factory: Optional[Callable[[socket.socket, Any], PlainEndpoint]]
                 = None) -> None:
        # log: a callable log(level, message), or an object with such a .log method (ErrorLog)
        if log is not None and not callable(log) and callable(getattr(log, 'log', None)):
            log = log.log
        self._log = log
        # endpoint_factory(sock, session) -> endpoint; lets the TLS code pick the class per socket.
        self._factory = endpoint_factory or self._default_endpoint
        self._sel = None                # selectors.DefaultSelector, shared by every session
        self._thread = None
        self._lock = threading.Lock()
        self._cmds = []                 # (kind, payload) queued by other threads
        self._wake_pending = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._live = 0                  # sessions started and not yet closed
        self._heap = []                 # (deadline, seq, session), lazily re-checked
        self._dead = 0                  # closed sessions still in the heap
        self._ready = set()             # TLS endpoints holding decrypted bytes (no fd event)
        self._running = False
        self._stopped = False
        self._now = time.monotonic()

    @staticmethod
    def _default_endpoint(sock, sess):
        # TLS chosen automatically for an SSLSocket
        return endpoint_for(sock, sess, getattr(sess, 'nodelay', True))

    # ---------------------------------------------------------------- public, any thread

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._sel = selectors.DefaultSelector()
            self._sel.register(self._wake_r, EVENT_READ, None)     # data None: the wake-up
            self._running = True
            self._thread = threading.Thread(target=self._run, name='mailproxy-relay', daemon=True)
            self._thread.start()

    def add(self, client_sock: socket.socket, backend_sock: socket.socket, *,
            to_backend: bytes = b'', to_client: bytes = b'', client_buffer: int = 4096,
            proxy_buffer: int = 4096, proxy_timeout: float = 86400.0,
            on_done: Optional[Callable[[Stats], Any]] = None, name: str = '',
            nodelay: bool = True) -> None:
        """Hand a logged-in session to the relay (thread-safe).  The relay owns both sockets.

        nodelay=False: both sockets have TCP_NODELAY already (the relay does not set it)."""
        args = (client_sock, backend_sock, bytes(to_backend), bytes(to_client),
                max(1, int(client_buffer)), max(1, int(proxy_buffer)), float(proxy_timeout),
                on_done, name, bool(nodelay), time.time())
        with self._lock:
            if not self._stopped:
                self._cmds.append(('add', args))
                self._wake_locked()
                return
        # The relay is stopped: end the session here so on_done still runs exactly once.
        for s in (client_sock, backend_sock):
            try:
                s.close()
            except OSError:
                pass
        self._call_done(on_done, Stats(name, 0, 0, args[-1], 0.0, 'shutdown'))

    def count(self) -> int:
        """Sessions owned by the relay (including those handed over but not yet started)."""
        with self._lock:
            queued = sum(1 for kind, _ in self._cmds if kind == 'add')
        return self._live + queued

    def visit(self, fn: Callable[[list, Callable[[Any, str], None]], Any]) -> None:
        """Run fn(live, close) in the relay thread (thread-safe): `live` the live sessions
        (`.name`, `.bytes_in`, `.bytes_out`), close(session, reason) ends one (live.py)."""
        with self._lock:
            self._cmds.append(('visit', fn))
            self._wake_locked()

    def close_all(self, reason: str = 'shutdown') -> None:
        """End every session (thread-safe); each on_done gets `reason`."""
        with self._lock:
            self._cmds.append(('close_all', reason))
            self._wake_locked()
        if self._thread is None:
            self._process_commands(refuse=reason)

    def stop(self, timeout: float = 5.0) -> None:
        """End every session with 'shutdown' and end the relay thread."""
        with self._lock:
            self._stopped = True
            self._cmds.append(('close_all', 'shutdown'))
            self._running = False
            self._wake_locked()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None:
            self._process_commands(refuse='shutdown')

    # ---------------------------------------------------------------- loop

    def _wake_locked(self):
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._wake_w.send(b'x')
            except OSError:
                pass

    def _note(self, level, message):
        if self._log is not None:
            try:
                self._log(level, message)
            except Exception:
                pass

    def _run(self):
        sel = self._sel
        select = sel.select
        heap = self._heap
        monotonic = time.monotonic
        while self._running:
            try:
                if heap:
                    wait = heap[0][0] - self._now
                    wait = 0 if wait < 0 else (_MAX_SLEEP if wait > _MAX_SLEEP else wait)
                else:
                    wait = _MAX_SLEEP
                if self._ready:
                    wait = 0                # decrypted bytes wait in a TLS endpoint
                events = select(wait)
                self._now = now = monotonic()
                # An error or hang-up comes as EVENT_READ|EVENT_WRITE (masked by the events the
                # endpoint is registered for): _service then runs both directions it waits on.
                for key, ev in events:
                    end = key.data
                    if end is None:
                        self._drain_wake()
                        self._process_commands()
                        continue
                    sess = end.sess
                    if sess is None or sess.closed:    # closed earlier in this batch
                        continue
                    try:
                        self._service(sess, end, ev, now)
                    except Exception as exc:  # contained to this session
                        self._note('alert', 'relay: session %s: %s' % (
                            sess.name, ''.join(traceback.format_exception_only(type(exc), exc)).strip()))
                        self._close(sess, 'internal error: %s' % (exc,))
                if self._ready:
                    self._service_ready(now)
                if heap and heap[0][0] <= now:
                    self._expire(now)
            except Exception:  # the loop itself must survive
                self._note('alert', 'relay loop: %s' % (traceback.format_exc(),))
                time.sleep(0.01)
        # stopping: whatever is still queued or open ends with 'shutdown'
        try:
            self._drain_wake()
            self._process_commands()
            for sess in self._live_sessions():
                self._close(sess, 'shutdown')
        finally:
            try:
                sel.close()
            except Exception:
                pass
            self._wake_r.close()        # the relay never starts again (start() runs once)
            self._wake_w.close()

    def _service_ready(self, now):
        """Read what TLS endpoints decrypted already: the selector reports nothing for it."""
        ready, self._ready = self._ready, set()
        for end in ready:
            sess = end.sess
            if sess is None or sess.closed or end.eof is not None or not end.pending():
                continue
            try:
                self._service(sess, end, end.read_event(), now)
            except Exception as exc:  # contained to this session
                self._note('alert', 'relay: session %s: %s' % (sess.name, exc))
                self._close(sess, 'internal error: %s' % (exc,))

    def _drain_wake(self):
        with self._lock:
            self._wake_pending = False
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass

    def _process_commands(self, refuse=None):
        with self._lock:
            cmds, self._cmds = self._cmds, []
        if refuse is None and self._stopped:
            refuse = 'shutdown'
        for kind, payload in cmds:
            try:
                if kind == 'add':
                    self._start_session(payload, refuse=refuse)
                elif kind == 'visit':
                    payload(self._live_sessions(), self._close)
                elif kind == 'close_all':
                    for sess in self._live_sessions():
                        self._close(sess, payload)
            except Exception:
                self._note('alert', 'relay: %s' % (traceback.format_exc(),))

    def _start_session(self, args, refuse=None):
        (csock, bsock, to_backend, to_client, cbuf, pbuf, timeout, on_done, name, nodelay,
         started) = args
        sess = _Session()
        sess.nodelay = nodelay
        sess.on_done = on_done
        sess.name = name
        sess.t0 = time.monotonic() - (time.time() - started)   # queued time counts
        sess.closed = False
        sess.bytes_in = sess.bytes_out = 0
        sess.cbuf = cbuf
        sess.pbuf = pbuf
        sess.timeout = timeout
        sess.c2b = [to_backend] if to_backend else None
        sess.c2b_len = len(to_backend)
        sess.b2c = [to_client] if to_client else None
        sess.b2c_len = len(to_client)
        sess.c = sess.b = None
        try:
            sess.c = self._factory(csock, sess)
            sess.b = self._factory(bsock, sess)
        except Exception as exc:
            for end, sock in ((sess.c, csock), (sess.b, bsock)):
                try:
                    sock.close()
                except Exception:
                    pass
            sess.c = sess.b = None
            self._live += 1
            self._close(sess, refuse or 'internal error: %s' % (exc,), in_heap=False)
            return
        self._live += 1
        if refuse:
            self._close(sess, refuse, in_heap=False)
            return
        now = self._now = time.monotonic()
        sess.deadline = now + timeout
        heapq.heappush(self._heap, (sess.deadline, sess))
        # First pass: forward what is owed (the login reply, pipelined client bytes), then
        # register each side once with its final events.  Nothing is read here: bytes already
        # waiting in a socket make the selector report it at once, and bytes a TLS socket has
        # already decrypted put its endpoint on the ready list (_update).
        try:
            if sess.b2c is not None and not self._flush(sess, sess.c, False, refill=False):
                return
            if sess.c2b is not None and not self._flush(sess, sess.b, True, refill=False):
                return
            self._update(sess)
        except Exception as exc:
            self._note('alert', 'relay: session %s: %s' % (name, exc))
            self._close(sess, 'internal error: %s' % (exc,))

    # ---------------------------------------------------------------- one session

    def _service(self, sess, end, ev, now, rearm=True):
        """Handle events `ev` on endpoint `end` of `sess`, then fix the selector registrations."""
        c = sess.c
        if end is c:
            if rearm:
                sess.deadline = now + sess.timeout      # any client event re-arms proxy_timeout
            if sess.b2c is not None and ev & c.write_event():
                if not self._flush(sess, c, False):
                    return
            if c.eof is None and ev & c.read_event():
                if not self._pump(sess, c, sess.b, True):
                    return
        else:
            b = end
            if sess.c2b is not None and ev & b.write_event():
                if not self._flush(sess, b, True):
                    return
            if b.eof is None and ev & b.read_event():
                if not self._pump(sess, b, c, False):
                    return
        # end of session?
        if c.eof is not None and sess.c2b is None:
            self._close(sess, c.eof)
            return
        b = sess.b
        if b.eof is not None and sess.b2c is None:
            self._close(sess, b.eof)
            return
        self._update(sess)

    def _pump(self, sess, src, dst, up):
        """Read from src and write to dst right away; what dst does not take is queued.

        up: True for client -> backend.  Returns False when the session was closed.
        """
        limit = sess.cbuf if up else sess.pbuf
        for _ in range(_MAX_READS_PER_EVENT):
            qlen = sess.c2b_len if up else sess.b2c_len
            room = limit - qlen
            if room <= 0:
                return True
            try:
                data = src.recv(room)
            except OSError as exc:
                src.eof = 'read error from %s %s' % ('client' if up else 'backend',
                                                    _oserror_text(exc))
                return True
            if data is None:
                return True
            if not data:
                src.eof = 'client closed' if up else 'backend closed'
                return True
            n = len(data)
            if qlen == 0:
                try:
                    sent = dst.send(data)
                except OSError as exc:
                    self._close(sess, 'write error to %s %s' % ('backend' if up else 'client',
                                                               _oserror_text(exc)))
                    return False
                if up:
                    sess.bytes_in += sent
                else:
                    sess.bytes_out += sent
                if sent < n:
                    rest = memoryview(data)[sent:] if sent else data
                    if up:
                        sess.c2b = [rest]
                        sess.c2b_len = n - sent
                    else:
                        sess.b2c = [rest]
                        sess.b2c_len = n - sent
            else:
                if up:
                    sess.c2b.append(data)
                    sess.c2b_len += n
                else:
                    sess.b2c.append(data)
                    sess.b2c_len += n
            # Keep reading only if this read filled the space (more is probably waiting)
            # or the endpoint already holds decrypted bytes the selector cannot see.
            if n < room and not src.pending():
                return True
        return True

    def _flush(self, sess, dst, up, refill=True):
        """Write queued data to dst.  Returns False when the session was closed.

        refill: when the queue shrank, read its source again at once."""
        q = sess.c2b if up else sess.b2c
        sent_total = 0
        try:
            while q:
                head = q[0]
                hl = len(head)
                sent = dst.send(head)
                sent_total += sent
                if sent == hl:
                    q.pop(0)
                    continue
                if sent:
                    q[0] = (head if isinstance(head, memoryview) else memoryview(head))[sent:]
                break
        except OSError as exc:
            self._count(sess, up, sent_total)
            self._close(sess, 'write error to %s %s' % ('backend' if up else 'client',
                                                       _oserror_text(exc)))
            return False
        self._count(sess, up, sent_total)
        if up:
            sess.c2b_len -= sent_total
            if not q:
                sess.c2b = None
        else:
            sess.b2c_len -= sent_total
            if not q:
                sess.b2c = None
        if sent_total and refill:
            # The queue shrank: the side feeding it may read again now.  Try at once (its data
            # is usually already there, and a TLS endpoint may hold decrypted bytes).
            src = sess.c if up else sess.b
            if src.eof is None:
                limit = sess.cbuf if up else sess.pbuf
                qlen = sess.c2b_len if up else sess.b2c_len
                if qlen < limit and (qlen == 0 or src.pending()):
                    return self._pump(sess, src, dst, up)
        return True

    @staticmethod
    def _count(sess, up, n):
        if up:
            sess.bytes_in += n
        else:
            sess.bytes_out += n

    def _update(self, sess):
        """Register each endpoint for exactly the events it needs now."""
        c = sess.c
        b = sess.b
        # client
        mask = 0
        if c.eof is None and sess.c2b_len < sess.cbuf:
            mask = c.read_event()
        if sess.b2c is not None:
            mask |= c.write_event()
        if mask != c.mask:
            self._register(c, mask)
        if c.eof is None and sess.c2b_len < sess.cbuf and c.pending():
            self._ready.add(c)
        # backend
        mask = 0
        if b.eof is None and sess.b2c_len < sess.pbuf:
            mask = b.read_event()
        if sess.c2b is not None:
            mask |= b.write_event()
        if mask != b.mask:
            self._register(b, mask)
        if b.eof is None and sess.b2c_len < sess.pbuf and b.pending():
            self._ready.add(b)

    def _register(self, end, mask):
        sel = self._sel
        if end.mask == 0:
            sel.register(end.fd, mask, end)
        elif mask == 0:
            sel.unregister(end.fd)
        else:
            sel.modify(end.fd, mask, end)
        end.mask = mask

    # ---------------------------------------------------------------- timers and close

    def _expire(self, now):
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, sess = heapq.heappop(heap)
            if sess.closed:
                self._dead -= 1
                continue
            if sess.deadline > now:
                heapq.heappush(heap, (sess.deadline, sess))
                continue
            self._close(sess, 'client timed out')
            self._dead -= 1      # _close counted it as dead in the heap, but it has left it

    def _live_sessions(self):
        # every live session has exactly one heap entry (plus entries of closed ones)
        return [e[1] for e in self._heap if not e[1].closed]

    def _close(self, sess, reason, in_heap=True):
        if sess.closed:
            return
        sess.closed = True
        for end in (sess.c, sess.b):
            if end is None:
                continue
            if end.mask:
                # unregister before the close, for every endpoint: the selector's map would
                # otherwise keep a stale key and a reused descriptor number could not register
                try:
                    self._sel.unregister(end.fd)
                except (KeyError, ValueError, OSError):
                    pass
                end.mask = 0
            end.close()
            end.sess = None
        sess.c = sess.b = None
        sess.c2b = sess.b2c = None
        self._live -= 1
        heap = self._heap
        if in_heap:
            self._dead += 1
        if self._dead > 1024 and self._dead * 2 > len(heap):
            heap[:] = [e for e in heap if not e[1].closed]
            heapq.heapify(heap)
            self._dead = 0
        on_done, sess.on_done = sess.on_done, None
        duration = time.monotonic() - sess.t0
        stats = Stats(sess.name, sess.bytes_in, sess.bytes_out, time.time() - duration,
                      duration, reason)
        self._call_done(on_done, stats)

    def _call_done(self, on_done, stats):
        if on_done is None:
            return
        try:
            on_done(stats)
        except Exception:
            self._note('alert', 'relay: on_done failed: %s' % (traceback.format_exc(),))
