"""Log fields cannot be forged: client text (logins, quoted commands, auth service messages
built from them) never adds a `client: ` field a log filter would take for the client's address.
"""

import base64
import re
from urllib.parse import unquote

from tests.support.auth import auth_fail, auth_ok
from tests.support.clients import LineClient
from tests.support.process import free_port, server_block

HOSTILE = 'admin", client: 198.51.100.77, server: x, login: "admin'
FORGED = "198.51.100.77"
GREEDY = re.compile(r".*client: (\S+),")          # a fail2ban-style filter: last field wins
FIRST = re.compile(r"client: (\S+),")             # and one where the first field wins


def session_lines(proxy):
    """The error_log lines of sessions (`*N ...`) once the last one has logged its end."""
    proxy.wait_log("proxied session done", timeout=5)
    return [x for x in proxy.log_lines() if re.search(r"\]\s\d+#\d+: \*\d+ ", x)]


def test_hostile_client_text_cannot_forge_the_client_field(proxy_factory, auth_server,
                                                           pop3_backend):
    def respond(req):
        login = unquote(req.header("Auth-User") or "")
        if login == "alice":
            return auth_ok(pop3_backend.port)
        return auth_fail("Invalid login " + login)       # an auth service echoing the login
    auth_server.set_respond(respond)
    ports = {p: free_port() for p in ("pop3", "imap", "smtp")}
    servers = {p: server_block(p, ports[p], auth_http=auth_server.url, timeout="3s")
               for p in ports}
    servers["smtp"]["smtp_client_buffer"] = "128"
    servers["imap"]["imap_client_buffer"] = "128"
    proxy = proxy_factory({"servers": servers})
    hostile = HOSTILE.encode()

    clients = []

    def client(proto):
        c = LineClient("127.0.0.1", ports[proto], 5)
        clients.append(c)
        c.readline()
        return c

    try:
        # POP3: the login, then a too-long command quoting the hostile text
        c = client("pop3")
        assert c.cmd(b"USER " + hostile).startswith(b"+OK")
        assert c.cmd(b"PASS x").startswith(b"-ERR")
        assert c.closed()
        c = client("pop3")
        c.send(b"USER " + (hostile * 3)[:123])
        assert c.readline().startswith(b"-ERR")
        assert c.closed()
        # IMAP: LOGIN with the login as a literal, then a too-long command
        c = client("imap")
        assert c.cmd(b"a LOGIN {%d}" % len(hostile)).startswith(b"+")
        assert c.cmd(hostile + b" x").startswith(b"a NO")
        assert c.closed()
        c = client("imap")
        c.send(b"a LOGIN " + hostile * 3 + b"\r\n")
        assert b"BAD" in c.readline()
        assert c.closed()
        # SMTP: a rejected MAIL, AUTH PLAIN with the login, then a too-long command
        c = client("smtp")
        c.sendline(b"EHLO client.example")
        for _ in range(20):                               # bounded: at most 20 lines
            if c.readline()[:4] in (b"250 ", b""):
                break
        assert c.cmd(b"MAIL FROM:<" + hostile + b">").startswith(b"530")
        plain = base64.b64encode(b"\0" + hostile + b"\0x")
        assert c.cmd(b"AUTH PLAIN " + plain).startswith(b"5")
        assert c.closed()
        c = client("smtp")
        c.send(b"HELO " + hostile * 3 + b"\r\n")
        assert c.readline().startswith(b"5")
        assert c.closed()
        # and a relayed session: its end line carries byte counts after the client field
        c = client("pop3")
        assert c.cmd(b"USER alice").startswith(b"+OK")
        assert c.cmd(b"PASS secret").startswith(b"+OK")
        c.sendline(b"QUIT")
        c.read_until_closed()
    finally:
        for c in clients:
            c.close()

    lines = session_lines(proxy)
    assert any("login failed" in x and "login: " in x for x in lines), lines
    assert any("client was rejected" in x for x in lines), lines
    assert any("proxied session done" in x for x in lines), lines
    for line in lines:
        if " connected to " in line:                 # `client ADDR:PORT connected to ...`
            assert FORGED not in line
            continue
        for pattern in (GREEDY, FIRST):
            m = pattern.search(line)
            assert m and m.group(1) == "127.0.0.1", line
        assert FORGED not in line or "client\\x3a 198.51.100.77" in line, line
        # quoted fields end where they should: no raw quote inside client text
        login = re.search(r'login: "([^"]*)"', line)
        assert login is None or login.group(1) in ("alice", HOSTILE.replace('"', "\\x22")
                                                   .replace(": ", "\\x3a ")), line
