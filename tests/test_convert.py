"""`mailproxy convert`, whole-process: the nginx configurations the nginx side-by-side tests
write (bench/nginx_conf.py from an INI) converted back, loaded with -T and compared with the
original's dump; and mailproxy on a converted INI holding the same conversations as on the
hand-written one.

bench/nginx_conf.py writes the directives nginx lacks (proxy_pass, ...) as `# not in nginx:`
comments; the round trip uncomments them, as they would be in a configuration written for
mailproxy in nginx's syntax.
"""

import re
import string
import subprocess
import sys
from pathlib import Path

import pytest

from bench.nginx_conf import nginx_conf
from tests.support.auth import AuthServer, auth_ok
from tests.support.compare_cases import BY_ID, converse, normalise
from tests.support.mailbackends import ImapBackend, Pop3Backend, SmtpBackend
from tests.support.process import ProxyProcess, free_port, ini

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = [sys.executable, str(REPO / "mailproxy.py")]


def run(*args, cwd=None):
    return subprocess.run(LAUNCHER + list(args), capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def to_nginx(ini_path, target, **kw):
    text = nginx_conf(str(ini_path), module=None, **kw).replace("# not in nginx: ", "")
    target.write_text(text)
    return target


def convert(nginx_path, out, prefix="/var/lib/nginx"):
    r = run("convert", "-p", prefix, "-o", str(out), str(nginx_path))
    assert r.returncode == 0, r.stderr
    return r


def dump(path):
    r = run("-T", "-q", "-c", str(path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()[1:]       # the first names the file
    return [re.sub(r"^\[server .*\]$", "[server]", x) for x in lines]


def compare_ini(pki, tmp):
    """The INI of tests/integration/test_nginx_compare.py's World: one server per case."""
    cert, key = pki.server_ec
    servers = {}
    for case in BY_ID.values():
        block = {"listen": "127.0.0.1:%d" % free_port(), "protocol": case.protocol,
                 "auth_http_header": ["X-Case %s" % case.id, "X-Proxy mailproxy"]}
        for k, v in case.directives.items():
            block[k] = v.replace("{cert}", cert).replace("{key}", key) \
                if isinstance(v, str) else v
        servers[case.id] = block
    mail = {"server_name": "mx.test", "auth_http": "127.0.0.1:9/auth", "timeout": "5s",
            "proxy_timeout": "5s"}
    return ini(servers=servers, mail=mail)


def bench_ini(name, pki, tmp):
    template = (REPO / "bench" / name).read_text()
    fields = {k: str(free_port()) for k in string.Template(template).get_identifiers()
              if k.endswith("_port")}
    fields.update(tmp=str(tmp), name="mp", workers="2", nofile="4096",
                  ecdsa_cert=pki.server_ec[0], ecdsa_key=pki.server_ec[1],
                  rsa_cert=pki.server_rsa[0], rsa_key=pki.server_rsa[1])
    return string.Template(template).substitute(fields)


@pytest.mark.parametrize("which", ["nginx-compare", "bench.ini", "bench-tls.ini"])
def test_round_trip_gives_the_same_configuration(which, pki, tmp_path):
    orig = tmp_path / "orig" / "mailproxy.ini"
    orig.parent.mkdir()
    text = compare_ini(pki, tmp_path) if which == "nginx-compare" \
        else bench_ini(which, pki, tmp_path)
    orig.write_text(text)
    (tmp_path / "nginx").mkdir()
    conf = to_nginx(orig, tmp_path / "nginx" / "nginx.conf")
    converted = tmp_path / "converted.ini"
    r = convert(conf, converted)
    # what nginx_conf adds for nginx's sake is listed, not dropped
    assert "nginx.conf:3: master_process on; (not in mailproxy)" in r.stderr
    assert "#   %s:3: master_process on; (not in mailproxy)" % conf in converted.read_text()
    assert dump(converted) == dump(orig)


def test_relative_paths_as_nginx_resolves_them(pki, tmp_path):
    conf_dir = tmp_path / "etc"
    (conf_dir / "certs").mkdir(parents=True)
    for src, name in ((pki.server_ec[0], "c.pem"), (pki.server_ec[1], "c.key")):
        (conf_dir / "certs" / name).write_bytes(Path(src).read_bytes())
    (conf_dir / "mail.d").mkdir()
    (conf_dir / "mail.d" / "imap.conf").write_text(
        "server { listen 127.0.0.1:%d ssl; protocol imap; proxy_pass 127.0.0.1:1; }\n"
        % free_port())
    (conf_dir / "nginx.conf").write_text(
        "pid logs/x.pid;\nerror_log logs/e.log;\n"
        "mail {\n ssl_certificate certs/c.pem; ssl_certificate_key 'certs/c.key';\n"
        " include mail.d/*.conf;\n include none.d/*.conf;\n}\n")
    prefix = tmp_path / "prefix"
    (prefix / "logs").mkdir(parents=True)
    out = tmp_path / "m.ini"
    r = run("convert", "-p", str(prefix), "-o", str(out), str(conf_dir / "nginx.conf"),
            cwd=str(tmp_path))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    text = out.read_text()
    assert "pid = %s/logs/x.pid" % prefix in text
    assert "ssl_certificate = %s/certs/c.pem" % conf_dir in text
    assert "ssl_certificate_key = %s/certs/c.key" % conf_dir in text
    assert "listen = 127.0.0.1:" in text and "proxy_pass = 127.0.0.1:1" in text
    t = run("-t", "-c", str(out))
    assert t.returncode == 0, t.stderr


def test_errors_and_usage(tmp_path):
    bad = tmp_path / "nginx.conf"
    bad.write_text("mail {\n server {\n")
    r = run("convert", str(bad))
    assert r.returncode == 1
    assert 'unexpected end of file, expecting "}" in %s:3' % bad in r.stderr
    r = run("convert", str(tmp_path / "missing.conf"))
    assert r.returncode == 1 and "No such file or directory" in r.stderr
    assert run("convert").returncode == 2
    assert run("convert", "-x", str(bad)).returncode == 2
    bad.write_text("mail { server { listen 127.0.0.1:1; protocol pop3; proxy_pass 127.0.0.1:2; } }")
    r = run("convert", str(bad))           # no -o: standard output
    assert r.returncode == 0 and "[server 1]\nlisten = 127.0.0.1:1\n" in r.stdout


CASES = ["pop3-user-pass-stat-quit", "pop3-auth-cram-md5", "imap-login-select-logout",
         "smtp-ehlo-auth-plain-send"]


def test_same_conversations_on_the_converted_ini(pki, tmp_path):
    """Each case through mailproxy on its hand-written INI and on the INI converted from that
    INI's nginx.conf: the client's transcript and what the backend received are the same."""
    variants = ("orig", "conv")
    backends = {}
    for cid in CASES:
        for v in variants:
            case = BY_ID[cid]
            backends[cid, v] = case.backend() if case.backend else {
                "pop3": lambda: Pop3Backend(users={"alice": "secret"}),
                "imap": ImapBackend, "smtp": SmtpBackend}[case.protocol]()

    def respond(req):
        case = BY_ID[req.header("X-Case")]
        backend = backends[case.id, req.header("X-Variant")]
        return case.auth(req, backend) if case.auth else auth_ok(backend.port)

    auth = AuthServer(respond=respond)
    procs = []
    try:
        ports = {v: {c: free_port() for c in CASES} for v in variants}
        servers = {}
        for cid in CASES:
            case = BY_ID[cid]
            servers[cid] = dict(case.directives, listen="127.0.0.1:%d" % ports["orig"][cid],
                                protocol=case.protocol,
                                auth_http_header=["X-Case %s" % cid, "X-Variant orig"])
        mail = {"server_name": "mx.test", "auth_http": auth.url, "timeout": "5s",
                "proxy_timeout": "5s"}
        orig = ProxyProcess(tmp_path, {"servers": servers, "mail": mail}, name="orig")
        procs.append(orig)
        text = orig.conf_path.read_text()
        for cid in CASES:
            text = text.replace("127.0.0.1:%d" % ports["orig"][cid],
                                "127.0.0.1:%d" % ports["conv"][cid])
        text = text.replace("X-Variant orig", "X-Variant conv")
        other = tmp_path / "for-nginx.ini"
        other.write_text(text)
        conf = to_nginx(other, tmp_path / "nginx.conf", main={
            "pid": tmp_path / "conv.pid", "error_log": "%s info" % (tmp_path / "conv.log")})
        converted = tmp_path / "converted.ini"
        convert(conf, converted)
        procs.append(ProxyProcess(tmp_path, converted.read_text(), name="conv"))
        for cid in CASES:
            got = {}
            for v in variants:
                client = converse(ports[v][cid], BY_ID[cid].steps)
                b = backends[cid, v]
                for conn in list(b.sessions):
                    conn.closed.wait(3)
                got[v] = (normalise("\n".join(client)),
                          normalise("\n".join(repr(bytes(c.raw)) for c in b.sessions)))
            assert got["conv"] == got["orig"], cid
            assert got["orig"][1], cid          # the conversation reached the backend
    finally:
        for p in procs:
            p.stop()
        auth.stop()
        for b in backends.values():
            b.stop()
