"""The load generator's TLS side (bench/run.py's tls-* scenarios), run in the same worker
processes as load.py's loops.

* `client_context(mode)`   'full' (TLS 1.3, a new session every time), 'id' (TLS 1.2 without
  tickets: resumed by session ID from the server's cache), 'ticket' (TLS 1.3 ticket).
* `TLSLoop`                load.Loop with TLS: implicit (handshake right after the connect) or
  STARTTLS (the handshake after the reply to the STARTTLS step); non-blocking throughout
  (SSLWantRead/SSLWantWrite move the session's epoll interest); TCP_QUICKACK unless told not
  to (bench/README.md, "TLS").  For the resumed modes it
  first makes one blocking session and keeps its ssl.SSLSession: every session of this process
  then offers it (one session per client process, reused for all its connections; replaced by
  the new one when a TLS 1.2 server did not resume it).
* `rate_steps`, `idle_steps`  the scripts: greeting, (STARTTLS,) login, (logout).

Every loop is load.py's, bounded in count and time.
"""

import errno
import socket
import ssl

import load

STARTTLS = b's1 STARTTLS\r\n'


def client_context(mode):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False          # the proxy's CPU is measured, not the client's checks
    ctx.verify_mode = ssl.CERT_NONE
    if mode == 'id':
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_TICKET
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def rate_steps(proto='imap'):
    """One short TLS session: greeting, login, logout (the server then closes)."""
    return ([(None, load.greeting_check(proto))] + load.login_steps(proto)
            + [load.logout_step(proto)])


def idle_steps(starttls):
    """Up to a logged-in IMAP session, over implicit TLS or STARTTLS on the plain port."""
    steps = [(None, load.greeting_check('imap'))]
    if starttls:
        steps.append((STARTTLS, load.tagged(b's1')))
    return steps + load.login_steps('imap')


def first_session(port, ctx, timeout=10.0):
    """One blocking IMAP session (greeting, LOGOUT, the server's close); its ssl.SSLSession.
    The greeting is read before taking it: TLS 1.3 tickets come after the handshake."""
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as raw:
        s = ctx.wrap_socket(raw)
        buf = b''
        while b'\n' not in buf:
            d = s.recv(4096)
            if not d:
                raise load.BenchError('first session: closed before the greeting')
            buf += d
        s.sendall(b'a9 LOGOUT\r\n')
        # until the server's close: a client closing first can make the server's close_notify
        # fail, and OpenSSL then drops the session from its cache (ssl_clear_bad_session)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
        sess = s.session
        s.close()
    if sess is None:
        raise load.BenchError('first session: no TLS session to resume')
    return sess


class TLSLoop(load.Loop):
    """load.Loop whose sessions speak TLS; counts handshakes and the resumed ones."""

    def __init__(self, port, ctx, implicit=True, resume=False, quickack=True):
        super().__init__(port)
        self.ctx = ctx
        self.implicit = implicit
        self.quickack = quickack
        self.session = first_session(port, ctx) if resume else None
        self.handshakes = 0
        self.reused = 0

    def event(self, s, ev, now, on_done):
        if s.state == 'connecting':
            err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(s, 'connect: %s' % errno.errorcode.get(err, err))
                return
            s.state = 'run'
            if self.implicit:
                self.start_tls(s, now, on_done)
            else:
                self.ep.modify(s.fd, load.EPOLLIN)
            return
        if s.state == 'handshake':
            self.handshake(s, now, on_done)
            return
        if s.out and ev & load.EPOLLOUT:
            data, s.out = s.out, b''
            if not self.send(s, data):
                return
            if not s.out:
                self.ep.modify(s.fd, load.EPOLLIN)
        if ev & (load.EPOLLIN | load.EPOLLERR):
            self.read(s, now, on_done)

    def read(self, s, now, on_done):
        # until the socket is empty: a TLS record read may leave decrypted bytes in the
        # SSL object, which epoll would never report
        while True:
            if self.quickack:
                self.ack_now(s)
            try:
                d = s.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                    ssl.SSLWantWriteError):
                return
            except (OSError, ValueError) as e:
                if s.state == 'eof':        # a reset or a bare FIN after LOGOUT: ended
                    self.close(s)
                    on_done(s, now, 'eof')
                    return
                self.fail(s, 'recv: %s' % (errno.errorcode.get(getattr(e, 'errno', None))
                                           or type(e).__name__))
                return
            if not d:
                if s.state == 'eof':
                    self.close(s)
                    on_done(s, now, 'eof')
                else:
                    self.fail(s, 'closed at step %d' % s.i)
                return
            if s.state == 'eof':
                continue
            s.buf += d
            self.advance(s, now, on_done)
            if self.live.get(s.fd) is not s or s.state in ('handshake', 'eof'):
                return

    def send(self, s, data):
        try:
            n = s.sock.send(data)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError,
                ssl.SSLWantReadError):
            n = 0
        except (OSError, ValueError) as e:
            self.fail(s, 'send: %s' % (errno.errorcode.get(getattr(e, 'errno', None))
                                       or type(e).__name__))
            return False
        if n < len(data):
            s.out = data[n:]
            self.ep.modify(s.fd, load.EPOLLIN | load.EPOLLOUT)
        return True

    def after_reply(self, s, sent, now, on_done):
        if sent != STARTTLS:
            return False
        self.start_tls(s, now, on_done)
        return True

    def start_tls(self, s, now, on_done):
        # the SSLSocket takes over the same fd: the epoll registration stays
        s.sock = self.ctx.wrap_socket(s.sock, do_handshake_on_connect=False,
                                      session=self.session)
        s.state = 'handshake'
        self.handshake(s, now, on_done)

    def ack_now(self, s):
        # TCP_QUICKACK (re-armed before every read): no delayed ACK from this client, so that a
        # server's small write held by Nagle's algorithm (nginx before its proxy phase: the
        # greeting after the TLS 1.3 tickets, the close_notify) does not wait ~40 ms for it
        try:
            s.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass

    def handshake(self, s, now, on_done):
        if self.quickack:
            self.ack_now(s)
        try:
            s.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.ep.modify(s.fd, load.EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            self.ep.modify(s.fd, load.EPOLLOUT)
            return
        except (OSError, ValueError) as e:
            self.fail(s, 'handshake: %s' % type(e).__name__)
            return
        self.handshakes += 1
        if s.sock.session_reused:
            self.reused += 1
        elif self.session is not None and s.sock.version() == 'TLSv1.2':
            # not resumed (the server's cache lost it): keep the new session, as a client does
            self.session = s.sock.session
        s.state = 'run'
        self.ep.modify(s.fd, load.EPOLLIN)
        data = s.steps[s.i][0]          # after STARTTLS: the login; implicit: None
        if data:
            self.send(s, data)
        if self.live.get(s.fd) is s:
            self.read(s, now, on_done)
