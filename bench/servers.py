"""Fast scripted backends (IMAP, POP3, SMTP) and a raw-socket auth_http service for the bench.

Each server is one epoll loop in a process of its own (started by run.py with
multiprocessing).  Nothing holds a large body in memory:

* IMAP `tag FETCH <N> BODY[]` and POP3 `RETR <N>` stream an N-byte message made of one
  1 MB chunk of 100-byte lines repeated (the message number *is* its size, so the load
  generator picks the size per request; N at most 100 GB).
* SMTP `DATA` swallows the body with `recv_into` into one shared buffer while it looks for
  `CRLF.CRLF` (also across read boundaries), then answers 250.
* Every other command gets a short positive answer; LOGOUT / QUIT answer and close.

The auth service answers every request with `Auth-Status: OK` and the backend port of the
request's `Auth-Protocol`: HTTP/1.0 style (one request per connection, server closes) to
nginx's HTTP/1.0 requests, and keeping the connection open (Content-Length: 0) for HTTP/1.1
requests (mailproxy's auth_http_keepalive).

For bench/soak.py two options (off for run.py, whose figures they would change):
* `hash_data`: SMTP `DATA` also feeds the body, up to and including the final `.CRLF`, to
  sha256 and answers `250 2.0.0 Ok: queued sha256=<hex>`, so a client can check every byte.
* `drain_on_term`: SIGTERM stops accepting and ends the process once the connections it
  accepted are answered (2 s at most), so a restart on the same inherited listening socket
  loses no request.
"""

import errno
import hashlib
import resource
import select
import signal
import socket
import time

CHUNK_LINE = b"Y" * 98 + b"\r\n"               # 100 bytes, never starts with "."
CHUNK = CHUNK_LINE * 10000                       # 1,000,000 bytes
MAX_BODY = 100 * 10 ** 9

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def body_chunks_view():
    return memoryview(CHUNK)


def listen_socket(host, port, backlog=4096):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(backlog)
    s.setblocking(False)
    return s


class Conn:
    __slots__ = ('sock', 'fd', 'rbuf', 'out', 'stream', 'tail', 'close_after', 'mask',
                 'state', 'literal', 'pending_line', 'data_tail', 'digest')

    def __init__(self, sock):
        self.sock = sock
        self.fd = sock.fileno()
        self.rbuf = b''
        self.out = []            # bytes / memoryview pieces to write, in order
        self.stream = 0          # body bytes still to produce after `out`
        self.tail = b''          # written after the streamed body
        self.close_after = False
        self.mask = EPOLLIN
        self.state = 'cmd'       # 'cmd', 'literal' (IMAP), 'data' (SMTP DATA)
        self.literal = 0
        self.pending_line = b''
        self.data_tail = b''
        self.digest = None


