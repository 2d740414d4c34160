"""`access_log = PATH [json] | off`: one line per client session when it ends (ours).

Fields, in this order (README.md "Access log"):

    time session protocol client_ip client_port "user" backend tls_version tls_cipher
    bytes_in bytes_out duration result

`time` is local ISO 8601 with the UTC offset; `user` is always quoted (log.sanitize: no quote,
backslash, control or line break survives; in JSON, the name as sent, JSON-escaped, null when
absent), `-` stands for an absent value; `bytes_in` went
client -> backend, `bytes_out` backend -> client (0 for a session that never logged in);
`duration` is seconds from the accept; `result` is one of RESULTS.  With `json` each line is
one JSON object with these names as keys.

The files are opened by the master as the error logs are (log.open_log_file: no symlink, no
FIFO), handed to the workers' user, reopened on USR1; a line is one write(2) on an O_APPEND
descriptor, so the lines of all threads and workers never interleave.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .log import FileTarget, reopen_targets, sanitize, word

FORMATS = ("text", "json")

RESULTS = (
    "ok",                   # logged in and relayed; ended by either side
    "auth-failed",          # the last login attempt was refused (auth service or backend)
    "too-many-errors",      # max_errors invalid commands
    "closed-before-login",  # the client quit or closed (or a send to it failed) before login
    "timeout",              # `timeout` before login, or `proxy_timeout` while relaying
    "tls-failed",           # the client's TLS handshake or certificate failed
    "refused",              # a connection limit refused it
    "blocked",              # login_block: too many failed logins from its address
    "limited",              # limit_sessions_per_user: the user has enough sessions
    "shutdown",             # the worker stopped (worker_shutdown_timeout)
    "kicked",               # ended by `mailproxy kick` (live.py)
    "error",                # the auth service, the backend or the proxy failed
)

FIELDS = ("time", "session", "protocol", "client_ip", "client_port", "user", "backend",
          "tls_version", "tls_cipher", "bytes_in", "bytes_out", "duration", "result")


# ---- the directive (config/table.py) --------------------------------------------------------

def parse(args: List[str], ctx: Any) -> Optional[Tuple[str, str]]:
    """`off` -> None, `PATH [json]` -> (absolute path, 'text' | 'json')."""
    if args[0] == "off":
        if len(args) > 1:
            raise ctx.bad(args[1], 'nothing after "off"')
        return None
    fmt = "text"
    if len(args) > 1:
        if args[1] != "json":
            raise ctx.bad(args[1], '"json" or nothing after the path')
        fmt = "json"
    return (ctx.path(args[0]), fmt)


def tokens(value: Optional[Tuple[str, str]]) -> List[str]:
    """The value's tokens, as written (`-T`)."""
    if value is None:
        return ["off"]
    path, fmt = value
    return [path, "json"] if fmt == "json" else [path]


# ---- one line --------------------------------------------------------------------------------

