"""Talking to the backend before the relay: connect, reading replies, TLS to the backend.

As nginx's ngx_mail_proxy_module (ngx_mail_proxy_init, ngx_mail_proxy_read_response); the
PROXY header it may send first is written by proxy_protocol.py.  Error texts follow nginx so
the session can log `<message> while <action>, client: ..., upstream: ...` exactly as nginx does.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

from . import ktimeout, resolver
from .log import addr_text, errno_text

if TYPE_CHECKING:
    from .config import ServerConf

__all__ = ['BackendError', 'connect', 'BackendConn',
           'client_context', 'BackendTLSConfigError']

_TIMEOUT_TEXT = 'upstream timed out (110: Connection timed out)'
# backend text in a log line is cut here: proxy_buffer may be large (nginx's whole error line
# stops at NGX_MAX_ERROR_STR, 2048 bytes)
LOG_LIMIT = 512


class BackendError(Exception):
    """A backend failure; str(err) is the nginx-like log message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message




def _addresses(host, port, timeout):
    """[(family, sockaddr)] for an IP literal or a name: getaddrinfo in a worker thread
    (resolver.bounded), so a hung system resolver cannot hold the session past `timeout`."""
    h = host[1:-1] if host.startswith('[') and host.endswith(']') else host
    try:
        ip = ipaddress.ip_address(h.split('%', 1)[0])
    except ValueError:
        ip = None
    if ip is not None:
        if ip.version == 4:
            return [(socket.AF_INET, (h, port))]
        return [(socket.AF_INET6, (h, port, 0, 0))]
    def lookup():
        return socket.getaddrinfo(h, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        infos = resolver.bounded(lookup, timeout)
    except resolver.LookupFailed as exc:
        raise BackendError('%s could not be resolved (%s)' % (h, exc)) from None
    except socket.gaierror as exc:
        raise BackendError('%s could not be resolved (%s)' % (h, exc.strerror or exc)) from None
    seen = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in seen:
            seen.append((family, sockaddr))
    if not seen:
        raise BackendError('%s could not be resolved (no address)' % (h,))
    return seen


def connect(host: str, port: int, timeout: float, addresses: Optional[list] = None,
            resolve: Optional[Callable[[str, int, float], list]] = None) -> socket.socket:
    """Connect to the backend within `timeout` seconds (all addresses of a name share it).

    Returns a blocking socket with TCP_NODELAY set and `timeout` as the kernel's limit of
    each recv and send (SO_RCVTIMEO/SO_SNDTIMEO, see ktimeout; no Python timeout).
    Raises BackendError with nginx's text.  `addresses`: [(family, sockaddr)] already
    resolved (a pool's backend, resolved at load: upstreams.py), each tried in turn;
    `resolve(host, port, timeout)` gives them for a name instead of the system's resolver.
    """
    deadline = time.monotonic() + timeout
    last = None
    first = True
    addresses = addresses or (resolve or _addresses)(host, port, timeout)
    if len(addresses) != 1 or addresses[0][1][0] != host:
        first = False       # a name: its connects get what the lookup left of `timeout`
    for family, sockaddr in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            last = BackendError(_TIMEOUT_TEXT)
            break
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # a blocking connect() is bounded by SO_SNDTIMEO (EINPROGRESS when it runs out);
            # the first address gets the whole `timeout`, later ones what is left of it
            ktimeout.set(sock, timeout if first else remaining, recv=first)
            first = False
            sock.connect(sockaddr)
        except ktimeout.TIMEOUT_ERRORS:
            sock.close()
            last = BackendError(_TIMEOUT_TEXT)
            continue
        except OSError as exc:
            sock.close()
            last = BackendError('connect() to %s failed (%s)'
                                % (addr_text(sockaddr[0], port), errno_text(exc)))
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if remaining != timeout:
            ktimeout.set(sock, timeout)
        return sock
    raise last if last is not None else BackendError(_TIMEOUT_TEXT)


# ------------------------------------------------------------------ replies

def _show(data, limit=LOG_LIMIT):
    """Backend bytes as safe one-line text for a log message, at most `limit` characters
    and `...` (never half an escape)."""
    out = []
    size = 0
    for b in bytes(data[:limit]):
        if 0x20 <= b < 0x7f and b != 0x5c:
            piece = chr(b)
        elif b == 0x5c:
            piece = '\\\\'
        else:
            piece = '\\x%02X' % b
        size += len(piece)
        if size > limit:
            break
        out.append(piece)
    if size > limit or len(data) > limit:
        out.append('...')
    return ''.join(out)


class BackendConn:
    """A blocking backend connection during the login exchange (handler thread)."""

    def __init__(self, sock: socket.socket, buffer_size: int, timeout: float,
                 timeout_set: bool = False):
        """`timeout_set`: `sock` comes from connect() with this same `timeout` (no need to
        set it again)."""
        self.sock = sock
        self.buffer_size = max(4, int(buffer_size))
        self.timeout = timeout
        self._buf = bytearray()
        self._pushed = None     # a reply to return again (the greeting after STARTTLS)
        self.tls = False
        self._reduced = False   # SO_RCVTIMEO was set below `timeout` (a reply read in pieces)
        if not timeout_set:
            if sock.gettimeout() is not None:
                sock.settimeout(None)
            ktimeout.set(sock, timeout)

    def send(self, data: bytes) -> None:
        """Send `data` in one write call (sendall)."""
        try:
            if self.tls:
                self.sock.settimeout(self.timeout)
            self.sock.sendall(data)
        except ktimeout.TIMEOUT_ERRORS:
            raise BackendError(_TIMEOUT_TEXT) from None
        except OSError as exc:
            raise BackendError('send() failed (%s)' % errno_text(exc)) from None

    def read_reply(self, complete: Optional[Callable[[bytes], bool]] = None) -> bytes:
        """Read one reply: >= 4 bytes ending in CRLF and `complete(buf)` true.

        Returns everything buffered and empties the buffer (extra data is dropped, as nginx).
        """
        if self._pushed is not None:                    # the greeting read before STARTTLS
            reply, self._pushed = self._pushed, None
            return reply
        buf = self._buf
        size = self.buffer_size
        deadline = time.monotonic() + self.timeout
        again = False               # the first recv has the socket's own timeout
        while True:
            if (len(buf) >= 4 and buf.endswith(b'\r\n')
                    and (complete is None or complete(buf))):
                reply = bytes(buf)
                del buf[:]
                return reply
            if len(buf) >= size:
                shown = _show(buf[:size - 1])
                del buf[:]
                raise BackendError('upstream sent too long response line: "%s"' % shown)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError(_TIMEOUT_TEXT)
            try:
                if self.tls:                # TLS: Python's timeout, as set by start_tls()
                    self.sock.settimeout(remaining)
                elif again or self._reduced:    # one deadline for the whole reply
                    ktimeout.set(self.sock, remaining, send=False)
                    self._reduced = True
                again = True
                data = self.sock.recv(size - len(buf))
            except ktimeout.TIMEOUT_ERRORS:
                raise BackendError(_TIMEOUT_TEXT) from None
            except OSError as exc:
                raise BackendError('recv() failed (%s)' % errno_text(exc)) from None
            if not data:
                raise BackendError('upstream prematurely closed connection')
            buf += data

    def discard(self) -> None:
        """Drop whatever is buffered (nginx empties the buffer before each command)."""
        del self._buf[:]

    # ---- TLS to the backend (proxy_ssl, README.md) ------------------------------------------

    def push_reply(self, reply: bytes) -> None:
        """Make the next read_reply() return `reply` (the greeting read before STARTTLS, so
        the protocol's login_backend() runs unchanged over the encrypted connection)."""
        self._pushed = reply

    def start_tls(self, context: ssl.SSLContext, server_hostname: Optional[str]) -> None:
        """TLS handshake as the client (implicit TLS, or after STARTTLS/STLS), within
        `timeout`.  From here on `self.sock` is the `ssl.SSLSocket` (the relay gets it).

        Plain bytes the backend sent after its go-ahead are dropped: they were not protected
        and must not be taken as part of the encrypted conversation.
        Raises BackendError naming the TLS problem.
        """
        del self._buf[:]
        name = server_hostname or None
        if name is not None and name.startswith('[') and name.endswith(']'):
            name = name[1:-1]
        try:
            tls = context.wrap_socket(self.sock, server_hostname=name,
                                      do_handshake_on_connect=False)
        except (ValueError, ssl.SSLError, OSError) as exc:
            raise BackendError('SSL_new() failed (%s)' % _ssl_text(exc)) from None
        self.sock = tls         # owns the descriptor now (close() closes it)
        try:
            tls.settimeout(self.timeout)
            tls.do_handshake()
        except socket.timeout:
            raise BackendError(_TIMEOUT_TEXT) from None
        except ssl.SSLCertVerificationError as exc:
            if getattr(exc, 'verify_code', None) == 62:     # X509_V_ERR_HOSTNAME_MISMATCH
                raise BackendError('upstream SSL certificate does not match "%s"'
                                   % (name,)) from None
            raise BackendError('upstream SSL certificate verify error: (%s:%s)'
                               % (getattr(exc, 'verify_code', '?'),
                                  getattr(exc, 'verify_message', None) or exc)) from None
        except ssl.SSLError as exc:
            raise BackendError('SSL_do_handshake() failed (%s)' % _ssl_text(exc)) from None
        except OSError as exc:
            raise BackendError('SSL_do_handshake() failed (%s)' % errno_text(exc)) from None
        self.tls = True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def starttls_refused(reply: bytes) -> BackendError:
    """The BackendError for a backend that did not agree to STARTTLS/STLS (proxy_ssl starttls)."""
    return BackendError('upstream refused STARTTLS: "%s"' % _show(bytes(reply).rstrip(b'\r\n')))


# ------------------------------------------------------------------ TLS contexts (proxy_ssl_*)

class BackendTLSConfigError(Exception):
    """A proxy_ssl_* setting that cannot be used; `key` is the directive to blame
    (tls_contexts.prepare turns it into a ConfigError at its file:line)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def _ssl_text(exc):
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, 'reason', None)
        text = getattr(exc, 'strerror', None) or str(exc)
        if reason:
            return 'SSL: %s' % (reason.lower().replace('_', ' '),)
        return 'SSL: %s' % (text,)
    return errno_text(exc)


_ctx_lock = threading.Lock()


def _settings(conf):
    return (conf.proxy_ssl_verify, conf.proxy_ssl_trusted_certificate,
            conf.proxy_ssl_certificate, conf.proxy_ssl_certificate_key)


def _build_context(settings):
    verify, trusted, cert, key = settings
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if trusted:
            try:
                ctx.load_verify_locations(cafile=trusted)
            except (OSError, ssl.SSLError) as exc:
                raise BackendTLSConfigError(
                    'cannot load "proxy_ssl_trusted_certificate" "%s" (%s)'
                    % (trusted, _ssl_text(exc)), 'proxy_ssl_trusted_certificate') from None
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert or key:
        if not cert:
            raise BackendTLSConfigError('no "proxy_ssl_certificate" is defined for '
                                        '"proxy_ssl_certificate_key" "%s"' % key,
                                        'proxy_ssl_certificate_key')
        if not key:
            raise BackendTLSConfigError('no "proxy_ssl_certificate_key" is defined for '
                                        '"proxy_ssl_certificate" "%s"' % cert,
                                        'proxy_ssl_certificate')
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise BackendTLSConfigError(
                'cannot load "proxy_ssl_certificate" "%s" with key "%s" (%s)'
                % (cert, key, _ssl_text(exc)), 'proxy_ssl_certificate') from None
    return ctx


def client_context(conf: ServerConf,
                   _shared: Optional[Dict[Tuple, ssl.SSLContext]] = None) -> ssl.SSLContext:
    """The client SSLContext for backends of server `conf`: built at start and on reload by
    tls_contexts.prepare (`_shared`: one context per distinct settings), then kept on conf."""
    ctx = conf._proxy_ssl_context
    if ctx is not None:
        return ctx
    with _ctx_lock:
        ctx = conf._proxy_ssl_context
        if ctx is None:
            settings = _settings(conf)
            ctx = _shared.get(settings) if _shared is not None else None
            if ctx is None:
                ctx = _build_context(settings)
                if _shared is not None:
                    _shared[settings] = ctx
            conf._proxy_ssl_context = ctx
    return ctx
