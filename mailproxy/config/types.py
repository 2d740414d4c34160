"""What a configuration holds: the value objects and the sets of allowed values.
"""

import socket
from dataclasses import dataclass, field
from typing import Any, Optional

from ..log import addr_text
from ..protocols import PORTS, PROTOCOLS


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
