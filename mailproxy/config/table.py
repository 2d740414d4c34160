"""The directive table: every directive with its contexts, default, parser and formatter.
"""

import socket

from .. import access_log
from .syntax import _page_size, split_tokens
from .parsers import (Directive, _Ctx, p_auth_http, p_auth_http_header, p_control_socket,
                      p_cpu_affinity, p_daemon, p_enum, p_error_log, p_flag, p_listen, p_methods,
                      p_metrics_listen, p_num, p_pairs, p_path, p_path_list, p_pid,
                      p_realip, p_resolver, p_session_cache,
                      p_size, p_sni, p_ssl_protocols, p_ssl_removed, p_str, p_time, p_user,
                      p_words, p_worker_processes)
from .login_parsers import f_login_block, f_login_trusted, p_login_block, p_login_trusted
from .login_parsers import p_penalty_max
from .pool_parsers import (f_health_check, f_proxy_map, f_proxy_pass_pool, p_health_check,
                           p_proxy_map, p_proxy_pass)
from .auth_parsers import f_auth_http_cache, p_auth_http_cache
from .sieve_parsers import p_sieve_capabilities
from .dump import (f_auth_http, f_cpu_affinity, f_each_token, f_each_tuple, f_error_log,
                   f_flag, f_listen, f_num, f_opt_time, f_opt_token, f_pid, f_proxy_pass,
                   f_resolver, f_size, f_time, f_token, f_user, f_words)


# the table

_MAIN = frozenset({"main"})
_MS = frozenset({"mail", "server"})
_S = frozenset({"server"})
_ALL = frozenset({"main", "mail", "server"})

_ANY = (1, None)

SIEVE_CAPABILITIES = ('"IMPLEMENTATION mailproxy" "SIEVE fileinto reject envelope '
                      'encoded-character vacation subaddress comparator-i;ascii-numeric '
                      'relational regex imap4flags copy include variables body enotify '
                      'environment mailbox date index ihave duplicate mime foreverypart '
                      'extracttext" "NOTIFY mailto" "VERSION 1.0"')


def _d(name, contexts, default, parse, multi=False, nargs=(1, 1), fmt=None):
    return Directive(name, contexts, default, parse, multi, nargs, fmt)


