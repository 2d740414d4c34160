"""log.py: line shape, levels, file/stderr/syslog targets, reopen, sanitize()."""

import os
import re
import socket
import threading

import pytest

from mailproxy.config import LogTarget
from mailproxy.log import ErrorLog, sanitize

LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(\w+)\] (\d+)#(\d+): (.*)$")


def target(kind="file", path=None, level="info", **kw):
    """A config LogTarget as error_log's parser makes it (its defaults, then `kw`)."""
    return LogTarget(kind, path=path, level=level, **kw)


def lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_line_shape_pid_tid_and_conn(tmp_path):
    path = tmp_path / "error.log"
    log = ErrorLog([target(path=str(path), level="debug")])
    log.log("info", "client 127.0.0.1:5 connected to 127.0.0.1:110", conn=7)
    log.log("error", "no connection id")
    log.close()
    first, second = lines(path)
    m = LINE.match(first)
    assert m, first
    assert m.group(1) == "info"
    assert int(m.group(2)) == os.getpid()
    assert int(m.group(3)) == threading.get_native_id()
    assert m.group(4) == "*7 client 127.0.0.1:5 connected to 127.0.0.1:110"
    m = LINE.match(second)
    assert m and m.group(1) == "error" and m.group(4) == "no connection id"


def test_explicit_pid(tmp_path):
    path = tmp_path / "e.log"
    log = ErrorLog([target(path=str(path))], pid=4242)
    log.log("warn", "x")
    log.close()
    assert LINE.match(lines(path)[0]).group(2) == "4242"


def test_levels_filter_per_target(tmp_path):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    log = ErrorLog([target(path=str(a), level="warn"), target(path=str(b), level="debug")])
    assert log.enabled("debug") and log.enabled("emerg")
    for level in ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg"):
        log.log(level, "m-" + level)
    log.close()
    got_a = [LINE.match(x).group(1) for x in lines(a)]
    got_b = [LINE.match(x).group(1) for x in lines(b)]
    assert got_a == ["warn", "error", "crit", "alert", "emerg"]
    assert got_b == ["debug", "info", "notice", "warn", "error", "crit", "alert", "emerg"]


def test_enabled_is_false_below_every_target(tmp_path):
    log = ErrorLog([target(path=str(tmp_path / "x.log"), level="error")])
    assert not log.enabled("info")
    assert log.enabled("error") and log.enabled("crit")
    log.close()
    assert not ErrorLog([]).enabled("emerg")


def test_reopen_after_rename(tmp_path):
    path = tmp_path / "error.log"
    log = ErrorLog([target(path=str(path))])
    log.log("info", "before")
    os.rename(path, tmp_path / "error.log.1")
    log.log("info", "still old file")
    log.reopen()
    log.log("info", "after")
    log.close()
    old = lines(tmp_path / "error.log.1")
    new = lines(path)
    assert [LINE.match(x).group(4) for x in old] == ["before", "still old file"]
    assert [LINE.match(x).group(4) for x in new] == ["after"]


def test_concurrent_writes_are_whole_lines(tmp_path):
    path = tmp_path / "error.log"
    log = ErrorLog([target(path=str(path))])

    def work(n):
        for i in range(200):
            log.log("info", "thread %d line %d %s" % (n, i, "x" * 100))
    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    got = lines(path)
    assert len(got) == 1600
    assert all(LINE.match(x) and x.endswith("x" * 100) for x in got)


def test_failing_target_never_raises(tmp_path):
    path = tmp_path / "error.log"
    log = ErrorLog([target(path=str(path))])
    os.close(log.targets[0].fd)          # every write now fails
    log.log("error", "lost")
    log.reopen()                         # and reopen brings it back
    log.log("error", "found")
    log.close()
    assert [LINE.match(x).group(4) for x in lines(path)] == ["found"]


def test_unopenable_file_raises_at_construction(tmp_path):
    with pytest.raises(OSError):
        ErrorLog([target(path=str(tmp_path / "missing-dir" / "e.log"))])


