"""IMAP end to end, kept to what only a whole process proves: real clients (imaplib), a login
through the auth service and a backend with the bytes relayed after it, pipelined input after
login reaching the backend in order, the client's real addresses in the backend ID, one
max_errors close, a 50 MB transfer.  The proxy runs as a subprocess with a recording auth_http
server and a scripted IMAP backend.  Every reply, mechanism and error path of the conversation
is in tests/unit/test_imap_conversation.py and tests/unit/test_imap_session.py."""

import hashlib
import imaplib
import re
import time

import pytest

from tests.support.auth import Delay, auth_ok
from tests.support.common import track
from tests.support.mailbackends import ImapBackend, big_message_chunks
from tests.support.process import Setup, free_port, server_block

LOGGED_IN = b"OK [CAPABILITY IMAP4rev1 IDLE] Logged in"
REFUSED = b"NO [AUTHENTICATIONFAILED] Authentication failed."


def bad(tag="*"):
    return tag.encode() + b" BAD invalid command\r\n"


def ok(tag):
    return tag.encode() + b" OK completed\r\n"


def backend_transcript(user=b"alice", password=b"secret", tag=b"a1 "):
    """What the backend receives for a login (as from ngx_mail_proxy_imap_handler)."""
    return (tag + b"LOGIN {%d}\r\n" % len(user) + user + b" {%d}\r\n" % len(password)
            + password + b"\r\n")


@pytest.fixture
def imap_backend(backend_factory):
    return backend_factory(ImapBackend)


@pytest.fixture
def imap_setup(proxy_factory, auth_server, imap_backend):
    """start(backend=None, auth=True, **directives) -> Setup for an IMAP server block."""
    def start(backend=None, auth=True, host="127.0.0.1", mail=None, **directives):
        backend = backend or imap_backend
        port = free_port(host)
        if auth:
            directives.setdefault("auth_http", auth_server.url)
            auth_server.route_to(backend.port, server=backend.host)
        directives.setdefault("timeout", "2s")
        config = {"servers": {"imap": server_block("imap", port, host=host, **directives)}}
        if mail is not None:
            config["mail"] = mail
        proxy = proxy_factory(config)
        return Setup(proxy, host, port, auth_server if auth else None, backend)
    return start


def client(st, timeout=5.0):
    m = imaplib.IMAP4(st.host, st.port, timeout=timeout)
    return track(m, m.shutdown)


# --- real clients, login through the auth service and the backend ------------------------------

def test_imaplib_sees_the_capabilities(imap_setup):
    st = imap_setup(imap_capabilities="IMAP4rev1 ID LITERAL+")
    m = client(st)
    assert m.capabilities == ("IMAP4REV1", "ID", "LITERAL+", "AUTH=PLAIN")
    assert m.noop()[0] == "OK"
    assert m.logout()[0] == "BYE"


def test_imaplib_id_then_login(imap_setup, imap_backend, monkeypatch):
    monkeypatch.setitem(imaplib.Commands, "ID", ("NONAUTH", "AUTH", "SELECTED"))
    st = imap_setup()
    m = client(st)
    typ, data = m._simple_command("ID", '("name" "imaplib")')
    assert typ == "OK"
    assert m.untagged_responses.get("ID") == [b"NIL"]
    assert m.login("alice", "secret")[0] == "OK"
    s = imap_backend.wait_session(0)
    assert m.noop()[0] == "OK"
    assert b" ID " not in bytes(s.raw)          # the client's ID is not forwarded
    m.logout()


def test_login_transcripts(imap_setup, auth_server, imap_backend):
    st = imap_setup()
    c = st.connect()
    assert c.cmd("a1 LOGIN alice secret") == b"a1 " + LOGGED_IN + b"\r\n"
    req = auth_server.wait_requests(1)[0]
    assert req.header("Auth-Method") == "plain"
    assert req.header("Auth-User") == "alice"
    assert req.header("Auth-Pass") == "secret"
    assert req.header("Auth-Protocol") == "imap"
    assert req.header("Auth-Login-Attempt") == "1"
    assert req.header("Auth-Salt") is None
    s = imap_backend.wait_session(0)
    assert c.cmd("a2 SELECT INBOX") == b"a2 OK SELECT completed.\r\n"
    assert bytes(s.raw) == backend_transcript() + b"a2 SELECT INBOX\r\n"
    st.proxy.wait_log('client logged in, client: 127.0.0.1, server: 127.0.0.1:%d, '
                      'login: "alice", upstream: 127.0.0.1:%d' % (st.port, imap_backend.port))


def test_imaplib_login_session(imap_setup, imap_backend):
    st = imap_setup()
    m = client(st)
    typ, data = m.login("alice", "secret")
    assert (typ, data) == ("OK", [b"[CAPABILITY IMAP4rev1 IDLE] Logged in"])
    assert m.select("INBOX")[0] == "OK"
    assert m.logout()[0] == "BYE"
    s = imap_backend.wait_session(0)
    tag = bytes(s.raw).split(b" ", 1)[0] + b" "
    assert bytes(s.raw).startswith(backend_transcript(tag=tag))


