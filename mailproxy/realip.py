"""PROXY protocol from a load balancer (`listen ... proxy_protocol`) and `set_real_ip_from`.

Reference section 10, nginx's ngx_proxy_protocol_read() and ngx_mail_realip_module:

* the header is read before anything else -- before the greeting and before the TLS handshake
  of an `ssl` listener -- within `timeout`;
* one peek at whatever has arrived (up to 4096 bytes); the complete v1 line or v2 header must
  be in it (a header split over several TCP segments is broken, as in nginx);
* only the header's bytes are consumed (recv of exactly its length after the peek): a
  ClientHello or a first command sent in the same packet stays for the session;
* a broken header logs `broken header: "..." while reading PROXY protocol` (error) and closes
  the connection without a word; v2 headers with another version or a length beyond what
  arrived log nginx's own messages (`unknown PROXY protocol version: N`, `header is too large`);
* v1 `PROXY UNKNOWN ...`, and v2 LOCAL, non-STREAM or UNSPEC/UNIX headers are consumed and
  carry no addresses (TLVs are skipped: they are inside the header's length);
* the addresses of a header that carries them become `session.proxy_header` (auth_http's
  `Proxy-Protocol-Addr/Port/Server-Addr/Server-Port`), trusted or not;
* realip: when the TCP peer matches `set_real_ip_from` (addresses, CIDRs, `unix:`) and the
  source parses as an IP address, the session's client address and port become the header's
  (Client-IP, XCLIENT ADDR, the PROXY header to the backend, log lines).  Otherwise the peer
  stays, silently.  The `client ... connected to ...` line was written before and shows the
  real TCP peer.

Deviation: a client that closes (or resets) before sending anything is logged as `client
closed connection while reading PROXY protocol` (info), where nginx logs `broken header: ""`.
"""

import ipaddress
import socket
import struct
import threading

from .clientio import ClientClosed, ClientTimeout, Close
from .ktimeout import TIMEOUT_ERRORS
from .log import sanitize

__all__ = ["BrokenHeader", "parse", "read_header", "trusted", "ip_text", "PEEK_SIZE",
           "V2_SIGNATURE"]

PEEK_SIZE = 4096
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_ADDR_CHARS = frozenset(b"0123456789abcdefABCDEF:.")


class BrokenHeader(Exception):
    """A header that cannot be used; str() is nginx's log message."""


def _broken(buf):
    end = len(buf)
    for i, b in enumerate(buf):
        if b in (0x0D, 0x0A):
            end = i
            break
    return BrokenHeader('broken header: "%s"' % sanitize(bytes(buf[:end]), 512))


def _read_addr(buf, p):
    n = len(buf)
    start = p
    while True:
        if p == n:
            return None, p
        ch = buf[p]
        p += 1
        if ch == 0x20:
            return bytes(buf[start:p - 1]).decode("ascii"), p
        if ch not in _ADDR_CHARS:
            return None, p


def _read_port(buf, p, sep):
    n = len(buf)
    start = p
    while True:
        if p == n:
            return None, p
        ch = buf[p]
        p += 1
        if ch == sep:
            break
    digits = bytes(buf[start:p - 1])
    if not digits or not digits.isdigit():          # ngx_atoi: digits only, not empty
        return None, p
    value = int(digits)
    if value > 65535:
        return None, p
    return value, p


