"""A scripted DNS server on a loopback UDP (and optionally TCP) port, for the resolver and SMTP's
client host names. Queries it cannot parse and exceptions in its threads land in `errors`; the
fixture's teardown fails the test on them."""

import ipaddress
import socket
import struct
import threading
import time

import pytest

from mailproxy.resolver import T_A, T_AAAA
from tests.support.common import fail_on_errors


def wire_name(name):
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            raw = label.encode("latin-1")
            out += bytes([len(raw)]) + raw
    return out + b"\0"


def _rdata(rtype, data):
    if rtype == T_A:
        return ipaddress.IPv4Address(data).packed
    if rtype == T_AAAA:
        return ipaddress.IPv6Address(data).packed
    return wire_name(data)


class DnsServer:
    """Answers with `zone[(qname, qtype)]`: a list of (type, ttl, data) records, an int rcode,
    'drop' (no answer), ('sleep', s, then) or a callable(qname, qtype, ident) -> list of raw
    datagrams. Unknown names get NXDOMAIN. Every query is recorded in `queries`."""

    def __init__(self, zone=None, host="127.0.0.1", tcp=False, default=3):
        self.zone = dict(zone or {})
        self.default = default
        self.queries = []
        self.tcp_sock = None
        self.tcp_queries = []
        for _ in range(50):     # with tcp=True: a port free for both UDP and TCP
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((host, 0))
            self.port = self.sock.getsockname()[1]
            if not tcp:
                break
            self.tcp_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.tcp_sock.bind((host, self.port))
                break
            except OSError:
                self.tcp_sock.close()
                self.sock.close()
                self.tcp_sock = None
        self.address = (host, self.port)
        self.errors = []
        self.expect_errors = False
        self._threads = []
        self.tcp_zone = {}
        self.stopped = False
        if tcp:
            self.tcp_sock.listen(5)
            self._start(self._tcp_loop)
        self._start(self._loop)

    def _start(self, target, *args):
        t = threading.Thread(target=self._guarded, args=(target,) + args, daemon=True)
        self._threads.append(t)
        t.start()

    def _guarded(self, target, *args):
        try:
            target(*args)
        except Exception as exc:      # recorded: the fixture's teardown fails the test
            if not self.stopped:
                self.errors.append(exc)

    @staticmethod
    def parse(msg):
        ident, flags, qd = struct.unpack("!HHH", msg[:6])
        off = 12
        labels = []
        while msg[off]:
            n = msg[off]
            labels.append(msg[off + 1:off + 1 + n].decode("latin-1"))
            off += 1 + n
        off += 1
        qtype, qclass = struct.unpack("!HH", msg[off:off + 4])
        return ident, flags, ".".join(labels), qtype, msg[12:off + 4]

    @staticmethod
    def reply(ident, question, rcode=0, records=(), tc=False, flags=None):
        if flags is None:
            flags = 0x8180 | rcode | (0x0200 if tc else 0)
        out = struct.pack("!HHHHHH", ident, flags, 1, len(records), 0, 0) + question
        for rtype, ttl, data in records:
            rd = _rdata(rtype, data)
            out += b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, ttl, len(rd)) + rd
        return out

    def _answer(self, action, ident, name, qtype, question):
        if callable(action):
            return action(name, qtype, ident, question)
        if action == "drop":
            return []
        if isinstance(action, tuple) and action[0] == "sleep":
            time.sleep(action[1])
            return self._answer(action[2], ident, name, qtype, question)
        if isinstance(action, int):
            return [self.reply(ident, question, rcode=action)]
        if action == "truncated":
            return [self.reply(ident, question, tc=True)]
        return [self.reply(ident, question, records=action)]

    def _loop(self):
        # a close() from another thread does not wake recvfrom/accept: poll `stopped` instead
        self.sock.settimeout(0.05)
        while not self.stopped:
            try:
                msg, peer = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                ident, _flags, name, qtype, question = self.parse(msg)
            except (struct.error, IndexError, UnicodeDecodeError) as exc:
                self.errors.append(("unparsable query", msg, exc))
                continue
            self.queries.append((name, qtype))
            action = self.zone.get((name.lower(), qtype), self.default)

            def work(action=action, ident=ident, name=name, qtype=qtype, question=question,
                     peer=peer):
                for dgram in self._answer(action, ident, name, qtype, question):
                    try:
                        self.sock.sendto(dgram, peer)
                    except OSError:
                        pass
            self._start(work)

    def _tcp_loop(self):
        self.tcp_sock.settimeout(0.05)
        while not self.stopped:
            try:
                conn, _ = self.tcp_sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(10)
            with conn:
                head = conn.recv(2)
                msg = b""
                n = struct.unpack("!H", head)[0]
                while len(msg) < n:
                    msg += conn.recv(n - len(msg))
                ident, _flags, name, qtype, question = self.parse(msg)
                self.tcp_queries.append((name, qtype))
                records = self.tcp_zone.get((name.lower(), qtype), [])
                out = self.reply(ident, question, records=records)
                conn.sendall(struct.pack("!H", len(out)) + out)

    def stop(self):
        self.stopped = True
        for t in self._threads:
            t.join(5)
        self.sock.close()
        if self.tcp_sock:
            self.tcp_sock.close()


@pytest.fixture
def dns():
    """make(zone=None, **kw) -> a started DnsServer (stopped, and its errors checked, in
    teardown)."""
    made = []

    def make(zone=None, **kw):
        s = DnsServer(zone, **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()
    for s in made:
        fail_on_errors(s, f"the DNS server on port {s.port}")
