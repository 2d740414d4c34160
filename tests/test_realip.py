"""PROXY protocol from a load balancer (`listen ... proxy_protocol`) and `set_real_ip_from`
(README.md, Load balancers): trust on its own, then end to end for POP3, IMAP and SMTP.
The parser's tests are in test_proxy_protocol.py."""

import base64
import re
import socket
import ssl
import time

import pytest

from tests.support.auth import AuthServer
from tests.support.clients import LineClient
from tests.support.mailbackends import ImapBackend, Pop3Backend, SmtpBackend
from tests.support.process import free_port, ProxyProcess, server_block, SessionLog
from mailproxy import config, realip
from mailproxy.proxy_protocol import v2_header
from tests.support.proxyproto import v2


# ---------------------------------------------------------------------------------------------
# set_real_ip_from

@pytest.mark.parametrize("entries,peer,family,expect", [
    (["127.0.0.1"], "127.0.0.1", socket.AF_INET, True),
    (["127.0.0.1"], "127.0.0.2", socket.AF_INET, False),
    (["10.0.0.0/8"], "10.200.1.1", socket.AF_INET, True),
    (["10.0.0.0/8"], "::ffff:10.1.1.1", socket.AF_INET6, True),     # v4-mapped peer
    (["2001:db8::/32"], "2001:db8::5", socket.AF_INET6, True),
    (["2001:db8::/32"], "10.0.0.1", socket.AF_INET, False),
    (["unix:"], None, socket.AF_UNIX, True),
    (["127.0.0.1"], None, socket.AF_UNIX, False),
    (["unix:"], "127.0.0.1", socket.AF_INET, False),
])
def test_trusted(entries, peer, family, expect):
    assert realip.trusted(config.server_defaults("pop3", set_real_ip_from=entries), peer,
                          family) is expect


# ---------------------------------------------------------------------------------------------
# read_header on a socket pair: what it returns for the session to apply

class _Log(list):
    def __call__(self, level, message, err=None):
        self.append((level, message))


@pytest.mark.parametrize("entries,trusted", [
    (["unix:"], True),                  # a socket pair is AF_UNIX: `unix:` trusts it
    (["127.0.0.1"], False),
    ([], False),
])
@pytest.mark.parametrize("header", [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 5555 110\r\n",
    v2_header("192.0.2.1", 5555, "198.51.100.2", 110),
], ids=["v1", "v2"])
def test_read_header_returns_the_header(entries, trusted, header):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(header + b"USER alice\r\n")
        log = _Log()
        got = realip.read_header(ours, config.server_defaults("pop3", set_real_ip_from=entries), None, log)
        assert got.addrs == ("192.0.2.1", 5555, "198.51.100.2", 110)
        assert got.trusted is trusted
        assert got.client == (("192.0.2.1", 5555) if trusted else None)
        assert log == []
        assert ours.recv(64) == b"USER alice\r\n"      # only the header was consumed


def test_read_header_without_addresses():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"PROXY UNKNOWN\r\n")
        got = realip.read_header(ours, config.server_defaults("pop3", set_real_ip_from=["unix:"]), None, _Log())
        assert got == realip.ProxyHeader(None, None) and not got.trusted


def test_read_header_broken_is_logged_then_closes():
    from mailproxy.clientio import Close
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"PROXY FOO\r\n")
        log = _Log()
        with pytest.raises(Close):
            realip.read_header(ours, config.server_defaults("pop3", set_real_ip_from=["unix:"]), None, log)
        assert log == [("error", 'broken header: "PROXY FOO"')]


# ---------------------------------------------------------------------------------------------
# end to end

HDR_V1 = b"PROXY TCP4 203.0.113.7 198.51.100.2 40000 25\r\n"
HDR_V2 = v2_header("203.0.113.7", 40000, "198.51.100.2", 25,
                   tlvs=[(1, b"smtp"), (2, b"mx.example")])



_SESSION = None          # the running test's SessionLog: `connect` adds its client ports


def _block(protocol, port, auth, trusted=True, listen_extra="proxy_protocol", **directives):
    directives.setdefault("auth_http", auth.url)
    directives.setdefault("timeout", "2s")
    directives.setdefault("set_real_ip_from", ["192.0.2.0/24", "127.0.0.1"] if trusted
                          else ["10.0.0.0/8", "::1"])
    block = server_block(protocol, port, **directives)
    block["listen"] = "127.0.0.1:%d %s" % (port, listen_extra)
    return block


# Every configuration the end-to-end tests use but the TLS one: a server block each of the
# one proxy the module shares.
SHARED = [dict(protocol=p, trusted=t) for p in ("pop3", "imap", "smtp") for t in (True, False)] + [
    dict(protocol="pop3", proxy_protocol="on"),
    dict(protocol="pop3", trusted=False, proxy_protocol="on"),
    dict(protocol="pop3", set_real_ip_from=None),
    dict(protocol="smtp", timeout="500ms"),
    dict(protocol="pop3", listen_extra=""),
    dict(protocol="imap", trusted=True, imap_client_id="on"),
    dict(protocol="imap", trusted=False, imap_client_id="on"),
]


