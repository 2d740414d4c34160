"""POP3 without sockets: Pop3Conversation (ngx_mail_pop3_auth_state) and Pop3Login
(ngx_mail_proxy_pop3_handler) fed lines and replies, their actions compared exactly."""

import base64
import hashlib
import hmac
import re
import time

import pytest

from mailproxy import auth_http, config
from mailproxy.clientio import BackendRejected
from mailproxy.conversation import (CLOSE, Authenticate, BackendStartTLS, LoggedIn, Log, Peer,
                                    Reply, StartTLS, StartTLSRefused, ToBackend)
from mailproxy.pop3 import Pop3Conversation, Pop3Login, parse_command
from playbook import auth_fail, closing, logs, only, play, replies, reply

OK = b"+OK\r\n"
INVALID = b"-ERR invalid command\r\n"
BAD = reply(INVALID)
SALTED = re.compile(rb"\+OK POP3 ready (<\d+\.\d+@mx\.example\.test>)\r\n\Z")
DIGEST = b"0123456789abcdef0123456789abcdef"
CAPA_HEAD = b"+OK Capability list follows\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def line(text) -> bytes:
    return (text.encode() if isinstance(text, str) else text) + b"\r\n"


@pytest.fixture
def pop3(conf):
    """pop3(tls=False, **directives) -> a Pop3Conversation past its greeting."""
    def make(tls=False, **directives):
        conv = Pop3Conversation(conf("pop3", **directives), tls=tls)
        conv.start()
        return conv
    return make


def say(conv, text):
    return conv.receive(line(text))


def auth_request(conv) -> list:
    """The header lines of the auth service's request after an Authenticate action, built as
    Session.authenticate builds it from the conversation (method, login, password, salt and
    auth_request_fields()); the request line and the closing blank line left out."""
    req = auth_http.AuthRequest(method=conv.method, user=conv.login or b"",
                                passwd=conv.passwd or b"", salt=conv.salt, protocol="pop3",
                                attempt=1, client_ip="127.0.0.1")
    for name, value in conv.auth_request_fields().items():
        setattr(req, name, value)
    return auth_http.build_request(conv.conf.auth_http[0], req).split(b"\r\n")[1:-2]


def backend_lines(login: Pop3Login) -> list:
    """The lines a Pop3Login sends to a backend answering +OK at every step."""
    actions = []
    for _ in range(3):
        actions += login.receive(b"+OK\r\n")
    return [a.data for a in only(actions, ToBackend)]


# ---- greeting ---------------------------------------------------------------------------

def test_greeting_without_salt(conf):
    conv = Pop3Conversation(conf("pop3"))
    assert conv.start() == reply(b"+OK POP3 ready\r\n")
    assert conv.salt is None


@pytest.mark.parametrize("methods", ["plain apop", "cram-md5", "apop cram-md5 external"])
def test_greeting_with_salt(conf, methods):
    c = conf("pop3", pop3_auth=methods)
    one, two = Pop3Conversation(c), Pop3Conversation(c)
    greetings = [replies(conv.start()) for conv in (one, two)]
    salts = []
    for conv, g in zip((one, two), greetings):
        assert len(g) == 1
        m = SALTED.match(g[0])
        assert m, g
        assert conv.salt == m.group(1)      # the salt the auth service gets (Auth-Salt)
        salts.append(conv.salt)
    assert salts[0] != salts[1]


def test_greeting_salt_fields(conf):
    # nginx's ngx_mail_salt: <random below 2^31 . unix time @ server_name>
    before = int(time.time())
    conv = Pop3Conversation(conf("pop3", pop3_auth="apop"))
    greeting = replies(conv.start())[0]
    after = int(time.time())
    m = re.fullmatch(rb"\+OK POP3 ready <(\d+)\.(\d+)@([^>]*)>\r\n", greeting)
    assert m, greeting
    assert 0 <= int(m.group(1)) <= 2 ** 31 - 1
    assert before - 1 <= int(m.group(2)) <= after + 1
    assert m.group(3) == b"mx.example.test"


def test_buffer_and_input(pop3):
    conv = pop3()
    assert conv.buffer_size() == 128 and conv.next_input() == ("line", None)


# ---- USER / PASS --------------------------------------------------------------------------

def test_user_pass(pop3):
    conv = pop3()
    play(conv, [
        (b"USER bob\r\n", reply(OK)),
        (b"PASS secret\r\n", [Authenticate("plain", b"bob", b"secret")]),
    ])
    assert (conv.method, conv.login, conv.passwd, conv.state) == ("plain", b"bob", b"secret",
                                                                   "start")


def test_verbs_are_case_insensitive_and_bare_lf_ends_a_line(pop3):
    play(pop3(), [(b"user bob\n", reply(OK)),
                  (b"pAsS pw\n", [Authenticate("plain", b"bob", b"pw")])])


