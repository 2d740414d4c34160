"""The value parser of each directive: nginx token arguments -> the typed value.
"""

import ipaddress
import mmap
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Optional, Union

from ..affinity import CpuAffinity, parse_mask
from .syntax import Invalid, _TIME_HINT, parse_size, parse_time
from .types import (AuthURL, DEFAULT_BACKLOG, LEVELS, Listen, LogTarget,
                    Resolver, SYSLOG_FACILITIES)


# the directive table

@dataclass
class Directive:
    name: str
    contexts: frozenset              # of 'main', 'mail', 'server'
    default: Any                     # token text, '' (empty), None (unset) or callable -> text
    parse: "Parser"                  # (args, ctx) -> value (multi: list of items per occurrence)
    multi: bool = False              # repeatable: one continuation line per occurrence
    nargs: tuple = (1, 1)            # (min, max or None)
    fmt: Optional[Callable[[Any], list[str]]] = None   # value -> its value lines (dump)


class _Ctx:
    """What a value parser may need: where the value is and the config folder."""

    def __init__(self, key: str, file: Optional[str], line: Optional[int], folder: str,
                 text: str = ""):
        self.key, self.file, self.line, self.folder = key, file, line, folder
        self.text = text  # the value line as written

    def bad(self, value: str, expected: str) -> Invalid:
        return Invalid('invalid value "%s" in "%s": expected %s' % (value, self.key, expected))

    def path(self, p: str) -> str:
        if not p:
            raise Invalid('empty path in "%s"' % self.key)
        return os.path.normpath(os.path.join(self.folder, p))


# a directive's value parser: (its arguments, where they are) -> the typed value
Parser = Callable[[list[str], _Ctx], Any]


# -- simple parsers --------------------------------------------------------------------------

def p_time(args: list[str], ctx: _Ctx) -> float:
    v = parse_time(args[0])
    if v is None:
        raise ctx.bad(args[0], _TIME_HINT)
    return v


def p_size(min_value: int = 0) -> Parser:
    def parse(args, ctx):
        v = parse_size(args[0])
        if v is None:
            raise ctx.bad(args[0], "a size such as 4096, 8k or 1m")
        if v < min_value:
            raise ctx.bad(args[0], "a size of at least %d" % min_value)
        return v
    return parse


def p_flag(args: list[str], ctx: _Ctx) -> bool:
    if args[0] not in ("on", "off"):
        raise ctx.bad(args[0], '"on" or "off"')
    return args[0] == "on"


def p_num(min_value: int = 0) -> Parser:
    def parse(args, ctx):
        if not args[0].isdigit() or int(args[0]) < min_value:
            raise ctx.bad(args[0], "a whole number of at least %d" % min_value)
        return int(args[0])
    return parse


def p_enum(*choices: str) -> Parser:
    def parse(args, ctx):
        if args[0] not in choices:
            raise ctx.bad(args[0], "one of " + ", ".join(choices))
        return args[0]
    return parse


def p_str(args: list[str], ctx: _Ctx) -> str:
    if not args[0]:
        raise ctx.bad(args[0], "a non-empty value")
    return args[0]


def p_words(args: list[str], ctx: _Ctx) -> list[str]:
    return list(args)


def p_methods(*choices: str) -> Parser:
    def parse(args, ctx):
        out = []
        for a in args:
            m = a.lower()
            if m not in choices:
                raise ctx.bad(a, "methods among " + ", ".join(choices))
            if m not in out:
                out.append(m)
        return out
    return parse


def p_path(args: list[str], ctx: _Ctx) -> str:
    return ctx.path(args[0])


def p_path_list(prefixes: tuple = ("data:",)) -> Parser:
    def parse(args, ctx):
        a = args[0]
        if any(a.startswith(p) for p in prefixes):
            return [a]
        return [ctx.path(a)]
    return parse


def p_pairs(args: list[str], ctx: _Ctx) -> list[tuple[str, str]]:
    return [tuple(args)]


_HEADER_NAME = re.compile(r"[A-Za-z0-9-]+\Z")


