"""INI configuration with nginx's mail directive names and value syntax.

The file has three kinds of sections:

* ``[main]``   process level: pid, daemon, error_log, worker_processes, user,
               worker_shutdown_timeout, worker_connections, limit_prelogin, limit_conn_per_ip.
* ``[mail]``   nginx's ``mail {}`` level: defaults for every server (optional).
* ``[server NAME]`` one per nginx ``server {}`` block.

A value is the directive's arguments in nginx token syntax (``split_tokens``).
A repeatable directive (listen, auth_http_header, ...) is one key with one
continuation line per occurrence.  Every problem raises ``ConfigError`` carrying
the file and line of the offending key or continuation line.

``DIRECTIVES`` is the table of every known directive.  Its ``implemented`` field
is True for all but ``ssl``, whose entry exists only so that its parser can say
that nginx 1.25.1 removed it and what replaces it; the loader refuses a directive
that is not implemented, and ``-T`` leaves it out.
"""

import configparser
import io
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import ConfigError
from .log import addr_text
from .protocols import PORTS, PROTOCOLS

__all__ = ["load", "Config", "ConfigError", "MainConf", "ServerConf", "Listen", "AuthURL",
           "LogTarget", "Resolver", "Directive", "DIRECTIVES", "IMPLEMENTED_PROTOCOLS",
           "LISTEN_PARAMS_IMPLEMENTED", "split_tokens", "quote_token", "parse_time",
           "parse_size", "format_time", "format_size"]

IMPLEMENTED_PROTOCOLS = set(PROTOCOLS)

# `listen` flags accepted (p_listen refuses one set to False as not supported yet); both are.
LISTEN_PARAMS_IMPLEMENTED = {"ssl": True, "proxy_protocol": True}   # implicit TLS, PROXY in

LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")

SYSLOG_FACILITIES = ("kern", "user", "mail", "daemon", "auth", "intern", "lpr", "news", "uucp",
                     "clock", "authpriv", "ftp", "ntp", "audit", "alert", "cron", "local0",
                     "local1", "local2", "local3", "local4", "local5", "local6", "local7")

PROTOCOL_PORTS = PORTS     # listen port -> the protocol it implies (protocols.py)

DEFAULT_BACKLOG = 1024


# ---------------------------------------------------------------------------------------------
# errors

class Invalid(Exception):
    """Raised by value parsers; load() adds file, line and key."""


# ---------------------------------------------------------------------------------------------
# nginx token syntax

_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def split_tokens(text):
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


def quote_token(token):
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


def join_tokens(tokens):
    return " ".join(quote_token(t) for t in tokens)


# ---------------------------------------------------------------------------------------------
# units

_TIME_UNITS = (("y", 365 * 86400), ("M", 30 * 86400), ("w", 7 * 86400), ("d", 86400),
               ("h", 3600), ("m", 60), ("s", 1), ("ms", 0.001))
_TIME_RE = re.compile(r"(\d+)(ms|[yMwdhms])?")
_TIME_HINT = "a time such as 60s, 500ms or 1h30m"


def parse_time(text):
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


def format_time(seconds):
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


def parse_size(text):
    """nginx size (``8k``, ``1m``, ``1g``, bytes) -> int, or None."""
    mo = _SIZE_RE.match(text)
    if not mo:
        return None
    mult = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[mo.group(2).lower()]
    return int(mo.group(1)) * mult