def test_imaplib_literal_password(imap_setup, imap_backend, backend_factory):
    password = b'p w"\\{3}'
    backend = backend_factory(ImapBackend, users={b"alice": password})
    st = imap_setup(backend=backend)
    m = client(st)
    m.literal = password
    typ, data = m._simple_command("LOGIN", "alice")
    assert typ == "OK"
    s = backend.wait_session(0)
    tag = bytes(s.raw).split(b" ", 1)[0] + b" "
    assert bytes(s.raw) == backend_transcript(password=password, tag=tag)


def test_max_errors_counts_parser_errors_only(imap_setup, auth_server):
    st = imap_setup(max_errors=2)
    c = st.connect()
    for line in ["a LOGIN x", "b LOGIN x", "c LOGIN x", "d AUTHENTICATE FOO"]:
        assert c.cmd(line) == bad(line[0])
    assert c.cmd("e FOO") == bad("e")
    assert c.cmd("f NOOP") == ok("f")
    c.sendline("g BAR")
    assert c.read_until_closed() == bad("g")
    st.proxy.wait_log("client sent too many invalid commands")


def test_authenticate_plain_with_imaplib(imap_setup, auth_server, imap_backend):
    st = imap_setup()
    m = client(st)
    typ, _ = m.authenticate("PLAIN", lambda challenge: b"authz\0alice\0secret")
    assert typ == "OK"
    req = auth_server.wait_requests(1)[0]
    assert (req.header("Auth-Method"), req.header("Auth-User"), req.header("Auth-Pass")) \
        == ("plain", "alice", "secret")
    s = imap_backend.wait_session(0)
    tag = bytes(s.raw).split(b" ", 1)[0] + b" "
    assert bytes(s.raw) == backend_transcript(tag=tag)
    m.logout()


def test_authenticate_login_imaplib(imap_setup, imap_backend):
    st = imap_setup(imap_auth="login")
    m = client(st)
    answers = iter([b"alice", b"secret"])
    assert m.authenticate("LOGIN", lambda challenge: next(answers))[0] == "OK"


def test_pipelined_commands_after_login_forwarded_in_order(imap_setup, auth_server, imap_backend):
    st = imap_setup()
    auth_server.set_respond(lambda req: Delay(0.3, auth_ok(imap_backend.port)))
    c = st.connect()
    c.send(b"a0 NOOP\r\na1 LOGIN alice secret\r\n")
    assert c.readline() == ok("a0")
    time.sleep(0.1)
    c.send(b"a2 SELECT INBOX\r\na3 LOGOUT\r\n")
    assert c.readline() == b"a1 " + LOGGED_IN + b"\r\n"
    assert c.read_until_closed() == (b"a2 OK SELECT completed.\r\n* BYE Logging out\r\n"
                                     b"a3 OK Logout completed.\r\n")
    s = imap_backend.wait_session(0)
    assert bytes(s.raw) == backend_transcript() + b"a2 SELECT INBOX\r\na3 LOGOUT\r\n"


# --- client IP to the backend by ID (imap_client_id) ----------------------------------------------

ID_RE = re.compile(rb'mailproxy-id ID \("x-originating-ip" "127\.0\.0\.1" "x-originating-port" '
                   rb'"(\d+)" "x-connected-ip" "127\.0\.0\.1" "x-connected-port" "(\d+)" '
                   rb'"x-session-id" "([A-Za-z0-9_-]{16})"\)\r\n')


def test_client_id_forwarded_before_login(imap_setup, imap_backend):
    st = imap_setup(imap_client_id="on")
    c = st.connect()
    assert c.cmd("a1 LOGIN alice secret") == b"a1 " + LOGGED_IN + b"\r\n"
    raw = bytes(imap_backend.wait_session(0).raw)
    m = ID_RE.match(raw)
    assert m, raw
    assert int(m.group(1)) == c.sock.getsockname()[1]
    assert int(m.group(2)) == st.port
    assert raw[m.end():] == backend_transcript()
    # every session has its own id
    c2 = st.connect()
    assert c2.cmd("b1 LOGIN alice secret") == b"b1 " + LOGGED_IN + b"\r\n"
    m2 = ID_RE.match(bytes(imap_backend.wait_session(1).raw))
    assert m2 and m2.group(3) != m.group(3)


# --- relay ----------------------------------------------------------------------------------------

def test_fetch_50mb_intact(imap_setup, backend_factory):
    size = 50 * 1024 * 1024
    backend = backend_factory(ImapBackend, big_size=size)
    st = imap_setup(backend=backend)
    expected = hashlib.sha256()
    for chunk in big_message_chunks(size):
        expected.update(chunk)
    m = client(st, timeout=30)
    assert m.login("alice", "secret")[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    t0 = time.monotonic()
    typ, data = m.fetch("1", "(BODY[])")
    elapsed = time.monotonic() - t0
    assert typ == "OK"
    assert data[0][0] == b"1 (BODY[] {%d}" % size
    body = data[0][1]
    assert len(body) == size
    assert hashlib.sha256(body).hexdigest() == expected.hexdigest()
    assert elapsed < 30, f"50 MB took {elapsed:.1f}s"
    assert m.noop()[0] == "OK"
    m.logout()