def p_auth_http_header(args: list[str], ctx: _Ctx) -> list[tuple[str, str]]:
    name, value = args
    if not _HEADER_NAME.match(name):
        raise ctx.bad(name, "a header name of letters, digits and '-'")
    if any(c in value for c in "\r\n\0"):
        raise ctx.bad(value.replace("\r", "\\r").replace("\n", "\\n").replace("\0", "\\0"),
                      "a header value without CR, LF or NUL")
    return [(name, value)]


def p_sni(args: list[str], ctx: _Ctx) -> list[tuple[str, str, str]]:
    name, cert, key = args
    return [(name.lower(), ctx.path(cert), ctx.path(key))]


def p_ssl_removed(args: list[str], ctx: _Ctx) -> NoReturn:
    raise Invalid('the "ssl" directive was removed in nginx 1.25.1: use "listen ... ssl" '
                  "for implicit TLS, or \"starttls\"")


def p_ssl_protocols(args: list[str], ctx: _Ctx) -> list[str]:
    allowed = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
    for a in args:
        if a not in allowed:
            raise ctx.bad(a, "protocols among " + " ".join(allowed))
    return list(args)


def p_session_cache(args: list[str], ctx: _Ctx) -> list[str]:
    for a in args:
        if a in ("off", "none"):
            if len(args) != 1:
                raise ctx.bad(a, '"off" or "none" alone')
            continue
        if a == "builtin":
            continue
        if a.startswith("builtin:"):
            if not a[8:].isdigit():
                raise ctx.bad(a, "builtin:NUMBER")
            continue
        if a.startswith("shared:"):        # ngx_mail_ssl_session_cache's checks and messages
            parts = a.split(":")
            if len(parts) != 3 or not parts[1] or parse_size(parts[2]) is None:
                raise Invalid('invalid session cache "%s"' % a)
            if parse_size(parts[2]) < 8 * mmap.PAGESIZE:
                raise Invalid('session cache "%s" is too small' % a)
            continue
        raise ctx.bad(a, "off, none, builtin[:size] or shared:name:size")
    return list(args)


# -- [main] ----------------------------------------------------------------------------------

def p_pid(args: list[str], ctx: _Ctx) -> Optional[str]:
    if args[0] == "off":
        return None
    return ctx.path(args[0])


def p_control_socket(args: list[str], ctx: _Ctx) -> Optional[str]:
    path = p_pid(args, ctx)
    if path is not None and len(os.fsencode(path)) > 107:     # sun_path holds 108 bytes
        raise Invalid('path "%s" in "%s" is too long for a Unix socket (at most 107 bytes)'
                      % (path, ctx.key))
    return path


def p_daemon(args: list[str], ctx: _Ctx) -> bool:
    if p_flag(args, ctx):
        raise Invalid('"daemon on" is not supported: mailproxy always runs in the foreground; '
                      "run it under a supervisor such as systemd (see packaging/mailproxy.service)")
    return False


def p_worker_processes(args: list[str], ctx: _Ctx) -> int:
    if args[0] == "auto":
        return os.cpu_count() or 1
    if not args[0].isdigit() or int(args[0]) < 1:
        raise ctx.bad(args[0], 'a number of at least 1 or "auto"')
    return int(args[0])


def p_cpu_affinity(args: list[str], ctx: _Ctx) -> Optional[CpuAffinity]:
    """nginx's ngx_set_cpu_affinity: `auto [MASK]`, or binary masks, one per worker."""
    if args == ["off"]:
        return None     # ours: the default, written out (nginx has no way to say it)
    auto = args[0] == "auto"
    if auto and len(args) > 2:
        raise Invalid('invalid number of arguments in "%s" directive' % ctx.key)
    masks = []
    for a in args[1:] if auto else args:
        if len(a) > 1024:
            raise Invalid('"%s" supports up to 1024 CPUs only' % ctx.key)
        try:
            mask = parse_mask(a)
        except ValueError as e:
            raise Invalid('%s in "%s"' % (e, ctx.key)) from None
        if not mask:
            raise ctx.bad(a, "a mask with at least one 1")
        masks.append(mask)
    return CpuAffinity(auto, tuple(masks))


def p_user(args: list[str], ctx: _Ctx) -> tuple[str, Optional[str]]:
    for a in args:
        if not a:
            raise ctx.bad(a, "a user name and an optional group name")
    return (args[0], args[1] if len(args) > 1 else None)


