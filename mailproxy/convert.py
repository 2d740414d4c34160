"""`mailproxy convert [-p PREFIX] [-o FILE] NGINX.CONF`: an nginx configuration (read by
nginx_syntax.py as nginx reads it) written as mailproxy's INI.

main level -> [main] (events { worker_connections } too), mail {} -> [mail], each server {} ->
[server NAME] in order; every directive the INI has (config.DIRECTIVES) with its arguments in
the INI's token syntax, a repeated one as continuation lines. Relative paths become absolute as
nginx makes them (ngx_conf_full_name): logs and the pid file against the prefix (-p, nginx's
cycle->prefix), certificates, keys and the other ssl files against the folder of the main
configuration file (cycle->conf_prefix). Everything else is listed, with its file:line, as a
comment at the top of the INI and on stderr: nothing is dropped silently.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import List, Optional, Tuple

from .config.syntax import join_tokens
from .config.table import DIRECTIVES, REMOVED
from .nginx_syntax import Directive, NginxSyntaxError, load

USAGE = "usage: mailproxy convert [-p PREFIX] [-o FILE] NGINX.CONF\n"
DEBIAN_PREFIX = "/usr/share/nginx/"     # Debian's nginx -V: --prefix=/usr/share/nginx

# which argument is a path, and against which of nginx's two prefixes
_PREFIX_PATHS = {"pid": 0, "error_log": 0, "access_log": 0, "control_socket": 0}
_CONF_PATHS = {"ssl_certificate": 0, "ssl_certificate_key": 0, "ssl_password_file": 0,
               "ssl_dhparam": 0, "ssl_session_ticket_key": 0, "ssl_client_certificate": 0,
               "ssl_trusted_certificate": 0, "ssl_crl": 0,
               "auth_http_trusted_certificate": 0, "auth_http_certificate": 0,
               "auth_http_certificate_key": 0, "proxy_ssl_trusted_certificate": 0,
               "proxy_ssl_certificate": 0, "proxy_ssl_certificate_key": 0}
_NOT_PATHS = ("data:", "engine:", "store:", "stderr", "syslog:", "memory:", "off")
# ngx_ssl_conf_commands: values of SSL_CONF_TYPE_FILE / _DIR commands against conf_prefix
_CONF_COMMAND_FILES = frozenset({
    "Certificate", "PrivateKey", "ServerInfoFile", "DHParameters", "ChainCAFile", "ChainCAPath",
    "VerifyCAFile", "VerifyCAPath", "RequestCAFile"})
_EVENTS = ("worker_connections",)


class Conversion:
    """The INI's sections in order and the notes on what was not converted."""

    def __init__(self, prefix: str, conf_prefix: str):
        self.prefix, self.conf_prefix = prefix, conf_prefix
        self.main: List[Tuple[str, List[List[str]]]] = []
        self.mail: List[Tuple[str, List[List[str]]]] = []
        self.servers: List[Tuple[str, List[Tuple[str, List[List[str]]]]]] = []
        self.notes: List[str] = []

    def note(self, d: Directive, why: str) -> None:
        what = "%s {...}" % _words(d) if d.block is not None else "%s;" % _words(d)
        self.notes.append("%s: %s (%s)" % (d.where(), what, why))

    def ini(self, source: str) -> str:
        out = ["# converted from %s by mailproxy convert" % source,
               "# (relative paths made absolute: logs and pid against %s, ssl files against %s)"
               % (self.prefix, self.conf_prefix)]
        if self.notes:
            out.append("# not converted:")
            out += ["#   " + _comment(n) for n in self.notes]
        out += ["", "[main]"] + _keys(self.main) + ["", "[mail]"] + _keys(self.mail)
        for name, keys in self.servers:
            out += ["", "[server %s]" % name] + _keys(keys)
        return "\n".join(out) + "\n"


def _words(d: Directive) -> str:
    text = join_tokens([d.name] + d.args)
    return text if len(text) <= 120 else text[:117] + "..."


