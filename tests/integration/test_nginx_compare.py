"""nginx side by side: the same client conversations run against nginx's mail proxy (Debian's
nginx-light + libnginx-mod-mail, configured from the same INI by bench/nginx_conf.py) and
against mailproxy, with the same auth_http service and the same scripted backends.

Three transcripts are compared per case, byte for byte after normalising the random parts
(APOP / CRAM-MD5 salts and what depends on them):
  * the client's conversation (what each proxy said, and whether it closed),
  * the auth_http request each proxy sent,
  * what the backend received.
Where mailproxy deliberately differs (an nginx defect we fix, or our addition, or nginx
behaviour newer than Debian's version that we follow), the case lists the difference in
KNOWN_DIFFERENCES with its reason, as (nginx bytes, mailproxy bytes) substitutions applied to
nginx's transcript before the comparison, so each difference is exact and visible.

All cases run on one nginx and one mailproxy: one server block per case (its own port), the
case named to the auth service by an `auth_http_header X-Case`.
"""

import os
import re
import shutil
import time

import pytest

from tests.support.auth import AuthServer, auth_fail, auth_ok
from tests.support.compare_cases import BY_ID, CASES, SERVER_NAME, converse, normalise
from tests.support.mailbackends import ImapBackend, Pop3Backend, SmtpBackend
from tests.support.process import ProxyProcess, free_port
from tests.support.realservers import Nginx, TempDir, need

pytestmark = pytest.mark.integration


def _http10(raw):
    """An auth request as nginx writes it: HTTP/1.0, no keep-alive line."""
    if raw.startswith(b"GET ") and b" HTTP/1.1\r\n" in raw.split(b"\r\n", 1)[0] + b"\r\n":
        raw = raw.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
        raw = raw.replace(b"\r\nConnection: keep-alive\r\n", b"\r\n", 1)
    return raw


def S(data):
    """A server line of a transcript, as converse() writes it."""
    return "S: %r" % data


def C(data):
    return "C: %r" % data


def A(data):
    return "A: %r" % data


def B(data):
    return "B: %r" % data


def _noop_replies(tags):
    return b"".join(b"%s OK completed\r\n" % t for t in tags)


_IMAP_NOOPS = [b"n%d" % i for i in range(60)]
_IMAP_LOGOUT_ANSWERED = "\n".join([C(b"a2 LOGOUT\r\n"), S(b"* BYE\r\na2 OK completed\r\n")])

