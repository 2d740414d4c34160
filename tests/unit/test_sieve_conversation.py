"""ManageSieve without sockets: SieveConversation and SieveLogin (sieve.py) fed client lines and
backend replies, their actions compared exactly; the parser over several inputs."""

import base64

import pytest

from mailproxy import config
from mailproxy.clientio import BackendRejected, Refused
from mailproxy.conversation import (CLOSE, Authenticate, BackendStartTLS, LoggedIn, Log, Peer,
                                    Reply, StartTLS, StartTLSRefused, ToBackend)
from mailproxy.sieve import (ParseError, SieveConversation, SieveLogin, TooLong, _NeedMore,
                             capability_lines, parse_command, parse_response, quote,
                             reply_lines, status_complete, step_complete)
from playbook import auth_fail, closing, logs, replies, reply

CAPS = (b'"IMPLEMENTATION" "mailproxy"\r\n'
        b'"SIEVE" "fileinto reject envelope encoded-character vacation subaddress '
        b'comparator-i;ascii-numeric relational regex imap4flags copy include variables body '
        b'enotify environment mailbox date index ihave duplicate mime foreverypart '
        b'extracttext"\r\n"NOTIFY" "mailto"\r\n"VERSION" "1.0"\r\n')
READY = b'OK "ManageSieve ready"\r\n'
INVALID = b'NO "Invalid command"\r\n'
NO_MECH = b'NO "Unsupported authentication mechanism"\r\n'
PEER = Peer("192.0.2.7", 50000)


def b64(data):
    return base64.b64encode(data)


def info(why):
    return Log("info", "client sent invalid command: " + why)


@pytest.fixture
def sieve(conf):
    """sieve(tls=False, **directives) -> a SieveConversation past its greeting."""
    def make(tls=False, **directives):
        conv = SieveConversation(conf("sieve", **directives), tls=tls)
        conv.start()
        return conv
    return make


# ---- greeting and capabilities ----------------------------------------------------------------

def test_greeting_is_the_capability_list_then_ok(conf):
    conv = SieveConversation(conf("sieve"))
    assert conv.start() == reply(CAPS + b'"SASL" "PLAIN"\r\n' + READY)


@pytest.mark.parametrize("starttls,tls,tail", [
    ("off", False, b'"SASL" "PLAIN LOGIN XOAUTH2"\r\n'),
    ("on", False, b'"SASL" "PLAIN LOGIN XOAUTH2"\r\n"STARTTLS"\r\n'),
    ("only", False, b'"SASL" ""\r\n"STARTTLS"\r\n'),
    ("only", True, b'"SASL" "PLAIN LOGIN XOAUTH2"\r\n'),
])
def test_capability_command(sieve, starttls, tls, tail):
    conv = sieve(tls=tls, starttls=starttls, sieve_auth="xoauth2 login plain")
    assert conv.receive(b"capability\r\n") == reply(CAPS + tail + b'OK "Capability completed"\r\n')


def test_capabilities_as_configured_quoted(conf):
    c = conf("sieve", sieve_capabilities='"implementation my \\"proxy\\" \\\\ 1" VERSION')
    assert capability_lines(c, False) == (b'"IMPLEMENTATION" "my \\"proxy\\" \\\\ 1"\r\n'
                                          b'"VERSION"\r\n"SASL" "PLAIN"\r\n')


@pytest.mark.parametrize("value,why", [
    ('"SASL PLAIN"', "other than SASL"),
    ("starttls", "other than SASL"),
    ('"bad:name x"', "a capability name"),
    ('"NAME x\\ty"', "without control characters"),
])
def test_sieve_capabilities_refused_at_load(tmp_path, value, why):
    path = tmp_path / "caps.ini"
    path.write_text("[server s]\nlisten = 127.0.0.1:4190\nproxy_pass = 127.0.0.1:1\n"
                    "sieve_capabilities = %s\n" % value)
    with pytest.raises(config.ConfigError) as e:
        config.load(str(path))
    assert why in str(e.value) and '"sieve_capabilities"' in str(e.value)
    assert (e.value.line, e.value.key) == (4, "sieve_capabilities")


def test_port_4190_implies_sieve(tmp_path):
    path = tmp_path / "guess.ini"
    path.write_text("[server s]\nlisten = 127.0.0.1:4190\nproxy_pass = 127.0.0.1:1\n")
    assert config.load(str(path)).servers[0].protocol == "sieve"


