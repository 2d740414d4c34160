"""Parsers and dump formatters of the login throttling directives (throttle.py):
`login_penalty_max`, `login_block` and `login_trusted`.
"""

import ipaddress
from typing import Any, Optional

from .parsers import _Ctx
from .syntax import _TIME_HINT, format_time, parse_time


def p_penalty_max(args: list[str], ctx: _Ctx) -> float:
    v = parse_time(args[0])
    if v is None or v <= 0:
        raise ctx.bad(args[0], "a time above 0 (" + _TIME_HINT + ")")
    return v


def p_login_block(args: list[str], ctx: _Ctx) -> Optional[tuple[int, float]]:
    """`off`, or FAILURES/PERIOD: (failures, period seconds)."""
    a = args[0]
    if a == "off":
        return None
    count, slash, period = a.partition("/")
    seconds = parse_time(period) if slash else None
    if not count.isdigit() or int(count) < 1 or seconds is None or seconds <= 0:
        raise ctx.bad(a, '"off" or FAILURES/PERIOD (e.g. 20/10m)')
    return (int(count), seconds)


def p_login_trusted(args: list[str], ctx: _Ctx) -> list[str]:
    """ADDRESS or ADDRESS/PREFIX ...; `none` (the default): no address is trusted."""
    if args in ([], ["none"]):
        return []
    out = []
    for a in args:
        try:
            net = ipaddress.ip_network(a, strict=False)
        except ValueError:
            raise ctx.bad(a, "an address or ADDRESS/PREFIX") from None
        out.append(str(net) if "/" in a else net.network_address.compressed)
    return out


def f_login_block(v: Any) -> list[str]:
    return ["off"] if v is None else ["%d/%s" % (v[0], format_time(v[1]))]


def f_login_trusted(v: Any) -> list[str]:
    return [" ".join(v)] if v else ["none"]
