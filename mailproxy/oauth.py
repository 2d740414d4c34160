"""OAUTHBEARER (RFC 7628) and XOAUTH2 (Google's and Microsoft's token login): the client
responses parsed strictly, the backend's built again, and the auth service's `Auth-Error-SASL`.

Pure functions, bytes everywhere.  Parsers raise sasl.SaslError, whose str() is the info-level
log line before the protocol's invalid-command reply; the token itself never goes into one.
README.md "OAuth 2.0 logins" describes the flow.
"""

from __future__ import annotations

import base64
import re
from typing import Dict, Optional, Tuple

from .sasl import SaslError, check_credential, decode_base64

__all__ = ['METHODS', 'MECHANISMS', 'DUMMY', 'BUFFER', 'decode_oauthbearer', 'decode_xoauth2',
           'encode_oauthbearer', 'encode_xoauth2', 'error_challenge', 'backend_challenge',
           'canonical',
           'dummy_response']

# the `*_auth` method names and the SASL words that select them
METHODS = ("oauthbearer", "xoauth2")
MECHANISMS: Dict[bytes, str] = {b"OAUTHBEARER": "oauthbearer", b"XOAUTH2": "xoauth2"}

DUMMY = b"AQ=="             # base64 of ^A: the client's answer to an error challenge
# POP3's command buffer while a token mechanism is enabled: nginx's 128 bytes cannot hold a
# bearer token (RFC 5034 puts no limit on a continuation line)
BUFFER = 8192

_KVSEP = b"\x01"
_KEY = re.compile(rb"[A-Za-z]+\Z")
# RFC 7628 section 3.1: value = *(VCHAR / SP / HTAB / CR / LF)
_VALUE = re.compile(rb"[\x21-\x7e \t\r\n]*\Z")
# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_BEARER = re.compile(rb"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)\Z")
_B64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")


def _invalid(what: str, mech: str) -> SaslError:
    return SaslError('client sent invalid %s in AUTH %s command' % (what, mech))


def _decode(b64: bytes, mech: str) -> bytes:
    out = decode_base64(b64)
    if out is None:
        raise SaslError('client sent invalid base64 encoding in AUTH %s command' % mech)
    return out


def _token(value: bytes, mech: str) -> bytes:
    m = _BEARER.match(value)
    if m is None:
        raise _invalid("token", mech)
    return m.group(1)


def _saslname(name: bytes) -> bytes:
    """RFC 5801's saslname: `,` is written =2C and `=` =3D; any other `=` is invalid."""
    parts = name.split(b"=")
    out = parts[0]
    for part in parts[1:]:
        code = part[:2]
        if code == b"2C":
            out += b","
        elif code == b"3D":
            out += b"="
        else:
            raise _invalid("login", "OAUTHBEARER")
        out += part[2:]
    return out


def decode_oauthbearer(b64: bytes) -> Tuple[bytes, bytes]:
    """An OAUTHBEARER client response -> (authzid, token); authzid b"" when absent.

    `n,a=user,` (or `y,`; channel binding `p=` is not offered), then ^A-separated key=value
    pairs, one of them `auth=Bearer TOKEN` (`host`, `port` and others optional), ended by ^A^A.
    """
    mech = "OAUTHBEARER"
    msg = _decode(b64, mech)
    head, sep, rest = msg.partition(_KVSEP)
    fields = head.split(b",")
    if not sep or len(fields) != 3 or fields[0] not in (b"n", b"y") or fields[2]:
        raise _invalid("GS2 header", mech)
    user = b""
    if fields[1]:
        if not fields[1].startswith(b"a=") or len(fields[1]) == 2:
            raise _invalid("GS2 header", mech)
        user = _saslname(fields[1][2:])
    # the pairs, each ended by ^A, then the ^A that ends the message
    if not rest.endswith(_KVSEP + _KVSEP):
        raise _invalid("key/value pairs", mech)
    pairs: Dict[bytes, bytes] = {}
    for pair in rest[:-2].split(_KVSEP):
        key, eq, value = pair.partition(b"=")
        if not eq or not _KEY.match(key) or not _VALUE.match(value) or key in pairs:
            raise _invalid("key/value pairs", mech)
        pairs[key] = value
    if b"auth" not in pairs:
        raise _invalid("key/value pairs", mech)
    if b"port" in pairs and not pairs[b"port"].isdigit():
        raise _invalid("port", mech)
    if not check_credential(user):
        raise _invalid("login", mech)
    return user, _token(pairs[b"auth"], mech)


def decode_xoauth2(b64: bytes) -> Tuple[bytes, bytes]:
    """An XOAUTH2 client response `user=USER^Aauth=Bearer TOKEN^A^A` -> (user, token)."""
    mech = "XOAUTH2"
    msg = _decode(b64, mech)
    parts = msg.split(_KVSEP)
    if (len(parts) != 4 or parts[2] or parts[3] or not parts[0].startswith(b"user=")
            or not parts[1].startswith(b"auth=")):
        raise _invalid("response", mech)
    user = parts[0][5:]
    if not user or not check_credential(user):
        raise _invalid("login", mech)
    return user, _token(parts[1][5:], mech)


def encode_oauthbearer(user: bytes, token: bytes) -> bytes:
    """The OAUTHBEARER response towards a backend (base64), the authzid escaped."""
    name = user.replace(b"=", b"=3D").replace(b",", b"=2C")
    gs2 = b"n,a=" + name + b"," if user else b"n,,"
    return base64.b64encode(gs2 + _KVSEP + b"auth=Bearer " + token + _KVSEP + _KVSEP)


def encode_xoauth2(user: bytes, token: bytes) -> bytes:
    """The XOAUTH2 response towards a backend (base64)."""
    return base64.b64encode(b"user=" + user + _KVSEP + b"auth=Bearer " + token + _KVSEP + _KVSEP)


def encode(method: str, user: bytes, token: bytes) -> bytes:
    """The response of `method` ('oauthbearer' or 'xoauth2') for a backend."""
    if method == "oauthbearer":
        return encode_oauthbearer(user, token)
    return encode_xoauth2(user, token)


def dummy_response(method: str) -> bytes:
    """What a client says to an error challenge: ^A for OAUTHBEARER (RFC 7628 section 3.2.3),
    an empty response for XOAUTH2 (as Google documents it)."""
    return DUMMY if method == "oauthbearer" else b""


def error_challenge(value: bytes) -> Optional[bytes]:
    """The `Auth-Error-SASL` header -> the challenge's base64 text, None when unusable.

    The auth service sends the RFC 7628 JSON either raw (it starts with `{`) or already in
    base64; both end up as base64, which alone can travel in a challenge line."""
    value = value.strip(b" \t")
    if value.startswith(b"{"):
        if not re.fullmatch(rb"[\x20-\x7e]+", value):
            return None
        return base64.b64encode(value)
    if not value or not _B64.match(value):      # canonical base64 only
        return None
    return value


def backend_challenge(line: bytes, prefix: bytes) -> Optional[bytes]:
    """A backend's error challenge line (`+ eyJ...`, SMTP `334 eyJ...`; `prefix` is the
    protocol's) -> its base64 text, to be the client's error challenge; None when it holds none
    or not canonical base64 (nothing else may reach a client line)."""
    if not line.startswith(prefix):
        return None
    return canonical(line[len(prefix):].rstrip(b"\r\n").strip(b" "))


def canonical(value: Optional[bytes]) -> Optional[bytes]:
    """`value` when it is non-empty canonical base64, else None (ManageSieve's challenge is
    a string: its content is checked here)."""
    if not value or not _B64.match(value):
        return None
    return value
