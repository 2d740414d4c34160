"""IMAP end to end: the proxy as a subprocess, a recording auth_http server, a scripted IMAP
backend. Each test asserts what the client, the auth server and the backend saw."""

import hashlib
import hmac
import imaplib
import re
import socket
import time

import pytest

from tests.support.auth import Delay, auth_fail, auth_ok
from tests.support.backends import ScriptedBackend
from tests.support.common import CLOSE, RecordingLog, b64, track, unb64
from tests.support.mailbackends import ImapBackend, big_message_chunks
from tests.support.process import Setup, free_port, server_block

GREETING = b"* OK IMAP4 ready\r\n"
CAPS = b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN\r\n"
INTERNAL = b"* BAD internal server error\r\n"
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


def read_closed(c):
    """Everything until the proxy closes (a reset after our unread bytes counts as closed)."""
    try:
        return c.read_until_closed(3)
    except ConnectionResetError:
        return bytes(c.buf)


# --- greeting, CAPABILITY, NOOP, LOGOUT, ID ----------------------------------------------------

def test_greeting_capability_noop_logout(imap_setup, auth_server):
    st = imap_setup()
    c = st.connect()
    assert c.greeting == GREETING
    assert c.cmd("a1 CAPABILITY") == CAPS
    assert c.readline() == ok("a1")
    assert c.cmd("a2 noop") == ok("a2")
    assert c.cmd("a3 NOOP extra args here") == ok("a3")
    c.sendline("a4 LOGOUT whatever")
    assert c.read_until_closed() == b"* BYE\r\n" + ok("a4")
    assert auth_server.requests == []


@pytest.mark.parametrize("methods, caps", [
    ("plain login cram-md5 external", b"AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5 AUTH=EXTERNAL"),
    ("external cram-md5", b"AUTH=CRAM-MD5 AUTH=EXTERNAL"),
    ("login", b"AUTH=LOGIN"),
])
def test_capability_per_imap_auth(imap_setup, methods, caps):
    st = imap_setup(imap_auth=methods, imap_capabilities="IMAP4rev1 SASL-IR LITERAL+ ID")
    c = st.connect()
    assert c.cmd("t CAPABILITY") == b"* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID " + caps + b"\r\n"
    assert c.readline() == ok("t")


def test_imaplib_sees_the_capabilities(imap_setup):
    st = imap_setup(imap_capabilities="IMAP4rev1 ID LITERAL+")
    m = client(st)
    assert m.capabilities == ("IMAP4REV1", "ID", "LITERAL+", "AUTH=PLAIN")
    assert m.noop()[0] == "OK"
    assert m.logout()[0] == "BYE"


def test_client_id_is_answered(imap_setup, auth_server):
    st = imap_setup()
    c = st.connect()
    assert c.cmd('i1 ID ("name" "Thunderbird" "version" "115.0")') == b"* ID NIL\r\n"
    assert c.readline() == ok("i1")
    assert c.cmd("i2 ID NIL") == b"* ID NIL\r\n"
    assert c.readline() == ok("i2")
    assert c.cmd("i3 ID") == bad("i3")
    # a literal inside the ID list is acknowledged like any other
    assert c.cmd('i4 ID ("name" {3}') == b"+ OK\r\n"
    assert c.cmd("abc)") == b"* ID NIL\r\n"
    assert c.readline() == ok("i4")
    assert auth_server.requests == []


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


# --- LOGIN ---------------------------------------------------------------------------------------

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


def test_login_argument_rules(imap_setup, auth_server):
    st = imap_setup(max_errors=2)
    c = st.connect()
    # refused after parsing: not counted towards max_errors
    for line in ["a LOGIN alice", "b LOGIN", 'c LOGIN "" pw', "d LOGIN x y z",
                 "e AUTHENTICATE", "f AUTHENTICATE FOO", "g AUTHENTICATE PLAIN a b",
                 "h AUTHENTICATE CRAM-MD5", "i AUTHENTICATE EXTERNAL", "j STARTTLS",
                 "k AUTHENTICATE LOGIN a b", "l AUTHENTICATE PLAIN !!!"]:
        tag = line.split()[0]
        assert c.cmd(line) == bad(tag), line
    assert c.cmd("m NOOP") == ok("m")
    assert auth_server.requests == []