def test_defaults(conf):
    c = conf("sieve")
    assert (c.sieve_auth, c.sieve_client_buffer) == (["plain"], 8192)


# ---- simple commands ----------------------------------------------------------------------------

def test_noop_logout(sieve):
    conv = sieve()
    assert conv.receive(b"NOOP\r\n") == reply(b'OK "NOOP completed"\r\n')
    assert conv.receive(b'NOOP "a \\"b\\""\r\n') == reply(b'OK (TAG "a \\"b\\"") "Done"\r\n')
    assert conv.receive(b"NOOP {3+}\r\n") == []
    assert conv.receive(b"a\0b") == []
    assert conv.receive(b"\r\n") == [info("bad NOOP argument"), Reply(INVALID)]
    for bad in (b"NOOP 12\r\n", b'NOOP "a" "b"\r\n'):
        assert conv.receive(bad) == [info("bad NOOP argument"), Reply(INVALID)]
    assert conv.errors == 0                             # refused, not parser errors
    assert conv.receive(b"logout\r\n") == closing(b'OK "Logout completed"\r\n')


def test_capability_with_arguments(sieve):
    assert sieve().receive(b'CAPABILITY "x"\r\n') == \
        [info("CAPABILITY with arguments"), Reply(INVALID)]


@pytest.mark.parametrize("starttls,tls,ok", [("on", False, True), ("only", False, True),
                                             ("off", False, False), ("on", True, False)])
def test_starttls(sieve, starttls, tls, ok):
    conv = sieve(tls=tls, starttls=starttls)
    out = conv.receive(b"STARTTLS\r\n")
    if not ok:
        assert out == [info("STARTTLS not offered"), Reply(INVALID)]
        return
    assert out == [StartTLS(b'OK "Begin TLS negotiation now"\r\n')]
    # RFC 5804 section 2.2: the capabilities again, without STARTTLS, then OK
    assert conv.tls_started() == reply(CAPS + b'"SASL" "PLAIN"\r\n'
                                       + b'OK "TLS negotiation successful"\r\n')
    assert conv.tls


def test_starttls_with_arguments(sieve):
    assert sieve(starttls="on").receive(b'STARTTLS "x"\r\n') == \
        [info("STARTTLS not offered"), Reply(INVALID)]


# ---- errors, max_errors, too long -----------------------------------------------------------------

@pytest.mark.parametrize("data,why", [
    (b"\r\n", "bad command word"),
    (b"1NOOP\r\n", "bad command word"),
    (b"NOOP\r \r\n", "CR not followed by LF"),
    (b"NOOP  \"x\"\r\n", "bad argument"),
    (b'NOOP"x"\r\n', "no space between arguments"),
    (b'NOOP "x\r\n', "bad quoted string"),
    (b'NOOP "a\\b"\r\n', "bad quoted string"),
    (b'NOOP "' + b"x" * 1025 + b'"\r\n', "quoted string too long"),
    (b"NOOP {3\r\n", "bad literal"),
    (b"NOOP {3+} \r\n", "bad literal"),
    (b'NOOP "a" "b" "c" "d"\r\n', "too many arguments"),
    (b"FOO\r\n", "unknown command"),
    (b'NOOP "a"x\r\n', "no space between arguments"),
])
def test_parse_errors(sieve, data, why):
    conv = sieve()
    assert conv.receive(data) == [info(why), Reply(INVALID)]
    assert conv.errors == 1


def test_commands_after_login_are_refused_and_counted(sieve):
    conv = sieve(max_errors=2)
    assert conv.receive(b'PUTSCRIPT "s" {4+}\r\n') == []
    assert conv.receive(b"keep") == []
    assert conv.receive(b"\r\n") == [info("PUTSCRIPT before login"),
                                     Reply(b'NO "Authenticate first"\r\n')]
    assert conv.receive(b"LISTSCRIPTS\r\n") == [
        info("LISTSCRIPTS before login"), Log("info", "client sent too many invalid commands"),
        Reply(b'BYE "Too many invalid commands"\r\n'), CLOSE]


