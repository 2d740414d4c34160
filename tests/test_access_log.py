"""`access_log = PATH [json]` (access_log.py): one line per client session when it ends, in
both formats, for a relayed session (bytes each way as sent), a refused login, a timeout and a
client that quits; reopened on USR1; the session id of the line is the one of the session's
error_log lines, of its auth request (Auth-Session-Id) and of its IMAP ID (x-session-id)."""

import json
import os
import re
import signal

import pytest

from tests.support.auth import auth_fail
from tests.support.common import wait_for
from tests.support.mailbackends import IMAP_LOGGED_IN, ImapBackend

SID = r"[A-Za-z0-9_-]{16}"
TEXT = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d) (?P<session>%s) (?P<protocol>\w+) "
    r"(?P<client_ip>\S+) (?P<client_port>\d+) \"(?P<user>[^\"]*)\" (?P<backend>\S+) "
    r"(?P<tls_version>\S+) (?P<tls_cipher>\S+) (?P<bytes_in>\d+) (?P<bytes_out>\d+) "
    r"(?P<duration>\d+\.\d{3}) (?P<result>[a-z-]+)\n\Z" % SID)


def entries(path, n=1, timeout=5.0):
    """The first `n` lines of the access log, parsed (text or JSON), waiting for them."""
    def ready():
        try:
            with open(path) as f:
                lines = f.readlines()
        except FileNotFoundError:
            return None
        return lines if len(lines) >= n else None
    out = []
    for line in wait_for(ready, timeout, what="%d access log lines" % n):
        if line.startswith("{"):
            rec = json.loads(line)
            assert list(rec) == ["time", "session", "protocol", "client_ip", "client_port",
                                 "user", "backend", "tls_version", "tls_cipher", "bytes_in",
                                 "bytes_out", "duration", "result"], line
            rec["user"] = "-" if rec["user"] is None else rec["user"]
        else:
            m = TEXT.match(line)
            assert m, line
            rec = m.groupdict()
            for key in ("client_port", "bytes_in", "bytes_out"):
                rec[key] = int(rec[key])
            rec["duration"] = float(rec["duration"])
        out.append(rec)
    return out


@pytest.fixture(params=["text", "json"])
def fmt(request):
    return request.param


def access(tmp_path, fmt):
    path = tmp_path / "access.log"
    return path, ("%s json" % path if fmt == "json" else str(path))


def test_relayed_session(pop3_setup, tmp_path, fmt):
    path, value = access(tmp_path, fmt)
    st = pop3_setup(access_log=value)
    c = st.connect()
    assert c.cmd("USER alice") == b"+OK\r\n"
    reply = c.cmd("PASS secret")
    assert reply == b"+OK logged in\r\n"
    sent = b"STAT\r\nLIST\r\nQUIT\r\n"
    c.send(sent)
    rest = c.read_until_closed()
    (rec,) = entries(path)
    assert rec["protocol"] == "pop3" and rec["result"] == "ok", rec
    assert (rec["client_ip"], rec["client_port"]) == ("127.0.0.1", c.sock.getsockname()[1])
    assert rec["user"] == "alice"
    assert rec["backend"] == "127.0.0.1:%d" % st.backend.port
    assert (rec["tls_version"], rec["tls_cipher"]) == ("-", "-")
    # client -> backend: what the client sent after the login; backend -> client: the login's
    # reply (relayed at hand-over) and everything after it
    assert rec["bytes_in"] == len(sent)
    assert rec["bytes_out"] == len(reply) + len(rest) and len(rest) > 20
    assert 0 <= rec["duration"] < 5
    # the same id in the session's error_log lines and in its auth request
    line = st.proxy.wait_log("proxied session done")
    assert line.endswith(", session: %s" % rec["session"]), line
    assert st.auth.requests[-1].header("Auth-Session-Id") == rec["session"]


def test_failed_login_and_quit(pop3_setup, tmp_path, fmt):
    path, value = access(tmp_path, fmt)
    st = pop3_setup(access_log=value)
    st.auth.set_respond(lambda req: auth_fail("Invalid login or password"))
    c = st.connect()
    c.cmd("USER alice")
    assert c.cmd("PASS wrong").startswith(b"-ERR")
    assert c.closed()
    c2 = st.connect()
    assert c2.cmd("QUIT").startswith(b"+OK")
    assert c2.closed()
    failed, quit_ = entries(path, 2)
    assert failed["result"] == "auth-failed" and failed["user"] == "alice", failed
    assert (failed["backend"], failed["bytes_in"], failed["bytes_out"]) == ("-", 0, 0)
    assert quit_["result"] == "closed-before-login" and quit_["user"] == "-", quit_
    assert failed["session"] != quit_["session"]


def test_timeout_and_too_many_errors(pop3_setup, tmp_path, fmt):
    path, value = access(tmp_path, fmt)
    st = pop3_setup(access_log=value, timeout="1s", max_errors="2")
    c = st.connect()
    assert c.closed(timeout=4)
    (timed_out,) = entries(path)
    assert timed_out["result"] == "timeout" and 0.9 <= timed_out["duration"] < 3, timed_out
    c = st.connect()
    c.cmd("BOGUS")
    assert c.cmd("BOGUS") == b"-ERR invalid command\r\n"
    assert c.closed(timeout=3)
    assert entries(path, 2)[1]["result"] == "too-many-errors"


