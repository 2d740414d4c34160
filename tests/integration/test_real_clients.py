"""Real clients through mailproxy to real servers: swaks (AUTH PLAIN, LOGIN, CRAM-MD5,
pipelining) and curl (imap://, pop3://, smtp://), all connecting from 127.0.0.2; and HAProxy in
front of two mailproxy instances sending PROXY v2 to `listen ... proxy_protocol`."""

import subprocess

import pytest

from tests.support.auth import AuthServer
from tests.support.common import fail_on_errors
from tests.support.process import free_port, server_block
from tests.support.realmail import dovecot_responder, smtp_message, store_message
from tests.support.realservers import CLIENT_IP, USERS, HAProxy, need, program, wait_port

pytestmark = pytest.mark.integration


@pytest.fixture
def auth(dovecot, postfix):
    srv = AuthServer()
    respond = dovecot_responder({"imap": dovecot.ports["imap"], "pop3": dovecot.ports["pop3"],
                                 "smtp": postfix.port})
    srv.set_respond(respond)
    yield srv
    srv.stop()
    fail_on_errors(srv, type(srv).__name__)


@pytest.fixture
def start(proxy_factory, auth):
    def start(protocol, **directives):
        port = free_port()
        directives.setdefault("auth_http", auth.url)
        directives.setdefault("timeout", "10s")
        directives.setdefault("server_name", "proxy.test")
        proxy_factory({"servers": {protocol: server_block(protocol, port, **directives)}})
        return port
    return start


def run(argv, timeout=30):
    res = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return res


# ---------------------------------------------------------------------------------------------
# swaks

@pytest.mark.parametrize("mech,extra", [("PLAIN", {}), ("LOGIN", {}),
                                        ("CRAM-MD5", {"smtp_auth": "plain login cram-md5"}),
                                        ("PLAIN", {"smtp_capabilities": "PIPELINING"})],
                         ids=["plain", "login", "cram-md5", "pipelining"])
def test_swaks_through_mailproxy_to_postfix(start, postfix, postfix_log, mech, extra):
    need("swaks")
    import uuid
    port = start("smtp", **extra)
    token = uuid.uuid4().hex
    argv = [program("swaks"), "--server", f"127.0.0.1:{port}", "--local-interface", CLIENT_IP,
            "--ehlo", "swaks.client.test", "--auth", mech, "--auth-user", "alice",
            "--auth-password", USERS["alice"], "--from", "alice@example.org",
            "--to", "bob@example.org", "--header", f"Subject: {token}",
            "--body", f"body of {token}", "--timeout", "15"]
    if "smtp_capabilities" in extra:
        argv.append("--pipeline")
    res = run(argv)
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, out + res.stderr.decode(errors="replace")
    assert "235 2.0.0 OK" in out
    assert "250 2.0.0 Ok: queued as" in out
    line = postfix_log.wait(r": client=.*sasl_username=alice")
    assert f"[{CLIENT_IP}]" in line, line
    assert f"body of {token}".encode() in postfix.wait_message("bob", token)


def test_swaks_wrong_password(start):
    need("swaks")
    port = start("smtp")
    res = run([program("swaks"), "--server", f"127.0.0.1:{port}", "--local-interface",
               CLIENT_IP, "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "bad",
               "--to", "bob@example.org", "--from", "alice@example.org", "--timeout", "15"])
    out = res.stdout.decode(errors="replace")
    assert res.returncode != 0
    assert "535 5.7.0 Invalid login or password" in out, out


# ---------------------------------------------------------------------------------------------
# curl

def _curl(*args):
    res = run([program("curl"), "-sS", "--max-time", "20", "--interface", CLIENT_IP] + list(args))
    return res


@pytest.mark.parametrize("login_options", [None, "AUTH=PLAIN", "AUTH=LOGIN", "AUTH=CRAM-MD5"])
def test_curl_imap_fetch(start, dovecot, dovecot_log, login_options):
    need("curl")
    port = start("imap", imap_auth="plain login cram-md5")
    token, body, uid, _seq = store_message(dovecot)
    args = [f"imap://127.0.0.1:{port}/INBOX/;UID={uid}", "-u", f"alice:{USERS['alice']}"]
    if login_options:
        args += ["--login-options", login_options]
    res = _curl(*args)
    assert res.returncode == 0, res.stderr
    assert res.stdout == body
    line = dovecot_log.wait(r"imap-login: Info: Login: user=<alice>")
    assert "rip=127.0.0.1" in line


