"""session.py, the one place that performs a conversation's actions, driven without sockets:
the Session gets objects that are not sockets (playbook's FakeSock), a real Runtime with a fake
relay, and, where it would reach the auth service, backend or TLS, fakes patched into those
modules.
Every step lands on one timeline (`events`), so tests assert the order of sends, logs,
handshakes and backend commands."""

from types import SimpleNamespace

import pytest

from mailproxy import auth_http, backend, live, metrics, tls
from mailproxy.clientio import BackendRejected, Close, HandedOver
from mailproxy.config.types import MainConf
from mailproxy.conversation import (CLOSE, Authenticate, BackendLogin, BackendStartTLS,
                                    LoggedIn, Log, LoginError, Reply, ToBackend)
from mailproxy.pop3 import Pop3Login
from mailproxy.runtime import Runtime
from mailproxy.session import Session
from playbook import FakeSock, RecordingLog, b64, sent

CLIENT = ("192.0.2.7", 5555)
CONTEXT = ", client: 192.0.2.7, server: 127.0.0.1:110"
INTERNAL = b"-ERR internal server error\r\n"


class FakeRelay:
    def __init__(self, events):
        self.events = events

    def add(self, client, backend_sock, **kw):
        self.events.append(("relay", client, backend_sock, kw["to_backend"], kw["to_client"]))


class Ticket:
    def __init__(self):
        self.released = 0
        self.key = "k"

    def release(self):
        self.released += 1

    def logged_in(self):
        pass


@pytest.fixture
def events():
    return []


@pytest.fixture
def session(conf, events):
    """session(*client_chunks, **directives) -> a POP3 Session over a FakeSock."""
    def make(*incoming, **directives):
        c = conf("pop3", **directives)
        rt = Runtime(SimpleNamespace(main=MainConf()), RecordingLog(events), FakeRelay(events))
        sock = FakeSock(events, "client", incoming)
        s = Session(sock, CLIENT, c, c.listen[0], rt, timeout_set=True, ticket=Ticket())
        sock.session = s
        return s
    return make


def lines(events, *levels):
    return [e for e in events if e[0] in levels]


# ---- perform(): the client-side actions ------------------------------------------------------

def test_actions_run_in_order_until_close(session, events):
    s = session()
    s.action = "in auth state"
    s.conv.login = b"bob"
    with pytest.raises(Close):
        s.perform([Reply(b"one\r\n"), Log("info", "two"), Reply(b""), Reply(b"three\r\n"),
                   CLOSE, Reply(b"never\r\n")])
    assert events == [
        ("client", b"one\r\n", 0),
        ("info", 'two while in auth state' + CONTEXT + ', login: "bob"'),
        ("client", b"three\r\n", 0),
    ]


def test_log_without_action_or_login(session, events):
    s = session()
    s.perform([Log("error", "something")])
    assert events == [("error", "something" + CONTEXT)]


def test_unknown_action_is_a_bug(session):
    with pytest.raises(TypeError):
        session().perform([object()])


def test_starttls_discards_pipelined_input_before_its_reply(session, events, monkeypatch):
    def handshake(sock, conf, log, deadline=None):
        events.append(("handshake", True, s.reader.pending()))
        return tls.Handshake(sock, done=False, headers=[])
    monkeypatch.setattr(tls, "handshake", handshake)
    s = session(b"STLS\r\nUSER evil\r\n", starttls="on")
    line = s.next_input()
    assert line == b"STLS\r\n" and s.reader.pending() == len(b"USER evil\r\n")
    s.perform(s.conv.receive(line))
    assert events == [("client", b"+OK\r\n", 0), ("handshake", True, 0)]
    assert s.conv.tls is True and s.starttls_used is True
    s.perform([Log("info", "x")])
    assert events[-1] == ("info", "x, client: 192.0.2.7 using starttls, server: 127.0.0.1:110")


def test_too_long_command_is_answered_then_closes(session, events):
    s = session(b"USER " + b"a" * 200)
    with pytest.raises(Close):
        s.next_input()
    assert events == [
        ("info", 'client sent too long command "USER %s"' % ("a" * 123) + CONTEXT),
        ("client", b"-ERR invalid command\r\n", 128)]     # the full buffer, never read on