def test_login_with_literals_of_both_kinds(imap_setup, auth_server, imap_backend):
    st = imap_setup()
    c = st.connect()
    assert c.cmd("a1 LOGIN {5}") == b"+ OK\r\n"
    c.send(b"alice {6+}\r\nsecret\r\n")
    assert c.readline() == b"a1 " + LOGGED_IN + b"\r\n"
    req = auth_server.wait_requests(1)[0]
    assert (req.header("Auth-User"), req.header("Auth-Pass")) == ("alice", "secret")
    s = imap_backend.wait_session(0)
    assert bytes(s.raw) == backend_transcript()


def test_login_non_synchronising_literals_without_continuation(imap_setup, imap_backend):
    st = imap_setup()
    c = st.connect()
    c.send(b"b1 LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n")
    assert c.readline() == b"b1 " + LOGGED_IN + b"\r\n"
    assert bytes(imap_backend.wait_session(0).raw) == backend_transcript(tag=b"b1 ")


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


def test_quoted_strings_with_escapes(imap_setup, auth_server, backend_factory):
    backend = backend_factory(ImapBackend, users={b'al"ice': b"p w\\x"})
    st = imap_setup(backend=backend)
    c = st.connect()
    assert c.cmd(b'a6 LOGIN "al\\"ice" "p w\\\\x"') == b"a6 " + LOGGED_IN + b"\r\n"
    req = auth_server.wait_requests(1)[0]
    assert req.header("Auth-User") == 'al"ice'
    assert req.header("Auth-Pass") == "p%20w\\x"
    assert bytes(backend.wait_session(0).raw) == backend_transcript(b'al"ice', b"p w\\x", b"a6 ")


def test_reference_example_quoted_user_literal_password(imap_setup, backend_factory):
    backend = backend_factory(ImapBackend, users={b'al"ice': b"p w"})
    st = imap_setup(backend=backend)
    c = st.connect()
    assert c.cmd(b'a6 LOGIN "al\\"ice" {3}') == b"+ OK\r\n"
    assert c.cmd(b"p w") == b"a6 " + LOGGED_IN + b"\r\n"
    assert bytes(backend.wait_session(0).raw) == b'a6 LOGIN {6}\r\nal"ice {3}\r\np w\r\n'


def test_literal_with_line_break_is_refused(imap_setup, auth_server):
    st = imap_setup()
    c = st.connect()
    c.send(b"a LOGIN {3+}\r\na\r\nb pw\r\n")
    assert c.readline() == bad("a")
    assert c.cmd("b NOOP") == ok("b")
    assert auth_server.requests == []


def test_unterminated_quote_does_not_corrupt_next_command(imap_setup, imap_backend):
    st = imap_setup()
    c = st.connect()
    assert c.cmd('a LOGIN "abc') == bad("a")
    assert c.cmd("c LOGIN alice secret") == b"c " + LOGGED_IN + b"\r\n"


# --- parser errors, max_errors, too long ---------------------------------------------------------

@pytest.mark.parametrize("line", ["", " NOOP", "a*b NOOP", "t" * 33 + " NOOP", "NOOP",
                                  "\xe9 NOOP"])
def test_bad_tags_answered_untagged(imap_setup, line):
    st = imap_setup()
    c = st.connect()
    assert c.cmd(line.encode("latin-1")) == bad()
    assert c.cmd("ok NOOP") == ok("ok")


@pytest.mark.parametrize("line", ["a SELECT INBOX", "a ENABLE UTF8=ACCEPT", "a AUTH PLAIN",
                                  "a LOGIN w x y z", "a NOOP\rx", 'a LOGIN "x'])
def test_parser_errors_are_tagged(imap_setup, line):
    st = imap_setup()
    c = st.connect()
    assert c.cmd(line) == bad("a")
    assert c.cmd("b NOOP") == ok("b")


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


def test_max_errors_bad_tag_counts(imap_setup):
    st = imap_setup(max_errors=1)
    c = st.connect()
    c.sendline("a*b NOOP")
    assert c.read_until_closed() == bad()


