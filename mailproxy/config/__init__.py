"""INI configuration with nginx's mail directive names and value syntax.

A package by job: syntax.py (tokens, units), types.py (value objects), parsers.py (each
directive's value parser), dump.py (`-T` formatting), table.py (the directive table),
loader.py (reading the file, inheritance, cross-checks); this module is their interface.

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

from .syntax import (Invalid, split_tokens, quote_token, join_tokens, parse_time, format_time,
    parse_size, format_size)  # noqa: F401
from .types import (IMPLEMENTED_PROTOCOLS, LISTEN_PARAMS_IMPLEMENTED, LEVELS, SYSLOG_FACILITIES,
    PROTOCOL_PORTS, DEFAULT_BACKLOG, LogTarget, Listen, AuthURL, Resolver, MainConf)  # noqa: F401
from .parsers import (Directive)  # noqa: F401
from .table import (DIRECTIVES, MAIN_KEYS, SERVER_KEYS)  # noqa: F401
from .loader import (ServerConf, Config, load)  # noqa: F401
from ..errors import ConfigError  # noqa: F401

__all__ = ["load", "Config", "ConfigError", "MainConf", "ServerConf", "Listen", "AuthURL",
           "LogTarget", "Resolver", "Directive", "DIRECTIVES", "IMPLEMENTED_PROTOCOLS",
           "LISTEN_PARAMS_IMPLEMENTED", "split_tokens", "quote_token", "parse_time",
           "parse_size", "format_time", "format_size"]