# ---- run(): a whole conversation ------------------------------------------------------------

def test_run_until_the_client_leaves(session, events):
    s = session(b"CAPA\r\n", b"NOOP\r\n")
    s.run()
    assert sent(events) == [b"+OK POP3 ready\r\n",
                            b"+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\n"
                            b"SASL PLAIN LOGIN\r\n.\r\n",
                            b"+OK\r\n"]
    assert lines(events, "info") == [
        ("info", "client 192.0.2.7:5555 connected to 127.0.0.1:110"),
        ("info", "client closed connection while in auth state" + CONTEXT)]
    assert s.sock.closed and s.ticket.released == 1
    # every line of the session ends with its id (RecordingLog takes it off the line)
    assert s.rt.log.session_ids == [s.session_id] * 2


def test_debug_trace_masks_credentials(session, events):
    s = session(b"USER bob\r\n", b"PASS secret\r\n")
    s.rt.log.debug = True
    s.debug = True
    s.authenticate = lambda: s.send_close(b"-ERR no\r\n")
    s.run()
    assert [e[1] for e in lines(events, "debug")] == [
        'sent to client "+OK POP3 ready"' + CONTEXT,
        'client sent "USER bob"' + CONTEXT,
        'sent to client "+OK"' + CONTEXT + ', login: "bob"',
        'client sent "PASS ***"' + CONTEXT + ', login: "bob"',
        'sent to client "-ERR no"' + CONTEXT + ', login: "bob"']
    assert not any("secret" in str(e) for e in events if e[0] != "client")


def test_run_quit(session, events):
    s = session(b"QUIT\r\nNOOP\r\n")
    s.run()
    assert sent(events) == [b"+OK POP3 ready\r\n", b"+OK\r\n"]
    assert s.sock.closed and s.ticket.released == 1


def test_a_bug_becomes_the_internal_error(session, events, monkeypatch):
    s = session(b"NOOP\r\n")
    monkeypatch.setattr(s.conv, "receive", lambda line: 1 / 0)
    s.run()
    assert lines(events, "alert") == [
        ("alert", "internal error: ZeroDivisionError: division by zero while in auth state"
         + CONTEXT)]
    assert sent(events)[-1] == INTERNAL and s.sock.timeout == 1.0 and s.sock.closed


# ---- authenticate -> backend login -> relay, over fakes ----------------------------------------

@pytest.fixture
def auth(monkeypatch, events):
    """Answers for auth_http.query: set `auth.result`; the requests land in `auth.requests`."""
    box = SimpleNamespace(result=None, requests=[])

    def query(url, req, timeout, sleep=None, trace=None, client=None):
        box.requests.append(req)
        events.append(("auth", req.method, req.user, req.passwd))
        return box.result
    monkeypatch.setattr(auth_http, "query", query)
    return box


@pytest.fixture
def upstream(monkeypatch, events):
    """backend.connect returns a FakeSock named "backend" answering `upstream.replies`."""
    box = SimpleNamespace(replies=[], socks=[])

    def connect(host, port, timeout, addresses=None):
        events.append(("connect", host, port))
        sock = FakeSock(events, "backend", box.replies)
        box.socks.append(sock)
        return sock
    monkeypatch.setattr(backend, "connect", connect)
    return box


def test_login_and_hand_over(session, events, auth, upstream):
    auth.result = auth_http.AuthResult("OK", server="127.0.0.1", port=1110)
    upstream.replies = [b"+OK ready\r\n", b"+OK\r\n", b"+OK welcome\r\n"]
    s = session(b"USER bob\r\nPASS secret\r\nSTAT\r\n")
    s.run()
    bsock = upstream.socks[0]
    assert [e for e in events if e[0] not in ("info",)] == [
        ("client", b"+OK POP3 ready\r\n", 0),
        ("client", b"+OK\r\n", len(b"PASS secret\r\nSTAT\r\n")),
        ("auth", "plain", b"bob", b"secret"),
        ("connect", "127.0.0.1", 1110),
        ("backend", b"USER bob\r\n"),
        ("backend", b"PASS secret\r\n"),
        ("relay", s.sock, bsock, b"STAT\r\n", b"+OK welcome\r\n"),
    ]
    assert lines(events, "info")[-1] == (
        "info", 'client logged in' + CONTEXT + ', login: "bob", upstream: 127.0.0.1:1110')
    req = auth.requests[0]
    assert (req.protocol, req.attempt, req.client_ip, req.salt) == ("pop3", 1, "192.0.2.7", None)
    assert not s.sock.closed and s.ticket.released == 0      # the relay owns them now


