"""The PROXY protocol's wire format, both ways (as nginx's ngx_proxy_protocol.c).

Reading (`listen ... proxy_protocol`, nginx's ngx_proxy_protocol_read): `parse` takes what one
peek at the client socket returned; the v1 line or v2 header must be complete in it.
* a broken header raises BrokenHeader whose text is nginx's log message (`broken header:
  "..."`, and for v2 `unknown PROXY protocol version: N`, `header is too large`);
* v1 `PROXY UNKNOWN ...`, and v2 LOCAL, non-STREAM or UNSPEC/UNIX headers are consumed and
  carry no addresses (TLVs are skipped: they are inside the header's length).
Trust (`set_real_ip_from`) and reading from a session's socket stay in realip.py.

Writing (the `proxy_protocol` directive towards backends, nginx's ngx_proxy_protocol_write):
`v1_header` and `v2_header`.  Mixed client/local families are written as IPv6 with
IPv4-mapped addresses, never nginx's mixed v1 line (README.md, Differences from nginx).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Iterable, Optional, Tuple, Union

from .log import sanitize

__all__ = ["BrokenHeader", "SIGNATURE", "parse", "v1_header", "v2_header", "ip_text"]

# the 12 bytes every v2 header starts with
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_ADDR_CHARS = frozenset(b"0123456789abcdefABCDEF:.")


def ip_text(ip: Union[ipaddress.IPv4Address, ipaddress.IPv6Address]) -> str:
    """nginx's text of an address: IPv4 dotted, IPv6 compressed, IPv4-mapped as ::ffff:a.b.c.d."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return "::ffff:" + str(ip.ipv4_mapped)
    return ip.compressed


# ---------------------------------------------------------------------------------- reading

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


Addresses = Tuple[str, int, str, int]      # client address and port, local address and port
# an address as the writers take it: text (`[v6]` and a scope id allowed) or an ipaddress object
Address = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address, None]


def parse(buf: Union[bytes, bytearray, memoryview]) -> Tuple[int, Optional[Addresses]]:
    """Parse a PROXY header at the start of `buf` (what one read returned).

    Returns (length of the header, addresses) where addresses is (src_addr, src_port,
    dst_addr, dst_port) as text and ints, or None for a header without addresses.
    Raises BrokenHeader with nginx's log message.
    """
    buf = bytes(buf)
    n = len(buf)
    if n >= 16 and buf[:12] == SIGNATURE:
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
    # nginx's ngx_proxy_protocol_v2_read
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


# ---------------------------------------------------------------------------------- writing

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


def v1_header(client_ip: Address, client_port: int, local_ip: Address,
              local_port: int) -> bytes:
    """`PROXY TCP4|TCP6 <client> <local> <cport> <lport>\\r\\n`, or `PROXY UNKNOWN\\r\\n`."""
    if client_ip is None or local_ip is None:
        return b'PROXY UNKNOWN\r\n'
    c, l = _pair(client_ip, local_ip)
    proto = 'TCP4' if c.version == 4 else 'TCP6'
    return ('PROXY %s %s %s %d %d\r\n'
            % (proto, ip_text(c), ip_text(l), int(client_port), int(local_port))).encode('ascii')


def v2_header(client_ip: Address, client_port: int, local_ip: Address, local_port: int,
              tlvs: Iterable[Tuple[int, bytes]] = ()) -> bytes:
    """Binary PROXY v2: PROXY command over TCP4/TCP6, or LOCAL/UNSPEC without a client address.

    tlvs: iterable of (type, bytes), appended in order.
    """
    tail = b''.join(struct.pack('!BH', t, len(v)) + bytes(v) for t, v in tlvs)
    if client_ip is None or local_ip is None:
        return SIGNATURE + struct.pack('!BBH', 0x20, 0x00, len(tail)) + tail
    c, l = _pair(client_ip, local_ip)
    if c.version == 4:
        fam, addrs = 0x11, c.packed + l.packed
    else:
        fam, addrs = 0x21, c.packed + l.packed
    body = addrs + struct.pack('!HH', int(client_port), int(local_port)) + tail
    return SIGNATURE + struct.pack('!BBH', 0x21, fam, len(body)) + body
