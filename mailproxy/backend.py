"""Talking to the backend before the relay: connect, PROXY header out, reading replies.

Reference sections 11.1-11.3.  Error texts follow nginx so the session can log
`<message> while <action>, client: ..., upstream: ...` exactly as nginx does.
"""

import errno
import ipaddress
import socket
import struct
import time

__all__ = ['BackendError', 'connect', 'proxy_v1_header', 'proxy_v2_header',
           'BackendConn', 'smtp_reply_complete', 'format_addr']

_TIMEOUT_TEXT = 'upstream timed out (110: Connection timed out)'


class BackendError(Exception):
    """A backend failure; str(err) is the nginx-like log message."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message


def _errtext(exc):
    if isinstance(exc, OSError) and exc.errno is not None:
        return '%d: %s' % (exc.errno, exc.strerror or errno.errorcode.get(exc.errno, ''))
    return str(exc)


def format_addr(host, port):
    """nginx's address text: `1.2.3.4:110`, `[::1]:110`."""
    if ':' in host:
        return '[%s]:%d' % (host, port)
    return '%s:%d' % (host, port)


def _addresses(host, port):
    """[(family, sockaddr)] for an IP literal or a name (resolved with getaddrinfo)."""
    h = host[1:-1] if host.startswith('[') and host.endswith(']') else host
    try:
        ip = ipaddress.ip_address(h.split('%', 1)[0])
    except ValueError:
        ip = None
    if ip is not None:
        if ip.version == 4:
            return [(socket.AF_INET, (h, port))]
        return [(socket.AF_INET6, (h, port, 0, 0))]
    try:
        infos = socket.getaddrinfo(h, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise BackendError('%s could not be resolved (%s)' % (h, exc.strerror or exc)) from None
    seen = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in seen:
            seen.append((family, sockaddr))
    if not seen:
        raise BackendError('%s could not be resolved (no address)' % (h,))
    return seen


def connect(host, port, timeout):
    """Connect to the backend within `timeout` seconds (all addresses of a name share it).

    Returns a blocking socket with TCP_NODELAY set and `timeout` as its timeout.
    Raises BackendError with nginx's text.
    """
    deadline = time.monotonic() + timeout
    last = None
    for family, sockaddr in _addresses(host, port):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            last = BackendError(_TIMEOUT_TEXT)
            break
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(remaining)
            sock.connect(sockaddr)
        except socket.timeout:
            sock.close()
            last = BackendError(_TIMEOUT_TEXT)
            continue
        except OSError as exc:
            sock.close()
            last = BackendError('connect() to %s failed (%s)'
                                % (format_addr(sockaddr[0], port), _errtext(exc)))
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        sock.settimeout(timeout)
        return sock
    raise last if last is not None else BackendError(_TIMEOUT_TEXT)


# ------------------------------------------------------------------ PROXY protocol out

def _ip(text):
    if text is None:
        return None
    if isinstance(text, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return text
    text = str(text)
    if text.startswith('[') and text.endswith(']'):
        text = text[1:-1]
    return ipaddress.ip_address(text.split('%', 1)[0])   # scope ids are not sent


def _pair(client_ip, local_ip):
    """Both addresses of one family: mixed families are written as IPv6 (IPv4-mapped)."""
    c, l = _ip(client_ip), _ip(local_ip)
    if c.version != l.version:
        if c.version == 4:
            c = ipaddress.IPv6Address('::ffff:' + str(c))
        if l.version == 4:
            l = ipaddress.IPv6Address('::ffff:' + str(l))
    return c, l


def _v6text(a):
    """IPv6 text; IPv4-mapped addresses as `::ffff:a.b.c.d`."""
    if a.ipv4_mapped is not None:
        return '::ffff:' + str(a.ipv4_mapped)
    return str(a)


def proxy_v1_header(client_ip, client_port, local_ip, local_port):
    """`PROXY TCP4|TCP6 <client> <local> <cport> <lport>\\r\\n`, or `PROXY UNKNOWN\\r\\n`."""
    if client_ip is None or local_ip is None:
        return b'PROXY UNKNOWN\r\n'
    c, l = _pair(client_ip, local_ip)
    proto = 'TCP4' if c.version == 4 else 'TCP6'
    ctext = str(c) if c.version == 4 else _v6text(c)
    ltext = str(l) if l.version == 4 else _v6text(l)
    return ('PROXY %s %s %s %d %d\r\n'
            % (proto, ctext, ltext, int(client_port), int(local_port))).encode('ascii')


PROXY_V2_SIGNATURE = b'\r\n\r\n\x00\r\nQUIT\n'


def proxy_v2_header(client_ip, client_port, local_ip, local_port, tlvs=()):
    """Binary PROXY v2: PROXY command over TCP4/TCP6, or LOCAL/UNSPEC without a client address.

    tlvs: iterable of (type, bytes), appended in order.
    """
    tail = b''.join(struct.pack('!BH', t, len(v)) + bytes(v) for t, v in tlvs)
    if client_ip is None or local_ip is None:
        return PROXY_V2_SIGNATURE + struct.pack('!BBH', 0x20, 0x00, len(tail)) + tail
    c, l = _pair(client_ip, local_ip)
    if c.version == 4:
        fam, addrs = 0x11, c.packed + l.packed
    else:
        fam, addrs = 0x21, c.packed + l.packed
    body = addrs + struct.pack('!HH', int(client_port), int(local_port)) + tail
    return PROXY_V2_SIGNATURE + struct.pack('!BBH', 0x21, fam, len(body)) + body


# ------------------------------------------------------------------ replies

def smtp_reply_complete(buf):
    """True when the last line of `buf` (ending in CRLF) is not a `DDD-` continuation line."""
    end = len(buf) - 2
    start = buf.rfind(b'\n', 0, end) + 1
    line = buf[start:end]
    return not (len(line) >= 4 and line[3:4] == b'-')


def _show(data):
    """Backend bytes as safe one-line text for a log message."""
    out = []
    for b in bytes(data):
        if 0x20 <= b < 0x7f and b != 0x5c:
            out.append(chr(b))
        elif b == 0x5c:
            out.append('\\\\')
        else:
            out.append('\\x%02X' % b)
    return ''.join(out)


class BackendConn:
    """A blocking backend connection during the login exchange (handler thread)."""

    def __init__(self, sock, buffer_size, timeout):
        self.sock = sock
        self.buffer_size = max(4, int(buffer_size))
        self.timeout = timeout
        self._buf = bytearray()
        sock.settimeout(timeout)

    def send(self, data):
        """Send `data` in one write call (sendall)."""
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(data)
        except socket.timeout:
            raise BackendError(_TIMEOUT_TEXT) from None
        except OSError as exc:
            raise BackendError('send() failed (%s)' % _errtext(exc)) from None

    def read_reply(self, complete=None):
        """Read one reply: >= 4 bytes ending in CRLF and `complete(buf)` true.

        Returns everything buffered and empties the buffer (extra data is dropped, as nginx).
        """
        buf = self._buf
        size = self.buffer_size
        deadline = time.monotonic() + self.timeout
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
                self.sock.settimeout(remaining)
                data = self.sock.recv(size - len(buf))
            except socket.timeout:
                raise BackendError(_TIMEOUT_TEXT) from None
            except OSError as exc:
                raise BackendError('recv() failed (%s)' % _errtext(exc)) from None
            if not data:
                raise BackendError('upstream prematurely closed connection')
            buf += data

    def discard(self):
        """Drop whatever is buffered (nginx empties the buffer before each command)."""
        del self._buf[:]

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
