"""SMTP without sockets: SmtpConversation (the client side before login) and SmtpLogin (the
backend login) driven by events, with the action lists compared exactly."""

import base64
import hmac
import re
import smtplib

import pytest

from mailproxy import resolver, sasl, smtp
from mailproxy.auth_http import AuthResult
from mailproxy.clientio import BackendRejected, LineReader, LineTooLong
from mailproxy.conversation import (CLOSE, Authenticate, BackendStartTLS, LoggedIn, LoginError,
                                    Log, Peer, Reply, ResolveClient, RestartTimer, StartTLS,
                                    StartTLSRefused, ToBackend, WaitQuiet)
from mailproxy.smtp import SmtpConversation, SmtpLogin

from playbook import closing, only, play, reply

NAME = b"mx.example.test"
GREETING = b"220 mx.example.test ESMTP ready\r\n"
OK = b"250 2.0.0 OK\r\n"
INVALID = b"500 5.5.1 Invalid command\r\n"
ARGUMENT = b"501 5.5.4 Invalid argument\r\n"
BAD_SEQUENCE = b"503 5.5.1 Bad sequence of commands\r\n"
USERNAME = b"334 VXNlcm5hbWU6\r\n"
PASSWORD = b"334 UGFzc3dvcmQ6\r\n"
AUTH_OK = b"235 2.0.0 OK\r\n"
HELO_ACTION = "sending HELO/EHLO to upstream"
XCLIENT_ACTION = "sending XCLIENT to upstream"
CLIENT_HELO_ACTION = "sending client HELO/EHLO to upstream"
AUTH_ACTION = "sending AUTH to upstream"
PEER = Peer("192.0.2.7", 40000, ("127.0.0.1", 25))
CRAM_DIGEST = b"0123456789abcdef0123456789abcdef"


def b64(data):
    return base64.b64encode(data)


def line(text):
    return text + b"\r\n"


def bad(message):
    """What a SASL decoding error gives: nginx's info line, then the invalid-command reply."""
    return [Log("info", message), Reply(INVALID)]


# ---- configuration without sockets ---------------------------------------------------------

@pytest.fixture
def make_conv(conf):
    """A conversation past its greeting (no resolver, no delay); `overrides` as for `conf`."""
    def make(tls=False, **overrides):
        conv = SmtpConversation(conf("smtp", **overrides), tls=tls)
        assert conv.start() == [RestartTimer(), Reply(GREETING)]
        return conv
    return make


# ---- greeting: client name, smtp_greeting_delay --------------------------------------------

def test_greeting_without_resolver(conf):
    conv = SmtpConversation(conf("smtp"))
    assert conv.start() == [RestartTimer(), Reply(GREETING)]
    assert conv.host == resolver.UNAVAILABLE
    assert conv.buffer_size() == 4096 and conv.next_input() == ("line", None)


@pytest.mark.parametrize("host", ["client.example", resolver.UNAVAILABLE, resolver.TEMPUNAVAIL])
def test_greeting_with_resolver(conf, host):
    conv = SmtpConversation(conf("smtp", resolver=object()))
    assert conv.start() == [ResolveClient()]
    assert conv.resolved(host) == [RestartTimer(), Reply(GREETING)]
    assert conv.host == host
    assert conv.auth_request_fields() == {"client_host": host}


def test_greeting_delay_quiet_client(conf):
    conv = SmtpConversation(conf("smtp", smtp_greeting_delay=0.5))
    assert conv.start() == [WaitQuiet(0.5)]
    assert conv.quiet() == [RestartTimer(), Reply(GREETING)]


def test_greeting_delay_after_resolver(conf):
    conv = SmtpConversation(conf("smtp", resolver=object(), smtp_greeting_delay=2.0))
    assert conv.start() == [ResolveClient()]
    assert conv.resolved("client.example") == [WaitQuiet(2.0)]
    assert conv.quiet() == [RestartTimer(), Reply(GREETING)]
    assert conv.host == "client.example"


def test_talked_first_is_rejected(conf):
    conv = SmtpConversation(conf("smtp", smtp_greeting_delay=1.0))
    assert conv.start() == [WaitQuiet(1.0)]
    assert conv.talked_first(b"EHLO x\r\nMAIL FROM:<a@b>\n") == [
        Log("info", 'client was rejected before greeting: "EHLO x__MAIL FROM:<a@b>_"'),
        Reply(b"503 5.5.0 Improper use of SMTP command pipelining\r\n"), CLOSE]


def test_talked_first_text_is_sanitized(conf):
    conv = SmtpConversation(conf("smtp", smtp_greeting_delay=1.0))
    conv.start()
    assert conv.talked_first(b'a"b\x00\r\n')[0] == Log(
        "info", 'client was rejected before greeting: "a\\x22b\\x00__"')


def test_server_name_in_replies_is_utf8(conf):
    conv = SmtpConversation(conf("smtp", server_name="mx.t\u00e9st"))
    assert conv.start() == [RestartTimer(), Reply("220 mx.t\u00e9st ESMTP ready\r\n".encode())]
    assert conv.receive(b"HELO x\r\n") == [Reply("250 mx.t\u00e9st\r\n".encode())]


# ---- HELO / EHLO ---------------------------------------------------------------------------

def test_helo(make_conv):
    conv = make_conv()
    assert conv.receive(b"HELO client.example\r\n") == [Reply(b"250 mx.example.test\r\n")]
    assert conv.helo == b"client.example" and conv.esmtp is False


@pytest.mark.parametrize("verb", [b"HELO", b"EHLO", b"helo", b"ehlo"])
@pytest.mark.parametrize("args", [b"", b" a b", b" a b c"])
def test_greeting_argument_count(make_conv, verb, args):
    conv = make_conv()
    conv.receive(b"HELO before\r\n")
    assert conv.receive(verb + args + b"\r\n") == [Reply(ARGUMENT)]
    assert conv.helo == b"before" and conv.esmtp is False
    assert conv.errors == 0


def test_ehlo_defaults(make_conv):
    conv = make_conv()
    assert conv.receive(b"EHLO client.example\r\n") == [
        Reply(b"250-mx.example.test\r\n250 AUTH PLAIN LOGIN\r\n")]
    assert conv.helo == b"client.example" and conv.esmtp is True
    assert conv.receive(b"HELO other\r\n") == [Reply(b"250 mx.example.test\r\n")]
    assert conv.helo == b"other" and conv.esmtp is False


def test_ehlo_capabilities_and_auth_order(make_conv):
    conv = make_conv(smtp_capabilities='PIPELINING "SIZE 10485760" 8BITMIME',
                     smtp_auth="external none cram-md5 login plain")
    assert conv.receive(b"EHLO x\r\n") == [Reply(
        b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n250-8BITMIME\r\n"
        b"250 AUTH PLAIN LOGIN CRAM-MD5 EXTERNAL\r\n")]


def test_ehlo_none_only_has_no_auth_line(make_conv):
    conv = make_conv(smtp_auth=["none"])
    assert conv.receive(b"EHLO x\r\n") == [Reply(b"250 mx.example.test\r\n")]
    conv = make_conv(smtp_auth=["none"], smtp_capabilities=["PIPELINING"])
    assert conv.receive(b"EHLO x\r\n") == [Reply(b"250-mx.example.test\r\n250 PIPELINING\r\n")]


@pytest.mark.parametrize("starttls, tls, reply", [
    ("off", False, b"250-mx.example.test\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n"),
    ("on", False,
     b"250-mx.example.test\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n"),
    ("on", True, b"250-mx.example.test\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n"),
    ("only", False, b"250-mx.example.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"),
    ("only", True, b"250-mx.example.test\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n"),
])
def test_ehlo_starttls(make_conv, starttls, tls, reply):
    conv = make_conv(tls=tls, starttls=starttls, smtp_capabilities=["PIPELINING"])
    assert conv.receive(b"EHLO x\r\n") == [Reply(reply)]


