"""TLS towards clients, beyond test_tls.py:

- `openssl s_client` as a second, independent client: `-starttls pop3|imap|smtp` and plain
  `-connect` to `listen ... ssl`, driving a login and one command to a scripted backend;
- after a login over TLS (implicit and STARTTLS), IMAP and SMTP commands relayed both ways and
  a 5 MB message each way (IMAP FETCH down, SMTP DATA up) intact through the TLS relay;
- `ssl_verify_depth` with client chains through one and two intermediate CAs (OpenSSL >= 1.1
  counts intermediates only: depth 1 admits one, depth 2 two; checked against nginx);
- `ssl_dhparam` with a TLSv1.2 DHE cipher, TLS session resumption per `ssl_session_cache` /
  `ssl_session_tickets`;
- every `ssl_verify_client` mode against no certificate, a valid one and one from another CA.

Certificates come from tests/support/certs.py (`pki`, and `issue` for the chains through
intermediate CAs); DH parameters are made with `openssl` in the test's own tmp dir.
"""

import base64
import hashlib
import imaplib
import os
import shutil
import smtplib
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.certs import issue
from tests.support.common import REPO, SMTPLIB_MAIL, SMTPLIB_RCPT, fail_on_errors
from tests.support.mailbackends import (ImapBackend, Pop3Backend, SmtpBackend,
                                        big_message_chunks, big_message_digest)
from tests.support.process import ProxyProcess, SharedProxy, free_port
from tests.support.tls import TLSLines, client_ctx

CRLF = b"\r\n"
BIG = 5 * 1024 * 1024
IMAP_LOGGED_IN = b"OK [CAPABILITY IMAP4rev1 IDLE] Logged in"

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="the openssl command is needed")


# ---------------------------------------------------------------------------------------------
# helpers

def _config(protocol, implicit=True, **directives):
    """tls's arguments as a SharedProxy configuration."""
    return dict(protocol=protocol, listen_extra="ssl" if implicit else "", **directives)


def _configs(pki, dhparam):
    """Every configuration the tests use (tls's arguments), one server block each."""
    on = dict(ssl_verify_client="on", ssl_client_certificate=pki.ca)
    configs = [_config(p, implicit, starttls="off" if implicit else "on", server_name="mx.test")
               for p in ("pop3", "imap", "smtp") for implicit in (True, False)]
    configs += [_config("imap", False, starttls="only"), _config("imap", starttls="off"),
                _config("imap", False, starttls="on"), _config("pop3"),
                _config("pop3", ssl_dhparam=dhparam)]
    configs += [_config("pop3", ssl_verify_depth=depth, **on) for depth in DEPTH_TABLE]
    configs += [_config(p, **on) for p in ("imap", "smtp")]
    configs += [_config(p, ssl_verify_depth=2, **on) for p in ("imap", "smtp")]
    configs += [_config("pop3", ssl_session_cache=cache, ssl_session_tickets=tickets)
                for cache, tickets in (("builtin", "on"), ("builtin", "off"),
                                       ("builtin:1000", "on"), ("off", "off"),
                                       ("none", "off"), ("none", "on"))]
    configs += [_config("pop3", ssl_verify_client=mode,
                        **({} if mode == "off" else {"ssl_client_certificate": pki.ca}))
                for mode in ("off", "on", "optional", "optional_no_ca")]
    return configs


@pytest.fixture(scope="module")
def shared(tmp_path_factory, pki, dhparam):
    proxy = SharedProxy(tmp_path_factory.mktemp("tls_clients"), _configs(pki, dhparam),
                        defaults=dict(timeout="3s", ssl_certificate=pki.server_rsa[0],
                                      ssl_certificate_key=pki.server_rsa[1]))
    yield proxy
    proxy.stop()


