"""The shared relay (mailproxy/relay.py) with TLS on the client side, the backend side, or both.

The relay's sockets are non-blocking `ssl.SSLSocket`s after a finished handshake, exactly as a
session hands them over.  Certificates come from the test PKI (tests/support/certs.py).
"""

import os
import resource
import selectors
import socket
import ssl
import threading
import time

import pytest

from mailproxy.endpoints import PlainEndpoint, TLSEndpoint
from tests.support.relaying import (MB, digest, duplex, recv_exact, recv_until_eof, send_all,
                                    tls_session as session)


# ---------------------------------------------------------------- endpoint selection

def test_endpoint_chosen_by_socket_type(relay, lis, ctxs):
    client, backend, done = session(relay, lis, ctxs, "client")
    deadline = time.monotonic() + 5
    while relay.count() != 1 or not relay._live_sessions():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (sess,) = relay._live_sessions()
    assert isinstance(sess.c, TLSEndpoint)
    assert type(sess.b) is PlainEndpoint
    client.close()
    done.wait()
    backend.close()


class _WantSock:
    """A stand-in for an SSLSocket whose recv/send raise what OpenSSL asks for."""

    family = socket.AF_UNIX

    def __init__(self, recv_exc=None, send_exc=None, pending=0):
        self.recv_exc, self.send_exc, self._pending = recv_exc, send_exc, pending

    def setblocking(self, flag):
        pass

    def fileno(self):
        return 99

    def recv(self, n):
        if self.recv_exc:
            raise self.recv_exc
        return b"x" * n

    def send(self, data):
        if self.send_exc:
            raise self.send_exc
        return len(data)

    def pending(self):
        return self._pending


def test_want_errors_map_to_selector_events():
    R, W = selectors.EVENT_READ, selectors.EVENT_WRITE
    e = TLSEndpoint(_WantSock(recv_exc=ssl.SSLWantWriteError()), None)
    assert e.recv(10) is None and e.read_event() == W      # a read that needs the socket writable
    e.sock.recv_exc = None
    assert e.recv(3) == b"xxx" and e.read_event() == R
    e.sock.send_exc = ssl.SSLWantReadError()
    assert e.send(b"abc") == 0 and e.write_event() == R    # a write that needs it readable
    e.sock.send_exc = ssl.SSLWantWriteError()
    assert e.send(b"abc") == 0 and e.write_event() == W
    e.sock.send_exc = None
    assert e.send(b"abc") == 3 and e.write_event() == W
    e.sock.recv_exc = ssl.SSLZeroReturnError()
    assert e.recv(5) == b""                                  # close_notify: EOF
    e.sock.recv_exc = ssl.SSLEOFError()
    assert e.recv(5) == b""                                  # TCP close without close_notify
    e.sock._pending = 7
    assert e.pending() == 7


# ---------------------------------------------------------------- bulk

