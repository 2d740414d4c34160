"""The nginx auth_http protocol (ngx_mail_auth_http_module.c): request, response, WAIT.

One HTTP/1.0 GET on a fresh connection per authentication attempt; the
response header block (at most 1024 bytes) decides where the user goes.
`query()` is called from many session threads at once: it keeps no shared
state, and each call opens, uses and closes its own socket.

The auth URL comes from config (`AuthURL`, duck-typed here): `uri`,
`host_header`, `unix` (path or None), `family`, `sockaddr` (the resolved
address tuple for socket.connect; None for unix).
"""

from __future__ import annotations

import errno as _errno
import os
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import ktimeout, metrics, oauth, trace as _trace
from .log import addr_text, sanitize

__all__ = [
    'AuthRequest', 'AuthResult', 'AuthHttpError', 'build_request',
    'parse_response', 'query', 'peer_name', 'escape', 'MAX_HEADER',
    'MAX_WAIT_ROUNDS', 'MAX_AUTH_WAIT',
]

MAX_HEADER = 1024           # nginx reads the status line + headers into 1024 bytes
MAX_WAIT_ROUNDS = 100       # Auth-Status: WAIT rounds before giving up (nginx: unbounded)
# Auth-Wait is cut to this many seconds (README): nginx multiplies it into a msec timer that
# overflows; here an unbounded value would overflow Event.wait() or hold the session for ever
MAX_AUTH_WAIT = 3600
_MAX_INT = 2 ** 63 - 1      # ngx_atoi() refuses values beyond NGX_MAX_INT_T_VALUE

_NEEDS_PASSWORD = ('apop', 'cram-md5', 'external')


class AuthHttpError(Exception):
    """The auth exchange failed; the client gets the internal-error reply.

    str() is the message to log at error level; `errno` is the OS error
    number when one caused it.
    """

    def __init__(self, message: str, errno: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno


@dataclass
class AuthRequest:
    method: str                      # 'plain' | 'apop' | 'cram-md5' | 'external' | 'none'
                                     # | 'oauthbearer' | 'xoauth2' (passwd: the bearer token)
    user: bytes
    passwd: bytes
    salt: Optional[bytes] = None     # sent as Auth-Salt for apop / cram-md5 only
    protocol: str = 'pop3'           # 'pop3' | 'imap' | 'smtp' | 'sieve'
    attempt: int = 1
    client_ip: str = ''
    client_host: Optional[str] = None  # SMTP: header present only when not None
    proxy: Optional[tuple] = None    # (src_addr, src_port, dst_addr, dst_port) from a PROXY header
    smtp_helo: Optional[bytes] = None  # method 'none' only
    smtp_from: Optional[bytes] = None
    smtp_to: Optional[bytes] = None
    ssl: list = field(default_factory=list)      # [(name, value)] Auth-SSL*; Auth-SSL-Cert raw PEM
    headers: list = field(default_factory=list)  # auth_http_header [(name, value)]
    session_id: Optional[str] = None  # ours: Auth-Session-Id (the session's id in every log)


@dataclass
class AuthResult:
    status: str                      # 'OK' | 'FAIL' ('WAIT' only from parse_response)
    message: bytes = b''             # the Auth-Status text on FAIL
    server: str = ''                 # IPv4 (normalised) / IPv6 literal or host name
    port: int = 0
    user: Optional[bytes] = None     # Auth-User override
    passwd: Optional[bytes] = None   # Auth-Pass override
    wait: Optional[int] = None       # Auth-Wait seconds (FAIL: sleep, then let the client retry)
    error_code: Optional[str] = None  # Auth-Error-Code (SMTP), None when absent or empty
    peer: str = ''
    ssl_backend: Optional[str] = None  # ours: Auth-SSL-Backend on|off|starttls, None if absent
    # token logins (README "OAuth 2.0 logins"): Auth-Error-SASL as a challenge's base64 text;
    # Auth-Method 'plain' (only with Auth-Pass): the backend login uses that password
    sasl_error: Optional[bytes] = None
    method: Optional[str] = None


# --- request -----------------------------------------------------------------

_ESC_RE = re.compile(rb'[\x00-\x20%]')
_ESC_MAP = {bytes([c]): b'%%%02X' % c for c in list(range(0x21)) + [0x25]}
_UNSAFE_RE = re.compile(rb'[\r\n\x00]')


def _esc_sub(m):
    return _ESC_MAP[m.group()]


def escape(value: bytes) -> bytes:
    """nginx's NGX_ESCAPE_MAIL_AUTH: %XX (uppercase) for 0x00-0x20 and '%' only."""
    if _ESC_RE.search(value) is None:
        return value
    return _ESC_RE.sub(_esc_sub, value)


def _b(value):
    if value is None:
        return b''
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, int):
        return b'%d' % value
    return str(value).encode('utf-8', 'surrogateescape')


