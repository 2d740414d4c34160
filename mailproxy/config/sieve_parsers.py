"""Parser of `sieve_capabilities` (ours; sieve.py): each token one capability line, its first
word the name and the rest its value, as nginx's smtp_capabilities takes one EHLO line a token."""

import re

from .parsers import _Ctx

# sieve.py says these itself: SASL from sieve_auth, STARTTLS from starttls
COMPUTED = ("SASL", "STARTTLS")
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def p_sieve_capabilities(args: list[str], ctx: _Ctx) -> list[str]:
    out = []
    for a in args:
        name = a.strip().partition(" ")[0]
        if not _NAME.fullmatch(name):
            raise ctx.bad(a, 'a capability name of letters, digits, "-" and "_", then its value')
        if name.upper() in COMPUTED:
            raise ctx.bad(a, "capabilities other than SASL (from sieve_auth) and STARTTLS "
                          "(from starttls)")
        if any(ord(c) < 0x20 or ord(c) == 0x7f for c in a):
            raise ctx.bad(a, "a value without control characters")
        out.append(a.strip())
    return out