def test_literal_inputs_and_budget(sieve):
    conv = sieve(sieve_client_buffer="64")
    assert conv.next_input() == ("line", None)
    assert conv.receive(b"NOOP {5}\r\n") == []          # no continuation said for {n} either
    assert conv.next_input() == ("bytes", 5)
    assert conv.receive(b"hello") == []
    assert conv.next_input() == ("line", 64 - 10 - 5)
    assert conv.receive(b"\r\n") == reply(b'OK (TAG "hello") "Done"\r\n')
    assert conv.next_input() == ("line", None)
    assert conv.receive(b"NOOP {0+}\r\n") == []
    assert conv.next_input() == ("line", 64 - 11)
    assert conv.receive(b"\n") == reply(b'OK (TAG "") "Done"\r\n')


def test_literal_beyond_the_buffer_closes(sieve):
    conv = sieve(sieve_client_buffer="64")
    out = conv.receive(b"NOOP {60+}\r\n")
    assert out == [Log("info", 'client sent too long command "NOOP {60+}\\r\\n"'),
                   Reply(b'BYE "Too long command"\r\n'), CLOSE]


def test_line_after_literal_beyond_the_buffer(sieve):
    conv = sieve(sieve_client_buffer="32")
    conv.receive(b"NOOP {4+}\r\n")
    conv.receive(b"abcd")
    # the session's reader cut the line at the budget: too_long() logs the command whole
    assert conv.too_long(b"x" * 17) == [
        Log("info", 'client sent too long command "NOOP {4+}\\r\\nabcd' + "x" * 17 + '"'),
        Reply(b'BYE "Too long command"\r\n'), CLOSE]


def test_scanner_limits():
    with pytest.raises(TooLong):
        parse_command([b"NOOP" + b" " * 20 + b"\r\n"], 16)
    with pytest.raises(TooLong):                    # a line after the literal past the budget
        parse_command([b"NOOP {2+}\r\n", b"ab", b" " * 10 + b"\r\n"], 24)
    with pytest.raises(_NeedMore) as e:
        parse_command([b"NOOP {2+}\r\n", b"ab"], 24)
    assert (e.value.kind, e.value.size) == ("line", 24 - 11 - 2)
    with pytest.raises(ParseError):
        parse_response([b"{2+}\r\n", b"ab", b" x\r\n"], 64)
    assert parse_command([b'AUTHENTICATE "PLAIN" 12\r\n'], 64) == ("AUTHENTICATE",
                                                                   [b"PLAIN", 12])


# ---- AUTHENTICATE -------------------------------------------------------------------------------------

def test_plain_with_initial_response_quoted_and_literal(sieve):
    conv = sieve()
    assert conv.receive(b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64(b"\0alice\0secret")) == \
        [Authenticate("plain", b"alice", b"secret")]
    conv = sieve()
    token = b64(b"\0alice\0p w\"\\")
    assert conv.receive(b'Authenticate "plain" {%d+}\r\n' % len(token)) == []
    assert conv.receive(token) == []
    assert conv.receive(b"\r\n") == [Authenticate("plain", b"alice", b'p w"\\')]


def test_plain_with_continuation(sieve):
    conv = sieve()
    assert conv.receive(b'AUTHENTICATE "PLAIN"\r\n') == reply(b'""\r\n')
    token = b64(b"\0alice\0secret")
    assert conv.receive(b"{%d}\r\n" % len(token)) == []
    assert conv.next_input() == ("bytes", len(token))
    assert conv.receive(token) == []
    assert conv.receive(b"\r\n") == [Authenticate("plain", b"alice", b"secret")]


def test_login_steps(sieve):
    conv = sieve(sieve_auth="login")
    assert conv.receive(b'AUTHENTICATE "LOGIN"\r\n') == reply(b'"VXNlcm5hbWU6"\r\n')
    assert conv.receive(b'"%s"\r\n' % b64(b"alice")) == reply(b'"UGFzc3dvcmQ6"\r\n')
    assert conv.receive(b'"%s"\r\n' % b64(b"secret")) == [Authenticate("plain", b"alice",
                                                                      b"secret")]
    conv = sieve(sieve_auth="login")
    assert conv.receive(b'AUTHENTICATE "LOGIN" "%s"\r\n' % b64(b"alice")) == \
        reply(b'"UGFzc3dvcmQ6"\r\n')