def test_auth_failure_closes(session, events, auth):
    auth.result = auth_http.AuthResult("FAIL", message=b"Invalid login or password")
    s = session(b"USER bob\r\nPASS bad\r\nNOOP\r\n")
    s.run()
    assert sent(events)[-1] == b"-ERR Invalid login or password\r\n"
    assert ("info", 'client login failed: "Invalid login or password" while in http auth state'
            + CONTEXT + ', login: "bob"') in events
    assert s.sock.closed


def test_auth_failure_with_wait_lets_the_client_retry(session, events, auth):
    auth.result = auth_http.AuthResult("FAIL", message=b"Try again", wait=3)
    s = session(b"USER bob\r\nPASS bad\r\n", b"PASS again\r\n")
    waited = []
    s.rt.shutting_down = SimpleNamespace(wait=lambda seconds: waited.append(seconds) or False)
    s.run()
    assert waited == [3]
    assert sent(events) == [b"+OK POP3 ready\r\n", b"+OK\r\n", b"-ERR Try again\r\n",
                            b"-ERR invalid command\r\n"]     # USER first again
    assert s.deadline is not None                          # a fresh `timeout` was armed


def test_static_route_backend_refusal_is_relayed(session, events, upstream):
    upstream.replies = [b"+OK ready\r\n", b"+OK\r\n", b"-ERR [AUTH] wrong\r\n"]
    s = session(b"USER bob\r\nPASS bad\r\n", auth_http=None, proxy_pass="127.0.0.1:1110")
    s.run()
    assert sent(events)[-1] == b"-ERR [AUTH] wrong\r\n"
    assert ("info", 'client login failed: "-ERR [AUTH] wrong" while reading response from '
            'upstream' + CONTEXT
            + ', login: "bob", upstream: 127.0.0.1:1110') in events
    assert upstream.socks[0].closed and s.sock.closed


def test_backend_refusal_after_auth_service_is_an_internal_error(session, events, auth,
                                                                   upstream):
    auth.result = auth_http.AuthResult("OK", server="127.0.0.1", port=1110)
    upstream.replies = [b"-ERR busy\r\n"]
    s = session(b"USER bob\r\nPASS pw\r\n")
    s.run()
    assert sent(events)[-1] == INTERNAL
    assert ("error", 'upstream sent invalid response: "-ERR busy" while reading response from '
            'upstream' + CONTEXT + ', login: "bob", upstream: 127.0.0.1:1110') in events


# ---- login_backend(): the backend actions, over a fake BackendConn ------------------------------

class FakeConn:
    """A BackendConn stand-in: scripted replies; what the session asks lands on the timeline
    with the session's `action` at that moment."""

    def __init__(self, events, session, replies):
        self.events, self.session, self.replies = events, session, list(replies)

    def read_reply(self, complete=None):
        self.events.append(("read", self.session.action))
        return self.replies.pop(0)

    def send(self, data):
        self.events.append(("send", data, self.session.action))

    def discard(self):
        self.events.append(("discard",))

    def start_tls(self, ctx, name):
        self.events.append(("start_tls", ctx, name, self.session.action))


class Script(BackendLogin):
    """A backend login that returns each action list in turn."""

    def __init__(self, *steps):
        super().__init__()
        self.steps = list(steps)

    def receive(self, reply):
        return self.steps.pop(0)


READ = ("read", "reading response from upstream")