def test_ehlo_after_starttls_drops_starttls_line(make_conv):
    conv = make_conv(starttls="on")
    assert conv.receive(b"STARTTLS\r\n") == [StartTLS(b"220 2.0.0 Start TLS\r\n")]
    assert conv.tls_started() == []
    assert conv.receive(b"EHLO x\r\n") == [
        Reply(b"250-mx.example.test\r\n250 AUTH PLAIN LOGIN\r\n")]


# ---- AUTH PLAIN / LOGIN / CRAM-MD5 / EXTERNAL ---------------------------------------------

def test_auth_without_mechanism(make_conv):
    conv = make_conv()
    assert conv.receive(b"AUTH\r\n") == [Reply(ARGUMENT)]
    assert conv.errors == 0


def test_auth_plain_initial_response(make_conv):
    conv = make_conv()
    assert conv.receive(b"AUTH PLAIN " + line(b64(b"\0alice\0secret"))) == [
        Authenticate("plain", b"alice", b"secret")]
    assert (conv.method, conv.login, conv.passwd) == ("plain", b"alice", b"secret")
    assert conv.auth_request_fields() == {"client_host": resolver.UNAVAILABLE}


def test_auth_plain_with_authzid_and_lower_case(make_conv):
    conv = make_conv()
    assert conv.receive(b"auth plain " + line(b64(b"admin\0alice\0secret"))) == [
        Authenticate("plain", b"alice", b"secret")]


def test_auth_plain_prompt(make_conv):
    conv = make_conv()
    assert conv.receive(b"AUTH PLAIN\r\n") == [Reply(b"334 \r\n")]
    assert conv.receive(line(b64(b"\0alice\0secret"))) == [
        Authenticate("plain", b"alice", b"secret")]


def test_auth_login_prompts(make_conv):
    conv = make_conv()
    assert conv.receive(b"AUTH LOGIN\r\n") == [Reply(USERNAME)]
    assert conv.receive(line(b64(b"alice"))) == [Reply(PASSWORD)]
    assert conv.receive(line(b64(b"secret"))) == [Authenticate("plain", b"alice", b"secret")]
    assert (conv.method, conv.login, conv.passwd) == ("plain", b"alice", b"secret")


# as 311ec3a: the user name is kept apart until the password comes, so log lines while the
# password is awaited (or after a bad one) carry no login field
def test_auth_login_username_not_the_session_login_before_the_password(make_conv):
    conv = make_conv()
    assert conv.receive(b"AUTH LOGIN " + line(b64(b"alice"))) == [Reply(PASSWORD)]
    assert conv.login is None
    assert conv.receive(b"***\r\n") == bad(
        "client sent invalid base64 encoding in AUTH LOGIN command")
    assert conv.login is None


def test_auth_login_initial_response(make_conv):
    conv = make_conv()
    assert conv.receive(b"AUTH LOGIN " + line(b64(b"alice"))) == [Reply(PASSWORD)]
    assert conv.receive(line(b64(b"secret"))) == [Authenticate("plain", b"alice", b"secret")]


def test_auth_plain_and_login_accepted_whatever_smtp_auth(make_conv):
    # as ngx_mail_smtp_auth: only CRAM-MD5 and EXTERNAL are checked against smtp_auth
    conv = make_conv(smtp_auth=["none"])
    assert conv.receive(b"AUTH PLAIN " + line(b64(b"\0a\0b"))) == [
        Authenticate("plain", b"a", b"b")]
    conv = make_conv(smtp_auth=["none"])
    assert conv.receive(b"AUTH LOGIN\r\n") == [Reply(USERNAME)]


@pytest.mark.parametrize("command", [
    b"AUTH PLAIN a b\r\n", b"AUTH LOGIN a b\r\n", b"AUTH CRAM-MD5\r\n", b"AUTH EXTERNAL\r\n",
    b"AUTH EXTERNAL YWxpY2U=\r\n", b"AUTH GSSAPI\r\n", b"AUTH XOAUTH2 abc\r\n",
    b"AUTH PLAIN a b c d e f g h i j\r\n",      # eleven arguments: parsed, refused
])
def test_auth_refused(make_conv, command):
    conv = make_conv()       # smtp_auth plain login: no CRAM-MD5, no EXTERNAL
    assert conv.receive(command) == [Reply(INVALID)]
    assert conv.errors == 0 and conv.expect is None
    assert conv.receive(b"NOOP\r\n") == [Reply(OK)]


def test_auth_cram_md5(make_conv):
    conv = make_conv(smtp_auth=["plain", "cram-md5"])
    acts = conv.receive(b"AUTH CRAM-MD5\r\n")
    assert re.fullmatch(rb"<\d+\.\d+@mx\.example\.test>", conv.salt)
    assert acts == [Reply(b"334 " + b64(conv.salt) + b"\r\n")]
    assert conv.receive(line(b64(b"alice " + CRAM_DIGEST))) == [
        Authenticate("cram-md5", b"alice", CRAM_DIGEST)]
    assert conv.method == "cram-md5"


@pytest.mark.parametrize("command", [b"AUTH CRAM-MD5 abc\r\n", b"AUTH CRAM-MD5 a b\r\n"])
def test_auth_cram_md5_takes_no_initial_response(make_conv, command):
    conv = make_conv(smtp_auth=["cram-md5"])
    assert conv.receive(command) == [Reply(INVALID)]
    assert conv.salt is None


def test_auth_cram_md5_salt_kept_after_failure(make_conv):
    conv = make_conv(smtp_auth=["cram-md5"])
    first = conv.receive(b"AUTH CRAM-MD5\r\n")
    salt = conv.salt
    conv.receive(line(b64(b"alice " + CRAM_DIGEST)))
    conv.auth_failed(AuthResult("FAIL", b"nope", wait=1), retry=True)
    assert conv.receive(b"AUTH CRAM-MD5\r\n") == first
    assert conv.salt is salt


def test_auth_external(make_conv):
    conv = make_conv(smtp_auth=["external"])
    assert conv.receive(b"AUTH EXTERNAL\r\n") == [Reply(USERNAME)]
    assert conv.receive(line(b64(b"alice"))) == [Authenticate("external", b"alice", None)]
    conv = make_conv(smtp_auth=["external"])
    assert conv.receive(b"AUTH EXTERNAL " + line(b64(b"alice"))) == [
        Authenticate("external", b"alice", None)]
    assert conv.receive(b"AUTH EXTERNAL a b\r\n") == [Reply(INVALID)]


@pytest.mark.parametrize("command, message", [
    (b"AUTH PLAIN !!!!\r\n", "client sent invalid base64 encoding in AUTH PLAIN command"),
    (b"AUTH PLAIN *\r\n", "client sent invalid base64 encoding in AUTH PLAIN command"),
    (b"AUTH PLAIN A\r\n", "client sent invalid base64 encoding in AUTH PLAIN command"),
    (b"AUTH LOGIN a*b\r\n", "client sent invalid base64 encoding in AUTH LOGIN command"),
    (b"AUTH EXTERNAL %%\r\n", "client sent invalid base64 encoding in AUTH EXTERNAL command"),
    (b"AUTH PLAIN " + b64(b"alice") + b"\r\n", "client sent invalid login in AUTH PLAIN command"),
    (b"AUTH PLAIN " + b64(b"\0alice") + b"\r\n",
     "client sent invalid password in AUTH PLAIN command"),
    (b"AUTH PLAIN " + b64(b"alice\0") + b"\r\n",
     "client sent invalid login in AUTH PLAIN command"),
])
def test_auth_bad_initial_response(make_conv, command, message):
    conv = make_conv(smtp_auth=["plain", "login", "external"])
    assert conv.receive(command) == bad(message)
    assert conv.errors == 0 and conv.expect is None