def test_invalid_line_ending_in_nonsync_literal_closes(imap_setup, auth_server):
    st = imap_setup()
    c = st.connect()
    c.send(b"a APPEND INBOX {11+}\r\n")
    assert read_closed(c) == bad("a")
    c = st.connect()
    assert c.cmd("a APPEND INBOX {11}") == bad("a")       # synchronising: stays open
    assert c.cmd("b NOOP") == ok("b")


def test_too_long_command_closes(imap_setup, auth_server):
    st = imap_setup(imap_client_buffer=256)
    c = st.connect()
    c.send(b"a1 LOGIN " + b"x" * (256 - 9))          # fills the buffer without a line end
    assert c.read_until_closed() == bad("a1")
    st.proxy.wait_log('client sent too long command "a1 LOGIN xxxx')
    c = st.connect()
    c.send(b"y" * 256)                               # not even a tag
    assert c.read_until_closed() == bad()
    assert auth_server.requests == []


def test_command_at_the_limit_is_accepted(imap_setup, auth_server, backend_factory):
    user = b"u" * (256 - len(b"a LOGIN  pw\r\n"))
    backend = backend_factory(ImapBackend, users={user: b"pw"})
    st = imap_setup(backend=backend, imap_client_buffer=256)
    c = st.connect()
    line = b"a LOGIN " + user + b" pw\r\n"
    assert len(line) == 256
    assert c.cmd(line) == b"a " + LOGGED_IN + b"\r\n"


def test_too_long_literal_refused_before_continuation(imap_setup, auth_server, backend_factory):
    backend = backend_factory(ImapBackend, users={b"x" * 200: b"pw"})
    st = imap_setup(backend=backend, imap_client_buffer=256)
    c = st.connect()
    assert c.cmd("a LOGIN {300}") == bad("a")           # no "+ OK" first (nginx sends one)
    assert c.closed()
    st.proxy.wait_log('client sent too long command "a LOGIN {300}')
    # a literal that fits together with the rest of the command is fine
    c = st.connect()
    assert c.cmd("b LOGIN {200}") == b"+ OK\r\n"
    c.send(b"x" * 200 + b" pw\r\n")
    assert c.readline() == b"b " + LOGGED_IN + b"\r\n"
    assert backend.wait_session(0).data["login"] == (b"x" * 200, b"pw")


def test_too_long_across_literal_segments(imap_setup, auth_server):
    st = imap_setup(imap_client_buffer=256)
    c = st.connect()
    c.send(b"a LOGIN {200+}\r\n" + b"x" * 200 + b" " + b"y" * 39)
    assert read_closed(c) == bad("a")
    assert auth_server.requests == []


# --- AUTHENTICATE ---------------------------------------------------------------------------------

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


def test_authenticate_plain_two_steps_raw(imap_setup, imap_backend):
    st = imap_setup()
    c = st.connect()
    assert c.cmd("p1 AUTHENTICATE plain") == b"+ \r\n"
    assert c.cmd(b64("\0alice\0secret")) == b"p1 " + LOGGED_IN + b"\r\n"
    assert bytes(imap_backend.wait_session(0).raw) == backend_transcript(tag=b"p1 ")


@pytest.mark.parametrize("ir", [lambda s: s, lambda s: '"%s"' % s,
                                lambda s: "{%d+}\r\n%s" % (len(s), s)])
def test_authenticate_plain_sasl_ir(imap_setup, auth_server, imap_backend, ir):
    st = imap_setup()
    c = st.connect()
    assert c.cmd("p2 AUTHENTICATE PLAIN " + ir(b64("\0alice\0secret"))) \
        == b"p2 " + LOGGED_IN + b"\r\n"
    assert auth_server.wait_requests(1)[0].header("Auth-User") == "alice"


