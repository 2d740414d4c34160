"""Every TLS context of a configuration, built in one step at start and on reload.

The config loader checks values only; `prepare(cfg)` then reads the certificate, key and CA
files and builds the contexts of every server: the client-facing one (tls.build_server, for
`listen ... ssl` and `starttls`) and the one towards backends (backend.client_context, for
`proxy_ssl` and for an auth service that may ask for it per user with Auth-SSL-Backend).
cli.py (`-t` and start) and the master's reload (supervisor.load_config both times) call it
the same way, as nginx loads the files while it reads the configuration
(ngx_mail_ssl_merge_conf); sessions only use what it built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import auth_pool, backend, tls
from .config.syntax import parse_size
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config

__all__ = ["prepare"]


def prepare(cfg: Config) -> None:
    """Build and keep on each ServerConf its TLS contexts (`_tls`, `_proxy_ssl_context`).

    Raises ConfigError (`MESSAGE in FILE:LINE`, with the directive as `key`) for the first
    file or setting that cannot be used: client-facing contexts first, then backend ones."""
    zones = {}              # ngx_shared_memory_add: one size per zone name
    for conf in cfg.servers:
        for a in conf.ssl_session_cache:
            if a.startswith("shared:"):
                _shared, name, size = a.split(":")
                size = parse_size(size)
                if zones.setdefault(name, size) != size:
                    f, line = conf.where("ssl_session_cache")
                    raise ConfigError('the size %d of shared memory zone "%s" conflicts with '
                                      "already declared size %d" % (size, name, zones[name]),
                                      f or conf.file, line or conf.line, "ssl_session_cache")
    for conf in cfg.servers:
        conf._tls = tls.build_server(conf)
    shared = {}             # servers with the same proxy_ssl_* settings share one context
    for conf in cfg.servers:
        if conf.proxy_ssl == "off" and conf.auth_http is None:
            continue
        try:
            backend.client_context(conf, shared)
        except backend.BackendTLSConfigError as e:
            f, line = conf.where(e.key)
            raise ConfigError(str(e), f or conf.file, line or conf.line, e.key) from None
    shared = {}             # https:// auth URLs (auth_pool.py): one context per settings
    for conf in cfg.servers:
        try:
            auth_pool.client_context(conf, shared)
        except auth_pool.TLSConfigError as e:
            f, line = conf.where(e.key)
            raise ConfigError(str(e), f or conf.file, line or conf.line, e.key) from None