def test_login_backend_performs_backend_actions_in_order(session, events):
    s = session()
    conn = FakeConn(events, s, [b"hi\r\n", b"ok\r\n", b"done\r\n"])
    login = Script([ToBackend(b"A\r\n", "sending A")],
                   [BackendStartTLS(), ToBackend(b"B\r\n", "sending B", discard=True)],
                   [LoggedIn(b"done\r\n"), ToBackend(b"never\r\n", "never")])
    assert s.login_backend(conn, login, "CTX", "mx.test") == b"done\r\n"
    assert events == [
        READ, ("send", b"A\r\n", "sending A"),
        READ, ("start_tls", "CTX", "mx.test", "SSL handshaking to upstream"),
        ("discard",), ("send", b"B\r\n", "sending B"),
        READ]


def test_login_backend_pop3_with_stls(session, events):
    s = session()
    conn = FakeConn(events, s, [b"+OK hi\r\n", b"+OK go\r\n", b"+OK\r\n", b"+OK in\r\n"])
    assert s.login_backend(conn, Pop3Login(b"bob", b"pw", starttls=True), None, "b") == \
        b"+OK in\r\n"
    assert events == [
        READ, ("send", b"STLS\r\n", "sending STLS to upstream"),
        READ, ("start_tls", None, "b", "SSL handshaking to upstream"),
        ("send", b"USER bob\r\n", "sending user name to upstream"),
        READ, ("send", b"PASS pw\r\n", "sending password to upstream"),
        READ]


def test_login_backend_stls_refused(session, events):
    s = session()
    conn = FakeConn(events, s, [b"+OK hi\r\n", b"-ERR no\r\n"])
    with pytest.raises(backend.BackendError) as e:
        s.login_backend(conn, Pop3Login(b"bob", b"pw", starttls=True), None, "b")
    assert str(e.value) == 'upstream refused STARTTLS: "-ERR no"'


def test_login_backend_rejection_propagates(session, events):
    s = session()
    conn = FakeConn(events, s, [b"-ERR no\r\n"])
    with pytest.raises(BackendRejected) as e:
        s.login_backend(conn, Pop3Login(b"bob", b"pw"), None, "b")
    assert e.value.reply == b"-ERR no\r\n"


def test_login_backend_unknown_action_is_a_bug(session, events):
    s = session()
    with pytest.raises(TypeError):
        s.login_backend(FakeConn(events, s, [b"x\r\n"]), Script([Reply(b"x")]), None, "b")


def test_login_error_is_logged_and_answered_with_the_internal_error(session, events, auth,
                                                                      upstream, monkeypatch):
    auth.result = auth_http.AuthResult("OK", server="127.0.0.1", port=1110)
    upstream.replies = [b"+OK\r\n"]
    s = session()
    s.conv.login, s.conv.passwd, s.conv.method = b"bob", b"pw", "plain"

    def fail(reply):
        raise LoginError("upstream sent something odd")
    monkeypatch.setattr(s.conv, "backend_login",
                        lambda *a: SimpleNamespace(complete=None, receive=fail,
                                                   READING="reading response from upstream"))
    with pytest.raises(Close):
        s.perform([Authenticate("plain", b"bob", b"pw")])
    assert sent(events)[-1] == INTERNAL
    assert upstream.socks[0].closed


def test_hand_over_raises_handed_over(session, events):
    s = session()
    conn = SimpleNamespace(sock="BACKEND", close=lambda: None)
    with pytest.raises(HandedOver):
        s.hand_over(conn, b"+OK\r\n")
    assert events == [("relay", s.sock, "BACKEND", b"", b"+OK\r\n")]


# ---- POP3 through the session: line limits, APOP's password from the auth service ------------

def test_line_of_126_bytes_is_taken(session, events, auth):
    # "USER " + 119 + CRLF fits nginx's 128-byte POP3 buffer
    auth.result = auth_http.AuthResult("FAIL", message=b"no")
    s = session(b"USER " + b"u" * 119 + b"\r\n", b"PASS pw\r\n")
    s.run()
    assert sent(events)[:2] == [b"+OK POP3 ready\r\n", b"+OK\r\n"]
    assert auth.requests[0].user == b"u" * 119