def ip_text(ip):
    """nginx's text of an address: IPv4 dotted, IPv6 compressed, IPv4-mapped as ::ffff:a.b.c.d."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return "::ffff:" + str(ip.ipv4_mapped)
    return ip.compressed


def parse(buf):
    """Parse a PROXY header at the start of `buf` (what one read returned).

    Returns (length of the header, addresses) where addresses is (src_addr, src_port,
    dst_addr, dst_port) as text and ints, or None for a header without addresses.
    Raises BrokenHeader with nginx's log message.
    """
    buf = bytes(buf)
    n = len(buf)
    if n >= 16 and buf[:12] == V2_SIGNATURE:
        return _parse_v2(buf)
    if n < 8 or buf[:6] != b"PROXY ":
        raise _broken(buf)
    p = 6
    if buf[p:p + 7] == b"UNKNOWN":
        p += 7
        i = buf.find(b"\r\n", p)
        if i < 0:
            raise _broken(buf)
        return i + 2, None
    if n - p < 5 or buf[p:p + 3] != b"TCP" or buf[p + 3] not in b"46" or buf[p + 4] != 0x20:
        raise _broken(buf)
    p += 5
    src, p = _read_addr(buf, p)
    if src is None:
        raise _broken(buf)
    dst, p = _read_addr(buf, p)
    if dst is None:
        raise _broken(buf)
    sport, p = _read_port(buf, p, 0x20)
    if sport is None:
        raise _broken(buf)
    dport, p = _read_port(buf, p, 0x0D)
    if dport is None:
        raise _broken(buf)
    if p == n or buf[p] != 0x0A:
        raise _broken(buf)
    return p + 1, (src, sport, dst, dport)


def _parse_v2(buf):
    version = buf[12] >> 4
    if version != 2:
        raise BrokenHeader("unknown PROXY protocol version: %d" % version)
    length = struct.unpack("!H", buf[14:16])[0]
    if len(buf) - 16 < length:
        raise BrokenHeader("header is too large")
    end = 16 + length
    command = buf[12] & 0x0F
    if command != 1:                    # LOCAL (health checks): no addresses
        return end, None
    if buf[13] & 0x0F != 1:             # not STREAM
        return end, None
    family = buf[13] >> 4
    body = buf[16:end]
    if family == 1:                     # AF_INET
        if len(body) < 12:
            raise BrokenHeader('broken header: "%s"' % sanitize(buf[:end], 512))
        src = ipaddress.IPv4Address(body[0:4])
        dst = ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
    elif family == 2:                   # AF_INET6
        if len(body) < 36:
            raise BrokenHeader('broken header: "%s"' % sanitize(buf[:end], 512))
        src = ipaddress.IPv6Address(body[0:16])
        dst = ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
    else:                               # UNSPEC, UNIX: consumed, no addresses
        return end, None
    # whatever follows the addresses up to `end` are TLVs: skipped
    return end, (ip_text(src), sport, ip_text(dst), dport)


# ---------------------------------------------------------------------------------- realip

_nets_lock = threading.Lock()


def _networks(conf):
    """(networks, unix allowed) from conf.set_real_ip_from, parsed once per ServerConf."""
    cached = getattr(conf, "_realip_networks", None)
    if cached is not None:
        return cached
    nets, unix = [], False
    for entry in getattr(conf, "set_real_ip_from", None) or ():
        if entry == "unix:":
            unix = True
            continue
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue
    cached = (tuple(nets), unix)
    with _nets_lock:
        try:
            conf._realip_networks = cached
        except AttributeError:
            pass
    return cached


def trusted(conf, peer_ip, family=None):
    """True when the TCP peer may set the client address (set_real_ip_from)."""
    nets, unix = _networks(conf)
    if family == socket.AF_UNIX or not peer_ip:
        return unix
    try:
        ip = ipaddress.ip_address(str(peer_ip).split("%", 1)[0])
    except ValueError:
        return False
    candidates = [ip]
    if ip.version == 6 and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(c in net for c in candidates for net in nets if c.version == net.version)


# ---------------------------------------------------------------------------------- session

def read_header(sess):
    """Read and apply the PROXY header of session `sess` (called first thing in Session.run).

    Returns normally when the session may go on; raises the session's Close (after the log
    line), ClientTimeout or ClientClosed otherwise.
    """
    sock = sess.sock
    sess.action = "reading PROXY protocol"
    # the session's `timeout` is already on the socket (Session.__init__, ktimeout)
    try:
        data = sock.recv(PEEK_SIZE, socket.MSG_PEEK)
    except TIMEOUT_ERRORS:
        raise ClientTimeout() from None
    except OSError as e:
        raise ClientClosed("recv() failed", e.errno) from None
    if not data:
        raise ClientClosed()
    try:
        size, addrs = parse(data)
    except BrokenHeader as e:
        sess.error(str(e))
        raise Close() from None
    # consume exactly the header: what follows (a ClientHello, a command) stays queued
    got = 0
    try:
        while got < size:
            chunk = sock.recv(size - got)
            if not chunk:
                raise ClientClosed()
            got += len(chunk)
    except TIMEOUT_ERRORS:
        raise ClientTimeout() from None
    except OSError as e:
        raise ClientClosed("recv() failed", e.errno) from None
    if addrs is not None:
        sess.proxy_header = addrs
        src, sport = addrs[0], addrs[1]
        family = getattr(sock, "family", None)
        if getattr(sess.conf, "set_real_ip_from", None) and trusted(sess.conf, sess.client_ip,
                                                                    family):
            try:
                ip = ipaddress.ip_address(src)
            except ValueError:
                ip = None
            if ip is not None:
                sess.client_ip = ip_text(ip)
                sess.client_port = sport
                # only a trusted header's addresses stand for the client (imap.py's ID fields)
                sess.proxy_trusted = True
    sess.action = None
