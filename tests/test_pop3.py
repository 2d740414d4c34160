"""POP3 end to end: the proxy as a subprocess, a recording auth_http server, a scripted POP3
backend. Each test asserts what the client, the auth server and the backend saw."""

import hashlib
import hmac
import re
import socket
import time

import pytest

from tests.support.common import b64, unb64
from tests.support.mailbackends import Pop3Backend, big_message_chunks
from tests.support.process import free_port

OK_LOGGED_IN = b"+OK logged in\r\n"
INVALID = b"-ERR invalid command\r\n"
SALT_RE = re.compile(rb"^\+OK POP3 ready (<(\d+)\.(\d+)@([^>]*)>)\r\n$")


def login_userpass(c, user="alice", password="secret"):
    assert c.cmd(f"USER {user}") == b"+OK\r\n"
    return c.cmd(f"PASS {password}")


def salt_of(greeting):
    m = SALT_RE.match(greeting)
    assert m, greeting
    return m.group(1).decode()


def assert_backend_login(backend, user=b"alice", password=b"secret", i=0):
    s = backend.wait_session(i)
    lines = s.wait_lines(2)
    assert lines[:2] == [b"USER " + user, b"PASS " + password]
    assert s.raw.startswith(b"USER " + user + b"\r\nPASS " + password + b"\r\n")
    return s


# --- greeting ------------------------------------------------------------------------------

def test_greeting_without_salt(pop3_setup):
    st = pop3_setup()
    c = st.connect()
    assert c.greeting == b"+OK POP3 ready\r\n"
    st.proxy.wait_log(f"connected to 127.0.0.1:{st.port}")


@pytest.mark.parametrize("methods", ["plain apop", "cram-md5", "apop cram-md5 external"])
def test_greeting_with_salt(pop3_setup, methods):
    st = pop3_setup(pop3_auth=methods, server_name="mx.example.test")
    before = int(time.time())
    c1, c2 = st.connect(), st.connect()
    after = int(time.time())
    for c in (c1, c2):
        m = SALT_RE.match(c.greeting)
        assert m, c.greeting
        assert 0 <= int(m.group(2)) <= 2 ** 31 - 1
        assert before - 1 <= int(m.group(3)) <= after + 1
        assert m.group(4) == b"mx.example.test"
    assert salt_of(c1.greeting) != salt_of(c2.greeting)


# --- CAPA / AUTH listings ----------------------------------------------------------------------

@pytest.mark.parametrize("methods, sasl", [
    (None, b"SASL PLAIN LOGIN"),
    ("plain", b"SASL PLAIN LOGIN"),
    ("apop", b"SASL"),
    ("cram-md5", b"SASL CRAM-MD5"),
    ("external plain", b"SASL PLAIN LOGIN EXTERNAL"),
    ("external cram-md5 apop plain", b"SASL PLAIN LOGIN CRAM-MD5 EXTERNAL"),
])
def test_capa_per_pop3_auth(pop3_setup, methods, sasl):
    st = pop3_setup(pop3_auth=methods)
    c = st.connect()
    c.sendline("CAPA")
    assert c.read_multiline() == [b"+OK Capability list follows\r\n", b"TOP\r\n", b"USER\r\n",
                                  b"UIDL\r\n", sasl + b"\r\n", b".\r\n"]


def test_capa_with_pop3_capabilities(pop3_setup):
    st = pop3_setup(pop3_capabilities='UIDL "EXPIRE 30" PIPELINING', pop3_auth="plain cram-md5")
    c = st.connect()
    c.sendline("capa")
    assert b"".join(c.read_multiline()) == (b"+OK Capability list follows\r\nUIDL\r\nEXPIRE 30\r\n"
                                            b"PIPELINING\r\nSASL PLAIN LOGIN CRAM-MD5\r\n.\r\n")


def test_capa_inherited_from_mail_section(pop3_setup):
    st = pop3_setup(mail={"pop3_capabilities": "TOP UIDL", "pop3_auth": "plain external"})
    c = st.connect()
    c.sendline("CAPA")
    assert b"".join(c.read_multiline()) == (b"+OK Capability list follows\r\nTOP\r\nUIDL\r\n"
                                            b"SASL PLAIN LOGIN EXTERNAL\r\n.\r\n")