def test_user_and_pass_keep_inner_and_trailing_spaces(pop3):
    play(pop3(), [
        (b"USER   bob smith \r\n", reply(OK)),
        (b"PASS  pass word \r\n", [Authenticate("plain", b"bob smith ", b"pass word ")]),
    ])


def test_user_pass_spaces_reach_auth_request_and_backend(pop3):
    conv = pop3()
    play(conv, [(b"user  bob  \r\n", reply(OK)),
                (b"PASS p w \r\n", [Authenticate("plain", b"bob  ", b"p w ")])])
    assert auth_request(conv)[1:4] == [b"Auth-Method: plain", b"Auth-User: bob%20%20",
                                       b"Auth-Pass: p%20w%20"]
    assert backend_lines(conv.backend_login(conv.login, conv.passwd, Peer("127.0.0.1", 4242),
                                            False)) == [b"USER bob  \r\n", b"PASS p w \r\n"]


def test_user_pass_with_bare_lf_reach_the_backend_with_crlf(pop3):
    conv = pop3()
    play(conv, [(b"NOOP\n", reply(OK)), (b"USER alice\n", reply(OK)),
                (b"PASS secret\n", [Authenticate("plain", b"alice", b"secret")])])
    assert auth_request(conv) == [
        b"Host: localhost", b"Auth-Method: plain", b"Auth-User: alice", b"Auth-Pass: secret",
        b"Auth-Protocol: pop3", b"Auth-Login-Attempt: 1", b"Client-IP: 127.0.0.1"]
    assert backend_lines(Pop3Login(conv.login, conv.passwd)) == [b"USER alice\r\n",
                                                                  b"PASS secret\r\n"]


def test_pass_before_user_is_refused(pop3):
    assert say(pop3(), "PASS secret") == BAD


@pytest.mark.parametrize("verb", ["USER alice", "APOP bob " + DIGEST.decode(), "AUTH", "STLS",
                                  "AUTH PLAIN"])
def test_only_pass_capa_quit_noop_after_user(pop3, verb):
    conv = pop3(pop3_auth="plain apop", starttls="on")
    say(conv, "USER bob")
    assert say(conv, verb) == BAD
    # the refusal puts the conversation back to the start: PASS is refused now
    assert conv.state == "start"
    assert say(conv, "PASS secret") == BAD


def test_noop_and_capa_keep_the_user(pop3):
    conv = pop3()
    play(conv, [
        (b"USER bob\r\n", reply(OK)),
        (b"NOOP\r\n", reply(OK)),
        (b"CAPA\r\n", reply(CAPA_HEAD + b"TOP\r\nUSER\r\nUIDL\r\nSASL PLAIN LOGIN\r\n.\r\n")),
        (b"PASS pw\r\n", [Authenticate("plain", b"bob", b"pw")]),
    ])


def test_quit_after_user(pop3):
    conv = pop3()
    say(conv, "USER bob")
    assert say(conv, "QUIT") == closing(OK)


@pytest.mark.parametrize("text", ["USER", "USER   "])
def test_user_without_name(pop3, text):
    assert say(pop3(), text) == BAD


def test_pass_without_password(pop3):
    conv = pop3()
    say(conv, "USER bob")
    assert say(conv, "PASS") == BAD
    assert conv.state == "start"


def test_user_refused_under_starttls_only_until_tls(pop3):
    conv = pop3(starttls="only")
    assert say(conv, "USER bob") == BAD
    assert conv.tls_started() == []
    assert say(conv, "USER bob") == reply(OK)


# ---- CR, LF, NUL in credentials ----------------------------------------------------------

def test_nul_in_user_is_refused(pop3):
    conv = pop3()
    assert conv.receive(b"USER b\x00b\r\n") == BAD
    assert conv.login is None and conv.state == "start"


def test_nul_in_pass_is_refused(pop3):
    conv = pop3()
    say(conv, "USER bob")
    assert conv.receive(b"PASS p\x00w\r\n") == BAD
    assert conv.state == "start" and conv.passwd is None


def test_cr_inside_a_line_is_a_parser_error(pop3):
    conv = pop3()
    assert conv.receive(b"USER b\rob\r\n") == BAD
    assert conv.errors == 1


@pytest.mark.parametrize("login, passwd, what", [
    (b"bo\rb", b"pw", "login"), (b"bo\nb", b"pw", "login"),
    (b"bob", b"p\rw", "password"), (b"bob", b"p\nw", "password"), (b"bob", b"p\x00w", "password"),
])
def test_control_bytes_in_auth_plain(pop3, login, passwd, what):
    conv = pop3()
    got = conv.receive(b"AUTH PLAIN " + b64(b"\x00" + login + b"\x00" + passwd) + b"\r\n")
    assert got == [Log("info", "client sent invalid %s in AUTH PLAIN command" % what),
                   Reply(INVALID)]
    assert conv.errors == 0         # refused after parsing: not a parser error