@pytest.mark.parametrize("response, log", [
    ("!!!", "client sent invalid base64 encoding in AUTH PLAIN command"),
    ("*", "client sent invalid base64 encoding in AUTH PLAIN command"),
    (b64("alice"), "client sent invalid login in AUTH PLAIN command"),
    (b64("\0alice"), "client sent invalid password in AUTH PLAIN command"),
])
def test_authenticate_plain_bad_response(imap_setup, auth_server, response, log):
    st = imap_setup()
    c = st.connect()
    assert c.cmd("p AUTHENTICATE PLAIN") == b"+ \r\n"
    assert c.cmd(response) == bad("p")
    st.proxy.wait_log(log)
    assert c.cmd("q NOOP") == ok("q")
    assert auth_server.requests == []


def test_authenticate_login_two_steps(imap_setup, auth_server, imap_backend):
    st = imap_setup()
    c = st.connect()
    assert c.cmd("l1 AUTHENTICATE LOGIN") == b"+ VXNlcm5hbWU6\r\n"
    assert c.cmd(b64("alice")) == b"+ UGFzc3dvcmQ6\r\n"
    assert c.cmd(b64("secret")) == b"l1 " + LOGGED_IN + b"\r\n"
    assert bytes(imap_backend.wait_session(0).raw) == backend_transcript(tag=b"l1 ")
    assert auth_server.wait_requests(1)[0].header("Auth-Method") == "plain"


def test_authenticate_login_initial_response(imap_setup, imap_backend):
    st = imap_setup()
    c = st.connect()
    assert c.cmd("l2 AUTHENTICATE LOGIN " + b64("alice")) == b"+ UGFzc3dvcmQ6\r\n"
    assert c.cmd(b64("secret")) == b"l2 " + LOGGED_IN + b"\r\n"


def test_authenticate_login_imaplib(imap_setup, imap_backend):
    st = imap_setup(imap_auth="login")
    m = client(st)
    answers = iter([b"alice", b"secret"])
    assert m.authenticate("LOGIN", lambda challenge: next(answers))[0] == "OK"


def test_authenticate_login_bad_username_quirk(imap_setup, auth_server):
    # nginx answers a bad username line with neither tag nor "*" (ngx_mail_imap_auth_state)
    st = imap_setup()
    c = st.connect()
    assert c.cmd("l3 AUTHENTICATE LOGIN") == b"+ VXNlcm5hbWU6\r\n"
    assert c.cmd("*") == b"BAD invalid command\r\n"
    st.proxy.wait_log("client sent invalid base64 encoding in AUTH LOGIN command")
    assert c.cmd("l4 AUTHENTICATE LOGIN") == b"+ VXNlcm5hbWU6\r\n"
    assert c.cmd(b64("alice")) == b"+ UGFzc3dvcmQ6\r\n"
    assert c.cmd("*") == bad("l4")                      # the password line is tagged
    assert c.cmd("l5 AUTHENTICATE LOGIN !!!") == bad("l5")   # so is the initial response
    assert auth_server.requests == []


def test_authenticate_cram_md5(imap_setup, auth_server, imap_backend):
    st = imap_setup(imap_auth="plain cram-md5", server_name="mx.example.test")
    auth_server.route_to(imap_backend.port, password="secret")
    c = st.connect()
    line = c.cmd("c1 AUTHENTICATE CRAM-MD5")
    assert line.startswith(b"+ ") and line.endswith(b"\r\n")
    salt = unb64(line[2:-2])
    assert re.fullmatch(rb"<\d+\.\d+@mx\.example\.test>", salt)
    digest = hmac.new(b"secret", salt, hashlib.md5).hexdigest()
    assert c.cmd(b64("alice " + digest)) == b"c1 " + LOGGED_IN + b"\r\n"
    req = auth_server.wait_requests(1)[0]
    assert req.header("Auth-Method") == "cram-md5"
    assert req.header("Auth-Salt") == salt.decode()
    assert req.header("Auth-Pass") == digest
    assert bytes(imap_backend.wait_session(0).raw) == backend_transcript(tag=b"c1 ")


def test_authenticate_cram_md5_salt_reused_and_bad_hash(imap_setup, auth_server):
    st = imap_setup(imap_auth="cram-md5")
    c = st.connect()
    first = c.cmd("c1 AUTHENTICATE CRAM-MD5")
    assert c.cmd(b64("alice short")) == bad("c1")
    st.proxy.wait_log("client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command")
    assert c.cmd("c2 AUTHENTICATE CRAM-MD5") == first
    assert c.cmd("*") == bad("c2")
    assert c.cmd("c3 AUTHENTICATE CRAM-MD5 " + b64("x")) == bad("c3")