def test_stderr_target(capfd):
    log = ErrorLog([target(kind="stderr", level="notice")])
    log.log("info", "hidden")
    log.log("notice", "shown", conn=3)
    out, err = capfd.readouterr()
    assert "hidden" not in err
    m = LINE.match(err.strip())
    assert m and m.group(1) == "notice" and m.group(4) == "*3 shown"


@pytest.fixture
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(3)
    yield s
    s.close()


SYSLOG = re.compile(r"^<(\d+)>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) (?:(\S+) )?(\S+): "
                    r"\[(\w+)\] (\d+)#(\d+): (.*)$")


def test_syslog_udp_datagram(udp):
    port = udp.getsockname()[1]
    log = ErrorLog([target(kind="syslog", server=("127.0.0.1", port), facility="mail",
                           tag="mp", level="info")])
    log.log("error", "auth http server 127.0.0.1:9 timed out", conn=12)
    log.log("debug", "not sent")
    log.log("info", "second")
    log.close()
    first = udp.recv(65536).decode()
    m = SYSLOG.match(first)
    assert m, first
    assert int(m.group(1)) == 2 * 8 + 3          # mail.err
    assert m.group(3) == socket.gethostname()
    assert m.group(4) == "mp"
    assert m.group(5) == "error"
    assert m.group(8) == "*12 auth http server 127.0.0.1:9 timed out"
    assert "\n" not in first
    second = udp.recv(65536).decode()
    m = SYSLOG.match(second)
    assert int(m.group(1)) == 2 * 8 + 6 and m.group(8) == "second"


def test_syslog_defaults_and_nohostname(udp):
    port = udp.getsockname()[1]
    log = ErrorLog([target(kind="syslog", server=("127.0.0.1", port), nohostname=True,
                           level="error")])
    log.log("crit", "boom")
    log.close()
    data = udp.recv(65536).decode()
    m = re.match(r"^<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d (\S+): \[crit\] \d+#\d+: boom$",
                 data)
    assert m, data
    assert int(m.group(1)) == 23 * 8 + 2                # local7.crit
    assert m.group(2) == "mailproxy"


@pytest.mark.parametrize("data", [
    b"USER a\r\nPASS b", "USER a\r\nPASS b", b"\x00\x01\x1b[31m\x7f", b"\xff\xfe\xc3",
    "a\u2028b\u2029c\x85d", b"line\rfeed\n" * 200, "\n" * 1000,
])
def test_sanitize_never_breaks_a_line(data):
    out = sanitize(data)
    assert not any(c in out for c in "\r\n\x00\x85\u2028\u2029")
    assert all(c >= " " and c != "\x7f" for c in out)
    assert len(out) <= 256 + 3


def test_sanitize_escapes():
    assert sanitize(b"USER a\r\n") == "USER a\\r\\n"
    assert sanitize(b"a\x00b\tc") == "a\\x00b\\tc"
    assert sanitize(b"\xff\xc3\xa9") == "\\xffé"
    assert sanitize("plain text") == "plain text"
    assert sanitize(b"") == "" and sanitize(None) == ""


def test_sanitize_cuts_long_input():
    out = sanitize(b"A" * 1000, limit=10)
    assert out == "A" * 10 + "..."
    assert sanitize("B" * 10, limit=10) == "B" * 10
    assert sanitize("B" * 11, limit=10) == "B" * 10 + "..."
    # never half an escape at the cut
    out = sanitize(b"ab" + b"\n" * 50, limit=5)
    assert out in ("ab\\n...", "ab...")
    assert sanitize(b"\x01" * 100, limit=9).endswith("...")
    assert "\\x0..." not in sanitize(b"\x01" * 100, limit=9)