# -- addresses -------------------------------------------------------------------------------

def _split_host_port(text, ctx, what, need_port=True, default_port=None):
    """'host:port', '[v6]:port', 'host' -> (host, port or default). Raises Invalid."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise Invalid('invalid address "%s" in "%s"' % (text, ctx.key))
        host, rest = text[1:end], text[end + 1:]
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise Invalid('invalid IPv6 address "%s" in "%s"' % (text, ctx.key)) from None
        if rest and not rest.startswith(":"):
            raise Invalid('invalid address "%s" in "%s"' % (text, ctx.key))
        port = rest[1:] if rest else None
    else:
        if text.count(":") > 1:
            raise Invalid('invalid address "%s" in "%s": write IPv6 addresses in brackets, '
                          'e.g. [::1]:%s' % (text, ctx.key, "PORT"))
        host, sep, port = text.partition(":")
        if not sep:
            port = None
    if port is None:
        if need_port:
            raise Invalid('no port in "%s" of the "%s" directive' % (text, ctx.key))
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise Invalid('invalid port in "%s" of the "%s" directive' % (text, ctx.key))
    if not host:
        raise Invalid('no host in "%s" of the "%s" directive' % (text, ctx.key))
    return host, int(port)


_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?\Z")


def _literal_ip(host):
    try:
        return ipaddress.ip_address(host.split("%")[0] if ":" in host else host)
    except ValueError:
        return None


def _resolve(host, port, ctx, what):
    """getaddrinfo for TCP -> [(family, ip)] unique in order. Raises Invalid."""
    if _literal_ip(host) is None and not _HOSTNAME.match(host):
        raise Invalid('invalid host "%s" in "%s"' % (host, ctx.key))
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise Invalid('host not found in "%s" of the "%s" directive (%s)'
                      % (what, ctx.key, getattr(e, "strerror", None) or e)) from None
    out = []
    for fam, _type, _proto, _canon, sa in infos:
        if fam not in (socket.AF_INET, socket.AF_INET6):
            continue
        item = (fam, sa[0], sa)
        if all(x[:2] != item[:2] for x in out):
            out.append(item)
    if not out:
        raise Invalid('host not found in "%s" of the "%s" directive' % (what, ctx.key))
    return out


def p_listen(args: list[str], ctx: _Ctx) -> list[Listen]:
    addr = args[0]
    if addr.startswith("unix:"):
        raise Invalid("unix: listen sockets are not supported")
    if addr.isdigit():
        host, port = "*", addr
        if not 0 < int(port) < 65536:
            raise Invalid('invalid port in "%s" of the "listen" directive' % addr)
        port = int(port)
    else:
        host, port = _split_host_port(addr, ctx, "listen")
    if host == "*":
        addrs = [(socket.AF_INET, "")]
    else:
        ip = _literal_ip(host)
        if ip is not None:
            fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            addrs = [(fam, host if "%" in host else ip.compressed)]
        elif addr.startswith("["):
            raise Invalid('invalid address "%s" in "listen"' % addr)
        else:
            addrs = [(fam, ip) for fam, ip, _sa in _resolve(host, port, ctx, addr)]
    addrs = [(fam, "" if ip == "0.0.0.0" else ip) for fam, ip in addrs]

    opts = dict(ssl=False, proxy_protocol=False, backlog=DEFAULT_BACKLOG, rcvbuf=None,
                sndbuf=None, ipv6only=True, so_keepalive=None, multipath=False, bind=False)
    for a in args[1:]:
        name, eq, val = a.partition("=")
        if not eq and name in ("ssl", "proxy_protocol", "bind", "multipath"):
            opts[name] = True
        elif eq and name == "backlog":
            if not val.isdigit() or int(val) < 1:
                raise Invalid('invalid backlog "%s" in "listen": expected a number of at least 1'
                              % val)
            opts["backlog"] = int(val)
        elif eq and name in ("rcvbuf", "sndbuf"):
            size = parse_size(val)
            if size is None or size < 1:
                raise Invalid('invalid %s "%s" in "listen": expected a size such as 64k'
                              % (name, val))
            opts[name] = size
        elif eq and name == "ipv6only":
            if val not in ("on", "off"):
                raise Invalid('invalid ipv6only "%s" in "listen": expected "on" or "off"' % val)
            opts["ipv6only"] = val == "on"
        elif eq and name == "so_keepalive":
            opts["so_keepalive"] = _parse_keepalive(val)
        else:
            raise Invalid('invalid parameter "%s" in "listen": expected ssl, proxy_protocol, '
                          "backlog=N, rcvbuf=size, sndbuf=size, ipv6only=on|off, "
                          "so_keepalive=on|off|[idle]:[intvl]:[cnt], bind or multipath" % a)
    text = ctx.text or " ".join(args)
    return [Listen(host=ip, port=port, family=fam, text=text, file=ctx.file, line=ctx.line,
                   **opts) for fam, ip in addrs]


def _parse_keepalive(val):
    if val == "on":
        return True
    if val == "off":
        return False
    parts = val.split(":")
    hint = 'invalid so_keepalive "%s" in "listen": expected on, off or [idle]:[intvl]:[cnt]' % val
    if len(parts) != 3 or not any(parts):
        raise Invalid(hint)
    out = []
    for i, part in enumerate(parts):
        if not part:
            out.append(None)
        elif i < 2:
            t = parse_time(part)
            if t is None or t < 1:
                raise Invalid(hint)
            out.append(t)
        else:
            if not part.isdigit() or int(part) < 1:
                raise Invalid(hint)
            out.append(int(part))
    return tuple(out)


def p_metrics_listen(args: list[str], ctx: _Ctx) -> Optional[tuple[str, int]]:
    """`off` or ADDR:PORT with an IP address (the one address the metrics are served on)."""
    if args[0] == "off":
        return None
    host, port = _split_host_port(args[0], ctx, "metrics_listen")
    ip = _literal_ip(host)
    if ip is None or "%" in host:
        raise ctx.bad(args[0], '"off" or ADDRESS:PORT with an IP address, e.g. 127.0.0.1:9143')
    return (ip.compressed, port)


def p_auth_http(args: list[str], ctx: _Ctx) -> list[AuthURL]:
    """One auth URL per line (ours: several lines are tried in order, auth_client.py):
    [http://]host[:port][/uri], https://host[:port][/uri] or unix:/path[:/uri]."""
    text = args[0]
    tls = text.lower().startswith("https://")
    if text.startswith("unix:"):
        rest = text[5:]
        path, sep, uri = rest.partition(":")
        if not path:
            raise ctx.bad(text, "unix:/path[:/uri]")
        if sep and not uri.startswith("/"):
            raise ctx.bad(text, "unix:/path[:/uri] with the URI starting with /")
        return [AuthURL(text=text, host="localhost", port=80, uri=uri or "/", unix=ctx.path(path),
                        host_header="localhost", family=socket.AF_UNIX, sockaddr=None)]
    expected = "[http://]host[:port][/uri], https://host[:port][/uri] or unix:/path[:/uri]"
    rest = text[8:] if tls else text[7:] if text.lower().startswith("http://") else text
    if "://" in rest:
        raise ctx.bad(text, expected)
    cut = len(rest)
    for c in "/?":
        i = rest.find(c)
        if 0 <= i < cut:
            cut = i
    hostport, uri = rest[:cut], rest[cut:]
    if uri.startswith("?"):
        uri = "/" + uri
    if not hostport:
        raise ctx.bad(text, expected)
    host, port = _split_host_port(hostport, ctx, "auth_http", need_port=False,
                                  default_port=443 if tls else 80)
    if _literal_ip(host) is None and not _HOSTNAME.match(host):
        raise ctx.bad(text, expected)
    fam, _ip, sa = _resolve(host, port, ctx, text)[0]
    return [AuthURL(text=text, host=host, port=port, uri=uri or "/", unix=None,
                    host_header=host, family=fam, sockaddr=sa, tls=tls)]


def p_realip(args: list[str], ctx: _Ctx) -> list[str]:
    a = args[0]
    if a == "unix:":
        return ["unix:"]
    try:
        if "/" in a:
            return [str(ipaddress.ip_network(a, strict=False))]
        return [ipaddress.ip_address(a).compressed]
    except ValueError:
        pass
    if "/" in a or ":" in a or not _HOSTNAME.match(a):
        raise ctx.bad(a, "an address, a CIDR block, a host name or unix:")
    return [ip for _fam, ip, _sa in _resolve(a, None, ctx, a)]


def p_resolver(args: list[str], ctx: _Ctx) -> Union[None, str, Resolver]:
    if args == ["off"]:
        return None
    if args == ["system"]:
        return "system"
    servers, opts = [], {"valid": None, "ipv4": True, "ipv6": True, "status_zone": None}
    for a in args:
        name, eq, val = a.partition("=")
        if eq and name == "valid":
            t = parse_time(val)
            if t is None:
                raise ctx.bad(a, "valid=" + "TIME")
            opts["valid"] = t
        elif eq and name in ("ipv4", "ipv6"):
            if val not in ("on", "off"):
                raise ctx.bad(a, "%s=on or %s=off" % (name, name))
            opts[name] = val == "on"
        elif eq and name == "status_zone":
            if not val:
                raise ctx.bad(a, "status_zone=NAME")
            opts["status_zone"] = val
        elif a in ("off", "system"):
            raise ctx.bad(a, '"%s" alone' % a)
        else:
            ip = _literal_ip(a)
            if ip is not None and ip.version == 6:
                host, port = ip.compressed, 53
            else:
                host, port = _split_host_port(a, ctx, "resolver", need_port=False, default_port=53)
            lit = _literal_ip(host)
            if lit is not None:
                servers.append((lit.compressed, port))
            else:
                for _fam, ip2, _sa in _resolve(host, port, ctx, a):
                    if (ip2, port) not in servers:
                        servers.append((ip2, port))
    if not servers:
        raise Invalid('no name servers in "resolver": expected off, system or ADDRESS[:PORT] ...')
    if not opts["ipv4"] and not opts["ipv6"]:
        raise Invalid('"ipv4" and "ipv6" cannot both be "off" in "resolver"')
    return Resolver(servers=servers, **opts)


def p_error_log(args: list[str], ctx: _Ctx) -> list[LogTarget]:
    target = args[0]
    level = "error"
    if len(args) > 1:
        if args[1] not in LEVELS:
            raise ctx.bad(args[1], "a level among " + ", ".join(LEVELS))
        level = args[1]
    if target == "stderr":
        return [LogTarget("stderr", level=level)]
    if target.startswith("syslog:"):
        t = LogTarget("syslog", level=level)
        server = None
        for part in target[7:].split(","):
            name, eq, val = part.partition("=")
            if eq and name == "server":
                if val.startswith("unix:"):
                    raise Invalid("unix: syslog servers are not supported (UDP only) in "
                                  '"error_log"')
                ip = _literal_ip(val)
                if ip is not None and ip.version == 6:
                    server = (ip.compressed, 514)
                else:
                    host, port = _split_host_port(val, ctx, "error_log", need_port=False,
                                                  default_port=514)
                    if _literal_ip(host) is None and not _HOSTNAME.match(host):
                        raise ctx.bad(val, "syslog:server=ADDRESS[:PORT]")
                    server = (host, port)
            elif eq and name == "facility":
                if val not in SYSLOG_FACILITIES:
                    raise ctx.bad(val, "a syslog facility among " + ", ".join(SYSLOG_FACILITIES))
                t.facility = val
            elif eq and name == "tag":
                if not re.match(r"[A-Za-z0-9_]{1,32}\Z", val):
                    raise ctx.bad(val, "a syslog tag of up to 32 letters, digits and _")
                t.tag = val
            elif not eq and name == "nohostname":
                t.nohostname = True
            else:
                raise ctx.bad(part, "syslog parameters server=, facility=, tag= and nohostname")
        if server is None:
            raise Invalid('no "server" in "%s" of "error_log": expected '
                          "syslog:server=ADDRESS[:PORT]" % target)
        t.server = server
        return [t]
    if target.startswith("memory:"):
        raise Invalid('"error_log memory:" is not supported')
    return [LogTarget("file", path=ctx.path(target), level=level)]
