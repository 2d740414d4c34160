"""What the master does with a configuration before forking workers, at start and on reload:
open the error logs, find the workers' user, hand it the log files, and warn about what the
configuration asks that this machine cannot fully give."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional, Tuple

if TYPE_CHECKING:
    from .config import Config
    from .log import ErrorLog


def build_logs(cfg: Config) -> Tuple[ErrorLog, Dict[Any, Any]]:
    """(main ErrorLog, {id(ServerConf): ErrorLog}); raises OSError naming the file."""
    from .log import ErrorLog
    opened = []
    try:
        main_log = open_log(ErrorLog, cfg.main.error_log)
        opened.append(main_log)
        server_logs = {}
        for conf in cfg.servers:
            targets = conf.error_log
            if targets:
                lg = open_log(ErrorLog, targets)
                opened.append(lg)
                server_logs[id(conf)] = lg
        from . import access_log        # kept with the error logs, under this key
        server_logs["access"] = access_log.open_all(cfg, main_log)
    except BaseException:
        for lg in opened:
            lg.close()
        raise
    return main_log, server_logs


def open_log(ErrorLog: Any, targets: Any) -> ErrorLog:
    try:
        return ErrorLog(targets or [])
    except OSError as e:
        path = e.filename or "?"
        raise OSError(e.errno, 'open() "%s" failed (%d: %s)' % (path, e.errno or 0, e.strerror))


def warn_native_tls(cfg: Config, log: ErrorLog) -> None:
    """Without the native OpenSSL layer, the directives that need it are start errors
    (tls.build_server); the one thing left weaker, with no directive, is said here: a client
    proposing another protocol by ALPN is not refused."""
    tls_servers = [s for s in cfg.servers if s.starttls != "off"
                   or any(li.ssl for li in s.listen)]
    if not tls_servers:
        return
    from . import tls_native
    if tls_native.native() is None:
        log.log("warn", "native OpenSSL calls unavailable (%s): TLS clients that propose "
                "another protocol by ALPN are not refused" % tls_native.native_error())


def warn_affinity(cfg: Config, log: ErrorLog) -> None:
    from .affinity import mismatch_warning
    text = mismatch_warning(cfg.main.worker_cpu_affinity, cfg.main.worker_processes)
    if text:
        log.log("warn", text)


def chown_logs(logs: Iterable[ErrorLog], user: Optional[Tuple[int, int, str]]) -> None:
    """Give log files to the workers' user, as nginx does, so they can reopen them (USR1).

    Only files this master created itself (log.open_log_file, never through a symlink): a
    file that was already there stays with its owner (nginx's Debian CVE-2016-1247 handed
    any root file to the workers' user this way)."""
    if not user or os.geteuid() != 0:
        return
    for lg in logs:
        for t in getattr(lg, "targets", ()):
            fd = getattr(t, "fd", -1)
            if getattr(t, "created", False) and fd is not None and fd >= 0:
                try:
                    os.fchown(fd, user[0], -1)
                except OSError as e:
                    lg.log("alert", 'chown() "%s" failed (%d: %s)'
                           % (t.path, e.errno or 0, e.strerror or e))


def resolve_user(cfg: Config, log: ErrorLog) -> Optional[Tuple[int, int, str]]:
    """(uid, gid, name) to switch workers to, or None."""
    user = cfg.main.user
    if not user:
        return None
    if os.geteuid() != 0:
        log.log("warn", 'the "user" directive makes sense only if the master process runs '
                        'with super-user privileges, ignored')
        return None
    import pwd
    import grp
    name, group = user[0], (user[1] if len(user) > 1 else None)
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ValueError('getpwnam("%s") failed' % name)
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError('getgrnam("%s") failed' % group)
    return (pw.pw_uid, gid, name)
