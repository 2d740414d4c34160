"""SASL mechanism decoding shared by POP3, IMAP and SMTP, as nginx's ngx_mail_auth_plain,
ngx_mail_auth_login_username/_password, ngx_mail_auth_cram_md5 and ngx_mail_auth_external do.

Credentials are bytes everywhere.  Every decoder raises `SaslError`, whose
str() is the message nginx logs (info level) before answering the command as
invalid.  Beyond nginx, decoded logins and passwords that contain CR, LF or NUL
are refused as well, so client-chosen bytes can never become an extra line
towards a backend or an extra header towards the auth service.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from typing import Optional, Tuple

__all__ = [
    'SaslError', 'decode_base64', 'decode_plain', 'decode_login_username',
    'decode_login_password', 'decode_cram_md5', 'decode_external',
    'check_credential', 'make_salt', 'cram_md5_challenge', 'encode_plain',
    'USERNAME_PROMPT', 'PASSWORD_PROMPT',
]

USERNAME_PROMPT = b'VXNlcm5hbWU6'     # base64("Username:")
PASSWORD_PROMPT = b'UGFzc3dvcmQ6'     # base64("Password:")


_B64_ALPHABET = (b'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
                 b'0123456789+/')
_UNSAFE = b'\r\n\x00'


class SaslError(Exception):
    """A client's SASL response was unusable; str() is nginx's log message."""


def decode_base64(data: bytes) -> Optional[bytes]:
    """Decode like nginx's ngx_decode_base64(); None when invalid.

    Only the bytes before the first '=' count (padding is optional and what
    follows the first '=' is ignored, as nginx does); each of them must be in
    the standard alphabet, and a length of 4n+1 symbols is invalid.
    """
    eq = data.find(b'=')
    if eq >= 0:
        data = data[:eq]
    if data.translate(None, _B64_ALPHABET):
        return None                       # a byte outside the alphabet ('*', space, ...)
    rem = len(data) % 4
    if rem == 1:
        return None
    if rem:
        data += b'=' * (4 - rem)
    try:
        # non-strict mode ignores non-zero trailing bits, as nginx does
        return binascii.a2b_base64(data)
    except binascii.Error:                # pragma: no cover - cannot happen after the checks
        return None


def check_credential(value: bytes) -> bool:
    """True when `value` holds no CR, LF or NUL (safe for a backend line)."""
    return not (b'\r' in value or b'\n' in value or b'\x00' in value)


def _decode(b64, mech):
    out = decode_base64(b64)
    if out is None:
        raise SaslError('client sent invalid base64 encoding in AUTH %s command' % mech)
    return out


def _checked(value, what, mech):
    if not check_credential(value):
        raise SaslError('client sent invalid %s in AUTH %s command' % (what, mech))
    return value


def decode_plain(b64: bytes) -> Tuple[bytes, bytes]:
    """AUTH PLAIN response: authzid NUL login NUL password -> (login, password)."""
    plain = _decode(b64, 'PLAIN')
    first = plain.find(b'\x00')
    if first < 0 or first == len(plain) - 1:
        # nginx: no NUL at all, or nothing after it
        raise SaslError('client sent invalid login in AUTH PLAIN command')
    second = plain.find(b'\x00', first + 1)
    if second < 0:
        raise SaslError('client sent invalid password in AUTH PLAIN command')
    login = _checked(plain[first + 1:second], 'login', 'PLAIN')
    password = _checked(plain[second + 1:], 'password', 'PLAIN')
    return login, password


def decode_login_username(b64: bytes) -> bytes:
    """AUTH LOGIN first response (or initial response) -> login."""
    return _checked(_decode(b64, 'LOGIN'), 'login', 'LOGIN')


def decode_login_password(b64: bytes) -> bytes:
    """AUTH LOGIN second response -> password."""
    return _checked(_decode(b64, 'LOGIN'), 'password', 'LOGIN')


def decode_cram_md5(b64: bytes) -> Tuple[bytes, bytes]:
    """AUTH CRAM-MD5 response: 'login SP digest' -> (login, digest).

    The digest is everything after the first space and must be exactly 32
    bytes (not checked for hex, as nginx).
    """
    text = _decode(b64, 'CRAM-MD5')
    sp = text.find(b' ')
    if sp < 0 or len(text) - sp - 1 != 32:
        raise SaslError('client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command')
    login = _checked(text[:sp], 'login', 'CRAM-MD5')
    digest = text[sp + 1:]
    if not check_credential(digest):
        raise SaslError('client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command')
    return login, digest


def decode_external(b64: bytes) -> bytes:
    """AUTH EXTERNAL response (authorization identity) -> login."""
    return _checked(_decode(b64, 'EXTERNAL'), 'login', 'EXTERNAL')


def make_salt(server_name: str) -> bytes:
    """`<random.unixtime@server_name>` (no CRLF), as nginx's ngx_mail_salt()."""
    return ('<%d.%d@%s>' % (secrets.randbelow(2 ** 31), int(time.time()),
                            server_name)).encode('utf-8', 'surrogateescape')


def cram_md5_challenge(salt: bytes) -> bytes:
    """The CRAM-MD5 challenge: base64 of the salt (without any CRLF)."""
    if salt.endswith(b'\r\n'):
        salt = salt[:-2]
    return base64.b64encode(salt)


def encode_plain(login: bytes, password: bytes) -> bytes:
    """base64(NUL login NUL password), for AUTH PLAIN towards a backend."""
    return base64.b64encode(b'\x00' + login + b'\x00' + password)