def test_cram_md5_and_external(sieve):
    conv = sieve(sieve_auth="cram-md5 external")
    out = conv.receive(b'AUTHENTICATE "CRAM-MD5"\r\n')
    assert replies(out)[0] == b'"' + base64.b64encode(conv.salt) + b'"\r\n'
    digest = b"0123456789abcdef0123456789abcdef"
    assert conv.receive(b'"%s"\r\n' % b64(b"alice " + digest)) == \
        [Authenticate("cram-md5", b"alice", digest)]
    conv = sieve(sieve_auth="external")
    assert conv.receive(b'AUTHENTICATE "EXTERNAL"\r\n') == reply(b'"VXNlcm5hbWU6"\r\n')
    assert conv.receive(b'"%s"\r\n' % b64(b"alice")) == [Authenticate("external", b"alice", b"")]
    conv = sieve(sieve_auth="external")
    assert conv.receive(b'AUTHENTICATE "EXTERNAL" "%s"\r\n' % b64(b"bob")) == \
        [Authenticate("external", b"bob", b"")]


@pytest.mark.parametrize("command", [
    b'AUTHENTICATE "LOGIN"', b'AUTHENTICATE "CRAM-MD5"', b'AUTHENTICATE "EXTERNAL"',
    b'AUTHENTICATE "OAUTHBEARER"', b'AUTHENTICATE "DIGEST-MD5"',
])
def test_mechanisms_not_enabled(sieve, command):
    assert sieve().receive(command + b"\r\n") == [info("unsupported mechanism"), Reply(NO_MECH)]


@pytest.mark.parametrize("command", [b"AUTHENTICATE", b'AUTHENTICATE "PLAIN" "x" "y"',
                                     b"AUTHENTICATE 12"])
def test_authenticate_bad_arguments(sieve, command):
    assert sieve().receive(command + b"\r\n") == \
        [info("bad AUTHENTICATE arguments"), Reply(INVALID)]


def test_authenticate_needs_starttls_first(sieve):
    assert sieve(starttls="only").receive(b'AUTHENTICATE "PLAIN"\r\n') == [
        info("AUTHENTICATE before STARTTLS"),
        Reply(b'NO (ENCRYPT-NEEDED) "Use STARTTLS first"\r\n')]


@pytest.mark.parametrize("cancel", [b'"*"\r\n', b"*\r\n"])
def test_cancel(sieve, cancel):
    conv = sieve()
    conv.receive(b'AUTHENTICATE "PLAIN"\r\n')
    assert conv.receive(cancel) == [Log("info", "client cancelled authentication"),
                                    Reply(b'NO "Authentication cancelled"\r\n')]
    assert conv.receive(b"NOOP\r\n") == reply(b'OK "NOOP completed"\r\n')


def test_bad_sasl_responses(sieve):
    conv = sieve()
    conv.receive(b'AUTHENTICATE "PLAIN"\r\n')
    assert conv.receive(b'"%s" x\r\n' % b64(b"\0a\0b")) == [info("bad SASL response"),
                                                          Reply(INVALID)]
    assert conv.expect is None and conv.errors == 1
    conv.receive(b'AUTHENTICATE "PLAIN"\r\n')
    assert conv.receive(b'"!!"\r\n') == [
        Log("info", "client sent invalid base64 encoding in AUTH PLAIN command"), Reply(INVALID)]
    assert conv.receive(b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64(b"\0al\nice\0x")) == \
        [Log("info", "client sent invalid login in AUTH PLAIN command"), Reply(INVALID)]


def test_unsafe_credentials_refused(sieve, monkeypatch):
    conv = sieve()

    def refuse(*args):
        raise Refused()
    monkeypatch.setattr(conv, "auth_plain", refuse)
    assert conv.receive(b'AUTHENTICATE "PLAIN" "x"\r\n') == \
        [info("unsafe credentials"), Reply(INVALID)]


def test_auth_failed_quotes_the_message_and_retries(sieve):
    conv = sieve()
    conv.receive(b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64(b"\0alice\0bad"))
    assert conv.auth_failed(auth_fail(b'Bad "pass" \\'), retry=True) == \
        reply(b'NO "Bad \\"pass\\" \\\\"\r\n')
    assert conv.login is None
    conv.receive(b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64(b"\0alice\0bad"))
    assert conv.auth_failed(auth_fail(), retry=False) == \
        closing(b'NO "Invalid login or password"\r\n')


