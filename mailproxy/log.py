"""nginx-shaped error log: file, stderr and syslog (UDP) targets; `sanitize()` for client text.

Line shape: ``YYYY/MM/DD HH:MM:SS [level] PID#TID: *CONN message``.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import threading
import time
from typing import Any, Callable, Iterable, Optional, Tuple, Union

LEVELS = ("emerg", "alert", "crit", "error", "warn", "notice", "info", "debug")
# nginx's severity numbers (also the syslog severities): emerg 0 ... debug 7
SEVERITY = {name: i for i, name in enumerate(LEVELS)}
SEVERITY["warning"] = SEVERITY["warn"]
SEVERITY["err"] = SEVERITY["error"]

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "intern": 5, "syslog": 5,
    "lpr": 6, "news": 7, "uucp": 8, "clock": 9, "cron": 9, "authpriv": 10, "ftp": 11,
    "ntp": 12, "audit": 13, "alert": 14, "cron2": 15,
    "local0": 16, "local1": 17, "local2": 18, "local3": 19,
    "local4": 20, "local5": 21, "local6": 22, "local7": 23,
}

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def severity(level: Union[str, int]) -> int:
    """Numeric severity of a level name (unknown names count as 'error')."""
    if isinstance(level, int):
        return level
    return SEVERITY.get(str(level).lower(), SEVERITY["error"])


class _Clock:
    """Formats the current second once, not once per line."""

    def __init__(self):
        self._sec = None
        self._local = "1970/01/01 00:00:00"
        self._syslog = "Jan  1 00:00:00"

    def stamps(self):
        now = int(time.time())
        if now != self._sec:
            tm = time.localtime(now)
            local = "%04d/%02d/%02d %02d:%02d:%02d" % tm[:6]
            syslog = "%s %2d %02d:%02d:%02d" % (_MONTHS[tm.tm_mon - 1], tm.tm_mday,
                                                 tm.tm_hour, tm.tm_min, tm.tm_sec)
            self._local, self._syslog, self._sec = local, syslog, now
        return self._local, self._syslog


_clock = _Clock()


_LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def open_log_file(path: str) -> Tuple[int, bool]:
    """(fd, created): a log file opened for appending, never through a symbolic link.

    A root master opens log files in folders the workers' user may own (nginx's Debian
    CVE-2016-1247): O_NOFOLLOW refuses a planted symlink, O_NONBLOCK a planted FIFO (ENXIO
    instead of blocking), only regular files and character devices (/dev/null) are taken,
    and `created` tells whether this call made the file (O_EXCL), the only case in which the
    caller may hand it to another user (master_setup.chown_logs).
    """
    for _ in range(3):          # bounded: the file may vanish between the two opens
        try:
            fd, created = os.open(path, _LOG_FLAGS | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(path, _LOG_FLAGS), False
            except FileNotFoundError:
                continue
        break
    else:
        fd, created = os.open(path, _LOG_FLAGS), False      # raises with the reason
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
            # a hard link planted in the log folder would make root append to another file
            raise OSError(errno.EINVAL, "a file with %d hard links" % st.st_nlink, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, created


class FileTarget:
    """Appends whole lines with one write(2) each (O_APPEND: safe across threads and processes)."""

    def __init__(self, path: str, level: Union[str, int]) -> None:
        self.path = path
        self.severity = severity(level)
        self._lock = threading.Lock()
        self.created = False        # True when this process created the file of `fd`
        self.fd, self.created = open_log_file(path)

    def write(self, line: str, syslog_body: str, level: int) -> None:
        try:
            os.write(self.fd, line.encode("utf-8", "backslashreplace"))
        except OSError:
            pass

    def reopen(self) -> None:
        fd, created = open_log_file(self.path)  # may raise: the caller reports, the old fd stays
        with self._lock:
            old = self.fd
            self.created = created
            if old < 0 or old == fd:
                self.fd = fd
                return
            try:
                # same descriptor number, new file: writers in other threads never see a
                # closed descriptor
                os.dup2(fd, old, inheritable=False)
            except OSError:
                self.fd = fd
                return
        os.close(fd)

    def close(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class StderrTarget:
    def __init__(self, level: Union[str, int]) -> None:
        self.path = "stderr"
        self.severity = severity(level)

    def write(self, line: str, syslog_body: str, level: int) -> None:
        try:
            os.write(2, line.encode("utf-8", "backslashreplace"))
        except OSError:
            pass

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


class SyslogTarget:
    """One UDP datagram per line, RFC 3164 shape as nginx sends it."""

    def __init__(self, server: Optional[Tuple[str, Union[int, str, None]]],
                 level: Union[str, int], facility: Union[str, int] = "local7",
                 tag: str = "mailproxy", nohostname: bool = False) -> None:
        self.path = "syslog"
        self.severity = severity(level)
        host, port = server if server else ("127.0.0.1", 514)
        port = int(port or 514)
        if isinstance(facility, int):
            self.facility = facility
        else:
            self.facility = FACILITIES.get(str(facility or "local7").lower(), 23)
        self.tag = tag or "mailproxy"
        self.hostname = None if nohostname else socket.gethostname()
        # resolved once, at start (and at reload, which builds a new ErrorLog)
        host = host.strip("[]") if host else "127.0.0.1"
        info = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
        self.addr = info[4]
        self.sock = socket.socket(info[0], socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def write(self, line: str, syslog_body: str, level: int) -> None:
        pri = self.facility * 8 + severity(level)
        _, stamp = _clock.stamps()
        if self.hostname:
            head = "<%d>%s %s %s: " % (pri, stamp, self.hostname, self.tag)
        else:
            head = "<%d>%s %s: " % (pri, stamp, self.tag)
        try:
            self.sock.sendto((head + syslog_body).encode("utf-8", "backslashreplace"), self.addr)
        except OSError:
            pass

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


Target = Union[FileTarget, StderrTarget, SyslogTarget]


def make_target(t: Any) -> Target:
    """A target object from a config LogTarget (config/types.py, not imported: it imports
    this module)."""
    if t.kind == "stderr":
        return StderrTarget(t.level)
    if t.kind == "syslog":
        return SyslogTarget(t.server, t.level, t.facility, t.tag, t.nohostname)
    return FileTarget(t.path, t.level)


class ErrorLog:
    """The error log of a process (or of one server with its own error_log).

    Construction opens every target and raises OSError when one cannot be opened;
    after that nothing raises into the caller.
    """

    def __init__(self, targets: Optional[Iterable[Any]], pid: Optional[int] = None) -> None:
        self.pid = pid
        self.targets = []
        try:
            for t in targets or ():
                self.targets.append(t if hasattr(t, "write") else make_target(t))
        except BaseException:
            self.close()
            raise
        self._min = max((t.severity for t in self.targets), default=-1)

    def enabled(self, level: Union[str, int]) -> bool:
        """True when at least one target writes lines of this level."""
        return severity(level) <= self._min

    def log(self, level: Union[str, int], message: str, conn: object = None) -> None:
        sev = severity(level)
        if sev > self._min:
            return
        try:
            name = LEVELS[sev] if 0 <= sev < len(LEVELS) else str(level)
            pid = self.pid if self.pid is not None else os.getpid()
            if conn is None:
                body = "[%s] %d#%d: %s" % (name, pid, threading.get_native_id(), message)
            else:
                body = "[%s] %d#%d: *%s %s" % (name, pid, threading.get_native_id(), conn, message)
            local, _ = _clock.stamps()
            line = local + " " + body + "\n"
            for t in self.targets:
                if sev <= t.severity:
                    t.write(line, body, sev)
        except Exception:
            pass

    # nginx-ish shorthands
    def emerg(self, msg: str, conn: object = None) -> None:
        self.log("emerg", msg, conn)

    def alert(self, msg: str, conn: object = None) -> None:
        self.log("alert", msg, conn)

    def error(self, msg: str, conn: object = None) -> None:
        self.log("error", msg, conn)

    def warn(self, msg: str, conn: object = None) -> None:
        self.log("warn", msg, conn)

    def notice(self, msg: str, conn: object = None) -> None:
        self.log("notice", msg, conn)

    def info(self, msg: str, conn: object = None) -> None:
        self.log("info", msg, conn)

    def debug(self, msg: str, conn: object = None) -> None:
        self.log("debug", msg, conn)

    def reopen(self) -> None:
        """Reopen file targets (USR1). A file that cannot be reopened keeps its old descriptor."""
        reopen_targets(self.targets, self.log)

    def close(self) -> None:
        for t in self.targets:
            try:
                t.close()
            except Exception:
                pass
        self.targets = []
        self._min = -1


def reopen_targets(targets: Iterable[Any], log: Callable[[str, str], Any]) -> None:
    """USR1 for the error logs and the access logs: each file reopened, a failure logged at
    alert (the target keeps its old descriptor)."""
    for t in targets:
        try:
            t.reopen()
        except OSError as e:
            log("alert", 'open() "%s" failed (%d: %s)' % (t.path, e.errno or 0, e.strerror or e))


def stderr_log(level: str = "notice") -> ErrorLog:
    """An ErrorLog writing to stderr only (before the configured logs exist)."""
    return ErrorLog([StderrTarget(level)])


# Controls, C1 controls, line/paragraph separators, non-UTF-8 bytes; and, so that no field can
# be forged inside client text (nginx's ngx_mail_log_error puts `login: "..."` after
# `client: ...`): the backslash, the quote, and a colon before whitespace or the end (`name: `
# is how every field starts).
_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\\"]|:(?=\s|$)')
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t", "\x00": "\\x00", "\\": "\\\\"}
# one character of escaped output: an escape sequence or a plain character
_TOKEN = re.compile(r"\\(?:x[0-9a-f]{2}|u[0-9a-f]{4}|.)|[^\\]", re.S)


def _escape(m):
    ch = m.group(0)
    named = _NAMED.get(ch)
    if named:
        return named
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:       # a non-UTF-8 byte (surrogateescape)
        return "\\x%02x" % (code - 0xDC00)
    if code <= 0xFF:
        return "\\x%02x" % code
    return "\\u%04x" % code


def addr_text(host: str, port: Union[int, str]) -> str:
    """nginx's text of an address: `192.0.2.1:110`, `[2001:db8::1]:110`."""
    if ":" in host:
        return "[%s]:%s" % (host, port)
    return "%s:%s" % (host, port)


