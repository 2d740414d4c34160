"""conversation.py's shared behaviour (parser-error counting, the credential check, action
order) on a minimal Conversation, and protocols.py's descriptors."""

import pytest

from mailproxy import conversation
from mailproxy.clientio import Refused
from mailproxy.conversation import (CLOSE, Authenticate, BackendLogin, Conversation, Log, Peer,
                                    Reply, StartTLS, ToBackend, safe_credential)
from mailproxy.pop3 import Pop3Conversation
from mailproxy.protocols import PORTS, PROTOCOLS
from playbook import closing, reply

BAD = b"BAD\r\n"


class Echo(Conversation):
    """A toy protocol: each line is a command word, the handlers below say what it does."""

    protocol = "pop3"
    INVALID = b"INVALID\r\n"

    def greeting(self):
        self.say(b"hello\r\n")

    def handle_line(self, line):
        getattr(self, "do_" + line.strip().decode().split(" ")[0])(line)

    def auth_failed_reply(self, result):
        return b"no: " + result + b"\r\n"

    def do_bad(self, line):
        self.parse_error(BAD)

    def do_many(self, line):
        self.say(b"one\r\n")
        self.log("info", "two")
        self.say(b"")                   # nothing to send: no action
        self.say(b"three\r\n")

    def do_stop(self, line):
        self.say(b"before\r\n")
        self.stop()
        self.say(b"never\r\n")          # pragma: no cover

    def do_bye(self, line):
        self.finish(b"bye\r\n")

    def do_silent(self, line):
        self.finish()

    def do_tls(self, line):
        self.start_tls(b"go\r\n")

    def do_login(self, line):
        _, login, passwd = line.rstrip(b"\r\n").split(b" ")
        self.say(b"checking\r\n")
        self.authenticate("plain", login.replace(b"%", b"\x00"), passwd.replace(b"%", b"\r"))
        self.say(b"never\r\n")          # pragma: no cover


@pytest.fixture
def echo(conf):
    def make(**directives):
        return Echo(conf("pop3", **directives))
    return make


def test_start_and_receive_return_the_queued_actions_in_order(echo):
    conv = echo()
    assert conv.start() == reply(b"hello\r\n")
    assert conv.receive(b"many\r\n") == [Reply(b"one\r\n"), Log("info", "two"),
                                         Reply(b"three\r\n")]
    assert conv._take() == []           # taken: nothing is returned twice


def test_stop_and_finish_end_the_handler(echo):
    conv = echo()
    assert conv.receive(b"stop\r\n") == reply(b"before\r\n")
    assert conv.receive(b"bye\r\n") == closing(b"bye\r\n")
    assert conv.receive(b"silent\r\n") == [CLOSE]


def test_start_tls_action(echo):
    conv = echo()
    assert conv.receive(b"tls\r\n") == [StartTLS(b"go\r\n")]
    assert conv.tls is False
    assert conv.tls_started() == [] and conv.tls is True


@pytest.mark.parametrize("max_errors, closes_at", [("1", 1), ("3", 3), ("5", 5)])
def test_parse_errors_count_towards_max_errors(echo, max_errors, closes_at):
    conv = echo(max_errors=max_errors)
    for i in range(1, closes_at):
        assert conv.receive(b"bad\r\n") == reply(BAD)
        assert conv.errors == i
    assert conv.receive(b"bad\r\n") == [Log("info", "client sent too many invalid commands"),
                                        Reply(BAD), CLOSE]


def test_authenticate_queues_after_earlier_actions(echo):
    conv = echo()
    assert conv.receive(b"login bob pw\r\n") == [Reply(b"checking\r\n"),
                                                 Authenticate("plain", b"bob", b"pw")]
    assert (conv.method, conv.login, conv.passwd) == ("plain", b"bob", b"pw")


@pytest.mark.parametrize("line", [b"login b%b pw\r\n", b"login bob p%w\r\n"])
def test_authenticate_refuses_cr_lf_nul(echo, line):
    # the protocol's handler turns Refused into its invalid-command reply
    conv = echo()
    with pytest.raises(Refused):
        conv.receive(line)
    assert (conv.method, conv.login, conv.passwd) == (None, None, None)


def test_safe_credential():
    assert safe_credential(None) and safe_credential(b"") and safe_credential(b"a b\t")
    for bad in (b"a\rb", b"a\nb", b"a\x00b"):
        assert not safe_credential(bad)


def test_too_long_logs_answers_and_closes(echo):
    # the text is cut at 1024 bytes (sanitize marks the cut)
    assert echo().too_long(b"x" * 2000) == [
        Log("info", 'client sent too long command "%s..."' % ("x" * 1024)),
        Reply(b"INVALID\r\n"), CLOSE]


@pytest.mark.parametrize("retry", [True, False])
def test_auth_failed_forgets_the_credentials_only_on_retry(echo, retry):
    conv = echo()
    conv.receive(b"login bob pw\r\n")
    got = conv.auth_failed(b"nope", retry=retry)
    if retry:
        assert got == reply(b"no: nope\r\n")
        assert (conv.method, conv.login, conv.passwd, conv.expect) == (None,) * 4
    else:
        assert got == closing(b"no: nope\r\n")
        assert conv.login == b"bob"


def test_defaults(echo):
    conv = echo()
    assert conv.next_input() == ("line", None)
    assert conv.too_long_reply(b"x") == b"INVALID\r\n"
    assert conv.auth_request_fields() == {}
    assert conv.reset() is None
    for call in (conv.buffer_size, lambda: Conversation.greeting(conv),
                 lambda: Conversation.handle_line(conv, b"x\r\n"),
                 lambda: Conversation.auth_failed_reply(conv, None),
                 lambda: conv.backend_login(b"u", b"p", None, False)):
        with pytest.raises(NotImplementedError):
            call()