class Server:
    """One epoll loop serving one protocol ('imap', 'pop3', 'smtp') or 'auth'."""

    def __init__(self, proto, lsock, ports=None, hash_data=False):
        self.proto = proto
        self.hash_data = hash_data
        self.draining = False
        self.lsock = lsock
        self.ports = ports or {}
        self.ep = select.epoll()
        self.conns = {}
        self.buf = bytearray(1 << 20)
        self.bufview = memoryview(self.buf)
        self.chunk = memoryview(CHUNK)

    # -- loop ------------------------------------------------------------------------------
    def serve(self):
        ep = self.ep
        lfd = self.lsock.fileno()
        ep.register(lfd, EPOLLIN)
        conns = self.conns
        drain_end = None
        while True:
            if self.draining:
                if drain_end is None:
                    drain_end = time.monotonic() + 2.0
                    ep.unregister(lfd)
                if not conns or time.monotonic() > drain_end:
                    return
            try:
                events = ep.poll(0.1 if self.draining else 1.0)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == lfd:
                    self._accept()
                    continue
                c = conns.get(fd)
                if c is None:
                    continue
                try:
                    if ev & (EPOLLIN | EPOLLERR):
                        if not self._read(c):
                            continue
                    if ev & EPOLLOUT or (c.out or c.stream):
                        self._write(c)
                except OSError:
                    self._close(c)

    def _accept(self):
        for _ in range(256):
            try:
                s, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    return
                raise
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Conn(s)
            self.conns[c.fd] = c
            self.ep.register(c.fd, EPOLLIN)
            if self.proto == 'imap':
                c.out.append(b'* OK IMAP4rev1 bench ready\r\n')
            elif self.proto == 'pop3':
                c.out.append(b'+OK bench ready\r\n')
            elif self.proto == 'smtp':
                c.out.append(b'220 bench.local ESMTP ready\r\n')
            if c.out:
                self._write(c)

    def _close(self, c):
        if self.conns.pop(c.fd, None) is None:
            return
        try:
            self.ep.unregister(c.fd)
        except OSError:
            pass
        try:
            c.sock.close()
        except OSError:
            pass

    def _want(self, c, mask):
        if mask != c.mask:
            self.ep.modify(c.fd, mask)
            c.mask = mask

    # -- reading ---------------------------------------------------------------------------
    def _read(self, c):
        if c.state == 'data':
            return self._swallow(c)
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        if not data:
            self._close(c)
            return False
        if self.proto == 'auth':
            return self._auth(c, data)
        c.rbuf += data
        while True:
            if c.state == 'literal':
                if len(c.rbuf) < c.literal:
                    break
                c.pending_line += c.rbuf[:c.literal]
                c.rbuf = c.rbuf[c.literal:]
                c.state = 'cmd'
            if c.state == 'data':
                # bytes that arrived with the DATA command: swallow them from rbuf
                rest, c.rbuf = c.rbuf, b''
                if rest:
                    self._data_bytes(c, rest)
                break
            i = c.rbuf.find(b'\n')
            if i < 0:
                if len(c.rbuf) > 65536:
                    self._close(c)
                    return False
                break
            line = c.pending_line + c.rbuf[:i + 1]
            c.rbuf = c.rbuf[i + 1:]
            c.pending_line = b''
            if self.proto == 'imap' and line.endswith(b'}\r\n'):
                j = line.rfind(b'{')
                num = line[j + 1:-3]
                plus = num.endswith(b'+')
                if plus:
                    num = num[:-1]
                if j >= 0 and num.isdigit():
                    c.pending_line = line
                    c.literal = int(num)
                    c.state = 'literal'
                    if not plus:
                        c.out.append(b'+ go ahead\r\n')
                    continue
            self._command(c, line)
            if c.close_after:
                break
        if c.out or c.stream:
            self._write(c)
        return c.fd in self.conns

    def _swallow(self, c):
        try:
            n = c.sock.recv_into(self.buf)
        except (BlockingIOError, InterruptedError):
            return True
        if not n:
            self._close(c)
            return False
        self._data_bytes(c, self.bufview[:n], n)
        if c.out:
            self._write(c)
        return c.fd in self.conns

    def _data_bytes(self, c, view, n=None):
        """Consume DATA body bytes; on CRLF.CRLF answer 250 and go back to commands."""
        if n is None:
            n = len(view)
        tail = c.data_tail
        joint = tail + bytes(view[:4])
        k = joint.find(b'\r\n.\r\n')
        if k >= 0:
            end = k + 5 - len(tail)
        else:
            if isinstance(view, memoryview):
                k = self.buf.find(b'\r\n.\r\n', 0, n)
            else:
                k = view.find(b'\r\n.\r\n')
            end = k + 5 if k >= 0 else -1
        if end < 0:
            c.data_tail = (tail + bytes(view[max(0, n - 4):n]))[-4:]
            if self.hash_data:
                c.digest.update(view[:n])
            return
        rest = bytes(view[end:n])
        c.data_tail = b''
        c.state = 'cmd'
        if self.hash_data:
            c.digest.update(view[:end])
            c.out.append(b'250 2.0.0 Ok: queued sha256=%s\r\n'
                         % c.digest.hexdigest().encode())
            c.digest = None
        else:
            c.out.append(b'250 2.0.0 Ok: queued\r\n')
        if rest:
            c.rbuf = rest + c.rbuf
            while c.state == 'cmd':          # further pipelined commands
                i = c.rbuf.find(b'\n')
                if i < 0:
                    break
                line, c.rbuf = c.rbuf[:i + 1], c.rbuf[i + 1:]
                self._command(c, line)

    # -- commands --------------------------------------------------------------------------
    def _command(self, c, line):
        p = self.proto
        if p == 'imap':
            parts = line.split(None, 3)
            tag = parts[0] if parts else b'*'
            verb = parts[1].upper() if len(parts) > 1 else b''
            if verb == b'FETCH' and len(parts) > 2 and parts[2].isdigit():
                n = min(int(parts[2]), MAX_BODY)
                c.out.append(b'* %d FETCH (BODY[] {%d}\r\n' % (n, n))
                c.stream = n
                c.tail = b')\r\n' + tag + b' OK FETCH completed\r\n'
            elif verb == b'LOGOUT':
                c.out.append(b'* BYE bench logging out\r\n' + tag + b' OK LOGOUT completed\r\n')
                c.close_after = True
            elif verb == b'CAPABILITY':
                c.out.append(b'* CAPABILITY IMAP4rev1\r\n' + tag + b' OK CAPABILITY completed\r\n')
            else:
                c.out.append(tag + b' OK ' + (verb or b'X') + b' completed\r\n')
        elif p == 'pop3':
            parts = line.split()
            verb = parts[0].upper() if parts else b''
            if verb == b'RETR' and len(parts) > 1 and parts[1].isdigit():
                n = min(int(parts[1]), MAX_BODY)
                c.out.append(b'+OK %d octets\r\n' % n)
                c.stream = n
                c.tail = b'.\r\n'
            elif verb == b'QUIT':
                c.out.append(b'+OK bye\r\n')
                c.close_after = True
            elif verb == b'STAT':
                c.out.append(b'+OK 1 1000000\r\n')
            else:
                c.out.append(b'+OK\r\n')
        else:  # smtp
            verb = line[:4].upper()
            if verb == b'EHLO':
                c.out.append(b'250-bench.local\r\n250-PIPELINING\r\n250 8BITMIME\r\n')
            elif verb == b'XCLI':
                c.out.append(b'220 bench.local ESMTP ready\r\n')
            elif verb == b'DATA':
                c.out.append(b'354 End data with <CR><LF>.<CR><LF>\r\n')
                c.state = 'data'
                c.data_tail = b'\r\n'      # the body may end right away with ".\r\n"
                if self.hash_data:
                    c.digest = hashlib.sha256()
            elif verb == b'QUIT':
                c.out.append(b'221 2.0.0 Bye\r\n')
                c.close_after = True
            else:
                c.out.append(b'250 2.0.0 Ok\r\n')

    def _auth(self, c, data):
        c.rbuf += data
        while b'\r\n\r\n' in c.rbuf and not c.close_after:
            end = c.rbuf.index(b'\r\n\r\n') + 4
            head, c.rbuf = c.rbuf[:end], c.rbuf[end:]
            c.out.append(self._auth_answer(c, head))
        if len(c.rbuf) > 65536:
            self._close(c)
            return False
        if c.out:
            self._write(c)
        return c.fd in self.conns

    def _auth_answer(self, c, head):
        """nginx's HTTP/1.0 request gets HTTP/1.0 and close; an HTTP/1.1 one asking for
        keep-alive (mailproxy's auth_http_keepalive) gets Content-Length and stays open."""
        lower = head.lower()
        proto = b''
        i = lower.find(b'\nauth-protocol:')
        if i >= 0:
            j = head.find(b'\r\n', i + 1)
            proto = head[i + 15:j].strip().lower()
        keep = (head[:head.find(b'\r\n')].endswith(b'HTTP/1.1')
                and b'\nconnection: close' not in lower)
        port = self.ports.get(proto.decode('ascii', 'replace'))
        if port is None:
            fields = b'Auth-Status: Invalid login or password\r\nAuth-Wait: 0\r\n'
        else:
            fields = (b'Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n'
                      b'Auth-Port: %d\r\n' % port)
        if keep:
            return b'HTTP/1.1 200 OK\r\n' + fields + b'Content-Length: 0\r\n\r\n'
        c.close_after = True
        return b'HTTP/1.0 200 OK\r\n' + fields + b'\r\n'

    # -- writing ---------------------------------------------------------------------------
    def _write(self, c):
        sock = c.sock
        for _ in range(64):
            if c.out:
                head = c.out[0]
                try:
                    n = sock.send(head)
                except (BlockingIOError, InterruptedError):
                    self._want(c, EPOLLIN | EPOLLOUT)
                    return
                if n < len(head):
                    c.out[0] = memoryview(head)[n:]
                    self._want(c, EPOLLIN | EPOLLOUT)
                    return
                c.out.pop(0)
                continue
            if c.stream:
                n = c.stream if c.stream < len(self.chunk) else len(self.chunk)
                try:
                    sent = sock.send(self.chunk[:n])
                except (BlockingIOError, InterruptedError):
                    self._want(c, EPOLLIN | EPOLLOUT)
                    return
                c.stream -= sent
                if not c.stream and c.tail:
                    c.out.append(c.tail)
                    c.tail = b''
                continue
            break
        if c.out or c.stream:
            self._want(c, EPOLLIN | EPOLLOUT)
            return
        if c.close_after:
            self._close(c)
            return
        self._want(c, EPOLLIN)


def serve(proto, host, port, ports=None, ready=None, lsock=None, hash_data=False,
          drain_on_term=False):
    """Process entry point: serve forever (the parent ends us with SIGTERM)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile()
    if lsock is None:
        lsock = listen_socket(host, port)
    srv = Server(proto, lsock, ports, hash_data=hash_data)
    if drain_on_term:
        def drain(signo, frame):
            srv.draining = True
        signal.signal(signal.SIGTERM, drain)
    if ready is not None:
        ready.send(lsock.getsockname()[1])
        ready.close()
    srv.serve()