@pytest.fixture
def tls(shared, backend_factory):
    """start(protocol, implicit=True, backend=None, **directives) -> Setup on the shared proxy's
    block of that configuration: the RSA server certificate, `listen ... ssl` when `implicit`,
    else a plain listener (pass starttls=...); auth routes everyone to the backend (by default
    a fresh one for `protocol`)."""
    def start(protocol, implicit=True, backend=None, **directives):
        if backend is None:
            backend = {"pop3": lambda: backend_factory(Pop3Backend, users={"alice": "secret"}),
                       "imap": lambda: backend_factory(ImapBackend),
                       "smtp": lambda: backend_factory(SmtpBackend)}[protocol]()
        return shared.setup(backend, **_config(protocol, implicit, **directives))
    yield start
    fail_on_errors(shared.auth, "the auth service")


def tls_connect(setup, ctx, server_hostname="mail.test", session=None):
    raw = setup.raw()
    return TLSLines(ctx.wrap_socket(raw, server_hostname=server_hostname, session=session))


def _pop3_login(c):
    assert c.cmd(b"USER alice") == b"+OK\r\n"
    return c.cmd(b"PASS secret")


def openssl(*args, cwd):
    r = subprocess.run(["openssl"] + [str(a) for a in args], cwd=str(cwd), capture_output=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r


class SClient:
    """`openssl s_client` as a subprocess: stdin fed line by line, stdout/stderr collected by
    reader threads, `expect()` waits for bytes in stdout with a timeout. Only this process is
    ever signalled."""

    def __init__(self, args):
        self.proc = subprocess.Popen(["openssl", "s_client"] + list(args), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = bytearray()
        self.err = bytearray()
        self.pos = 0
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._pump, args=(f, buf), daemon=True)
                        for f, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.threads:
            t.start()

    def _pump(self, f, buf):
        fd = f.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.cond.notify_all()
                    return
                buf += data
                self.cond.notify_all()

    def send(self, line):
        self.proc.stdin.write(line + CRLF)
        self.proc.stdin.flush()

    def expect(self, data, timeout=5.0):
        """Wait until `data` appears in stdout after what earlier calls consumed; return the
        stdout text up to and including it."""
        with self.cond:
            ok = self.cond.wait_for(lambda: self.out.find(data, self.pos) >= 0, timeout)
            if not ok:
                raise AssertionError("s_client: no %r within %ss; stdout after the last match: "
                                     "%r; stderr: %r" % (data, timeout, bytes(self.out[self.pos:]),
                                                         bytes(self.err)))
            end = self.out.find(data, self.pos) + len(data)
            got = bytes(self.out[self.pos:end])
            self.pos = end
            return got

    def cmd(self, line, reply, timeout=5.0):
        self.send(line)
        return self.expect(reply, timeout)

    def stderr(self):
        with self.cond:
            return bytes(self.err).decode(errors="replace")

    def wait_exit(self, timeout=5.0):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self):
        for f in (self.proc.stdin,):
            try:
                f.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
        for t in self.threads:
            t.join(2)
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


@pytest.fixture
def s_client(pki):
    """start(port, *extra_args) -> SClient, verifying the server against the test CA; every
    started s_client is ended in teardown."""
    started = []

    def start(port, *extra):
        args = ["-connect", "127.0.0.1:%d" % port, "-servername", "mail.test",
                "-CAfile", pki.ca, "-verify_return_error", "-verify_hostname", "mail.test",
                "-brief", "-ign_eof", "-nocommands"] + list(extra)
        c = SClient(args)
        started.append(c)
        return c
    yield start
    for c in started:
        c.close()


# ---------------------------------------------------------------------------------------------
# 1. openssl s_client as an independent client

def _plain(user=b"alice", password=b"secret"):
    return base64.b64encode(b"\0" + user + b"\0" + password)