# Documented differences: key -> (reason, {part: [(nginx fragment, mailproxy fragment)]}).
# The fragments are transcript text (S()/C()/A()/B() lines, "closed"); each nginx fragment
# must be found in nginx's transcript (so what nginx does is pinned too) and is replaced by
# the mailproxy fragment before the comparison. Parts: client, auth, backend.
KNOWN_DIFFERENCES = {
    "imap-id": (
        "our addition: mailproxy answers the IMAP ID command (RFC 2971) before login, since "
        "clients such as Thunderbird and Apple Mail send it first; nginx has no ID and "
        "answers BAD (counted toward max_errors).",
        {"client": [(S(b"a1 BAD invalid command\r\n"),
                     S(b'* ID NIL\r\na1 OK completed\r\n'))]}),
    "xclient-login-xtext": (
        "nginx 1.29.2 (newer than Debian's 1.22) encodes XCLIENT LOGIN as xtext (RFC 1891); "
        "1.22 sends the raw login, so a space in it splits the XCLIENT line into a bogus "
        "attribute ('y') and '+'/'=' are misread by the backend. mailproxy follows 1.29.2.",
        {"backend": [(b"LOGIN=al+ice=x y ".decode(), b"LOGIN=al+2Bice+3Dx+20y ".decode())]}),
    "imap-empty-tag": (
        "nginx defect we fix: nginx takes a line starting with a space as a command with an "
        "empty tag, logs the user in and replays ' LOGIN' to the backend; mailproxy requires "
        "a tag of at least one character and answers untagged BAD.",
        {"client": [(S(b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"),
                     S(b"* BAD invalid command\r\n")),
                    (S(b"* BYE Logging out\r\na2 OK Logout completed.\r\n"),
                     S(b"* BYE\r\na2 OK completed\r\n"))],
         "auth": [(A(b"GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: plain\r\n"
                     b"Auth-User: alice\r\nAuth-Pass: secret\r\nAuth-Protocol: imap\r\n"
                     b"Auth-Login-Attempt: 1\r\nClient-IP: 127.0.0.1\r\n"
                     b"X-Case: imap-empty-tag\r\n\r\n"), "")],
         "backend": [(B(b" LOGIN {5}\r\nalice {6}\r\nsecret\r\na2 LOGOUT\r\n"), "")]}),
    "imap-zero-literal": (
        "nginx defect we fix: nginx takes one byte for an empty literal {0}, so the login "
        "becomes ' ' and the password 'ecret' (sent to the auth service and replayed to the "
        "backend, which refuses: internal error); mailproxy reads {0} as an empty string and "
        "refuses the empty login as an invalid command, keeping the session.",
        {"client": [(S(b"* BAD internal server error\r\n") + "\nclosed",
                     S(b"a1 BAD invalid command\r\n") + "\n" + _IMAP_LOGOUT_ANSWERED
                     + "\nclosed")],
         "auth": [(A(b"GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: plain\r\n"
                     b"Auth-User: %20\r\nAuth-Pass: ecret\r\nAuth-Protocol: imap\r\n"
                     b"Auth-Login-Attempt: 1\r\nClient-IP: 127.0.0.1\r\n"
                     b"X-Case: imap-zero-literal\r\n\r\n"), "")],
         "backend": [(B(b"a1 LOGIN {1}\r\n  {5}\r\necret\r\n"), "")]}),
    "imap-literal-too-big": (
        "nginx defect we fix: a synchronising literal that cannot fit imap_client_buffer gets "
        "'+ OK' from nginx, which then swallows what the client sends as literal data and "
        "refuses later; mailproxy refuses it at once as a too long command (BAD, close).",
        {"client": [(S(b"+ OK\r\n") + "\n" + C(b"a2 LOGOUT\r\n"),
                     S(b"a1 BAD invalid command\r\n") + "\nclosed")]}),
    "imap-pipelined-beyond-buffer": (
        "nginx defect we fix (README): pipelined commands larger than imap_client_buffer in "
        "total are taken by nginx as one too long command: it answers the commands that fit "
        "(16 of 60 here, depending on how the bytes arrive; a command cut by the buffer end "
        "may also get BAD) and closes; mailproxy answers every command.",
        {"client": [(re.compile(re.escape("S: b'") + r"(n\d+ OK completed\\r\\n"
                                r"|[^ ]* ?BAD invalid command\\r\\n)+'\nclosed"),
                     S(_noop_replies(_IMAP_NOOPS)) + "\n" + _IMAP_LOGOUT_ANSWERED
                     + "\nclosed")]}),
    "smtp-pipelined-beyond-buffer": (
        "nginx defect we fix (README): the same with smtp_client_buffer: nginx answers the "
        "commands that fit (15 to 41 NOOPs seen, depending on how the bytes arrive; a NOOP cut "
        "by the buffer end gets '500 5.5.1 Invalid command') and closes; mailproxy answers "
        "all 100.",
        {"client": [(re.compile(re.escape(S(b"250-mx.test\r\n250 AUTH PLAIN LOGIN\r\n")[:-1])
                                + r"(250 2\.0\.0 OK\\r\\n|500 5\.5\.1 Invalid command\\r\\n)"
                                r"{1,99}'\nclosed"),
                     S(b"250-mx.test\r\n250 AUTH PLAIN LOGIN\r\n" + b"250 2.0.0 OK\r\n" * 100)
                     + "\n" + C(b"QUIT\r\n") + "\n" + S(b"221 2.0.0 Bye\r\n")
                     + "\nclosed")]}),
    "smtp-rejected-mail-pipelined": (
        "nginx defect we fix (reference 6.7): when nginx logs a MAIL refused before "
        "authentication it overwrites the line ends in its receive buffer, so commands "
        "pipelined after it are lost (NOOP and RSET get no answer) and the next command "
        "(QUIT) is answered 'Invalid command'; mailproxy answers each command.",
        {"client": [(S(b"250-mx.test\r\n250 AUTH PLAIN LOGIN\r\n530 5.7.1 Authentication "
                       b"required\r\n") + "\n" + C(b"QUIT\r\n") + "\n"
                     + S(b"500 5.5.1 Invalid command\r\n"),
                     S(b"250-mx.test\r\n250 AUTH PLAIN LOGIN\r\n530 5.7.1 Authentication "
                       b"required\r\n250 2.0.0 OK\r\n250 2.0.0 OK\r\n") + "\n"
                     + C(b"QUIT\r\n") + "\n" + S(b"221 2.0.0 Bye\r\n") + "\nclosed")]}),
}


def apply_known(case, part, text):
    """nginx's (normalised) transcript with the case's documented differences applied."""
    if not case.known:
        return text
    _reason, parts = KNOWN_DIFFERENCES[case.known]
    for theirs, ours in parts.get(part, ()):
        if isinstance(theirs, re.Pattern):           # nginx varies (e.g. with segmentation)
            m = theirs.search(text)
            found = m is not None
            if found:
                text = text[:m.start()] + ours + text[m.end():]
        else:
            found = theirs in text
            text = text.replace(theirs, ours)
        assert found, (f"{case.id}: the documented nginx behaviour is not what nginx did "
                       f"({part}):\n{theirs}\n--- nginx said ---\n{text}")
    return text


# ---------------------------------------------------------------------------------------------
# one nginx, one mailproxy, every case

class World:
    """All cases on one nginx and one mailproxy, each case with its own backend per proxy;
    every conversation runs at once (threads), then the tests compare the results."""

    PROXIES = ("nginx", "mailproxy")

    def __init__(self, tmp, proxy_dir, server_pair):
        # a copy of the test PKI's ECDSA pair beside nginx's own files
        self.cert, self.key = str(tmp / "cert.pem"), str(tmp / "key.pem")
        shutil.copyfile(server_pair[0], self.cert)
        shutil.copyfile(server_pair[1], self.key)
        self.auth = AuthServer(respond=self.respond)
        self.used_ports = set()
        self.backends = {}
        self.ports = {p: {} for p in self.PROXIES}
        for case in CASES:
            for p in self.PROXIES:
                if case.backend is not None:
                    b = case.backend()
                elif case.protocol == "pop3":
                    b = Pop3Backend(users={"alice": "secret"})
                elif case.protocol == "imap":
                    b = ImapBackend()
                else:
                    b = SmtpBackend()
                self.backends[case.id, p] = b
        mail = {"server_name": SERVER_NAME, "auth_http": self.auth.url, "timeout": "5s",
                "proxy_timeout": "5s"}
        self.nginx = self.proxy = None
        self.results = {}
        try:
            self.nginx = Nginx(tmp / "nginx", self._config(mail, "nginx"),
                               list(self.ports["nginx"].values()))
            self.proxy = ProxyProcess(proxy_dir, self._config(mail, "mailproxy"),
                                      start_timeout=10)
        except BaseException:
            self.stop()
            raise

    def _config(self, mail, proxy):
        servers = {}
        for case in CASES:
            port = free_port()
            while port in self.used_ports:
                port = free_port()
            self.used_ports.add(port)
            self.ports[proxy][case.id] = port
            block = {"listen": f"127.0.0.1:{port}", "protocol": case.protocol,
                     "auth_http_header": [f"X-Case {case.id}", f"X-Proxy {proxy}"]}
            for key, value in case.directives.items():
                if isinstance(value, str):
                    value = value.replace("{cert}", self.cert).replace("{key}", self.key)
                block[key] = value
            servers[case.id] = block
        return {"mail": mail, "servers": servers}

    def respond(self, req):
        case = BY_ID.get(req.header("X-Case"))
        if case is None:
            return auth_fail("unknown case")
        backend = self.backends[case.id, req.header("X-Proxy")]
        if case.auth is not None:
            return case.auth(req, backend)
        return auth_ok(backend.port)

    def run(self, case, proxy):
        backend = self.backends[case.id, proxy]
        client = converse(self.ports[proxy][case.id], case.steps)
        # the backend side: wait for the proxy to close it
        backend_raw = []
        deadline = time.monotonic() + 3
        for conn in list(backend.sessions):
            conn.closed.wait(max(0.0, deadline - time.monotonic()))
            header = conn.proxy_header or b""
            backend_raw.append(header + bytes(conn.raw))
        # Auth-Session-Id: ours (README "With an auth service"), a random id per session;
        # HTTP/1.1 keep-alive: ours (README "The auth_http client"; 0 gives nginx's request)
        auth = ["A: %r" % re.sub(rb"Auth-Session-Id: [A-Za-z0-9_-]{16}\r\n", b"", _http10(
                                 r.raw.replace(b"X-Proxy: %s\r\n" % proxy.encode(), b"")))
                for r in list(self.auth.requests)
                if r.header("X-Case") == case.id and r.header("X-Proxy") == proxy]
        return {"client": "\n".join(client),
                "auth": "\n".join(auth),
                "backend": "\n".join("B: %r" % b for b in backend_raw)}

    def run_all(self, workers=24):
        from concurrent.futures import ThreadPoolExecutor
        jobs = [(case, p) for case in CASES for p in self.PROXIES]
        with ThreadPoolExecutor(workers) as pool:
            for (case, p), result in zip(jobs, pool.map(lambda j: self.run(*j), jobs)):
                self.results[case.id, p] = result

    def stop(self):
        for p in (self.proxy, self.nginx):
            if p is not None:
                p.stop()
        self.auth.stop()
        for b in self.backends.values():
            b.stop()


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    need("nginx", "openssl")
    pki = request.getfixturevalue("pki")       # after need(): a missing openssl fails in CI
    tmp = TempDir("mailproxy-nginx-")
    try:
        w = World(tmp.path, tmp_path_factory.mktemp("mailproxy-vs-nginx"), pki.server_ec)
    except BaseException:
        tmp.cleanup()
        raise
    try:
        w.run_all()
        yield w
    finally:
        w.stop()
        tmp.cleanup()


def test_nginx_version_is_recorded(world):
    version = Nginx.version()
    assert version.startswith("nginx version: nginx/"), version


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_same_conversation_as_nginx(world, case):
    theirs = world.results[case.id, "nginx"]
    ours = world.results[case.id, "mailproxy"]
    dump = os.environ.get("MAILPROXY_COMPARE_DUMP")
    if dump:        # every transcript pair, for reading (not needed by the test)
        with open(dump, "a") as f:
            f.write(f"===== {case.id}\n")
            for part in ("client", "auth", "backend"):
                f.write(f"--- {part}: nginx\n{theirs[part]}\n--- {part}: mailproxy\n"
                        f"{ours[part]}\n")
    for part in ("client", "auth", "backend"):
        expected = apply_known(case, part, normalise(theirs[part]))
        got = normalise(ours[part])
        assert got == expected, (
            f"{case.id}: the {part} transcripts differ\n--- nginx ---\n{theirs[part]}\n"
            f"--- mailproxy ---\n{ours[part]}")