_TABLE = [
    # [main]
    _d("pid", _MAIN, None, p_pid, fmt=f_pid),
    _d("daemon", _MAIN, "off", p_daemon, fmt=f_flag),
    _d("error_log", _ALL, None, p_error_log, multi=True, nargs=(1, 2), fmt=f_error_log),
    # ours: one line per session at its end (access_log.py)
    _d("access_log", _MS, "off", access_log.parse, nargs=(1, 2),
       fmt=lambda v: f_words(access_log.tokens(v))),
    _d("worker_processes", _MAIN, "1", p_worker_processes, fmt=f_num),
    _d("worker_cpu_affinity", _MAIN, "off", p_cpu_affinity, nargs=_ANY, fmt=f_cpu_affinity),
    _d("user", _MAIN, None, p_user, nargs=(1, 2), fmt=f_user),
    # no default, as nginx: a graceful stop or reload never cuts sessions unless this is set
    _d("worker_shutdown_timeout", _MAIN, None, p_time, fmt=f_opt_time),
    # nginx's events { worker_connections }: client and backend sides, each session two
    _d("worker_connections", _MAIN, "16384", p_num(2), fmt=f_num),
    # ours: pre-login sessions per worker (each holds a handler thread), sessions per client
    # address (IPv6 per /64; 0 = off)
    _d("limit_prelogin", _MAIN, "1000", p_num(0), fmt=f_num),
    _d("limit_conn_per_ip", _MAIN, "0", p_num(0), fmt=f_num),
    # ours: GET /metrics for Prometheus on this address (metrics_http.py)
    _d("metrics_listen", _MAIN, "off", p_metrics_listen, fmt=f_proxy_pass),
    # ours: the Unix socket of `mailproxy sessions` / `kick` (master_loop.py), off by default
    _d("control_socket", _MAIN, None, p_control_socket, fmt=f_pid),
    # ngx_mail_core_module
    _d("listen", _S, "", p_listen, multi=True, nargs=_ANY, fmt=f_listen),
    _d("protocol", _S, None, p_enum("pop3", "imap", "smtp", "sieve"), fmt=f_opt_token),
    _d("server_name", _MS, socket.gethostname, p_str, fmt=f_token),
    _d("timeout", _MS, "60s", p_time, fmt=f_time),
    _d("resolver", _MS, "off", p_resolver, nargs=_ANY, fmt=f_resolver),
    _d("resolver_timeout", _MS, "30s", p_time, fmt=f_time),
    _d("max_errors", _MS, "5", p_num(0), fmt=f_num),
    # ngx_mail_proxy_module
    _d("proxy", _MS, "off", p_flag, fmt=f_flag),
    # 64k, not nginx's one page: see README "Differences from nginx" (buffers exist only while
    # data flows, so idle sessions hold none either way)
    _d("proxy_buffer", _MS, "64k", p_size(1), fmt=f_size),
    _d("proxy_pass_error_message", _MS, "off", p_flag, fmt=f_flag),
    _d("proxy_protocol", _MS, "off", p_enum("off", "on", "v2"), fmt=f_token),
    _d("proxy_smtp_auth", _MS, "off", p_flag, fmt=f_flag),
    _d("proxy_timeout", _MS, "24h", p_time, fmt=f_time),
    _d("xclient", _MS, "on", p_flag, fmt=f_flag),
    # ngx_mail_auth_http_module
    # several lines (ours): tried in order, one that is down skipped for a while
    _d("auth_http", _MS, None, p_auth_http, multi=True, fmt=f_auth_http),
    _d("auth_http_header", _MS, "", p_auth_http_header, multi=True, nargs=(2, 2),
       fmt=f_each_tuple),
    _d("auth_http_pass_client_cert", _MS, "off", p_flag, fmt=f_flag),
    _d("auth_http_timeout", _MS, "60s", p_time, fmt=f_time),
    # ours (auth_pool.py, auth_cache.py): HTTP/1.1 keep-alive, https, the answer cache
    _d("auth_http_keepalive", _MS, "8", p_num(0), fmt=f_num),
    _d("auth_http_trusted_certificate", _MS, None, p_path, fmt=f_opt_token),
    _d("auth_http_certificate", _MS, None, p_path, fmt=f_opt_token),
    _d("auth_http_certificate_key", _MS, None, p_path, fmt=f_opt_token),
    _d("auth_http_cache", _MS, "off", p_auth_http_cache, nargs=_ANY, fmt=f_auth_http_cache),
    # ngx_mail_ssl_module
    _d("starttls", _MS, "off", p_enum("off", "on", "only"), fmt=f_token),
    _d("ssl_certificate", _MS, "", p_path_list(("data:",)),
       multi=True, fmt=f_each_token),
    _d("ssl_certificate_key", _MS, "", p_path_list(("data:", "engine:", "store:")),
       multi=True, fmt=f_each_token),
    _d("ssl_password_file", _MS, None, p_path, fmt=f_opt_token),
    _d("ssl_certificate_compression", _MS, "off", p_flag, fmt=f_flag),
    _d("ssl_ciphers", _MS, "HIGH:!aNULL:!MD5", p_str, fmt=f_token),
    _d("ssl_prefer_server_ciphers", _MS, "off", p_flag, fmt=f_flag),
    _d("ssl_protocols", _MS, "TLSv1.2 TLSv1.3", p_ssl_protocols,
       nargs=_ANY, fmt=f_words),
    _d("ssl_dhparam", _MS, None, p_path, fmt=f_opt_token),
    _d("ssl_ecdh_curve", _MS, "auto", p_str, fmt=f_token),
    _d("ssl_session_cache", _MS, "none", p_session_cache,
       nargs=_ANY, fmt=f_words),
    _d("ssl_session_timeout", _MS, "5m", p_time, fmt=f_time),
    _d("ssl_session_tickets", _MS, "on", p_flag, fmt=f_flag),
    _d("ssl_session_ticket_key", _MS, "", p_path_list(()),
       multi=True, fmt=f_each_token),
    _d("ssl_verify_client", _MS, "off", p_enum("off", "on", "optional", "optional_no_ca"),
       fmt=f_token),
    _d("ssl_verify_depth", _MS, "1", p_num(0), fmt=f_num),
    _d("ssl_client_certificate", _MS, None, p_path, fmt=f_opt_token),
    _d("ssl_trusted_certificate", _MS, None, p_path, fmt=f_opt_token),
    _d("ssl_crl", _MS, None, p_path, fmt=f_opt_token),
    _d("ssl_conf_command", _MS, "", p_pairs,
       multi=True, nargs=(2, 2), fmt=f_each_tuple),
    # ngx_mail_realip_module
    _d("set_real_ip_from", _MS, "", p_realip, multi=True,
       fmt=f_each_token),
    # ngx_mail_imap_module
    _d("imap_auth", _MS, "plain",
       p_methods("plain", "login", "cram-md5", "external", "oauthbearer", "xoauth2"),
       nargs=_ANY, fmt=f_words),
    _d("imap_capabilities", _MS, "IMAP4 IMAP4rev1 UIDPLUS", p_words, nargs=_ANY,
       fmt=f_words),
    _d("imap_client_buffer", _MS, _page_size, p_size(1), fmt=f_size),
    # ngx_mail_pop3_module
    _d("pop3_auth", _MS, "plain",
       p_methods("plain", "apop", "cram-md5", "external", "oauthbearer", "xoauth2"),
       nargs=_ANY, fmt=f_words),
    _d("pop3_capabilities", _MS, "TOP USER UIDL", p_words, nargs=_ANY, fmt=f_words),
    # ngx_mail_smtp_module
    _d("smtp_auth", _MS, "plain login",
       p_methods("plain", "login", "cram-md5", "external", "none", "oauthbearer",
                 "xoauth2"),
       nargs=_ANY, fmt=f_words),
    _d("smtp_capabilities", _MS, "", p_words, nargs=_ANY, fmt=f_words),
    _d("smtp_client_buffer", _MS, _page_size, p_size(1), fmt=f_size),
    _d("smtp_greeting_delay", _MS, "0", p_time, fmt=f_time),
    # ours: ManageSieve (sieve.py); each capability token `NAME value`, SASL and STARTTLS added
    _d("sieve_auth", _MS, "plain",
       p_methods("plain", "login", "cram-md5", "external", "oauthbearer", "xoauth2"),
       nargs=_ANY, fmt=f_words),
    _d("sieve_capabilities", _MS, SIEVE_CAPABILITIES, p_sieve_capabilities, nargs=_ANY,
       fmt=f_words),
    # room for a bearer token in AUTHENTICATE (a page, as imap_client_buffer, can be short)
    _d("sieve_client_buffer", _MS, "8k", p_size(1), fmt=f_size),
    # our additions
    # one or several backends with nginx upstream's parameters (upstreams.py); a map file
    _d("proxy_pass", _S, None, p_proxy_pass, multi=True, nargs=_ANY, fmt=f_proxy_pass_pool),
    _d("proxy_map", _MS, "off", p_proxy_map, fmt=f_proxy_map),
    _d("proxy_health_check", _MS, "off", p_health_check, fmt=f_health_check),
    _d("imap_client_id", _MS, "off", p_flag, fmt=f_flag),
    _d("xclient_extended", _MS, "off", p_flag, fmt=f_flag),
    _d("ssl_certificate_sni", _MS, "", p_sni,
       multi=True, nargs=(3, 3), fmt=f_each_tuple),
    # TLS to backends (contexts built at start-up by tls_contexts.prepare (at start and on reload))
    _d("proxy_ssl", _MS, "off", p_enum("off", "on", "starttls"), fmt=f_token),
    _d("proxy_ssl_verify", _MS, "on", p_flag, fmt=f_flag),
    _d("proxy_ssl_trusted_certificate", _MS, None, p_path, fmt=f_opt_token),
    _d("proxy_ssl_name", _MS, None, p_str, fmt=f_opt_token),
    _d("proxy_ssl_certificate", _MS, None, p_path, fmt=f_opt_token),
    _d("proxy_ssl_certificate_key", _MS, None, p_path, fmt=f_opt_token),
    # login throttling and sessions per user (throttle.py; counts shared by the workers)
    _d("login_penalty", _MS, "off", p_flag, fmt=f_flag),
    _d("login_penalty_max", _MS, "15s", p_penalty_max, fmt=f_time),
    _d("login_block", _MS, "off", p_login_block, fmt=f_login_block),
    _d("login_trusted", _MS, "none", p_login_trusted, nargs=_ANY, fmt=f_login_trusted),
    _d("limit_sessions_per_user", _MS, "0", p_num(0), fmt=f_num),
]

# Known only to be refused with what replaces them (their parser always raises): in DIRECTIVES,
# so the loader's context and argument checks see them, but neither dumped nor a ServerConf field.
_REMOVED = [
    _d("ssl", _MS, None, p_ssl_removed),      # nginx 1.25.1 removed it
]

DIRECTIVES = {d.name: d for d in _TABLE + _REMOVED}

MAIN_KEYS = [d.name for d in _TABLE if "main" in d.contexts]
SERVER_KEYS = [d.name for d in _TABLE if "server" in d.contexts]
REMOVED = frozenset(d.name for d in _REMOVED)

# pop3_auth/imap_auth/smtp_auth methods that need Auth-Pass from an auth service
_NEEDS_AUTH_SERVICE = {"apop", "cram-md5", "external"}


def _default_value(d: Directive, folder: str):
    """The parsed default of directive `d` (paths relative to `folder`)."""
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