def test_longer_line_with_its_line_end_is_too_long(session, events):
    s = session(b"USER " + b"a" * 300 + b"\r\n")
    with pytest.raises(Close):
        s.next_input()
    assert events == [
        ("info", 'client sent too long command "USER %s"' % ("a" * 123) + CONTEXT),
        ("client", b"-ERR invalid command\r\n", 128)]


def test_apop_logs_in_to_the_backend_with_the_auth_services_password(session, events, auth,
                                                                     upstream):
    auth.result = auth_http.AuthResult("OK", server="127.0.0.1", port=1110, passwd=b"secret")
    upstream.replies = [b"+OK ready\r\n", b"+OK\r\n", b"+OK in\r\n"]
    s = session(b"APOP alice 0123456789abcdef0123456789abcdef\r\n", pop3_auth="plain apop")
    s.run()
    req = auth.requests[0]
    assert (req.method, req.user, req.passwd, req.salt) == (
        "apop", b"alice", b"0123456789abcdef0123456789abcdef", s.conv.salt)
    assert sent(events, "backend") == [b"USER alice\r\n", b"PASS secret\r\n"]


def test_apop_without_auth_pass_is_an_internal_error(session, events, upstream, monkeypatch):
    def query(url, req, timeout, sleep=None, trace=None, client=None):
        return auth_http.parse_response(b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n"
                                        b"Auth-Server: 127.0.0.1\r\nAuth-Port: 1110\r\n\r\n",
                                        req, "127.0.0.1:9000")
    monkeypatch.setattr(auth_http, "query", query)
    s = session(b"APOP alice 0123456789abcdef0123456789abcdef\r\n", pop3_auth="plain apop")
    s.run()
    assert ("error", "auth http server 127.0.0.1:9000 did not send password while in http "
            "auth state" + CONTEXT + ', login: "alice"') in events
    assert sent(events)[-1] == INTERNAL and s.sock.closed
    assert upstream.socks == []


# ---- a kick (live.py) meets a session on its way to the relay -----------------------------------

class KickRelay(FakeRelay):
    """A relay that runs `visit` at once (as its thread would, after the adds before it)."""

    def __init__(self, events):
        super().__init__(events)
        self.on_add = None

    def add(self, client, backend_sock, **kw):
        super().add(client, backend_sock, **kw)
        self.on_done = kw["on_done"]
        if self.on_add is not None:
            self.on_add()

    def visit(self, fn):
        self.events.append(("visit",))


@pytest.fixture
def shutdowns(monkeypatch, events):
    """live.kick's shutdown of a client socket lands on the timeline (no socket module here)."""
    fake = SimpleNamespace(shutdown=lambda sock, how: events.append(("shutdown", sock.name)))
    monkeypatch.setattr(live, "socket", SimpleNamespace(socket=fake, SHUT_RDWR=2))


def test_a_session_kicked_during_its_login_is_not_relayed(session, events, auth, upstream,
                                                          shutdowns):
    auth.result = auth_http.AuthResult("OK", server="127.0.0.1", port=1110)
    upstream.replies = [b"+OK ready\r\n", b"+OK\r\n", b"+OK welcome\r\n"]
    s = session(b"USER bob\r\nPASS secret\r\n")
    kicked = []

    def query(url, req, timeout, sleep=None, trace=None, client=None):  # the kick comes now
        kicked.append(s.rt.live.kick(s.rt.relay, "bob", None))
        return auth.result
    auth_http.query = query             # the `auth` fixture's monkeypatch restores it
    s.run()
    assert kicked == [1] and ("shutdown", "client") in events
    assert not [e for e in events if e[0] == "relay"]
    assert s.outcome == "kicked" and s.sock.closed and upstream.socks[0].closed
    assert len(s.rt.live) == 0 and s.ticket.released == 1
    assert not [e for e in events if e[0] == "info" and e[1].startswith("client logged in")]