def test_sanitize_leaves_no_field_to_forge():
    """Client text cannot end a quoted field nor start a `name: ` field of its own."""
    out = sanitize(b'admin", client: 198.51.100.77, server: x, login: "admin')
    assert out == ('admin\\x22, client\\x3a 198.51.100.77, server\\x3a x, '
                   'login\\x3a \\x22admin')
    assert sanitize("a\\x22") == "a\\\\x22"            # a backslash is never ambiguous
    assert sanitize("client:") == "client\\x3a"       # whatever follows the value
    assert sanitize("client:\u00a0x") == "client\\x3a\u00a0x"
    # a colon not followed by whitespace stays as it is (MAIL FROM:<a@b>, IPv6 addresses)
    assert sanitize(b"MAIL FROM:<a@b>") == "MAIL FROM:<a@b>"
    assert sanitize("::1") == "::1"
    line = 'x "%s", client: 127.0.0.1, server: s, login: "%s"' % (
        sanitize(b'", client: 10.0.0.1, x: "'), sanitize('u", client: 10.0.0.2,'))
    assert re.search(r".*client: (\S+),", line).group(1) == "127.0.0.1"
    assert re.search(r"client: (\S+),", line).group(1) == "127.0.0.1"


def test_sanitize_never_cuts_inside_an_escaped_backslash():
    out = sanitize(b"\\" * 20, limit=9)
    assert out == "\\\\" * 4 + "..."
    out = sanitize(b"a" + b"\\" * 20, limit=10)
    assert out == "a" + "\\\\" * 4 + "..."


def test_log_file_never_opened_through_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / "error.log").symlink_to(victim)
    with pytest.raises(OSError) as e:
        ErrorLog([target(path=str(tmp_path / "error.log"))])
    assert e.value.filename == str(tmp_path / "error.log")
    assert victim.read_text() == "keep\n"
    # nor on reopen: the old file stays in use
    path = tmp_path / "other.log"
    log = ErrorLog([target(path=str(path))])
    os.rename(path, tmp_path / "other.log.1")
    path.symlink_to(victim)
    log.reopen()
    log.close()
    assert victim.read_text() == "keep\n"
    assert 'open() "%s" failed (40: ' % path in (tmp_path / "other.log.1").read_text()


def test_log_file_fifo_refused_without_blocking(tmp_path):
    fifo = tmp_path / "error.log"
    os.mkfifo(fifo)
    with pytest.raises(OSError):
        ErrorLog([target(path=str(fifo))])


def test_log_file_created_flag(tmp_path):
    from mailproxy.log import open_log_file
    path = str(tmp_path / "error.log")
    fd, created = open_log_file(path)
    os.close(fd)
    assert created
    fd, created = open_log_file(path)
    os.close(fd)
    assert not created
    fd, created = open_log_file("/dev/null")
    os.close(fd)
    assert not created


def test_log_file_hard_link_refused(tmp_path):
    """A hard link planted in the log folder would make the root master append to the file it
    links to (where fs.protected_hardlinks is off)."""
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    os.link(victim, tmp_path / "error.log")
    with pytest.raises(OSError) as e:
        ErrorLog([target(path=str(tmp_path / "error.log"))])
    assert "hard links" in str(e.value)
    assert victim.read_text() == "keep\n"


def test_pid_file_holder_refuses_a_hard_link(tmp_path):
    """-s: a file that another process keeps open, hard-linked at the pid path, is not ours."""
    from mailproxy import pidfile
    theirs = tmp_path / "theirs.pid"
    theirs.write_text("%d\n" % os.getpid())
    with open(theirs) as held:
        assert pidfile.holder(os.getpid(), str(theirs))
        os.link(theirs, tmp_path / "mailproxy.pid")
        assert not pidfile.holder(os.getpid(), str(tmp_path / "mailproxy.pid"))
        assert held.readable()


def test_address_and_errno_texts_are_nginx_shaped():
    from mailproxy.log import addr_text, errno_text
    assert addr_text("192.0.2.1", 110) == "192.0.2.1:110"
    assert addr_text("2001:db8::1", 993) == "[2001:db8::1]:993"
    assert errno_text(ConnectionResetError(104, "Connection reset by peer")) == \
        "104: Connection reset by peer"
    assert errno_text(OSError(111, None)).startswith("111: ")
    assert errno_text(ValueError("no errno")) == "no errno"
