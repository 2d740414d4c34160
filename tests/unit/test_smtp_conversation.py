"""SMTP's client side without sockets: SmtpConversation (before login) driven by events, with
the action lists compared exactly.  The backend login (SmtpLogin) and whole sessions as smtplib
plays them are test_smtp_login.py."""

import re

import pytest

from mailproxy import resolver, sasl
from mailproxy.auth_http import AuthResult
from mailproxy.conversation import (CLOSE, Authenticate, Log, Reply, ResolveClient,
                                    RestartTimer, StartTLS, WaitQuiet)
from mailproxy.smtp import SmtpConversation
from playbook import (SMTP_ARGUMENT as ARGUMENT, SMTP_BAD_SEQUENCE as BAD_SEQUENCE,
                      SMTP_INVALID as INVALID, SMTP_OK as OK, SMTP_PASSWORD as PASSWORD,
                      SMTP_USERNAME as USERNAME)
from playbook import DIGEST as CRAM_DIGEST, b64, line, reply, smtp_sasl_error as bad

GREETING = b"220 mx.example.test ESMTP ready\r\n"


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
