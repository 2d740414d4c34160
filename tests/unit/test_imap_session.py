"""IMAP through session.py without sockets: a real Session (its LineReader, its perform() and
its authenticate -> backend login -> hand-over flow) over playbook's FakeSock and
RecordingLog, with the auth service and the backend patched out.  What the IMAP conversation
leaves to the session is checked here: reading literals and the rest of a command's budget,
too long input, and what the client, the backend and the log get when the auth service or the
backend refuse.
"""

import base64
from types import SimpleNamespace

import pytest

from mailproxy import auth_http, backend
from mailproxy.config.types import MainConf
from mailproxy.log import sanitize
from mailproxy.runtime import Runtime
from mailproxy.session import Session
from playbook import FakeSock, RecordingLog, sent

GREETING = b"* OK IMAP4 ready\r\n"
INTERNAL = b"* BAD internal server error\r\n"
LOGGED_IN = b"OK [CAPABILITY IMAP4rev1 IDLE] Logged in"
REFUSED = b"NO [AUTHENTICATIONFAILED] Authentication failed."
CONTEXT = ", client: 192.0.2.7, server: 127.0.0.1:143"
UPSTREAM = ", upstream: 127.0.0.1:1143"


def bad(tag=b"*"):
    return tag + b" BAD invalid command\r\n"


def login_lines(tag, user=b"alice", passwd=b"secret"):
    """What a backend receives for a login (as from ngx_mail_proxy_imap_handler)."""
    return (tag + b"LOGIN {%d}\r\n" % len(user) + user + b" {%d}\r\n" % len(passwd)
            + passwd + b"\r\n")


