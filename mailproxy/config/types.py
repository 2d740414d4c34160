"""What a configuration holds: the value objects and the sets of allowed values.
"""

import socket
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from ..affinity import CpuAffinity
from ..log import addr_text
from ..protocols import PORTS
from ..proxy_map import ProxyMap
from ..upstreams import Backend


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
    server: Optional[tuple[str, int]] = None    # (host, port) for 'syslog'
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
    so_keepalive: Union[None, bool, tuple] = None   # or (idle s, intvl s, cnt), any None
    multipath: bool = False
    bind: bool = False
    text: str = ""
    file: Optional[str] = None
    line: Optional[int] = None

    def address_text(self) -> str:
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
    tls: bool = False               # https://


@dataclass
class Resolver:
    servers: list[tuple[str, int]]
    valid: Optional[float] = None
    ipv4: bool = True
    ipv6: bool = True
    status_zone: Optional[str] = None


@dataclass
class MainConf:
    pid: Optional[str] = None
    daemon: bool = False
    error_log: list[LogTarget] = field(default_factory=lambda: [LogTarget("stderr")])
    worker_processes: int = 1
    worker_cpu_affinity: Optional[CpuAffinity] = None     # None: no binding, as nginx
    user: Optional[tuple[str, Optional[str]]] = None     # (user, group)
    worker_shutdown_timeout: Optional[float] = None    # None: no limit, as nginx
    worker_connections: int = 16384
    limit_prelogin: int = 1000
    limit_conn_per_ip: int = 0
    metrics_listen: Optional[tuple[str, int]] = None     # (IP, port)
    control_socket: Optional[str] = None    # the control socket's path (None: off)
    _where: dict = field(default_factory=dict, repr=False, compare=False)

    def where(self, key: str) -> tuple:
        return self._where.get(key, (None, None))


# eq=False: identity, as before (servers are looked up by id() and compared with `is`)
@dataclass(eq=False)
class ServerConf:
    """One [server NAME] section: one field per server-level directive of the table (table.py)
    holding its effective value (own, inherited from [mail], or the table's default).

    The table is the one source of which directives exist, their defaults and parsers; this
    class only names them with their parsed types, in the table's order.  The loader builds it
    with every directive as a keyword, so a directive added to the table without its field here
    (or the reverse) fails every load; tests/test_config.py also checks every default against
    these types.  `config.server_defaults()` builds one at the defaults (for tests).
    """
    name: str
    file: Optional[str]
    line: Optional[int]
    # the directives (table.py's SERVER_KEYS order)
    error_log: Optional[list[LogTarget]]
    access_log: Optional[tuple[str, str]]       # (path, 'text' | 'json'); None: off
    listen: list[Listen]
    protocol: str                               # resolved from the listen port when unset
    server_name: str
    timeout: float
    resolver: Union[None, str, Resolver]        # None (off), "system" or the DNS servers
    resolver_timeout: float
    max_errors: int
    proxy: bool
    proxy_buffer: int
    proxy_pass_error_message: bool
    proxy_protocol: str                         # 'off' | 'on' | 'v2'
    proxy_smtp_auth: bool
    proxy_timeout: float
    xclient: bool
    auth_http: Optional[list[AuthURL]]         # tried in order (auth_client.py)
    auth_http_header: list[tuple[str, str]]
    auth_http_pass_client_cert: bool
    auth_http_timeout: float
    auth_http_keepalive: int                    # idle connections per auth service, 0: off
    auth_http_trusted_certificate: Optional[str]
    auth_http_certificate: Optional[str]
    auth_http_certificate_key: Optional[str]
    auth_http_cache: Optional[tuple[float, float, int]]    # (valid, invalid, size), None: off
    starttls: str                               # 'off' | 'on' | 'only'
    ssl_certificate: list[str]
    ssl_certificate_key: list[str]
    ssl_password_file: Optional[str]
    ssl_certificate_compression: bool
    ssl_ciphers: str
    ssl_prefer_server_ciphers: bool
    ssl_protocols: list[str]
    ssl_dhparam: Optional[str]
    ssl_ecdh_curve: str
    ssl_session_cache: list[str]
    ssl_session_timeout: float
    ssl_session_tickets: bool
    ssl_session_ticket_key: list[str]
    ssl_verify_client: str                      # 'off' | 'on' | 'optional' | 'optional_no_ca'
    ssl_verify_depth: int
    ssl_client_certificate: Optional[str]
    ssl_trusted_certificate: Optional[str]
    ssl_crl: Optional[str]
    ssl_conf_command: list[tuple[str, str]]
    set_real_ip_from: list[str]
    imap_auth: list[str]
    imap_capabilities: list[str]
    imap_client_buffer: int
    pop3_auth: list[str]
    pop3_capabilities: list[str]
    smtp_auth: list[str]
    smtp_capabilities: list[str]
    smtp_client_buffer: int
    smtp_greeting_delay: float
    sieve_auth: list[str]
    sieve_capabilities: list[str]               # `NAME value` each
    sieve_client_buffer: int
    proxy_pass: Optional[list[Backend]]        # one or several (upstreams.py)
    proxy_map: Optional[ProxyMap]
    proxy_health_check: Optional[float]         # interval seconds, None: off
    imap_client_id: bool
    xclient_extended: bool
    ssl_certificate_sni: list[tuple[str, str, str]]
    proxy_ssl: str                              # 'off' | 'on' | 'starttls'
    proxy_ssl_verify: bool
    proxy_ssl_trusted_certificate: Optional[str]
    proxy_ssl_name: Optional[str]
    proxy_ssl_certificate: Optional[str]
    proxy_ssl_certificate_key: Optional[str]
    login_penalty: bool
    login_penalty_max: float
    login_block: Optional[tuple[int, float]]    # (failures, period seconds), None: off
    login_trusted: list[str]                    # networks (ipaddress text)
    limit_sessions_per_user: int                # 0: no limit
    # where each directive was set, and what other modules build once per server and keep here
    _where: dict = field(default_factory=dict)
    _tls: Any = None                    # tls.ServerTLS (tls.check_server)
    _proxy_ssl_context: Any = None      # backend.client_context
    _realip_networks: Any = None        # realip._networks
    _auth_http_tls: Any = None          # auth_pool.client_context (https:// auth URLs)

    def where(self, key: str) -> tuple:
        """(file, line) where the effective value of `key` was set, or (None, None)."""
        return self._where.get(key, (None, None))

    def values(self) -> dict:
        """{directive: effective value} for every server-level directive."""
        return {k: getattr(self, k) for k in DIRECTIVE_FIELDS}

    def __repr__(self):
        return "<ServerConf %r %s:%s>" % (self.name, self.file, self.line)


# ServerConf's directive fields, in order (neither the section's name/file/line nor the caches)
DIRECTIVE_FIELDS = tuple(f.name for f in fields(ServerConf)
                         if f.name not in ("name", "file", "line") and not f.name.startswith("_"))


def _addr_text(host, port):
    return "*:%d" % port if host == "" else addr_text(host, port)