def _safe(value):
    """A header value that is not escaped by the protocol: never let CR, LF or
    NUL through (they would end the header and inject new ones)."""
    value = _b(value)
    if b'\r' in value or b'\n' in value or b'\x00' in value:
        return _UNSAFE_RE.sub(_esc_sub, value)
    return value


def build_request(url: Any, req: AuthRequest) -> bytes:
    """The exact request of ngx_mail_auth_http_create_request (header order included)."""
    host = url.host_header
    if not host:
        host = 'localhost' if url.unix else (url.host or '')
    out = [
        b'GET ', _safe(url.uri or '/'), b' HTTP/1.0\r\n',
        b'Host: ', _safe(host), b'\r\n',
        b'Auth-Method: ', _safe(req.method), b'\r\n',
        b'Auth-User: ', escape(_b(req.user)), b'\r\n',
        b'Auth-Pass: ', escape(_b(req.passwd)), b'\r\n',
    ]
    if req.method in ('apop', 'cram-md5') and req.salt:
        salt = _b(req.salt)
        if salt.endswith(b'\r\n'):
            salt = salt[:-2]
        out += (b'Auth-Salt: ', _safe(salt), b'\r\n')
    out += (
        b'Auth-Protocol: ', _safe(req.protocol), b'\r\n',
        b'Auth-Login-Attempt: %d\r\n' % int(req.attempt),
        b'Client-IP: ', _safe(req.client_ip), b'\r\n',
    )
    if req.client_host is not None:
        out += (b'Client-Host: ', _safe(req.client_host), b'\r\n')
    if req.proxy:
        src_addr, src_port, dst_addr, dst_port = req.proxy
        out += (
            b'Proxy-Protocol-Addr: ', _safe(src_addr), b'\r\n',
            b'Proxy-Protocol-Port: %d\r\n' % int(src_port),
            b'Proxy-Protocol-Server-Addr: ', _safe(dst_addr), b'\r\n',
            b'Proxy-Protocol-Server-Port: %d\r\n' % int(dst_port),
        )
    if req.method == 'none':
        out += (
            b'Auth-SMTP-Helo: ', _safe(req.smtp_helo), b'\r\n',
            b'Auth-SMTP-From: ', _safe(req.smtp_from), b'\r\n',
            b'Auth-SMTP-To: ', _safe(req.smtp_to), b'\r\n',
        )
    for name, value in req.ssl or ():
        if value is None:
            continue
        name = _safe(name)
        if name.lower() == b'auth-ssl-cert':
            value = escape(_b(value))
        else:
            value = _safe(value)
        out += (name, b': ', value, b'\r\n')
    if req.session_id:
        out += (b'Auth-Session-Id: ', _safe(req.session_id), b'\r\n')
    for name, value in req.headers or ():
        out += (_safe(name), b': ', _safe(value), b'\r\n')
    out.append(b'\r\n')
    return b''.join(out)


# --- response ----------------------------------------------------------------

_NAME_RE = re.compile(rb'[A-Za-z0-9][A-Za-z0-9-]*')
_DIGITS_RE = re.compile(rb'[0-9]+')
_HOST_LABEL_RE = re.compile(r'[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?')