# protocol -> (greeting on implicit TLS, [(line, reply it must bring)], what the backend got)
S_CLIENT_SCRIPTS = {
    "pop3": (b"+OK POP3 ready\r\n",
             [(b"USER alice", b"+OK\r\n"),
              (b"PASS secret", b"+OK logged in\r\n"),
              (b"STAT", b"+OK 2 "),                            # from the backend, via the relay
              (b"QUIT", b"+OK bye\r\n")],
             [b"USER alice", b"PASS secret", b"STAT", b"QUIT"]),
    "imap": (b"* OK IMAP4 ready\r\n",
             [(b"a LOGIN alice secret", b"a " + IMAP_LOGGED_IN + b"\r\n"),
              (b"b SELECT INBOX", b"b OK SELECT completed.\r\n"),
              (b"c LOGOUT", b"* BYE Logging out\r\nc OK Logout completed.\r\n")],
             [b"b SELECT INBOX", b"c LOGOUT"]),
    "smtp": (b"220 ",
             [(b"EHLO client.test", b"250 "),
              (b"AUTH PLAIN " + _plain(), b"235 2.0.0 OK\r\n"),
              (b"MAIL FROM:<a@example.com>", b"250 2.1.0 Ok\r\n"),
              (b"QUIT", b"221 2.0.0 Bye\r\n")],
             [b"MAIL FROM:<a@example.com>", b"QUIT"]),
}


@needs_openssl
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
@pytest.mark.parametrize("protocol", ["pop3", "imap", "smtp"])
def test_openssl_s_client(tls, s_client, protocol, mode):
    implicit = mode == "implicit"
    s = tls(protocol, implicit=implicit, starttls="off" if implicit else "on",
            server_name="mx.test")
    greeting, steps, backend_got = S_CLIENT_SCRIPTS[protocol]
    c = s_client(s.port, *([] if implicit else ["-starttls", protocol]))
    if implicit:
        assert c.expect(greeting).startswith(greeting)
    # else: s_client read the greeting and did STARTTLS/STLS itself; nothing is printed
    for line, reply in steps:
        got = c.cmd(line, reply)
        assert got.endswith(reply), (line, got)
    assert c.wait_exit() == 0, c.stderr()          # the server closed after QUIT/LOGOUT
    err = c.stderr()
    assert "CONNECTION ESTABLISHED" in err
    assert "Verification: OK" in err                # verified against the test CA ...
    assert "Verified peername: mail.test" in err    # ... and for the name asked for
    assert "Protocol version: TLSv1.3" in err
    req = s.auth.wait_requests(1)[0]
    assert req.header("Auth-SSL") == "on" and req.header("Auth-User") == "alice"
    assert req.header("Auth-SSL-Protocol") == "TLSv1.3"
    conn = s.backend.wait_session()
    conn.closed.wait(3)
    lines = conn.lines
    for want in backend_got:
        assert want in lines, (want, lines)
    line = s.proxy.wait_log("client logged in")
    if not implicit:
        assert "using starttls" in line


@needs_openssl
def test_openssl_s_client_refused_before_tls_under_only(tls, s_client):
    """With `starttls only`, s_client's STARTTLS works and the login after it goes through;
    a plain-text login on the same server is refused (cross-check of the other client)."""
    s = tls("imap", implicit=False, starttls="only")
    c = s_client(s.port, "-starttls", "imap")
    assert c.cmd(b"a LOGIN alice secret", b"\r\n") == b"a " + IMAP_LOGGED_IN + b"\r\n"
    raw = s.raw()
    f = raw.makefile("rb")
    assert f.readline() == b"* OK IMAP4 ready\r\n"
    raw.sendall(b"x LOGIN alice secret\r\n")
    assert f.readline() == b"x BAD invalid command\r\n"
    raw.close()


# ---------------------------------------------------------------------------------------------
# 2. the TLS relay after login: IMAP and SMTP, implicit TLS and STARTTLS

