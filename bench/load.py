"""The load generator: functions that run in worker processes (multiprocessing, fork).

* `throughput_worker`  one blocking session: log in, then one 100 MB (or --quick size)
  FETCH / RETR download or SMTP DATA upload, read into one reused buffer; reports the
  transfer's start/end time.
* `rate_worker`        an epoll loop keeping C short sessions in flight until a deadline;
  each session is connect, greeting, login (through auth_http), one command, logout, EOF.
* `idle_worker`        an epoll loop opening N logged-in IMAP/POP3/SMTP sessions, holding
  them, then sending NOOP on all of them at once when told to, and closing them when told to.

Every loop is bounded by a count and by a deadline.
"""

import base64
import errno
import select
import socket
import time

from servers import CHUNK, raise_nofile

USER = b'benchuser'
PASS = b'benchpass'
PLAIN = base64.b64encode(b'\0' + USER + b'\0' + PASS)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# reply completeness checks: f(buf) -> None (incomplete) | True (good) | False (bad)

def line_ok(prefix):
    def check(buf):
        i = buf.find(b'\n')
        if i < 0:
            return None
        return buf.startswith(prefix)
    return check


def tagged(tag):
    """IMAP: complete when the line starting with `tag ` arrived; good when it says OK."""
    t = tag + b' '

    def check(buf):
        if buf.startswith(t):
            p = 0
        else:
            p = buf.find(b'\n' + t)
            if p < 0:
                return None
            p += 1
        if buf.find(b'\n', p) < 0:
            return None
        return buf.startswith(b'OK', p + len(t))
    return check


def smtp_code(code):
    """SMTP: complete at the last line (`NNN ` not `NNN-`); good when its code is `code`."""
    def check(buf):
        if not buf.endswith(b'\n'):
            return None
        i = buf.rfind(b'\n', 0, len(buf) - 1) + 1
        if len(buf) - i < 4 or buf[i + 3:i + 4] != b' ':
            return None
        return buf.startswith(code, i)
    return check


def greeting_check(proto):
    return {'imap': line_ok(b'* OK'), 'pop3': line_ok(b'+OK'), 'smtp': smtp_code(b'220')}[proto]


def login_steps(proto):
    """[(bytes to send, check)] after the greeting, up to a logged-in session."""
    if proto == 'imap':
        return [(b'a1 LOGIN ' + USER + b' ' + PASS + b'\r\n', tagged(b'a1'))]
    if proto == 'pop3':
        return [(b'USER ' + USER + b'\r\n', line_ok(b'+OK')),
                (b'PASS ' + PASS + b'\r\n', line_ok(b'+OK'))]
    return [(b'EHLO bench.client\r\n', smtp_code(b'250')),
            (b'AUTH PLAIN ' + PLAIN + b'\r\n', smtp_code(b'235'))]


def direct_login_steps(proto):
    """The same against a backend directly (no SMTP AUTH there: it would not be proxied)."""
    if proto == 'smtp':
        return [(b'EHLO bench.client\r\n', smtp_code(b'250'))]
    return login_steps(proto)


def command_step(proto, n=2):
    if proto == 'imap':
        tag = b'a%d' % n
        return (tag + b' NOOP\r\n', tagged(tag))
    if proto == 'pop3':
        return (b'NOOP\r\n', line_ok(b'+OK'))
    return (b'NOOP\r\n', smtp_code(b'250'))


def one_command_step(proto):
    """The 'one command' of a short session."""
    if proto == 'pop3':
        return (b'STAT\r\n', line_ok(b'+OK'))
    return command_step(proto, 2)


def logout_step(proto):
    if proto == 'imap':
        return (b'a9 LOGOUT\r\n', tagged(b'a9'))
    if proto == 'pop3':
        return (b'QUIT\r\n', line_ok(b'+OK'))
    return (b'QUIT\r\n', smtp_code(b'221'))


# ---------------------------------------------------------------------------------------------
# blocking client (throughput)