@pytest.mark.parametrize("mech, first, second, message", [
    ("LOGIN", b"bo\x00b", None, "client sent invalid login in AUTH LOGIN command"),
    ("LOGIN", b"bob", b"p\r\nw", "client sent invalid password in AUTH LOGIN command"),
    ("EXTERNAL", b"bo\nb", None, "client sent invalid login in AUTH EXTERNAL command"),
])
def test_control_bytes_in_auth_login_and_external(pop3, mech, first, second, message):
    conv = pop3(pop3_auth="plain external")
    if second is None:
        got = say(conv, b"AUTH " + mech.encode() + b" " + b64(first))
    else:
        assert say(conv, b"AUTH " + mech.encode() + b" " + b64(first)) == \
            reply(b"+ UGFzc3dvcmQ6\r\n")
        got = conv.receive(b64(second) + b"\r\n")
    assert got == [Log("info", message), Reply(INVALID)]


@pytest.mark.parametrize("steps", [
    [b"AUTH PLAIN " + b64(b"\0ali\r\nce\0sec\nret")],
    [b"AUTH PLAIN " + b64(b"\0alice\0secret\r\nQUIT")],
    [b"AUTH PLAIN " + b64(b"\0alice\0sec\0ret")],
    [b"AUTH LOGIN " + b64(b"alice\r\nDELE 1"), b64(b"secret")],
    [b"AUTH LOGIN", b64(b"alice"), b64(b"se\ncret\r\nRSET")],
    [b"USER al\x00ice", b"PASS secret"],
])
def test_control_bytes_never_reach_auth_or_backend(pop3, steps):
    # refused by the conversation itself: no Authenticate, so no auth request, no backend
    conv = pop3()
    actions = []
    for step in steps:
        got = conv.receive(step + b"\r\n")
        actions += got
    assert replies(got) == [INVALID]
    assert only(actions, Authenticate) == []
    assert say(conv, "NOOP") == reply(OK)


def test_control_bytes_in_apop_name(pop3):
    conv = pop3(pop3_auth="apop")
    assert conv.receive(b"APOP b\x00b " + DIGEST + b"\r\n") == BAD


# ---- APOP ---------------------------------------------------------------------------------

def test_apop(pop3):
    conv = pop3(pop3_auth="plain apop")
    assert say(conv, b"APOP bob " + DIGEST) == [Authenticate("apop", b"bob", DIGEST)]
    assert conv.salt is not None


def test_apop_auth_request_carries_the_greeting_salt(conf):
    conv = Pop3Conversation(conf("pop3", pop3_auth="plain apop"))
    salt = SALTED.match(replies(conv.start())[0]).group(1)
    digest = hashlib.md5(salt + b"secret").hexdigest().encode()
    assert say(conv, b"APOP alice " + digest) == [Authenticate("apop", b"alice", digest)]
    assert auth_request(conv) == [
        b"Host: localhost", b"Auth-Method: apop", b"Auth-User: alice", b"Auth-Pass: " + digest,
        b"Auth-Salt: " + salt, b"Auth-Protocol: pop3", b"Auth-Login-Attempt: 1",
        b"Client-IP: 127.0.0.1"]


@pytest.mark.parametrize("methods, tls, text", [
    ("plain", False, "APOP bob " + DIGEST.decode()),          # not enabled
    ("apop", False, "APOP bob"),                               # one argument
    ("apop", False, "APOP bob %s x" % DIGEST.decode()),        # three
])
def test_apop_refused(pop3, methods, tls, text):
    assert say(pop3(tls=tls, pop3_auth=methods), text) == BAD


def test_apop_under_starttls_only(pop3):
    conv = pop3(pop3_auth="apop", starttls="only")
    assert say(conv, b"APOP bob " + DIGEST) == BAD
    conv.tls_started()
    assert say(conv, b"APOP bob " + DIGEST) == [Authenticate("apop", b"bob", DIGEST)]


# ---- CAPA ---------------------------------------------------------------------------------

def capa(*lines):
    return reply(CAPA_HEAD + b"".join(x + b"\r\n" for x in lines) + b".\r\n")