@pytest.mark.parametrize("side", ["client", "backend", "both"])
def test_20mb_each_way_over_tls(relay, lis, ctxs, side):
    total = 20 * MB
    client, backend, done = session(relay, lis, ctxs, side, client_buffer=16384,
                                    proxy_buffer=16384)
    up, down = [], []
    threads = [threading.Thread(target=duplex, args=(client, b"up", total, total, up)),
               threading.Thread(target=duplex, args=(backend, b"down", total, total, down))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert up and down, "a side did not finish"
    assert up[0][1] == total and down[0][1] == total
    assert down[0][2] == up[0][0] == digest(b"up", total)      # client -> backend intact
    assert up[0][2] == down[0][0] == digest(b"down", total)    # backend -> client intact
    client.close()
    st = done.wait()
    assert st.bytes_in == total and st.bytes_out == total
    backend.close()


def test_many_small_writes_both_tls(relay, lis, ctxs):
    client, backend, done = session(relay, lis, ctxs, "both", client_buffer=256, proxy_buffer=256)
    client.setblocking(True)
    backend.setblocking(True)
    lines = [b"a%04d NOOP\r\n" % i for i in range(3000)]
    got = []

    def read_backend():
        got.append(recv_exact(backend, sum(map(len, lines)), timeout=30))

    t = threading.Thread(target=read_backend)
    t.start()
    client.settimeout(10)
    for line in lines:                      # one TLS record per line
        client.sendall(line)
    t.join(30)
    assert got and got[0] == b"".join(lines)
    replies = [b"a%04d OK\r\n" % i for i in range(3000)]
    got2 = []
    t = threading.Thread(target=lambda: got2.append(recv_exact(client, sum(map(len, replies)),
                                                                timeout=30)))
    t.start()
    backend.settimeout(10)
    for r in replies:
        backend.sendall(r)
    t.join(30)
    assert got2 and got2[0] == b"".join(replies)
    client.close()
    st = done.wait()
    assert st.bytes_in == sum(map(len, lines)) and st.bytes_out == sum(map(len, replies))
    backend.close()


@pytest.mark.parametrize("side", ["client", "backend"])
def test_decrypted_bytes_drained_without_socket_events(relay, lis, ctxs, side):
    """One 16 KB TLS record read through a 100-byte buffer: after the first recv the rest sits
    decrypted inside OpenSSL, where the selector cannot see it; it must still all arrive."""
    client, backend, done = session(relay, lis, ctxs, side, client_buffer=100, proxy_buffer=100)
    payload = bytes(range(256)) * 64          # 16384 bytes: one full record
    src, dst = (client, backend) if side == "client" else (backend, client)
    send_all(src, payload)
    assert recv_exact(dst, len(payload), timeout=5) == payload
    # and once more, so the endpoint is not left in a stale state
    send_all(src, payload[:5000])
    assert recv_exact(dst, 5000, timeout=5) == payload[:5000]
    client.close()
    done.wait()
    backend.close()


# ---------------------------------------------------------------- timeout and close

def test_proxy_timeout_over_tls_and_close_notify(relay, lis, ctxs):
    client, backend, done = session(relay, lis, ctxs, "both", ragged_ok=False,
                                    proxy_timeout=0.5)
    send_all(backend, b"* OK tick\r\n")
    assert recv_exact(client, 11) == b"* OK tick\r\n"
    t0 = time.monotonic()
    st = done.wait(5)
    assert st.reason == "client timed out"
    assert 0.3 <= time.monotonic() - t0 < 1.5
    # both test ends see a clean TLS close (close_notify), not a ragged EOF
    assert recv_until_eof(client) == b""
    assert recv_until_eof(backend) == b""
    client.close()
    backend.close()


def test_client_traffic_keeps_tls_session_alive(relay, lis, ctxs):
    client, backend, done = session(relay, lis, ctxs, "client", proxy_timeout=0.3)
    for _ in range(8):                      # 0.6 s, twice the timeout
        send_all(client, b"a NOOP\r\n")
        time.sleep(0.075)
    assert recv_exact(backend, 64) == b"a NOOP\r\n" * 8
    assert not done.calls
    assert done.wait(5).reason == "client timed out"
    client.close()
    backend.close()


def test_backend_close_flushes_to_tls_client(relay, lis, ctxs):
    client, backend, done = session(relay, lis, ctxs, "both")
    send_all(backend, b"x" * 300000)
    backend.close()
    assert recv_until_eof(client) == b"x" * 300000
    st = done.wait()
    assert st.reason == "backend closed" and st.bytes_out == 300000
    client.close()


def test_tls_error_from_client_ends_session(relay, lis, ctxs):
    client, backend, done = session(relay, lis, ctxs, "client")
    raw = socket.socket(fileno=os.dup(client.fileno()))
    raw.sendall(b"\x17\x03\x03\x00\x05garbage")     # not a valid record
    st = done.wait()
    assert st.reason.startswith("read error from client")
    raw.close()
    client.close()
    backend.close()


# ---------------------------------------------------------------- scale

def test_500_idle_tls_sessions_no_extra_thread(relay, lis, ctxs):
    n = 500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * n + 200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip("RLIMIT_NOFILE hard limit %d < %d" % (hard, need))
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    threads_before = set(threading.enumerate())   # others may end meanwhile: count new ones
    made = []
    try:
        for i in range(n):
            made.append(session(relay, lis, ctxs, "client", name="s%d" % i, proxy_timeout=600))
        deadline = time.monotonic() + 10
        while relay.count() != n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.count() == n
        assert set(threading.enumerate()) - threads_before == set()
        assert sum(1 for t in threading.enumerate() if t.name == "mailproxy-relay") == 1
        time.sleep(0.2)         # idle: still all there, nothing ended
        assert not any(d.calls for _, _, d in made)
        for client, _, _ in made:
            send_all(client, b"a NOOP\r\n")
        for _, backend, _ in made:
            assert recv_exact(backend, 8) == b"a NOOP\r\n"
            send_all(backend, b"a OK\r\n")
        for client, _, _ in made:
            assert recv_exact(client, 6) == b"a OK\r\n"
    finally:
        for client, backend, _ in made:
            client.close()
            backend.close()
    for _, _, d in made:
        st = d.wait()
        assert len(d.calls) == 1 and st.bytes_in == 8 and st.bytes_out == 6
    assert relay.count() == 0
