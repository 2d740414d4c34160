"""mailproxy/proxy_protocol.py: the PROXY protocol's wire format, read (the parser behind
`listen ... proxy_protocol`) and written (the `proxy_protocol` directive towards backends)."""

import struct

import pytest

from mailproxy import backend, proxy_protocol, realip
from mailproxy.proxy_protocol import SIGNATURE as SIG
from mailproxy.proxy_protocol import BrokenHeader, parse, v1_header, v2_header
from tests.support.proxyproto import tlv, v2


# ---------------------------------------------------------------------------------------------
# the parser

@pytest.mark.parametrize("data,size,addrs", [
    (b"PROXY TCP4 203.0.113.7 198.51.100.2 40000 25\r\nEHLO x\r\n", 46,
     ("203.0.113.7", 40000, "198.51.100.2", 25)),
    (b"PROXY TCP6 2001:DB8::1 2001:db8::2 1 65535\r\n", 44, ("2001:DB8::1", 1, "2001:db8::2", 65535)),
    (b"PROXY UNKNOWN\r\n", 15, None),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\nA", 59, None),
    (v2_header("203.0.113.7", 40000, "198.51.100.2", 143) + b"a1 NOOP\r\n", 28,
     ("203.0.113.7", 40000, "198.51.100.2", 143)),
    (v2_header("2001:db8::1", 5, "::ffff:10.0.0.1", 6), 52,
     ("2001:db8::1", 5, "::ffff:10.0.0.1", 6)),
    # TLVs (ALPN, authority, SSL) are skipped: they are inside the header length
    (v2(body=bytes([203, 0, 113, 7, 10, 0, 0, 1]) + struct.pack("!HH", 7, 8)
        + tlv(1, b"imap") + tlv(2, b"mail.example") + tlv(0x20, b"\x01\x00\x00\x00\x00"))
     + b"rest", 16 + 12 + 7 + 15 + 8, ("203.0.113.7", 7, "10.0.0.1", 8)),
    (v2(command=0x20, fam=0x00), 16, None),                       # LOCAL (health check)
    (v2(command=0x20, fam=0x11, body=b"\0" * 12), 28, None),      # LOCAL with addresses
    (v2(fam=0x00, body=b"xx"), 18, None),                         # UNSPEC
    (v2(fam=0x31, body=b"\0" * 216), 232, None),                  # AF_UNIX
    (v2(fam=0x12, body=b"\0" * 12), 28, None),                    # DGRAM
])
def test_parse_good(data, size, addrs):
    assert parse(data) == (size, addrs)


@pytest.mark.parametrize("data,message", [
    (b"GET / HTTP/1.0\r\n", 'broken header: "GET / HTTP/1.0"'),
    (b"PROXY TCP4 1.2.3.4\r\n", 'broken header: "PROXY TCP4 1.2.3.4"'),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", 'broken header: "PROXY TCP5 1.2.3.4 5.6.7.8 1 2"'),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n", 'broken header: "PROXY TCP4 1.2.3.4 5.6.7.8 70000 2"'),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", 'broken header: "PROXY TCP4 1.2.3.4 5.6.7.8 1 2"'),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", 'broken header: "PROXY TCP4 1.2.3.4 5.6.7.8 1 2"'),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 x\r\n", 'broken header: "PROXY TCP4 1.2.3.4 5.6.7.8 1 x"'),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", 'broken header: "PROXY TCP4 1.2.3.4 5.6.7.8 1 "'),
    (b"PROXY TCP4 host.example 5.6.7.8 1 2\r\n", 'broken header: "PROXY TCP4 host.example'),
    (b"PROXY UNKNOWN", 'broken header: "PROXY UNKNOWN"'),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", 'broken header: "PROXY TCP4 1.2.3.4 5.6.7.8 1 2"'),
    (b"PROX", 'broken header: "PROX"'),
    (b"PROXY TCP4 \x01\x02 5.6.7.8 1 2\r\n", 'broken header: "PROXY TCP4 \\x01\\x02 5.6.7.8 1 2"'),
    (v2(command=0x31), "unknown PROXY protocol version: 3"),
    (v2(body=b"\0" * 12, length=100), "header is too large"),
    (v2(fam=0x11, body=b"\0" * 8), 'broken header: "'),          # addresses cut short
    (v2(fam=0x21, body=b"\0" * 30), 'broken header: "'),
    (SIG[:10], 'broken header: "'),                               # too short for v2 or v1
])
def test_parse_broken(data, message):
    with pytest.raises(BrokenHeader) as e:
        parse(data)
    assert str(e.value).startswith(message)


# ---------------------------------------------------------------------------------------------
# writing v1

def test_proxy_v1_tcp4():
    assert (v1_header('192.0.2.10', 40000, '127.0.0.1', 11028)
            == b'PROXY TCP4 192.0.2.10 127.0.0.1 40000 11028\r\n')


def test_proxy_v1_tcp6():
    assert (v1_header('2001:db8::1', 40000, '2001:db8::2', 993)
            == b'PROXY TCP6 2001:db8::1 2001:db8::2 40000 993\r\n')