@pytest.mark.parametrize("two_steps", [True, False])
def test_authenticate_external(imap_setup, auth_server, imap_backend, two_steps):
    st = imap_setup(imap_auth="external")
    auth_server.route_to(imap_backend.port, password="secret")
    c = st.connect()
    if two_steps:
        assert c.cmd("x1 AUTHENTICATE EXTERNAL") == b"+ VXNlcm5hbWU6\r\n"
        reply = c.cmd(b64("alice"))
    else:
        reply = c.cmd("x1 AUTHENTICATE EXTERNAL " + b64("alice"))
    assert reply == b"x1 " + LOGGED_IN + b"\r\n"
    req = auth_server.wait_requests(1)[0]
    assert (req.header("Auth-Method"), req.header("Auth-User"), req.header("Auth-Pass")) \
        == ("external", "alice", "")
    assert bytes(imap_backend.wait_session(0).raw) == backend_transcript(tag=b"x1 ")


def test_external_with_initial_response_refused_when_disabled(imap_setup, auth_server):
    st = imap_setup()
    c = st.connect()
    assert c.cmd("x AUTHENTICATE EXTERNAL " + b64("alice")) == bad("x")
    assert auth_server.requests == []


def test_authenticate_continuation_too_long(imap_setup, auth_server):
    st = imap_setup(imap_client_buffer=128)
    c = st.connect()
    assert c.cmd("p AUTHENTICATE PLAIN") == b"+ \r\n"
    c.send(b"A" * 128)
    assert c.read_until_closed() == bad("p")


def test_authenticate_continuation_parse_error_counts(imap_setup, auth_server):
    st = imap_setup(max_errors=1)
    c = st.connect()
    assert c.cmd("p AUTHENTICATE PLAIN") == b"+ \r\n"
    c.send(b"AB\rCD\r\n")
    assert c.read_until_closed() == bad("p")


# --- auth_http outcomes ---------------------------------------------------------------------------

def test_auth_failure_closes(imap_setup, auth_server, imap_backend):
    st = imap_setup()
    auth_server.set_respond(lambda req: auth_fail("Invalid login or password"))
    c = st.connect()
    c.sendline("a1 LOGIN alice wrong")
    assert c.read_until_closed() == b"a1 NO Invalid login or password\r\n"
    st.proxy.wait_log('client login failed: "Invalid login or password" while in http auth state')
    assert imap_backend.sessions == []


def test_auth_wait_lets_the_client_retry(imap_setup, auth_server, imap_backend):
    st = imap_setup()

    def respond(req):
        if req.header("Auth-Login-Attempt") == "1":
            return auth_fail("Try again", wait=1)
        return auth_ok(imap_backend.port)
    auth_server.set_respond(respond)
    c = st.connect()
    t0 = time.monotonic()
    assert c.cmd("a1 AUTHENTICATE PLAIN " + b64("\0alice\0wrong")) == b"a1 NO Try again\r\n"
    assert time.monotonic() - t0 >= 0.9
    assert c.cmd("a2 NOOP") == ok("a2")
    assert c.cmd("a3 LOGIN alice secret") == b"a3 " + LOGGED_IN + b"\r\n"
    reqs = auth_server.wait_requests(2)
    assert [r.header("Auth-Login-Attempt") for r in reqs] == ["1", "2"]
    assert [r.header("Auth-Pass") for r in reqs] == ["wrong", "secret"]


def test_auth_user_and_pass_override(imap_setup, auth_server, imap_backend):
    st = imap_setup()
    auth_server.route_to(imap_backend.port, user="alice", password="secret")
    c = st.connect()
    assert c.cmd("a1 LOGIN bob hunter2") == b"a1 " + LOGGED_IN + b"\r\n"
    assert bytes(imap_backend.wait_session(0).raw) == backend_transcript()