def backend_replies(last=b"a1 " + LOGGED_IN + b"\r\n"):
    """A backend that greets, continues both literals, then answers `last`."""
    return [b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n", b"+ OK\r\n", b"+ OK\r\n", last]


@pytest.fixture
def imap_session(conf, monkeypatch):
    """imap_session(*client_chunks, auth=[results], upstream=[replies], **directives) -> what
    happened: `said` (bytes to the client), `logs`, `requests` (auth requests), `backend`
    (bytes to the backend, None when never connected), `relay` (to_backend, to_client) when
    handed over, `closed`.  An auth result may be an AuthHttpError (raised) or bytes (an auth
    response, parsed as auth_http does)."""
    def run(*chunks, auth=(), upstream=None, **directives):
        results = list(auth)
        events = []
        out = SimpleNamespace(requests=[], backend=None, relay=None, waited=[])

        def query(url, req, timeout, sleep=None, trace=None, client=None):
            out.requests.append(req)
            result = results.pop(0)
            if isinstance(result, Exception):
                raise result
            if isinstance(result, bytes):
                return auth_http.parse_response(result, req, "127.0.0.1:9000")
            return result

        def connect(host, port, timeout, addresses=None):
            sock = FakeSock(events, "backend", upstream or [])
            out.backend = sock
            return sock

        monkeypatch.setattr(auth_http, "query", query)
        monkeypatch.setattr(backend, "connect", connect)
        c = conf("imap", **directives)
        log = RecordingLog()
        relay = SimpleNamespace(add=lambda client, bsock, **kw: setattr(
            out, "relay", (kw["to_backend"], kw["to_client"])))
        rt = Runtime(SimpleNamespace(main=MainConf()), log, relay)
        rt.shutting_down = SimpleNamespace(wait=lambda s: out.waited.append(s) or False)
        client = FakeSock(events, "client", chunks, local=("127.0.0.1", 143))
        Session(client, ("192.0.2.7", 5555), c, c.listen[0], rt, timeout_set=True).run()
        out.said = b"".join(sent(events))
        out.logs = log.lines[1:]            # after "client ... connected to ..."
        out.closed = client.closed
        if out.backend is not None:
            out.backend = b"".join(sent(events, "backend"))
        return out
    return run


def ok(port=1143):
    return auth_http.AuthResult("OK", server="127.0.0.1", port=port)


def fail(message=b"Invalid login or password", wait=0):
    return auth_http.AuthResult("FAIL", message=message, wait=wait)


def too_long(data):
    return ("info", 'client sent too long command "%s" while in auth state%s'
            % (sanitize(data, 1024), CONTEXT))


# ---- reading commands: literals and the client buffer ------------------------------------------

@pytest.mark.parametrize("chunks,said", [
    ([b"b1 LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n"], b""),     # in one read: no `+ OK`
    ([b"a1 LOGIN {5}\r\n", b"alice {6+}\r\nsecret\r\n"], b"+ OK\r\n"),
])
def test_literals_read_from_the_stream(imap_session, chunks, said):
    s = imap_session(*chunks, auth=[fail()])
    tag = chunks[0][:3]
    assert s.said == GREETING + said + tag + b"NO Invalid login or password\r\n"
    assert [(r.method, r.user, r.passwd) for r in s.requests] == [("plain", b"alice", b"secret")]


def test_too_long_command_closes(imap_session):
    data = b"a1 LOGIN " + b"x" * (256 - 9)      # fills the buffer without a line end
    s = imap_session(data, imap_client_buffer="256")
    assert s.said == GREETING + bad(b"a1")
    assert s.logs == [too_long(data)] and s.closed
    s = imap_session(b"y" * 256, imap_client_buffer="256")      # not even a tag
    assert s.said == GREETING + bad()
    assert s.requests == []


def test_command_at_the_limit_is_accepted(imap_session):
    data = b"a LOGIN " + b"u" * (256 - len(b"a LOGIN  pw\r\n")) + b" pw\r\n"
    assert len(data) == 256
    s = imap_session(data, auth=[fail()], imap_client_buffer="256")
    assert s.requests[0].user == b"u" * 243


def test_literal_beyond_the_buffer_refused_before_continuation(imap_session):
    s = imap_session(b"a LOGIN {300}\r\n", imap_client_buffer="256")
    assert s.said == GREETING + bad(b"a")       # no "+ OK" first (nginx sends one)
    assert s.logs == [too_long(b"a LOGIN {300}\r\n")] and s.closed
    s = imap_session(b"b LOGIN {200}\r\n", b"x" * 200 + b" pw\r\n", auth=[ok()],
                     upstream=backend_replies(b"b " + LOGGED_IN + b"\r\n"),
                     imap_client_buffer="256")
    assert s.said == GREETING + b"+ OK\r\n"
    assert s.backend == login_lines(b"b ", b"x" * 200, b"pw")
    assert s.relay == (b"", b"b " + LOGGED_IN + b"\r\n")


def test_too_long_across_literal_segments(imap_session):
    rest = b" " + b"y" * 39
    s = imap_session(b"a LOGIN {200+}\r\n" + b"x" * 200 + rest, imap_client_buffer="256")
    assert s.said == GREETING + bad(b"a")
    assert s.logs == [too_long(b"a LOGIN {200+}\r\n" + b"x" * 200 + rest)] and s.closed
    assert s.requests == []


def test_authenticate_continuation_too_long(imap_session):
    s = imap_session(b"p AUTHENTICATE PLAIN\r\n", b"A" * 128, imap_client_buffer="128")
    assert s.said == GREETING + b"+ \r\n" + bad(b"p")
    assert s.logs == [too_long(b"A" * 128)] and s.closed


# ---- the auth service ---------------------------------------------------------------------------

def test_login_and_hand_over(imap_session):
    s = imap_session(b"a1 LOGIN alice secret\r\na2 SELECT INBOX\r\n", auth=[ok()],
                     upstream=backend_replies())
    req = s.requests[0]
    assert (req.method, req.user, req.passwd, req.salt, req.protocol, req.attempt) == (
        "plain", b"alice", b"secret", None, "imap", 1)
    assert s.backend == login_lines(b"a1 ")
    assert s.relay == (b"a2 SELECT INBOX\r\n", b"a1 " + LOGGED_IN + b"\r\n")
    assert s.logs == [("info", 'client logged in' + CONTEXT + ', login: "alice"' + UPSTREAM)]


def test_cram_md5_salt_goes_to_the_auth_service(imap_session):
    digest = b"0123456789abcdef0123456789abcdef"
    s = imap_session(b"c1 AUTHENTICATE CRAM-MD5\r\n",
                     base64.b64encode(b"alice " + digest) + b"\r\n", auth=[fail()],
                     imap_auth="cram-md5")
    req = s.requests[0]
    assert (req.method, req.user, req.passwd) == ("cram-md5", b"alice", digest)
    assert s.said.startswith(GREETING + b"+ ") and req.salt.endswith(b"@mx.example.test>")


def test_auth_failure_closes(imap_session):
    s = imap_session(b"a1 LOGIN alice wrong\r\n", auth=[fail()])
    assert s.said == GREETING + b"a1 NO Invalid login or password\r\n"
    assert s.logs == [("info", 'client login failed: "Invalid login or password" while in '
                               'http auth state' + CONTEXT + ', login: "alice"')]
    assert s.backend is None and s.closed


def test_auth_wait_lets_the_client_retry(imap_session):
    s = imap_session(b"a1 AUTHENTICATE PLAIN AGFsaWNlAHdyb25n\r\n", b"a2 NOOP\r\n",
                     b"a3 LOGIN alice secret\r\n",
                     auth=[fail(b"Try again", wait=1), ok()],
                     upstream=backend_replies(b"a3 " + LOGGED_IN + b"\r\n"))
    assert s.waited == [1]
    assert s.said == (GREETING + b"a1 NO Try again\r\n" + b"a2 OK completed\r\n")
    assert [(r.attempt, r.passwd) for r in s.requests] == [(1, b"wrong"), (2, b"secret")]
    assert s.backend == login_lines(b"a3 ")
    assert s.relay == (b"", b"a3 " + LOGGED_IN + b"\r\n")


def test_auth_user_and_pass_override(imap_session):
    result = ok()
    result.user, result.passwd = b"alice", b"secret"
    s = imap_session(b"a1 LOGIN bob hunter2\r\n", auth=[result], upstream=backend_replies())
    assert s.backend == login_lines(b"a1 ")
    assert s.relay == (b"", b"a1 " + LOGGED_IN + b"\r\n")


@pytest.mark.parametrize("answer,log", [
    (auth_http.AuthHttpError("auth http server 127.0.0.1:9000 prematurely closed connection"),
     "auth http server 127.0.0.1:9000 prematurely closed connection"),
    (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n\r\n",
     "auth http server 127.0.0.1:9000 did not send server or port"),
    (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: x1\r\n\r\n",
     'auth http server 127.0.0.1:9000 sent invalid server port:"x1"'),
])
def test_auth_server_trouble_is_internal_error(imap_session, answer, log):
    s = imap_session(b"a1 LOGIN alice secret\r\n", auth=[answer])
    assert s.said == GREETING + INTERNAL
    assert s.logs == [("error", log + " while in http auth state" + CONTEXT
                       + ', login: "alice"')]
    assert s.backend is None and s.closed


# ---- the backend's answers ----------------------------------------------------------------------

def test_backend_untagged_line_before_ok_is_relayed(imap_session):
    last = [b"* CAPABILITY IMAP4rev1 IDLE\r\n", b"a1 " + LOGGED_IN + b"\r\n"]
    s = imap_session(b"a1 LOGIN alice secret\r\n", auth=[ok()],
                     upstream=backend_replies()[:3] + last)
    assert s.relay == (b"", b"".join(last))


@pytest.mark.parametrize("replies,reply,text", [
    (backend_replies(b"a1 " + REFUSED + b"\r\n"), b"a1 " + REFUSED + b"\r\n", REFUSED),
    ([b"* BYE too busy\r\n"], b"* BYE too busy\r\n", b"* BYE too busy"),
    ([b"* PREAUTH hello\r\n"], b"* PREAUTH hello\r\n", b"* PREAUTH hello"),
    (backend_replies()[:1] + [b"a1 NO literal refused\r\n"], b"a1 NO literal refused\r\n",
     b"a1 NO literal refused"),
    (backend_replies(b"* A\r\n* B\r\na1 " + LOGGED_IN + b"\r\n"),     # one untagged line at most
     b"* A\r\n* B\r\na1 " + LOGGED_IN + b"\r\n", b"* B\r\na1 " + LOGGED_IN),
])
@pytest.mark.parametrize("error_message", ["off", "on"])
def test_backend_refusal(imap_session, replies, reply, text, error_message):
    s = imap_session(b"a1 LOGIN alice secret\r\n", auth=[ok()], upstream=replies,
                     proxy_pass_error_message=error_message)
    log = ('upstream sent invalid response: "%s" while reading response from upstream%s'
           ', login: "alice"%s' % (sanitize(text, 512), CONTEXT, UPSTREAM))
    if error_message == "on":
        assert s.said == GREETING + reply
        assert s.logs == [("info", log)]
    else:
        assert s.said == GREETING + INTERNAL
        assert s.logs == [("error", log)]
    assert s.relay is None and s.closed


def test_backend_closing_is_internal_error(imap_session):
    s = imap_session(b"a1 LOGIN alice secret\r\n", auth=[ok()], upstream=[],
                     proxy_pass_error_message="on")
    assert s.said == GREETING + INTERNAL
    assert s.logs == [("error", "upstream prematurely closed connection while reading response "
                                'from upstream' + CONTEXT + ', login: "alice"' + UPSTREAM)]


@pytest.mark.parametrize("last,said", [
    (b"a1 " + LOGGED_IN + b"\r\n", b""),
    (b"a1 " + REFUSED + b"\r\n", b"a1 " + REFUSED + b"\r\n"),
])
def test_proxy_pass_static_route(imap_session, last, said):
    s = imap_session(b"a1 LOGIN alice secret\r\n", upstream=backend_replies(last),
                     auth_http=None, proxy_pass="127.0.0.1:1143")
    assert s.requests == []
    assert s.backend == login_lines(b"a1 ")
    if said:
        assert s.said == GREETING + said and s.relay is None
        assert s.logs == [("info", 'client login failed: "%s" while reading response from '
                           'upstream%s, login: "alice"%s' % (REFUSED.decode(), CONTEXT,
                                                             UPSTREAM))]
    else:
        assert s.relay == (b"", last)