@pytest.mark.parametrize("methods, listing", [
    ("plain", b"PLAIN\r\nLOGIN\r\n"),
    ("apop cram-md5 external plain", b"PLAIN\r\nLOGIN\r\nCRAM-MD5\r\nEXTERNAL\r\n"),
    ("apop", b""),
])
def test_auth_listing(pop3_setup, methods, listing):
    st = pop3_setup(pop3_auth=methods)
    c = st.connect()
    c.sendline("AUTH")
    assert b"".join(c.read_multiline()) == b"+OK methods supported:\r\n" + listing + b".\r\n"
    assert c.cmd("NOOP") == b"+OK\r\n"


# --- USER / PASS -----------------------------------------------------------------------------

def test_user_pass_transcripts(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup()
    c = st.connect()
    assert login_userpass(c) == OK_LOGGED_IN
    req = auth_server.wait_requests(1)[0]
    assert req.headers[:7] == [("Host", "127.0.0.1"), ("Auth-Method", "plain"), ("Auth-User", "alice"),
                               ("Auth-Pass", "secret"), ("Auth-Protocol", "pop3"),
                               ("Auth-Login-Attempt", "1"), ("Client-IP", "127.0.0.1")]
    s = assert_backend_login(pop3_backend)
    assert s.lines == [b"USER alice", b"PASS secret"]
    assert c.cmd("QUIT") == b"+OK bye\r\n"
    assert c.closed()
    s.closed.wait(2)
    assert bytes(s.raw) == b"USER alice\r\nPASS secret\r\nQUIT\r\n"
    st.proxy.wait_log("client logged in")


def test_user_pass_spaces_kept(pop3_setup, auth_server, backend_factory):
    backend = backend_factory(Pop3Backend, users={"bob  ": "p w "})
    st = pop3_setup(backend=backend)
    c = st.connect()
    c.send(b"user  bob  \r\n")
    assert c.readline() == b"+OK\r\n"
    c.send(b"PASS p w \r\n")
    assert c.readline() == OK_LOGGED_IN
    req = auth_server.wait_requests(1)[0]
    assert req.header("Auth-User") == "bob%20%20"
    assert req.header("Auth-Pass") == "p%20w%20"
    assert assert_backend_login(backend, b"bob  ", b"p w ").lines == [b"USER bob  ", b"PASS p w "]


def test_user_pass_bare_lf_accepted(pop3_setup, pop3_backend):
    st = pop3_setup()
    c = st.connect()
    c.send(b"NOOP\n")
    assert c.readline() == b"+OK\r\n"
    c.send(b"USER alice\n")
    assert c.readline() == b"+OK\r\n"
    c.send(b"PASS secret\n")
    assert c.readline() == OK_LOGGED_IN
    s = assert_backend_login(pop3_backend)
    assert s.raw_lines[:2] == [b"USER alice\r\n", b"PASS secret\r\n"]


def test_cr_not_followed_by_lf_is_invalid(pop3_setup):
    st = pop3_setup()
    c = st.connect()
    c.send(b"NO\rOP\r\n")
    assert c.readline() == INVALID
    assert c.cmd("NOOP") == b"+OK\r\n"


def test_client_gets_backends_own_pass_reply(pop3_setup, backend_factory):
    backend = backend_factory(Pop3Backend, pass_reply=b"+OK [XYZ] Maildrop has 7 messages (42 octets)")
    st = pop3_setup(backend=backend)
    c = st.connect()
    assert login_userpass(c) == b"+OK [XYZ] Maildrop has 7 messages (42 octets)\r\n"


def test_poplib_mailbox_session(pop3_setup, pop3_backend):
    st = pop3_setup()
    p = st.pop3()
    assert p.getwelcome() == b"+OK POP3 ready"
    assert p.user("alice") == b"+OK"
    assert p.pass_("secret") == b"+OK logged in"
    assert p.stat() == (2, 102)
    resp, listing, _ = p.list()
    assert resp == b"+OK 2 messages" and listing == [b"1 44", b"2 58"]
    resp, lines, octets = p.retr(2)
    assert resp == b"+OK 58 octets"
    assert lines == [b"From: b@example.com", b"Subject: two", b"", b".leading dot", b"world"]
    assert p.quit() == b"+OK bye"
    s = pop3_backend.wait_session(0)
    s.closed.wait(2)
    assert s.lines == [b"USER alice", b"PASS secret", b"STAT", b"LIST", b"RETR 2", b"QUIT"]


def test_retr_50mb_intact(pop3_setup, backend_factory):
    size = 50 * 1024 * 1024
    backend = backend_factory(Pop3Backend, big_size=size)
    st = pop3_setup(backend=backend)
    c = st.connect(timeout=20)
    assert login_userpass(c) == OK_LOGGED_IN
    expected = hashlib.sha256()
    for chunk in big_message_chunks(size):
        expected.update(chunk)
    t0 = time.monotonic()
    c.sendline("RETR 3")
    assert c.readline() == b"+OK %d octets\r\n" % size
    need = size + 3                         # the body, then ".\r\n"
    got = 0
    h = hashlib.sha256()
    last = b""
    data = bytes(c.buf)
    c.buf.clear()
    while True:
        if data:
            take = data[:need - got]
            h.update(take[:max(0, size - got)])
            last = (last + take)[-3:]
            got += len(take)
            if got >= need:
                break
        data = c.sock.recv(1 << 20)
        assert data, f"connection closed after {got} of {need} bytes"
    elapsed = time.monotonic() - t0
    assert last == b".\r\n"
    assert h.hexdigest() == expected.hexdigest()
    assert elapsed < 30, f"50 MB took {elapsed:.1f}s"
    assert c.cmd("NOOP") == b"+OK\r\n"


# --- APOP ------------------------------------------------------------------------------------

def test_apop(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup(pop3_auth="plain apop", server_name="mx.test")
    auth_server.route_to(pop3_backend.port, password="secret")
    c = st.connect()
    salt = salt_of(c.greeting)
    digest = hashlib.md5((salt + "secret").encode()).hexdigest()
    assert c.cmd(f"APOP alice {digest}") == OK_LOGGED_IN
    req = auth_server.wait_requests(1)[0]
    assert req.headers[:8] == [("Host", "127.0.0.1"), ("Auth-Method", "apop"), ("Auth-User", "alice"),
                               ("Auth-Pass", digest), ("Auth-Salt", salt), ("Auth-Protocol", "pop3"),
                               ("Auth-Login-Attempt", "1"), ("Client-IP", "127.0.0.1")]
    assert f"\r\nAuth-Salt: {salt}\r\nAuth-Protocol: pop3\r\n".encode() in req.raw
    assert_backend_login(pop3_backend)


def test_apop_without_auth_pass_is_internal_error(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup(pop3_auth="plain apop")
    c = st.connect()
    assert c.cmd("APOP alice 0123456789abcdef0123456789abcdef") == b"-ERR internal server error\r\n"
    assert c.closed()
    assert pop3_backend.sessions == []
    st.proxy.wait_log("did not send password")


def test_apop_not_enabled_is_invalid(pop3_setup, auth_server):
    st = pop3_setup(pop3_auth="plain")
    c = st.connect()
    assert c.greeting == b"+OK POP3 ready\r\n"
    assert c.cmd("APOP alice 0123456789abcdef0123456789abcdef") == INVALID
    assert c.cmd("NOOP") == b"+OK\r\n"
    assert auth_server.requests == []


def test_apop_wrong_argument_count_is_invalid(pop3_setup, auth_server):
    st = pop3_setup(pop3_auth="plain apop")
    c = st.connect()
    assert c.cmd("APOP alice") == INVALID
    assert c.cmd("NOOP") == b"+OK\r\n"
    assert auth_server.requests == []


# --- SASL ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", ["AUTH PLAIN {}", "auth plain {}", "AUTH PLAIN  {}"])
def test_auth_plain_initial_response(pop3_setup, auth_server, pop3_backend, cmd):
    st = pop3_setup()
    c = st.connect()
    assert c.cmd(cmd.format(b64("\0alice\0secret"))) == OK_LOGGED_IN
    req = auth_server.wait_requests(1)[0]
    assert (req.header("Auth-Method"), req.header("Auth-User"), req.header("Auth-Pass")) == \
        ("plain", "alice", "secret")
    assert req.header("Auth-Salt") is None
    assert_backend_login(pop3_backend)


def test_auth_plain_two_steps_with_authzid(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup()
    c = st.connect()
    assert c.cmd("AUTH PLAIN") == b"+ \r\n"
    assert c.cmd(b64("admin\0alice\0secret")) == OK_LOGGED_IN
    req = auth_server.wait_requests(1)[0]
    assert (req.header("Auth-User"), req.header("Auth-Pass")) == ("alice", "secret")
    assert_backend_login(pop3_backend)


def test_auth_plain_accepted_when_not_advertised(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup(pop3_auth="apop")
    c = st.connect()
    assert c.cmd("AUTH PLAIN " + b64("\0alice\0secret")) == OK_LOGGED_IN
    assert_backend_login(pop3_backend)


@pytest.mark.parametrize("response, log", [
    (b64("alice"), "client sent invalid login in AUTH PLAIN command"),
    (b64("\0alice"), "client sent invalid password in AUTH PLAIN command"),
    ("!!!notbase64", "client sent invalid base64 encoding in AUTH PLAIN command"),
])
def test_auth_plain_bad_response(pop3_setup, auth_server, response, log):
    st = pop3_setup()
    c = st.connect()
    assert c.cmd("AUTH PLAIN " + response) == INVALID
    assert c.cmd("NOOP") == b"+OK\r\n"
    st.proxy.wait_log(log)
    assert auth_server.requests == []


def test_auth_login_two_steps(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup()
    c = st.connect()
    assert c.cmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6\r\n"
    assert c.cmd(b64("alice")) == b"+ UGFzc3dvcmQ6\r\n"
    assert c.cmd(b64("secret")) == OK_LOGGED_IN
    req = auth_server.wait_requests(1)[0]
    assert (req.header("Auth-Method"), req.header("Auth-User"), req.header("Auth-Pass")) == \
        ("plain", "alice", "secret")
    assert_backend_login(pop3_backend)


def test_auth_login_initial_response(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup()
    c = st.connect()
    assert c.cmd("AUTH LOGIN " + b64("alice")) == b"+ UGFzc3dvcmQ6\r\n"
    assert c.cmd(b64("secret")) == OK_LOGGED_IN
    assert_backend_login(pop3_backend)


def test_auth_login_cancel_is_invalid(pop3_setup, auth_server):
    st = pop3_setup()
    c = st.connect()
    assert c.cmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6\r\n"
    assert c.cmd("*") == INVALID
    assert c.cmd("NOOP") == b"+OK\r\n"
    assert auth_server.requests == []


def test_auth_cram_md5(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup(pop3_auth="plain cram-md5", server_name="mx.test")
    auth_server.route_to(pop3_backend.port, password="secret")
    c = st.connect()
    salt = salt_of(c.greeting)
    challenge = c.cmd("AUTH CRAM-MD5")
    assert challenge == b"+ " + b64(salt).encode() + b"\r\n"
    assert unb64(challenge[2:-2]) == salt.encode()
    digest = hmac.new(b"secret", salt.encode(), hashlib.md5).hexdigest()
    assert c.cmd(b64(f"alice {digest}")) == OK_LOGGED_IN
    req = auth_server.wait_requests(1)[0]
    assert req.headers[1:6] == [("Auth-Method", "cram-md5"), ("Auth-User", "alice"), ("Auth-Pass", digest),
                                ("Auth-Salt", salt), ("Auth-Protocol", "pop3")]
    assert_backend_login(pop3_backend)


def test_auth_cram_md5_bad_hash(pop3_setup, auth_server):
    st = pop3_setup(pop3_auth="plain cram-md5")
    c = st.connect()
    assert c.cmd("AUTH CRAM-MD5").startswith(b"+ ")
    assert c.cmd(b64("alice short")) == INVALID
    st.proxy.wait_log("client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command")
    assert c.cmd("NOOP") == b"+OK\r\n"
    assert auth_server.requests == []


@pytest.mark.parametrize("cmd", ["AUTH CRAM-MD5", "AUTH EXTERNAL", "AUTH EXTERNAL " + b64("alice"),
                                 "AUTH FOO", "AUTH XOAUTH2 abc"])
def test_disabled_or_unknown_mechanism_is_invalid(pop3_setup, auth_server, cmd):
    st = pop3_setup(pop3_auth="plain apop")
    c = st.connect()
    assert c.cmd(cmd) == INVALID
    assert c.cmd("NOOP") == b"+OK\r\n"
    assert auth_server.requests == []


def test_cram_md5_initial_response_is_invalid(pop3_setup, auth_server):
    st = pop3_setup(pop3_auth="plain cram-md5")
    c = st.connect()
    assert c.cmd("AUTH CRAM-MD5 " + b64("alice 0123456789abcdef0123456789abcdef")) == INVALID
    assert auth_server.requests == []


@pytest.mark.parametrize("two_steps", [False, True])
def test_auth_external(pop3_setup, auth_server, pop3_backend, two_steps):
    # apop too: a salt exists, yet EXTERNAL sends no Auth-Salt (current nginx, 1.29.1+)
    st = pop3_setup(pop3_auth="plain apop external")
    auth_server.route_to(pop3_backend.port, password="secret")
    c = st.connect()
    if two_steps:
        assert c.cmd("AUTH EXTERNAL") == b"+ VXNlcm5hbWU6\r\n"
        assert c.cmd(b64("alice")) == OK_LOGGED_IN
    else:
        assert c.cmd("AUTH EXTERNAL " + b64("alice")) == OK_LOGGED_IN
    req = auth_server.wait_requests(1)[0]
    assert req.headers[1:6] == [("Auth-Method", "external"), ("Auth-User", "alice"), ("Auth-Pass", ""),
                                ("Auth-Protocol", "pop3"), ("Auth-Login-Attempt", "1")]
    assert b"\r\nAuth-Pass: \r\n" in req.raw
    assert_backend_login(pop3_backend)


# --- state rules, errors, limits -------------------------------------------------------------

def test_pass_without_user_is_invalid(pop3_setup, auth_server):
    st = pop3_setup()
    c = st.connect()
    assert c.cmd("PASS secret") == INVALID
    assert c.cmd("NOOP") == b"+OK\r\n"
    assert auth_server.requests == []


@pytest.mark.parametrize("between", ["USER bob", "STLS", "STAT", "APOP a b", "AUTH"])
def test_other_command_after_user_resets_state(pop3_setup, auth_server, between):
    st = pop3_setup()
    c = st.connect()
    assert c.cmd("USER alice") == b"+OK\r\n"
    assert c.cmd(between) == INVALID
    assert c.cmd("PASS secret") == INVALID
    assert c.cmd("NOOP") == b"+OK\r\n"
    assert auth_server.requests == []


def test_noop_and_capa_keep_user_state(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup()
    c = st.connect()
    assert c.cmd("USER alice") == b"+OK\r\n"
    assert c.cmd("NOOP") == b"+OK\r\n"
    c.sendline("CAPA")
    assert c.read_multiline()[-2:] == [b"SASL PLAIN LOGIN\r\n", b".\r\n"]
    assert c.cmd("PASS secret") == OK_LOGGED_IN
    assert_backend_login(pop3_backend)


def test_user_needs_an_argument(pop3_setup):
    st = pop3_setup()
    c = st.connect()
    assert c.cmd("USER") == INVALID
    assert c.cmd("NOOP") == b"+OK\r\n"


@pytest.mark.parametrize("cmd", ["STAT", "LIST", "RETR 1", "TOP 1 1", "UIDL", "NOOPX", "FOO", "XY"])
def test_unknown_commands(pop3_setup, cmd):
    st = pop3_setup()
    c = st.connect()
    assert c.cmd(cmd) == INVALID
    assert c.cmd("NOOP") == b"+OK\r\n"


def test_stls_without_tls_is_invalid(pop3_setup):
    st = pop3_setup()
    c = st.connect()
    assert c.cmd("STLS") == INVALID
    assert c.cmd("NOOP") == b"+OK\r\n"


def test_quit(pop3_setup, auth_server):
    st = pop3_setup()
    c = st.connect()
    assert c.cmd("quit") == b"+OK\r\n"
    assert c.closed()
    assert auth_server.requests == []


def test_max_errors_counts_parser_errors_only(pop3_setup, auth_server):
    st = pop3_setup(max_errors=2)
    c = st.connect()
    # rejections decided after parsing do not count
    for cmd in ["PASS x", "USER", "AUTH FOO", "AUTH PLAIN !!!", "APOP x"]:
        assert c.cmd(cmd) == INVALID, cmd
    assert c.cmd("NOOP") == b"+OK\r\n"
    assert c.cmd("FOO") == INVALID
    assert c.cmd("NOOP") == b"+OK\r\n"
    assert c.cmd("BAR") == INVALID
    assert c.closed()
    st.proxy.wait_log("client sent too many invalid commands")
    assert auth_server.requests == []


def test_max_errors_fourth_argument_is_parser_error(pop3_setup):
    st = pop3_setup(max_errors=1, pop3_auth="plain apop")
    c = st.connect()
    assert c.cmd("APOP a b c d") == INVALID
    assert c.closed()


def test_max_errors_default_is_5(pop3_setup):
    st = pop3_setup()
    c = st.connect()
    for _ in range(4):
        assert c.cmd("FOO") == INVALID
    assert c.cmd("NOOP") == b"+OK\r\n"
    assert c.cmd("FOO") == INVALID
    assert c.closed()


def test_too_long_command_closes(pop3_setup, auth_server):
    st = pop3_setup()
    c = st.connect()
    c.send(b"USER " + b"a" * 123)          # fills the 128-byte buffer without a line end
    assert c.readline() == INVALID
    assert c.closed()
    st.proxy.wait_log('client sent too long command "USER aaaa')
    assert auth_server.requests == []


def test_long_line_with_lf_is_refused(pop3_setup, auth_server):
    st = pop3_setup()
    c = st.connect()
    c.send(b"USER " + b"a" * 300 + b"\r\n")
    try:
        reply = c.readline()
    except ConnectionResetError:       # the proxy closed with our surplus bytes unread
        reply = INVALID
    assert reply == INVALID
    time.sleep(0.2)
    assert auth_server.requests == []


def test_line_below_limit_accepted(pop3_setup, auth_server, backend_factory):
    user = "u" * 119                      # "USER " + 119 + CRLF = 126 bytes
    backend = backend_factory(Pop3Backend, users={user: "pw"})
    st = pop3_setup(backend=backend)
    c = st.connect()
    assert c.cmd(f"USER {user}") == b"+OK\r\n"
    assert c.cmd("PASS pw") == OK_LOGGED_IN
    assert auth_server.wait_requests(1)[0].header("Auth-User") == user


def test_pipelined_commands_answered_in_order(pop3_setup, auth_server, pop3_backend):
    st = pop3_setup()
    c = st.connect()
    c.send(b"CAPA\r\nNOOP\r\nFOO\r\nUSER alice\r\nPASS secret\r\nSTAT\r\nLIST 1\r\n")
    assert c.read_multiline()[0] == b"+OK Capability list follows\r\n"
    assert c.readline() == b"+OK\r\n"
    assert c.readline() == INVALID
    assert c.readline() == b"+OK\r\n"
    assert c.readline() == OK_LOGGED_IN
    assert c.readline() == b"+OK 2 102\r\n"
    assert c.readline() == b"+OK 1 44\r\n"
    s = pop3_backend.wait_session(0)
    assert s.wait_lines(4) == [b"USER alice", b"PASS secret", b"STAT", b"LIST 1"]
    assert len(auth_server.requests) == 1


def test_pipelined_bytes_after_pass_forwarded_in_order(pop3_setup, auth_server, pop3_backend):
    # the auth server answers slowly: the client's next commands arrive during authentication
    st = pop3_setup()
    from tests.support.auth import Delay, auth_ok
    auth_server.set_respond(lambda req: Delay(0.3, auth_ok(pop3_backend.port)))
    c = st.connect()
    assert c.cmd("USER alice") == b"+OK\r\n"
    c.send(b"PASS secret\r\n")
    time.sleep(0.1)
    c.send(b"STAT\r\n")
    c.send(b"RETR 1\r\nQUIT\r\n")
    assert c.readline() == OK_LOGGED_IN
    assert c.readline() == b"+OK 2 102\r\n"
    assert c.readline() == b"+OK 44 octets\r\n"
    rest = c.read_until_closed()
    assert rest == b"From: a@example.com\r\nSubject: one\r\n\r\nhello\r\n.\r\n+OK bye\r\n"
    s = pop3_backend.wait_session(0)
    s.closed.wait(2)
    assert bytes(s.raw) == b"USER alice\r\nPASS secret\r\nSTAT\r\nRETR 1\r\nQUIT\r\n"


# --- credentials with CR / LF / NUL ------------------------------------------------------------

@pytest.mark.parametrize("steps, user_esc, pass_esc", [
    (["AUTH PLAIN " + b64("\0ali\r\nce\0sec\nret")], "ali%0D%0Ace", "sec%0Aret"),
    (["AUTH PLAIN " + b64("\0alice\0secret\r\nQUIT")], "alice", "secret%0D%0AQUIT"),
    (["AUTH PLAIN " + b64("\0alice\0sec\0ret")], "alice", "sec%00ret"),
    (["AUTH LOGIN " + b64("alice\r\nDELE 1"), b64("secret")], "alice%0D%0ADELE%201", "secret"),
    (["AUTH LOGIN", b64("alice"), b64("se\ncret\r\nRSET")], "alice", "se%0Acret%0D%0ARSET"),
    ([b"USER al\x00ice", b"PASS secret"], "al%00ice", "secret"),
])
def test_control_bytes_never_become_extra_lines(pop3_setup, auth_server, pop3_backend,
                                                steps, user_esc, pass_esc):
    st = pop3_setup()
    c = st.connect()
    for step in steps:
        c.sendline(step)
        reply = c.readline()
    assert reply.startswith((b"+", b"-ERR")), reply
    time.sleep(0.3)
    # the proxy may refuse such credentials itself; if it asks the auth server, they are escaped
    for req in auth_server.requests:
        assert req.header("Auth-User") == user_esc
        assert req.header("Auth-Pass") == pass_esc
        assert [n for n, _ in req.headers] == ["Host", "Auth-Method", "Auth-User", "Auth-Pass",
                                               "Auth-Protocol", "Auth-Login-Attempt", "Client-IP"]
    if not auth_server.requests:
        assert reply == INVALID
        assert c.cmd("NOOP") == b"+OK\r\n"
    time.sleep(0.3)
    # whatever the proxy decided, the backend never saw an injected command line
    for s in pop3_backend.sessions:
        for line in s.lines:
            assert line.startswith((b"USER ", b"PASS ")), s.lines
        assert len(s.lines) <= 2, s.lines
        assert not any(line in (b"ce", b"QUIT", b"ret", b"DELE 1", b"RSET") for line in s.lines)


# --- IPv6 ------------------------------------------------------------------------------------

def _have_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _have_ipv6(), reason="no IPv6 loopback")
def test_ipv6_client_and_backend(pop3_setup, auth_server, backend_factory):
    backend = backend_factory(Pop3Backend, host="::1")
    st = pop3_setup(backend=backend, host="::1")
    c = st.connect()
    assert c.greeting == b"+OK POP3 ready\r\n"
    assert login_userpass(c) == OK_LOGGED_IN
    req = auth_server.wait_requests(1)[0]
    assert req.header("Client-IP") == "::1"
    s = assert_backend_login(backend)
    assert s.peer[0] == "::1"
    assert c.cmd("STAT") == b"+OK 2 102\r\n"
    line = st.proxy.wait_log("client logged in")
    assert "client: ::1" in line
    assert f"upstream: [::1]:{backend.port}" in line or f"upstream: ::1:{backend.port}" in line


# --- timeouts before login -------------------------------------------------------------------

def test_idle_client_before_login_times_out(pop3_setup, auth_server):
    st = pop3_setup(timeout="1s")
    c = st.connect()
    assert c.cmd("USER alice") == b"+OK\r\n"
    t0 = time.monotonic()
    assert c.closed(4)                        # closed without a word
    assert 0.8 <= time.monotonic() - t0 < 3
    st.proxy.wait_log("client timed out (110: Connection timed out) while in auth state")
    assert auth_server.requests == []


# --- the one-file build ----------------------------------------------------------------------

def test_zipapp_end_to_end(tmp_path, proxy_factory, auth_server, pop3_backend):
    import subprocess
    import sys
    from tests.support.common import REPO
    from tests.support.process import server_block
    pyz = tmp_path / "mailproxy.pyz"
    subprocess.run([sys.executable, str(REPO / "packaging" / "build.py"), "--output", str(pyz)],
                   check=True, cwd=str(REPO), timeout=60, capture_output=True)
    port = free_port()
    auth_server.route_to(pop3_backend.port)
    proxy_factory({"servers": {"pop": server_block("pop3", port, auth_http=auth_server.url)}},
                  command=[sys.executable, str(pyz)])
    from tests.support.clients import LineClient
    c = LineClient("127.0.0.1", port)
    assert c.readline() == b"+OK POP3 ready\r\n"
    assert login_userpass(c) == OK_LOGGED_IN
    assert c.cmd("STAT") == b"+OK 2 102\r\n"
    assert_backend_login(pop3_backend)


def test_client_reset_is_logged_with_its_errno(pop3_setup):
    """A reset is not a clean close: nginx's "recv() failed (104: ...)" line, not a silence or
    a plain "client closed connection"."""
    import struct
    st = pop3_setup()
    c = st.connect()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.send(b"USER al")
    time.sleep(0.2)
    c.close()                       # linger 0: RST
    line = st.proxy.wait_log("recv() failed (104: Connection reset by peer)")
    assert "while in auth state, client: 127.0.0.1," in line