def test_a_kick_right_after_the_hand_over_is_the_access_logs_result(session, events, shutdowns):
    # kicked between Relay.add and LiveSessions.relayed: its client socket is shut down, the
    # relay ends it as "client closed", and its access_log line says what ended it
    s = session()
    s.rt.relay = relay = KickRelay(events)
    s.rt.live.add(s)
    s.conv.login = b"bob"
    s.access_log = SimpleNamespace(write=lambda rec: events.append(("access", rec["result"])))
    kicked = []
    relay.on_add = lambda: kicked.append(s.rt.live.kick(relay, "bob", None))
    conn = SimpleNamespace(sock="BACKEND", close=lambda: None)
    with pytest.raises(HandedOver):
        s.hand_over(conn, b"+OK\r\n")
    assert kicked == [1] and ("shutdown", "client") in events
    relay.on_done(SimpleNamespace(bytes_in=0, bytes_out=5, duration=0.1, reason="client closed"))
    assert events[-1] == ("access", "kicked")
    assert len(s.rt.live) == 0


# ---- each login attempt counted once in the metrics (logins by result) --------------------------

@pytest.mark.parametrize("error_message, result", [("off", "error"), ("on", "failed")])
def test_a_backend_refusal_after_the_auth_service_is_counted(session, events, auth, upstream,
                                                              monkeypatch, error_message, result):
    area = metrics.Area(slots=2)
    monkeypatch.setattr(metrics, "_area", area)
    monkeypatch.setattr(metrics, "_mine", 0)
    auth.result = auth_http.AuthResult("OK", server="127.0.0.1", port=1110)
    upstream.replies = [b"-ERR [AUTH] wrong\r\n"]
    s = session(b"USER bob\r\nPASS pw\r\n", proxy_pass_error_message=error_message)
    s.run()
    logins = metrics._BY_NAME["logins"]
    counted = {r: area.sums()[logins.index(("pop3", r))] for r in metrics.LOGIN_RESULTS}
    assert counted == {r: int(r == result) for r in metrics.LOGIN_RESULTS}


def test_a_token_the_backend_refuses_gets_its_error_challenge(session, events, auth, upstream):
    # the auth service said OK, the backend (Dovecot's oauth2 passdb) refuses the token with
    # an RFC 7628 error challenge: the client gets it, its dummy response, then the failure
    auth.result = auth_http.AuthResult("OK", server="127.0.0.1", port=1110)
    challenge = b64(b'{"status":"invalid_token"}')
    upstream.replies = [b"+OK ready\r\n", b"+ " + challenge + b"\r\n",
                        b"-ERR [AUTH] Authentication failed.\r\n"]
    response = b64(b"n,a=bob,\x01auth=Bearer tok\x01\x01")
    s = session(b"AUTH OAUTHBEARER " + response + b"\r\n", b"AQ==\r\n",
                pop3_auth="oauthbearer")
    s.run()
    assert sent(events) == [b"+OK POP3 ready\r\n", b"+ " + challenge + b"\r\n",
                            b"-ERR [AUTH] Authentication failed.\r\n"]
    assert sent(events, "backend") == [b"AUTH OAUTHBEARER " + response + b"\r\n", b"AQ==\r\n"]
    assert ("info", 'client login failed: "-ERR [AUTH] Authentication failed." while reading '
            'response from upstream' + CONTEXT + ', login: "bob", upstream: 127.0.0.1:1110') \
        in events
    assert upstream.socks[0].closed and s.sock.closed and s.failed_logins == 1


def test_a_kick_finds_a_relayed_session_by_the_name_it_was_handed_over_with(session, events):
    s = session()
    s.rt.relay = relay = KickRelay(events)
    s.rt.live.add(s)
    s.conv.login = b"bob"
    names, closed = [], []
    relay.add = lambda client, backend_sock, **kw: names.append(kw["name"])
    relay.visit = lambda fn: fn([SimpleNamespace(name=n) for n in names],
                                lambda one, reason: closed.append((one.name, reason)))
    with pytest.raises(HandedOver):
        s.hand_over(SimpleNamespace(sock="BACKEND", close=lambda: None), b"+OK\r\n")
    assert names == [s.relay_name]                  # one name, the session's
    assert s.rt.live.kick(relay, "bob", None) == 1
    assert closed == [(s.relay_name, live.KICK_REASON)]