def _key(kw):
    kw = dict(kw)
    kw.setdefault("trusted", True)
    return tuple(sorted(kw.items()))


@pytest.fixture(scope="module")
def shared_proxy(tmp_path_factory):
    auth = AuthServer()
    ports = {_key(kw): free_port() for kw in SHARED}
    servers = {"s%d" % i: _block(port=ports[_key(kw)], auth=auth, **kw)
               for i, kw in enumerate(SHARED)}
    proxy = ProxyProcess(tmp_path_factory.mktemp("realip"), {"servers": servers})
    yield proxy, auth, ports
    proxy.stop()
    auth.stop()



@pytest.fixture
def auth_server(shared_proxy):
    """The shared auth server, its requests those of this test only."""
    auth = shared_proxy[1]
    auth.requests.clear()
    auth.set_respond(None)
    return auth


@pytest.fixture
def pp_setup(shared_proxy, auth_server, proxy_factory, backend_factory):
    """start(protocol, trusted=True, listen_extra='proxy_protocol', **directives) ->
    (proxy log of this test's sessions, port, backend): a server block of the shared proxy
    when the configuration is in SHARED, else a proxy of its own."""
    global _SESSION

    def start(protocol, trusted=True, listen_extra="proxy_protocol", backend=None, **directives):
        global _SESSION
        if backend is None:
            backend = backend_factory({"pop3": Pop3Backend, "imap": ImapBackend,
                                       "smtp": SmtpBackend}[protocol])
        auth_server.route_to(backend.port)
        kw = dict(protocol=protocol, trusted=trusted, **directives)
        if listen_extra != "proxy_protocol":
            kw["listen_extra"] = listen_extra
        proxy, _, ports = shared_proxy
        port = ports.get(_key(kw))
        if port is None:
            port = free_port()
            proxy = proxy_factory({"servers": {protocol: _block(protocol, port, auth_server,
                                                                trusted, listen_extra,
                                                                **directives)}})
        _SESSION = SessionLog(proxy)
        return _SESSION, port, backend
    yield start
    _SESSION = None


def connect(port, first=b""):
    c = LineClient("127.0.0.1", port)
    if _SESSION is not None:
        _SESSION.ports.add(c.sock.getsockname()[1])
    if first:
        c.send(first)
    return c


def login(c, protocol):
    """Log in (the greeting is read here); returns the reply to the login."""
    greeting = c.readline()
    if protocol == "pop3":
        assert greeting.startswith(b"+OK")
        assert c.cmd("USER alice") == b"+OK\r\n"
        return c.cmd("PASS secret")
    if protocol == "imap":
        assert greeting.startswith(b"* OK")
        return c.cmd("a1 LOGIN alice secret")
    assert greeting.startswith(b"220")
    c.sendline("EHLO client.test")
    while c.readline().startswith(b"250-"):
        pass
    return c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0secret").decode())


LOGGED_IN = {"pop3": b"+OK logged in\r\n", "imap": b"a1 OK",
             "smtp": b"235 2.0.0 OK\r\n"}


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
@pytest.mark.parametrize("header", [HDR_V1, HDR_V2], ids=["v1", "v2"])
@pytest.mark.parametrize("protocol", ["pop3", "imap", "smtp"])
def test_proxy_header_and_realip(pp_setup, auth_server, protocol, header, trusted):
    proxy, port, backend = pp_setup(protocol, trusted=trusted)
    c = connect(port, header)
    local_port = c.sock.getsockname()[1]
    reply = login(c, protocol)
    assert reply.startswith(LOGGED_IN[protocol]), reply
    (req,) = auth_server.wait_requests(1)
    client_ip = "203.0.113.7" if trusted else "127.0.0.1"
    assert req.header("Client-IP") == client_ip
    # the header's addresses go to the auth service whether trusted or not
    assert req.header("Proxy-Protocol-Addr") == "203.0.113.7"
    assert req.header("Proxy-Protocol-Port") == "40000"
    assert req.header("Proxy-Protocol-Server-Addr") == "198.51.100.2"
    assert req.header("Proxy-Protocol-Server-Port") == "25"
    names = req.header_names()
    assert names.index("Client-IP") < names.index("Proxy-Protocol-Addr")
    if protocol == "smtp":
        conn = backend.wait_session()
        xclient = [ln for ln in conn.wait_lines(3) if ln.startswith(b"XCLIENT")]
        assert xclient and xclient[0].startswith(b"XCLIENT ADDR=%s " % client_ip.encode())
    # the connected line shows the real TCP peer; later lines the (maybe substituted) client
    connected = proxy.wait_log("connected to")
    assert "client 127.0.0.1:%d connected to 127.0.0.1:%d" % (local_port, port) in connected
    logged_in = proxy.wait_log("client logged in")
    assert "client: %s, server: 127.0.0.1:%d" % (client_ip, port) in logged_in
    c.close()
    done = proxy.wait_log("proxied session done", timeout=5)
    assert "client: %s," % client_ip in done
    assert "[error]" not in proxy.log_text()


