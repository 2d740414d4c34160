"""mailproxy/backend.py: connect, reply reading (loopback only); the PROXY headers out are in
test_proxy_protocol.py."""

import socket
import struct
import threading
import time

import pytest

from mailproxy import ktimeout
from mailproxy.smtp import reply_complete as smtp_reply_complete
from mailproxy.backend import (BackendConn, BackendError, connect,
                               starttls_refused)


def closed_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def has_ipv6():
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(('::1', 0))
        s.close()
        return True
    except OSError:
        return False


class Server:
    """Accepts one connection and runs script(conn) in a thread."""

    def __init__(self, script, family=socket.AF_INET, host='127.0.0.1'):
        self.sock = socket.socket(family)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.script = script
        self.received = b''
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.sock.accept()
        with conn:
            try:
                self.script(conn)
            except OSError:      # the client side closed early: not what these tests check
                pass

    def close(self):
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def server():
    made = []

    def make(script, **kw):
        s = Server(script, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# ---------------------------------------------------------------- connect

def test_connect_refused_message():
    port = closed_port()
    with pytest.raises(BackendError) as ei:
        connect('127.0.0.1', port, 1.0)
    assert str(ei.value) == 'connect() to 127.0.0.1:%d failed (111: Connection refused)' % port


@pytest.mark.skipif(not has_ipv6(), reason='no IPv6 loopback')
def test_connect_refused_ipv6_message():
    s = socket.socket(socket.AF_INET6)
    s.bind(('::1', 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(BackendError) as ei:
        connect('::1', port, 1.0)
    assert str(ei.value) == 'connect() to [::1]:%d failed (111: Connection refused)' % port
    with pytest.raises(BackendError):
        connect('[::1]', port, 1.0)


def test_connect_timeout_with_full_backlog():
    lst = socket.socket()
    lst.bind(('127.0.0.1', 0))
    lst.listen(0)
    port = lst.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):       # fill the accept queue: further SYNs are dropped
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(('127.0.0.1', port))
            fillers.append(c)
        time.sleep(0.1)
        t0 = time.monotonic()
        with pytest.raises(BackendError) as ei:
            connect('127.0.0.1', port, 0.4)
        elapsed = time.monotonic() - t0
        assert str(ei.value) == 'upstream timed out (110: Connection timed out)'
        assert 0.3 <= elapsed < 2.0
    finally:
        for c in fillers:
            c.close()
        lst.close()


def test_connect_by_name_sets_nodelay_and_timeout(server):
    srv = server(lambda conn: conn.sendall(b'+OK\r\n'))
    sock = connect('localhost', srv.port, 2.0) if _localhost_v4() else \
        connect('127.0.0.1', srv.port, 2.0)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        # the timeout is the kernel's (SO_RCVTIMEO/SO_SNDTIMEO) on a blocking socket (ktimeout.py)
        assert sock.gettimeout() is None
        assert ktimeout.get(sock) == 2.0 and ktimeout.get(sock, send=True) == 2.0
        assert BackendConn(sock, 4096, 2.0).read_reply() == b'+OK\r\n'
    finally:
        sock.close()


def _localhost_v4():
    try:
        return any(ai[0] == socket.AF_INET for ai in socket.getaddrinfo('localhost', 1))
    except OSError:
        return False


def test_connect_name_tries_addresses_in_order(monkeypatch, server):
    srv = server(lambda conn: conn.sendall(b'+OK\r\n'))
    dead = closed_port()

    def fake_getaddrinfo(host, port, *a, **kw):
        assert host == 'backend.test'
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, '', ('127.0.0.1', dead)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, '', ('127.0.0.1', srv.port))]

    monkeypatch.setattr(socket, 'getaddrinfo', fake_getaddrinfo)
    sock = connect('backend.test', 110, 2.0)
    assert sock.getpeername()[1] == srv.port
    sock.close()


def test_connect_name_resolution_bounded_by_timeout(monkeypatch):
    # a hung system resolver (an Auth-Server host name) must not hold the session past timeout
    release = threading.Event()

    def hung_getaddrinfo(*a, **kw):
        release.wait(3)
        raise socket.gaierror(socket.EAI_AGAIN, 'Temporary failure in name resolution')

    monkeypatch.setattr(socket, 'getaddrinfo', hung_getaddrinfo)
    t = time.monotonic()
    try:
        with pytest.raises(BackendError) as ei:
            connect('slow.test', 110, 0.3)
    finally:
        release.set()
    assert time.monotonic() - t < 1.5
    assert str(ei.value) == 'slow.test could not be resolved (110: Operation timed out)'


def test_connect_unresolvable_name():
    with pytest.raises(BackendError) as ei:
        connect('no-such-host.invalid', 110, 1.0)
    assert 'could not be resolved' in str(ei.value)


# ---------------------------------------------------------------- replies

def conn_to(srv, bufsize=4096, timeout=2.0):
    return BackendConn(connect('127.0.0.1', srv.port, 2.0), bufsize, timeout)


def test_reply_split_across_packets(server):
    def script(conn):
        for piece in (b'+O', b'K ', b'ready\r', b'\n'):
            conn.sendall(piece)
            time.sleep(0.05)
        conn.recv(100)

    srv = server(script)
    bc = conn_to(srv)
    assert bc.read_reply() == b'+OK ready\r\n'
    bc.send(b'QUIT\r\n')
    bc.close()