def test_token_login_and_error_challenge(sieve):
    conv = sieve(sieve_auth="oauthbearer xoauth2")
    response = b64(b"n,a=alice,\x01auth=Bearer tok\x01\x01")
    assert conv.receive(b'AUTHENTICATE "OAUTHBEARER" "%s"\r\n' % response) == \
        [Authenticate("oauthbearer", b"alice", b"tok")]
    challenge = b64(b'{"status":"invalid_token"}')
    out = conv.auth_failed(auth_fail(b"expired", sasl_error=challenge), retry=False)
    assert out == reply(b'"%s"\r\n' % challenge)
    # the dummy response as a literal: the failure once it is whole
    assert conv.receive(b"{4+}\r\n") == []
    assert conv.receive(b"AQ==") == []
    assert conv.receive(b"\r\n") == closing(b'NO "expired"\r\n')
    conv = sieve(sieve_auth="xoauth2")
    assert conv.receive(b'AUTHENTICATE "XOAUTH2"\r\n') == reply(b'""\r\n')
    conv.receive(b'"%s"\r\n' % b64(b"user=bob\x01auth=Bearer t2\x01\x01"))
    assert (conv.method, conv.login, conv.passwd) == ("xoauth2", b"bob", b"t2")
    out = conv.auth_failed(auth_fail(b"no", sasl_error=challenge), retry=True)
    assert conv.receive(b"garbage \"\r\n") == reply(b'NO "no"\r\n')      # any answer
    assert conv.receive(b"NOOP\r\n") == reply(b'OK "NOOP completed"\r\n')


def test_backend_login_built_from_the_conversation(sieve):
    conv = sieve(sieve_auth="xoauth2")
    conv.receive(b'AUTHENTICATE "XOAUTH2" "%s"\r\n' % b64(b"user=bob\x01auth=Bearer t\x01\x01"))
    login = conv.backend_login(b"bob", b"t", PEER, True)
    assert (login.user, login.passwd, login.starttls, login.mech) == (b"bob", b"t", True,
                                                                      "xoauth2")
    conv.backend_method = "plain"
    login = conv.backend_login(b"bob", None, PEER, False)
    assert (login.passwd, login.mech) == (b"", None)


# ---- the backend login ---------------------------------------------------------------------------

GREETING = (b'"IMPLEMENTATION" "Dovecot Pigeonhole"\r\n"SASL" "PLAIN"\r\n"STARTTLS"\r\n'
            b'"VERSION" "1.0"\r\nOK "Dovecot ready."\r\n')
PLAIN = b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64(b"\0alice\0secret")


def test_reply_completion():
    assert not status_complete(b'"IMPLEMENTATION" "x"\r\n')
    assert status_complete(GREETING)
    assert not status_complete(b'"X" {10}\r\nOK "a"\r\n')     # OK inside a literal
    assert status_complete(b'"X" {4}\r\nOK\r\n\r\nOK\r\n')
    assert reply_lines(b'"X" {4}\r\nab\r\n\r\nOK\r\n') == [b'"X" {4}\r\nab\r\n\r\n', b"OK\r\n"]
    assert not step_complete(b"OKAY\r\n")
    assert step_complete(b'"challenge"\r\n') and step_complete(b"{2}\r\nab\r\n")
    assert step_complete(b'NO (TRYLATER) "x"\r\n') and step_complete(b"BYE\r\n")


def test_backend_plain_login():
    login = SieveLogin(b"alice", b"secret")
    assert login.complete is status_complete
    assert login.receive(GREETING) == [ToBackend(PLAIN, "sending password to upstream")]
    assert (login.state, login.complete) == ("auth", step_complete)
    assert login.receive(b'OK "Logged in."\r\n') == [LoggedIn(b'OK "Logged in."\r\n')]


def test_backend_refusals():
    with pytest.raises(BackendRejected) as e:
        SieveLogin(b"alice", b"x").receive(b'"IMPLEMENTATION" "x"\r\nBYE "Too busy"\r\n')
    assert e.value.text == b'BYE "Too busy"\r\n'
    login = SieveLogin(b"alice", b"x")
    login.receive(GREETING)
    with pytest.raises(BackendRejected) as e:
        login.receive(b'NO "Authentication failed."\r\n')
    assert (e.value.reply, e.value.refused) == (b'NO "Authentication failed."\r\n', False)