@pytest.mark.parametrize("protocol, methods, words", [
    ("pop3", ["external", "cram-md5", "plain", "apop"],
     ["PLAIN", "LOGIN", "CRAM-MD5", "EXTERNAL"]),
    ("pop3", ["apop"], []),
    ("imap", ["external", "login", "plain"], ["AUTH=PLAIN", "AUTH=LOGIN", "AUTH=EXTERNAL"]),
    ("smtp", ["cram-md5", "login"], ["LOGIN", "CRAM-MD5"]),
    ("sieve", ["xoauth2", "external", "login", "plain"], ["PLAIN", "LOGIN", "EXTERNAL", "XOAUTH2"]),
])
def test_mechanisms_in_the_protocols_order(echo, protocol, methods, words):
    conv = echo()
    conv.protocol = protocol
    conv.descriptor = PROTOCOLS[protocol]
    assert conv.mechanisms(methods) == words


class Steps(BackendLogin):
    def on_greeting(self, reply):
        return [self.send(b"A\r\n", "sending A", "a", complete=len)]

    def on_a(self, reply):
        return [self.send(b"B\r\n", "sending B", "b", discard=True)]


def test_backend_login_dispatches_on_its_state():
    login = Steps()
    assert (login.state, login.complete) == ("greeting", None)
    assert login.receive(b"hi\r\n") == [ToBackend(b"A\r\n", "sending A")]
    assert (login.state, login.complete) == ("a", len)
    assert login.receive(b"ok\r\n") == [ToBackend(b"B\r\n", "sending B", discard=True)]
    assert (login.state, login.complete) == ("b", None)
    with pytest.raises(AttributeError):
        login.receive(b"more\r\n")          # no step awaits a reply in state "b"


def test_starttls_refused_and_login_error():
    e = conversation.StartTLSRefused(b"-ERR no\r\n")
    assert (str(e), e.reply) == ("upstream refused STARTTLS", b"-ERR no\r\n")
    assert str(conversation.LoginError("upstream sent no greeting")) == \
        "upstream sent no greeting"


# ---- protocols.py --------------------------------------------------------------------------

@pytest.mark.parametrize("protocol, busy", [
    ("pop3", b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"),
    ("imap", b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"),
    ("smtp", b"421 4.7.0 mx.example.test Too many connections, try again later\r\n"),
    ("sieve", b'BYE (TRYLATER) "Too many connections, try again later"\r\n'),
])
def test_busy_reply(conf, protocol, busy):
    assert PROTOCOLS[protocol].busy_reply(conf(protocol)) == busy


def test_smtp_busy_reply_names_the_server_in_utf8(conf):
    c = conf("smtp", server_name="mx.bücher.test")
    assert PROTOCOLS["smtp"].busy_reply(c) == \
        "421 4.7.0 mx.bücher.test Too many connections, try again later\r\n".encode()


@pytest.mark.parametrize("protocol, internal, cert_error, no_cert", [
    ("pop3", b"-ERR internal server error\r\n", b"-ERR SSL certificate error\r\n",
     b"-ERR No required SSL certificate\r\n"),
    ("imap", b"* BAD internal server error\r\n", b"* BYE SSL certificate error\r\n",
     b"* BYE No required SSL certificate\r\n"),
    ("smtp", b"451 4.3.2 Internal server error\r\n", b"421 4.7.1 SSL certificate error\r\n",
     b"421 4.7.1 No required SSL certificate\r\n"),
    ("sieve", b'BYE (TRYLATER) "Internal server error"\r\n', b'BYE "SSL certificate error"\r\n',
     b'BYE "No required SSL certificate"\r\n'),
])
def test_descriptor_replies(protocol, internal, cert_error, no_cert):
    p = PROTOCOLS[protocol]
    alpn = {"sieve": b"managesieve"}.get(protocol, protocol.encode())     # IANA's ALPN ids
    assert (p.name, p.alpn) == (protocol, alpn)
    assert (p.internal_error, p.cert_error, p.no_cert) == (internal, cert_error, no_cert)


def test_ports_imply_protocols():
    assert PORTS == {110: "pop3", 995: "pop3", 143: "imap", 993: "imap",
                     25: "smtp", 465: "smtp", 587: "smtp", 4190: "sieve"}


def test_each_descriptor_names_its_conversation():
    from mailproxy.imap import ImapConversation
    from mailproxy.smtp import SmtpConversation
    assert PROTOCOLS["pop3"].conversation is Pop3Conversation
    assert PROTOCOLS["imap"].conversation is ImapConversation
    assert PROTOCOLS["smtp"].conversation is SmtpConversation
    from mailproxy.sieve import SieveConversation
    assert PROTOCOLS["sieve"].conversation is SieveConversation
    for name, proto in PROTOCOLS.items():
        assert proto.conversation.protocol == name and proto.conversation.descriptor is proto
    from mailproxy.listeners import Listener
    from mailproxy.session import Session
    assert Listener.session_class is Session


def test_peer_asks_for_the_local_address_once_and_only_when_read():
    calls = []

    def sockname():
        calls.append(1)
        return ("127.0.0.1", 110)
    peer = Peer("192.0.2.7", 40000, sockname=sockname)
    assert (peer.ip, peer.port, peer.proxied_local) == ("192.0.2.7", 40000, None)
    assert calls == []                      # a POP3 login never reads it: no system call
    assert peer.local == ("127.0.0.1", 110) and peer.local == ("127.0.0.1", 110)
    assert calls == [1]
    assert Peer("192.0.2.7", 1, ("::1", 25)).local == ("::1", 25)