@pytest.mark.parametrize("start, response, message", [
    (b"AUTH PLAIN", b"***", "client sent invalid base64 encoding in AUTH PLAIN command"),
    (b"AUTH PLAIN", b"", "client sent invalid login in AUTH PLAIN command"),
    (b"AUTH LOGIN", b"=*", None),      # nginx ignores what follows '=': an empty login
    (b"AUTH LOGIN", b"a", "client sent invalid base64 encoding in AUTH LOGIN command"),
    (b"AUTH CRAM-MD5", b"***", "client sent invalid base64 encoding in AUTH CRAM-MD5 command"),
    (b"AUTH CRAM-MD5", b64(b"alice"), "client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command"),
    (b"AUTH CRAM-MD5", b64(b"alice 0123"),
     "client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command"),
    (b"AUTH EXTERNAL", b"***", "client sent invalid base64 encoding in AUTH EXTERNAL command"),
])
def test_auth_bad_response_after_prompt(make_conv, start, response, message):
    conv = make_conv(smtp_auth=["plain", "login", "cram-md5", "external"])
    conv.receive(start + b"\r\n")
    acts = conv.receive(line(response))
    if message is None:
        assert acts == [Reply(PASSWORD)] and conv.sasl_user == b""
        return
    assert acts == bad(message)
    assert conv.errors == 0 and conv.expect is None
    assert conv.receive(b"NOOP\r\n") == [Reply(OK)]       # a command again


@pytest.mark.parametrize("start, response, message", [
    (b"AUTH PLAIN", b"\0al\rice\0secret", "client sent invalid login in AUTH PLAIN command"),
    (b"AUTH PLAIN", b"\0alice\0sec\nret", "client sent invalid password in AUTH PLAIN command"),
    (b"AUTH PLAIN", b"\0alice\0sec\0ret", "client sent invalid password in AUTH PLAIN command"),
    (b"AUTH LOGIN", b"al\0ice", "client sent invalid login in AUTH LOGIN command"),
    (b"AUTH EXTERNAL", b"al\nice", "client sent invalid login in AUTH EXTERNAL command"),
    (b"AUTH CRAM-MD5", b"al\rice " + CRAM_DIGEST,
     "client sent invalid login in AUTH CRAM-MD5 command"),
    (b"AUTH CRAM-MD5", b"alice " + CRAM_DIGEST[:-1] + b"\n",
     "client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command"),
])
def test_auth_cr_lf_nul_in_credentials_refused(make_conv, start, response, message):
    conv = make_conv(smtp_auth=["plain", "login", "cram-md5", "external"])
    conv.receive(start + b"\r\n")
    assert conv.receive(line(b64(response))) == bad(message)
    assert conv.method is None


def test_auth_login_password_with_cr_refused(make_conv):
    conv = make_conv()
    conv.receive(b"AUTH LOGIN " + line(b64(b"alice")))
    assert conv.receive(line(b64(b"sec\rret"))) == bad(
        "client sent invalid password in AUTH LOGIN command")
    assert conv.method is None


def test_authenticate_refuses_unsafe_credentials_itself(make_conv, monkeypatch):
    # the last guard before the auth service, should a decoder ever let CR/LF/NUL through
    monkeypatch.setattr(sasl, "decode_external", lambda b: b"al\r\nice")
    conv = make_conv(smtp_auth=["external"])
    assert conv.receive(b"AUTH EXTERNAL eA==\r\n") == [Reply(INVALID)]
    assert conv.method is None and conv.login is None


@pytest.mark.parametrize("response", [b"abc\rdef", b"x" + b" y" * 11])
def test_auth_unparsable_response_line_is_a_parse_error(make_conv, response):
    conv = make_conv(max_errors=2)
    assert conv.receive(b"AUTH PLAIN\r\n") == [Reply(b"334 \r\n")]
    assert conv.receive(line(response)) == [Reply(INVALID)]
    assert conv.errors == 1 and conv.expect is None
    assert conv.receive(b"AUTH LOGIN\r\n") == [Reply(USERNAME)]
    assert conv.receive(line(response)) == [
        Log("info", "client sent too many invalid commands"), Reply(INVALID), CLOSE]


def test_auth_response_extra_arguments_ignored(make_conv):
    conv = make_conv()
    conv.receive(b"AUTH PLAIN\r\n")
    assert conv.receive(b64(b"\0a\0b") + b" ignored words\r\n") == [
        Authenticate("plain", b"a", b"b")]


def test_starttls_only_blocks_auth(make_conv):
    conv = make_conv(starttls="only")
    assert conv.receive(b"AUTH PLAIN " + line(b64(b"\0a\0b"))) == [Reply(INVALID)]
    assert conv.receive(b"AUTH\r\n") == [Reply(INVALID)]
    assert conv.errors == 0
    conv = make_conv(tls=True, starttls="only")
    assert conv.receive(b"AUTH PLAIN " + line(b64(b"\0a\0b"))) == [
        Authenticate("plain", b"a", b"b")]


def test_starttls_only_auth_after_starttls(make_conv):
    conv = make_conv(starttls="only")
    assert conv.receive(b"STARTTLS\r\n") == [StartTLS(b"220 2.0.0 Start TLS\r\n")]
    conv.tls_started()
    assert conv.receive(b"AUTH LOGIN\r\n") == [Reply(USERNAME)]


# ---- MAIL / RCPT ---------------------------------------------------------------------------

@pytest.mark.parametrize("command, shown", [
    (b"MAIL FROM:<a@b>\r\n", "MAIL FROM:<a@b>__"),
    (b"mail FROM:<a@b>   \n", "mail FROM:<a@b>__"),
    (b"MAIL\r\n", "MAIL__"),
    (b"MAIL FROM: <a@b> SIZE=10\r\n", "MAIL FROM\\x3a <a@b> SIZE=10__"),
])
def test_mail_without_none_is_rejected(make_conv, command, shown):
    conv = make_conv()
    assert conv.receive(command) == [
        Log("info", 'client was rejected: "%s"' % shown),
        Reply(b"530 5.7.1 Authentication required\r\n")]
    assert conv.smtp_from is None and conv.errors == 0


def test_none_mail_rcpt(make_conv):
    conv = make_conv(smtp_auth=["none"])
    assert conv.receive(b"EHLO client.example\r\n") == [Reply(b"250 mx.example.test\r\n")]
    assert conv.receive(b"RCPT TO:<c@d>\r\n") == [Reply(BAD_SEQUENCE)]
    assert conv.receive(b"MAIL\r\n") == [Reply(ARGUMENT)]
    assert conv.receive(b"MAIL FROM:<a@b>  \r\n") == [Reply(OK)]
    assert conv.smtp_from == b"MAIL FROM:<a@b>"
    assert conv.receive(b"MAIL FROM:<x@y>\r\n") == [Reply(BAD_SEQUENCE)]
    assert conv.receive(b"RCPT\r\n") == [Reply(ARGUMENT)]
    assert conv.receive(b"RCPT TO:<c@d> NOTIFY=NEVER\r\n") == [Authenticate("none", None, None)]
    assert (conv.method, conv.login, conv.passwd) == ("none", None, None)
    assert conv.auth_request_fields() == {
        "client_host": resolver.UNAVAILABLE, "smtp_helo": b"client.example",
        "smtp_from": b"MAIL FROM:<a@b>", "smtp_to": b"RCPT TO:<c@d> NOTIFY=NEVER"}