def _time_text(now: float) -> str:
    tm = time.localtime(now)
    off = tm.tm_gmtoff or 0
    sign = "+" if off >= 0 else "-"
    off = abs(off) // 60
    return "%04d-%02d-%02dT%02d:%02d:%02d%s%02d:%02d" % (tm[:6] + (sign, off // 60, off % 60))


def record(*, session: str, protocol: str, client_ip: Optional[str],
           client_port: Optional[int], user: Optional[bytes], backend: Optional[str],
           tls: Optional[Tuple[str, str]], bytes_in: int, bytes_out: int, duration: float,
           result: str, now: Optional[float] = None) -> Dict[str, Any]:
    """The fields of one line (FIELDS order); `user` as the client sent it (text_line makes
    it log-safe, json escapes it), the other values are ours."""
    return {
        "time": _time_text(time.time() if now is None else now),
        "session": session,
        "protocol": protocol,
        "client_ip": client_ip or "-",
        "client_port": client_port if client_port is not None else "-",
        "user": bytes(user[:512]) if user is not None else None,
        "backend": backend or "-",
        "tls_version": tls[0] if tls and tls[0] else "-",
        "tls_cipher": tls[1] if tls and tls[1] else "-",
        "bytes_in": int(bytes_in),
        "bytes_out": int(bytes_out),
        "duration": round(max(duration, 0.0), 3),
        "result": result,
    }


def text_line(rec: Dict[str, Any]) -> str:
    """The text format: FIELDS space-separated, `user` quoted, a newline at the end."""
    out = []
    for name in FIELDS:
        value = rec[name]
        if name == "user":
            out.append('"%s"' % ("-" if value is None else sanitize(value, 256)))
        elif name == "duration":
            out.append("%.3f" % value)
        else:
            out.append(word(value))
    return " ".join(out) + "\n"


def json_line(rec: Dict[str, Any]) -> str:
    """One JSON object (ASCII only: controls and non-ASCII escaped by json), a newline."""
    obj = {name: rec[name] for name in FIELDS}
    if obj["user"] is not None:
        obj["user"] = obj["user"].decode("utf-8", "backslashreplace")
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")) + "\n"


# ---- the result of a session -----------------------------------------------------------------

def prelogin_result(outcome: Optional[str], failed_logins: int, errors: int,
                    max_errors: int) -> str:
    """The result of a session that ended before the relay: what ended it when the session
    knew (`outcome`), else what its conversation says."""
    if outcome is not None:
        return outcome
    if max_errors and errors >= max_errors:
        return "too-many-errors"
    if failed_logins:
        return "auth-failed"
    return "closed-before-login"


def relay_result(reason: str) -> str:
    """The result of a relayed session from relay.Stats.reason."""
    if reason in ("client closed", "backend closed"):
        return "ok"
    if reason == "client timed out":
        return "timeout"
    if reason.startswith("shutdown"):
        return "shutdown"
    if reason.startswith("kicked"):
        return "kicked"
    return "error"


# ---- the files -------------------------------------------------------------------------------

class AccessLog:
    """One server's access log: a shared file and this server's format."""

    __slots__ = ("target", "fmt")

    def __init__(self, target: FileTarget, fmt: str) -> None:
        self.target, self.fmt = target, fmt

    def write(self, rec: Dict[str, Any]) -> None:
        line = json_line(rec) if self.fmt == "json" else text_line(rec)
        self.target.write(line, "", 6)         # one write(2), O_APPEND


class AccessLogs:
    """Every access log file of a configuration, each opened once however many servers name
    it; `by_server` is what a Runtime keeps.  Shaped as an ErrorLog for supervisor's
    log handling (`targets`, `log`, `reopen`, `close`), which keeps it among the servers'
    error logs (key "access")."""

    def __init__(self, servers: Iterable[Any], errlog: Any = None) -> None:
        self.errlog = errlog
        self.targets: List[FileTarget] = []
        self.by_server: Dict[int, AccessLog] = {}
        files: Dict[str, FileTarget] = {}
        try:
            for conf in servers:
                if conf.access_log is None:
                    continue
                path, fmt = conf.access_log
                if path not in files:
                    files[path] = FileTarget(path, "info")
                    self.targets.append(files[path])
                self.by_server[id(conf)] = AccessLog(files[path], fmt)
        except BaseException:
            self.close()
            raise

    def log(self, level: str, message: str, conn: object = None) -> None:
        if self.errlog is not None:
            self.errlog.log(level, message)

    def reopen(self) -> None:
        reopen_targets(self.targets, self.log)

    def close(self) -> None:
        for t in self.targets:
            t.close()
        self.targets = []


def open_all(cfg: Any, errlog: Any = None) -> AccessLogs:
    """The access logs of `cfg`; raises OSError naming the file (as master_setup.build_logs)."""
    try:
        return AccessLogs(cfg.servers, errlog)
    except OSError as e:
        raise OSError(e.errno, 'open() "%s" failed (%d: %s)'
                      % (e.filename or "?", e.errno or 0, e.strerror)) from None