def test_curl_imap_custom_request(start, dovecot):
    need("curl")
    port = start("imap")
    store_message(dovecot)
    res = _curl(f"imap://127.0.0.1:{port}/INBOX", "-u", f"alice:{USERS['alice']}",
                "-X", "STATUS INBOX (MESSAGES)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(b"* STATUS INBOX (MESSAGES ")


@pytest.mark.parametrize("login_options", [None, "AUTH=LOGIN", "AUTH=CRAM-MD5", "AUTH=+APOP"])
def test_curl_pop3_retr(start, dovecot, login_options):
    need("curl")
    port = start("pop3", pop3_auth="plain apop cram-md5")
    token, body, _uid, seq = store_message(dovecot)
    args = [f"pop3://127.0.0.1:{port}/{seq}", "-u", f"alice:{USERS['alice']}"]
    if login_options:
        args += ["--login-options", login_options]
    res = _curl(*args)
    assert res.returncode == 0, res.stderr
    assert res.stdout == body


def test_curl_pop3_wrong_password(start):
    need("curl")
    port = start("pop3")
    res = _curl(f"pop3://127.0.0.1:{port}/", "-u", "alice:wrong")
    assert res.returncode == 67, (res.returncode, res.stderr)     # CURLE_LOGIN_DENIED


def test_curl_smtp_send(start, postfix, postfix_log, tmp_path):
    need("curl")
    import uuid
    port = start("smtp")
    token = uuid.uuid4().hex
    msg = tmp_path / "msg.eml"
    msg.write_bytes(smtp_message(token))
    res = _curl(f"smtp://127.0.0.1:{port}", "--mail-from", "alice@example.org",
                "--mail-rcpt", "bob@example.org", "--upload-file", str(msg),
                "-u", f"alice:{USERS['alice']}")
    assert res.returncode == 0, res.stderr
    line = postfix_log.wait(r": client=.*sasl_username=alice")
    assert f"[{CLIENT_IP}]" in line, line
    got = postfix.wait_message("bob", token)
    assert got.replace(b"\n", b"\r\n").endswith(smtp_message(token))


def test_curl_smtp_mx_flow_without_auth(start, postfix):
    need("curl")
    import uuid
    port = start("smtp", smtp_auth="none")
    token = uuid.uuid4().hex
    res = subprocess.run([program("curl"), "-sS", "--max-time", "20", "--interface", CLIENT_IP,
                          f"smtp://127.0.0.1:{port}", "--mail-from", "sender@example.com",
                          "--mail-rcpt", "carol@example.org", "-T", "-"],
                         input=smtp_message(token), capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    got = postfix.wait_message("carol", token)
    assert got.replace(b"\n", b"\r\n").endswith(smtp_message(token))


# ---------------------------------------------------------------------------------------------
# HAProxy in front of two mailproxy instances

def test_haproxy_send_proxy_v2_to_two_mailproxies(proxy_factory, auth, dovecot, dovecot_log,
                                                  workdir, children, imap_from):
    need("haproxy")
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        block = server_block("imap", port, auth_http=auth.url, timeout="10s",
                             imap_client_id=True, set_real_ip_from="127.0.0.1")
        block["listen"] = f"127.0.0.1:{port} proxy_protocol"
        proxy_factory({"servers": {"imap": block}}, name=f"mailproxy-behind-haproxy{i}")
    front = free_port()
    cfg = f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend mail_imap
    bind 127.0.0.1:{front}
    default_backend mailproxies
backend mailproxies
    balance roundrobin
    server mp0 127.0.0.1:{ports[0]} send-proxy-v2
    server mp1 127.0.0.1:{ports[1]} send-proxy-v2
"""
    h = HAProxy(workdir, cfg)
    children.append(h)
    wait_port("127.0.0.1", front, proc=h.proc, what="haproxy", log=h.out_path)
    for _ in range(2):                      # round robin: one session through each instance
        m = imap_from(front)
        assert m.login("alice", USERS["alice"])[0] == "OK"
        m.logout()
    lines = [ln for ln in dovecot_log.text().splitlines() if "Login: user=<alice>" in ln]
    assert len(lines) == 2, lines
    for ln in lines:
        assert f"rip={CLIENT_IP}," in ln, ln
    clients = [r.header("Client-IP") for r in auth.requests]
    assert clients == [CLIENT_IP, CLIENT_IP]