def test_none_fields_without_helo_and_with_host(conf):
    conv = SmtpConversation(conf("smtp", smtp_auth=["none"], resolver=object()))
    conv.start()
    conv.resolved("client.example")
    conv.receive(b"MAIL FROM:<>\r\n")
    conv.receive(b"RCPT TO:<c@d>\r\n")
    assert conv.auth_request_fields() == {
        "client_host": "client.example", "smtp_helo": b"", "smtp_from": b"MAIL FROM:<>",
        "smtp_to": b"RCPT TO:<c@d>"}


def test_none_mail_drops_stale_login(make_conv):
    conv = make_conv(smtp_auth=["none", "login"])
    conv.login, conv.passwd = b"alice", b"secret"
    assert conv.receive(b"MAIL FROM:<a@b>\r\n") == [Reply(OK)]
    assert conv.login is None and conv.passwd is None


def test_rset_and_helo_forget_the_envelope(make_conv):
    conv = make_conv(smtp_auth=["none"])
    conv.receive(b"MAIL FROM:<a@b>\r\n")
    assert conv.receive(b"RSET\r\n") == [Reply(OK)]
    assert conv.smtp_from is None
    assert conv.receive(b"MAIL FROM:<a@b>\r\n") == [Reply(OK)]
    assert conv.receive(b"HELO x\r\n") == [Reply(b"250 mx.example.test\r\n")]
    assert conv.smtp_from is None
    assert conv.receive(b"RCPT TO:<c@d>\r\n") == [Reply(BAD_SEQUENCE)]
    conv.receive(b"MAIL FROM:<a@b>\r\n")
    assert conv.receive(b"EHLO x\r\n") == [Reply(b"250 mx.example.test\r\n")]
    assert conv.smtp_from is None


def test_rset_noop_quit_and_refused_verbs(make_conv):
    conv = make_conv()
    assert conv.receive(b"RSET\r\n") == [Reply(OK)]
    assert conv.receive(b"NOOP\r\n") == [Reply(OK)]
    assert conv.receive(b"noop with args\r\n") == [Reply(OK)]
    for verb in (b"VRFY alice", b"EXPN list", b"HELP", b"help me"):
        assert conv.receive(line(verb)) == [Reply(INVALID)]
    assert conv.errors == 0
    assert conv.receive(b"QUIT\r\n") == [Reply(b"221 2.0.0 Bye\r\n"), CLOSE]


# ---- STARTTLS ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["on", "only"])
def test_starttls_forgets_helo_and_envelope_keeps_esmtp(make_conv, mode):
    conv = make_conv(starttls=mode, smtp_auth=["none"])
    conv.receive(b"EHLO client.example\r\n")
    conv.receive(b"MAIL FROM:<a@b>\r\n")
    assert conv.receive(b"starttls\r\n") == [StartTLS(b"220 2.0.0 Start TLS\r\n")]
    assert (conv.helo, conv.smtp_from, conv.smtp_to, conv.esmtp) == (None, None, None, True)
    assert conv.tls is False
    assert conv.tls_started() == []
    assert conv.tls is True
    assert conv.receive(b"STARTTLS\r\n") == [Reply(INVALID)]
    assert conv.receive(b"RCPT TO:<c@d>\r\n") == [Reply(BAD_SEQUENCE)]


def test_starttls_refused(make_conv):
    conv = make_conv()                                   # starttls off
    assert conv.receive(b"STARTTLS\r\n") == [Reply(INVALID)]
    conv = make_conv(tls=True, starttls="on")            # implicit TLS already
    assert conv.receive(b"STARTTLS\r\n") == [Reply(INVALID)]
    assert conv.errors == 0


# ---- parser errors, too long commands ------------------------------------------------------

@pytest.mark.parametrize("bad_line", [
    b"DATA\r\n", b"XCLIENT ADDR=1.2.3.4\r\n", b"NOOP\rx\r\n", b"\r\n", b"HELO\tx\r\n",
    b"NOOP " + b"a " * 12 + b"\r\n",
])
def test_parse_errors_count_to_max_errors(make_conv, bad_line):
    conv = make_conv(max_errors=3)
    assert conv.receive(bad_line) == [Reply(INVALID)]
    assert conv.receive(b"VRFY x\r\n") == [Reply(INVALID)]      # refused: not counted
    assert conv.receive(bad_line) == [Reply(INVALID)]
    assert conv.errors == 2
    assert conv.receive(bad_line) == [
        Log("info", "client sent too many invalid commands"), Reply(INVALID), CLOSE]


def test_max_errors_one(make_conv):
    conv = make_conv(max_errors=1)
    assert conv.receive(b"BDAT 10\r\n") == [
        Log("info", "client sent too many invalid commands"), Reply(INVALID), CLOSE]


def test_too_long(make_conv):
    conv = make_conv()
    assert conv.too_long(b"AUTH PLAIN AAAA\r\x00") == [
        Log("info", 'client sent too long command "AUTH PLAIN AAAA\\r\\x00"'), Reply(INVALID),
        CLOSE]


def test_too_long_log_is_cut(make_conv):
    conv = make_conv()
    acts = conv.too_long(b"A" * 5000)
    assert acts == [Log("info", 'client sent too long command "%s..."' % ("A" * 1024)),
                    Reply(INVALID), CLOSE]


# ---- auth failures -------------------------------------------------------------------------

@pytest.mark.parametrize("code, message, reply", [
    ("535 5.7.8", b"Invalid login or password", b"535 5.7.8 Invalid login or password\r\n"),
    (None, b"Invalid login or password", b"535 5.7.0 Invalid login or password\r\n"),
    ("451 4.3.0", "Temporary failure \u00e9", "451 4.3.0 Temporary failure \u00e9\r\n".encode()),
])
def test_auth_failed_with_retry(make_conv, code, message, reply):
    conv = make_conv()
    conv.receive(b"AUTH LOGIN " + line(b64(b"alice")))
    conv.receive(line(b64(b"secret")))
    res = AuthResult("FAIL", message, wait=3, error_code=code)
    assert conv.auth_failed(res, retry=True) == [Reply(reply)]
    assert (conv.method, conv.login, conv.passwd, conv.expect) == (None, None, None, None)
    assert conv.receive(b"AUTH PLAIN " + line(b64(b"\0alice\0again"))) == [
        Authenticate("plain", b"alice", b"again")]


@pytest.mark.parametrize("code, message, reply", [
    ("550 5.7.1", b"Invalid login or password", b"550 5.7.1 Invalid login or password\r\n"),
    (None, b"Invalid login or password", b"535 5.7.0 Invalid login or password\r\n"),
    ("451 4.3.0", "Temporary problem", b"451 4.3.0 Temporary problem\r\n"),
])
def test_auth_failed_without_retry(make_conv, code, message, reply):
    conv = make_conv()
    conv.receive(b"AUTH PLAIN " + line(b64(b"\0alice\0secret")))
    res = AuthResult("FAIL", message, error_code=code)
    assert conv.auth_failed(res, retry=False) == [Reply(reply), CLOSE]