def test_realip_ipv6_source_and_outgoing_proxy_header(pp_setup, auth_server, backend_factory):
    backend = backend_factory(Pop3Backend, proxy_protocol=True)
    proxy, port, _ = pp_setup("pop3", backend=backend, proxy_protocol="on")
    c = connect(port, b"PROXY TCP6 2001:DB8::1 2001:db8::2 5555 110\r\n")
    assert login(c, "pop3") == LOGGED_IN["pop3"]
    (req,) = auth_server.wait_requests(1)
    assert req.header("Client-IP") == "2001:db8::1"
    assert req.header("Proxy-Protocol-Addr") == "2001:DB8::1"     # as received
    conn = backend.wait_session()
    # the PROXY header to the backend carries the real client (and our listening side)
    assert conn.proxy_header == b"PROXY TCP6 2001:db8::1 ::ffff:127.0.0.1 5555 %d\r\n" % port
    c.close()


def test_untrusted_peer_keeps_its_address_in_outgoing_header(pp_setup, backend_factory):
    backend = backend_factory(Pop3Backend, proxy_protocol=True)
    proxy, port, _ = pp_setup("pop3", trusted=False, backend=backend, proxy_protocol="on")
    c = connect(port, HDR_V1)
    local_port = c.sock.getsockname()[1]
    assert login(c, "pop3") == LOGGED_IN["pop3"]
    conn = backend.wait_session()
    assert conn.proxy_header == b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (local_port, port)
    c.close()


def test_no_set_real_ip_from_never_substitutes(pp_setup, auth_server):
    proxy, port, _ = pp_setup("pop3", set_real_ip_from=None)
    c = connect(port, HDR_V1)
    assert login(c, "pop3") == LOGGED_IN["pop3"]
    (req,) = auth_server.wait_requests(1)
    assert req.header("Client-IP") == "127.0.0.1"
    assert req.header("Proxy-Protocol-Addr") == "203.0.113.7"
    c.close()


