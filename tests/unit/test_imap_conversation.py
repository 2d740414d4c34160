"""IMAP without sockets: ImapConversation (ngx_mail_imap_auth_state) and ImapLogin
(ngx_mail_proxy_imap_handler) fed lines, literals and replies; their actions compared exactly."""

import base64
import re
from types import SimpleNamespace

import pytest

from mailproxy import config
from mailproxy.clientio import BackendRejected
from mailproxy.conversation import (CLOSE, Authenticate, BackendStartTLS, LoggedIn, Log, Peer,
                                    Reply, StartTLS, StartTLSRefused, ToBackend)
from mailproxy.imap import (ImapConversation, ImapLogin, backend_id_complete,
                            backend_login_complete)
from mailproxy.log import sanitize

GREETING = b"* OK IMAP4 ready\r\n"
CAPS = b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS"
CONTINUE = Reply(b"+ OK\r\n")
USER_PROMPT = Reply(b"+ VXNlcm5hbWU6\r\n")
PASS_PROMPT = Reply(b"+ UGFzc3dvcmQ6\r\n")
DIGEST = b"0123456789abcdef0123456789abcdef"
MANY = Log("info", "client sent too many invalid commands")


def ok(tag: bytes) -> Reply:
    return Reply(tag + b" OK completed\r\n")


def bad(tag: bytes = b"*") -> Reply:
    return Reply(tag + b" BAD invalid command\r\n")


def info(text: str) -> Log:
    return Log("info", text)


def too_long(data: bytes) -> Log:
    return info('client sent too long command "%s"' % sanitize(data, 1024))


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def line(data: bytes) -> bytes:
    return data + b"\r\n"


@pytest.fixture
def imap(tmp_path):
    """imap(tls=False, **directives) -> an ImapConversation past its greeting, on a real
    ServerConf (config.load; directives given as parsed values)."""
    path = tmp_path / "imap.ini"
    path.write_text("[server unit]\nlisten = 127.0.0.1:1143\nprotocol = imap\n"
                    "server_name = mx.example.test\nauth_http = unix:%s:/auth\n"
                    % (tmp_path / "auth.sock"))

    def make(tls=False, **directives):
        conf = config.load(str(path)).servers[0]
        for name, value in directives.items():
            assert name in config.DIRECTIVES, name
            setattr(conf, name, value)
        conv = ImapConversation(conf, tls=tls)
        assert conv.start() == [Reply(GREETING)]
        return conv
    return make


def failure(message=b"Temporary failure"):
    return SimpleNamespace(status="NO", message=message, wait=0)


# ---- greeting and simple commands ------------------------------------------------------------

def test_greeting_and_defaults(imap):
    conv = imap()
    assert conv.next_input() == ("line", None)
    assert conv.buffer_size() == 4096
    assert imap(imap_client_buffer=100).buffer_size() == 100


@pytest.mark.parametrize("methods,starttls,tls,words", [
    (["plain"], "off", False, b" AUTH=PLAIN"),
    (["plain"], "on", False, b" AUTH=PLAIN STARTTLS"),
    (["plain"], "on", True, b" AUTH=PLAIN"),
    (["plain"], "only", False, b" STARTTLS LOGINDISABLED"),
    (["plain"], "only", True, b" AUTH=PLAIN"),
    (["external", "cram-md5", "login", "plain"], "off", False,
     b" AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5 AUTH=EXTERNAL"),
])
def test_capability(imap, methods, starttls, tls, words):
    conv = imap(tls=tls, imap_auth=methods, starttls=starttls)
    assert conv.receive(b"a CAPABILITY\r\n") == [Reply(CAPS + words + b"\r\na OK completed\r\n")]


