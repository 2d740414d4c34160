"""The relay's test plumbing (mailproxy/relay.py): loopback socket pairs (Listener, fixture
`lis`), a started Relay (fixture `relay`), the on_done recorder, sessions handed to the relay
in plain TCP or TLS on either side (fixture `ctxs` on the test PKI), and deterministic streams
sent and received whole."""

import hashlib
import selectors
import socket
import ssl
import threading
import time

import pytest

from mailproxy.relay import Relay

MB = 1024 * 1024


@pytest.fixture(scope="module")
def ctxs(certs):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs["server"], certs["server_key"])
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(certs["ca"])
    return server, client


class Listener:
    """A loopback listener that hands out connected socket pairs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.addr = self.sock.getsockname()

    def pair(self):
        a = socket.create_connection(self.addr)
        b, _ = self.sock.accept()
        return a, b

    def close(self):
        self.sock.close()


class Done:
    """on_done recorder."""

    def __init__(self):
        self.calls = []
        self.event = threading.Event()

    def __call__(self, stats):
        self.calls.append(stats)
        self.event.set()

    def wait(self, timeout=10):
        assert self.event.wait(timeout), "on_done not called"
        return self.calls[0]


@pytest.fixture
def lis():
    lst = Listener()
    yield lst
    lst.close()


@pytest.fixture
def relay():
    logged = []
    r = Relay(log=lambda level, msg: logged.append((level, msg)))
    r.logged = logged
    r.start()
    yield r
    r.stop()


def plain_session(relay, lis, **kw):
    """(test client, test backend, Done); the relay holds the middle sockets."""
    client, proxy_c = lis.pair()
    proxy_b, backend = lis.pair()
    done = Done()
    relay.add(proxy_c, proxy_b, on_done=done, **kw)
    return client, backend, done


def handshake(*socks, timeout=10):
    """Finish the handshakes of non-blocking SSLSockets in this thread (no helper thread)."""
    todo = list(socks)
    for s in todo:
        s.setblocking(False)
    deadline = time.monotonic() + timeout
    while todo:
        assert time.monotonic() < deadline, "handshake did not finish"
        progressed = False
        for s in list(todo):
            try:
                s.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            todo.remove(s)
            progressed = True
        if todo and not progressed:
            time.sleep(0.0005)


def tls_pair(lis, server_ctx, client_ctx, tls_client_is_first=True, ragged_ok=True):
    """(connecting end, accepted end) over TLS: the first is the TLS client."""
    a, b = lis.pair()
    ca = client_ctx.wrap_socket(a, server_hostname="localhost", do_handshake_on_connect=False,
                                suppress_ragged_eofs=ragged_ok)
    sb = server_ctx.wrap_socket(b, server_side=True, do_handshake_on_connect=False,
                                suppress_ragged_eofs=ragged_ok)
    handshake(ca, sb)
    return ca, sb


def tls_session(relay, lis, ctxs, side, ragged_ok=True, **kw):
    """(test client, test backend, Done).  side: 'client', 'backend', 'both' or 'none'.

    With TLS on the client side the relay's client socket is the TLS server end (as after a
    client handshake); on the backend side the relay's backend socket is the TLS client end.
    Test-side sockets are left non-blocking for `duplex`, or set blocking by the caller.
    """
    server_ctx, client_ctx = ctxs
    if side in ("client", "both"):
        client, proxy_c = tls_pair(lis, server_ctx, client_ctx, ragged_ok=ragged_ok)
    else:
        client, proxy_c = lis.pair()
    if side in ("backend", "both"):
        proxy_b, backend = tls_pair(lis, server_ctx, client_ctx, ragged_ok=ragged_ok)
    else:
        proxy_b, backend = lis.pair()
    done = Done()
    relay.add(proxy_c, proxy_b, on_done=done, **kw)
    return client, backend, done


def stream(seed, total, block=65536):
    """Deterministic pseudo-random stream of `total` bytes in chunks."""
    base = hashlib.sha256(seed).digest() * (block // 32)
    sent = 0
    i = 0
    while sent < total:
        chunk = (i.to_bytes(4, "big") + base)[:min(block, total - sent)]
        yield chunk
        sent += len(chunk)
        i += 1


def duplex(sock, seed, total_out, total_in, box, timeout=60):
    """Send `total_out` bytes of stream(seed) and receive `total_in` bytes at the same time, in
    ONE thread (an SSLSocket must not be used by two threads at once).  Appends
    (sent digest, received count, received digest) to box."""
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    out = stream(seed, total_out)
    cur = None
    hs, hr = hashlib.sha256(), hashlib.sha256()
    got = 0
    out_done = total_out == 0
    deadline = time.monotonic() + timeout
    try:
        while not out_done or got < total_in:
            assert time.monotonic() < deadline, "duplex timed out (got %d of %d)" % (got, total_in)
            progressed = False
            if got < total_in:
                try:
                    data = sock.recv(262144)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    data = None
                if data is not None:
                    if not data:
                        break
                    hr.update(data)
                    got += len(data)
                    progressed = True
            if not out_done:
                if cur is None:
                    cur = next(out, None)
                    if cur is None:
                        out_done = True
                    else:
                        hs.update(cur)
                if cur is not None:
                    try:
                        n = sock.send(cur)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                        n = 0
                    if n:
                        progressed = True
                        cur = cur[n:] if n < len(cur) else None
            if not progressed and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                sel.select(0.05)
    finally:
        sel.close()
    box.append((hs.hexdigest(), got, hr.hexdigest()))


def digest(seed, total):
    h = hashlib.sha256()
    for chunk in stream(seed, total):
        h.update(chunk)
    return h.hexdigest()


def recv_exact(sock, n, timeout=10):
    sock.setblocking(True)
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            break
        out += data
    return bytes(out)


def recv_until_eof(sock, timeout=10):
    sock.setblocking(True)
    sock.settimeout(timeout)
    out = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            return bytes(out)
        out += data


def send_all(sock, data, timeout=10):
    sock.setblocking(True)
    sock.settimeout(timeout)
    sock.sendall(data)
