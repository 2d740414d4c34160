"""IMAP's client side without sockets: ImapConversation (ngx_mail_imap_auth_state) fed lines
and literals; its actions compared exactly.  The backend login is test_imap_login.py."""

import base64
import re
from types import SimpleNamespace

import pytest

from mailproxy.conversation import CLOSE, Authenticate, Close, Log, Reply, StartTLS
from mailproxy.log import sanitize
from playbook import DIGEST, b64, imap_backend_lines as backend_lines, line
from playbook import imap_login_lines as login_lines, only, replies, started

GREETING = b"* OK IMAP4 ready\r\n"
CAPS = b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS"
CONTINUE = Reply(b"+ OK\r\n")
USER_PROMPT = Reply(b"+ VXNlcm5hbWU6\r\n")
PASS_PROMPT = Reply(b"+ UGFzc3dvcmQ6\r\n")
MANY = Log("info", "client sent too many invalid commands")


def ok(tag: bytes) -> Reply:
    return Reply(tag + b" OK completed\r\n")


def bad(tag: bytes = b"*") -> Reply:
    return Reply(tag + b" BAD invalid command\r\n")


def info(text: str) -> Log:
    return Log("info", text)


def too_long(data: bytes) -> Log:
    return info('client sent too long command "%s"' % sanitize(data, 1024))


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


@pytest.mark.parametrize("methods,words", [
    ("plain login cram-md5 external", b"AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5 AUTH=EXTERNAL"),
    ("external cram-md5", b"AUTH=CRAM-MD5 AUTH=EXTERNAL"),
    ("login", b"AUTH=LOGIN"),
])
def test_capability_per_imap_auth(conf, methods, words):
    # the directives as written in the file (nginx tokens), through their own parsers
    conv = started(conf("imap", imap_auth=methods,
                        imap_capabilities="IMAP4rev1 SASL-IR LITERAL+ ID"))
    assert conv.receive(b"t CAPABILITY\r\n") == [
        Reply(b"* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID " + words + b"\r\nt OK completed\r\n")]


def test_noop_id_logout(imap):
    conv = imap()
    assert conv.receive(b"a NOOP\r\n") == [ok(b"a")]
    assert conv.receive(b"b noop\n") == [ok(b"b")]
    assert conv.receive(b"c ID NIL\r\n") == [Reply(b"* ID NIL\r\nc OK completed\r\n")]
    assert conv.receive(b'd ID ("name" "x")\r\n') == [Reply(b"* ID NIL\r\nd OK completed\r\n")]
    assert conv.receive(b"e LOGOUT\r\n") == [Reply(b"* BYE\r\ne OK completed\r\n"), CLOSE]


def test_noop_and_logout_take_any_arguments(imap):
    conv = imap()
    assert conv.receive(b"a3 NOOP extra args here\r\n") == [ok(b"a3")]
    assert conv.receive(b"a4 LOGOUT whatever\r\n") == [Reply(b"* BYE\r\na4 OK completed\r\n"),
                                                       CLOSE]


def test_id_needs_an_argument(imap):
    conv = imap()
    assert conv.receive(b"i3 ID\r\n") == [bad(b"i3")]
    assert conv.receive(b"i4 ID NIL\r\n") == [Reply(b"* ID NIL\r\ni4 OK completed\r\n")]


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


@pytest.mark.parametrize("mode,tls", [("only", False), ("only", True), ("on", False)])
def test_starttls_modes_keep_id_and_logout(imap, mode, tls):
    conv = imap(tls=tls, starttls=mode)
    assert conv.receive(b"f ID NIL\r\n") == [Reply(b"* ID NIL\r\nf OK completed\r\n")]
    assert conv.receive(b"g LOGOUT\r\n") == [Reply(b"* BYE\r\ng OK completed\r\n"), CLOSE]


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


def test_refused_commands_are_not_parser_errors(imap):
    # refused after parsing: answered, not counted towards max_errors
    conv = imap(max_errors=2)
    for command in [b"a LOGIN alice", b"b LOGIN", b'c LOGIN "" pw', b"d LOGIN x y z",
                    b"e AUTHENTICATE", b"f AUTHENTICATE FOO", b"g AUTHENTICATE PLAIN a b",
                    b"h AUTHENTICATE CRAM-MD5", b"i AUTHENTICATE EXTERNAL", b"j STARTTLS",
                    b"k AUTHENTICATE LOGIN a b", b"l AUTHENTICATE PLAIN !!!"]:
        out = conv.receive(line(command))
        assert replies(out) == [bad(command[:1]).data], command
        assert only(out, Authenticate, Close) == [], command
    assert conv.errors == 0
    assert conv.receive(b"m NOOP\r\n") == [ok(b"m")]


def test_quoted_strings_with_escapes(imap):
    conv = imap()
    assert conv.receive(b'a6 LOGIN "al\\"ice" "p w\\\\x"\r\n') == [
        Authenticate("plain", b'al"ice', b"p w\\x")]
    assert backend_lines(conv, b'al"ice', b"p w\\x") == login_lines(b"a6 ", b'al"ice', b"p w\\x")


