"""Formatting of each directive's value for `-T` (tokens that load again).
"""

from typing import Any

from .syntax import format_size, format_time, join_tokens, quote_token
from .types import DEFAULT_BACKLOG, _addr_text


# formatting of each value for dump

def f_time(v: Any) -> list[str]:
    return [format_time(v)]


def f_opt_time(v: Any) -> list[str]:
    return [] if v is None else [format_time(v)]


def f_size(v: Any) -> list[str]:
    return [format_size(v)]


def f_flag(v: Any) -> list[str]:
    return ["on" if v else "off"]


def f_token(v: Any) -> list[str]:
    return [quote_token(v)]


def f_num(v: Any) -> list[str]:
    return [str(v)]


def f_words(v: Any) -> list[str]:
    return [join_tokens(v)] if v else []


def f_each_token(v: Any) -> list[str]:
    return [quote_token(x) for x in v]


def f_each_tuple(v: Any) -> list[str]:
    return [join_tokens(x) for x in v]


def f_listen(v: Any) -> list[str]:
    out = []
    for li in v:
        parts = [li.address_text()]
        if li.ssl:
            parts.append("ssl")
        if li.proxy_protocol:
            parts.append("proxy_protocol")
        if li.backlog != DEFAULT_BACKLOG:
            parts.append("backlog=%d" % li.backlog)
        if li.rcvbuf is not None:
            parts.append("rcvbuf=%d" % li.rcvbuf)
        if li.sndbuf is not None:
            parts.append("sndbuf=%d" % li.sndbuf)
        if not li.ipv6only:
            parts.append("ipv6only=off")
        if li.so_keepalive is True:
            parts.append("so_keepalive=on")
        elif li.so_keepalive is False:
            parts.append("so_keepalive=off")
        elif li.so_keepalive is not None:
            parts.append("so_keepalive=" + ":".join(
                "" if x is None else (format_time(x) if i < 2 else str(x))
                for i, x in enumerate(li.so_keepalive)))
        if li.bind:
            parts.append("bind")
        if li.multipath:
            parts.append("multipath")
        out.append(join_tokens(parts))
    return out


def f_error_log(v: Any) -> list[str]:
    out = []
    for t in v or []:
        if t.kind == "stderr":
            target = "stderr"
        elif t.kind == "file":
            target = t.path
        else:
            host, port = t.server
            target = "syslog:server=%s" % _addr_text(host, port)
            if t.facility != "local7":
                target += ",facility=" + t.facility
            if t.tag != "mailproxy":
                target += ",tag=" + t.tag
            if t.nohostname:
                target += ",nohostname"
        out.append(join_tokens([target, t.level]))
    return out


def f_auth_http(v: Any) -> list[str]:
    out = []
    for u in v or ():
        if u.unix is not None:
            out.append(quote_token("unix:%s:%s" % (u.unix, u.uri)))
        else:
            scheme = "https" if u.tls else "http"
            out.append(quote_token("%s://%s%s" % (scheme, _addr_text(u.host, u.port), u.uri)))
    return out


def f_proxy_pass(v: Any) -> list[str]:
    return [] if v is None else [quote_token(_addr_text(*v))]


def f_resolver(v: Any) -> list[str]:
    if v is None:
        return ["off"]
    if v == "system":
        return ["system"]
    parts = [_addr_text(h, p) for h, p in v.servers]
    if v.valid is not None:
        parts.append("valid=" + format_time(v.valid))
    if not v.ipv4:
        parts.append("ipv4=off")
    if not v.ipv6:
        parts.append("ipv6=off")
    if v.status_zone:
        parts.append("status_zone=" + v.status_zone)
    return [join_tokens(parts)]


def f_pid(v: Any) -> list[str]:
    return [] if v is None else [quote_token(v)]


def f_user(v: Any) -> list[str]:
    return [] if v is None else [join_tokens([x for x in v if x is not None])]


def f_opt_token(v: Any) -> list[str]:
    return [] if v is None else [quote_token(v)]


def f_cpu_affinity(v: Any) -> list[str]:
    if v is None:
        return ["off"]
    masks = [format(sum(1 << c for c in m), "b") for m in v.masks]
    return [join_tokens((["auto"] if v.auto else []) + masks)]