@pytest.mark.parametrize("starttls, tls, lines", [
    ("off", False, [b"TOP", b"USER", b"UIDL", b"SASL PLAIN LOGIN"]),
    ("off", True, [b"TOP", b"USER", b"UIDL", b"SASL PLAIN LOGIN"]),
    ("on", False, [b"TOP", b"USER", b"UIDL", b"SASL PLAIN LOGIN", b"STLS"]),
    ("on", True, [b"TOP", b"USER", b"UIDL", b"SASL PLAIN LOGIN"]),
    ("only", False, [b"TOP", b"UIDL", b"STLS"]),
    ("only", True, [b"TOP", b"USER", b"UIDL", b"SASL PLAIN LOGIN"]),
])
def test_capa_per_starttls_mode(pop3, starttls, tls, lines):
    assert say(pop3(tls=tls, starttls=starttls), "CAPA") == capa(*lines)


def test_capa_after_starttls_handshake(pop3):
    conv = pop3(starttls="only")
    assert say(conv, "STLS") == [StartTLS(OK)]
    conv.tls_started()
    assert say(conv, "CAPA") == capa(b"TOP", b"USER", b"UIDL", b"SASL PLAIN LOGIN")


def test_capa_after_user_has_no_stls(pop3):
    conv = pop3(starttls="on")
    say(conv, "USER bob")
    assert say(conv, "CAPA") == capa(b"TOP", b"USER", b"UIDL", b"SASL PLAIN LOGIN")


@pytest.mark.parametrize("methods, sasl_line", [
    (None, b"SASL PLAIN LOGIN"),                # the default: plain
    ("plain", b"SASL PLAIN LOGIN"),
    ("apop", b"SASL"),
    ("cram-md5", b"SASL CRAM-MD5"),
    ("external plain", b"SASL PLAIN LOGIN EXTERNAL"),
    ("external cram-md5 apop plain", b"SASL PLAIN LOGIN CRAM-MD5 EXTERNAL"),
])
def test_capa_per_pop3_auth(pop3, methods, sasl_line):
    conv = pop3() if methods is None else pop3(pop3_auth=methods)
    assert say(conv, "CAPA") == capa(b"TOP", b"USER", b"UIDL", sasl_line)


def test_capa_with_quoted_capability(pop3):
    conv = pop3(pop3_capabilities='UIDL "EXPIRE 30" PIPELINING', pop3_auth="plain cram-md5")
    assert say(conv, "capa") == capa(b"UIDL", b"EXPIRE 30", b"PIPELINING",
                                     b"SASL PLAIN LOGIN CRAM-MD5")


def test_capa_inherited_from_mail_section(tmp_path):
    path = tmp_path / "inherit.ini"
    path.write_text("[mail]\npop3_capabilities = TOP UIDL\npop3_auth = plain external\n\n"
                    "[server unit]\nlisten = 127.0.0.1:110\nprotocol = pop3\n"
                    "auth_http = unix:%s:/auth\n" % (tmp_path / "auth.sock"))
    conv = Pop3Conversation(config.load(str(path)).servers[0])
    conv.start()
    assert say(conv, "CAPA") == capa(b"TOP", b"UIDL", b"SASL PLAIN LOGIN EXTERNAL")


def test_capa_with_own_capabilities_drops_any_user_under_starttls_only(pop3):
    conv = pop3(pop3_capabilities="TOP user UIDL", starttls="only")
    assert say(conv, "CAPA") == capa(b"TOP", b"UIDL", b"STLS")
    conv = pop3(pop3_capabilities="TOP user UIDL")
    assert say(conv, "CAPA") == capa(b"TOP", b"user", b"UIDL", b"SASL PLAIN LOGIN")


def test_capa_ignores_arguments(pop3):
    assert say(pop3(), "CAPA x y z") == capa(b"TOP", b"USER", b"UIDL", b"SASL PLAIN LOGIN")


# ---- NOOP, QUIT ---------------------------------------------------------------------------

def test_noop(pop3):
    conv = pop3()
    assert say(conv, "NOOP") == reply(OK)
    assert say(conv, "noop") == reply(OK)


@pytest.mark.parametrize("text", ["QUIT", "quit"])
def test_quit(pop3, text):
    assert say(pop3(), text) == [Reply(OK), CLOSE]


# ---- STLS ---------------------------------------------------------------------------------

@pytest.mark.parametrize("starttls", ["on", "only"])
def test_stls(pop3, starttls):
    conv = pop3(starttls=starttls)
    assert say(conv, "STLS") == [StartTLS(OK)]
    assert conv.tls is False                # until the session reports the handshake
    assert conv.tls_started() == []
    assert conv.tls is True
    assert say(conv, "STLS") == BAD         # TLS is active now


@pytest.mark.parametrize("starttls, tls", [("off", False), ("on", True), ("only", True)])
def test_stls_refused(pop3, starttls, tls):
    assert say(pop3(tls=tls, starttls=starttls), "STLS") == BAD


# ---- AUTH ---------------------------------------------------------------------------------

