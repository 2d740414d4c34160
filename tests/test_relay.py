"""The shared relay (mailproxy/relay.py) over loopback TCP sockets."""

import gc
import hashlib
import os
import resource
import socket
import threading
import time
import tracemalloc

import pytest

from mailproxy.relay import Relay
from tests.support.relaying import (MB, Done, plain_session as session, recv_exact, recv_until_eof,
                                    stream)


def sender(sock, seed, total, digest_box):
    h = hashlib.sha256()
    for chunk in stream(seed, total, MB):
        sock.sendall(chunk)
        h.update(chunk)
    digest_box.append(h.hexdigest())


def receiver(sock, total, digest_box):
    h = hashlib.sha256()
    got = 0
    sock.settimeout(30)
    while got < total:
        data = sock.recv(min(262144, total - got))
        if not data:
            break
        h.update(data)
        got += len(data)
    digest_box.append((got, h.hexdigest()))


# ---------------------------------------------------------------- bulk

@pytest.mark.parametrize('bufsize', [4096, 65536])
def test_50mb_each_way_intact(relay, lis, bufsize):
    total = 50 * MB
    client, backend, done = session(relay, lis, client_buffer=bufsize, proxy_buffer=bufsize)
    sent_up, sent_down, got_up, got_down = [], [], [], []
    threads = [threading.Thread(target=sender, args=(client, b'up', total, sent_up)),
               threading.Thread(target=sender, args=(backend, b'down', total, sent_down)),
               threading.Thread(target=receiver, args=(backend, total, got_up)),
               threading.Thread(target=receiver, args=(client, total, got_down))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got_up == [(total, sent_up[0])]
    assert got_down == [(total, sent_down[0])]
    client.close()
    st = done.wait()
    assert st.reason == 'client closed'
    assert (st.bytes_in, st.bytes_out) == (total, total)
    assert recv_until_eof(backend) == b''
    backend.close()
    assert len(done.calls) == 1
    assert relay.count() == 0


def test_pipelined_to_backend_first_and_to_client(relay, lis):
    client, proxy_c = lis.pair()
    proxy_b, backend = lis.pair()
    client.sendall(b'A2 NOOP\r\n')          # already waiting in the kernel at hand-over
    backend.sendall(b'* late\r\n')
    time.sleep(0.05)
    done = Done()
    relay.add(proxy_c, proxy_b, to_backend=b'A1 NOOP\r\n', to_client=b'A0 OK logged in\r\n',
              on_done=done)
    assert recv_exact(backend, 18) == b'A1 NOOP\r\nA2 NOOP\r\n'
    assert recv_exact(client, 25) == b'A0 OK logged in\r\n* late\r\n'
    client.sendall(b'A3 LOGOUT\r\n')
    assert recv_exact(backend, 11) == b'A3 LOGOUT\r\n'
    backend.sendall(b'* BYE\r\n')
    backend.close()
    assert recv_until_eof(client) == b'* BYE\r\n'
    st = done.wait()
    assert st.reason == 'backend closed'
    assert st.bytes_in == 29 and st.bytes_out == 32
    client.close()


# ---------------------------------------------------------------- back-pressure

def _only_session(relay):
    (sess,) = relay._live_sessions()
    return sess


def test_back_pressure_stops_reading_the_other_side(relay, lis):
    client, backend, done = session(relay, lis, proxy_buffer=65536, client_buffer=1024)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    backend.setblocking(False)
    chunk = b'x' * 65536
    pushed = 0
    stalls = 0
    deadline = time.monotonic() + 10
    while stalls < 5 and time.monotonic() < deadline:
        try:
            pushed += backend.send(chunk)
        except BlockingIOError:
            stalls += 1
            time.sleep(0.05)
        else:
            stalls = 0
    assert stalls == 5, 'the relay kept reading a backend whose client does not read'
    assert pushed < 64 * MB
    sess = _only_session(relay)
    assert sess.b2c_len <= 65536
    assert sess.b.mask == 0          # not watched: neither readable (full) nor writable (no data)
    # the client starts reading: everything arrives, in order, and more flows
    backend.setblocking(True)
    box = []
    t = threading.Thread(target=receiver, args=(client, pushed + 3 * MB, box))
    t.start()
    for _ in range(3):
        backend.sendall(b'y' * MB)
    t.join(20)
    assert box and box[0][0] == pushed + 3 * MB
    client.close()
    st = done.wait()
    assert st.bytes_out == pushed + 3 * MB
    backend.close()


def test_back_pressure_upstream(relay, lis):
    client, backend, done = session(relay, lis, client_buffer=4096)
    client.setblocking(False)
    pushed = 0
    stalls = 0
    while stalls < 5:
        try:
            pushed += client.send(b'u' * 65536)
        except BlockingIOError:
            stalls += 1
            time.sleep(0.05)
        else:
            stalls = 0
    sess = _only_session(relay)
    assert sess.c2b_len <= 4096
    assert recv_exact(backend, pushed) == b'u' * pushed
    client.close()
    assert done.wait().bytes_in == pushed
    backend.close()


# ---------------------------------------------------------------- proxy_timeout

def test_proxy_timeout_backend_traffic_does_not_extend_it(relay, lis):
    client, backend, done = session(relay, lis, proxy_timeout=0.5)
    t0 = time.monotonic()
    stop = threading.Event()

    def push():
        while not stop.is_set():
            try:
                backend.sendall(b'* OK tick\r\n')
            except OSError:
                return
            stop.wait(0.1)

    t = threading.Thread(target=push)
    t.start()
    try:
        data = recv_until_eof(client, timeout=5)   # the silent client keeps reading
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        t.join()
    assert data.startswith(b'* OK tick\r\n')
    assert 0.45 <= elapsed < 1.3
    st = done.wait()
    assert st.reason == 'client timed out'
    assert st.bytes_out == len(data)
    client.close()
    backend.close()


def test_proxy_timeout_client_traffic_keeps_it_alive(relay, lis):
    client, backend, done = session(relay, lis, proxy_timeout=0.5)
    for _ in range(12):                 # 1.2 s, more than twice the timeout
        client.sendall(b'a NOOP\r\n')
        time.sleep(0.1)
    assert recv_exact(backend, 12 * 8) == b'a NOOP\r\n' * 12
    assert not done.calls
    # then silence: cut about half a second later
    t0 = time.monotonic()
    st = done.wait(5)
    assert st.reason == 'client timed out'
    assert time.monotonic() - t0 < 1.1
    client.close()
    backend.close()


# ---------------------------------------------------------------- end of session

def test_client_close_after_data_flushes_to_backend_then_closes(relay, lis):
    client, proxy_c = lis.pair()
    proxy_b, backend = lis.pair()
    proxy_b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    backend.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    proxy_c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    done = Done()
    relay.add(proxy_c, proxy_b, on_done=done)
    payload = os.urandom(2 * MB)
    t = threading.Thread(target=lambda: (client.sendall(payload), client.close()))
    t.start()                            # the backend does not read yet: the client blocks
    time.sleep(0.3)
    assert not done.calls                # not closed while client data is unsent
    assert recv_until_eof(backend) == payload
    t.join()
    st = done.wait()
    assert st.reason == 'client closed' and st.bytes_in == len(payload)
    backend.close()


def test_backend_close_after_data_flushes_to_client_then_closes(relay, lis):
    client, backend, done = session(relay, lis)
    payload = os.urandom(3 * MB)
    backend.sendall(payload[:MB])
    t = threading.Thread(target=lambda: (backend.sendall(payload[MB:]), backend.close()))
    t.start()
    time.sleep(0.2)
    assert recv_until_eof(client) == payload
    t.join()
    st = done.wait()
    assert st.reason == 'backend closed' and st.bytes_out == len(payload)
    client.close()


def test_no_half_close(relay, lis):
    """A client that shuts down its sending side ends the whole session (as nginx)."""
    client, backend, done = session(relay, lis)
    client.sendall(b'QUIT\r\n')
    client.shutdown(socket.SHUT_WR)
    assert recv_until_eof(backend) == b'QUIT\r\n'
    st = done.wait()
    assert st.reason == 'client closed'
    try:
        backend.sendall(b'+OK bye\r\n')
    except OSError:
        pass
    assert recv_until_eof(client) == b''   # the reply is lost: both sockets were closed
    client.close()
    backend.close()


def test_both_sides_close(relay, lis):
    client, backend, done = session(relay, lis)
    client.close()
    backend.close()
    st = done.wait()
    assert st.reason in ('client closed', 'backend closed')
    time.sleep(0.1)
    assert len(done.calls) == 1


def _reset(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\x00\x00\x00\x00\x00\x00\x00')
    sock.close()


def test_client_reset(relay, lis):
    client, backend, done = session(relay, lis)
    client.sendall(b'abc')
    assert recv_exact(backend, 3) == b'abc'
    _reset(client)
    st = done.wait()
    assert st.reason.startswith(('read error from client', 'client closed')), st.reason
    assert recv_until_eof(backend) == b''
    backend.close()


def test_backend_reset_while_client_sends(relay, lis):
    client, backend, done = session(relay, lis)
    backend.sendall(b'+OK\r\n')
    assert recv_exact(client, 5) == b'+OK\r\n'
    _reset(backend)
    client.setblocking(False)
    t0 = time.monotonic()
    while not done.calls and time.monotonic() - t0 < 5:
        try:
            client.send(b'z' * 65536)
        except (BlockingIOError, OSError):
            time.sleep(0.01)
    st = done.wait()
    assert st.reason.startswith(('read error from backend', 'write error to backend',
                                 'backend closed')), st.reason
    client.close()


def test_write_error_to_client(relay, lis):
    """Client resets while the backend pushes: the relay's write to the client fails."""
    client, backend, done = session(relay, lis)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.sendall(b'x')
    assert recv_exact(backend, 1) == b'x'
    _reset(client)
    backend.settimeout(5)
    try:
        for _ in range(100):
            backend.sendall(b'd' * 65536)
            if done.calls:
                break
    except OSError:
        pass
    st = done.wait()
    assert st.reason.startswith(('write error to client', 'read error from client',
                                 'client closed')), st.reason
    backend.close()


# ---------------------------------------------------------------- scale and lifecycle

def test_2000_idle_sessions_all_relay(relay, lis):
    n = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * n + 200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip('RLIMIT_NOFILE hard limit %d < %d' % (hard, need))
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    pairs = []
    dones = []
    try:
        for i in range(n):
            client, backend, done = session(relay, lis, name='s%d' % i)
            pairs.append((client, backend))
            dones.append(done)
        deadline = time.monotonic() + 10
        while relay.count() != n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.count() == n
        assert max(s.fd for sess in relay._live_sessions() for s in (sess.c, sess.b)) > 1024
        assert sum(1 for t in threading.enumerate() if t.name == 'mailproxy-relay') == 1
        for client, _ in pairs:
            client.sendall(b'a NOOP\r\n')
        for _, backend in pairs:
            assert recv_exact(backend, 8) == b'a NOOP\r\n'
            backend.sendall(b'a OK\r\n')
        for client, _ in pairs:
            assert recv_exact(client, 6) == b'a OK\r\n'
        assert not any(d.calls for d in dones)
    finally:
        for client, backend in pairs:
            client.close()
            backend.close()
    for d in dones:
        st = d.wait()
        assert len(d.calls) == 1 and st.bytes_in == 8 and st.bytes_out == 6
    assert relay.count() == 0


def test_idle_session_memory(relay, lis):
    """Python objects per idle session (not counting the sockets) stay well under 1 KB."""
    n = 500
    socks = [(lis.pair(), lis.pair()) for _ in range(n)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for (client, proxy_c), (proxy_b, backend) in socks:
            relay.add(proxy_c, proxy_b, proxy_timeout=600.0)
        deadline = time.monotonic() + 10
        while relay.count() != n or relay._cmds:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, 'filename'))
    per = grown / n
    print('bytes of Python objects per idle session: %.0f' % per)
    assert per < 1024
    relay.close_all()
    for (client, _), (_, backend) in socks:
        client.close()
        backend.close()


def test_close_all(relay, lis):
    sessions = [session(relay, lis) for _ in range(10)]
    for client, backend, _ in sessions:
        client.sendall(b'ping')
        assert recv_exact(backend, 4) == b'ping'
    relay.close_all('shutdown timeout')
    for client, backend, done in sessions:
        st = done.wait()
        assert st.reason == 'shutdown timeout' and st.bytes_in == 4
        assert recv_until_eof(client) == b''
        assert recv_until_eof(backend) == b''
        client.close()
        backend.close()
    assert relay.count() == 0


def test_stop_ends_sessions_and_thread(lis):
    r = Relay()
    r.start()
    client, backend, done = session(r, lis)
    client.sendall(b'x')
    assert recv_exact(backend, 1) == b'x'
    r.stop()
    assert done.wait().reason == 'shutdown'
    assert not r._thread.is_alive()
    # after stop, add() still ends the session exactly once
    late = Done()
    a, b = lis.pair()
    c, d = lis.pair()
    r.add(b, c, on_done=late)
    assert late.wait().reason == 'shutdown'
    for s in (client, backend, a, d):
        s.close()


def test_on_done_exception_and_broken_session_are_contained(lis):
    logged = []

    class Boom(Exception):
        pass

    from mailproxy.endpoints import PlainEndpoint

    class BadEndpoint(PlainEndpoint):
        __slots__ = ()

        def recv(self, n):
            raise Boom('broken endpoint')

    def factory(sock, sess):
        if sess.name == 'bad':
            return BadEndpoint(sock, sess)
        return PlainEndpoint(sock, sess)

    r = Relay(log=lambda level, msg: logged.append((level, msg)), endpoint_factory=factory)
    r.start()
    try:
        def raising(stats):
            raise RuntimeError('on_done failure')

        c1, pc1 = lis.pair()
        pb1, b1 = lis.pair()
        r.add(pc1, pb1, on_done=raising)
        c2, b2, bad_done = session(r, lis, name='bad')
        c2.sendall(b'x')
        st = bad_done.wait()
        assert st.reason.startswith('internal error')
        c1.close()                         # on_done raises: ignored
        c3, b3, good = session(r, lis)
        c3.sendall(b'still alive')
        assert recv_exact(b3, 11) == b'still alive'
        c3.close()
        assert good.wait().reason == 'client closed'
        assert r._thread.is_alive()
        assert any('broken endpoint' in m for _, m in logged)
    finally:
        r.stop()
    for s in (c1, b1, c2, b2, c3, b3):
        s.close()


def test_many_sessions_heap_does_not_grow_without_bound(relay, lis):
    for _ in range(300):
        client, backend, done = session(relay, lis, proxy_timeout=3600.0)
        client.close()
        backend.close()
        done.wait()
    assert relay.count() == 0
    assert len(relay._heap) <= 300 + 1