def errno_text(exc: BaseException) -> str:
    """nginx's text of a failed call's error: `104: Connection reset by peer` (the errno and
    its message), or the exception's own text when it has no errno."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and code is not None:
        return "%d: %s" % (code, exc.strerror or os.strerror(code))
    return str(exc)


def sanitize(data: object, limit: Optional[int] = 256) -> str:
    """Client-supplied bytes or text as one safe log fragment (see "Log lines" in README.md).

    Controls (CR, LF, NUL, ...), C1 controls, line/paragraph separators and bytes that
    are not UTF-8 are escaped (``\\r``, ``\\n``, ``\\x00``, ``\\xff``), and so are the
    backslash (``\\\\``), the double quote (``\\x22``) and a colon followed by whitespace or
    ending the text (``\\x3a``): a quoted field never ends early and ``client: `` or any other
    ``name: `` field cannot appear inside client text. Output longer than `limit` characters
    is cut (never inside an escape) and ``...`` appended. The result never contains a line break.
    """
    if data is None:
        return ""
    truncated = False
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if limit is not None and len(raw) > limit * 4:
            raw, truncated = raw[:limit * 4], True   # escaping only grows: enough for `limit`
        text = raw.decode("utf-8", "surrogateescape")
    else:
        text = str(data)
        if limit is not None and len(text) > limit:
            text, truncated = text[:limit + 1], True
    if _UNSAFE.search(text):
        text = _UNSAFE.sub(_escape, text)
    if limit is not None and (truncated or len(text) > limit):
        end = 0
        for m in _TOKEN.finditer(text):
            if m.end() > limit:
                break
            end = m.end()
        return text[:end] + "..."
    return text


def word(value: object, limit: int = 256) -> str:
    """One space-free field of a line (an access_log text field, a cell of the `sessions`
    listing): sanitized, its spaces escaped (a client's space would shift the fields), `-`
    when None or empty."""
    if value is None:
        return "-"
    return sanitize(str(value), limit).replace(" ", "\\x20") or "-"
