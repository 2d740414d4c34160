"""Dovecot's ManageSieve (Pigeonhole, dovecot-managesieved) as the backend: sieve-connect
through mailproxy (plain and with STARTTLS to the proxy) uploads a script, lists it and
downloads it back byte for byte; a raw Python client: a bad password refused (auth_http and
proxy_pass), and the client's address in Dovecot's log through the PROXY protocol (v1, v2;
Dovecot's `haproxy = yes` listener)."""

import base64
import os
import socket
import subprocess

import pytest

from tests.support.auth import AuthServer
from tests.support.common import fail_on_errors
from tests.support.process import free_port, server_block
from tests.support.realmail import dovecot_responder
from tests.support.realservers import CLIENT_IP, USERS, need, program

pytestmark = pytest.mark.integration

SCRIPT = (b'require ["fileinto", "vacation"];\r\n# \xc3\xa9t\xc3\xa9 "quoted" {braces}\r\n'
          b'if header :contains "subject" "sieve-it" {\r\n  fileinto "INBOX";\r\n}\r\n')


@pytest.fixture
def sieve_dovecot(dovecot):
    need("managesieve")
    assert dovecot.sieve
    return dovecot


@pytest.fixture
def auth(sieve_dovecot):
    srv = AuthServer()
    srv.set_respond(dovecot_responder({"sieve": sieve_dovecot.ports["sieve"]}))
    yield srv
    srv.stop()
    fail_on_errors(srv, type(srv).__name__)


@pytest.fixture
def sieve_proxy(proxy_factory, auth, sieve_dovecot):
    """start(mode='auth_http'|'proxy_pass', listener='sieve', **directives) -> port."""
    def start(mode="auth_http", listener="sieve", **directives):
        port = free_port()
        backend = sieve_dovecot.ports[listener]
        if mode == "auth_http":
            directives.setdefault("auth_http", auth.url)
            auth.set_respond(dovecot_responder({"sieve": backend}))
        else:
            directives["proxy_pass"] = f"127.0.0.1:{backend}"
        directives.setdefault("timeout", "10s")
        proxy_factory({"servers": {"sieve": server_block("sieve", port, **directives)}})
        return port
    return start


def sieve_connect(port, user, action, *args, tls=False, ca=None):
    """Run sieve-connect against the proxy; the password on fd 0."""
    argv = [program("sieve-connect"), "--nosrv", "--server", "127.0.0.1", "--port", str(port),
            "--user", user, "--passwordfd", "0", "--authmech", "PLAIN"]
    if tls:
        argv += ["--tlscafile", ca, "--tlshostname", "mail.test"]
    else:
        argv += ["--clearchan"]
    argv += [action, *args]
    env = dict(os.environ, HOME=os.environ.get("HOME", "/tmp"))
    return subprocess.run(argv, input=USERS[user].encode() + b"\n", capture_output=True,
                          timeout=60, env=env)


@pytest.mark.parametrize("mode,tls", [("auth_http", False), ("proxy_pass", False),
                                      ("auth_http", True)])
def test_sieve_connect_upload_list_download(sieve_proxy, tmp_path, pki, dovecot_log, mode, tls):
    need("sieve-connect")
    directives = {}
    if tls:
        directives = {"starttls": "on", "ssl_certificate": pki.server_rsa[0],
                      "ssl_certificate_key": pki.server_rsa[1]}
    port = sieve_proxy(mode, **directives)
    user = "bob"                     # the password with spaces, a quote, a backslash, non-ASCII
    name = f"it-{mode}-{tls}"
    local = tmp_path / "up.sieve"
    local.write_bytes(SCRIPT)
    r = sieve_connect(port, user, "--upload", "--localsieve", str(local), "--remotesieve",
                      name, tls=tls, ca=pki.ca)
    assert r.returncode == 0, (r.stdout, r.stderr)
    dovecot_log.wait(rf"managesieve-login: Info: Login: user=<{user}>, method=PLAIN")
    r = sieve_connect(port, user, "--list", tls=tls, ca=pki.ca)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert b'"%s"' % name.encode() in r.stdout.split(), r.stdout
    back = tmp_path / "down.sieve"
    r = sieve_connect(port, user, "--download", "--remotesieve", name, "--localsieve",
                      str(back), tls=tls, ca=pki.ca)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert back.read_bytes() == SCRIPT


class Client:
    """A raw ManageSieve client from CLIENT_IP."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), 10,
                                             source_address=(CLIENT_IP, 0))
        self.file = self.sock.makefile("rb")

    def response(self):
        lines = []
        while True:
            line = self.file.readline()
            lines.append(line)
            if not line or line.split(b" ")[0].rstrip(b"\r\n") in (b"OK", b"NO", b"BYE"):
                return lines

    def authenticate(self, user, password):
        response = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode("utf-8"))
        self.sock.sendall(b'AUTHENTICATE "PLAIN" {%d+}\r\n' % len(response) + response + b"\r\n")
        return self.response()

    def close(self):
        self.file.close()
        self.sock.close()


@pytest.fixture
def client():
    made = []

    def connect(port):
        c = Client(port)
        made.append(c)
        greeting = c.response()
        assert greeting[-1] == b'OK "ManageSieve ready"\r\n'
        return c
    yield connect
    for c in made:
        c.close()


@pytest.mark.parametrize("mode", ["auth_http", "proxy_pass"])
def test_bad_password_refused(sieve_proxy, client, mode):
    c = client(sieve_proxy(mode))
    reply = c.authenticate("alice", "wrong")[-1]
    assert reply.startswith(b"NO "), reply
    if mode == "auth_http":
        assert reply == b'NO "Invalid login or password"\r\n'


@pytest.mark.parametrize("version", ["on", "v2"])
def test_proxy_protocol_shows_client_address(sieve_proxy, client, dovecot_log, version):
    c = client(sieve_proxy(listener="sieve_haproxy", proxy_protocol=version))
    assert c.authenticate("alice", USERS["alice"])[-1].startswith(b"OK")
    c.sock.sendall(b"LISTSCRIPTS\r\n")
    assert c.response()[-1].startswith(b"OK")
    line = dovecot_log.wait(r"managesieve-login: Info: Login: user=<alice>")
    assert f"rip={CLIENT_IP}," in line, line