def test_auth_failed_none_keeps_envelope(make_conv):
    # as before the conversion: after Auth-Wait only the credentials are forgotten
    conv = make_conv(smtp_auth=["none"])
    conv.receive(b"HELO x\r\n")
    conv.receive(b"MAIL FROM:<a@b>\r\n")
    conv.receive(b"RCPT TO:<c@d>\r\n")
    assert conv.auth_failed(AuthResult("FAIL", b"no", wait=1), retry=True) == [
        Reply(b"535 5.7.0 no\r\n")]
    assert (conv.helo, conv.smtp_from, conv.smtp_to) == (b"x", b"MAIL FROM:<a@b>",
                                                         b"RCPT TO:<c@d>")
    assert conv.receive(b"MAIL FROM:<x@y>\r\n") == [Reply(BAD_SEQUENCE)]
    assert conv.receive(b"RCPT TO:<e@f>\r\n") == [Authenticate("none", None, None)]


# ---- the backend login ---------------------------------------------------------------------

def plain_conv(make_conv, helo=b"EHLO client.example", user=b"alice", passwd=b"secret",
               **overrides):
    conv = make_conv(**overrides)
    if helo:
        conv.receive(line(helo))
    conv.receive(b"AUTH PLAIN " + line(b64(b"\0" + user + b"\0" + passwd)))
    return conv


def step(data, action):
    return ToBackend(data, action, discard=True)


