"""Parser and dump formatter of `auth_http_cache` (ours; auth_cache.py)."""

from typing import Any, Optional

from .parsers import _Ctx
from .syntax import _TIME_HINT, format_time, parse_time

_EXPECTED = '"off" or valid=TIME invalid=TIME size=N (e.g. valid=1m invalid=10s size=10000)'
DEFAULTS = {"valid": 60.0, "invalid": 0.0, "size": 10000}


def p_auth_http_cache(args: list[str], ctx: _Ctx) -> Optional[tuple[float, float, int]]:
    """`off`, or any of valid=TIME (Auth-Status OK answers), invalid=TIME (refusals),
    size=N (entries per worker): (valid, invalid, size); what is left out takes DEFAULTS."""
    if args == ["off"]:
        return None
    got = dict(DEFAULTS)
    seen = set()
    for a in args:
        name, eq, value = a.partition("=")
        if not eq or name not in DEFAULTS or name in seen:
            raise ctx.bad(a, _EXPECTED)
        seen.add(name)
        if name == "size":
            if not value.isdigit() or int(value) < 1:
                raise ctx.bad(a, "size=N with N at least 1")
            got[name] = int(value)
        else:
            t = parse_time(value)
            if t is None:
                raise ctx.bad(a, "%s=TIME (%s)" % (name, _TIME_HINT))
            got[name] = t
    if got["valid"] <= 0 and got["invalid"] <= 0:
        raise ctx.bad(" ".join(args), "valid or invalid above 0 (or \"off\")")
    return (got["valid"], got["invalid"], got["size"])


def f_auth_http_cache(v: Any) -> list[str]:
    if v is None:
        return ["off"]
    valid, invalid, size = v
    return ["valid=%s invalid=%s size=%d" % (format_time(valid), format_time(invalid), size)]