def test_unterminated_quote_does_not_corrupt_the_next_command(imap):
    conv = imap()
    assert conv.receive(b'a LOGIN "abc\r\n') == [bad(b"a")]
    assert conv.receive(b"c LOGIN alice secret\r\n") == [
        Authenticate("plain", b"alice", b"secret")]


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


@pytest.mark.parametrize("steps", [
    [b'p2 AUTHENTICATE PLAIN "' + b64(b"\0alice\0secret") + b'"\r\n'],
    [b"p2 AUTHENTICATE PLAIN {16+}\r\n", b64(b"\0alice\0secret"), b"\r\n"],
])
def test_plain_initial_response_quoted_or_literal(imap, steps):
    conv = imap()
    for data in steps[:-1]:
        assert conv.receive(data) == []
    assert conv.receive(steps[-1]) == [Authenticate("plain", b"alice", b"secret")]
    assert backend_lines(conv).startswith(b"p2 LOGIN {5}\r\n")


@pytest.mark.parametrize("initial", [True, False])
@pytest.mark.parametrize("response,message", [
    (b"*", "client sent invalid base64 encoding in AUTH PLAIN command"),
    (b"!!!", "client sent invalid base64 encoding in AUTH PLAIN command"),
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


def test_login_mechanism_bad_password_after_prompts_is_tagged(imap):
    conv = imap()
    assert conv.receive(b"l4 AUTHENTICATE LOGIN\r\n") == [USER_PROMPT]
    assert conv.receive(b64(b"alice") + b"\r\n") == [PASS_PROMPT]
    assert conv.receive(b"*\r\n") == [
        info("client sent invalid base64 encoding in AUTH LOGIN command"), bad(b"l4")]
    assert conv.receive(b"l5 AUTHENTICATE LOGIN !!!\r\n") == [
        info("client sent invalid base64 encoding in AUTH LOGIN command"), bad(b"l5")]
    assert conv.login is None


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


def test_cram_md5_salt_kept_for_the_connection(imap):
    conv = imap(imap_auth=["cram-md5"])
    first = conv.receive(b"c1 AUTHENTICATE CRAM-MD5\r\n")
    conv.receive(b64(b"alice short") + b"\r\n")
    assert conv.receive(b"c2 AUTHENTICATE CRAM-MD5\r\n") == [Reply(first[0].data)]
    assert conv.receive(b"*\r\n") == [
        info("client sent invalid base64 encoding in AUTH CRAM-MD5 command"), bad(b"c2")]


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


def test_sasl_line_with_cr_reaching_max_errors_closes(imap):
    conv = imap(max_errors=1)
    assert conv.receive(b"p AUTHENTICATE PLAIN\r\n") == [Reply(b"+ \r\n")]
    assert conv.receive(b"AB\rCD\r\n") == [MANY, bad(b"p"), CLOSE]


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


@pytest.mark.parametrize("data", [b"", b" NOOP", b"a*b NOOP", b"t" * 33 + b" NOOP", b"NOOP",
                                  b"\xe9 NOOP"])
def test_bad_tags_answered_untagged(imap, data):
    conv = imap()
    assert conv.receive(line(data)) == [bad()]
    assert conv.receive(b"ok NOOP\r\n") == [ok(b"ok")]


@pytest.mark.parametrize("data", [b"a SELECT INBOX", b"a ENABLE UTF8=ACCEPT", b"a AUTH PLAIN",
                                  b"a LOGIN w x y z", b"a NOOP\rx", b'a LOGIN "x'])
def test_errors_with_a_tag_are_tagged(imap, data):
    conv = imap()
    assert conv.receive(line(data)) == [bad(b"a")]
    assert conv.receive(b"b NOOP\r\n") == [ok(b"b")]


def test_bad_tag_counts_towards_max_errors(imap):
    assert imap(max_errors=1).receive(b"a*b NOOP\r\n") == [MANY, bad(), CLOSE]


@pytest.mark.parametrize("max_errors,out", [
    (5, [bad(b"a"), CLOSE]),
    (1, [MANY, bad(b"a"), CLOSE]),
])
def test_nonsync_literal_after_error_closes(imap, max_errors, out):
    assert imap(max_errors=max_errors).receive(b"a FOO {5+}\r\n") == out


def test_untagged_nonsync_literal_error_closes(imap):
    assert imap().receive(b"* LOGIN {5+}\r\n") == [bad(), CLOSE]


def test_unknown_command_with_literal(imap):
    # the {N+} rule: a rejected line announcing a non-synchronising literal closes
    assert imap().receive(b"a APPEND INBOX {11+}\r\n") == [bad(b"a"), CLOSE]
    conv = imap()
    assert conv.receive(b"a APPEND INBOX {11}\r\n") == [bad(b"a")]      # stays open
    assert conv.receive(b"b NOOP\r\n") == [ok(b"b")]



@pytest.mark.parametrize("data", [
    b"a LOGIN {abc}", b"a LOGIN {5",                            # not a literal announcement
    b"a ", b"a 1NOOP",                                          # no command word
    b"a LOG1N x",                                               # a word ending in a digit
    b"a ID (foo)", b'a ID ("x" (NIL))',                         # an ID item neither string nor NIL
    b"a ID foo", b'a ID "x"',                                   # ID neither NIL nor a list
    b"a ID NIL junk", b'a ID ("x" "y") z',                      # junk after the ID arguments
])
def test_syntax_errors_are_tagged(imap, data):
    conv = imap()
    assert conv.receive(line(data)) == [bad(b"a")]
    assert conv.errors == 1
    assert conv.receive(b"b NOOP\r\n") == [ok(b"b")]


@pytest.mark.parametrize("data", [b"a ID NIL", b"a ID nil  ", b"a ID (NIL)",
                                  b'a ID ("name" nil "version" NIL)', b"a ID ()"])
def test_id_nil_items(imap, data):
    assert imap().receive(line(data)) == [Reply(b"* ID NIL\r\na OK completed\r\n")]

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


def test_literals_of_both_kinds(imap):
    conv = imap()
    assert conv.receive(b"a1 LOGIN {5}\r\n") == [CONTINUE]
    assert conv.receive(b"alice") == []
    assert conv.receive(b" {6+}\r\n") == []                    # no `+ OK` for {N+}
    assert conv.receive(b"secret") == []
    assert conv.receive(b"\r\n") == [Authenticate("plain", b"alice", b"secret")]
    assert backend_lines(conv) == login_lines(b"a1 ")


def test_non_synchronising_literals_only(imap):
    conv = imap()
    for data in [b"b1 LOGIN {5+}\r\n", b"alice", b" {6+}\r\n", b"secret"]:
        assert conv.receive(data) == []
    assert conv.receive(b"\r\n") == [Authenticate("plain", b"alice", b"secret")]
    assert backend_lines(conv) == login_lines(b"b1 ")


def test_quoted_user_literal_password(imap):
    # the example of the project's reference transcripts
    conv = imap()
    assert conv.receive(b'a6 LOGIN "al\\"ice" {3}\r\n') == [CONTINUE]
    assert conv.receive(b"p w") == []
    assert conv.receive(b"\r\n") == [Authenticate("plain", b'al"ice', b"p w")]
    assert backend_lines(conv, b'al"ice', b"p w") == b'a6 LOGIN {6}\r\nal"ice {3}\r\np w\r\n'


def test_literal_with_a_line_break_then_junk(imap):
    conv = imap()
    assert conv.receive(b"a LOGIN {3+}\r\n") == []
    assert conv.receive(b"a\r\n") == []
    assert conv.receive(b"b pw\r\n") == [bad(b"a")]             # no space after the literal
    assert conv.receive(b"b NOOP\r\n") == [ok(b"b")]
    assert conv.login is None


def test_literals_within_a_256_byte_buffer(imap):
    conv = imap(imap_client_buffer=256)
    first = b"a LOGIN {300}\r\n"
    assert conv.receive(first) == [too_long(first), bad(b"a"), CLOSE]   # no `+ OK` first
    conv = imap(imap_client_buffer=256)
    assert conv.receive(b"b LOGIN {200}\r\n") == [CONTINUE]
    assert conv.receive(b"x" * 200) == []
    assert conv.next_input() == ("line", 256 - 15 - 200)
    assert conv.receive(b" pw\r\n") == [Authenticate("plain", b"x" * 200, b"pw")]


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



def test_line_beyond_the_budget(imap):
    # input longer than the buffer (the session's reader never hands one over) is too long
    conv = imap(imap_client_buffer=64)
    data = b"a LOGIN " + b"x" * 60 + b"\r\n"
    assert conv.receive(data) == [too_long(data), bad(b"a"), CLOSE]
    conv = imap(imap_client_buffer=64)
    assert conv.receive(b"a LOGIN {5}\r\n") == [CONTINUE]
    assert conv.receive(b"alice") == []
    assert conv.next_input() == ("line", 46)
    rest = b" " + b"y" * 50 + b"\r\n"
    assert conv.receive(rest) == [too_long(b"a LOGIN {5}\r\nalice" + rest), bad(b"a"), CLOSE]

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


def test_auth_failed_retry_after_plain(imap):
    conv = imap()
    assert conv.receive(b"a1 AUTHENTICATE PLAIN " + b64(b"\0alice\0wrong") + b"\r\n") == [
        Authenticate("plain", b"alice", b"wrong")]
    assert conv.auth_failed(failure(b"Try again"), retry=True) == [
        Reply(b"a1 NO Try again\r\n")]
    assert conv.receive(b"a2 NOOP\r\n") == [ok(b"a2")]
    assert conv.receive(b"a3 LOGIN alice secret\r\n") == [
        Authenticate("plain", b"alice", b"secret")]
    assert backend_lines(conv) == login_lines(b"a3 ")