@pytest.mark.parametrize("methods, listed", [
    ("plain", [b"PLAIN", b"LOGIN"]),
    ("apop", []),
    ("cram-md5", [b"CRAM-MD5"]),
    ("external", [b"EXTERNAL"]),
    ("external cram-md5 apop plain", [b"PLAIN", b"LOGIN", b"CRAM-MD5", b"EXTERNAL"]),
    ("apop cram-md5 external plain", [b"PLAIN", b"LOGIN", b"CRAM-MD5", b"EXTERNAL"]),
])
def test_auth_lists_mechanisms(pop3, methods, listed):
    conv = pop3(pop3_auth=methods)
    assert say(conv, "AUTH") == reply(
        b"+OK methods supported:\r\n" + b"".join(m + b"\r\n" for m in listed) + b".\r\n")
    assert say(conv, "NOOP") == reply(OK)


def test_auth_refused_under_starttls_only(pop3):
    conv = pop3(starttls="only")
    assert say(conv, "AUTH") == BAD
    assert say(conv, b"AUTH PLAIN " + b64(b"\x00bob\x00pw")) == BAD
    conv.tls_started()
    assert say(conv, "AUTH") == reply(b"+OK methods supported:\r\nPLAIN\r\nLOGIN\r\n.\r\n")


def test_auth_plain_initial_response(pop3):
    conv = pop3()
    assert say(conv, b"AUTH PLAIN " + b64(b"authz\x00bob\x00secret")) == \
        [Authenticate("plain", b"bob", b"secret")]


@pytest.mark.parametrize("methods", ["plain", "apop"])     # taken even when not advertised
@pytest.mark.parametrize("text", ["AUTH PLAIN {}", "auth plain {}", "AUTH PLAIN  {}"])
def test_auth_plain_initial_response_auth_request(pop3, methods, text):
    conv = pop3(pop3_auth=methods)
    assert say(conv, text.format(b64(b"\0alice\0secret").decode())) == \
        [Authenticate("plain", b"alice", b"secret")]
    # no Auth-Salt for PLAIN, even when APOP put a salt in the greeting
    assert auth_request(conv)[1:5] == [b"Auth-Method: plain", b"Auth-User: alice",
                                       b"Auth-Pass: secret", b"Auth-Protocol: pop3"]


def test_auth_plain_two_steps_with_authzid(pop3):
    play(pop3(), [(b"AUTH PLAIN\r\n", reply(b"+ \r\n")),
                  (b64(b"admin\0alice\0secret") + b"\r\n",
                   [Authenticate("plain", b"alice", b"secret")])])


def test_auth_plain_challenge(pop3):
    # PLAIN and LOGIN are taken whatever pop3_auth lists, as nginx's ngx_mail_pop3_auth
    play(pop3(pop3_auth="apop"), [
        (b"auth plain\r\n", reply(b"+ \r\n")),
        (b64(b"\x00bob\x00secret") + b" ignored\r\n", [Authenticate("plain", b"bob", b"secret")]),
    ])


def test_auth_login_initial_response(pop3):
    play(pop3(), [
        (b"AUTH LOGIN " + b64(b"bob") + b"\r\n", reply(b"+ UGFzc3dvcmQ6\r\n")),
        (b64(b"secret") + b"\r\n", [Authenticate("plain", b"bob", b"secret")]),
    ])


def test_auth_login_challenges(pop3):
    conv = pop3()
    play(conv, [
        (b"AUTH LOGIN\r\n", reply(b"+ VXNlcm5hbWU6\r\n")),
        (b64(b"bob") + b"\r\n", reply(b"+ UGFzc3dvcmQ6\r\n")),
        (b64(b"secret") + b"\n", [Authenticate("plain", b"bob", b"secret")]),
    ])
    assert conv.expect is None


def test_auth_cram_md5(pop3):
    conv = pop3(pop3_auth="cram-md5")
    got = say(conv, "AUTH CRAM-MD5")
    assert got == reply(b"+ " + base64.b64encode(conv.salt) + b"\r\n")
    assert conv.receive(b64(b"bob " + DIGEST) + b"\r\n") == \
        [Authenticate("cram-md5", b"bob", DIGEST)]


def test_auth_cram_md5_auth_request_carries_the_salt(conf):
    conv = Pop3Conversation(conf("pop3", pop3_auth="plain cram-md5"))
    salt = SALTED.match(replies(conv.start())[0]).group(1)
    challenge = replies(say(conv, "AUTH CRAM-MD5"))[0]
    assert challenge == b"+ " + b64(salt) + b"\r\n"
    assert base64.b64decode(challenge[2:-2]) == salt
    digest = hmac.new(b"secret", salt, hashlib.md5).hexdigest().encode()
    assert conv.receive(b64(b"alice " + digest) + b"\r\n") == \
        [Authenticate("cram-md5", b"alice", digest)]
    assert auth_request(conv)[1:6] == [b"Auth-Method: cram-md5", b"Auth-User: alice",
                                       b"Auth-Pass: " + digest, b"Auth-Salt: " + salt,
                                       b"Auth-Protocol: pop3"]