def test_hostile_user_stays_in_its_field(pop3_setup, tmp_path, fmt):
    path, value = access(tmp_path, fmt)
    st = pop3_setup(access_log=value)
    st.auth.set_respond(lambda req: auth_fail("no"))
    c = st.connect()
    hostile = 'al" ice\\ - 1 2 ok\x1b'
    c.cmd("USER " + hostile)
    c.cmd("PASS x")
    assert c.closed()
    (rec,) = entries(path)          # the text pattern still matches field by field
    assert rec["result"] == "auth-failed"
    if fmt == "json":
        assert rec["user"] == hostile           # as sent, JSON-escaped
    else:
        assert rec["user"] == "al\\x22 ice\\\\ - 1 2 ok\\x1b"


def test_reopened_on_usr1(pop3_setup, tmp_path):
    path, value = access(tmp_path, "text")
    st = pop3_setup(access_log=value)
    c = st.connect()
    c.cmd("QUIT")
    assert c.closed()
    entries(path)
    os.rename(path, str(path) + ".1")
    st.proxy.signal(signal.SIGUSR1)
    st.proxy.wait_log("reopening logs")
    wait_for(lambda: path.exists(), 3, what="the reopened access log")
    c = st.connect()
    c.cmd("QUIT")
    assert c.closed()
    assert entries(path)[0]["result"] == "closed-before-login"
    with open(str(path) + ".1") as f:
        assert len(f.readlines()) == 1


def test_server_level_overrides_mail_level(mail_setup, pop3_backend, tmp_path):
    mail_path, server_path = tmp_path / "mail.log", tmp_path / "server.log"
    st = mail_setup("pop3", pop3_backend, mail={"access_log": str(mail_path)},
                    access_log="%s json" % server_path)
    c = st.connect()
    c.cmd("QUIT")
    assert c.closed()
    assert entries(server_path)[0]["result"] == "closed-before-login"
    assert not mail_path.exists() or mail_path.read_text() == ""


def test_session_id_in_imap_id_and_every_line(mail_setup, backend_factory, tmp_path):
    imap_backend = backend_factory(ImapBackend)
    path, value = access(tmp_path, "json")
    st = mail_setup("imap", imap_backend, access_log=value, imap_client_id="on")
    c = st.connect()
    assert c.cmd("a1 LOGIN alice secret") == b"a1 " + IMAP_LOGGED_IN + b"\r\n"
    c.send(b"a2 LOGOUT\r\n")
    c.read_until_closed()
    (rec,) = entries(path)
    sid = rec["session"]
    raw = bytes(imap_backend.wait_session(0).raw)
    assert b'"x-session-id" "%s")' % sid.encode() in raw, raw
    assert st.auth.requests[-1].header("Auth-Session-Id") == sid
    lines = [x for x in st.proxy.log_lines() if re.search(r"\] \d+#\d+: \*\d+ ", x)]
    assert len(lines) >= 3 and all(x.endswith(", session: " + sid) for x in lines), lines


def test_config_errors(proxy_factory, tmp_path):
    from tests.support.process import ProxyProcess, free_port, server_block
    block = server_block("pop3", free_port(), proxy_pass="127.0.0.1:1",
                         access_log="%s xml" % (tmp_path / "a.log"))
    p = ProxyProcess(tmp_path, {"servers": {"p": block}}, start=False)
    import subprocess
    r = subprocess.run(p.command + ["-t", "-c", str(p.conf_path)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0
    assert 'invalid value "xml" in "access_log"' in r.stderr and "mailproxy.ini:" in r.stderr


def test_tls_version_and_cipher(proxy_factory, auth_server, pop3_backend, tmp_path, pki):
    import poplib
    from tests.support.common import track
    from tests.support.process import free_port, server_block
    from tests.support.tls import client_ctx
    path, value = access(tmp_path, "text")
    port = free_port()
    auth_server.route_to(pop3_backend.port)
    block = server_block("pop3", port, access_log=value, auth_http=auth_server.url,
                         ssl_certificate=pki.server_rsa[0], ssl_certificate_key=pki.server_rsa[1])
    block["listen"] = "127.0.0.1:%d ssl" % port
    proxy_factory({"servers": {"pop3": block}})
    p = track(poplib.POP3_SSL("127.0.0.1", port, context=client_ctx(pki), timeout=5))
    version, cipher = p.sock.version(), p.sock.cipher()[0]
    p.user("alice")
    p.pass_("secret")
    p.quit()
    (rec,) = entries(path)
    assert (rec["tls_version"], rec["tls_cipher"], rec["result"]) == (version, cipher, "ok")


def test_session_before_login_cut_at_worker_shutdown_timeout(proxy_factory, pop3_backend,
                                                             tmp_path):
    # as a relayed session, one still logging in when the old worker's time is up ends with
    # its line (result shutdown) instead of vanishing with the process
    from tests.support.process import Setup, free_port, server_block
    path = tmp_path / "access.log"
    port = free_port()
    block = server_block("pop3", port, timeout="30s", access_log=str(path),
                         proxy_pass=f"127.0.0.1:{pop3_backend.port}")
    p = proxy_factory({"main": {"worker_shutdown_timeout": "500ms"}, "servers": {"pop3": block}})
    c = Setup(p, "127.0.0.1", port, None, pop3_backend).connect()
    c.send(b"USER alice\r\n")
    assert c.readline().startswith(b"+OK")
    p.signal(signal.SIGHUP)
    p.wait_log("gracefully shutting down")
    assert c.closed(timeout=4)
    (rec,) = entries(path)
    assert rec["result"] == "shutdown" and rec["user"] == "alice"