class _Incomplete(Exception):
    pass


def _atoi(value):
    """ngx_atoi(): decimal digits only, non-empty, no overflow; else None."""
    if not _DIGITS_RE.fullmatch(value):
        return None
    n = int(value)
    return n if n <= _MAX_INT else None


def _server_address(value):
    """Auth-Server check: IPv4/IPv6 literal (as nginx) or, our addition, a host
    name; returns the str to connect to, or None when invalid."""
    try:
        text = value.decode('ascii')
    except UnicodeDecodeError:
        return None
    if not text:
        return None
    if ':' in text:
        if '%' in text or '[' in text:
            return None
        try:
            socket.inet_pton(socket.AF_INET6, text)
        except (OSError, ValueError):
            return None
        return text
    labels = text.split('.')
    if labels[-1] == '' and len(labels) > 1:
        labels.pop()                        # one trailing dot: a fully qualified name
    last = labels[-1]
    if last.isdigit() or last[:2].lower() == '0x':
        # a numeric last label makes it an IPv4 address (the resolver would
        # read "127.1" or "0x7f.0.0.1" as one): only the dotted quad that
        # ngx_inet_addr() reads is valid (decimal, leading zeros allowed),
        # normalised so that nobody reads it as octal later
        if (text.endswith('.') or len(labels) != 4
                or not all(p.isdigit() and p.isascii() and int(p) <= 255 for p in labels)):
            return None
        return '.'.join(str(int(p)) for p in labels)
    if len(text) > 254:
        return None
    for label in labels:
        if not _HOST_LABEL_RE.fullmatch(label):
            return None
    return text


def _shown(value):
    """A response value in a log line: controls escaped, cut (up to 1024 bytes may come)."""
    return sanitize(value.decode('latin-1'), 256)


