"""A TLS-speaking backend for POP3, IMAP and SMTP (implicit TLS, or after STLS/STARTTLS) that
records what it saw before and after the handshake, and the server context it is given; shared
by the tests of TLS to backends (test_proxy_ssl.py) and of `check` (test_check.py)."""

import ssl

from tests.support.backends import ScriptedBackend


def server_context(certs, require_client_cert=False):
    """A backend's server context on the test PKI (the `certs` fixture), optionally requiring
    a client certificate signed by the test CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs["server"], certs["server_key"])
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(certs["ca"])
    return ctx


class TlsBackend(ScriptedBackend):
    """mode: 'on' (TLS from the first byte), 'starttls' (STLS / STARTTLS offered), 'off'.

    conn.data: 'plain' = lines received before TLS, 'tls' = TLS version after the handshake,
    'peer_cert' = the client certificate's subject (if any), 'login' = the login lines.
    After the login every line is answered with `<echo> tls=<version>`.
    """

    def __init__(self, protocol, mode, ctx, refuse_starttls=False):
        self.protocol, self.mode, self.ctx = protocol, mode, ctx
        self.refuse_starttls = refuse_starttls
        super().__init__(None)

    def _tls(self, conn):
        assert not conn._buf, "plaintext after the STARTTLS command"
        conn.sock = self.ctx.wrap_socket(conn.sock, server_side=True)
        conn.sock.settimeout(self.io_timeout)
        conn.data["tls"] = conn.sock.version()
        cert = conn.sock.getpeercert()
        if cert:
            conn.data["peer_cert"] = dict(x[0] for x in cert["subject"])["commonName"]

    def handle(self, conn):
        conn.data["plain"] = []
        if self.mode == "on":
            self._tls(conn)
        getattr(self, "_" + self.protocol)(conn)

    def _line(self, conn):
        line = conn.readline()
        if line is None:
            raise EOFError
        if "tls" not in conn.data:
            conn.data["plain"].append(line)
        return line

    def _echo(self, conn, fmt):
        while True:
            try:
                line = self._line(conn)
            except EOFError:
                return
            conn.sendline(fmt % (line.rstrip(b"\r\n"), conn.data.get("tls", "none").encode()))

    def _pop3(self, conn):
        conn.sendline(b"+OK backend ready")
        line = self._line(conn)
        if line == b"STLS\r\n":
            if self.refuse_starttls:
                conn.sendline(b"-ERR no TLS here")
                return
            conn.sendline(b"+OK begin TLS")
            self._tls(conn)
            line = self._line(conn)
        conn.data["login"] = [line]
        conn.sendline(b"+OK")
        conn.data["login"].append(self._line(conn))
        conn.sendline(b"+OK logged in")
        self._echo(conn, b"+OK echo %s tls=%s")

    def _imap(self, conn):
        conn.sendline(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] backend ready")
        line = self._line(conn)
        if line.endswith(b"STARTTLS\r\n"):
            tag = line.split(b" ")[0]
            if self.refuse_starttls:
                conn.sendline(tag + b" BAD no TLS here")
                return
            conn.sendline(tag + b" OK Begin TLS negotiation now")
            self._tls(conn)
            line = self._line(conn)
        tag = line.split(b" ")[0]
        conn.data["login"] = [line]
        conn.sendline(b"+ OK")
        conn.data["login"].append(self._line(conn))            # alice {6}
        conn.sendline(b"+ OK")
        conn.data["login"].append(self._line(conn))
        conn.sendline(tag + b" OK Logged in")
        self._echo(conn, b"* echo %s tls=%s")

    def _smtp(self, conn):
        conn.sendline(b"220 backend.test ESMTP")
        conn.data["login"] = []
        while True:
            try:
                line = self._line(conn)
            except EOFError:
                return
            verb = line.split(b" ")[0].rstrip(b"\r\n").upper()
            if verb == b"EHLO":
                conn.send(b"250-backend.test\r\n250-STARTTLS\r\n250 XCLIENT ADDR LOGIN NAME\r\n")
            elif verb == b"HELO":
                conn.sendline(b"250 backend.test")
            elif verb == b"STARTTLS":
                if self.refuse_starttls:
                    conn.sendline(b"454 4.7.0 TLS not available")
                    return
                conn.sendline(b"220 2.0.0 Ready to start TLS")
                self._tls(conn)
            elif verb == b"XCLIENT":
                conn.data["login"].append(line)
                conn.sendline(b"220 backend.test ESMTP")
            else:
                conn.sendline(b"250 echo %s tls=%s" % (line.rstrip(b"\r\n"),
                                                       conn.data.get("tls", "none").encode()))
