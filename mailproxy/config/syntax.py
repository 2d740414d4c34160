"""nginx's token syntax (quotes, escapes) and units (times, sizes), with no I/O.
"""

import os
import re
from typing import Iterable, Optional




# errors

class Invalid(Exception):
    """Raised by value parsers; load() adds file, line and key."""


# ---------------------------------------------------------------------------------------------
# nginx token syntax

_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def split_tokens(text: str) -> list[str]:
    """Split `text` into arguments like nginx's configuration tokenizer.

    Whitespace separates tokens; a token starting with ``"`` or ``'`` runs to the
    matching quote and may hold whitespace; ``\\" \\' \\\\ \\n \\r \\t`` are escapes
    inside and outside quotes (other backslashes are kept); a backslash also keeps
    the next character from separating tokens.  A trailing unquoted ``;`` (pasted
    from nginx) is dropped.  Raises Invalid on an unterminated quote or a
    character glued to a closing quote.
    """
    tokens = []
    i, n = 0, len(text)
    last_unquoted_semicolon = False
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            break
        ch = text[i]
        if ch in "\"'":
            quote = ch
            i += 1
            buf = []
            while True:
                if i >= n:
                    raise Invalid("unterminated quoted string, expecting %s" % quote)
                c = text[i]
                if c == "\\" and i + 1 < n:
                    nxt = text[i + 1]
                    if nxt in _ESCAPES:
                        buf.append(_ESCAPES[nxt])
                        i += 2
                        continue
                    buf.append(c)
                    i += 1
                    continue
                if c == quote:
                    i += 1
                    break
                buf.append(c)
                i += 1
            if i < n and not text[i].isspace():
                if text[i] == ";" and not text[i + 1:].strip():
                    i = n
                else:
                    raise Invalid('unexpected "%s" after a quoted string' % text[i])
            tokens.append("".join(buf))
            last_unquoted_semicolon = False
        else:
            buf = []
            escaped_last = False
            while i < n and not text[i].isspace():
                c = text[i]
                if c == "\\" and i + 1 < n:
                    nxt = text[i + 1]
                    if nxt in _ESCAPES:
                        buf.append(_ESCAPES[nxt])
                    else:
                        buf.append(c + nxt)
                    i += 2
                    escaped_last = True
                    continue
                buf.append(c)
                escaped_last = False
                i += 1
            tokens.append("".join(buf))
            last_unquoted_semicolon = buf[-1] == ";" and not escaped_last
    if last_unquoted_semicolon:
        last = tokens.pop()[:-1]
        if last:
            tokens.append(last)
    return tokens


_SAFE_TOKEN = re.compile(r"""[^\s"'\\{}]+\Z""")


def quote_token(token: str) -> str:
    """`token` in nginx token syntax, quoted only when needed (inverse of split_tokens)."""
    token = str(token)
    if (_SAFE_TOKEN.match(token) and token[0] not in "#;" and not token.endswith(";")):
        return token
    out = ['"']
    for c in token:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def join_tokens(tokens: Iterable[str]) -> str:
    return " ".join(quote_token(t) for t in tokens)


# ---------------------------------------------------------------------------------------------
# units

_TIME_UNITS = (("y", 365 * 86400), ("M", 30 * 86400), ("w", 7 * 86400), ("d", 86400),
               ("h", 3600), ("m", 60), ("s", 1), ("ms", 0.001))
_TIME_RE = re.compile(r"(\d+)(ms|[yMwdhms])?")
_TIME_HINT = "a time such as 60s, 500ms or 1h30m"


def parse_time(text: str) -> Optional[float]:
    """nginx time (``500ms``, ``60s``, ``1h30m``, ``1d``, bare seconds) -> float s, or None."""
    if not text:
        return None
    pos, total, last_rank = 0, 0.0, -1
    order = [u for u, _ in _TIME_UNITS]
    scale = dict(_TIME_UNITS)
    while pos < len(text):
        mo = _TIME_RE.match(text, pos)
        if not mo:
            return None
        number, unit = mo.group(1), mo.group(2)
        if unit is None:
            if mo.end() != len(text):
                return None
            unit = "s"
            rank = len(order)  # a bare number ends the value
        else:
            rank = order.index(unit)
        if rank <= last_rank:
            return None
        last_rank = rank
        total += int(number) * scale[unit]
        pos = mo.end()
    return round(total, 3)


def format_time(seconds: float) -> str:
    """float seconds -> the shortest exact nginx time text."""
    ms = int(round(seconds * 1000))
    if ms % 1000:
        return "%dms" % ms
    s = ms // 1000
    if s == 0:
        return "0s"
    if s % 3600 == 0:
        return "%dh" % (s // 3600)
    if s % 60 == 0 and s >= 120:
        return "%dm" % (s // 60)
    return "%ds" % s


_SIZE_RE = re.compile(r"(\d+)([kKmMgG]?)\Z")


def parse_size(text: str) -> Optional[int]:
    """nginx size (``8k``, ``1m``, ``1g``, bytes) -> int, or None."""
    mo = _SIZE_RE.match(text)
    if not mo:
        return None
    mult = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[mo.group(2).lower()]
    return int(mo.group(1)) * mult


def format_size(n: int) -> str:
    for unit, size in (("g", 1024 ** 3), ("m", 1024 ** 2), ("k", 1024)):
        if n and n % size == 0:
            return "%d%s" % (n // size, unit)
    return str(n)


def _page_size():
    try:
        return str(os.sysconf("SC_PAGESIZE"))
    except (ValueError, OSError, AttributeError):
        return "4096"
