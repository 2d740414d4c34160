"""Values of the backend pool directives: `proxy_pass` (one or several backends with nginx
upstream's parameters), `proxy_map = FILE` and `proxy_health_check`; and the load-time
resolution of backend names (`resolve_backends`, called by the loader once `resolver` is known).
"""

from __future__ import annotations

from typing import Any, Optional

from ..errors import ConfigError
from ..proxy_map import ProxyMap
from ..resolver import LookupFailed
from ..upstreams import Backend, all_backends, lookup
from .parsers import _Ctx, _HOSTNAME, _literal_ip, _split_host_port
from .syntax import Invalid, parse_time, split_tokens

_EXPECTED = "HOST:PORT [weight=N] [max_fails=N] [fail_timeout=TIME] [backup] ..."


def parse_backends(args: list[str], ctx: _Ctx) -> list[Backend]:
    """`host:port [params] host:port [params] ...` -> [Backend]. Raises Invalid."""
    out: list[Backend] = []
    for a in args:
        name, eq, val = a.partition("=")
        if not out and (eq or a == "backup"):
            raise ctx.bad(a, _EXPECTED)
        b = out[-1] if out else None
        if eq and name in ("weight", "max_fails"):
            if not val.isdigit() or (name == "weight" and int(val) < 1) or int(val) > 1000:
                raise ctx.bad(a, "%s=N with N a number (weight 1 to 1000, max_fails 0 to "
                              "1000)" % name)
            setattr(b, name, int(val))
        elif eq and name == "fail_timeout":
            t = parse_time(val)
            if t is None or t <= 0:
                raise ctx.bad(a, "fail_timeout=TIME, e.g. fail_timeout=10s")
            b.fail_timeout = t
        elif a == "backup":
            b.backup = True
        elif eq:
            raise ctx.bad(a, _EXPECTED)
        else:
            host, port = _split_host_port(a, ctx, ctx.key)
            ip = _literal_ip(host)
            if ip is None:
                if a.startswith("[") or not _HOSTNAME.match(host):
                    raise ctx.bad(a, "HOST:PORT with an IP address, [IPv6] or a host name")
            elif ":" not in host:
                host = ip.compressed
            if any(x.key == (host, port) for x in out):
                raise ctx.bad(a, "each backend once")
            out.append(Backend(host, port, file=ctx.file, line=ctx.line))
    if not out:
        raise ctx.bad("", _EXPECTED)
    return out


def p_proxy_pass(args: list[str], ctx: _Ctx) -> list[Backend]:
    """One line of proxy_pass (several lines add up: the loader extends the list)."""
    return parse_backends(args, ctx)


def f_proxy_pass_pool(v: Any) -> list[str]:
    return [] if not v else [" ".join(b.tokens()) for b in v]


def p_health_check(args: list[str], ctx: _Ctx) -> Optional[float]:
    if args == ["off"]:
        return None
    name, eq, val = args[0].partition("=")
    t = parse_time(val) if eq and name == "interval" else None
    if t is None or t < 1:
        raise ctx.bad(args[0], '"off" or interval=TIME (1s or more)')
    return t


def f_health_check(v: Any) -> list[str]:
    return ["off"] if v is None else ["interval=%gs" % v]


def p_proxy_map(args: list[str], ctx: _Ctx) -> Optional[ProxyMap]:
    """Read the map file now (start, -t, reload): errors name the map's file and line."""
    if args == ["off"]:
        return None
    path = ctx.path(args[0])
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeError) as e:
        raise Invalid('cannot read "proxy_map" file "%s": %s'
                      % (path, getattr(e, "strerror", None) or e)) from None
    pm = ProxyMap(path)
    for n, text in enumerate(lines, 1):
        text = text.split("#", 1)[0].strip()
        if not text:
            continue
        line_ctx = _Ctx("proxy_map", path, n, ctx.folder, text)
        try:
            tokens = split_tokens(text)
            if len(tokens) < 2:
                raise Invalid('"%s" needs a backend after it: PATTERN HOST:PORT ...'
                              % tokens[0])
            problem = pm.add(tokens[0], parse_backends(tokens[1:], line_ctx))
            if problem is not None:
                raise Invalid(problem)
        except Invalid as e:
            raise ConfigError("%s in proxy_map" % e, path, n, "proxy_map") from None
    return pm


def f_proxy_map(v: Any) -> list[str]:
    return ["off"] if v is None else [v.path]


def resolve_backends(s: Any, path: str) -> None:
    """The addresses of every backend of server `s`, through its `resolver` (the system's
    when off or system), once at load: a name that does not resolve stops the start."""
    for b in all_backends(s):
        try:
            b.addrs = lookup(b.host, b.port, s.resolver, s.resolver_timeout)
        except (LookupFailed, OSError) as e:
            key = "proxy_map" if b.file != path else "proxy_pass"
            raise ConfigError('host not found in "%s" of the "%s" directive (%s)'
                              % (b.text, key, e), b.file or path, b.line, key) from None


def check_routes(s: Any, path: str) -> Optional[str]:
    """The loader's checks of a server's static route; its directive ("proxy_pass" or
    "proxy_map"), None with auth_http.  proxy_map routes alone: with auth_http or proxy_pass
    in the same server it is an error (which would decide would be a guess)."""
    if s.proxy_map is not None:
        other = ("auth_http" if s.auth_http is not None
                 else "proxy_pass" if s.proxy_pass is not None else None)
        if other is not None:
            raise ConfigError('"proxy_map" and "%s" (set at line %s) cannot both be used in '
                              'server "%s"' % (other, s.where(other)[1], s.name),
                              s.where("proxy_map")[0] or path, s.where("proxy_map")[1],
                              "proxy_map")
    resolve_backends(s, path)
    if s.proxy_pass is not None:
        return "proxy_pass"
    return "proxy_map" if s.proxy_map is not None else None
