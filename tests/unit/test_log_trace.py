"""trace.py (the debug trace's masking) and access_log.py (the access log's lines): pure
functions, no sockets."""

import json

import pytest

from mailproxy import access_log, trace


# ---- trace.py: credentials never shown ------------------------------------------------------

@pytest.mark.parametrize("protocol, line, shown", [
    ("imap", b"a1 LOGIN alice secret\r\n", "a1 LOGIN alice ***"),
    ("imap", b'a1 login "alice" "sec ret"\r\n', 'a1 login \\x22alice\\x22 ***'),
    ("imap", b"a1 LOGIN\talice\tsecret\r\n", "a1 LOGIN alice ***"),
    ("imap", b"a1 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n", "a1 AUTHENTICATE PLAIN ***"),
    ("imap", b"a1 AUTHENTICATE PLAIN\r\n", "a1 AUTHENTICATE PLAIN"),
    ("imap", b"a1 LOGIN alice\r\n", "a1 LOGIN alice"),
    ("imap", b"a1 SELECT INBOX\r\n", "a1 SELECT INBOX"),
    ("pop3", b"PASS secret\r\n", "PASS ***"),
    ("pop3", b"pass  two words\r\n", "pass ***"),
    ("pop3", b"USER alice\r\n", "USER alice"),
    ("pop3", b"APOP alice 0123456789abcdef0123456789abcdef\r\n", "APOP alice ***"),
    ("pop3", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", "AUTH PLAIN ***"),
    ("smtp", b"AUTH LOGIN YWxpY2U=\r\n", "AUTH LOGIN ***"),
    ("smtp", b"auth plain AGFsaWNlAHNlY3JldA==\r\n", "auth plain ***"),
    ("smtp", b"MAIL FROM:<a@b>\r\n", "MAIL FROM:<a@b>"),
    ("smtp", b"EHLO x\r\nRCPT", "EHLO x\\r\\nRCPT"),           # one log line, always
])
def test_client_line_masks_credentials(protocol, line, shown):
    assert trace.client_line(protocol, line) == shown


def test_client_sasl_and_literal_inputs_masked_whole():
    assert trace.client_line("imap", b"AGFsaWNlAHNlY3JldA==\r\n", sasl=True) == "***"
    assert trace.client_line("smtp", b"*\r\n", sasl=True) == "*"          # the cancel
    # a literal's bytes and the line after one: any part of a LOGIN
    assert trace.client_line("imap", b"secret", continued=True) == "*** (6 bytes)"
    assert trace.client_line("imap", b" secret\r\n", continued=True) == "*** (7 bytes)"


@pytest.mark.parametrize("data, action, shown", [
    (b"PASS secret\r\n", "sending password to upstream", "PASS ***"),
    (b"secret\r\n", "sending password to upstream", "***"),
    (b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", "sending AUTH to upstream", "AUTH PLAIN ***"),
    (b"a1 LOGIN alice secret\r\n", "sending LOGIN command to upstream", "a1 LOGIN alice ***"),
    (b"a1 LOGIN {5}\r\n", "sending LOGIN command to upstream", "a1 LOGIN {5}"),
    (b"USER alice\r\n", "sending user name to upstream", "USER alice"),
    (b"XCLIENT LOGIN=alice\r\n", "sending XCLIENT to upstream", "XCLIENT LOGIN=alice"),
])
def test_backend_line_masks_the_password(data, action, shown):
    assert trace.backend_line(data, action) == shown


def test_reply_lines():
    assert trace.reply_lines(b"* CAPABILITY IMAP4\r\na OK done\r\n") == [
        "* CAPABILITY IMAP4", "a OK done"]
    assert trace.reply_lines(b'+OK "x"\x00\r\n') == ["+OK \\x22x\\x22\\x00"]


def test_auth_request_without_auth_pass_and_secret_headers():
    req = (b"GET /auth HTTP/1.0\r\nHost: h\r\nAuth-Method: plain\r\nAuth-User: al%20ice\r\n"
           b"Auth-Pass: secret\r\nAuth-Salt: <1.2@h>\r\nAuth-Session-Id: abc\r\n"
           b"X-Auth-Key: shared\r\n\r\n")
    lines = trace.auth_request_lines(req, ["x-auth-KEY"])
    assert lines == ['"GET /auth HTTP/1.0"', 'Host "h"', 'Auth-Method "plain"',
                     'Auth-User "al%20ice"', 'Auth-Salt "<1.2@h>"', 'Auth-Session-Id "abc"',
                     'X-Auth-Key "***"']
    assert not any("secret" in x or "shared" in x for x in lines)


def test_auth_response_auth_pass_masked():
    resp = (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Pass: secret\r\n"
            b"auth-pass:other\r\nX: a\"b\r\n\r\nbody")
    assert trace.auth_response_lines(resp) == [
        '"HTTP/1.0 200 OK"', 'Auth-Status "OK"', 'Auth-Pass "***"', 'auth-pass "***"',
        'X "a\\x22b"']


# ---- access_log.py ---------------------------------------------------------------------------

def _rec(**kw):
    values = dict(session="abcdefghijklmnop", protocol="imap", client_ip="192.0.2.7",
                  client_port=5555, user=b"alice", backend="127.0.0.1:143",
                  tls=("TLSv1.3", "TLS_AES_256_GCM_SHA384"), bytes_in=12, bytes_out=345,
                  duration=1.23456, result="ok", now=0.0)
    values.update(kw)
    return access_log.record(**values)


def test_text_line_field_order():
    line = access_log.text_line(_rec())
    assert line.endswith("\n") and line.count("\n") == 1
    assert line.split(" ", 1)[1] == ('abcdefghijklmnop imap 192.0.2.7 5555 "alice" '
                                     '127.0.0.1:143 TLSv1.3 TLS_AES_256_GCM_SHA384 12 345 '
                                     '1.235 ok\n')
    stamp = line.split(" ", 1)[0]
    assert stamp[:4] == "1970" or stamp[:4] == "1969"
    assert stamp[-6] in "+-" and stamp[-3] == ":"


def test_text_line_absent_values():
    line = access_log.text_line(_rec(user=None, backend=None, tls=None, client_ip=None,
                                     client_port=None, result="closed-before-login"))
    assert line.split(" ", 1)[1] == ('abcdefghijklmnop imap - - "-" - - - 12 345 1.235 '
                                     'closed-before-login\n')


def test_text_line_hostile_user_stays_one_field():
    line = access_log.text_line(_rec(user=b'x" 1 2 ok\r\nforged "y\\'))
    assert line.count("\n") == 1 and line.count('"') == 2
    assert '"x\\x22 1 2 ok\\r\\nforged \\x22y\\\\"' in line


def test_json_line_escapes():
    hostile = b'x"\r\n\x00\xff\\ \xe2\x80\xa8'
    line = access_log.json_line(_rec(user=hostile))
    assert line.endswith("}\n") and line.count("\n") == 1 and line.isascii()
    obj = json.loads(line)
    assert list(obj) == list(access_log.FIELDS)
    assert obj["user"] == 'x"\r\n\x00\\xff\\ \u2028'
    assert (obj["bytes_in"], obj["bytes_out"], obj["duration"]) == (12, 345, 1.235)
    assert json.loads(access_log.json_line(_rec(user=None)))["user"] is None


def test_results():
    assert access_log.prelogin_result("timeout", 1, 0, 5) == "timeout"
    assert access_log.prelogin_result(None, 0, 5, 5) == "too-many-errors"
    assert access_log.prelogin_result(None, 2, 1, 5) == "auth-failed"
    assert access_log.prelogin_result(None, 0, 0, 5) == "closed-before-login"
    assert access_log.relay_result("client closed") == "ok"
    assert access_log.relay_result("backend closed") == "ok"
    assert access_log.relay_result("client timed out") == "timeout"
    assert access_log.relay_result("kicked by control command") == "kicked"
    assert access_log.relay_result("shutdown timeout") == "shutdown"
    assert access_log.relay_result("read error from client (104: x)") == "error"
    for r in ("timeout", "too-many-errors", "auth-failed", "closed-before-login", "ok",
              "shutdown", "error"):
        assert r in access_log.RESULTS


class _Ctx:
    def bad(self, value, expected):
        return ValueError('invalid value "%s": expected %s' % (value, expected))

    def path(self, p):
        return "/abs/" + p


def test_directive_values():
    assert access_log.parse(["off"], _Ctx()) is None
    assert access_log.parse(["a.log"], _Ctx()) == ("/abs/a.log", "text")
    assert access_log.parse(["a.log", "json"], _Ctx()) == ("/abs/a.log", "json")
    with pytest.raises(ValueError):
        access_log.parse(["a.log", "xml"], _Ctx())
    with pytest.raises(ValueError):
        access_log.parse(["off", "json"], _Ctx())
    assert access_log.tokens(None) == ["off"]
    assert access_log.tokens(("/x y", "json")) == ["/x y", "json"]