def test_login_xclient_with_client_ehlo(make_conv):
    conv = plain_conv(make_conv)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    assert isinstance(login, SmtpLogin)
    assert login.state == "greeting" and login.complete is smtp.reply_complete
    assert login.receive(b"220 backend ESMTP\r\n") == [
        step(b"EHLO mx.example.test\r\n", HELO_ACTION)]
    assert login.complete is smtp.reply_complete
    assert login.receive(b"250-backend\r\n250 XCLIENT ADDR LOGIN NAME\r\n") == [
        step(b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=[UNAVAILABLE]\r\n", XCLIENT_ACTION)]
    assert login.complete is smtp.reply_complete
    assert login.receive(b"220 backend ESMTP\r\n") == [
        step(b"EHLO client.example\r\n", CLIENT_HELO_ACTION)]
    assert login.complete is smtp.reply_complete
    assert login.receive(b"250-backend\r\n250 8BITMIME\r\n") == [LoggedIn(AUTH_OK)]


def test_login_xclient_with_client_helo(make_conv):
    conv = plain_conv(make_conv, helo=b"HELO client.example")
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    # EHLO towards an XCLIENT backend even after the client's HELO; the client's is HELO
    assert login.receive(b"220 b\r\n") == [step(b"EHLO mx.example.test\r\n", HELO_ACTION)]
    login.receive(b"250 b\r\n")
    assert login.receive(b"250 ok\r\n") == [
        step(b"HELO client.example\r\n", CLIENT_HELO_ACTION)]
    assert login.receive(b"250 b\r\n") == [LoggedIn(AUTH_OK)]


def test_login_xclient_without_client_greeting(make_conv):
    conv = plain_conv(make_conv, helo=None)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    assert login.receive(b"220 b\r\n") == [step(b"EHLO mx.example.test\r\n", HELO_ACTION)]
    login.receive(b"250 b\r\n")
    assert login.receive(b"250 ok\r\n") == [LoggedIn(AUTH_OK)]


@pytest.mark.parametrize("helo, verb", [(b"HELO c", b"HELO"), (b"EHLO c", b"EHLO"),
                                        (None, b"HELO")])
def test_login_without_xclient(make_conv, helo, verb):
    conv = plain_conv(make_conv, helo=helo, xclient=False)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    assert login.receive(b"220 b\r\n") == [step(verb + b" mx.example.test\r\n", HELO_ACTION)]
    assert login.receive(b"250 b\r\n") == [LoggedIn(AUTH_OK)]


def test_xclient_line_contents(conf):
    conf = conf("smtp", xclient_extended=True)
    conv = SmtpConversation(conf)
    conv.host = "client.example"
    conv.method = "plain"
    cases = [
        (Peer("192.0.2.7", 40000, ("127.0.0.1", 25)), b"alice",
         b"XCLIENT ADDR=192.0.2.7 PORT=40000 LOGIN=alice NAME=client.example "
         b"DESTADDR=127.0.0.1 DESTPORT=25\r\n"),
        (Peer("2001:db8::7", 40000, ("::1", 587), ("2001:db8::1", 25)), b"al ice+x=y",
         b"XCLIENT ADDR=IPV6:2001:db8::7 PORT=40000 LOGIN=al+20ice+2Bx+3Dy "
         b"NAME=client.example DESTADDR=IPV6:::1 DESTPORT=587\r\n"),
        (Peer("192.0.2.7", None, None), "us\u00e9r+x=y".encode(),
         b"XCLIENT ADDR=192.0.2.7 LOGIN=us+C3+A9r+2Bx+3Dy NAME=client.example\r\n"),
        (Peer("192.0.2.7", None, None), b"alice",
         b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=client.example\r\n"),
        (Peer("192.0.2.7", 40000, ("127.0.0.1", 25)), None,
         b"XCLIENT ADDR=192.0.2.7 PORT=40000 NAME=client.example "
         b"DESTADDR=127.0.0.1 DESTPORT=25\r\n"),
        (Peer("192.0.2.7", 40000, ("127.0.0.1", 25)), b"",
         b"XCLIENT ADDR=192.0.2.7 PORT=40000 NAME=client.example "
         b"DESTADDR=127.0.0.1 DESTPORT=25\r\n"),
    ]
    for peer, user, expected in cases:
        login = conv.backend_login(user, b"pw", peer, False)
        login.receive(b"220 b\r\n")
        assert login.receive(b"250 b\r\n") == [step(expected, XCLIENT_ACTION)]


def test_xclient_line_not_extended(make_conv):
    conv = make_conv()
    conv.host = resolver.TEMPUNAVAIL
    conv.receive(b"AUTH PLAIN " + line(b64(b"\0alice\0pw")))
    login = conv.backend_login(b"alice", b"pw", Peer("2001:db8::7", 40000, ("::1", 25)), False)
    login.receive(b"220 b\r\n")
    assert login.receive(b"250 b\r\n") == [
        step(b"XCLIENT ADDR=IPV6:2001:db8::7 LOGIN=alice NAME=[TEMPUNAVAIL]\r\n",
             XCLIENT_ACTION)]


def test_xclient_no_login_with_proxy_smtp_auth(make_conv):
    conv = plain_conv(make_conv, helo=None, proxy_smtp_auth=True)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    login.receive(b"220 b\r\n")
    assert login.receive(b"250 b\r\n") == [
        step(b"XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE]\r\n", XCLIENT_ACTION)]
    assert login.receive(b"220 b\r\n") == [
        step(b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n", AUTH_ACTION)]
    assert login.complete is smtp.reply_complete
    assert login.receive(b"235 2.7.0 Authentication successful\r\n") == [LoggedIn(AUTH_OK)]


def test_proxy_smtp_auth_with_client_helo_and_without_xclient(make_conv):
    conv = plain_conv(make_conv, helo=b"HELO c", proxy_smtp_auth=True, xclient=False)
    login = conv.backend_login(b"bob", b"fromauth", PEER, False)   # Auth-User, Auth-Pass
    assert login.receive(b"220 b\r\n") == [step(b"HELO mx.example.test\r\n", HELO_ACTION)]
    assert login.receive(b"250 b\r\n") == [
        step(b"AUTH PLAIN " + b64(b"\0bob\0fromauth") + b"\r\n", AUTH_ACTION)]
    with pytest.raises(BackendRejected) as e:
        login.receive(b"535 5.7.8 Error: authentication failed\r\n")
    assert e.value.reply == b"535 5.7.8 Error: authentication failed\r\n"


def cram_conv(make_conv, **overrides):
    conv = make_conv(smtp_auth=["cram-md5", "external"], **overrides)
    conv.receive(b"AUTH CRAM-MD5\r\n")
    conv.receive(line(b64(b"alice " + CRAM_DIGEST)))
    return conv


@pytest.mark.parametrize("xclient, reply", [(True, b"220 ok\r\n"), (False, b"250 b\r\n")])
def test_cram_md5_without_auth_pass_has_no_password(make_conv, xclient, reply):
    conv = cram_conv(make_conv, proxy_smtp_auth=True, xclient=xclient)
    login = conv.backend_login(b"alice", conv.passwd, PEER, False)     # the client's digest
    login.receive(b"220 b\r\n")
    if xclient:
        login.receive(b"250 b\r\n")
    with pytest.raises(LoginError) as e:
        login.receive(reply)
    assert str(e.value) == "no password available"
    assert e.value.action == "sending AUTH to upstream"


def test_cram_md5_with_auth_pass(make_conv):
    conv = cram_conv(make_conv, proxy_smtp_auth=True, xclient=False)
    login = conv.backend_login(b"alice", b"plainpw", PEER, False)
    login.receive(b"220 b\r\n")
    assert login.receive(b"250 b\r\n") == [
        step(b"AUTH PLAIN " + b64(b"\0alice\0plainpw") + b"\r\n", AUTH_ACTION)]


def test_cram_md5_without_proxy_smtp_auth_needs_no_password(make_conv):
    conv = cram_conv(make_conv, xclient=False)
    login = conv.backend_login(b"alice", conv.passwd, PEER, False)
    login.receive(b"220 b\r\n")
    assert login.receive(b"250 b\r\n") == [LoggedIn(AUTH_OK)]


def test_external_without_auth_pass(make_conv):
    conv = make_conv(smtp_auth=["external"], proxy_smtp_auth=True, xclient=False)
    conv.receive(b"AUTH EXTERNAL " + line(b64(b"alice")))
    login = conv.backend_login(b"alice", None, PEER, False)
    login.receive(b"220 b\r\n")
    with pytest.raises(LoginError) as e:
        login.receive(b"250 b\r\n")
    assert (str(e.value), e.value.action) == ("no password available", AUTH_ACTION)
    login = conv.backend_login(b"alice", b"fromauth", PEER, False)
    login.receive(b"220 b\r\n")
    assert login.receive(b"250 b\r\n") == [
        step(b"AUTH PLAIN " + b64(b"\0alice\0fromauth") + b"\r\n", AUTH_ACTION)]


def none_conv(make_conv, **overrides):
    conv = make_conv(smtp_auth=["none"], **overrides)
    conv.receive(b"EHLO client.example\r\n")
    conv.receive(b"MAIL FROM:<a@b> SIZE=100\r\n")
    conv.receive(b"RCPT TO:<c@d>\r\n")
    return conv


@pytest.mark.parametrize("rcpt_reply", [b"250 2.1.5 Ok\r\n", b"550 5.1.1 <c@d>: unknown\r\n",
                                        b"451-4.3.0 try\r\n451 4.3.0 later\r\n"])
def test_none_mode_replays_envelope(make_conv, rcpt_reply):
    conv = none_conv(make_conv, proxy_smtp_auth=True)      # no AUTH in none mode
    login = conv.backend_login(None, None, PEER, False)
    login.receive(b"220 b\r\n")
    assert login.receive(b"250 b\r\n") == [
        step(b"XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE]\r\n", XCLIENT_ACTION)]
    assert login.receive(b"220 b\r\n") == [
        step(b"EHLO client.example\r\n", CLIENT_HELO_ACTION)]
    assert login.receive(b"250 b\r\n") == [
        step(b"MAIL FROM:<a@b> SIZE=100\r\n", "sending MAIL FROM to upstream")]
    assert login.complete is smtp.reply_complete
    assert login.receive(b"250 2.1.0 Ok\r\n") == [
        step(b"RCPT TO:<c@d>\r\n", "sending RCPT TO to upstream")]
    assert login.complete is smtp.reply_complete
    assert login.receive(rcpt_reply) == [LoggedIn(rcpt_reply)]


def test_none_mode_without_xclient(make_conv):
    conv = none_conv(make_conv, xclient=False)
    login = conv.backend_login(None, None, PEER, False)
    assert login.receive(b"220 b\r\n") == [step(b"EHLO mx.example.test\r\n", HELO_ACTION)]
    assert login.receive(b"250 b\r\n") == [
        step(b"MAIL FROM:<a@b> SIZE=100\r\n", "sending MAIL FROM to upstream")]
    with pytest.raises(BackendRejected) as e:
        login.receive(b"452 4.3.1 full\r\n")
    assert e.value.reply == b"452 4.3.1 full\r\n"


@pytest.mark.parametrize("replies", [
    [b"554 5.3.2 go away\r\n"],                                   # greeting
    [b"220 b\r\n", b"502 5.5.2 no EHLO\r\n"],                       # EHLO
    [b"220 b\r\n", b"250 b\r\n", b"550 5.7.1 no XCLIENT\r\n"],     # XCLIENT
    [b"220 b\r\n", b"250 b\r\n", b"250 b\r\n", b"501 5.5.4 bad\r\n"],  # client EHLO
    [b"220 b\r\n", b"250 b\r\n", b"250 b\r\n", b"250 b\r\n",
     b"535 5.7.8 fail\r\n"],                                      # AUTH
])
def test_each_rejection(make_conv, replies):
    conv = plain_conv(make_conv, proxy_smtp_auth=True)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    for reply in replies[:-1]:
        assert login.receive(reply)
    with pytest.raises(BackendRejected) as e:
        login.receive(replies[-1])
    assert e.value.reply == e.value.text == replies[-1]


def test_helo_rejection_without_xclient(make_conv):
    conv = plain_conv(make_conv, xclient=False)
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    login.receive(b"220 b\r\n")
    with pytest.raises(BackendRejected):
        login.receive(b"421 4.3.2 shutting down\r\n")


@pytest.mark.parametrize("helo, verb", [(b"EHLO c", b"EHLO"), (b"HELO c", b"HELO")])
def test_backend_starttls(make_conv, helo, verb):
    conv = plain_conv(make_conv, helo=helo, xclient=False)
    login = conv.backend_login(b"alice", b"secret", PEER, True)
    assert login.receive(b"220 b\r\n") == [step(b"EHLO mx.example.test\r\n", HELO_ACTION)]
    assert login.complete is smtp.reply_complete
    assert login.receive(b"250-b\r\n250 STARTTLS\r\n") == [
        step(b"STARTTLS\r\n", "sending STARTTLS to upstream")]
    assert login.complete is smtp.reply_complete
    assert login.receive(b"220 2.0.0 Ready to start TLS\r\n") == [
        BackendStartTLS(), step(verb + b" mx.example.test\r\n", HELO_ACTION)]
    assert login.receive(b"250 b\r\n") == [LoggedIn(AUTH_OK)]


def test_backend_starttls_then_xclient(make_conv):
    conv = plain_conv(make_conv, helo=b"HELO c")
    login = conv.backend_login(b"alice", b"secret", PEER, True)
    login.receive(b"220 b\r\n")
    login.receive(b"250 b\r\n")
    assert login.receive(b"220 go\r\n") == [BackendStartTLS(),
                                            step(b"EHLO mx.example.test\r\n", HELO_ACTION)]
    assert login.receive(b"250 b\r\n") == [
        step(b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=[UNAVAILABLE]\r\n", XCLIENT_ACTION)]


def test_backend_starttls_refused(make_conv):
    conv = plain_conv(make_conv)
    login = conv.backend_login(b"alice", b"secret", PEER, True)
    login.receive(b"220 b\r\n")
    login.receive(b"250 b\r\n")
    with pytest.raises(StartTLSRefused) as e:
        login.receive(b"454 4.7.0 TLS not available\r\n")
    assert e.value.reply == b"454 4.7.0 TLS not available\r\n"


@pytest.mark.parametrize("replies", [[b"421 busy\r\n"], [b"220 b\r\n", b"500 what\r\n"]])
def test_backend_starttls_rejections(make_conv, replies):
    conv = plain_conv(make_conv)
    login = conv.backend_login(b"alice", b"secret", PEER, True)
    for reply in replies[:-1]:
        login.receive(reply)
    with pytest.raises(BackendRejected) as e:
        login.receive(replies[-1])
    assert e.value.reply == replies[-1]


# ---- whole sessions, as a client plays them ------------------------------------------------

class Chunks:
    """Not a socket: `recv` hands out `data` at most `size` bytes at a time, then b""."""

    def __init__(self, data):
        self.data = data

    def recv(self, size):
        chunk, self.data = self.data[:size], self.data[size:]
        return chunk


class ReplyFile:
    """What smtplib reads its replies from (`SMTP.file`): the lines queued so far."""

    def __init__(self):
        self.lines = []

    def readline(self, limit=-1):
        return self.lines.pop(0) if self.lines else b""

    def close(self):
        pass


class SmtplibClient(smtplib.SMTP):
    """smtplib's own client logic (EHLO parsing, mechanism choice, SASL responses) talking to
    a conversation: what it sends goes to `conv.receive` line by line, the Reply actions come
    back through `file`; an Authenticate is answered as the login would be (`logged_in`)."""

    def __init__(self, conv, logged_in=AUTH_OK):
        super().__init__(local_hostname="client.example")     # no host: no connection
        self.conv, self.logged_in = conv, logged_in
        self.file = ReplyFile()
        self.sent, self.actions = [], []

    def send(self, s):
        data = s.encode("ascii") if isinstance(s, str) else s
        for text in data.splitlines(keepends=True):
            self.sent.append(text)
            acts = self.conv.receive(text)
            self.actions += acts
            for a in acts:
                if type(a) is Reply:
                    self.file.lines += a.data.splitlines(keepends=True)
                elif type(a) is Authenticate:
                    self.file.lines.append(self.logged_in)

    def authenticated(self):
        return only(self.actions, Authenticate)


def backend_lines(login, replies):
    """Feed `replies` to a backend login: the lines it sends, and its last actions."""
    sent, acts = [], []
    for reply in replies:
        acts = login.receive(reply)
        sent += [a.data for a in acts if type(a) is ToBackend]
    return sent, acts


def test_smtplib_login_plain(make_conv):
    client = SmtplibClient(make_conv())
    assert client.ehlo() == (250, b"mx.example.test\nAUTH PLAIN LOGIN")
    assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
    assert client.login("alice", "secret") == (235, b"2.0.0 OK")
    assert client.authenticated() == [Authenticate("plain", b"alice", b"secret")]
    assert client.conv.auth_request_fields() == {"client_host": resolver.UNAVAILABLE}
    login = client.conv.backend_login(b"alice", b"secret", PEER, False)
    assert backend_lines(login, [b"220 b\r\n", b"250 b\r\n", b"220 b\r\n", b"250 b\r\n"]) == (
        [b"EHLO mx.example.test\r\n",
         b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=[UNAVAILABLE]\r\n",
         b"EHLO client.example\r\n"], [LoggedIn(AUTH_OK)])


def test_smtplib_auth_login_initial_response(make_conv):
    client = SmtplibClient(make_conv())
    client.ehlo()
    client.user, client.password = "alice", "secret"
    assert client.auth("LOGIN", client.auth_login, initial_response_ok=True) == (235, b"2.0.0 OK")
    assert client.sent[-2:] == [b"AUTH LOGIN " + line(b64(b"alice")), line(b64(b"secret"))]
    assert client.authenticated() == [Authenticate("plain", b"alice", b"secret")]


def test_smtplib_prefers_cram_md5(make_conv):
    client = SmtplibClient(make_conv(smtp_auth="plain login cram-md5"))
    client.ehlo()
    assert "CRAM-MD5" in client.esmtp_features["auth"]
    assert client.login("alice", "secret") == (235, b"2.0.0 OK")
    salt = client.conv.salt
    assert re.fullmatch(rb"<\d+\.\d+@mx\.example\.test>", salt)
    digest = hmac.new(b"secret", salt, "md5").hexdigest().encode()
    assert client.authenticated() == [Authenticate("cram-md5", b"alice", digest)]


def test_smtplib_proxy_smtp_auth_with_xclient(make_conv):
    client = SmtplibClient(make_conv(proxy_smtp_auth="on"))
    client.ehlo()
    assert client.login("alice", "secret") == (235, b"2.0.0 OK")
    login = client.conv.backend_login(b"alice", b"secret", PEER, False)
    assert backend_lines(login, [b"220 b\r\n", b"250 b\r\n", b"220 b\r\n", b"250 b\r\n",
                                 b"235 2.7.0 ok\r\n"]) == (
        [b"EHLO mx.example.test\r\n", b"XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE]\r\n",
         b"EHLO client.example\r\n", b"AUTH PLAIN " + line(b64(b"\0alice\0secret"))],
        [LoggedIn(AUTH_OK)])


def test_smtplib_xclient_off(make_conv):
    client = SmtplibClient(make_conv(xclient="off"))
    client.ehlo()
    client.login("alice", "secret")
    login = client.conv.backend_login(b"alice", b"secret", PEER, False)
    assert backend_lines(login, [b"220 b\r\n", b"250 b\r\n"]) == (
        [b"EHLO mx.example.test\r\n"], [LoggedIn(AUTH_OK)])


def test_smtplib_none_mode(make_conv):
    client = SmtplibClient(make_conv(smtp_auth="none"), logged_in=b"250 2.1.5 Ok\r\n")
    assert client.ehlo() == (250, b"mx.example.test")
    assert client.mail("a@example.com") == (250, b"2.0.0 OK")
    assert client.rcpt("c@example.com") == (250, b"2.1.5 Ok")
    mail, rcpt = (text.rstrip(b"\r\n") for text in client.sent[-2:])
    assert client.authenticated() == [Authenticate("none", None, None)]
    assert client.conv.auth_request_fields() == {
        "client_host": resolver.UNAVAILABLE, "smtp_helo": b"client.example",
        "smtp_from": mail, "smtp_to": rcpt}
    assert mail.endswith(b"<a@example.com>") and rcpt.endswith(b"<c@example.com>")
    login = client.conv.backend_login(None, None, PEER, False)
    assert backend_lines(login, [b"220 b\r\n", b"250 b\r\n", b"220 b\r\n", b"250 b\r\n",
                                 b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n"]) == (
        [b"EHLO mx.example.test\r\n", b"XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE]\r\n",
         b"EHLO client.example\r\n", line(mail), line(rcpt)],
        [LoggedIn(b"250 2.1.5 Ok\r\n")])


def test_simple_commands_and_refusals(make_conv):
    conv = make_conv()
    play(conv, [
        (b"HELO client.example\r\n", reply(b"250 mx.example.test\r\n")),
        (b"EHLO client.example\r\n", reply(b"250-mx.example.test\r\n250 AUTH PLAIN LOGIN\r\n")),
        (b"NOOP\r\n", reply(OK)),
        (b"RSET\r\n", reply(OK)),
        (b"HELO\r\n", reply(ARGUMENT)),
        (b"EHLO a b\r\n", reply(ARGUMENT)),
        (b"AUTH\r\n", reply(ARGUMENT)),
        (b"RCPT TO:<a@b>\r\n", reply(BAD_SEQUENCE)),
    ] + [(line(verb), reply(INVALID)) for verb in (
        b"VRFY x", b"EXPN x", b"HELP", b"STARTTLS", b"DATA", b"XCLIENT ADDR=1.2.3.4")] + [
        (b"QUIT\r\n", closing(b"221 2.0.0 Bye\r\n")),
    ])


def test_rejected_mail_then_pipelined_commands(make_conv):
    conv = make_conv()
    play(conv, [
        (b"MAIL FROM:<a@b>\r\n", [Log("info", 'client was rejected: "MAIL FROM:<a@b>__"'),
                                  Reply(b"530 5.7.1 Authentication required\r\n")]),
        (b"NOOP\r\n", reply(OK)),
        (b"QUIT\r\n", closing(b"221 2.0.0 Bye\r\n")),
    ])


def test_too_long_for_smtp_client_buffer(conf):
    conv = SmtpConversation(conf("smtp", smtp_client_buffer="64"))
    assert conv.buffer_size() == 64
    reader = LineReader(Chunks(b"HELO " + b"x" * 100 + b"\r\n"), conv.buffer_size(), None)
    with pytest.raises(LineTooLong) as e:
        reader.readline()
    assert conv.too_long(e.value.data) == [
        Log("info", 'client sent too long command "HELO %s"' % ("x" * 59)), Reply(INVALID),
        CLOSE]


def test_sasl_errors_are_not_counted(make_conv):
    conv = make_conv(max_errors="2")
    play(conv, [
        (b"AUTH PLAIN\r\n", reply(b"334 \r\n")),
        (b"*\r\n", bad("client sent invalid base64 encoding in AUTH PLAIN command")),
        (b"AUTH PLAIN " + line(b64(b"nonul")),
         bad("client sent invalid login in AUTH PLAIN command")),
        (b"AUTH LOGIN a b\r\n", reply(INVALID)),
        (b"AUTH PLAIN %%%\r\n", bad("client sent invalid base64 encoding in AUTH PLAIN command")),
        (b"NOOP\r\n", reply(OK)),
    ])
    assert conv.errors == 0


def test_auth_login_prompts_after_helo_then_backend_login(make_conv):
    conv = make_conv()
    play(conv, [
        (b"HELO client.example\r\n", reply(b"250 mx.example.test\r\n")),
        (b"AUTH LOGIN\r\n", reply(USERNAME)),
        (line(b64(b"alice")), reply(PASSWORD)),
        (line(b64(b"secret")), [Authenticate("plain", b"alice", b"secret")]),
    ])
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    assert backend_lines(login, [b"220 b\r\n", b"250 b\r\n", b"220 b\r\n", b"250 b\r\n"]) == (
        [b"EHLO mx.example.test\r\n",
         b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=[UNAVAILABLE]\r\n",
         b"HELO client.example\r\n"], [LoggedIn(AUTH_OK)])


def test_multiline_backend_greeting(make_conv):
    conv = plain_conv(make_conv, helo=b"EHLO c.example")
    login = conv.backend_login(b"alice", b"secret", PEER, False)
    greeting = b"220-backend.test hello\r\n220 backend.test ESMTP\r\n"
    assert not login.complete(greeting[:24]) and login.complete(greeting)
    assert backend_lines(login, [greeting, b"250-b\r\n250 8BITMIME\r\n", b"220 b\r\n",
                                 b"250 b\r\n"]) == (
        [b"EHLO mx.example.test\r\n",
         b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=[UNAVAILABLE]\r\n",
         b"EHLO c.example\r\n"], [LoggedIn(AUTH_OK)])


def test_proxy_smtp_auth_after_client_ehlo_without_xclient(make_conv):
    conv = plain_conv(make_conv, helo=b"EHLO c", passwd=b"pw", proxy_smtp_auth="on",
                      xclient="off")
    login = conv.backend_login(b"alice", b"pw", PEER, False)
    assert backend_lines(login, [b"220 b\r\n", b"250 b\r\n", b"235 2.7.0 ok\r\n"]) == (
        [b"EHLO mx.example.test\r\n", b"AUTH PLAIN AGFsaWNlAHB3\r\n"], [LoggedIn(AUTH_OK)])


def test_none_mode_spacing_kept_and_rcpt_reply_passed_on(make_conv):
    conv = make_conv(smtp_auth="none", xclient="off")
    play(conv, [
        (b"HELO h\r\n", reply(b"250 mx.example.test\r\n")),
        (b"MAIL FROM:<a@b> SIZE=100\r\n", reply(OK)),
        (b"MAIL FROM:<x@y>\r\n", reply(BAD_SEQUENCE)),
        (b"RCPT TO:<c@d>  NOTIFY=NEVER \r\n", [Authenticate("none", None, None)]),
    ])
    assert conv.auth_request_fields()["smtp_to"] == b"RCPT TO:<c@d>  NOTIFY=NEVER"
    refused = b"550 5.1.1 <c@d>: Recipient unknown\r\n"
    login = conv.backend_login(None, None, PEER, False)
    assert backend_lines(login, [b"220 b\r\n", b"250 b\r\n", b"250 2.1.0 Ok\r\n", refused]) == (
        [b"HELO mx.example.test\r\n", b"MAIL FROM:<a@b> SIZE=100\r\n",
         b"RCPT TO:<c@d>  NOTIFY=NEVER\r\n"], [LoggedIn(refused)])


def test_none_mode_errors_ask_nothing(make_conv):
    conv = make_conv(smtp_auth="none")
    play(conv, [
        (b"RCPT TO:<a@b>\r\n", reply(BAD_SEQUENCE)),
        (b"MAIL\r\n", reply(ARGUMENT)),
        (b"MAIL FROM:<a@b>\r\n", reply(OK)),
        (b"RCPT\r\n", reply(ARGUMENT)),
        (b"RSET\r\n", reply(OK)),
        (b"RCPT TO:<a@b>\r\n", reply(BAD_SEQUENCE)),
    ])


def test_none_mode_auth_wait_then_next_rcpt(make_conv):
    conv = make_conv(smtp_auth="none")
    conv.receive(b"MAIL FROM:<a@b>\r\n")
    assert conv.receive(b"RCPT TO:<bad@x>\r\n") == [Authenticate("none", None, None)]
    res = AuthResult("FAIL", b"Recipient refused", wait=1, error_code="550 5.7.1")
    assert conv.auth_failed(res, retry=True) == reply(b"550 5.7.1 Recipient refused\r\n")
    assert conv.receive(b"RCPT TO:<good@x>\r\n") == [Authenticate("none", None, None)]
    assert conv.auth_request_fields()["smtp_to"] == b"RCPT TO:<good@x>"
    login = conv.backend_login(None, None, PEER, False)
    sent, acts = backend_lines(login, [b"220 b\r\n", b"250 b\r\n", b"220 b\r\n",
                                       b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n"])
    assert sent[2:] == [b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<good@x>\r\n"]
    assert acts == [LoggedIn(b"250 2.1.5 Ok\r\n")]


def test_none_and_plain_together(make_conv):
    conv = make_conv(smtp_auth="plain none")
    assert conv.receive(b"MAIL FROM:<a@b>\r\n") == reply(OK)
    assert conv.receive(b"AUTH PLAIN " + line(b64(b"\0alice\0pw"))) == [
        Authenticate("plain", b"alice", b"pw")]
    assert conv.auth_request_fields() == {"client_host": resolver.UNAVAILABLE}
