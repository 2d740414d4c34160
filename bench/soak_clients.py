"""The soak's clients (bench/soak.py), each run in a process of its own (multiprocessing, fork).

* `idle_holder`  one selectors loop opening N logged-in IMAP sessions over TLS (even numbers
  implicit TLS, odd numbers STARTTLS), ramped (few handshakes in flight, spread over the ramp
  time), holding them, noting any the proxy closes, and at the end sending NOOP on all.
* `looper`       threads of blocking TLS sessions looping connect / log in / move 1 MB
  (IMAP FETCH, POP3 RETR: sha256 of the body; SMTP DATA: the backend's sha256 in its 250
  reply) / log out, alternating implicit TLS and STARTTLS.
* `dribbler`     one selectors loop holding M pre-login connections, each sending one byte
  every 2 s and never logging in; a connection the proxy closes is opened again.

Legitimate clients use source addresses 127.0.0.10-209 (idle) and 127.0.0.2-9 (loops), the
dribblers 127.0.1.x, so caps per address would hit the dribblers, not the users.  Every loop
is bounded in count and in time.
"""

import errno
import hashlib
import selectors
import socket
import ssl
import threading
import time

from load import PLAIN, USER, PASS
from servers import CHUNK, raise_nofile

BODY = len(CHUNK)                                  # 1,000,000 bytes
BODY_SHA = hashlib.sha256(CHUNK).hexdigest()
DATA_SHA = hashlib.sha256(CHUNK + b'.\r\n').hexdigest()   # what servers.py hashes for DATA
HOST = '127.0.0.1'