def test_auth_cram_md5_without_greeting_salt_makes_one(conf):
    conv = Pop3Conversation(conf("pop3", pop3_auth="cram-md5"))
    got = replies(say(conv, "AUTH CRAM-MD5"))
    assert conv.salt is not None and re.fullmatch(rb"<\d+\.\d+@mx\.example\.test>", conv.salt)
    assert got == [b"+ " + base64.b64encode(conv.salt) + b"\r\n"]


@pytest.mark.parametrize("methods, text", [
    ("plain", "AUTH CRAM-MD5"),                 # not enabled
    ("cram-md5", "AUTH CRAM-MD5 Ym9i"),         # no initial response in CRAM-MD5
    ("plain", "AUTH EXTERNAL"),                 # not enabled
    ("plain", "AUTH EXTERNAL Ym9i"),
    ("plain", "AUTH GSSAPI"),                   # unknown mechanism
    ("plain", "AUTH PLAIN a b"),                # three arguments
    ("plain apop", "AUTH CRAM-MD5"),            # a salt exists, yet CRAM-MD5 is not enabled
    ("plain apop", "AUTH EXTERNAL"),
    ("plain apop", "AUTH EXTERNAL YWxpY2U="),
    ("plain apop", "AUTH FOO"),
    ("plain apop", "AUTH XOAUTH2 abc"),
])
def test_auth_refused(pop3, methods, text):
    conv = pop3(pop3_auth=methods)
    assert say(conv, text) == BAD
    assert conv.errors == 0 and conv.expect is None


def test_auth_external(pop3):
    play(pop3(pop3_auth="external"), [
        (b"AUTH EXTERNAL\r\n", reply(b"+ VXNlcm5hbWU6\r\n")),
        (b64(b"bob") + b"\r\n", [Authenticate("external", b"bob", b"")]),
    ])
    assert say(pop3(pop3_auth="external"), b"AUTH EXTERNAL " + b64(b"bob")) == \
        [Authenticate("external", b"bob", b"")]


@pytest.mark.parametrize("steps", [
    [(b"AUTH EXTERNAL " + b64(b"alice"), None)],
    [(b"AUTH EXTERNAL", reply(b"+ VXNlcm5hbWU6\r\n")), (b64(b"alice"), None)],
])
def test_auth_external_auth_request_has_empty_pass_and_no_salt(pop3, steps):
    # apop too: a salt exists, yet EXTERNAL sends no Auth-Salt (current nginx, 1.29.1+)
    conv = pop3(pop3_auth="plain apop external")
    assert conv.salt is not None
    play(conv, [(data + b"\r\n", expected or [Authenticate("external", b"alice", b"")])
                for data, expected in steps])
    assert auth_request(conv)[1:6] == [b"Auth-Method: external", b"Auth-User: alice",
                                       b"Auth-Pass: ", b"Auth-Protocol: pop3",
                                       b"Auth-Login-Attempt: 1"]


@pytest.mark.parametrize("mech, methods", [("PLAIN", "plain"), ("LOGIN", "plain"),
                                           ("CRAM-MD5", "cram-md5"), ("EXTERNAL", "external")])
@pytest.mark.parametrize("response", [b"*", b"Ym9i!", b"Y"])   # cancel, bad byte, 4n+1 long
def test_bad_base64_in_a_response(pop3, mech, methods, response):
    conv = pop3(pop3_auth=methods)
    assert len(say(conv, "AUTH " + mech)) == 1
    assert conv.receive(response + b"\r\n") == [
        Log("info", "client sent invalid base64 encoding in AUTH %s command" % mech),
        Reply(INVALID)]
    assert conv.expect is None and conv.errors == 0
    assert say(conv, "NOOP") == reply(OK)       # an ordinary command again


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "EXTERNAL"])
def test_bad_base64_in_an_initial_response(pop3, mech):
    conv = pop3(pop3_auth="plain external")
    assert say(conv, "AUTH %s ***" % mech) == [
        Log("info", "client sent invalid base64 encoding in AUTH %s command" % mech),
        Reply(INVALID)]


def test_bad_base64_in_the_login_password(pop3):
    conv = pop3()
    say(conv, b"AUTH LOGIN " + b64(b"bob"))
    assert say(conv, "!!") == [
        Log("info", "client sent invalid base64 encoding in AUTH LOGIN command"), Reply(INVALID)]