@pytest.mark.parametrize("respond, log", [
    (lambda req: CLOSE, None),
    (lambda req: b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n\r\n", "did not send server or port"),
    (lambda req: auth_ok("x1"), "sent invalid server port"),
])
def test_auth_server_trouble_is_internal_error(imap_setup, auth_server, respond, log):
    st = imap_setup()
    auth_server.set_respond(respond)
    c = st.connect()
    c.sendline("a1 LOGIN alice secret")
    assert c.read_until_closed() == INTERNAL
    if log:
        st.proxy.wait_log(log)


def test_auth_server_down_is_internal_error(imap_setup, imap_backend):
    port = free_port()
    st = imap_setup(auth_http="http://127.0.0.1:%d/auth" % port)
    c = st.connect()
    c.sendline("a1 LOGIN alice secret")
    assert c.read_until_closed() == INTERNAL


# --- backend login --------------------------------------------------------------------------------

def test_backend_untagged_line_before_ok_is_relayed(imap_setup, backend_factory):
    backend = backend_factory(ImapBackend, untagged=b"* CAPABILITY IMAP4rev1 IDLE")
    st = imap_setup(backend=backend)
    c = st.connect()
    assert c.cmd("a1 LOGIN alice secret") == b"* CAPABILITY IMAP4rev1 IDLE\r\n"
    assert c.readline() == b"a1 " + LOGGED_IN + b"\r\n"
    assert c.cmd("a2 NOOP") == b"a2 OK NOOP completed.\r\n"


def test_backend_refusal_is_internal_error_by_default(imap_setup, imap_backend):
    st = imap_setup()
    c = st.connect()
    c.sendline("a2 LOGIN alice wrong")
    assert c.read_until_closed() == INTERNAL
    line = st.proxy.wait_log("upstream sent invalid response")
    assert "[error]" in line
    assert 'upstream sent invalid response: "NO [AUTHENTICATIONFAILED] Authentication ' \
           'failed." while reading response from upstream' in line
    s = imap_backend.wait_session(0)
    assert s.closed.wait(2)


def test_backend_refusal_passed_with_proxy_pass_error_message(imap_setup, imap_backend):
    st = imap_setup(proxy_pass_error_message="on")
    c = st.connect()
    c.sendline("a2 LOGIN alice wrong")
    assert c.read_until_closed() == b"a2 " + REFUSED + b"\r\n"
    line = st.proxy.wait_log("upstream sent invalid response")
    assert "[info]" in line
    assert 'upstream sent invalid response: "NO [AUTHENTICATIONFAILED] Authentication ' \
           'failed."' in line


@pytest.mark.parametrize("kw, reply", [
    ({"greeting": b"* BYE too busy"}, b"* BYE too busy\r\n"),
    ({"greeting": b"* PREAUTH hello"}, b"* PREAUTH hello\r\n"),
    ({"continuation": b"NO literal refused"}, b"a1 NO literal refused\r\n"),
])
def test_backend_refusal_at_other_steps(imap_setup, backend_factory, kw, reply):
    backend = backend_factory(ImapBackend, **kw)
    st = imap_setup(backend=backend, proxy_pass_error_message="on")
    c = st.connect()
    c.sendline("a1 LOGIN alice secret")
    assert c.read_until_closed() == reply
    st2 = imap_setup(backend=backend)
    c = st2.connect()
    c.sendline("a1 LOGIN alice secret")
    assert c.read_until_closed() == INTERNAL


def test_backend_two_untagged_lines_are_refused(imap_setup, backend_factory):
    backend = backend_factory(ImapBackend, untagged=b"* A\r\n* B")
    st = imap_setup(backend=backend)
    c = st.connect()
    c.sendline("a1 LOGIN alice secret")
    assert c.read_until_closed() == INTERNAL


def test_backend_closing_is_internal_error(imap_setup, backend_factory):
    backend = backend_factory(ScriptedBackend, lambda conn: conn.close())
    st = imap_setup(backend=backend, proxy_pass_error_message="on")
    c = st.connect()
    c.sendline("a1 LOGIN alice secret")
    assert c.read_until_closed() == INTERNAL


def test_proxy_pass_static_route(imap_setup, auth_server, imap_backend):
    st = imap_setup(auth=False, proxy_pass="127.0.0.1:%d" % imap_backend.port)
    c = st.connect()
    assert c.cmd("a1 LOGIN alice secret") == b"a1 " + LOGGED_IN + b"\r\n"
    c = st.connect()
    c.sendline("a2 LOGIN alice wrong")
    assert c.read_until_closed() == b"a2 " + REFUSED + b"\r\n"
    assert auth_server.requests == []


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


@pytest.mark.parametrize("id_reply", [
    (b"{tag}BAD unknown command",),
    (b"{tag}NO not now",),
    (b"* OK something else", b'* ID ("name" "x")', b"{tag}OK ID completed."),
])
def test_client_id_reply_tolerated(imap_setup, backend_factory, id_reply):
    backend = backend_factory(ImapBackend, id_reply=id_reply)
    st = imap_setup(backend=backend, imap_client_id="on")
    c = st.connect()
    assert c.cmd("a1 LOGIN alice secret") == b"a1 " + LOGGED_IN + b"\r\n"


def test_client_id_off_by_default(imap_setup, imap_backend):
    st = imap_setup()
    c = st.connect()
    assert c.cmd("a1 LOGIN alice secret") == b"a1 " + LOGGED_IN + b"\r\n"
    assert bytes(imap_backend.wait_session(0).raw) == backend_transcript()


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


# --- session level: STARTTLS modes (the `starttls` directive arrives with TLS) --------------------

class _Runtime:
    def __init__(self):
        self.log = RecordingLog()

    def log_for(self, conf):
        return self.log

    def next_conn_id(self):
        return 1


def run_session(starttls, tls=False, **conf):
    """An IMAP Session on a socketpair in a thread; returns (LineClient-like socket, thread)."""
    import threading
    from mailproxy.config import server_defaults
    from mailproxy.session import Session
    values = dict(timeout=2.0, max_errors=5, imap_auth=["plain"],
                  imap_client_id=False, imap_capabilities=["IMAP4", "IMAP4rev1", "UIDPLUS"],
                  imap_client_buffer=4096, starttls=starttls, server_name="mx.test",
                  auth_http=None, proxy_pass=None)
    values.update(conf)
    ours, theirs = socket.socketpair()
    session = Session(theirs, ("127.0.0.1", 40000), server_defaults("imap", **values), None,
                      _Runtime())
    session.conv.tls = tls
    t = threading.Thread(target=session.run, daemon=True)
    t.start()
    ours.settimeout(3)
    return ours.makefile("rwb", buffering=0), t


def _cmd(f, line):
    f.write(line + b"\r\n")
    return f.readline()


@pytest.mark.parametrize("tls", [False, True])
def test_starttls_only_refuses_login_before_tls(tls):
    f, t = run_session("only", tls=tls)
    assert f.readline() == GREETING
    if tls:
        assert _cmd(f, b"a CAPABILITY") == CAPS
    else:
        assert _cmd(f, b"a CAPABILITY") == (b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS "
                                            b"STARTTLS LOGINDISABLED\r\n")
    assert f.readline() == ok("a")
    if not tls:
        assert _cmd(f, b"b LOGIN alice secret") == bad("b")
        assert _cmd(f, b"c AUTHENTICATE PLAIN " + b64("\0alice\0secret").encode()) == bad("c")
        assert _cmd(f, b"d AUTHENTICATE LOGIN") == bad("d")
    if tls:     # STARTTLS is invalid once TLS is active; the upgrade is in test_tls
        assert _cmd(f, b"e STARTTLS") == bad("e")
    assert _cmd(f, b"f ID NIL") == b"* ID NIL\r\n"
    assert f.readline() == ok("f")
    assert _cmd(f, b"g LOGOUT") == b"* BYE\r\n"
    assert f.readline() == ok("g")
    t.join(3)
    assert not t.is_alive()


def test_starttls_on_advertises_starttls():
    f, t = run_session("on")
    assert f.readline() == GREETING
    assert _cmd(f, b"a CAPABILITY") == (b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN "
                                        b"STARTTLS\r\n")
    assert f.readline() == ok("a")
    f.write(b"b LOGOUT\r\n")
    assert f.read() == b"* BYE\r\n" + ok("b")
    t.join(3)