def client_context(cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = True
    return ctx


def idle_src(i):
    return '127.0.0.%d' % (10 + i % 200)


# ---------------------------------------------------------------------------------------------
# idle sessions

class Idle:
    __slots__ = ('n', 'sock', 'state', 'buf', 'out', 't0', 'deadline', 'tls')


def idle_holder(ports, cafile, count, ramp_s, inflight, conn):
    """ports: {'imaps': port, 'imap': port}.  conn: a Pipe end; messages out:
    ('ready', stats) when all are opened or the ramp time + 60 s is over, ('final', stats)
    after the parent's 'check'."""
    raise_nofile()
    ctx = client_context(cafile)
    sel = selectors.DefaultSelector()
    live = {}
    stats = dict(logged_in=0, login_fail=0, fail_kinds={}, fail_times=[], login_times=[],
                 closed_idle=0, closed_times=[])
    t_begin = time.monotonic()

    def fail(s, kind, now):
        if s.state in ('idle', 'noop', 'bad'):
            stats['closed_idle'] += 1
            stats['closed_times'].append(now - t_begin)
        elif s.state != 'done':
            stats['login_fail'] += 1
            stats['fail_times'].append(now - t_begin)
            k = '%s at %s' % (kind, s.state)
            stats['fail_kinds'][k] = stats['fail_kinds'].get(k, 0) + 1
        s.state = 'dead'
        close(s)

    def close(s):
        if live.pop(s.sock.fileno(), None) is not None:
            sel.unregister(s.sock)
        try:
            s.sock.close()
        except OSError:
            pass

    def want(s, events):
        sel.modify(s.sock, events, s)

    def send(s, data, now):
        s.out += data
        try:
            k = s.sock.send(s.out)
            s.out = s.out[k:]
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass
        except OSError as e:
            fail(s, 'send %s' % errno.errorcode.get(e.errno, e.errno), now)
            return
        want(s, selectors.EVENT_READ | (selectors.EVENT_WRITE if s.out else 0))

    def open_one(n, now):
        s = Idle()
        s.n, s.buf, s.out, s.t0, s.deadline = n, b'', b'', now, now + 30.0
        s.tls = n % 2 == 0
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((idle_src(n), 0))
        except OSError:
            sock.close()
            stats['login_fail'] += 1
            stats['fail_kinds']['bind'] = stats['fail_kinds'].get('bind', 0) + 1
            return
        sock.connect_ex((HOST, ports['imaps' if s.tls else 'imap']))
        s.sock = sock
        s.state = 'connect'
        live[sock.fileno()] = s
        sel.register(sock, selectors.EVENT_WRITE, s)

    def handshake(s, now):
        try:
            s.sock.do_handshake()
        except ssl.SSLWantReadError:
            want(s, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            want(s, selectors.EVENT_WRITE)
            return
        except (OSError, ssl.SSLError) as e:
            fail(s, 'handshake %s' % type(e).__name__, now)
            return
        want(s, selectors.EVENT_READ)
        if s.state == 'hs-implicit':
            s.state = 'greet'
        else:
            s.state = 'login'
            send(s, b'a1 LOGIN %s %s\r\n' % (USER, PASS), now)

    def start_tls(s):
        sel.unregister(s.sock)
        del live[s.sock.fileno()]
        s.sock = ctx.wrap_socket(s.sock, server_hostname='localhost',
                                 do_handshake_on_connect=False)
        live[s.sock.fileno()] = s
        sel.register(s.sock, selectors.EVENT_READ, s)

    def on_line(s, line, now):
        st = s.state
        if st == 'greet' and line.startswith(b'* OK'):
            if s.tls:
                s.state = 'login'
                send(s, b'a1 LOGIN %s %s\r\n' % (USER, PASS), now)
            else:
                s.state = 'stls'
                send(s, b's1 STARTTLS\r\n', now)
        elif st == 'stls' and line.startswith(b's1 OK'):
            s.state = 'hs-starttls'
            start_tls(s)
            handshake(s, now)
        elif st == 'login' and line.startswith(b'a1 '):
            if not line.startswith(b'a1 OK'):
                fail(s, 'refused', now)
                return
            s.state = 'idle'
            s.deadline = float('inf')
            stats['logged_in'] += 1
            stats['login_times'].append(now - s.t0)
        elif st == 'noop' and line.startswith(b'n1 '):
            s.state = 'done' if line.startswith(b'n1 OK') else 'bad'
            stats['answered' if s.state == 'done' else 'bad_noop'] = \
                stats.get('answered' if s.state == 'done' else 'bad_noop', 0) + 1
        elif st in ('idle', 'noop', 'done') and line.startswith(b'* BYE'):
            pass                        # the close that follows is what counts
        elif not line.startswith(b'*'):
            fail(s, 'unexpected %r' % line[:30], now)

    def readable(s, now):
        while True:
            try:
                d = s.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except (OSError, ssl.SSLError) as e:
                fail(s, 'recv %s' % type(e).__name__, now)
                return
            if not d:
                fail(s, 'closed', now)
                return
            s.buf += d
            while s.state != 'dead':
                i = s.buf.find(b'\n')
                if i < 0:
                    break
                line, s.buf = s.buf[:i + 1], s.buf[i + 1:]
                on_line(s, line, now)
            if s.state in ('dead', 'hs-starttls'):
                return

    def event(s, mask, now):
        if s.state == 'connect':
            err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                fail(s, 'connect %s' % errno.errorcode.get(err, err), now)
                return
            if s.tls:
                s.state = 'hs-implicit'
                start_tls(s)
                handshake(s, now)
            else:
                s.state = 'greet'
                want(s, selectors.EVENT_READ)
            return
        if s.state.startswith('hs-'):
            handshake(s, now)
            return
        if mask & selectors.EVENT_WRITE and s.out:
            send(s, b'', now)
            if s.state == 'dead':
                return
        if mask & selectors.EVENT_READ:
            readable(s, now)

    def pump(timeout):
        now = time.monotonic()
        for key, mask in sel.select(timeout):
            s = key.data
            if s.state != 'dead':
                event(s, mask, time.monotonic())
        return now

    started = 0
    ramp_end = t_begin + ramp_s
    hard_end = ramp_end + 60.0
    last_expire = t_begin
    while time.monotonic() < hard_end:
        now = time.monotonic()
        opening = started - stats['logged_in'] - stats['login_fail']
        if started >= count and opening <= 0:
            break
        due = count if now >= ramp_end else int(count * (now - t_begin) / ramp_s) + 1
        while started < min(due, count) and opening < inflight:
            open_one(started, now)
            started += 1
            opening += 1
        pump(0.02)
        if now - last_expire > 0.5:
            last_expire = now
            for s in [s for s in live.values() if s.deadline < now]:
                fail(s, 'timeout', now)
    stats['opened_s'] = time.monotonic() - t_begin
    stats['started'] = started
    conn.send(('ready', dict(stats, login_times=[])))
    while not conn.poll(0):                  # hold; a close by the proxy is noted
        now = pump(0.2)
        for s in [s for s in live.values() if s.deadline < now]:
            fail(s, 'timeout', now)
    conn.recv()
    now = time.monotonic()
    stats['alive_at_check'] = 0
    for s in list(live.values()):
        if s.state == 'idle':
            stats['alive_at_check'] += 1
            s.state = 'noop'
            s.deadline = now + 30.0
            send(s, b'n1 NOOP\r\n', now)
    end = now + 30.0
    while time.monotonic() < end:
        if not any(s.state == 'noop' for s in live.values()):
            break
        pump(0.05)
    stats['noop_s'] = time.monotonic() - now
    stats['unanswered'] = sum(1 for s in live.values() if s.state == 'noop')
    for s in list(live.values()):
        close(s)
    conn.send(('final', stats))


# ---------------------------------------------------------------------------------------------
# looping sessions

class Lines:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b''

    def line(self):
        while b'\n' not in self.buf:
            d = self.sock.recv(65536)
            if not d:
                raise EOFError('closed')
            self.buf += d
            if len(self.buf) > 65536:
                raise ValueError('line too long')
        i = self.buf.index(b'\n') + 1
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def expect(self, prefix, what):
        while True:
            ln = self.line()
            if ln.startswith(prefix):
                return ln
            if not ln.startswith(b'*') and not ln[3:4] == b'-':
                raise ValueError('%s: %r' % (what, ln[:60]))

    def send(self, data):
        self.sock.sendall(data)

    def body_sha(self, n):
        """Read exactly n bytes, return (sha256 hex, bytes read)."""
        h = hashlib.sha256()
        take = self.buf[:n]
        self.buf = self.buf[n:]
        h.update(take)
        got = len(take)
        while got < n:
            d = self.sock.recv(min(65536, n - got))
            if not d:
                return h.hexdigest(), got
            h.update(d)
            got += len(d)
        return h.hexdigest(), got


def one_session(proto, implicit, ports, ctx, src, timeout):
    """One loop iteration; returns (login_s or None, error or None, phase, bytes_ok)."""
    t0 = time.monotonic()
    port = ports[proto + 's' if implicit else proto]
    phase = 'connect'
    sock = None
    try:
        sock = socket.create_connection((HOST, port), timeout=timeout, source_address=(src, 0))
        if implicit:
            phase = 'handshake'
            sock = ctx.wrap_socket(sock, server_hostname='localhost')
        r = Lines(sock)
        phase = 'greeting'
        r.expect({'imap': b'* OK', 'pop3': b'+OK', 'smtp': b'220 '}[proto], phase)
        if proto == 'smtp':
            r.send(b'EHLO soak.client\r\n')
            r.expect(b'250 ', 'EHLO')
        if not implicit:
            phase = 'starttls'
            r.send({'imap': b's1 STARTTLS\r\n', 'pop3': b'STLS\r\n',
                    'smtp': b'STARTTLS\r\n'}[proto])
            r.expect({'imap': b's1 OK', 'pop3': b'+OK', 'smtp': b'220 '}[proto], phase)
            phase = 'handshake'
            sock = ctx.wrap_socket(sock, server_hostname='localhost')
            r = Lines(sock)
            if proto == 'smtp':
                r.send(b'EHLO soak.client\r\n')
                r.expect(b'250 ', 'EHLO')
        phase = 'login'
        if proto == 'imap':
            r.send(b'a1 LOGIN %s %s\r\n' % (USER, PASS))
            r.expect(b'a1 OK', phase)
        elif proto == 'pop3':
            r.send(b'USER %s\r\n' % USER)
            r.expect(b'+OK', phase)
            r.send(b'PASS %s\r\n' % PASS)
            r.expect(b'+OK', phase)
        else:
            r.send(b'AUTH PLAIN %s\r\n' % PLAIN)
            r.expect(b'235 ', phase)
        login_s = time.monotonic() - t0
    except (OSError, EOFError, ValueError, ssl.SSLError) as e:
        if sock is not None:
            sock.close()
        return None, '%s: %s' % (type(e).__name__, str(e)[:60]), phase, 0
    phase = 'transfer'
    try:
        if proto == 'imap':
            r.send(b'a2 FETCH %d BODY[]\r\n' % BODY)
            r.expect(b'* ', phase)
            digest, got = r.body_sha(BODY)
            if r.line() != b')\r\n':
                raise ValueError('FETCH: bad end')
            r.expect(b'a2 OK', phase)
        elif proto == 'pop3':
            r.send(b'RETR %d\r\n' % BODY)
            r.expect(b'+OK', phase)
            digest, got = r.body_sha(BODY)
            if r.line() != b'.\r\n':
                raise ValueError('RETR: bad end')
        else:
            r.send(b'MAIL FROM:<soak@bench.local>\r\n')
            r.expect(b'250 ', phase)
            r.send(b'RCPT TO:<user@bench.local>\r\n')
            r.expect(b'250 ', phase)
            r.send(b'DATA\r\n')
            r.expect(b'354 ', phase)
            r.send(CHUNK + b'.\r\n')
            ln = r.expect(b'250 ', phase)
            digest = ln.rsplit(b'sha256=', 1)[-1].strip().decode('ascii', 'replace')
            got = BODY
        if digest != (DATA_SHA if proto == 'smtp' else BODY_SHA):
            raise ValueError('sha256 mismatch (%d bytes read)' % got)
        phase = 'logout'
        r.send({'imap': b'a9 LOGOUT\r\n', 'pop3': b'QUIT\r\n', 'smtp': b'QUIT\r\n'}[proto])
        r.expect({'imap': b'a9 OK', 'pop3': b'+OK', 'smtp': b'221 '}[proto], phase)
        return login_s, None, phase, BODY
    except (OSError, EOFError, ValueError, ssl.SSLError) as e:
        return login_s, '%s: %s' % (type(e).__name__, str(e)[:60]), phase, \
            BODY if phase == 'logout' else 0
    finally:
        sock.close()


def looper(proto, ports, cafile, threads, start_at, end_at, pause, idx, result_q):
    """`threads` sequential loops of one protocol until end_at (time.time())."""
    raise_nofile()
    ctx = client_context(cafile)
    lock = threading.Lock()
    res = dict(proto=proto, sessions=0, ok=0, login_fail=0, broken=0, bytes_ok=0,
               bytes_lost=0, login_times=[], errors={}, error_times=[])

    def run(k):
        src = '127.0.0.%d' % (2 + (idx * threads + k) % 8)
        i = k
        for _ in range(100000):
            if time.time() >= end_at:
                return
            login_s, err, phase, nbytes = one_session(proto, i % 2 == 0, ports, ctx, src, 30.0)
            i += 1
            with lock:
                res['sessions'] += 1
                if login_s is not None:
                    res['login_times'].append(login_s)
                if err is None:
                    res['ok'] += 1
                    res['bytes_ok'] += nbytes
                else:
                    res['login_fail' if login_s is None else 'broken'] += 1
                    if login_s is not None and phase == 'transfer':
                        res['bytes_lost'] += BODY
                    key = '%s %s %s' % (proto, phase, err)
                    res['errors'][key] = res['errors'].get(key, 0) + 1
                    res['error_times'].append(round(time.time() - start_at, 1))
            time.sleep(pause)

    ths = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(max(1.0, end_at - time.time() + 60.0))
    result_q.put(('loop', res))


# ---------------------------------------------------------------------------------------------
# dribbling pre-login connections

def dribbler(ports, count, end_at, result_q):
    """`count` connections spread over the plain IMAP/POP3/SMTP ports, one byte each every
    2 s (phases spread), never a complete line; reopened when the proxy closes them."""
    raise_nofile()
    sel = selectors.DefaultSelector()
    slots = {}
    res = dict(opened=0, closed_by_proxy=0, open_fail=0, bytes_sent=0, max_open=0, closed_at=[])
    names = ['imap', 'pop3', 'smtp']
    pattern = b'a1 LOGIN dribble' + b'x' * 64

    def open_slot(k, now):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.bind(('127.0.1.%d' % (1 + k % 4), 0))
        except OSError:
            s.close()
            res['open_fail'] += 1
            return
        s.connect_ex((HOST, ports[names[k % 3]]))
        slots[k] = [s, now + 2.0 * k / max(1, count), 0]
        sel.register(s, selectors.EVENT_READ, k)
        res['opened'] += 1

    t = time.monotonic()
    for k in range(count):
        open_slot(k, t)
    t_wall = time.time()
    wall_end = end_at - time.time() + time.monotonic()
    while time.monotonic() < wall_end:
        now = time.monotonic()
        for key, _ in sel.select(0.1):
            k = key.data
            s = slots[k][0]
            try:
                d = s.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                d = b''
            if not d:
                sel.unregister(s)
                s.close()
                del slots[k]
                res['closed_by_proxy'] += 1
                res['closed_at'].append(now - t)
                if res['opened'] < count * 20:
                    open_slot(k, now)
        res['max_open'] = max(res['max_open'], len(slots))
        for k, slot in list(slots.items()):
            if slot[1] <= now:
                s, _, i = slot
                try:
                    s.send(pattern[i % len(pattern):i % len(pattern) + 1])
                    res['bytes_sent'] += 1
                except OSError:
                    pass
                slot[1] = now + 2.0
                slot[2] = i + 1
    for slot in slots.values():
        slot[0].close()
    res['t0_wall'] = t_wall
    result_q.put(('dribble', res))