@pytest.mark.parametrize("plain, message", [
    (b"bob", "client sent invalid login in AUTH PLAIN command"),            # no NUL
    (b"\x00", "client sent invalid login in AUTH PLAIN command"),           # nothing after it
    (b"\x00bob", "client sent invalid password in AUTH PLAIN command"),     # one NUL
])
def test_malformed_auth_plain(pop3, plain, message):
    assert say(pop3(), b"AUTH PLAIN " + b64(plain)) == [Log("info", message), Reply(INVALID)]


@pytest.mark.parametrize("text, message", [
    (b"bob", "client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command"),
    (b"bob " + DIGEST[:-1], "client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command"),
    (b"b\x00b " + DIGEST, "client sent invalid login in AUTH CRAM-MD5 command"),
])
def test_malformed_cram_md5(pop3, text, message):
    conv = pop3(pop3_auth="cram-md5")
    say(conv, "AUTH CRAM-MD5")
    assert conv.receive(b64(text) + b"\r\n") == [Log("info", message), Reply(INVALID)]


def test_cr_inside_a_sasl_response_is_a_parser_error(pop3):
    conv = pop3(max_errors="1")
    say(conv, "AUTH PLAIN")
    assert conv.receive(b"AGJv\rYgBw\r\n") == [
        Log("info", "client sent too many invalid commands"), Reply(INVALID), CLOSE]


def test_a_sasl_response_is_not_a_command(pop3):
    conv = pop3()
    say(conv, "AUTH LOGIN")
    # "QUIT" is taken as the base64 username, not as a command
    assert say(conv, "QUIT") == reply(b"+ UGFzc3dvcmQ6\r\n")
    assert conv.sasl_user == base64.b64decode(b"QUIT")


# ---- parser errors, max_errors, unknown commands -------------------------------------------

@pytest.mark.parametrize("raw", [
    b"LIST\r\n",                # a POP3 command nginx does not know before login
    b"RETR 1\r\n",
    b"USERS bob\r\n",           # a word of five letters
    b"US3R bob\r\n",
    b"\r\n",
    b" USER bob\r\n",
    b"AUTH a b c d\r\n",        # more than three arguments
    b"CAPA a b c d\r\n",
    b"NOOP\rx\r\n",
    b"NO\rOP\r\n",           # a CR not followed by LF
    b"STAT\r\n", b"TOP 1 1\r\n", b"UIDL\r\n", b"NOOPX\r\n", b"FOO\r\n", b"XY\r\n",
])
def test_parser_errors(pop3, raw):
    conv = pop3()
    assert conv.receive(raw) == BAD
    assert conv.errors == 1
    assert say(conv, "NOOP") == reply(OK)


def test_a_parser_error_resets_the_user(pop3):
    conv = pop3()
    say(conv, "USER bob")
    assert say(conv, "LIST") == BAD
    assert say(conv, "PASS pw") == BAD


def test_max_errors(pop3):
    conv = pop3(max_errors="3")
    assert say(conv, "LIST") == BAD
    assert say(conv, "XYZZY") == BAD
    assert say(conv, "LIST") == [Log("info", "client sent too many invalid commands"),
                                 Reply(INVALID), CLOSE]


def test_max_errors_default_is_5(pop3):
    conv = pop3()
    for _ in range(4):
        assert say(conv, "FOO") == BAD
    assert say(conv, "NOOP") == reply(OK)
    assert say(conv, "FOO") == [Log("info", "client sent too many invalid commands"),
                                Reply(INVALID), CLOSE]


def test_max_errors_fourth_argument_is_a_parser_error(pop3):
    assert say(pop3(max_errors="1", pop3_auth="plain apop"), "APOP a b c d") == [
        Log("info", "client sent too many invalid commands"), Reply(INVALID), CLOSE]


def test_refused_commands_do_not_count_towards_max_errors(pop3):
    conv = pop3(max_errors="2")
    for _ in range(5):
        assert say(conv, "AUTH GSSAPI") == BAD
        assert say(conv, "PASS x") == BAD
    assert conv.errors == 0
    assert say(conv, "LIST") == BAD
    assert say(conv, "LIST") == [Log("info", "client sent too many invalid commands"),
                                 Reply(INVALID), CLOSE]


def test_too_long(pop3):
    conv = pop3()
    data = b"USER " + b"a\x01:" * 41
    assert conv.too_long(data) == [
        Log("info", 'client sent too long command "USER %s"' % ("a\\x01:" * 40 + "a\\x01\\x3a")),
        Reply(INVALID), CLOSE]