@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_imap_relay_over_tls(tls, backend_factory, pki, mode):
    backend = backend_factory(ImapBackend, big_size=BIG)
    implicit = mode == "implicit"
    s = tls("imap", implicit=implicit, starttls="off" if implicit else "on", backend=backend)
    if implicit:
        m = imaplib.IMAP4_SSL(s.host, s.port, ssl_context=client_ctx(pki), timeout=10)
    else:
        m = imaplib.IMAP4(s.host, s.port, timeout=10)
        assert m.starttls(client_ctx(pki))[0] == "OK"
    assert isinstance(m.sock, ssl.SSLSocket)
    assert m.login("alice", "secret")[0] == "OK"
    # a few commands both ways, answered by the backend
    assert m.select("INBOX")[0] == "OK"
    assert m.state == "SELECTED"
    assert m.noop() == ("OK", [b"NOOP completed."])
    typ, data = m._simple_command("CHECK")
    assert typ == "OK"
    # 5 MB down
    t0 = time.monotonic()
    typ, data = m.fetch("1", "(BODY[])")
    assert typ == "OK"
    assert data[0][0] == b"1 (BODY[] {%d}" % BIG
    body = data[0][1]
    assert len(body) == BIG
    assert hashlib.sha256(body).hexdigest() == big_message_digest(BIG)
    assert time.monotonic() - t0 < 15
    assert m.noop()[0] == "OK"                     # the session goes on after the big literal
    assert m.logout()[0] == "BYE"
    conn = backend.wait_session()
    conn.closed.wait(3)
    verbs = [ln.split(b" ")[1] for ln in conn.lines if b" " in ln]
    assert verbs[-6:] == [b"SELECT", b"NOOP", b"CHECK", b"FETCH", b"NOOP", b"LOGOUT"]
    req = s.auth.wait_requests(1)[0]
    assert req.header("Auth-SSL") == "on"
    line = s.proxy.wait_log("proxied session done", timeout=5)
    assert "[info]" in line


def _smtp_send_big(smtp, size):
    smtp.mail("a@example.com")
    smtp.rcpt("c@example.com")
    code, _ = smtp.docmd("DATA")
    assert code == 354
    for chunk in big_message_chunks(size):
        smtp.sock.sendall(chunk)
    smtp.sock.sendall(b".\r\n")
    return smtp.getreply()


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_smtp_relay_over_tls(tls, pki, mode):
    implicit = mode == "implicit"
    s = tls("smtp", implicit=implicit, starttls="off" if implicit else "on",
            server_name="mx.test")
    if implicit:
        smtp = smtplib.SMTP_SSL(s.host, s.port, context=client_ctx(pki), timeout=10)
    else:
        smtp = smtplib.SMTP(s.host, s.port, timeout=10)
        smtp.ehlo("client.test")
        assert smtp.starttls(context=client_ctx(pki))[0] == 220
    assert isinstance(smtp.sock, ssl.SSLSocket)
    smtp.ehlo("client.test")
    assert smtp.login("alice", "secret")[0] == 235
    # the backend answers now ("Ok", where the proxy itself says "OK")
    assert smtp.noop() == (250, b"2.0.0 Ok")
    assert smtp.rset() == (250, b"2.0.0 Ok")
    assert smtp.docmd("VRFY alice") == (502, b"5.5.2 Error: command not recognized")
    # 5 MB up
    t0 = time.monotonic()
    assert _smtp_send_big(smtp, BIG) == (250, b"2.0.0 Ok: queued as ABC123")
    assert time.monotonic() - t0 < 15
    assert smtp.noop() == (250, b"2.0.0 Ok")
    assert smtp.quit() == (221, b"2.0.0 Bye")
    conn = s.backend.wait_session()
    conn.closed.wait(3)
    assert conn.data["messages"] == [(BIG, big_message_digest(BIG))]
    # what the client said after the login, as smtplib wrote it (lower-case verbs)
    assert conn.lines[-8:] == [b"noop", b"rset", b"VRFY alice",
                               SMTPLIB_MAIL.encode() + b"<a@example.com>",
                               SMTPLIB_RCPT.encode() + b"<c@example.com>",
                               b"DATA", b"noop", b"quit"]
    assert s.auth.wait_requests(1)[0].header("Auth-SSL") == "on"