def test_capability_words(imap):
    conv = imap(imap_capabilities=["IMAP4rev1", "SASL-IR"])
    assert conv.receive(b"t1 capability\n") == [
        Reply(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN\r\nt1 OK completed\r\n")]


def test_noop_id_logout(imap):
    conv = imap()
    assert conv.receive(b"a NOOP\r\n") == [ok(b"a")]
    assert conv.receive(b"b noop\n") == [ok(b"b")]
    assert conv.receive(b"c ID NIL\r\n") == [Reply(b"* ID NIL\r\nc OK completed\r\n")]
    assert conv.receive(b'd ID ("name" "x")\r\n') == [Reply(b"* ID NIL\r\nd OK completed\r\n")]
    assert conv.receive(b"e LOGOUT\r\n") == [Reply(b"* BYE\r\ne OK completed\r\n"), CLOSE]


# ---- STARTTLS ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["on", "only"])
def test_starttls(imap, mode):
    conv = imap(starttls=mode)
    assert conv.receive(b"a STARTTLS\r\n") == [StartTLS(b"a OK completed\r\n")]
    assert conv.tls_started() == []
    assert conv.tls
    assert conv.receive(b"b STARTTLS\r\n") == [bad(b"b")]
    assert conv.receive(b"c CAPABILITY\r\n") == [
        Reply(CAPS + b" AUTH=PLAIN\r\nc OK completed\r\n")]
    assert conv.receive(b"d LOGIN alice secret\r\n") == [
        Authenticate("plain", b"alice", b"secret")]


@pytest.mark.parametrize("mode,tls", [("off", False), ("off", True), ("on", True),
                                      ("only", True)])
def test_starttls_refused(imap, mode, tls):
    assert imap(tls=tls, starttls=mode).receive(b"a STARTTLS\r\n") == [bad(b"a")]


@pytest.mark.parametrize("command", [
    b"a LOGIN alice secret", b"a AUTHENTICATE PLAIN " + b64(b"\0alice\0secret"),
    b"a AUTHENTICATE PLAIN", b"a AUTHENTICATE LOGIN", b"a AUTHENTICATE CRAM-MD5",
    b"a AUTHENTICATE EXTERNAL",
])
def test_starttls_only_refuses_auth_before_tls(imap, command):
    conv = imap(starttls="only", imap_auth=["plain", "cram-md5", "external"])
    assert conv.receive(line(command)) == [bad(b"a")]
    assert conv.errors == 0             # refused after parsing: not a parser error


# ---- LOGIN ------------------------------------------------------------------------------------

@pytest.mark.parametrize("command,user,passwd", [
    (b"a LOGIN alice secret", b"alice", b"secret"),
    (b'a login "al ice" "p\\"w"', b"al ice", b'p"w'),
    (b"a LOGIN  alice   secret  ", b"alice", b"secret"),
])
def test_login(imap, command, user, passwd):
    conv = imap()
    assert conv.receive(line(command)) == [Authenticate("plain", user, passwd)]
    assert (conv.login, conv.passwd, conv.method) == (user, passwd, "plain")


@pytest.mark.parametrize("command", [
    b"a LOGIN", b"a LOGIN alice", b'a LOGIN "" secret', b"a LOGIN alice secret more",
])
def test_login_refused(imap, command):
    conv = imap(max_errors=1)
    assert conv.receive(line(command)) == [bad(b"a")]
    assert conv.login is None


# ---- AUTHENTICATE -----------------------------------------------------------------------------

def test_plain_initial_response(imap):
    conv = imap()
    assert conv.receive(b"a AUTHENTICATE PLAIN " + b64(b"\0alice\0secret") + b"\r\n") == [
        Authenticate("plain", b"alice", b"secret")]


def test_plain_continuation(imap):
    conv = imap()
    assert conv.receive(b"a AUTHENTICATE plain\r\n") == [Reply(b"+ \r\n")]
    assert conv.next_input() == ("line", None)
    assert conv.receive(b64(b"zid\0alice\0secret") + b" ignored\r\n") == [
        Authenticate("plain", b"alice", b"secret")]


@pytest.mark.parametrize("initial", [True, False])
@pytest.mark.parametrize("response,message", [
    (b"*", "client sent invalid base64 encoding in AUTH PLAIN command"),
    (b64(b"alice"), "client sent invalid login in AUTH PLAIN command"),
    (b64(b"\0alice"), "client sent invalid password in AUTH PLAIN command"),
    (b64(b"\0al\rice\0secret"), "client sent invalid login in AUTH PLAIN command"),
    (b64(b"\0alice\0sec\nret"), "client sent invalid password in AUTH PLAIN command"),
])
def test_plain_bad_response(imap, initial, response, message):
    conv = imap()
    if initial:
        out = conv.receive(b"a AUTHENTICATE PLAIN " + response + b"\r\n")
    else:
        assert conv.receive(b"a AUTHENTICATE PLAIN\r\n") == [Reply(b"+ \r\n")]
        out = conv.receive(response + b"\r\n")
    assert out == [info(message), bad(b"a")]
    assert conv.errors == 0
    assert conv.receive(b"b NOOP\r\n") == [ok(b"b")]       # back to commands


def test_plain_too_many_arguments(imap):
    assert imap().receive(b"a AUTHENTICATE PLAIN x y\r\n") == [bad(b"a")]


def test_login_mechanism(imap):
    conv = imap()
    assert conv.receive(b"a AUTHENTICATE LOGIN\r\n") == [USER_PROMPT]
    assert conv.next_input() == ("line", None)
    assert conv.receive(b64(b"alice") + b"\r\n") == [PASS_PROMPT]
    assert conv.login is None           # the log context names no login before the end
    assert conv.receive(b64(b"secret") + b"\r\n") == [Authenticate("plain", b"alice", b"secret")]
    assert conv.login == b"alice"


def test_login_mechanism_initial_response(imap):
    conv = imap()
    assert conv.receive(b"a AUTHENTICATE LOGIN " + b64(b"alice") + b"\r\n") == [PASS_PROMPT]
    assert conv.receive(b64(b"secret") + b"\r\n") == [Authenticate("plain", b"alice", b"secret")]


def test_login_mechanism_bad_username_is_untagged_without_star(imap):
    # nginx's quirk in ngx_mail_imap_auth_state: `BAD invalid command` alone
    conv = imap()
    assert conv.receive(b"a AUTHENTICATE LOGIN\r\n") == [USER_PROMPT]
    assert conv.receive(b"*\r\n") == [
        info("client sent invalid base64 encoding in AUTH LOGIN command"),
        Reply(b"BAD invalid command\r\n")]
    assert conv.receive(b"a AUTHENTICATE LOGIN\r\n") == [USER_PROMPT]
    assert conv.receive(b64(b"al\0ice") + b"\r\n") == [
        info("client sent invalid login in AUTH LOGIN command"),
        Reply(b"BAD invalid command\r\n")]


def test_login_mechanism_bad_initial_username_is_tagged(imap):
    assert imap().receive(b"a AUTHENTICATE LOGIN *\r\n") == [
        info("client sent invalid base64 encoding in AUTH LOGIN command"), bad(b"a")]


@pytest.mark.parametrize("response,message", [
    (b"*", "client sent invalid base64 encoding in AUTH LOGIN command"),
    (b64(b"sec\rret"), "client sent invalid password in AUTH LOGIN command"),
])
def test_login_mechanism_bad_password(imap, response, message):
    conv = imap()
    assert conv.receive(b"a AUTHENTICATE LOGIN " + b64(b"alice") + b"\r\n") == [PASS_PROMPT]
    assert conv.receive(response + b"\r\n") == [info(message), bad(b"a")]


def test_login_mechanism_too_many_arguments(imap):
    assert imap().receive(b"a AUTHENTICATE LOGIN x y\r\n") == [bad(b"a")]


def test_cram_md5(imap):
    conv = imap(imap_auth=["plain", "cram-md5"])
    out = conv.receive(b"a AUTHENTICATE CRAM-MD5\r\n")
    assert len(out) == 1 and type(out[0]) is Reply
    challenge = re.fullmatch(rb"\+ (\S+)\r\n", out[0].data).group(1)
    assert re.fullmatch(rb"<\d+\.\d+@mx\.example\.test>", base64.b64decode(challenge))
    assert conv.salt == base64.b64decode(challenge)
    assert conv.receive(b64(b"alice " + DIGEST) + b"\r\n") == [
        Authenticate("cram-md5", b"alice", DIGEST)]


def test_cram_md5_bad_hash(imap):
    conv = imap(imap_auth=["cram-md5"])
    conv.receive(b"a AUTHENTICATE CRAM-MD5\r\n")
    assert conv.receive(b64(b"alice short") + b"\r\n") == [
        info("client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command"), bad(b"a")]


@pytest.mark.parametrize("methods,command", [
    (["plain"], b"a AUTHENTICATE CRAM-MD5"),                      # not enabled
    (["cram-md5"], b"a AUTHENTICATE CRAM-MD5 " + b64(b"alice " + DIGEST)),   # no initial
])
def test_cram_md5_refused(imap, methods, command):
    assert imap(imap_auth=methods).receive(line(command)) == [bad(b"a")]


def test_external(imap):
    conv = imap(imap_auth=["external"])
    assert conv.receive(b"a AUTHENTICATE EXTERNAL\r\n") == [USER_PROMPT]
    assert conv.receive(b64(b"alice") + b"\r\n") == [Authenticate("external", b"alice", b"")]
    conv = imap(imap_auth=["external"])
    assert conv.receive(b"a AUTHENTICATE EXTERNAL " + b64(b"bob") + b"\r\n") == [
        Authenticate("external", b"bob", b"")]


@pytest.mark.parametrize("methods,command", [
    (["plain"], b"a AUTHENTICATE EXTERNAL"),
    (["plain"], b"a AUTHENTICATE EXTERNAL " + b64(b"alice")),    # nginx would take it
    (["external"], b"a AUTHENTICATE EXTERNAL x y"),
    (["plain"], b"a AUTHENTICATE"),
    (["plain"], b"a AUTHENTICATE GSSAPI"),
])
def test_authenticate_refused(imap, methods, command):
    assert imap(imap_auth=methods).receive(line(command)) == [bad(b"a")]


def test_external_bad_base64(imap):
    conv = imap(imap_auth=["external"])
    conv.receive(b"a AUTHENTICATE EXTERNAL\r\n")
    assert conv.receive(b"*\r\n") == [
        info("client sent invalid base64 encoding in AUTH EXTERNAL command"), bad(b"a")]


def test_sasl_line_with_cr_is_a_parser_error(imap):
    conv = imap(max_errors=2)
    conv.receive(b"a AUTHENTICATE PLAIN\r\n")
    assert conv.receive(b"ab\rc\r\n") == [bad(b"a")]
    conv.receive(b"b AUTHENTICATE PLAIN\r\n")
    assert conv.receive(b"ab\rc\r\n") == [MANY, bad(b"b"), CLOSE]


def test_sasl_line_ending_in_nonsync_literal_closes(imap):
    conv = imap()
    conv.receive(b"a AUTHENTICATE PLAIN\r\n")
    assert conv.receive(b"x\ry {5+}\r\n") == [bad(b"a"), CLOSE]


# ---- credentials with CR, LF or NUL ------------------------------------------------------------

def test_login_with_cr_in_a_literal_is_refused(imap):
    conv = imap()
    assert conv.receive(b"a LOGIN {5}\r\n") == [CONTINUE]
    assert conv.receive(b"al\rce") == []
    assert conv.receive(b" secret\r\n") == [bad(b"a")]
    assert (conv.login, conv.errors) == (None, 0)
    assert conv.receive(b"b LOGIN alice {4+}\r\n") == []
    assert conv.receive(b"s\0et") == []
    assert conv.receive(b"\r\n") == [bad(b"b")]


# ---- parser errors, max_errors and the {N+} rule ------------------------------------------------

def test_parser_errors_count_towards_max_errors(imap):
    conv = imap(max_errors=3)
    assert conv.receive(b"foo\r\n") == [bad()]                 # no tag: untagged
    assert conv.receive(b"a FOO\r\n") == [bad(b"a")]
    assert conv.receive(b"b LOGIN x\r\n") == [bad(b"b")]        # refused: not counted
    assert conv.errors == 2
    assert conv.receive(b'c LOGIN "x\r\n') == [MANY, bad(b"c"), CLOSE]


@pytest.mark.parametrize("max_errors,out", [
    (5, [bad(b"a"), CLOSE]),
    (1, [MANY, bad(b"a"), CLOSE]),
])
def test_nonsync_literal_after_error_closes(imap, max_errors, out):
    assert imap(max_errors=max_errors).receive(b"a FOO {5+}\r\n") == out


def test_untagged_nonsync_literal_error_closes(imap):
    assert imap().receive(b"* LOGIN {5+}\r\n") == [bad(), CLOSE]


# ---- too long commands ----------------------------------------------------------------------------

@pytest.mark.parametrize("data,reply", [
    (b"x" * 4096, bad()),
    (b"a LOGIN " + b"x" * 4088, bad(b"a")),
    (b"a" * 33 + b" LOGIN " + b"x" * 2000, bad()),             # not a tag: untagged
])
def test_too_long(imap, data, reply):
    conv = imap()
    assert conv.too_long(data) == [too_long(data), reply, CLOSE]


def test_too_long_continuation_line_keeps_the_tag(imap):
    conv = imap()
    conv.receive(b"t7 AUTHENTICATE PLAIN\r\n")
    assert conv.too_long(b"z" * 50) == [too_long(b"z" * 50), bad(b"t7"), CLOSE]


def test_too_long_after_a_command_has_its_own_tag(imap):
    conv = imap()
    conv.receive(b"a NOOP\r\n")
    assert conv.too_long(b"z" * 50) == [too_long(b"z" * 50), bad(), CLOSE]
    conv = imap()
    conv.receive(b"a LOGIN alice secret\r\n")
    conv.auth_failed(failure(), retry=True)
    assert conv.too_long(b"b " + b"z" * 50) == [too_long(b"b " + b"z" * 50), bad(b"b"), CLOSE]


# ---- literals --------------------------------------------------------------------------------------

def test_sync_literals(imap):
    conv = imap(imap_client_buffer=64)
    assert conv.receive(b"a LOGIN {5}\r\n") == [CONTINUE]
    assert conv.next_input() == ("bytes", 5)
    assert conv.receive(b"alice") == []
    assert conv.next_input() == ("line", 64 - 13 - 5)     # the rest of the budget
    assert conv.receive(b" {6}\r\n") == [CONTINUE]              # one `+ OK` per literal
    assert conv.next_input() == ("bytes", 6)
    assert conv.receive(b"secret") == []
    assert conv.next_input() == ("line", 64 - 13 - 5 - 6 - 6)
    assert conv.receive(b"\r\n") == [Authenticate("plain", b"alice", b"secret")]
    assert conv.next_input() == ("line", None)


def test_nonsync_literals(imap):
    conv = imap(imap_client_buffer=64)
    assert conv.receive(b"a LOGIN {5+}\r\n") == []
    assert conv.next_input() == ("bytes", 5)
    assert conv.receive(b"alice") == []
    assert conv.next_input() == ("line", 64 - 14 - 5)
    assert conv.receive(b' "secret"\r\n') == [Authenticate("plain", b"alice", b"secret")]


def test_empty_literal(imap):
    conv = imap()
    assert conv.receive(b"a LOGIN {0}\r\n") == [CONTINUE]
    assert conv.next_input() == ("line", 4096 - 13)            # no bytes to wait for
    assert conv.receive(b" secret\r\n") == [bad(b"a")]          # an empty login


def test_literal_in_id(imap):
    conv = imap()
    assert conv.receive(b'a ID ("name" {3}\r\n') == [CONTINUE]
    assert conv.receive(b"abc") == []
    assert conv.receive(b")\r\n") == [Reply(b"* ID NIL\r\na OK completed\r\n")]


def test_literal_fills_the_budget_exactly(imap):
    conv = imap(imap_client_buffer=64)
    assert conv.receive(b"a LOGIN {49}\r\n") == [CONTINUE]     # 14 + 49 + LF = 64
    assert conv.receive(b"x" * 49) == []
    assert conv.next_input() == ("line", 1)
    assert conv.receive(b"\n") == [bad(b"a")]                   # one argument


@pytest.mark.parametrize("announce", [b"{50}", b"{50+}", b"{99999999999999999999}"])
def test_literal_beyond_the_budget(imap, announce):
    conv = imap(imap_client_buffer=64)
    first = b"a LOGIN " + announce + b"\r\n"
    assert conv.receive(first) == [too_long(first), bad(b"a"), CLOSE]    # no `+ OK`


def test_second_literal_beyond_the_budget(imap):
    conv = imap(imap_client_buffer=64)
    assert conv.receive(b"a LOGIN {5}\r\n") == [CONTINUE]
    assert conv.receive(b"alice") == []
    assert conv.receive(b" {40}\r\n") == [
        too_long(b"a LOGIN {5}\r\nalice {40}\r\n"), bad(b"a"), CLOSE]


def test_line_after_a_literal_too_long(imap):
    # the session's reader found no LF within the rest of the budget
    conv = imap(imap_client_buffer=64)
    conv.receive(b"a LOGIN {5}\r\n")
    conv.receive(b"alice")
    rest = b" " + b"x" * 43
    assert conv.too_long(rest) == [too_long(b"a LOGIN {5}\r\nalice" + rest), bad(b"a"), CLOSE]


def test_parser_error_after_a_literal(imap):
    conv = imap()
    assert conv.receive(b"a LOGIN {5}\r\n") == [CONTINUE]
    assert conv.receive(b"alice") == []
    assert conv.receive(b"x secret\r\n") == [bad(b"a")]         # no space after the literal
    assert conv.errors == 1
    assert conv.next_input() == ("line", None)
    assert conv.receive(b"b NOOP\r\n") == [ok(b"b")]
    assert conv.receive(b"c LOGIN {5}\r\n") == [CONTINUE]        # a new command, a new `+ OK`


def test_nonsync_literal_then_bad_line_closes(imap):
    conv = imap()
    conv.receive(b"a LOGIN {5+}\r\n")
    conv.receive(b"alice")
    assert conv.receive(b'x {3+}\r\n') == [bad(b"a"), CLOSE]


# ---- the auth service's answer ------------------------------------------------------------------

def test_auth_failed_closes(imap):
    conv = imap()
    conv.receive(b"a7 LOGIN alice secret\r\n")
    assert conv.auth_failed(failure(b"Invalid login or password"), retry=False) == [
        Reply(b"a7 NO Invalid login or password\r\n"), CLOSE]


def test_auth_failed_retry(imap):
    conv = imap()
    conv.receive(b"a AUTHENTICATE LOGIN\r\n")
    conv.receive(b64(b"alice") + b"\r\n")
    assert conv.receive(b64(b"wrong") + b"\r\n") == [Authenticate("plain", b"alice", b"wrong")]
    assert conv.auth_failed(failure(), retry=True) == [Reply(b"a NO Temporary failure\r\n")]
    assert (conv.login, conv.passwd, conv.method) == (None, None, None)
    assert conv.next_input() == ("line", None)
    assert conv.receive(b"b LOGIN alice secret\r\n") == [
        Authenticate("plain", b"alice", b"secret")]
    assert conv.auth_failed(failure(b"No"), retry=False) == [Reply(b"b NO No\r\n"), CLOSE]


# ---- the backend login ----------------------------------------------------------------------------

PEER = Peer("192.0.2.7", 40000, ("127.0.0.1", 1143))


def logged_in(imap, command=b"a1 LOGIN alice secret", **directives):
    conv = imap(**directives)
    out = conv.receive(line(command))
    assert type(out[-1]) is Authenticate
    return conv


def run_login(login, replies):
    """Feed backend replies; the actions of each."""
    return [login.receive(r) for r in replies]


def test_backend_login(imap):
    conv = logged_in(imap)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    assert isinstance(login, ImapLogin)
    assert login.READING == "reading response from upstream"
    assert login.complete is None
    assert login.receive(b"* OK Dovecot ready.\r\n") == [
        ToBackend(b"a1 LOGIN {5}\r\n", "sending LOGIN command to upstream")]
    assert login.complete is None
    assert login.receive(b"+ OK\r\n") == [
        ToBackend(b"alice {6}\r\n", "sending user name to upstream")]
    assert login.receive(b"+ OK\r\n") == [ToBackend(b"secret\r\n", "sending password to upstream")]
    assert login.complete is backend_login_complete
    reply = b"* CAPABILITY IMAP4rev1\r\na1 OK Logged in\r\n"
    assert login.receive(reply) == [LoggedIn(reply)]


def test_backend_login_with_auth_service_credentials(imap):
    # Auth-User / Auth-Pass replace the client's; the tag stays the client's
    conv = logged_in(imap, b"x.9 AUTHENTICATE PLAIN " + b64(b"\0alice\0secret"))
    login = conv.backend_login(b"bob@example.test", b"", PEER, False)
    assert login.receive(b"* OK\r\n") == [
        ToBackend(b"x.9 LOGIN {16}\r\n", "sending LOGIN command to upstream")]
    assert login.receive(b"+\r\n") == [
        ToBackend(b"bob@example.test {0}\r\n", "sending user name to upstream")]
    assert login.receive(b"+\r\n") == [ToBackend(b"\r\n", "sending password to upstream")]


@pytest.mark.parametrize("steps,rejected,text", [
    ([], b"* BYE busy\r\n", b"* BYE busy\r\n"),
    ([b"* OK\r\n"], b"a1 NO no literals\r\n", b"a1 NO no literals\r\n"),
    ([b"* OK\r\n", b"+ OK\r\n"], b"a1 BAD\r\n", b"a1 BAD\r\n"),
    ([b"* OK\r\n", b"+ OK\r\n", b"+ OK\r\n"], b"a1 NO [AUTHENTICATIONFAILED] no\r\n",
     b"NO [AUTHENTICATIONFAILED] no\r\n"),
    ([b"* OK\r\n", b"+ OK\r\n", b"+ OK\r\n"], b"* BYE x\r\na1 NO y\r\n", b"NO y\r\n"),
    ([b"* OK\r\n", b"+ OK\r\n", b"+ OK\r\n"], b"a2 OK wrong tag\r\n", b"a2 OK wrong tag\r\n"),
])
def test_backend_login_rejected(imap, steps, rejected, text):
    login = logged_in(imap).backend_login(b"alice", b"secret", PEER, False)
    run_login(login, steps)
    with pytest.raises(BackendRejected) as e:
        login.receive(rejected)
    assert (e.value.reply, e.value.text) == (rejected, text)


ID_RE = re.compile(rb'mailproxy-id ID \("x-originating-ip" "192\.0\.2\.7" "x-originating-port" '
                   rb'"40000" "x-connected-ip" "(.*?)" "x-connected-port" "(\d+)" '
                   rb'"x-session-id" "([A-Za-z0-9_-]{16})"\)\r\n\Z')


def test_backend_id(imap):
    conv = logged_in(imap, imap_client_id=True)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    (step,) = login.receive(b"* OK\r\n")
    assert step.action == "sending ID command to upstream"
    ip, port, session_id = ID_RE.match(step.data).groups()
    assert (ip, port) == (b"127.0.0.1", b"1143")
    assert login.complete is backend_id_complete
    # whatever the backend answers (NO/BAD too), LOGIN follows
    assert login.receive(b"mailproxy-id BAD unknown\r\n") == [
        ToBackend(b"a1 LOGIN {5}\r\n", "sending LOGIN command to upstream")]
    # one session id per client connection (a retry after Auth-Wait keeps it), a new one per
    # connection
    again = conv.backend_login(b"alice", b"secret", PEER, False).receive(b"* OK\r\n")[0]
    assert ID_RE.match(again.data).group(3) == session_id
    other = logged_in(imap, imap_client_id=True).backend_login(b"a", b"b", PEER, False)
    assert ID_RE.match(other.receive(b"* OK\r\n")[0].data).group(3) != session_id


def test_backend_id_fields_from_the_peer(imap):
    conv = logged_in(imap, imap_client_id=True)
    proxied = Peer("192.0.2.7", 40000, ("127.0.0.1", 1143), ("198.51.100.1", 993))
    data = conv.backend_login(b"a", b"b", proxied, False).receive(b"* OK\r\n")[0].data
    assert ID_RE.match(data).groups()[:2] == (b"198.51.100.1", b"993")
    data = conv.backend_login(b"a", b"b", Peer(None, None), False).receive(b"* OK\r\n")[0].data
    assert data == (b'mailproxy-id ID ("x-session-id" "%s")\r\n' % conv.session_id.encode())


def test_backend_no_id_when_off(imap):
    login = logged_in(imap).backend_login(b"alice", b"secret", PEER, False)
    assert login.receive(b"* OK\r\n")[0].action == "sending LOGIN command to upstream"


@pytest.mark.parametrize("reply", [b"mpTLS OK Begin TLS\r\n",
                                   b"* CAPABILITY IMAP4rev1\r\nmpTLS OK go\r\n"])
def test_backend_starttls(imap, reply):
    login = logged_in(imap).backend_login(b"alice", b"secret", PEER, True)
    assert login.receive(b"* OK ready\r\n") == [
        ToBackend(b"mpTLS STARTTLS\r\n", "sending STARTTLS to upstream")]
    assert login.complete(b"mpTLS OK\r\n") and login.complete(b"* X\r\nmpTLS NO\r\n")
    assert not login.complete(b"* CAPABILITY IMAP4rev1\r\n")
    assert login.receive(reply) == [
        BackendStartTLS(), ToBackend(b"a1 LOGIN {5}\r\n", "sending LOGIN command to upstream")]


def test_backend_starttls_then_id(imap):
    login = logged_in(imap, imap_client_id=True).backend_login(b"alice", b"secret", PEER, True)
    login.receive(b"* OK\r\n")
    first, second = login.receive(b"mpTLS OK\r\n")
    assert first == BackendStartTLS()
    assert second.action == "sending ID command to upstream"


@pytest.mark.parametrize("reply,refused", [
    (b"mpTLS NO not here\r\n", b"mpTLS NO not here\r\n"),
    (b"* BYE x\r\nmpTLS BAD unknown\r\n", b"mpTLS BAD unknown\r\n"),
])
def test_backend_starttls_refused(imap, reply, refused):
    login = logged_in(imap).backend_login(b"alice", b"secret", PEER, True)
    login.receive(b"* OK\r\n")
    with pytest.raises(StartTLSRefused) as e:
        login.receive(reply)
    assert e.value.reply == refused


def test_backend_starttls_bad_greeting(imap):
    login = logged_in(imap).backend_login(b"alice", b"secret", PEER, True)
    with pytest.raises(BackendRejected) as e:
        login.receive(b"* BYE\r\n")
    assert e.value.reply == b"* BYE\r\n"