def format_size(n):
    for unit, size in (("g", 1024 ** 3), ("m", 1024 ** 2), ("k", 1024)):
        if n and n % size == 0:
            return "%d%s" % (n // size, unit)
    return str(n)


def _page_size():
    try:
        return str(os.sysconf("SC_PAGESIZE"))
    except (ValueError, OSError, AttributeError):
        return "4096"


# ---------------------------------------------------------------------------------------------
# value objects

@dataclass
class LogTarget:
    kind: str                       # 'file' | 'stderr' | 'syslog'
    path: Optional[str] = None      # absolute, for 'file'
    level: str = "error"
    server: Optional[tuple] = None  # (host, port) for 'syslog'
    facility: str = "local7"
    tag: str = "mailproxy"
    nohostname: bool = False


@dataclass
class Listen:
    host: str                       # '' IPv4 wildcard, '::' IPv6 wildcard, else a literal IP
    port: int
    family: int = socket.AF_INET
    ssl: bool = False
    proxy_protocol: bool = False
    backlog: int = DEFAULT_BACKLOG
    rcvbuf: Optional[int] = None
    sndbuf: Optional[int] = None
    ipv6only: bool = True
    so_keepalive: Any = None        # None | True | False | (idle, intvl, cnt)
    multipath: bool = False
    bind: bool = False
    text: str = ""
    file: Optional[str] = None
    line: Optional[int] = None

    def address_text(self):
        return _addr_text(self.host, self.port)


@dataclass
class AuthURL:
    text: str
    host: str
    port: int = 80
    uri: str = "/"
    unix: Optional[str] = None
    host_header: str = ""
    family: int = socket.AF_INET
    sockaddr: Any = None


@dataclass
class Resolver:
    servers: list                   # [(ip, port)]
    valid: Optional[float] = None
    ipv4: bool = True
    ipv6: bool = True
    status_zone: Optional[str] = None


@dataclass
class MainConf:
    pid: Optional[str] = None
    daemon: bool = False
    error_log: list = field(default_factory=lambda: [LogTarget("stderr")])
    worker_processes: int = 1
    user: Optional[tuple] = None
    worker_shutdown_timeout: Optional[float] = None    # None: no limit, as nginx
    worker_connections: int = 16384
    limit_prelogin: int = 1000
    limit_conn_per_ip: int = 0
    _where: dict = field(default_factory=dict, repr=False, compare=False)

    def where(self, key):
        return self._where.get(key, (None, None))


def _addr_text(host, port):
    return "*:%d" % port if host == "" else addr_text(host, port)


# ---------------------------------------------------------------------------------------------
# the directive table

@dataclass
class Directive:
    name: str
    contexts: frozenset              # of 'main', 'mail', 'server'
    default: Any                     # token text, '' (empty), None (unset) or callable -> text
    parse: Callable                  # (args, ctx) -> value (multi: list of items per occurrence)
    multi: bool = False              # repeatable: one continuation line per occurrence
    implemented: bool = False
    nargs: tuple = (1, 1)            # (min, max or None)
    fmt: Optional[Callable] = None   # value -> list of value lines (dump)


class _Ctx:
    """What a value parser may need: where the value is and the config folder."""

    def __init__(self, key, file, line, folder, text=""):
        self.key, self.file, self.line, self.folder = key, file, line, folder
        self.text = text  # the value line as written

    def bad(self, value, expected):
        return Invalid('invalid value "%s" in "%s": expected %s' % (value, self.key, expected))

    def path(self, p):
        if not p:
            raise Invalid('empty path in "%s"' % self.key)
        return os.path.normpath(os.path.join(self.folder, p))


# -- simple parsers --------------------------------------------------------------------------

def p_time(args, ctx):
    v = parse_time(args[0])
    if v is None:
        raise ctx.bad(args[0], _TIME_HINT)
    return v


def p_size(min_value=0):
    def parse(args, ctx):
        v = parse_size(args[0])
        if v is None:
            raise ctx.bad(args[0], "a size such as 4096, 8k or 1m")
        if v < min_value:
            raise ctx.bad(args[0], "a size of at least %d" % min_value)
        return v
    return parse


def p_flag(args, ctx):
    if args[0] not in ("on", "off"):
        raise ctx.bad(args[0], '"on" or "off"')
    return args[0] == "on"


def p_num(min_value=0):
    def parse(args, ctx):
        if not args[0].isdigit() or int(args[0]) < min_value:
            raise ctx.bad(args[0], "a whole number of at least %d" % min_value)
        return int(args[0])
    return parse


def p_enum(*choices):
    def parse(args, ctx):
        if args[0] not in choices:
            raise ctx.bad(args[0], "one of " + ", ".join(choices))
        return args[0]
    return parse


def p_str(args, ctx):
    if not args[0]:
        raise ctx.bad(args[0], "a non-empty value")
    return args[0]


def p_words(args, ctx):
    return list(args)


def p_methods(*choices):
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


def p_path(args, ctx):
    return ctx.path(args[0])


def p_path_list(prefixes=("data:",)):
    def parse(args, ctx):
        a = args[0]
        if any(a.startswith(p) for p in prefixes):
            return [a]
        return [ctx.path(a)]
    return parse


def p_pairs(args, ctx):
    return [tuple(args)]


_HEADER_NAME = re.compile(r"[A-Za-z0-9-]+\Z")


def p_auth_http_header(args, ctx):
    name, value = args
    if not _HEADER_NAME.match(name):
        raise ctx.bad(name, "a header name of letters, digits and '-'")
    if any(c in value for c in "\r\n\0"):
        raise ctx.bad(value.replace("\r", "\\r").replace("\n", "\\n").replace("\0", "\\0"),
                      "a header value without CR, LF or NUL")
    return [(name, value)]


def p_sni(args, ctx):
    name, cert, key = args
    return [(name.lower(), ctx.path(cert), ctx.path(key))]


def p_ssl_removed(args, ctx):
    raise Invalid('the "ssl" directive was removed in nginx 1.25.1: use "listen ... ssl" '
                  "for implicit TLS, or \"starttls\"")


def p_ssl_protocols(args, ctx):
    allowed = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
    for a in args:
        if a not in allowed:
            raise ctx.bad(a, "protocols among " + " ".join(allowed))
    return list(args)


def p_session_cache(args, ctx):
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
        if a.startswith("shared:"):
            parts = a.split(":")
            if len(parts) != 3 or not parts[1] or parse_size(parts[2]) is None:
                raise ctx.bad(a, "shared:NAME:SIZE")
            continue
        raise ctx.bad(a, "off, none, builtin[:size] or shared:name:size")
    return list(args)


# -- [main] ----------------------------------------------------------------------------------

def p_pid(args, ctx):
    if args[0] == "off":
        return None
    return ctx.path(args[0])


def p_daemon(args, ctx):
    if p_flag(args, ctx):
        raise Invalid('"daemon on" is not supported: mailproxy always runs in the foreground; '
                      "run it under a supervisor such as systemd (see packaging/mailproxy.service)")
    return False


def p_worker_processes(args, ctx):
    if args[0] == "auto":
        return os.cpu_count() or 1
    if not args[0].isdigit() or int(args[0]) < 1:
        raise ctx.bad(args[0], 'a number of at least 1 or "auto"')
    return int(args[0])


def p_user(args, ctx):
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


def p_listen(args, ctx):
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
        if not eq and name in ("ssl", "proxy_protocol"):
            if not LISTEN_PARAMS_IMPLEMENTED[name]:
                raise Invalid('"listen ... %s" is not supported yet' % name)
            opts[name] = True
        elif not eq and name in ("bind", "multipath"):
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


def p_proxy_pass(args, ctx):
    host, port = _split_host_port(args[0], ctx, "proxy_pass")
    if _literal_ip(host) is None:
        if args[0].startswith("[") or not _HOSTNAME.match(host):
            raise ctx.bad(args[0], "HOST:PORT with an IP address, [IPv6] or a host name")
    elif ":" not in host:
        host = _literal_ip(host).compressed
    return (host, port)


def p_auth_http(args, ctx):
    text = args[0]
    if text.lower().startswith("https://"):
        raise Invalid('https is not supported in "auth_http" "%s"' % text)
    if text.startswith("unix:"):
        rest = text[5:]
        path, sep, uri = rest.partition(":")
        if not path:
            raise ctx.bad(text, "unix:/path[:/uri]")
        if sep and not uri.startswith("/"):
            raise ctx.bad(text, "unix:/path[:/uri] with the URI starting with /")
        return AuthURL(text=text, host="localhost", port=80, uri=uri or "/", unix=ctx.path(path),
                       host_header="localhost", family=socket.AF_UNIX, sockaddr=None)
    rest = text[7:] if text.lower().startswith("http://") else text
    if "://" in rest:
        raise ctx.bad(text, "[http://]host[:port][/uri] or unix:/path[:/uri]")
    cut = len(rest)
    for c in "/?":
        i = rest.find(c)
        if 0 <= i < cut:
            cut = i
    hostport, uri = rest[:cut], rest[cut:]
    if uri.startswith("?"):
        uri = "/" + uri
    if not hostport:
        raise ctx.bad(text, "[http://]host[:port][/uri] or unix:/path[:/uri]")
    host, port = _split_host_port(hostport, ctx, "auth_http", need_port=False, default_port=80)
    if _literal_ip(host) is None and not _HOSTNAME.match(host):
        raise ctx.bad(text, "[http://]host[:port][/uri] or unix:/path[:/uri]")
    fam, _ip, sa = _resolve(host, port, ctx, text)[0]
    return AuthURL(text=text, host=host, port=port, uri=uri or "/", unix=None,
                   host_header=host, family=fam, sockaddr=sa)


def p_realip(args, ctx):
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


def p_resolver(args, ctx):
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


def p_error_log(args, ctx):
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


# -- formatting for dump ---------------------------------------------------------------------

def f_time(v):
    return [format_time(v)]


def f_opt_time(v):
    return [] if v is None else [format_time(v)]


def f_size(v):
    return [format_size(v)]


def f_flag(v):
    return ["on" if v else "off"]


def f_token(v):
    return [quote_token(v)]


def f_num(v):
    return [str(v)]


def f_words(v):
    return [join_tokens(v)] if v else []


def f_each_token(v):
    return [quote_token(x) for x in v]


def f_each_tuple(v):
    return [join_tokens(x) for x in v]


def f_listen(v):
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


def f_error_log(v):
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


def f_auth_http(v):
    if v is None:
        return []
    if v.unix is not None:
        return [quote_token("unix:%s:%s" % (v.unix, v.uri))]
    return [quote_token("http://%s%s" % (_addr_text(v.host, v.port), v.uri))]


def f_proxy_pass(v):
    return [] if v is None else [quote_token(_addr_text(*v))]


def f_resolver(v):
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


def f_pid(v):
    return [] if v is None else [quote_token(v)]


def f_user(v):
    return [] if v is None else [join_tokens([x for x in v if x is not None])]


def f_opt_token(v):
    return [] if v is None else [quote_token(v)]


# -- the table -------------------------------------------------------------------------------

_MAIN = frozenset({"main"})
_MS = frozenset({"mail", "server"})
_S = frozenset({"server"})
_ALL = frozenset({"main", "mail", "server"})

_ANY = (1, None)


def _d(name, contexts, default, parse, implemented=False, multi=False, nargs=(1, 1), fmt=None):
    return Directive(name, contexts, default, parse, multi, implemented, nargs, fmt)


_TABLE = [
    # [main]
    _d("pid", _MAIN, None, p_pid, True, fmt=f_pid),
    _d("daemon", _MAIN, "off", p_daemon, True, fmt=f_flag),
    _d("error_log", _ALL, None, p_error_log, True, multi=True, nargs=(1, 2), fmt=f_error_log),
    _d("worker_processes", _MAIN, "1", p_worker_processes, True, fmt=f_num),
    _d("user", _MAIN, None, p_user, True, nargs=(1, 2), fmt=f_user),
    # no default, as nginx: a graceful stop or reload never cuts sessions unless this is set
    _d("worker_shutdown_timeout", _MAIN, None, p_time, True, fmt=f_opt_time),
    # nginx's events { worker_connections }: client and backend sides, each session two
    _d("worker_connections", _MAIN, "16384", p_num(2), True, fmt=f_num),
    # ours: pre-login sessions per worker (each holds a handler thread), sessions per client
    # address (IPv6 per /64; 0 = off)
    _d("limit_prelogin", _MAIN, "1000", p_num(0), True, fmt=f_num),
    _d("limit_conn_per_ip", _MAIN, "0", p_num(0), True, fmt=f_num),
    # ngx_mail_core_module
    _d("listen", _S, "", p_listen, True, multi=True, nargs=_ANY, fmt=f_listen),
    _d("protocol", _S, None, p_enum("pop3", "imap", "smtp"), True, fmt=f_opt_token),
    _d("server_name", _MS, socket.gethostname, p_str, True, fmt=f_token),
    _d("timeout", _MS, "60s", p_time, True, fmt=f_time),
    _d("resolver", _MS, "off", p_resolver, True, nargs=_ANY, fmt=f_resolver),
    _d("resolver_timeout", _MS, "30s", p_time, True, fmt=f_time),
    _d("max_errors", _MS, "5", p_num(0), True, fmt=f_num),
    # ngx_mail_proxy_module
    _d("proxy", _MS, "off", p_flag, True, fmt=f_flag),
    # 64k, not nginx's one page: see README "Differences from nginx" (buffers exist only while
    # data flows, so idle sessions hold none either way)
    _d("proxy_buffer", _MS, "64k", p_size(1), True, fmt=f_size),
    _d("proxy_pass_error_message", _MS, "off", p_flag, True, fmt=f_flag),
    _d("proxy_protocol", _MS, "off", p_enum("off", "on", "v2"), True, fmt=f_token),
    _d("proxy_smtp_auth", _MS, "off", p_flag, True, fmt=f_flag),
    _d("proxy_timeout", _MS, "24h", p_time, True, fmt=f_time),
    _d("xclient", _MS, "on", p_flag, True, fmt=f_flag),
    # ngx_mail_auth_http_module
    _d("auth_http", _MS, None, p_auth_http, True, fmt=f_auth_http),
    _d("auth_http_header", _MS, "", p_auth_http_header, True, multi=True, nargs=(2, 2),
       fmt=f_each_tuple),
    _d("auth_http_pass_client_cert", _MS, "off", p_flag, implemented=True, fmt=f_flag),
    _d("auth_http_timeout", _MS, "60s", p_time, True, fmt=f_time),
    # ngx_mail_ssl_module
    _d("ssl", _MS, None, p_ssl_removed, fmt=f_opt_token),
    _d("starttls", _MS, "off", p_enum("off", "on", "only"), implemented=True, fmt=f_token),
    _d("ssl_certificate", _MS, "", p_path_list(("data:",)), implemented=True,
       multi=True, fmt=f_each_token),
    _d("ssl_certificate_key", _MS, "", p_path_list(("data:", "engine:", "store:")),
       implemented=True, multi=True, fmt=f_each_token),
    _d("ssl_password_file", _MS, None, p_path, implemented=True, fmt=f_opt_token),
    _d("ssl_certificate_compression", _MS, "off", p_flag, implemented=True, fmt=f_flag),
    _d("ssl_ciphers", _MS, "HIGH:!aNULL:!MD5", p_str, implemented=True, fmt=f_token),
    _d("ssl_prefer_server_ciphers", _MS, "off", p_flag, implemented=True, fmt=f_flag),
    _d("ssl_protocols", _MS, "TLSv1.2 TLSv1.3", p_ssl_protocols, implemented=True,
       nargs=_ANY, fmt=f_words),
    _d("ssl_dhparam", _MS, None, p_path, implemented=True, fmt=f_opt_token),
    _d("ssl_ecdh_curve", _MS, "auto", p_str, implemented=True, fmt=f_token),
    _d("ssl_session_cache", _MS, "none", p_session_cache, implemented=True,
       nargs=_ANY, fmt=f_words),
    _d("ssl_session_timeout", _MS, "5m", p_time, implemented=True, fmt=f_time),
    _d("ssl_session_tickets", _MS, "on", p_flag, implemented=True, fmt=f_flag),
    _d("ssl_session_ticket_key", _MS, "", p_path_list(()), implemented=True,
       multi=True, fmt=f_each_token),
    _d("ssl_verify_client", _MS, "off", p_enum("off", "on", "optional", "optional_no_ca"),
       implemented=True, fmt=f_token),
    _d("ssl_verify_depth", _MS, "1", p_num(0), implemented=True, fmt=f_num),
    _d("ssl_client_certificate", _MS, None, p_path, implemented=True, fmt=f_opt_token),
    _d("ssl_trusted_certificate", _MS, None, p_path, implemented=True, fmt=f_opt_token),
    _d("ssl_crl", _MS, None, p_path, implemented=True, fmt=f_opt_token),
    _d("ssl_conf_command", _MS, "", p_pairs, implemented=True,
       multi=True, nargs=(2, 2), fmt=f_each_tuple),
    # ngx_mail_realip_module
    _d("set_real_ip_from", _MS, "", p_realip, implemented=True, multi=True,
       fmt=f_each_token),
    # ngx_mail_imap_module
    _d("imap_auth", _MS, "plain", p_methods("plain", "login", "cram-md5", "external"), True,
       nargs=_ANY, fmt=f_words),
    _d("imap_capabilities", _MS, "IMAP4 IMAP4rev1 UIDPLUS", p_words, True, nargs=_ANY,
       fmt=f_words),
    _d("imap_client_buffer", _MS, _page_size, p_size(1), True, fmt=f_size),
    # ngx_mail_pop3_module
    _d("pop3_auth", _MS, "plain", p_methods("plain", "apop", "cram-md5", "external"), True,
       nargs=_ANY, fmt=f_words),
    _d("pop3_capabilities", _MS, "TOP USER UIDL", p_words, True, nargs=_ANY, fmt=f_words),
    # ngx_mail_smtp_module
    _d("smtp_auth", _MS, "plain login",
       p_methods("plain", "login", "cram-md5", "external", "none"), True,
       nargs=_ANY, fmt=f_words),
    _d("smtp_capabilities", _MS, "", p_words, True, nargs=_ANY, fmt=f_words),
    _d("smtp_client_buffer", _MS, _page_size, p_size(1), True, fmt=f_size),
    _d("smtp_greeting_delay", _MS, "0", p_time, True, fmt=f_time),
    # our additions
    _d("proxy_pass", _S, None, p_proxy_pass, True, fmt=f_proxy_pass),
    _d("imap_client_id", _MS, "off", p_flag, True, fmt=f_flag),
    _d("xclient_extended", _MS, "off", p_flag, True, fmt=f_flag),
    _d("ssl_certificate_sni", _MS, "", p_sni, implemented=True,
       multi=True, nargs=(3, 3), fmt=f_each_tuple),
    # TLS to backends (contexts built at start-up by backend.prepare_client_contexts)
    _d("proxy_ssl", _MS, "off", p_enum("off", "on", "starttls"), True, fmt=f_token),
    _d("proxy_ssl_verify", _MS, "on", p_flag, True, fmt=f_flag),
    _d("proxy_ssl_trusted_certificate", _MS, None, p_path, True, fmt=f_opt_token),
    _d("proxy_ssl_name", _MS, None, p_str, True, fmt=f_opt_token),
    _d("proxy_ssl_certificate", _MS, None, p_path, True, fmt=f_opt_token),
    _d("proxy_ssl_certificate_key", _MS, None, p_path, True, fmt=f_opt_token),
]

DIRECTIVES = {d.name: d for d in _TABLE}

MAIN_KEYS = [d.name for d in _TABLE if "main" in d.contexts]
SERVER_KEYS = [d.name for d in _TABLE if "server" in d.contexts]

# pop3_auth/imap_auth/smtp_auth methods that need Auth-Pass from an auth service
_NEEDS_AUTH_SERVICE = {"apop", "cram-md5", "external"}


def _default_value(d, folder):
    """The parsed default of directive `d`."""
    default = d.default() if callable(d.default) else d.default
    if default is None:
        return None
    ctx = _Ctx(d.name, None, None, folder)
    if d.multi:
        value = []
        for line in default.split("\n"):
            if line.strip():
                value.extend(d.parse(split_tokens(line), ctx))
        return value
    return d.parse(split_tokens(default), ctx)


# ---------------------------------------------------------------------------------------------
# configuration objects

class ServerConf:
    """One [server NAME] section: one attribute per directive, with the effective value."""

    def __init__(self, name, file, line):
        self.name = name
        self.file = file
        self.line = line
        self._where = {}

    def where(self, key):
        """(file, line) where the effective value of `key` was set, or (None, None)."""
        return self._where.get(key, (None, None))

    def values(self):
        """{directive: effective value} for every server-level directive."""
        return {k: getattr(self, k) for k in SERVER_KEYS}

    def __repr__(self):
        return "<ServerConf %r %s:%s>" % (self.name, self.file, self.line)


class Config:
    def __init__(self, path):
        self.path = path
        self.main = MainConf()
        self.servers = []

    def dump(self):
        """The effective configuration as INI text that load() accepts again."""
        out = ["# mailproxy effective configuration of %s" % self.path, "", "[main]"]
        for name in MAIN_KEYS:
            d = DIRECTIVES[name]
            out.extend(_dump_key(name, d.fmt(getattr(self.main, name))))
        out += ["", "[mail]"]
        for s in self.servers:
            out += ["", "[server %s]" % s.name]
            for name in SERVER_KEYS:
                d = DIRECTIVES[name]
                if not d.implemented:
                    continue  # at their default: setting them would fail the start
                out.extend(_dump_key(name, d.fmt(getattr(s, name))))
        return "\n".join(out) + "\n"


def _dump_key(name, lines):
    if not lines:
        return []
    if len(lines) == 1:
        return ["%s = %s" % (name, lines[0])]
    return ["%s =" % name] + ["    " + x for x in lines]


# ---------------------------------------------------------------------------------------------
# reading the INI file

class _Key:
    __slots__ = ("name", "line", "values")

    def __init__(self, name, line):
        self.name = name
        self.line = line
        self.values = []  # [(line, text)] as configparser sees them ('' for blank lines)


class _Section:
    __slots__ = ("header", "line", "keys")

    def __init__(self, header, line):
        self.header = header
        self.line = line
        self.keys = {}


def _make_parser():
    return configparser.RawConfigParser(
        delimiters=("=",), comment_prefixes=("#", ";"), inline_comment_prefixes=None,
        strict=True, empty_lines_in_values=True, interpolation=None,
        default_section="\0no default section\0", allow_no_value=False)


def _scan(text, parser):
    """Section/key/continuation structure with line numbers, following configparser's rules."""
    sections = []
    cur = None
    key = None
    indent_level = 0
    nonspace = re.compile(r"\S")
    for lineno, line in enumerate(io.StringIO(text), start=1):
        value = "" if line.strip().startswith(("#", ";")) else line.strip()
        if not value:
            if key is not None and not line.strip().startswith(("#", ";")):
                key.values.append((lineno, ""))
            continue
        mo = nonspace.search(line)
        cur_indent = mo.start() if mo else 0
        if cur is not None and key is not None and cur_indent > indent_level:
            key.values.append((lineno, value))
            continue
        indent_level = cur_indent
        mo = parser.SECTCRE.match(value)
        if mo:
            cur = _Section(mo.group("header"), lineno)
            sections.append(cur)
            key = None
            continue
        name, _eq, val = value.partition("=")
        key = _Key(name.rstrip(), lineno)
        key.values.append((lineno, val.strip()))
        if cur is not None:
            cur.keys[key.name] = key
    return sections


def _read(path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError('open() "%s" failed (2: No such file or directory)' % path) from None
    except UnicodeDecodeError as e:
        raise ConfigError("the file is not valid UTF-8 (%s)" % e.reason, path) from None
    except OSError as e:
        raise ConfigError('open() "%s" failed (%d: %s)' % (path, e.errno or 0, e.strerror)) \
            from None
    parser = _make_parser()
    parser.optionxform = str
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateSectionError as e:
        raise ConfigError("duplicate section [%s]" % e.section, path, e.lineno) from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError('duplicate key "%s" in [%s]: a repeated directive is one key with one '
                          "indented continuation line per occurrence" % (e.option, e.section),
                          path, e.lineno, e.option) from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError('"%s" is outside any section: expected [main], [mail] or '
                          "[server NAME] first" % e.line.strip(), path, e.lineno) from None
    except configparser.ParsingError as e:
        lineno = e.errors[0][0]
        line = text.splitlines()[lineno - 1].strip()
        raise ConfigError('invalid line "%s": expected KEY = VALUE' % line, path, lineno) \
            from None
    except configparser.Error as e:
        raise ConfigError(str(e).splitlines()[0], path) from None
    sections = _scan(text, parser)
    # cross-check with what configparser read; they must agree
    for sec in sections:
        for key in sec.keys.values():
            joined = "\n".join(t for _l, t in key.values).rstrip()
            try:
                got = parser.get(sec.header, key.name)
            except configparser.Error:
                got = None
            if got != joined:  # pragma: no cover - would be a bug in _scan
                raise ConfigError("internal error reading key %r" % key.name, path, key.line,
                                  key.name)
    return sections


def _occurrences(key):
    """[(line, text)] of the non-empty value lines of `key`."""
    return [(line, t) for line, t in key.values if t]


def _section_label(kind, name):
    return "[server %s]" % name if kind == "server" else "[%s]" % kind


def _allowed_label(contexts):
    labels = [x for c, x in (("main", "[main]"), ("mail", "[mail]"),
                             ("server", "[server NAME]")) if c in contexts]
    return " or ".join(labels)


def _parse_key(key, kind, label, path, folder):
    """Parse one key of a section -> (Directive, value). Raises ConfigError."""
    d = DIRECTIVES.get(key.name)
    if d is None:
        raise ConfigError('unknown directive "%s" in %s' % (key.name, label), path, key.line,
                          key.name)
    if kind not in d.contexts:
        raise ConfigError('"%s" directive is not allowed in %s, only in %s'
                          % (key.name, label, _allowed_label(d.contexts)),
                          path, key.line, key.name)
    occ = _occurrences(key)
    if not occ:
        raise ConfigError('invalid number of arguments in "%s" directive' % key.name,
                          path, key.line, key.name)
    if not d.multi and len(occ) > 1:
        raise ConfigError('"%s" directive is duplicate' % key.name, path, occ[1][0], key.name)
    values = []
    for line, text in occ:
        ctx = _Ctx(key.name, path, line, folder, text)
        try:
            args = split_tokens(text)
            lo, hi = d.nargs
            if len(args) < lo or (hi is not None and len(args) > hi):
                raise Invalid('invalid number of arguments in "%s" directive' % key.name)
            value = d.parse(args, ctx)
        except Invalid as e:
            raise ConfigError(str(e), path, line, key.name) from None
        if d.multi:
            values.extend(value)
        else:
            values = value
    if not d.implemented:
        raise ConfigError('"%s" is not supported yet' % key.name, path, key.line, key.name)
    return d, values


def load(path):
    """Read and check the INI configuration at `path` -> Config. Raises ConfigError."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    sections = _read(path)
    cfg = Config(path)

    main_sec, mail_sec, server_secs = None, None, []
    names = {}
    for sec in sections:
        header = sec.header.strip()
        if header == "main":
            main_sec = sec
        elif header == "mail":
            mail_sec = sec
        elif header.split(None, 1)[:1] == ["server"]:
            parts = header.split(None, 1)
            if len(parts) < 2:
                raise ConfigError("[server] needs a name: expected [server NAME]", path, sec.line)
            name = parts[1].strip()
            if name in names:
                raise ConfigError('duplicate server name "%s" (first at line %d)'
                                  % (name, names[name]), path, sec.line)
            names[name] = sec.line
            server_secs.append((name, sec))
        else:
            raise ConfigError("unknown section [%s]: expected [main], [mail] or [server NAME]"
                              % sec.header, path, sec.line)

    # [main]
    where = {}
    if main_sec is not None:
        for key in main_sec.keys.values():
            d, value = _parse_key(key, "main", "[main]", path, folder)
            setattr(cfg.main, d.name, value)
            where[d.name] = (path, key.line)
    cfg.main._where = where

    # [mail]
    mail_values = {}
    if mail_sec is not None:
        for key in mail_sec.keys.values():
            d, value = _parse_key(key, "mail", "[mail]", path, folder)
            mail_values[d.name] = (value, key.line)

    if not server_secs:
        raise ConfigError("no [server NAME] section is defined", path)

    defaults = {}
    seen_listen = {}
    for name, sec in server_secs:
        label = _section_label("server", name)
        s = ServerConf(name, path, sec.line)
        own = {}
        for key in sec.keys.values():
            d, value = _parse_key(key, "server", label, path, folder)
            own[d.name] = (value, key.line)
        for dname in SERVER_KEYS:
            if dname in own:
                value, line = own[dname]
                s._where[dname] = (path, line)
            elif dname in mail_values:
                value, line = mail_values[dname]
                value = _copy(value)
                s._where[dname] = (path, line)
            else:
                if dname not in defaults:
                    defaults[dname] = _default_value(DIRECTIVES[dname], folder)
                value = _copy(defaults[dname])
            setattr(s, dname, value)
        _check_server(s, own, seen_listen)
        _check_tls(s)                       # ssl checks, TLS context (tls.py)
        cfg.servers.append(s)
    return cfg


def _check_tls(s):
    """nginx's ssl load-time checks (ngx_mail_ssl_merge_conf) and the server's TLS context
    (built once)."""
    from . import tls
    tls.check_server(s)


def _copy(value):
    if isinstance(value, list):
        return list(value)
    return value


def _check_server(s, own, seen_listen):
    path = s.file
    if not s.listen:
        raise ConfigError('no "listen" is defined for server "%s"' % s.name, path, s.line,
                          "listen")
    for li in s.listen:
        k = (li.host, li.port)
        if k in seen_listen:
            raise ConfigError('duplicate "%s" address and port pair' % li.address_text(),
                              path, li.line, "listen")
        seen_listen[k] = li
    if s.protocol is None:
        for li in s.listen:
            if li.port in PROTOCOL_PORTS:
                s.protocol = PROTOCOL_PORTS[li.port]
                s._where["protocol"] = (path, li.line)
                break
        else:
            raise ConfigError('unknown mail protocol for server "%s": set "protocol"' % s.name,
                              path, s.line, "protocol")
        if s.protocol not in IMPLEMENTED_PROTOCOLS:
            raise ConfigError('protocol "%s" is not supported yet (guessed from the port of '
                              '"listen %s"; set "protocol" to pop3 for a POP3 server)'
                              % (s.protocol, s.listen[0].text),
                              path, s.where("protocol")[1], "protocol")
    elif s.protocol not in IMPLEMENTED_PROTOCOLS:
        raise ConfigError('protocol "%s" is not supported yet' % s.protocol, path,
                          s.where("protocol")[1], "protocol")
    if s.auth_http is None and s.proxy_pass is None:
        raise ConfigError('no "auth_http" or "proxy_pass" is defined for server "%s"' % s.name,
                          path, s.line, "auth_http")
    if s.auth_http is not None and s.proxy_pass is not None:
        af, al = s.where("auth_http")
        raise ConfigError('"proxy_pass" and "auth_http" (set at line %d) cannot both be used in '
                          'server "%s": proxy_pass routes every user to one backend without an '
                          "auth service" % (al, s.name), path, s.where("proxy_pass")[1],
                          "proxy_pass")
    if s.protocol == "smtp" and "none" in (s.smtp_auth or []) and not s.xclient \
            and s.proxy_protocol == "off":
        # Unauthenticated mail: the backend decides whether to relay (the auth service sees
        # only MAIL FROM and the first RCPT TO, proxy_pass nothing), so it must see the real
        # client, never the proxy's trusted address (an open relay).
        raise ConfigError('"smtp_auth none" needs "xclient on" (or "proxy_protocol" to the '
                          "backend): otherwise the backend sees the proxy's address for "
                          "clients nobody authenticated and relays for anyone who reaches the "
                          "proxy; set \"xclient on\" and allow the proxy in the backend's "
                          "XCLIENT hosts (Postfix: smtpd_authorized_xclient_hosts)",
                          path, s.where("xclient")[1] or s.where("smtp_auth")[1] or s.line,
                          "xclient")
    if s.proxy_pass is not None:
        key = "%s_auth" % s.protocol
        methods = getattr(s, key, None) or []
        bad = [m for m in methods if m in _NEEDS_AUTH_SERVICE]
        if bad:
            raise ConfigError('"%s %s" cannot be used with "proxy_pass": %s needs the password '
                              "(Auth-Pass) or certificate check from an auth service; use "
                              '"auth_http" or remove %s' % (key, " ".join(bad), " and ".join(bad),
                                                            " and ".join(bad)),
                              path, s.where(key)[1] or s.where("proxy_pass")[1], key)
        if s.protocol == "smtp" and not s.proxy_smtp_auth:
            # AUTH PLAIN/LOGIN are always accepted; without an auth service only the backend
            # can check the password, so it must get it (else XCLIENT LOGIN= would vouch for
            # an unchecked user).
            raise ConfigError('"proxy_pass" in an SMTP server needs "proxy_smtp_auth on": '
                              "without an auth service the backend must check the password",
                              path, s.where("proxy_pass")[1], "proxy_pass")
