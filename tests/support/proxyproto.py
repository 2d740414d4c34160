"""PROXY protocol v2 headers built by hand (possibly broken) for the reader's tests."""

import struct

from mailproxy.proxy_protocol import SIGNATURE as SIG


def v2(command=0x21, fam=0x11, body=b"", length=None):
    return SIG + bytes([command, fam]) + struct.pack("!H", len(body) if length is None
                                                     else length) + body


def tlv(t, value):
    return struct.pack("!BH", t, len(value)) + value
