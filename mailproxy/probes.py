"""What `mailproxy check` asks of the things a configuration points at, one probe each, as
blocking socket exchanges bounded by a timeout (check.py runs them in a small thread pool);
and `unreachable()`, the master's quick look at the static backends at start (no threads:
non-blocking connects in one selector, ~1 s in all).

A probe returns a list of `Finding`s: severity ('ok', 'warn', 'error') and text.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import selectors
import socket
import struct
import ssl
import tempfile
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from . import auth_http, auth_pool
from .proxy_protocol import SIGNATURE

EXPIRY_WARN = 14 * 86400        # a certificate closer than this to its end: warn
# the proxy does these itself before login; the others reach the backend after it
_PROXY_OWN = {"AUTH", "STARTTLS"}


@dataclass
class Finding:
    severity: str           # 'ok' | 'warn' | 'error'
    text: str


class ProbeError(Exception):
    pass


def _oserr(e: OSError) -> str:
    if isinstance(e, socket.timeout) or e.errno in (errno.ETIMEDOUT, errno.EAGAIN):
        return "timed out"
    return "%d: %s" % (e.errno or 0, e.strerror or e)


def _ascii(data: bytes, limit: int = 120) -> str:
    text = data.decode("latin-1").rstrip("\r\n")
    text = re.sub(r"[^\x20-\x7e]", "?", text)
    return text if len(text) <= limit else text[:limit] + "..."


# -- certificates -------------------------------------------------------------------------------

def cert_not_after(pem_path: str) -> float:
    """The first certificate's notAfter (epoch seconds) of a PEM file; ssl's own decoder, no
    openssl command."""
    info = ssl._ssl._test_decode_cert(pem_path)     # type: ignore[attr-defined]
    return ssl.cert_time_to_seconds(info["notAfter"])


def _der_not_after(der: bytes) -> float:
    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(ssl.DER_cert_to_PEM_cert(der))
        return cert_not_after(path)
    finally:
        os.unlink(path)


def expiry(not_after: float, what: str, now: Optional[float] = None) -> Finding:
    left = not_after - (time.time() if now is None else now)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_after))
    if left <= 0:
        return Finding("error", "%s expired on %s" % (what, when))
    if left < EXPIRY_WARN:
        return Finding("warn", "%s expires in %.1f days (%s)" % (what, left / 86400, when))
    return Finding("ok", "%s valid until %s" % (what, when))


def own_certificate(path: str) -> List[Finding]:
    """The proxy's own certificate: its expiry (the key matched when load_cert_chain took it at
    the configuration test)."""
    what = 'certificate "%s"' % path
    try:
        if path.startswith("data:"):
            fd, tmp = tempfile.mkstemp(suffix=".pem")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(path[5:])
                not_after = cert_not_after(tmp)
            finally:
                os.unlink(tmp)
        else:
            not_after = cert_not_after(path)
    except (OSError, ssl.SSLError, ValueError, KeyError) as e:
        return [Finding("error", "%s cannot be read (%s)" % (what, e))]
    f = expiry(not_after, what + " (its key matches)")
    return [f]


# -- auth_http ----------------------------------------------------------------------------------

def auth_service(conf: Any, url: Any, timeout: float) -> List[Finding]:
    """A login of a user that cannot exist: any Auth-Status answer is right; OK is a warning."""
    user = ("mailproxy-check-" + secrets.token_hex(8)).encode()
    req = auth_http.AuthRequest(method="plain", user=user, passwd=secrets.token_hex(8).encode(),
                                protocol=conf.protocol, client_ip="127.0.0.1",
                                headers=list(conf.auth_http_header))
    client = _AuthClient(auth_pool.Pool(0), conf._auth_http_tls)
    what = "auth_http %s" % url.text
    try:
        result = auth_http.query(url, req, timeout, max_rounds=1, sleep=lambda s: True,
                                 client=client)
    except auth_http.AuthHttpError as e:
        return [Finding("error", "%s: %s" % (what, e))]
    if result.status == "OK":
        return [Finding("warn", '%s: accepted the unknown user "%s" (Auth-Status: OK)'
                        % (what, user.decode()))]
    return [Finding("ok", '%s answers (Auth-Status: "%s" for an unknown user)'
                    % (what, _ascii(result.message)))]


class _AuthClient:
    """auth_http.query's client over a pool without keep-alive (auth_client._Bound's shape)."""

    def __init__(self, pool: auth_pool.Pool, ctx: Any) -> None:
        self.pool, self.ctx = pool, ctx

    def frame(self, request: bytes) -> bytes:
        return auth_pool.frame(request, False)

    def exchange(self, url, request, req, peer, timeout, trace=None):
        return self.pool.exchange(url, request, req, peer, timeout, trace, ctx=self.ctx)


# -- backends -----------------------------------------------------------------------------------

class _Conn:
    """A line reader over a blocking socket that may become TLS."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > 16384:
                raise ProbeError("a reply line longer than 16k")
            data = self.sock.recv(4096)
            if not data:
                raise ProbeError("the backend closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def smtp_reply(self) -> List[bytes]:
        lines = [self.line()]
        while len(lines[-1]) > 3 and lines[-1][3:4] == b"-" and len(lines) < 200:
            lines.append(self.line())
        return lines

    def imap_until(self, tag: bytes) -> List[bytes]:
        lines = [self.line()]
        while not lines[-1].startswith(tag + b" ") and len(lines) < 200:
            lines.append(self.line())
        return lines

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


def _greeting(conn: _Conn, protocol: str) -> Tuple[bool, bytes]:
    if protocol == "smtp":
        reply = conn.smtp_reply()
        return reply[-1].startswith(b"220 "), reply[-1]
    line = conn.line()
    if protocol == "pop3":
        return line.startswith(b"+OK"), line
    return line.upper().startswith((b"* OK", b"* PREAUTH")), line


def _smtp_ehlo(conn: _Conn, name: str) -> dict:
    conn.send(b"EHLO %s\r\n" % name.encode("ascii", "replace"))
    reply = conn.smtp_reply()
    if not reply[-1].startswith(b"250"):
        raise ProbeError('EHLO refused: "%s"' % _ascii(reply[-1]))
    caps = {}
    for line in reply[1:]:
        words = line[4:].decode("latin-1").split()
        if words:
            caps[words[0].upper()] = [w.upper() for w in words[1:]]
    return caps


def _starttls(conn: _Conn, protocol: str, caps: Optional[dict]) -> Optional[str]:
    """The STARTTLS command of the protocol; an error text when the backend does not offer
    or refuses it."""
    if protocol == "smtp":
        if "STARTTLS" not in (caps or {}):
            return "offers no STARTTLS (proxy_ssl starttls)"
        conn.send(b"STARTTLS\r\n")
        ok = conn.smtp_reply()[-1]
        good = ok.startswith(b"220")
    elif protocol == "pop3":
        conn.send(b"STLS\r\n")
        ok = conn.line()
        good = ok.startswith(b"+OK")
    else:
        conn.send(b"c1 STARTTLS\r\n")
        ok = conn.imap_until(b"c1")[-1]
        good = ok.upper().startswith(b"C1 OK")
    return None if good else 'refused STARTTLS: "%s"' % _ascii(ok)


def _tls(conn: _Conn, conf: Any, host: str, out: List[Finding], what: str) -> None:
    ctx = conf._proxy_ssl_context
    name = conf.proxy_ssl_name or host
    try:
        tls = ctx.wrap_socket(conn.sock, server_hostname=name)
    except ssl.SSLCertVerificationError as e:
        raise ProbeError("certificate does not verify (%s)" % (e.verify_message or e))
    except (ssl.SSLError, OSError) as e:
        raise ProbeError("TLS handshake failed (%s)" % (getattr(e, "reason", None) or e))
    conn.sock = tls
    der = tls.getpeercert(True)
    verified = "verified" if conf.proxy_ssl_verify else "not verified (proxy_ssl_verify off)"
    out.append(Finding("ok", "%s: TLS %s, certificate %s" % (what, tls.version(), verified)))
    if der:
        f = expiry(_der_not_after(der), "%s: certificate" % what)
        if f.severity != "ok":
            out.append(f)


def backend(conf: Any, host: str, port: int, timeout: float) -> List[Finding]:
    """One backend of server `conf`: connect, greeting, TLS as proxy_ssl says, and for SMTP
    what the proxy needs of its EHLO."""
    what = "backend %s:%d (%s)" % (host, port, conf.protocol)
    out: List[Finding] = []
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        return [Finding("error", "%s: connect() failed (%s)" % (what, _oserr(e)))]
    conn = _Conn(sock)
    try:
        # a backend that expects the PROXY header (Dovecot's haproxy = yes) greets only after
        # one: the address-less kind, as upstreams.py's health check sends
        if conf.proxy_protocol == "on":
            conn.send(b"PROXY UNKNOWN\r\n")
        elif conf.proxy_protocol == "v2":
            conn.send(SIGNATURE + b"\x20\x00\x00\x00")
        if conf.proxy_ssl == "on":
            _tls(conn, conf, host, out, what)
        good, greeting = _greeting(conn, conf.protocol)
        if not good:
            return out + [Finding("error", '%s: not a %s greeting: "%s"'
                                  % (what, conf.protocol.upper(), _ascii(greeting)))]
        out.insert(0, Finding("ok", '%s greets: "%s"' % (what, _ascii(greeting, 60))))
        caps = _smtp_ehlo(conn, conf.server_name) if conf.protocol == "smtp" else None
        if conf.proxy_ssl == "starttls":
            refused = _starttls(conn, conf.protocol, caps)
            if refused:
                return out + [Finding("error", "%s: %s" % (what, refused))]
            _tls(conn, conf, host, out, what)
            if caps is not None:
                caps = _smtp_ehlo(conn, conf.server_name)
        if caps is not None:
            out += _smtp_findings(conf, caps, what)
        _quit(conn, conf.protocol)
    except ProbeError as e:
        out.append(Finding("error", "%s: %s" % (what, e)))
    except OSError as e:
        out.append(Finding("error", "%s: %s" % (what, _oserr(e))))
    finally:
        try:
            conn.sock.close()
        except OSError:
            pass
    return out


def _smtp_findings(conf: Any, caps: dict, what: str) -> List[Finding]:
    out = []
    if conf.xclient:
        if "XCLIENT" in caps:
            out.append(Finding("ok", "%s accepts XCLIENT" % what))
        else:
            out.append(Finding("error", "%s: no XCLIENT in its EHLO but xclient is on (Postfix: "
                               "smtpd_authorized_xclient_hosts must name the proxy)" % what))
    if conf.proxy_smtp_auth:
        if "PLAIN" in caps.get("AUTH", []):
            out.append(Finding("ok", "%s offers AUTH PLAIN" % what))
        else:
            out.append(Finding("error", "%s: no AUTH PLAIN in its EHLO but proxy_smtp_auth is "
                               "on" % what))
    for cap in conf.smtp_capabilities:
        words = cap.split()
        if not words or words[0].upper() in _PROXY_OWN:
            continue
        key = words[0].upper()
        if key not in caps:
            out.append(Finding("warn", "%s lacks %s, which smtp_capabilities advertises"
                               % (what, key)))
        elif key == "SIZE":
            ours = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
            theirs = caps["SIZE"]
            limit = int(theirs[0]) if theirs and theirs[0].isdigit() else 0
            if limit and (ours == 0 or ours > limit):
                out.append(Finding("warn", "%s takes SIZE %d, smtp_capabilities advertises "
                                   "SIZE %s" % (what, limit, ours or "without a limit")))
    return out


def _quit(conn: _Conn, protocol: str) -> None:
    try:
        conn.send({"smtp": b"QUIT\r\n", "pop3": b"QUIT\r\n"}.get(protocol, b"c2 LOGOUT\r\n"))
    except OSError:
        pass


# -- the master's look at start -----------------------------------------------------------------

def backend_targets(conf: Any) -> List[Tuple[str, int]]:
    """The backends of server `conf` known without a login: every member of its proxy_pass
    pool and every target of its proxy_map, once each, in order (check probes each one, the
    master's start looks at each)."""
    members = list(conf.proxy_pass or [])
    if conf.proxy_map is not None:
        members += conf.proxy_map.backends()
    seen, out = set(), []
    for b in members:
        if b.key not in seen:
            seen.add(b.key)
            out.append(b.key)
    return out


def say_unreachable(cfg: Any, log: Any, limit: float = 1.0) -> None:
    """At start, after forking the workers: the static backends that refuse or do not answer
    a connection within `limit` seconds in all, at notice (README "mailproxy check")."""
    targets = [t for conf in cfg.servers for t in backend_targets(conf)]
    for (host, port), why in unreachable(targets, limit):
        log.log("notice", "backend %s:%d is not reachable (%s)" % (host, port, why))


def unreachable(targets: List[Tuple[str, int]], limit: float = 1.0) -> List[Tuple[Tuple[str, int], str]]:
    """Non-blocking connects to every (host, port) literal at once; those refused or not
    connected within `limit` seconds, with why. No threads (the master forks)."""
    found: List[Tuple[Tuple[str, int], str]] = []
    sel = selectors.DefaultSelector()
    pending = {}
    try:
        for target in dict.fromkeys(targets):
            host, port = target
            try:
                infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0,
                                           socket.AI_NUMERICHOST)
            except socket.gaierror:
                continue        # a name: resolved per session, not looked up here
            fam, _t, _p, _c, addr = infos[0]
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setblocking(False)
            code = s.connect_ex(addr)
            if code in (0, errno.EINPROGRESS):
                sel.register(s, selectors.EVENT_WRITE, target)
                pending[s] = target
            else:
                found.append((target, "%d: %s" % (code, os.strerror(code))))
                s.close()
        deadline = time.monotonic() + limit
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ev in sel.select(left):
                s = key.fileobj
                code = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    found.append((key.data, "%d: %s" % (code, os.strerror(code))))
                else:       # a look, not a session: closed with a reset, nothing sent
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sel.unregister(s)
                del pending[s]
                s.close()
        for s, target in pending.items():
            found.append((target, "no connection within %gs" % limit))
    finally:
        for s in list(pending):
            s.close()
        sel.close()
    return found