def test_proxy_v1_mixed_families_written_as_ipv6():
    # nginx writes the invalid `PROXY TCP6 2001:db8::1 127.0.0.1 ...`; we map to IPv6
    assert (v1_header('2001:db8::1', 40000, '127.0.0.1', 11028)
            == b'PROXY TCP6 2001:db8::1 ::ffff:127.0.0.1 40000 11028\r\n')
    assert (v1_header('192.0.2.10', 40000, '::1', 143)
            == b'PROXY TCP6 ::ffff:192.0.2.10 ::1 40000 143\r\n')


def test_proxy_v1_unknown():
    assert v1_header(None, None, '127.0.0.1', 110) == b'PROXY UNKNOWN\r\n'


# ---------------------------------------------------------------------------------------------
# writing v2

def test_proxy_v2_tcp4():
    h = v2_header('192.0.2.10', 40000, '127.0.0.1', 11028)
    assert h == (SIG + b'\x21\x11\x00\x0c' + bytes([192, 0, 2, 10]) + bytes([127, 0, 0, 1])
                 + struct.pack('!HH', 40000, 11028))


def test_proxy_v2_tcp6():
    h = v2_header('2001:db8::1', 40000, '2001:db8::2', 993)
    src = bytes.fromhex('20010db8000000000000000000000001')
    dst = bytes.fromhex('20010db8000000000000000000000002')
    assert h == SIG + b'\x21\x21\x00\x24' + src + dst + struct.pack('!HH', 40000, 993)


def test_proxy_v2_mixed_mapped_to_ipv6():
    h = v2_header('2001:db8::1', 40000, '127.0.0.1', 11028)
    src = bytes.fromhex('20010db8000000000000000000000001')
    dst = bytes.fromhex('00000000000000000000ffff7f000001')
    assert h == SIG + b'\x21\x21\x00\x24' + src + dst + struct.pack('!HH', 40000, 11028)


def test_proxy_v2_local_and_tlvs():
    assert v2_header(None, None, None, None) == SIG + b'\x20\x00\x00\x00'
    h = v2_header('192.0.2.10', 1, '127.0.0.1', 2, tlvs=[(0x01, b'imap'), (0x02, b'mx')])
    tail = b'\x01\x00\x04imap' + b'\x02\x00\x02mx'
    assert h == (SIG + b'\x21\x11' + struct.pack('!H', 12 + len(tail))
                 + bytes([192, 0, 2, 10, 127, 0, 0, 1]) + struct.pack('!HH', 1, 2) + tail)
    assert (v2_header(None, None, None, None, tlvs=[(0x04, b'\x00')])
            == SIG + b'\x20\x00\x00\x04' + b'\x04\x00\x01\x00')


# ---------------------------------------------------------------------------------------------
# one home: what is written is what is read

def test_signature_is_the_v2_magic():
    assert SIG == bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])


def test_wire_format_lives_in_one_module():
    # realip.py keeps trust and the session's read, backend.py the connection: neither holds
    # a copy of the signature, the parser or the writers
    for mod, names in ((realip, ("V2_SIGNATURE", "_parse_v2", "_read_addr")),
                       (backend, ("PROXY_V2_SIGNATURE", "proxy_v1_header", "proxy_v2_header"))):
        for name in names:
            assert not hasattr(mod, name), (mod.__name__, name)
    for name in ("parse", "BrokenHeader"):
        theirs = getattr(realip, name, None)
        assert theirs is None or theirs is getattr(proxy_protocol, name), name


@pytest.mark.parametrize("client,cport,local,lport,read_as", [
    ("192.0.2.10", 40000, "127.0.0.1", 110, ("192.0.2.10", 40000, "127.0.0.1", 110)),
    ("2001:db8::1", 1, "2001:db8::2", 65535, ("2001:db8::1", 1, "2001:db8::2", 65535)),
    ("[2001:db8::1]", 5, "::1", 6, ("2001:db8::1", 5, "::1", 6)),
    ("fe80::1%eth0", 5, "fe80::2", 6, ("fe80::1", 5, "fe80::2", 6)),     # no scope id sent
    # mixed families: both become IPv6, IPv4-mapped in nginx's text
    ("192.0.2.10", 40000, "::1", 143, ("::ffff:192.0.2.10", 40000, "::1", 143)),
    ("2001:db8::1", 40000, "127.0.0.1", 993, ("2001:db8::1", 40000, "::ffff:127.0.0.1", 993)),
])
def test_written_headers_parse_back(client, cport, local, lport, read_as):
    rest = b"a1 CAPABILITY\r\n"
    h1 = v1_header(client, cport, local, lport)
    assert parse(h1 + rest) == (len(h1), read_as)
    h2 = v2_header(client, cport, local, lport, tlvs=[(1, b"imap"), (2, b"mail.example")])
    assert parse(h2 + rest) == (len(h2), read_as)


def test_written_unknown_and_local_parse_back_without_addresses():
    h1 = v1_header(None, None, "127.0.0.1", 110)
    assert parse(h1 + b"+OK") == (len(h1), None)
    h2 = v2_header(None, None, None, None, tlvs=[(4, b"\0")])
    assert parse(h2 + b"+OK") == (len(h2), None)