def test_reply_needs_four_bytes(server):
    def script(conn):
        conn.sendall(b'\r\n')
        time.sleep(0.1)
        conn.sendall(b'+OK\r\n')
        conn.recv(10)

    srv = server(script)
    bc = conn_to(srv)
    assert bc.read_reply() == b'\r\n+OK\r\n'
    bc.close()


def test_reply_too_long(server):
    srv = server(lambda conn: (conn.sendall(b'+OK ' + b'x' * 40), conn.recv(10)))
    bc = conn_to(srv, bufsize=16)
    with pytest.raises(BackendError) as ei:
        bc.read_reply()
    assert str(ei.value) == 'upstream sent too long response line: "+OK xxxxxxxxxxx"'
    bc.close()


def test_reply_too_long_is_cut_in_the_log(server):
    # proxy_buffer can be large: the logged text is cut, never half an escape
    srv = server(lambda conn: (conn.sendall(b'+OK ' + b'\x01' * 70000), conn.recv(10)))
    bc = conn_to(srv, bufsize=65536)
    with pytest.raises(BackendError) as ei:
        bc.read_reply()
    text = str(ei.value)
    assert text.startswith('upstream sent too long response line: "+OK \\x01\\x01')
    assert text.endswith('\\x01..."') and len(text) < 600
    bc.close()


def test_starttls_refusal_is_cut_in_the_log():
    text = str(starttls_refused(b'NO ' + b'\xff' * 5000 + b'\r\n'))
    assert text.startswith('upstream refused STARTTLS: "NO \\xFF')
    assert text.endswith('\\xFF..."') and len(text) < 600


def test_reply_exactly_filling_the_buffer_is_fine(server):
    srv = server(lambda conn: (conn.sendall(b'+OK 0123456789\r\n'), conn.recv(10)))
    bc = conn_to(srv, bufsize=16)
    assert bc.read_reply() == b'+OK 0123456789\r\n'
    bc.close()


def test_reply_premature_close(server):
    srv = server(lambda conn: conn.sendall(b'+OK partial'))
    bc = conn_to(srv)
    with pytest.raises(BackendError) as ei:
        bc.read_reply()
    assert str(ei.value) == 'upstream prematurely closed connection'
    bc.close()


def test_reply_read_timeout(server):
    stop = threading.Event()
    srv = server(lambda conn: stop.wait(5))     # accepts, never answers
    bc = conn_to(srv, timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(BackendError) as ei:
        bc.read_reply()
    assert str(ei.value) == 'upstream timed out (110: Connection timed out)'
    assert 0.25 <= time.monotonic() - t0 < 2
    stop.set()
    bc.close()


def test_trickling_backend_is_bounded_by_timeout(server):
    stop = threading.Event()

    def script(conn):
        while not stop.is_set():
            try:
                conn.sendall(b'x')
            except OSError:
                return
            stop.wait(0.05)

    srv = server(script)
    bc = conn_to(srv, timeout=0.4)
    t0 = time.monotonic()
    with pytest.raises(BackendError) as ei:
        bc.read_reply()
    assert 'timed out' in str(ei.value)
    assert time.monotonic() - t0 < 1.5
    stop.set()
    bc.close()


def test_smtp_multiline_waits_for_last_line(server):
    def script(conn):
        conn.sendall(b'220 mx ESMTP\r\n')
        assert conn.recv(100) == b'EHLO proxy\r\n'
        conn.sendall(b'250-mx.example\r\n250-PIPELINING\r\n')
        time.sleep(0.1)
        conn.sendall(b'250-8BITMIME\r\n')
        time.sleep(0.1)
        conn.sendall(b'250 SIZE 1000\r\n')
        conn.recv(100)

    srv = server(script)
    bc = conn_to(srv)
    assert bc.read_reply(smtp_reply_complete) == b'220 mx ESMTP\r\n'
    bc.send(b'EHLO proxy\r\n')
    assert (bc.read_reply(smtp_reply_complete)
            == b'250-mx.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000\r\n')
    bc.close()


def test_smtp_reply_complete_rules():
    assert smtp_reply_complete(b'250 ok\r\n')
    assert smtp_reply_complete(b'250\r\n')
    assert not smtp_reply_complete(b'250-a\r\n')
    assert not smtp_reply_complete(b'250-a\r\n250-b\r\n')
    assert smtp_reply_complete(b'250-a\r\n250 b\r\n')
    assert smtp_reply_complete(bytearray(b'220-hi\r\n220 there\r\n'))


def test_extra_data_is_dropped_with_the_reply(server):
    def script(conn):
        conn.sendall(b'+OK hello\r\n+OK unsolicited\r\n')
        assert conn.recv(100) == b'USER a\r\n'
        conn.sendall(b'+OK user\r\n')
        conn.recv(100)

    srv = server(script)
    bc = conn_to(srv)
    first = bc.read_reply()
    assert first.startswith(b'+OK hello\r\n')
    bc.send(b'USER a\r\n')
    assert bc.read_reply() == b'+OK user\r\n'
    bc.close()


def test_send_to_reset_peer_raises(server):
    def script(conn):
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))

    srv = server(script)
    bc = conn_to(srv)
    bc.send(b'hi')
    srv.thread.join(2)
    time.sleep(0.05)
    with pytest.raises(BackendError):
        for _ in range(50):
            bc.send(b'x' * 65536)
    bc.close()
