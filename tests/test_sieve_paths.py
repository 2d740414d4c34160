"""ManageSieve sessions through proxy_map (a pool of two backends and a domain's own backend),
a password and a token login, a token the backend refuses (its error challenge relayed as a
ManageSieve string, the dummy response read, then its NO), and max_errors: each session ends
with one access_log line, is counted under protocol="sieve" and leaves the live sessions."""

import base64
import json
import subprocess

from tests.support.clients import LineClient
from tests.support.common import REPO, track, wait_for
from tests.support.mailbackends import TOKEN_ERROR, SieveBackend
from tests.support.process import free_port, proxy_command, server_block
from tests.support.scrape import scrape, value


def plain(user, password):
    return base64.b64encode(b"\0" + user + b"\0" + password)


def bearer(user, token):
    return base64.b64encode(b"n,a=%s,\x01auth=Bearer %s\x01\x01" % (user, token))


def connect(port):
    c = track(LineClient("127.0.0.1", port))
    while not c.readline().startswith(b"OK"):
        pass
    return c


def test_every_path_ends_with_one_log_line_counted_and_unlisted(proxy_factory, backend_factory,
                                                                tmp_path):
    kw = dict(users={b"alice": b"secret", b"bob@example.org": b"secret"},
              tokens={b"tok": b"alice"})
    pool = [backend_factory(SieveBackend, **kw) for _ in range(2)]
    own = backend_factory(SieveBackend, **kw)
    mapfile = tmp_path / "sieve.map"
    mapfile.write_text("@example.org %s\n* %s %s\n" % (own.address, pool[0].address,
                                                       pool[1].address))
    port, mport = free_port(), free_port()
    access = tmp_path / "access.log"
    block = server_block("sieve", port, proxy_map=str(mapfile), timeout="3s", max_errors=2,
                         sieve_auth="plain oauthbearer", access_log="%s json" % access)
    p = proxy_factory({"main": {"control_socket": "control.sock",
                                "metrics_listen": "127.0.0.1:%d" % mport},
                       "servers": {"sieve": block}})

    c = connect(port)                                           # password, the pool
    c.sendline(b'AUTHENTICATE "PLAIN" "%s"' % plain(b"alice", b"secret"))
    assert c.readline() == b'OK "Logged in."\r\n'
    assert c.cmd(b"LOGOUT") == b'OK "Logout completed."\r\n'
    home = [b for b in pool if b.sessions]
    assert len(home) == 1

    c = connect(port)                                           # the domain's line
    c.sendline(b'AUTHENTICATE "PLAIN" {%d+}' % len(plain(b"bob@example.org", b"secret")))
    c.send(plain(b"bob@example.org", b"secret") + b"\r\n")
    assert c.readline() == b'OK "Logged in."\r\n'
    assert c.cmd(b"LOGOUT") == b'OK "Logout completed."\r\n'
    assert own.sessions and own.sessions[0].data["login"] == (b"bob@example.org", b"secret")

    c = connect(port)                                           # a token, the same backend
    c.sendline(b'AUTHENTICATE "OAUTHBEARER" "%s"' % bearer(b"alice", b"tok"))
    assert c.readline() == b'OK "Logged in."\r\n'
    assert c.cmd(b"LOGOUT") == b'OK "Logout completed."\r\n'
    assert len(home[0].sessions) == 2

    c = connect(port)                                           # a token refused
    c.sendline(b'AUTHENTICATE "OAUTHBEARER" "%s"' % bearer(b"alice", b"expired"))
    assert c.readline() == b'"%s"\r\n' % TOKEN_ERROR          # the error challenge
    c.sendline(b'"AQ=="')                                       # the dummy response
    assert c.readline() == b'NO "Authentication failed."\r\n'
    assert c.readline() == b""
    assert home[0].sessions[2].data["dummy"] == b'"AQ=="\r\n'

    c = connect(port)                                           # max_errors
    assert c.cmd(b"FOO") == b'NO "Invalid command"\r\n'
    assert c.cmd(b"BAR") == b'BYE "Too many invalid commands"\r\n'
    assert c.readline() == b""

    def lines():
        text = access.read_text() if access.exists() else ""
        return [json.loads(x) for x in text.splitlines()] if text.count("\n") >= 5 else None
    recs = wait_for(lines, 5, 0.05, "five access_log lines")
    assert len(recs) == 5 and {r["protocol"] for r in recs} == {"sieve"}, recs
    assert len({r["session"] for r in recs}) == 5
    assert [r["result"] for r in recs] == ["ok", "ok", "ok", "auth-failed", "too-many-errors"], recs
    assert [r["user"] for r in recs] == ["alice", "bob@example.org", "alice", "alice", None]
    text = scrape(mport)[2]
    assert value(text, 'mailproxy_logins_total{protocol="sieve",result="ok"}') == 3, text
    assert value(text, 'mailproxy_logins_total{protocol="sieve",result="failed"}') == 1
    r = subprocess.run(proxy_command() + ["-c", str(p.conf_path), "sessions", "--json"],
                       cwd=str(REPO), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [], r.stdout                 # none left in the registry
