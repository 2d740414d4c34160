"""Client-side TLS helpers for the tests of TLS towards clients (their proxies: SharedProxy in
process.py): client contexts on the test PKI, a byte-exact line client over an SSLSocket
(TLSLines), and a byte-by-byte line reader for plain sockets."""

import ssl

from tests.support.common import CRLF, OwnsSocket, track


def client_ctx(pki, cert=None, **attrs):
    """A client context trusting the test CA, with an optional client pair and attributes."""
    ctx = ssl.create_default_context(cafile=pki.ca)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    for k, v in attrs.items():
        setattr(ctx, k, v)
    return ctx


class TLSLines(OwnsSocket):
    """A byte-exact line client over an SSLSocket."""

    def __init__(self, sock):
        self.sock = track(sock)
        self.buf = b""

    def readline(self, timeout=5.0):
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLError, ConnectionError):
                data = b""
            if not data:
                rest, self.buf = self.buf, b""
                return rest
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def send(self, data):
        self.sock.sendall(data)

    def cmd(self, line):
        self.send(line + CRLF)
        return self.readline()

    def closed(self, timeout=3.0):
        return self.readline(timeout) == b""



def readline_raw(sock, timeout=5.0):
    """One line from a plain socket, byte by byte (nothing beyond it is consumed)."""
    sock.settimeout(timeout)
    out = b""
    while not out.endswith(b"\n"):
        c = sock.recv(1)
        if not c:
            break
        out += c
    return out