def test_backend_starttls():
    login = SieveLogin(b"alice", b"secret", starttls=True)
    assert login.receive(GREETING) == [ToBackend(b"STARTTLS\r\n", "sending STARTTLS to upstream")]
    assert login.receive(b'OK "Begin TLS negotiation now."\r\n') == [BackendStartTLS()]
    assert (login.state, login.complete) == ("capabilities", status_complete)
    assert login.receive(GREETING) == [ToBackend(PLAIN, "sending password to upstream")]
    refused = SieveLogin(b"alice", b"secret", starttls=True)
    refused.receive(GREETING)
    with pytest.raises(StartTLSRefused) as e:
        refused.receive(b'NO "TLS not available"\r\n')
    assert e.value.reply == b'NO "TLS not available"\r\n'


def test_backend_token_login():
    login = SieveLogin(b"bob", b"tok", mech="oauthbearer")
    response = b64(b"n,a=bob,\x01auth=Bearer tok\x01\x01")
    assert login.receive(GREETING) == [ToBackend(
        b'AUTHENTICATE "OAUTHBEARER" "%s"\r\n' % response, "sending token to upstream")]
    assert login.receive(b'OK "Logged in."\r\n') == [LoggedIn(b'OK "Logged in."\r\n')]
    login = SieveLogin(b"bob", b"tok", mech="xoauth2")
    login.receive(GREETING)
    assert login.receive(b'"eyJzdGF0dXMiOiI0MDEifQ=="\r\n') == \
        [ToBackend(b'""\r\n', "sending token to upstream")]
    with pytest.raises(BackendRejected) as e:
        login.receive(b'NO "Invalid token"\r\n')
    assert e.value.refused and e.value.text == b'NO "Invalid token"\r\n'
    login = SieveLogin(b"bob", b"tok", mech="oauthbearer")
    login.receive(GREETING)
    assert login.receive(b"{4}\r\nabcd\r\n") == [ToBackend(b'"AQ=="\r\n',
                                                          "sending token to upstream")]
    login = SieveLogin(b"bob", b"tok", mech="oauthbearer")
    login.receive(GREETING)
    with pytest.raises(BackendRejected) as e:
        login.receive(b'NO "Invalid token"\r\n')
    assert e.value.refused



def test_backend_error_challenge_goes_to_the_client():
    # the backend's error challenge (a string) travels with its refusal, as IMAP's and POP3's
    # do, so that the client gets it before the NO; anything but canonical base64 stays out
    for line, challenge in ((b'"eyJzdGF0dXMiOiI0MDEifQ=="\r\n', b"eyJzdGF0dXMiOiI0MDEifQ=="),
                            (b'"not base64!"\r\n', None), (b"{4}\r\nabcd\r\n", b"abcd"),
                            (b'"eyJ\\"x"\r\n', None), (b'"eyJ\r\n', None)):
        login = SieveLogin(b"bob", b"tok", mech="oauthbearer")
        login.receive(GREETING)
        login.receive(line)
        with pytest.raises(BackendRejected) as e:
            login.receive(b'NO "Invalid token"\r\n')
        assert e.value.refused and e.value.challenge == challenge, line

def test_quote():
    assert quote("é\"\\") == '"é\\"\\\\"'.encode()
    assert quote(b"x") == b'"x"'


def test_unused_helpers_of_the_playbook_still_apply(sieve):
    # logs() and replies() read sieve's actions as the others'
    out = sieve().receive(b"FOO\r\n")
    assert logs(out) == [("info", "client sent invalid command: unknown command")]
    assert replies(out) == [INVALID]


def test_debug_trace_masks_sieve_credentials():
    from mailproxy import trace
    assert trace.client_line("sieve", b'AUTHENTICATE "PLAIN" "AGFsaWNlAHNlY3JldA=="\r\n') == \
        "AUTHENTICATE \\x22PLAIN\\x22 ***"
    assert trace.client_line("sieve", b'"c2VjcmV0"\r\n', sasl=True) == "***"
    assert trace.backend_line(PLAIN, "sending password to upstream") == "***"