def _comment(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _keys(keys) -> List[str]:
    out = []
    for name, occurrences in keys:
        lines = [join_tokens(args) for args in occurrences]
        if len(lines) == 1:
            out.append("%s = %s" % (name, lines[0]))
        else:
            out.append("%s =" % name)
            out += ["    " + x for x in lines]
    return out


def _add(keys, name: str, args: List[str]) -> None:
    for key, occurrences in keys:
        if key == name:
            occurrences.append(args)
            return
    keys.append((name, [args]))


def _full(prefix: str, name: str) -> str:
    """ngx_get_full_name: an absolute name as it is, else the prefix before it."""
    if name.startswith("/") or name.startswith(_NOT_PATHS):
        return name
    return os.path.join(prefix, name)


def resolve_paths(name: str, args: List[str], prefix: str, conf_prefix: str) -> List[str]:
    args = list(args)
    if not args:
        return args
    if name in _PREFIX_PATHS:
        args[0] = _full(prefix, args[0])
    elif name in _CONF_PATHS:
        args[0] = _full(conf_prefix, args[0])
    elif name == "ssl_certificate_sni" and len(args) == 3:
        args[1:] = [_full(conf_prefix, a) for a in args[1:]]
    elif name == "ssl_conf_command" and len(args) == 2 and args[0] in _CONF_COMMAND_FILES:
        args[1] = _full(conf_prefix, args[1])
    return args


def _known(name: str, context: str) -> bool:
    d = DIRECTIVES.get(name)
    return d is not None and name not in REMOVED and context in d.contexts


def convert(tree: List[Directive], prefix: str, conf_prefix: str) -> Conversion:
    conv = Conversion(prefix, conf_prefix)
    mail_seen = False
    for d in tree:
        if d.name == "events" and d.block is not None:
            for e in d.block:
                if e.name in _EVENTS and e.block is None:
                    _add(conv.main, e.name, e.args)
                else:
                    conv.note(e, "not in mailproxy")
        elif d.name == "mail" and d.block is not None:
            if mail_seen:
                conv.note(d, 'a second "mail" block, nginx refuses it')
                continue
            mail_seen = True
            _mail(conv, d.block)
        elif d.block is not None:
            conv.note(d, "not a mail block")
        elif _known(d.name, "main") and d.name not in _EVENTS:
            _add(conv.main, d.name, resolve_paths(d.name, d.args, prefix, conf_prefix))
        else:
            conv.note(d, "not in mailproxy")
    if not mail_seen:
        conv.notes.append("no mail {} block: no [server] sections")
    return conv


def _mail(conv: Conversion, block: List[Directive]) -> None:
    names = set()
    for d in block:
        if d.name == "server" and d.block is not None:
            keys: List[Tuple[str, List[List[str]]]] = []
            for s in d.block:
                if s.block is None and _known(s.name, "server"):
                    _add(keys, s.name, resolve_paths(s.name, s.args, conv.prefix,
                                                     conv.conf_prefix))
                else:
                    conv.note(s, _why(s))
            conv.servers.append((_server_name(keys, len(conv.servers) + 1, names), keys))
        elif d.block is None and _known(d.name, "mail"):
            _add(conv.mail, d.name, resolve_paths(d.name, d.args, conv.prefix, conv.conf_prefix))
        else:
            conv.note(d, _why(d))


def _why(d: Directive) -> str:
    if d.name == "ssl":
        return 'removed in nginx 1.25.1: add "ssl" to the listen lines instead'
    if d.name in DIRECTIVES and d.block is None:
        return "not allowed here"
    return "not in mailproxy"


_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


def _server_name(keys, index: int, taken: set) -> str:
    """server_name, else the first listen's port, else serverN; unique, safe in a header."""
    found = dict(keys)
    name = ""
    if "server_name" in found and found["server_name"][0]:
        name = found["server_name"][0][0]
    elif "listen" in found and found["listen"][0]:
        addr = found["listen"][0][0]
        name = addr.rsplit(":", 1)[-1] if not addr.startswith("unix:") else ""
    name = _NAME_OK.sub("-", name).strip("-") or "server%d" % index
    unique, n = name, 2
    while unique in taken:
        unique, n = "%s-%d" % (name, n), n + 1
    taken.add(unique)
    return unique


def compiled_prefix() -> str:
    """nginx's compiled prefix from `nginx -V` when nginx is here, else Debian's."""
    try:
        out = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=5).stderr
    except (OSError, subprocess.SubprocessError):
        return DEBIAN_PREFIX
    m = re.search(r"--prefix=(\S+)", out)
    return m.group(1) if m else DEBIAN_PREFIX


def main(args: List[str]) -> int:
    """The command's words after `convert`; 0, 1 on errors (2 on usage)."""
    prefix = output = source = None
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a in ("-p", "-o"):
            if i >= len(args):
                sys.stderr.write('mailproxy: option "%s" requires a parameter\n%s' % (a, USAGE))
                return 2
            if a == "-p":
                prefix = args[i]
            else:
                output = args[i]
            i += 1
        elif a in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        elif a.startswith("-") and a != "-":
            sys.stderr.write('mailproxy: invalid option for "convert": "%s"\n%s' % (a, USAGE))
            return 2
        elif source is None:
            source = a
        else:
            sys.stderr.write("mailproxy: convert takes one nginx configuration file\n" + USAGE)
            return 2
    if source is None:
        sys.stderr.write(USAGE)
        return 2
    source = os.path.abspath(source)
    prefix = os.path.abspath(prefix or compiled_prefix())
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    conf_prefix = os.path.dirname(source) + "/"
    try:
        tree = load(source)
    except NginxSyntaxError as e:
        sys.stderr.write("mailproxy: [emerg] %s\n" % e)
        return 1
    conv = convert(tree, prefix, conf_prefix)
    for n in conv.notes:
        sys.stderr.write("mailproxy: [warn] not converted: %s\n" % _comment(n))
    text = conv.ini(source)
    if output is None or output == "-":
        sys.stdout.write(text)
        return 0
    try:
        with open(output, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
    except OSError as e:
        sys.stderr.write('mailproxy: [emerg] open() "%s" failed (%d: %s)\n'
                         % (output, e.errno or 0, e.strerror))
        return 1
    return 0
