"""mailproxy's INI -> nginx.conf with the same directives, so that nginx's mail proxy runs side by
side with mailproxy on one configuration (bench/targets.py, tests/integration/realservers.py).

The INI is read by mailproxy.config itself, so each value is parsed once and exactly as mailproxy
reads it, and written back with the directive table's `-T` formatter (nginx token syntax):

  [main]            main level (`daemon` is always off, nginx runs as a child; `worker_connections`
                    goes into events {})
  [mail]            mail {}: a directive that every server takes from the same INI line (with one
                    server the two cannot be told apart: it stays in that server {}, which nginx's
                    ngx_mail_core_merge_srv_conf makes the same)
  [server NAME]     server {  # [server NAME]

Only what the INI sets is written: the rest stays at each program's own default. Directives
nginx lacks (NOT_IN_NGINX) are written as comments. `main` adds or replaces main-level
directives for the run (pid, error_log, worker_processes, worker_rlimit_nofile, ...).
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Mapping, Optional, Union

from mailproxy import config

# ours (README "Directives beyond nginx"), or arguments nginx does not take
NOT_IN_NGINX = frozenset({
    "limit_prelogin", "limit_conn_per_ip", "proxy_pass", "imap_client_id", "xclient_extended",
    "ssl_certificate_sni", "proxy_ssl", "proxy_ssl_verify", "proxy_ssl_trusted_certificate",
    "proxy_ssl_name", "proxy_ssl_certificate", "proxy_ssl_certificate_key",
    "auth_http_keepalive", "auth_http_trusted_certificate", "auth_http_certificate",
    "auth_http_certificate_key", "auth_http_cache"})
# main-level directives that nginx has in events {}
EVENTS = ("worker_connections",)
DEBIAN_MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"


def nginx_mail_module(nginx: str = "nginx") -> Optional[str]:
    """The `load_module` path of ngx_mail_module as Debian installs it (named in
    /etc/nginx/modules-enabled, relative to nginx's prefix); None when nginx has the mail
    module built in (`--with-mail` without `=dynamic`)."""
    prefix = "/usr/share/nginx"
    try:
        out = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10).stderr
    except (OSError, subprocess.SubprocessError):
        out = ""
    m = re.search(r"--prefix=(\S+)", out)
    if m:
        prefix = m.group(1)
    if re.search(r"--with-mail(\s|$)", out):
        return None
    d = "/etc/nginx/modules-enabled"
    try:
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name)) as f:
                m = re.search(r"load_module\s+(\S*ngx_mail_module\.so)\s*;", f.read())
            if m:
                path = m.group(1)
                if not os.path.isabs(path):
                    path = os.path.join(prefix, path)
                return os.path.realpath(path)
    except OSError:
        pass
    return DEBIAN_MAIL_MODULE


def _value_text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _lines(name: str, args: list, indent: str) -> list:
    """`name arg;` per occurrence; a directive nginx lacks as a comment (`resolver system` is
    ours too: nginx's is a DNS client only)."""
    ours = name in NOT_IN_NGINX or (name == "resolver" and args == ["system"])
    mark = "# not in nginx: " if ours else ""
    return ["%s%s%s %s;" % (indent, mark, name, a) for a in args]


def _formatted(name: str, value: object) -> list:
    """The directive's arguments, one string per occurrence, from its parsed value."""
    return config.DIRECTIVES[name].fmt(value)


def _set_here(conf, names) -> list:
    """The directives of `names` the INI sets for `conf`, in the order of their lines."""
    found = [(conf.where(n)[1], n) for n in names if conf.where(n)[1] is not None]
    return [n for _line, n in sorted(found)]


def nginx_conf(ini: Union[str, os.PathLike, config.Config], *, module: Optional[str] = "",
               main: Optional[Mapping[str, object]] = None) -> str:
    """nginx.conf text for the mailproxy INI at `ini` (a path, or a loaded config.Config).

    module: the load_module path; "" (the default) finds it (nginx_mail_module()), None writes
    no load_module. main: {directive: value} for the main level and events {}, over the INI's
    (a value: str, int or bool; a list for one directive per item). Raises ConfigError."""
    cfg = ini if isinstance(ini, config.Config) else config.load(os.fspath(ini))
    if module == "":
        module = nginx_mail_module()
    extra = {k: (v if isinstance(v, (list, tuple)) else [v]) for k, v in (main or {}).items()}
    top, events = [], []
    for name in _set_here(cfg.main, config.MAIN_KEYS):
        if name == "daemon" or name in extra:
            continue
        if name == "worker_cpu_affinity" and cfg.main.worker_cpu_affinity is None:
            continue        # our "off" is nginx's default, which nginx cannot spell
        lines = _lines(name, _formatted(name, getattr(cfg.main, name)), "")
        (events if name in EVENTS else top).extend(lines)
    for name, values in extra.items():
        lines = _lines(name, [_value_text(v) for v in values], "")
        (events if name in EVENTS else top).extend(lines)

    out = ["# generated from %s by bench/nginx_conf.py" % cfg.path]
    if module:
        out.append("load_module %s;" % module)
    out += ["daemon off;", "master_process on;"] + top
    out += ["events {"] + ["    " + x for x in events] + ["}", "mail {"]

    servers = cfg.servers
    shared = set()
    if len(servers) > 1:
        shared = {n for n in config.SERVER_KEYS
                  if "mail" in config.DIRECTIVES[n].contexts
                  and servers[0].where(n)[1] is not None
                  and all(s.where(n) == servers[0].where(n) for s in servers)}
    for name in _set_here(servers[0], shared):
        out += _lines(name, _formatted(name, getattr(servers[0], name)), "    ")
    for s in servers:
        out.append("    server {  # [server %s]" % s.name)
        for name in _set_here(s, [n for n in config.SERVER_KEYS if n not in shared]):
            out += _lines(name, _formatted(name, getattr(s, name)), "        ")
        out.append("    }")
    out.append("}")
    return "\n".join(out) + "\n"
