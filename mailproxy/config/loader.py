"""Reading the INI file: sections, keys and continuation lines with their file:line,
inheritance from [mail], defaults, and the cross-checks of a server.
"""

import configparser
import dataclasses
import io
import os
import re
import socket
from typing import Any, Optional

from ..errors import ConfigError
from .syntax import Invalid, split_tokens
from .types import Listen, MainConf, PROTOCOL_PORTS, ServerConf
from .parsers import _Ctx
from .pool_parsers import check_routes
from .table import DIRECTIVES, MAIN_KEYS, SERVER_KEYS, _NEEDS_AUTH_SERVICE, _default_value


# configuration objects

class Config:
    """The whole file: `path` (absolute), `main` ([main]) and `servers` (one per [server NAME],
    in file order)."""

    def __init__(self, path: str):
        self.path = path
        self.main = MainConf()
        self.servers: list[ServerConf] = []

    def dump(self) -> str:
        """The effective configuration as INI text that load() accepts again."""
        out = ["# mailproxy effective configuration of %s" % self.path, "", "[main]"]
        for name in MAIN_KEYS:
            d = DIRECTIVES[name]
            out.extend(_dump_key(name, d.fmt(getattr(self.main, name))))
        out += ["", "[mail]"]
        for s in self.servers:
            out += ["", "[server %s]" % s.name]
            for name in SERVER_KEYS:
                out.extend(_dump_key(name, DIRECTIVES[name].fmt(getattr(s, name))))
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
    return d, values


def load(path: str) -> Config:
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
        own = {}
        for key in sec.keys.values():
            d, value = _parse_key(key, "server", label, path, folder)
            own[d.name] = (value, key.line)
        values, where = {}, {}
        for dname in SERVER_KEYS:
            if dname in own:
                value, line = own[dname]
                where[dname] = (path, line)
            elif dname in mail_values:
                value, line = mail_values[dname]
                value = _copy(value)
                where[dname] = (path, line)
            else:
                if dname not in defaults:
                    defaults[dname] = _default_value(DIRECTIVES[dname], folder)
                value = _copy(defaults[dname])
            values[dname] = value
        s = ServerConf(name=name, file=path, line=sec.line, _where=where, **values)
        _check_server(s, own, seen_listen)
        _check_tls(s)                       # ssl values (contexts: tls_contexts.py)
        cfg.servers.append(s)
    return cfg


def server_defaults(protocol: str, name: Optional[str] = None, **overrides: Any) -> ServerConf:
    """A ServerConf with every directive at the table's default, `protocol` set and
    `overrides` applied (for tests and tools; not checked as load() checks a server).
    An unknown directive in `overrides` raises TypeError."""
    folder = os.getcwd()
    values = {d: _default_value(DIRECTIVES[d], folder) for d in SERVER_KEYS}
    values["protocol"] = protocol
    values.update(overrides)
    return ServerConf(name=protocol if name is None else name, file=None, line=None, **values)


def listen_defaults(host: str, port: int, **overrides: Any) -> Listen:
    """A Listen as the parser makes of `listen = HOST:PORT` without parameters (a literal IP,
    '' or '*' for the IPv4 wildcard; the family follows the address), `overrides` applied
    (for tests and tools; an unknown parameter raises TypeError)."""
    if host in ("*", "0.0.0.0"):
        host = ""
    li = Listen(host=host, port=port, family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    return dataclasses.replace(li, **{"text": li.address_text(), **overrides})


def _check_tls(s):
    """nginx's ssl checks while merging (ngx_mail_ssl_merge_conf) and the values Python's ssl
    module cannot honour; values only: the files are read and the contexts built at start and
    on reload (tls_contexts.prepare)."""
    for li in s.listen:
        if li.ssl:
            mode, (f, line), wkey = "listen ... ssl", (li.file, li.line), "listen"
            break
    else:
        if s.starttls == "off":
            return
        mode, (f, line), wkey = "starttls", s.where("starttls"), "starttls"
    f, line = f or s.file, line or s.line
    if not s.ssl_certificate:
        raise ConfigError('no "ssl_certificate" is defined for the "%s" directive' % mode,
                          f, line, wkey)
    if not s.ssl_certificate_key:
        raise ConfigError('no "ssl_certificate_key" is defined for the "%s" directive' % mode,
                          f, line, wkey)
    if len(s.ssl_certificate_key) < len(s.ssl_certificate):
        raise ConfigError('no "ssl_certificate_key" is defined for certificate "%s" and the "%s" '
                          "directive" % (s.ssl_certificate[-1], mode), f, line, wkey)

    def err(key, message):
        kf, kline = s.where(key)
        return ConfigError(message, kf or s.file, kline or s.line, key)

    protos = s.ssl_protocols
    if any(p in ("SSLv2", "SSLv3") for p in protos):
        raise err("ssl_protocols", '"ssl_protocols %s" is not supported: SSLv2 and SSLv3 are '
                  "insecure and the OpenSSL behind Python's ssl module cannot enable them; use "
                  "TLSv1.2 TLSv1.3" % " ".join(protos))
    if s.ssl_certificate_compression:
        raise err("ssl_certificate_compression", '"ssl_certificate_compression on" is not '
                  "supported: Python's ssl module cannot enable TLS certificate compression")
    keys = list(s.ssl_certificate_key[:len(s.ssl_certificate)])
    keys += [key for _name, _cert, key in s.ssl_certificate_sni or ()]
    for key in keys:
        if key.startswith(("engine:", "store:")):
            raise err("ssl_certificate_key", '"ssl_certificate_key %s" is not supported: '
                      "Python's ssl module loads keys from files only" % key)
    if s.ssl_verify_client not in ("off", "optional_no_ca") and not s.ssl_client_certificate \
            and not s.ssl_trusted_certificate:
        raise err("ssl_verify_client",
                  "no ssl_client_certificate or ssl_trusted_certificate for ssl_verify_client")


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
    if s.auth_http is None and s.proxy_pass is None and s.proxy_map is None:
        raise ConfigError('no "auth_http", "proxy_pass" or "proxy_map" is defined for server '
                          '"%s"' % s.name, path, s.line, "auth_http")
    static = check_routes(s, path)          # proxy_map's conflicts, backend names resolved
    if s.auth_http is not None and s.proxy_pass is not None:
        af, al = s.where("auth_http")
        raise ConfigError('"proxy_pass" and "auth_http" (set at line %d) cannot both be used in '
                          'server "%s": proxy_pass routes every user to one backend without an '
                          "auth service" % (al, s.name), path, s.where("proxy_pass")[1],
                          "proxy_pass")
    if s.protocol == "smtp" and "none" in s.smtp_auth and not s.xclient \
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
    if static is not None:
        key = "%s_auth" % s.protocol
        methods = getattr(s, key)
        bad = [m for m in methods if m in _NEEDS_AUTH_SERVICE]
        if bad:
            raise ConfigError('"%s %s" cannot be used with "%s": %s needs the password '
                              "(Auth-Pass) or certificate check from an auth service; use "
                              '"auth_http" or remove %s' % (key, " ".join(bad), static,
                                                            " and ".join(bad), " and ".join(bad)),
                              path, s.where(key)[1] or s.where(static)[1], key)
        if s.protocol == "smtp" and not s.proxy_smtp_auth:
            # AUTH PLAIN/LOGIN are always accepted; without an auth service only the backend
            # can check the password, so it must get it (else XCLIENT LOGIN= would vouch for
            # an unchecked user).
            raise ConfigError('"%s" in an SMTP server needs "proxy_smtp_auth on": '
                              "without an auth service the backend must check the password"
                              % static, path, s.where(static)[1], static)
