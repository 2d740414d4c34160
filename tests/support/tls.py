"""Client-side TLS helpers for the tests of TLS towards clients: a proxy with one TLS server
block (start_tls_proxy / TLSSetup), client contexts on the test PKI, a byte-exact line client
over an SSLSocket (TLSLines), and a byte-by-byte line reader for plain sockets."""

import socket
import ssl

from tests.support.common import CRLF, track
from tests.support.mailbackends import ImapBackend, Pop3Backend, SmtpBackend
from tests.support.process import free_port


class TLSSetup:
    def __init__(self, proxy, port, auth, backend):
        self.proxy, self.port, self.auth, self.backend = proxy, port, auth, backend
        self.host = "127.0.0.1"

    def raw(self, timeout=5.0):
        return track(socket.create_connection((self.host, self.port), timeout=timeout))


def start_tls_proxy(proxy_factory, auth_server, backend_factory, pki, protocol, implicit=True,
                    backend=None, **directives):
    """One server block with the RSA server certificate: `listen ... ssl` when `implicit`, else a
    plain listener (pass starttls=...). auth_http routes everyone to the backend (by default a
    fresh Pop3Backend, ImapBackend or SmtpBackend for `protocol`)."""
    if backend is None:
        backend = {"pop3": lambda: backend_factory(Pop3Backend, users={"alice": "secret"}),
                   "imap": lambda: backend_factory(ImapBackend),
                   "smtp": lambda: backend_factory(SmtpBackend)}[protocol]()
    port = free_port()
    auth_server.route_to(backend.port, server=backend.host)
    block = {"listen": "127.0.0.1:%d%s" % (port, " ssl" if implicit else ""),
             "protocol": protocol, "auth_http": auth_server.url,
             "timeout": directives.pop("timeout", "2s"),
             "ssl_certificate": pki.server_rsa[0], "ssl_certificate_key": pki.server_rsa[1]}
    block.update(directives)
    proxy = proxy_factory({"servers": {protocol: block}})
    return TLSSetup(proxy, port, auth_server, backend)


def client_ctx(pki, cert=None, **attrs):
    """A client context trusting the test CA, with an optional client pair and attributes."""
    ctx = ssl.create_default_context(cafile=pki.ca)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    for k, v in attrs.items():
        setattr(ctx, k, v)
    return ctx


class TLSLines:
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

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