# ---------------------------------------------------------------------------------------------
# 3. ssl_verify_depth: client -> intermediate(s) -> CA
#
# OpenSSL >= 1.1 counts intermediate CAs only (neither the client's own certificate nor the
# trust anchor): depth 0 = issued by the CA itself, depth 1 = at most one intermediate, depth 2 =
# at most two. Checked against nginx 1.x (mail module, OpenSSL 3) on the same certificates:
# it answers exactly the table below and logs "(20:unable to get local issuer certificate)".

_CA_EXT = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
_LEAF_EXT = ("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
             "extendedKeyUsage=clientAuth\n")


@pytest.fixture(scope="module")
def chains(tmp_path_factory, pki):
    """{'direct': the pki client pair (issued by the CA), 'one': (chain_pem, key) of a client
    certificate under one intermediate CA, 'two': under two}; chain_pem holds the leaf then its
    intermediates, all sent by the client. Made with `openssl` in this module's tmp dir."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed")
    d = tmp_path_factory.mktemp("chains")
    ca_key = str(Path(pki.ca).with_name("ca.key"))
    i1 = issue(d, "inter1", "/O=Test Org/CN=Test Intermediate CA", pki.ca, ca_key, _CA_EXT,
                "0x7001")
    i2 = issue(d, "inter2", "/O=Test Org/CN=Test Sub CA", i1[0], i1[1], _CA_EXT, "0x7002")
    leaf1 = issue(d, "leaf1", "/CN=chained.test", i1[0], i1[1], _LEAF_EXT, "0x7003")
    leaf2 = issue(d, "leaf2", "/CN=deep.test", i2[0], i2[1], _LEAF_EXT, "0x7004")
    out = {"direct": pki.client}
    for name, leaf, inters in (("one", leaf1, [i1]), ("two", leaf2, [i2, i1])):
        chain = d / (name + "-chain.pem")
        pems = [leaf[0]] + [i[0] for i in inters]
        chain.write_bytes(b"".join(Path(pem).read_bytes() for pem in pems))
        out[name] = (str(chain), leaf[1])
    return out


DEPTH_ERROR = "client SSL certificate verify error: (20:unable to get local issuer certificate)"
# depth -> {chain: accepted?}
DEPTH_TABLE = {
    0: {"direct": True, "one": False, "two": False},
    1: {"direct": True, "one": True, "two": False},
    2: {"direct": True, "one": True, "two": True},
}


@pytest.mark.parametrize("depth", list(DEPTH_TABLE))
def test_verify_depth(tls, pki, chains, depth):
    s = tls("pop3", ssl_verify_client="on", ssl_client_certificate=pki.ca,
            ssl_verify_depth=depth)
    results = {}
    for which in DEPTH_TABLE[depth]:
        c = tls_connect(s, client_ctx(pki, chains[which]))
        first = c.readline()
        if first == b"-ERR SSL certificate error\r\n":
            assert c.closed()
            results[which] = False
            continue
        assert first == b"+OK POP3 ready\r\n"
        n = len(s.auth.requests)
        assert _pop3_login(c) == b"+OK logged in\r\n"
        req = s.auth.wait_requests(n + 1)[n]
        assert req.header("Auth-SSL-Verify") == "SUCCESS"
        results[which] = True
        c.close()
    assert results == DEPTH_TABLE[depth]
    if not all(results.values()):
        assert "[info]" in s.proxy.wait_log(DEPTH_ERROR)


def test_verify_depth_headers_of_a_chained_certificate(tls, pki, chains):
    s = tls("pop3", ssl_verify_client="on", ssl_client_certificate=pki.ca, ssl_verify_depth=2)
    c = tls_connect(s, client_ctx(pki, chains["two"]))
    assert c.readline() == b"+OK POP3 ready\r\n"
    assert _pop3_login(c) == b"+OK logged in\r\n"
    req = s.auth.wait_requests(1)[0]
    assert req.header("Auth-SSL-Verify") == "SUCCESS"
    assert req.header("Auth-SSL-Subject") == "CN=deep.test"
    assert req.header("Auth-SSL-Issuer") == "CN=Test Sub CA,O=Test Org"
    assert req.header("Auth-SSL-Serial") == "7004"


@pytest.mark.parametrize("protocol,reply", [
    ("imap", b"* BYE SSL certificate error\r\n"),
    ("smtp", b"421 4.7.1 SSL certificate error\r\n"),
])
def test_verify_depth_error_lines(tls, pki, chains, protocol, reply):
    """depth 1 (the default) with two intermediates: the protocol's certificate error line;
    depth 2 lets the same client in."""
    s = tls(protocol, ssl_verify_client="on", ssl_client_certificate=pki.ca)
    c = tls_connect(s, client_ctx(pki, chains["two"]))
    assert c.readline() == reply
    assert c.closed()
    s.proxy.wait_log(DEPTH_ERROR)
    assert s.auth.requests == []
    s2 = tls(protocol, ssl_verify_client="on", ssl_client_certificate=pki.ca, ssl_verify_depth=2)
    c = tls_connect(s2, client_ctx(pki, chains["two"]))
    assert c.readline().startswith((b"* OK IMAP4 ready", b"220 "))
    assert s.auth.requests == []


# ---------------------------------------------------------------------------------------------
# 4. ssl_dhparam and session resumption

DHE_CIPHER = "DHE-RSA-AES128-GCM-SHA256"


@pytest.fixture(scope="module")
def dhparam(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed")
    d = tmp_path_factory.mktemp("dh")
    # -dsaparam makes 2048-bit parameters in a fraction of a second; 1024 bits would be refused
    # by OpenSSL 3's default security level (dh key too small)
    openssl("dhparam", "-dsaparam", "-out", "dh.pem", "2048", cwd=d)
    return str(d / "dh.pem")


def _dhe_ctx(pki):
    ctx = client_ctx(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers(DHE_CIPHER)
    return ctx


def test_dhparam_enables_dhe(tls, pki, dhparam):
    s = tls("pop3", ssl_dhparam=dhparam)
    c = tls_connect(s, _dhe_ctx(pki))
    assert c.sock.version() == "TLSv1.2"
    assert c.sock.cipher()[0] == DHE_CIPHER
    assert c.readline() == b"+OK POP3 ready\r\n"
    assert _pop3_login(c) == b"+OK logged in\r\n"
    req = s.auth.wait_requests(1)[0]
    assert req.header("Auth-SSL-Protocol") == "TLSv1.2"
    assert req.header("Auth-SSL-Cipher") == DHE_CIPHER
    assert c.cmd(b"STAT").startswith(b"+OK 2 ")


def test_no_dhparam_no_dhe(tls, pki):
    """The contrast: without ssl_dhparam (nginx's default) there are no DHE ciphers."""
    s = tls("pop3")
    with pytest.raises(ssl.SSLError):
        tls_connect(s, _dhe_ctx(pki))


def test_dhparam_bad_file_is_config_error(tls, tmp_path, pki):
    bad = tmp_path / "bad-dh.pem"
    bad.write_text("not dh parameters\n")
    p = ProxyProcess(tmp_path, {"servers": {"p": {
        "listen": "127.0.0.1:%d ssl" % free_port(), "protocol": "pop3",
        "proxy_pass": "127.0.0.1:1", "ssl_certificate": pki.server_rsa[0],
        "ssl_certificate_key": pki.server_rsa[1], "ssl_dhparam": str(bad)}}},
        start=False, name="baddh")
    r = subprocess.run(p.command + ["-t", "-c", str(p.conf_path)], capture_output=True,
                       text=True, timeout=30, cwd=str(REPO))
    assert r.returncode != 0
    assert 'cannot load "ssl_dhparam" file "%s"' % bad in r.stderr


def _resumed(s, ctx):
    """Two connections with one client context, the second offering the first's session:
    (session_reused of the second, whether the first gave a resumable session)."""
    c = tls_connect(s, ctx)
    assert c.readline() == b"+OK POP3 ready\r\n"      # TLSv1.3 tickets arrive with it
    session = c.sock.session
    assert session is not None
    c.cmd(b"QUIT")
    c.close()
    c2 = tls_connect(s, ctx, session=session)
    assert c2.readline() == b"+OK POP3 ready\r\n"
    reused = c2.sock.session_reused
    c2.close()
    return reused


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
@pytest.mark.parametrize("cache,tickets,reused", [
    ("builtin", "on", True),
    ("builtin", "off", True),        # stateful: the server's own cache (TLSv1.2 session ids)
    ("builtin:1000", "on", True),
    ("off", "off", False),
    ("none", "off", False),          # nginx: "may be reused" said, nothing stored
    ("none", "on", True),            # nginx's default: tickets still resume
])
def test_session_resumption(tls, pki, version, cache, tickets, reused):
    s = tls("pop3", ssl_session_cache=cache, ssl_session_tickets=tickets)
    v = getattr(ssl.TLSVersion, version)
    ctx = client_ctx(pki, minimum_version=v, maximum_version=v)
    assert _resumed(s, ctx) is reused


# ---------------------------------------------------------------------------------------------
# 5. every ssl_verify_client mode x no / valid / other-CA client certificate (POP3)

READY = b"+OK POP3 ready\r\n"
CERT_ERROR = b"-ERR SSL certificate error\r\n"
NO_CERT = b"-ERR No required SSL certificate\r\n"
UNVERIFIED = "FAILED:unable to verify the first certificate"

BASE = ["Auth-SSL", "Auth-SSL-Protocol", "Auth-SSL-Cipher"]
NONE_SENT = BASE + ["Auth-SSL-Verify"]
CERT_SENT = NONE_SENT + ["Auth-SSL-Subject", "Auth-SSL-Issuer", "Auth-SSL-Serial",
                         "Auth-SSL-Fingerprint"]

# mode -> {certificate: (first line the client gets, Auth-SSL-Verify, Auth-SSL-* names sent)}
# (verify off: the server asks for no certificate and sends no Auth-SSL-Verify at all). Checked
# against nginx 1.22 (mail module, OpenSSL 3) with the same certificates: the same table.
VERIFY_TABLE = {
    "off":            {None: (READY, None, BASE), "client": (READY, None, BASE),
                       "stranger": (READY, None, BASE)},
    "on":             {None: (NO_CERT, None, None), "client": (READY, "SUCCESS", CERT_SENT),
                       "stranger": (CERT_ERROR, None, None)},
    "optional":       {None: (READY, "NONE", NONE_SENT), "client": (READY, "SUCCESS", CERT_SENT),
                       "stranger": (CERT_ERROR, None, None)},
    "optional_no_ca": {None: (READY, "NONE", NONE_SENT), "client": (READY, "SUCCESS", CERT_SENT),
                       "stranger": (READY, UNVERIFIED, CERT_SENT)},
}


@pytest.mark.parametrize("mode", list(VERIFY_TABLE))
def test_verify_modes_table(tls, pki, mode):
    directives = {"ssl_verify_client": mode}
    if mode != "off":
        directives["ssl_client_certificate"] = pki.ca
    s = tls("pop3", **directives)
    results = {}
    for which in VERIFY_TABLE[mode]:
        n = len(s.auth.requests)
        c = tls_connect(s, client_ctx(pki, getattr(pki, which) if which else None))
        got = c.readline()
        if got != READY:
            assert c.closed()
            results[which] = (got, None, None)
            continue
        assert _pop3_login(c) == b"+OK logged in\r\n"
        req = s.auth.wait_requests(n + 1)[n]
        names = [h for h, _ in req.headers if h.lower().startswith("auth-ssl")]
        results[which] = (got, req.header("Auth-SSL-Verify"), names)
        c.close()
    assert results == VERIFY_TABLE[mode]
    assert len(s.auth.requests) == sum(1 for r in VERIFY_TABLE[mode].values() if r[0] == READY)