class SyncClient:
    def __init__(self, port, timeout=60.0, tls=None):
        self.sock = socket.create_connection(('127.0.0.1', port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:         # an ssl.SSLContext: implicit TLS, handshake here
            self.sock = tls.wrap_socket(self.sock)
        self.buf = b''

    def expect(self, check, what):
        while True:
            r = check(self.buf)
            if r is not None:
                if not r:
                    raise BenchError('%s: unexpected reply %r' % (what, self.buf[:200]))
                data, self.buf = self.buf, b''
                return data
            d = self.sock.recv(65536)
            if not d:
                raise BenchError('%s: connection closed (%r)' % (what, self.buf[:200]))
            self.buf += d

    def step(self, data, check, what):
        if data:
            self.sock.sendall(data)
        return self.expect(check, what)

    def readline(self):
        while b'\n' not in self.buf:
            d = self.sock.recv(65536)
            if not d:
                raise BenchError('connection closed in a line')
            self.buf += d
        i = self.buf.index(b'\n') + 1
        line, self.buf = self.buf[:i], self.buf[i:]
        return line

    def read_count(self, n, mv):
        """Read and drop exactly n bytes into the reused buffer `mv`."""
        take = min(n, len(self.buf))
        n -= take
        self.buf = self.buf[take:]
        recv_into = self.sock.recv_into
        size = len(mv)
        while n:
            got = recv_into(mv, n if n < size else size)
            if not got:
                raise BenchError('connection closed with %d body bytes missing' % n)
            n -= got
        return True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def throughput_worker(proto, port, size, direct, barrier, result_q, idx, tls=None):
    """One session moving `size` body bytes; puts (idx, ok, t0, t1, nbytes, error) on result_q.
    tls: an ssl.SSLContext for implicit TLS."""
    raise_nofile()
    mv = memoryview(bytearray(1 << 20))
    t0 = t1 = 0.0
    try:
        cl = SyncClient(port, tls=tls)
        cl.expect(greeting_check(proto), 'greeting')
        steps = direct_login_steps(proto) if direct else login_steps(proto)
        for data, check in steps:
            cl.step(data, check, 'login')
        barrier.wait(60)            # all logged in: the parent samples the proxy's CPU
        barrier.wait(60)            # go
        t0 = time.time()
        if proto == 'imap':
            cl.sock.sendall(b'a2 FETCH %d BODY[]\r\n' % size)
            head = cl.readline()
            if not head.startswith(b'* ') or not head.endswith(b'{%d}\r\n' % size):
                raise BenchError('FETCH: unexpected reply %r' % head[:200])
            cl.read_count(size, mv)
            cl.expect(tagged(b'a2'), 'FETCH end')
        elif proto == 'pop3':
            cl.sock.sendall(b'RETR %d\r\n' % size)
            head = cl.readline()
            if not head.startswith(b'+OK'):
                raise BenchError('RETR: unexpected reply %r' % head[:200])
            cl.read_count(size, mv)
            end = cl.readline()
            if end != b'.\r\n':
                raise BenchError('RETR: bad end %r' % end[:100])
        else:
            cl.step(b'MAIL FROM:<a@bench.local>\r\n', smtp_code(b'250'), 'MAIL')
            cl.step(b'RCPT TO:<b@bench.local>\r\n', smtp_code(b'250'), 'RCPT')
            cl.step(b'DATA\r\n', smtp_code(b'354'), 'DATA')
            chunk = memoryview(CHUNK)
            left = size
            sendall = cl.sock.sendall
            while left:
                n = left if left < len(chunk) else len(chunk)
                sendall(chunk[:n])
                left -= n
            cl.step(b'.\r\n', smtp_code(b'250'), 'end of DATA')
        t1 = time.time()
        data, check = logout_step(proto)
        cl.step(data, check, 'logout')
        cl.close()
        result_q.put((idx, True, t0, t1, size, ''))
    except Exception as e:  # reported, counted as an error
        try:
            barrier.abort()
        except Exception:
            pass
        result_q.put((idx, False, t0, t1 or time.time(), 0, '%s: %s' % (type(e).__name__, e)))


# ---------------------------------------------------------------------------------------------
# event-loop clients (session rate, idle sessions)

class Sess:
    __slots__ = ('sock', 'fd', 'steps', 'i', 'buf', 'out', 't0', 'state', 'deadline')


class Loop:
    """Non-blocking scripted sessions on one epoll."""

    def __init__(self, port):
        self.port = port
        self.ep = select.epoll()
        self.live = {}
        self.ok = 0
        self.errors = 0
        self.error_kinds = {}
        self.latencies = []

    def error(self, kind):
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def open(self, steps, now, timeout):
        s = Sess()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            self.error('socket: %s' % errno.errorcode.get(e.errno, e.errno))
            return None
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(('127.0.0.1', self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.error('connect: %s' % errno.errorcode.get(err, err))
            return None
        s.sock = sock
        s.fd = sock.fileno()
        s.steps = steps      # list of (send, check); the first send is None (greeting)
        s.i = 0
        s.buf = b''
        s.out = b''
        s.t0 = now
        s.state = 'connecting'
        s.deadline = now + timeout
        self.live[s.fd] = s
        self.ep.register(s.fd, EPOLLOUT)
        return s

    def close(self, s):
        if self.live.pop(s.fd, None) is None:
            return
        try:
            self.ep.unregister(s.fd)
        except OSError:
            pass
        try:
            s.sock.close()
        except OSError:
            pass

    def fail(self, s, kind):
        self.error(kind)
        self.close(s)

    def send(self, s, data):
        try:
            n = s.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self.fail(s, 'send: %s' % errno.errorcode.get(e.errno, e.errno))
            return False
        if n < len(data):
            s.out = data[n:]
            self.ep.modify(s.fd, EPOLLIN | EPOLLOUT)
        return True

    def event(self, s, ev, now, on_done):
        if s.state == 'connecting':
            err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(s, 'connect: %s' % errno.errorcode.get(err, err))
                return
            s.state = 'run'
            self.ep.modify(s.fd, EPOLLIN)
            return
        if s.out and ev & EPOLLOUT:
            data, s.out = s.out, b''
            if not self.send(s, data):
                return
            if not s.out:
                self.ep.modify(s.fd, EPOLLIN)
        if not ev & (EPOLLIN | EPOLLERR):
            return
        try:
            d = s.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.fail(s, 'recv: %s' % errno.errorcode.get(e.errno, e.errno))
            return
        if not d:
            if s.state == 'eof':
                self.close(s)
                on_done(s, now, 'eof')
                return
            self.fail(s, 'closed at step %d' % s.i)
            return
        if s.state == 'eof':
            return
        s.buf += d
        self.advance(s, now, on_done)

    def advance(self, s, now, on_done):
        if s.i >= len(s.steps):          # idle: nothing expected
            s.buf = b''
            return
        r = s.steps[s.i][1](s.buf)
        if r is None:
            return
        if not r:
            self.fail(s, 'bad reply at step %d: %r' % (s.i, s.buf[:60]))
            return
        sent = s.steps[s.i][0]
        s.buf = b''
        s.i += 1
        if s.i >= len(s.steps):
            on_done(s, now, 'done')
            return
        if self.after_reply(s, sent, now, on_done):
            return
        data = s.steps[s.i][0]
        if data:
            self.send(s, data)

    def after_reply(self, s, sent, now, on_done):
        """A step's reply came (`sent` was its command): True when the subclass took over
        (load_tls.TLSLoop starts TLS after STARTTLS), else the next command is sent."""
        return False

    def poll(self, timeout, on_done):
        try:
            events = self.ep.poll(timeout)
        except InterruptedError:
            return
        now = time.monotonic()
        live = self.live
        for fd, ev in events:
            s = live.get(fd)
            if s is not None:
                self.event(s, ev, now, on_done)

    def expire(self, now):
        for s in [s for s in self.live.values() if s.deadline < now]:
            self.fail(s, 'timeout at step %d (%s)' % (s.i, s.state))


def rate_steps(proto, direct):
    steps = [(None, greeting_check(proto))]
    steps += direct_login_steps(proto) if direct else login_steps(proto)
    steps.append(one_command_step(proto))
    steps.append(logout_step(proto))
    return steps


def rate_worker(proto, port, direct, conc, start_at, duration, max_sessions, result_q, idx,
                make_loop=Loop, steps=None):
    """Keep `conc` short sessions in flight from start_at for `duration` s (at most
    `max_sessions` started); then let the ones in flight finish (5 s at most).
    make_loop(port): the Loop (load_tls.TLSLoop for TLS); steps: the session's script."""
    raise_nofile()
    loop = make_loop(port)
    steps = steps or rate_steps(proto, direct)
    started = 0
    lat = loop.latencies
    end_times = []

    def on_done(s, now, what):
        if what == 'done':
            # full reply received: the session's latency; then wait for the server's EOF
            lat.append(now - s.t0)
            s.state = 'eof'
            s.deadline = now + 5.0
        else:
            loop.ok += 1
            end_times.append(now)

    while time.time() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - time.time())))
    t_start = time.monotonic()
    deadline = t_start + duration
    hard_end = deadline + 5.0
    last_expire = t_start
    while True:
        now = time.monotonic()
        if now < deadline:
            while len(loop.live) < conc and started < max_sessions:
                started += 1
                loop.open(steps, now, 10.0)
        elif not loop.live or now > hard_end:
            break
        loop.poll(0.05, on_done)
        if now - last_expire > 0.25:
            loop.expire(now)
            last_expire = now
    for s in list(loop.live.values()):
        loop.fail(s, 'unfinished at the end')
    # count sessions completed inside the window for the rate; all for latency
    in_window = sum(1 for t in end_times if t <= deadline)
    result_q.put((idx, dict(started=started, ok=loop.ok, in_window=in_window,
                            duration=duration, errors=loop.errors,
                            error_kinds=loop.error_kinds, latencies=lat,
                            last_end=(max(end_times) - t_start) if end_times else 0.0,
                            handshakes=getattr(loop, 'handshakes', 0),
                            reused=getattr(loop, 'reused', 0))))


def idle_worker(proto, port, direct, count, inflight, conn, idx, make_loop=Loop, steps=None):
    """Open `count` logged-in sessions (at most `inflight` logging in at once), report, then
    on 'noop' send a NOOP on every session at once and wait for all replies, on 'close'
    close everything.  conn: a multiprocessing Pipe end.  make_loop, steps: as rate_worker's."""
    raise_nofile()
    loop = make_loop(port)
    if not steps:
        steps = [(None, greeting_check(proto))]
        steps += direct_login_steps(proto) if direct else login_steps(proto)
    idle = []
    opened = 0
    open_fail = 0
    started = 0
    t0 = time.monotonic()

    def on_login(s, now, what):
        s.state = 'idle'
        s.deadline = float('inf')
        idle.append(s)

    hard_end = t0 + 120.0
    last_expire = t0
    while time.monotonic() < hard_end:
        now = time.monotonic()
        opening = opened - len(idle) - (loop.errors - open_fail)
        if started >= count and opening <= 0:
            break
        # near the end, few logins in flight: a proxy at its fd limit holds 2 fds per idle
        # session and up to 3 (client, auth_http, backend) per login
        limit = inflight if count - started > 4 * inflight else 2
        while opening < limit and started < count:
            started += 1
            if loop.open(steps, now, 30.0) is None:
                open_fail += 1
            else:
                opened += 1
                opening += 1
        loop.poll(0.05, on_login)
        if now - last_expire > 0.5:
            loop.expire(now)
            last_expire = now
    t_open = time.monotonic() - t0
    conn.send(('ready', dict(idle=len(idle), errors=loop.errors, error_kinds=dict(loop.error_kinds),
                             open_s=t_open, started=started)))
    # wait for the parent; keep serving events (a proxy closing a session is an error)
    while True:
        if conn.poll(0.05):
            msg = conn.recv()
            break
        loop.poll(0, on_login)
    if msg[0] == 'noop':
        start_at = msg[1]
        data, check = command_step(proto, 5)
        targets = [s for s in idle if loop.live.get(s.fd) is s]
        now = time.monotonic()
        for s in targets:
            s.i = 0
            s.steps = [(data, check)]
            s.state = 'noop'
            s.buf = b''
            s.deadline = now + 60.0
        answered = []

        def on_noop(s, now, what):
            s.state = 'idle2'
            answered.append(now)
        while time.time() < start_at:
            time.sleep(0.001)
        t1 = time.monotonic()
        w1 = time.time()
        errs_before = loop.errors
        for s in targets:
            if loop.live.get(s.fd) is s:
                loop.send(s, data)
        end = t1 + 60.0
        while len(answered) + (loop.errors - errs_before) < len(targets) and time.monotonic() < end:
            loop.poll(0.05, on_noop)
        last = max(answered) if answered else t1
        conn.send(('noop', dict(answered=len(answered), sent=len(targets),
                                errors=loop.errors - errs_before,
                                error_kinds=dict(loop.error_kinds),
                                start_wall=w1, last_wall=w1 + (last - t1))))
        while not conn.poll(0.05):
            loop.poll(0, on_noop)
        conn.recv()
    for s in list(loop.live.values()):
        loop.close(s)
    conn.send(('closed', None))
