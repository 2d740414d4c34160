"""INI configuration with nginx's mail directive names and value syntax.

A package by job: syntax.py (tokens, units), types.py (value objects), parsers.py (each
directive's value parser), dump.py (`-T` formatting), table.py (the directive table),
loader.py (reading the file, inheritance, cross-checks); this module is their interface.

The file has three kinds of sections:

* ``[main]``   process level: pid, daemon, error_log, worker_processes, worker_cpu_affinity,
               user, worker_shutdown_timeout, worker_connections, limit_prelogin,
               limit_conn_per_ip, metrics_listen, control_socket.
* ``[mail]``   nginx's ``mail {}`` level: defaults for every server (optional).
* ``[server NAME]`` one per nginx ``server {}`` block.

A value is the directive's arguments in nginx token syntax (``split_tokens``).
A repeatable directive (listen, auth_http_header, ...) is one key with one
continuation line per occurrence.  Every problem raises ``ConfigError`` carrying
the file and line of the offending key or continuation line.

``DIRECTIVES`` is the table of every known directive (table.py): contexts, default, parser
and formatter.  ``ServerConf`` (types.py) is a dataclass with one typed field per server-level
directive of that table, always holding the effective value; ``server_defaults(protocol,
**overrides)`` builds one at the table's defaults, ``listen_defaults(host, port, **overrides)``
a ``Listen`` at the parser's defaults.  ``ssl`` is known only to be refused with
what replaces it (nginx 1.25.1 removed it).
"""

from .syntax import (Invalid, split_tokens, quote_token, join_tokens, parse_time, format_time,
    parse_size, format_size)  # noqa: F401
from .types import (LEVELS, SYSLOG_FACILITIES, PROTOCOL_PORTS, DEFAULT_BACKLOG, LogTarget, Listen,
    AuthURL, Resolver, MainConf, ServerConf, DIRECTIVE_FIELDS)  # noqa: F401
from .parsers import (Directive)  # noqa: F401
from .table import (DIRECTIVES, MAIN_KEYS, SERVER_KEYS, REMOVED)  # noqa: F401
from .loader import (Config, load, server_defaults, listen_defaults)  # noqa: F401
from ..errors import ConfigError  # noqa: F401

__all__ = ["load", "Config", "ConfigError", "MainConf", "ServerConf", "server_defaults",
           "listen_defaults", "Listen",
           "AuthURL", "LogTarget", "Resolver", "Directive", "DIRECTIVES", "split_tokens",
           "quote_token", "parse_time", "parse_size", "format_time", "format_size"]