@pytest.mark.parametrize("header", [
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
    v2(command=0x20, fam=0x00),
    v2(fam=0x00, body=b"abc"),
    v2(fam=0x31, body=b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")),
], ids=["v1-unknown", "v1-unknown-long", "v2-local", "v2-unspec", "v2-unix"])
def test_headers_without_addresses(pp_setup, auth_server, header):
    proxy, port, _ = pp_setup("imap")
    c = connect(port, header)
    assert login(c, "imap").startswith(LOGGED_IN["imap"])
    (req,) = auth_server.wait_requests(1)
    assert req.header("Client-IP") == "127.0.0.1"
    assert "Proxy-Protocol-Addr" not in req.header_names()
    c.close()


@pytest.mark.parametrize("protocol,first,reply", [
    ("pop3", b"USER alice\r\n", b"+OK\r\n"),
    ("imap", b"a0 CAPABILITY\r\n", b"* CAPABILITY"),
    ("smtp", b"HELO client.test\r\n", b"250 "),
])
@pytest.mark.parametrize("header", [HDR_V1, HDR_V2], ids=["v1", "v2"])
def test_header_and_first_command_in_one_packet(pp_setup, protocol, first, reply, header):
    proxy, port, _ = pp_setup(protocol)
    c = connect(port, header + first)            # one send: one segment on loopback
    greeting = c.readline()
    assert greeting.startswith({"pop3": b"+OK", "imap": b"* OK", "smtp": b"220"}[protocol])
    assert c.readline().startswith(reply)        # the command after the header was executed
    c.close()


@pytest.mark.parametrize("protocol", ["pop3", "imap", "smtp"])
@pytest.mark.parametrize("data,logged", [
    (b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", 'broken header: "GET / HTTP/1.0"'),
    (b"PROXY TCP4 203.0.113.7 198.51.100.2 40000\r\n",
     'broken header: "PROXY TCP4 203.0.113.7 198.51.100.2 40000"'),
    (b"PROXY TCP4 203.0.113.7 198.51.100.2 40000 99999\r\nUSER a\r\n",
     'broken header: "PROXY TCP4 203.0.113.7 198.51.100.2 40000 99999"'),
    (v2(command=0x11, body=b"\0" * 12), "unknown PROXY protocol version: 1"),
    (v2(body=b"\0" * 12, length=300), "header is too large"),
], ids=["http", "v1-short", "v1-port", "v2-version", "v2-length"])
def test_malformed_header_closes_silently(pp_setup, auth_server, protocol, data, logged):
    proxy, port, _ = pp_setup(protocol)
    c = connect(port, data)
    assert c.read_until_closed(timeout=3) == b""     # not a byte, not even the greeting
    line = proxy.wait_log(logged)
    assert "[error]" in line
    assert re.search(r"while reading PROXY protocol, client: 127\.0\.0\.1, server: "
                     r"127\.0\.0\.1:%d, session: [A-Za-z0-9_-]{16}$" % port, line), line
    assert auth_server.requests == []
    c.close()


def test_timeout_waiting_for_header(pp_setup):
    proxy, port, _ = pp_setup("smtp", timeout="500ms")
    c = connect(port)
    t0 = time.monotonic()
    assert c.read_until_closed(timeout=4) == b""     # no greeting before the header
    assert 0.4 <= time.monotonic() - t0 < 2
    line = proxy.wait_log("client timed out")
    assert "client timed out (110: Connection timed out) while reading PROXY protocol, " \
           "client: 127.0.0.1" in line
    c.close()


def test_close_before_header(pp_setup):
    proxy, port, _ = pp_setup("pop3")
    c = connect(port)
    c.close()
    line = proxy.wait_log("client closed connection while reading PROXY protocol")
    assert "[info]" in line


def test_listener_without_proxy_protocol_treats_header_as_command(pp_setup):
    proxy, port, _ = pp_setup("pop3", listen_extra="")
    c = connect(port)
    assert c.readline().startswith(b"+OK")
    c.send(HDR_V1)
    assert c.readline().startswith(b"-ERR")


# ---------------------------------------------------------------------------------------------
# before the TLS handshake of an ssl listener, ClientHello in the same packet

def _tls_client_hello_with_header(sock, header, ctx):
    """Handshake over `sock` with an SSLObject, sending `header` + ClientHello in one send.
    Returns (sslobj, read(), write()) helpers."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    sock.sendall(header + out.read())             # PROXY header and ClientHello together
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pending = out.read()
            if pending:
                sock.sendall(pending)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during handshake")
            inc.write(data)
    pending = out.read()
    if pending:
        sock.sendall(pending)

    def read():
        while True:
            try:
                return obj.read(65536)
            except ssl.SSLWantReadError:
                pending = out.read()
                if pending:
                    sock.sendall(pending)
                data = sock.recv(65536)
                if not data:
                    return b""
                inc.write(data)

    def write(data):
        obj.write(data)
        sock.sendall(out.read())

    return obj, read, write


@pytest.mark.parametrize("header", [HDR_V1, HDR_V2], ids=["v1", "v2"])
def test_proxy_header_before_implicit_tls(pp_setup, auth_server, certs, header):
    proxy, port, _ = pp_setup("pop3", listen_extra="ssl proxy_protocol",
                              ssl_certificate=certs["server"],
                              ssl_certificate_key=certs["server_key"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs["ca"])
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        obj, read, write = _tls_client_hello_with_header(sock, header, ctx)
        buf = b""
        while b"\r\n" not in buf:
            buf += read()
        assert buf.startswith(b"+OK")
        write(b"USER alice\r\n")
        assert read() == b"+OK\r\n"
        write(b"PASS secret\r\n")
        assert read() == b"+OK logged in\r\n"
    finally:
        sock.close()
    (req,) = auth_server.wait_requests(1)
    assert req.header("Client-IP") == "203.0.113.7"
    assert req.header("Proxy-Protocol-Port") == "40000"


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
def test_imap_client_id_uses_proxy_header_only_from_trusted_peer(pp_setup, trusted):
    """imap_client_id: the PROXY header's destination goes to the backend's ID only when the
    peer is in set_real_ip_from, even when the header's source is the peer's own address."""
    proxy, port, backend = pp_setup("imap", trusted=trusted, imap_client_id="on")
    c = connect(port, b"PROXY TCP4 127.0.0.1 198.51.100.2 40000 143\r\n")
    local_port = c.sock.getsockname()[1]
    assert login(c, "imap").startswith(LOGGED_IN["imap"])
    raw = bytes(backend.wait_session(0).raw)
    m = re.match(rb'mailproxy-id ID \("x-originating-ip" "127\.0\.0\.1" "x-originating-port" '
                 rb'"(\d+)" "x-connected-ip" "([^"]*)" "x-connected-port" "(\d+)" ', raw)
    assert m, raw
    if trusted:
        assert m.groups() == (b"40000", b"198.51.100.2", b"143")
    else:
        assert m.groups() == (b"%d" % local_port, b"127.0.0.1", b"%d" % port)
    c.close()