def test_parse_command():
    assert parse_command(b"apop a  b\r\n") == ("APOP", [b"a", b"b"])
    assert parse_command(b"AUTH a b c\r\n") == ("AUTH", [b"a", b"b", b"c"])
    assert parse_command(b"AUTH a b c d\r\n") is None
    assert parse_command(b"USER a b c d e\n") == ("USER", [b"a b c d e"])
    assert parse_command(b"PASS\r\n") == ("PASS", [])
    assert parse_command(b"STAT\r\n") is None
    assert parse_command(b"US\xc4R x\r\n") is None
    assert parse_command(b"QUIT\rx\n") is None


# ---- the auth service's answer ------------------------------------------------------------

def test_auth_failed_with_retry_resets_the_conversation(pop3):
    conv = pop3()
    say(conv, "USER bob")
    say(conv, "PASS wrong")
    assert conv.auth_failed(auth_fail(b"Invalid login or password"), retry=True) == \
        reply(b"-ERR Invalid login or password\r\n")
    assert (conv.state, conv.login, conv.passwd, conv.method, conv.expect) == \
        ("start", None, None, None, None)
    assert say(conv, "PASS secret") == BAD          # USER first again
    play(conv, [(b"USER bob\r\n", reply(OK)),
                (b"PASS secret\r\n", [Authenticate("plain", b"bob", b"secret")])])


def test_auth_failed_without_retry_closes(pop3):
    conv = pop3()
    say(conv, b"AUTH PLAIN " + b64(b"\x00bob\x00pw"))
    assert conv.auth_failed(auth_fail(b"Temporary failure"), retry=False) == \
        closing(b"-ERR Temporary failure\r\n")


# ---- backend login (ngx_mail_proxy_pop3_handler) --------------------------------------------

def test_backend_login_from_the_conversation(pop3):
    login = pop3().backend_login(b"bob", b"pw", Peer("192.0.2.1", 4242), starttls=True)
    assert isinstance(login, Pop3Login)
    assert (login.user, login.passwd, login.starttls, login.state) == (b"bob", b"pw", True,
                                                                        "greeting")


def test_backend_login():
    login = Pop3Login(b"bob", b"secret")
    assert login.complete is None and login.READING == "reading response from upstream"
    play(login, [
        (b"+OK POP3 backend ready\r\n",
         [ToBackend(b"USER bob\r\n", "sending user name to upstream")]),
        (b"+OK\r\n", [ToBackend(b"PASS secret\r\n", "sending password to upstream")]),
        (b"+OK logged in\r\n", [LoggedIn(b"+OK logged in\r\n")]),
    ])


def test_backend_pass_reply_goes_to_the_client_as_sent():
    login = Pop3Login(b"alice", b"secret")
    login.receive(b"+OK ready\r\n")
    login.receive(b"+OK\r\n")
    own = b"+OK [XYZ] Maildrop has 7 messages (42 octets)\r\n"
    assert login.receive(own) == [LoggedIn(own)]


@pytest.mark.parametrize("steps", [0, 1, 2])
def test_backend_rejects(steps):
    login = Pop3Login(b"bob", b"secret")
    for _ in range(steps):
        login.receive(b"+OK\r\n")
    state = login.state
    with pytest.raises(BackendRejected) as e:
        login.receive(b"-ERR [AUTH] no\r\n")
    assert state == ["greeting", "user", "pass"][steps]
    assert e.value.reply == e.value.text == b"-ERR [AUTH] no\r\n"


def test_backend_login_with_stls():
    login = Pop3Login(b"bob", b"secret", starttls=True)
    play(login, [
        (b"+OK ready\r\n", [ToBackend(b"STLS\r\n", "sending STLS to upstream")]),
        (b"+OK Begin TLS\r\n", [BackendStartTLS(),
                                ToBackend(b"USER bob\r\n", "sending user name to upstream")]),
        (b"+OK\r\n", [ToBackend(b"PASS secret\r\n", "sending password to upstream")]),
        (b"+OK hi\r\n", [LoggedIn(b"+OK hi\r\n")]),
    ])


def test_backend_refuses_stls():
    login = Pop3Login(b"bob", b"secret", starttls=True)
    login.receive(b"+OK ready\r\n")
    with pytest.raises(StartTLSRefused) as e:
        login.receive(b"-ERR no TLS here\r\n")
    assert e.value.reply == b"-ERR no TLS here\r\n"
    assert str(e.value) == "upstream refused STARTTLS"


def test_backend_login_never_discards():
    # each step sends one command; none asks the session to drop the backend's input
    login = Pop3Login(b"bob", b"pw", starttls=True)
    actions = (login.receive(b"+OK\r\n") + login.receive(b"+OK\r\n") + login.receive(b"+OK\r\n")
               + login.receive(b"+OK\r\n"))
    assert [a.discard for a in only(actions, ToBackend)] == [False, False, False]
    assert logs(actions) == []