def _parse(data, req, peer):
    """Parse what has arrived so far: an AuthResult, or _Incomplete, or
    AuthHttpError for a malformed response (reported as soon as seen, as
    nginx's incremental parser does)."""
    pos = 0
    n = len(data)

    # optional status line, its code ignored
    if data[:5] == b'HTTP/':
        i = 5
        while i < n and data[i] not in (0x0D, 0x0A):
            i += 1
        if i == n:
            raise _Incomplete
        if data[i] == 0x0D:
            if i + 1 == n:
                raise _Incomplete
            if data[i + 1] != 0x0A:
                raise AuthHttpError('auth http server %s sent invalid response' % peer)
            i += 1
        pos = i + 1
    elif n < 5 and b'HTTP/'.startswith(data):
        raise _Incomplete

    failure = None
    wait_status = False
    server = port = user = passwd = error_code = None
    sleep = None
    ssl_backend = None                              # ours: Auth-SSL-Backend
    sasl_error = method = None                      # token logins (oauth.py)
    bad_header = 'auth http server %s sent invalid header in response' % peer

    while True:
        lf = data.find(b'\n', pos)
        line = data[pos:] if lf < 0 else data[pos:lf]
        cr = line.find(b'\r')
        if cr >= 0:
            if cr != len(line) - 1:
                raise AuthHttpError(bad_header)     # a CR must be followed by LF
            line = line[:-1]                        # CRLF (or a CR whose LF is still to come)
        if not line:
            if lf < 0:
                raise _Incomplete
            break                                   # the empty line: end of header
        m = _NAME_RE.match(line)
        if m is None:
            raise AuthHttpError(bad_header)
        end = m.end()
        if end < len(line) and line[end] != 0x3A:   # ':'
            raise AuthHttpError(bad_header)
        if lf < 0:
            raise _Incomplete
        pos = lf + 1

        name = line[:end].lower()
        value = line[end + 1:].strip(b' ') if end < len(line) else b''

        if name == b'auth-status':
            if value == b'OK':
                pass
            elif value == b'WAIT':
                wait_status = True
            else:
                failure = value
        elif name == b'auth-server':
            server = value
        elif name == b'auth-port':
            port = value
        elif name == b'auth-user':
            user = value
        elif name == b'auth-pass':
            passwd = value
        elif name == b'auth-wait':
            w = _atoi(value)
            if w is not None:
                sleep = min(w, MAX_AUTH_WAIT)
        elif name == b'auth-error-code':
            error_code = value.decode('latin-1') or None
        elif name == b'auth-ssl-backend':           # ours: TLS to this user's backend
            ssl_backend = value.lower()
            if ssl_backend not in (b'on', b'off', b'starttls'):
                raise AuthHttpError('auth http server %s sent invalid "Auth-SSL-Backend" '
                                    'header: "%s"' % (peer, _shown(value)))
            ssl_backend = ssl_backend.decode('ascii')
        elif name == b'auth-error-sasl':
            sasl_error = oauth.error_challenge(value)
            if sasl_error is None:
                raise AuthHttpError('auth http server %s sent invalid "Auth-Error-SASL" '
                                    'header: "%s"' % (peer, _shown(value)))
        elif name == b'auth-method':
            method = 'plain' if value.lower() == b'plain' else None

    if failure is not None:
        return AuthResult('FAIL', message=failure, user=user, passwd=passwd,
                          wait=sleep, error_code=error_code, peer=peer, sasl_error=sasl_error)
    if wait_status:
        return AuthResult('WAIT', wait=sleep, peer=peer)
    if not server or not port:
        raise AuthHttpError('auth http server %s did not send server or port' % peer)
    if (passwd is None and req.protocol != 'smtp'
            and req.method in _NEEDS_PASSWORD):
        raise AuthHttpError('auth http server %s did not send password' % peer)
    address = _server_address(server)
    if address is None:
        raise AuthHttpError('auth http server %s sent invalid server address:"%s"'
                            % (peer, _shown(server)))
    p = _atoi(port)
    if p is None or not 1 <= p <= 65535:
        raise AuthHttpError('auth http server %s sent invalid server port:"%s"'
                            % (peer, _shown(port)))
    return AuthResult('OK', server=address, port=p, user=user, passwd=passwd,
                      wait=sleep, error_code=error_code, peer=peer,
                      ssl_backend=ssl_backend, method=method if passwd is not None else None)


def parse_response(data: bytes, req: AuthRequest, peer: str) -> AuthResult:
    """Parse a complete auth_http response (as ngx_mail_auth_http_process_headers).

    Returns AuthResult with status 'OK', 'FAIL' or 'WAIT' (query() handles
    WAIT itself); raises AuthHttpError for everything that is the client's
    internal error.  Only the first 1024 bytes are looked at.
    """
    chunk = bytes(data[:MAX_HEADER])
    try:
        return _parse(chunk, req, peer)
    except _Incomplete:
        if len(chunk) >= MAX_HEADER:
            raise AuthHttpError(_too_large(peer)) from None
        raise AuthHttpError(_premature(peer)) from None


def _too_large(peer):
    return 'auth http server %s sent too large header (more than %d bytes)' % (peer, MAX_HEADER)


def _premature(peer):
    return 'auth http server %s closed connection before the end of the header' % peer


# --- exchange ----------------------------------------------------------------

def peer_name(url: Any) -> str:
    """`ip:port`, `[v6]:port` or `unix:/path`, as nginx names the auth peer."""
    if url.unix:
        return 'unix:%s' % url.unix
    return addr_text(url.sockaddr[0], url.sockaddr[1])


def _oserr(e):
    code = e.errno if e.errno is not None else 0
    return code, '%d: %s' % (code, os.strerror(code) if code else str(e))


def _timed_out(peer):
    return AuthHttpError('auth http server %s timed out (%d: %s)'
                         % (peer, _errno.ETIMEDOUT, os.strerror(_errno.ETIMEDOUT)),
                         _errno.ETIMEDOUT)


