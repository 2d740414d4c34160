"""The pid file: written by the master, read by `-s`.

The master writes it under a random temporary name created exclusively (O_EXCL never follows
a symlink), renames it into place (rename replaces a planted link, never writes through it)
and keeps it open until it exits. `-s` signals the pid only if that process holds the pid
file open: a planted pid file naming another process, or a stale one whose pid was reused,
is refused (nginx's ngx_signal_process trusts any number in the file).
"""

from __future__ import annotations

import os
import stat
import tempfile
from typing import Optional


def write(path: str, pid: int) -> int:
    """Write `pid` to `path`; returns the descriptor the master keeps open (see `holder`)."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + name + ".", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, b"%d\n" % pid)
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return fd


def read(path: str) -> int:
    """The pid in `path`; OSError (never blocks on a FIFO, never through a symlink) or
    ValueError naming the file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError('"%s" is not a regular file' % path)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not text.isdigit():
        raise ValueError('invalid PID number "%s" in "%s"' % (text, path))
    return int(text)


def holder(pid: int, path: str) -> bool:
    """True when process `pid` has the file at `path` open (the master keeps its pid file
    open for this: /proc/PID/fd/* on the same device and inode)."""
    try:
        st = os.stat(path, follow_symlinks=False)
        fds = os.listdir("/proc/%d/fd" % pid)
    except FileNotFoundError:
        return False
    # ours is one link, written by this user or root: not another daemon's file linked here
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid not in (0, os.geteuid()):
        return False
    for fd in fds:
        try:
            other = os.stat("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def remove(path: str, fd: Optional[int], pid: int) -> None:
    """Remove `path` if it still names `pid` (a newer master may own it), close `fd`."""
    try:
        if read(path) == pid:
            os.unlink(path)
    except (OSError, ValueError):
        pass
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass

