"""ManageSieve end to end, kept to what only a whole process proves: the greeting's capability
list, a login through the auth service (Auth-Protocol: sieve) and through proxy_pass, the
backend's AUTHENTICATE "PLAIN", a script uploaded as a literal and read back byte for byte
through the relay, a refusal, the PROXY header to the backend, one max_errors close.  Every
reply and error path of the conversation is in tests/unit/test_sieve_conversation.py."""

import base64

import pytest

from tests.support.auth import auth_fail
from tests.support.mailbackends import SieveBackend

SCRIPT = b'require "fileinto";\r\nif header :contains "subject" "x" { fileinto "X"; }\r\n\x00\xff'


def read_response(c):
    """Lines up to and with the OK / NO / BYE line."""
    lines = []
    while True:
        line = c.readline()
        assert line, lines
        lines.append(line)
        if line.split(b" ")[0].rstrip(b"\r\n") in (b"OK", b"NO", b"BYE"):
            return lines


def read_exact(c, n):
    while len(c.buf) < n:
        assert c._fill(), bytes(c.buf)
    data = bytes(c.buf[:n])
    del c.buf[:n]
    return data


def plain(user, password):
    return base64.b64encode(b"\0" + user + b"\0" + password)


@pytest.fixture
def sieve_setup(mail_setup, backend_factory):
    def start(backend=None, **directives):
        backend = backend or backend_factory(SieveBackend)
        return mail_setup("sieve", backend, **directives)
    return start


def test_capabilities_login_and_script_round_trip(sieve_setup, auth_server):
    st = sieve_setup(sieve_auth="plain login")
    c = st.connect()
    greeting = [c.greeting] + read_response(c)
    assert greeting[0] == b'"IMPLEMENTATION" "mailproxy"\r\n'
    assert b'"SASL" "PLAIN LOGIN"\r\n' in greeting and b'"VERSION" "1.0"\r\n' in greeting
    assert greeting[-1] == b'OK "ManageSieve ready"\r\n'
    c.sendline(b'AUTHENTICATE "PLAIN" {%d+}' % len(plain(b"alice", b"secret")))
    c.send(plain(b"alice", b"secret") + b"\r\n")
    assert c.readline() == b'OK "Logged in."\r\n'
    req = auth_server.wait_requests(1)[0]
    assert (req.header("Auth-Protocol"), req.header("Auth-Method"), req.header("Auth-User"),
            req.header("Auth-Pass")) == ("sieve", "plain", "alice", "secret")
    s = st.backend.wait_session(0)
    assert s.data["auth"] == b'AUTHENTICATE "PLAIN" "%s"' % plain(b"alice", b"secret")
    c.send(b'PUTSCRIPT "filter" {%d+}\r\n' % len(SCRIPT) + SCRIPT + b"\r\n")
    assert c.readline() == b'OK "PUTSCRIPT completed."\r\n'
    c.sendline(b'GETSCRIPT "filter"')
    assert c.readline() == b"{%d}\r\n" % len(SCRIPT)
    assert read_exact(c, len(SCRIPT)) == SCRIPT
    assert c.readline() == b"\r\n"
    assert c.readline() == b'OK "Getscript completed."\r\n'
    c.sendline(b"LOGOUT")
    assert c.readline() == b'OK "Logout completed."\r\n'
    st.proxy.wait_log('client logged in, client: 127.0.0.1, server: 127.0.0.1:%d, '
                      'login: "alice", upstream: 127.0.0.1:%d' % (st.port, st.backend.port))


def test_proxy_pass_bad_password_is_the_backends_refusal(sieve_setup, backend_factory):
    backend = backend_factory(SieveBackend)
    st = sieve_setup(backend, auth=False, proxy_pass="127.0.0.1:%d" % backend.port)
    c = st.connect()
    read_response(c)
    c.sendline(b'AUTHENTICATE "PLAIN" "%s"' % plain(b"alice", b"wrong"))
    assert c.readline() == b'NO "Authentication failed."\r\n'
    assert c.readline() == b""                      # closed, as the other protocols
    assert backend.wait_session(0).data["login"] == (b"alice", b"wrong")
    st.proxy.wait_log('client login failed: "NO \\x22Authentication failed.\\x22"')


def test_auth_service_refusal_and_retry(sieve_setup, auth_server):
    st = sieve_setup()
    auth_server.set_respond(lambda req: auth_fail('Invalid "login"', wait=1))
    c = st.connect()
    read_response(c)
    c.sendline(b'AUTHENTICATE "PLAIN" "%s"' % plain(b"alice", b"nope"))
    assert c.readline() == b'NO "Invalid \\"login\\""\r\n'
    c.sendline(b'NOOP "t1"')
    assert c.readline() == b'OK (TAG "t1") "Done"\r\n'


def test_proxy_protocol_header_to_the_backend(sieve_setup, backend_factory):
    backend = backend_factory(SieveBackend, proxy_protocol=True)
    st = sieve_setup(backend, proxy_protocol="on")
    c = st.connect()
    read_response(c)
    c.sendline(b'AUTHENTICATE "PLAIN" "%s"' % plain(b"alice", b"secret"))
    assert c.readline() == b'OK "Logged in."\r\n'
    header = backend.wait_session(0).proxy_header
    assert header.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ") and header.endswith(b"\r\n")


def test_max_errors_and_commands_before_login(sieve_setup):
    st = sieve_setup(max_errors=3)
    c = st.connect()
    read_response(c)
    assert c.cmd(b"LISTSCRIPTS") == b'NO "Authenticate first"\r\n'
    assert c.cmd(b'AUTHENTICATE "DIGEST-MD5"') == \
        b'NO "Unsupported authentication mechanism"\r\n'     # refused, not a parser error
    assert c.cmd(b'FOO "\r') == b'NO "Invalid command"\r\n'
    assert c.cmd(b"BAR\x00") == b'BYE "Too many invalid commands"\r\n'
    assert c.readline() == b""
    st.proxy.wait_log("client sent too many invalid commands")