def _exchange(url, request, req, peer, timeout, trace=None):
    if timeout is None:
        timeout = 60.0                      # auth_http_timeout's default
    deadline = time.monotonic() + timeout
    if url.unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = url.unix
    else:
        address = url.sockaddr
        sock = socket.socket(url.family, socket.SOCK_STREAM)
    try:
        # The kernel bounds each call (ktimeout: SO_SNDTIMEO also bounds a blocking connect);
        # the socket stays blocking, so no ioctl and no poll per call.
        ktimeout.set(sock, max(timeout, 0.001), recv=False)
        try:
            sock.connect(address)
        except ktimeout.TIMEOUT_ERRORS:
            raise _timed_out(peer) from None
        except OSError as e:
            code, text = _oserr(e)
            raise AuthHttpError('connect() to %s failed (%s)' % (peer, text), code) from None

        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timed_out(peer)
            if remaining < timeout - 0.05:    # connect took a while: what is left of it
                ktimeout.set(sock, remaining, recv=False)
            sock.sendall(request)
        except ktimeout.TIMEOUT_ERRORS:
            raise _timed_out(peer) from None
        except OSError as e:
            code, text = _oserr(e)
            raise AuthHttpError('send() to auth http server %s failed (%s)' % (peer, text),
                                code) from None

        buf = b''
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timed_out(peer)
            try:
                ktimeout.set(sock, remaining, send=False)
                chunk = sock.recv(MAX_HEADER - len(buf))
            except ktimeout.TIMEOUT_ERRORS:
                raise _timed_out(peer) from None
            except OSError as e:
                code, text = _oserr(e)
                raise AuthHttpError('recv() from auth http server %s failed (%s)'
                                    % (peer, text), code) from None
            if not chunk:
                raise AuthHttpError(_premature(peer))
            buf += chunk
            try:
                result = _parse(buf, req, peer)
            except _Incomplete:
                if len(buf) >= MAX_HEADER:
                    raise AuthHttpError(_too_large(peer)) from None
            else:
                if trace is not None:
                    trace('response', _trace.auth_response_lines(buf))
                return result
    finally:
        sock.close()


def query(url: Any, req: AuthRequest, timeout: Optional[float], *,
          sleep: Callable[[float], Any] = time.sleep,
          max_rounds: int = MAX_WAIT_ROUNDS,
          trace: Optional[Callable[[str, list], Any]] = None,
          client: Optional[Any] = None) -> AuthResult:
    """Ask the auth service about `req`; returns AuthResult ('OK' or 'FAIL').

    `Auth-Status: WAIT` is handled here: sleep Auth-Wait seconds (0 when
    absent, at most MAX_AUTH_WAIT) and send the same request again (same
    attempt number), at most `max_rounds` times.  `timeout` (auth_http_timeout)
    bounds each round's connect + send + receive.  `sleep` may be replaced by
    an Event's wait: when it returns true (the worker is shutting down) the
    loop stops with AuthHttpError instead of asking again at once.
    `trace(kind, lines)` (the `debug` log) gets the request's lines without Auth-Pass
    (trace.auth_request_lines) and each response's header lines, Auth-Pass masked.
    `client` (auth_client.py: keep-alive, https) frames the request and replaces the
    exchange on a new connection. Raises AuthHttpError.
    """
    request = build_request(url, req)
    exchange = _exchange
    if client is not None:
        request, exchange = client.frame(request), client.exchange
    peer = peer_name(url)
    if trace is not None:
        trace('request to ' + peer,
              _trace.auth_request_lines(request, [name for name, _ in req.headers or ()]))
    for _ in range(max_rounds):
        result = metrics.timed("auth_http_duration_seconds", exchange, url, request, req, peer,
                               timeout, trace)
        if result.status != 'WAIT':
            return result
        if sleep(result.wait or 0):
            raise AuthHttpError('auth http server %s sent "Auth-Status: WAIT" while shutting '
                                'down' % peer)
    raise AuthHttpError('auth http server %s sent "Auth-Status: WAIT" %d times in a row'
                        % (peer, max_rounds))
