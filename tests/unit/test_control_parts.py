"""The pure parts of `sessions` / `kick`: the command's words (control_cli.parse), the
listing (control_cli.table), which sessions a request names (live.matches) and the master's
answer from its workers' (master_loop.combine)."""

import pytest

from mailproxy import control_cli, live, master_loop
from mailproxy.cli import parse_args


def test_command_words_after_the_options():
    opts = parse_args(["-c", "m.ini", "sessions", "alice", "--json"])
    assert opts["conf"] == "m.ini" and opts["command"] == "sessions"
    assert opts["args"] == ["alice", "--json"]
    assert parse_args(["-t"])["command"] is None


def test_parse_requests():
    assert control_cli.parse("sessions", []) == {"request": {"op": "sessions"}, "json": False}
    got = control_cli.parse("sessions", ["bob", "--json", "--backend=127.0.0.1:110"])
    assert got == {"request": {"op": "sessions", "user": "bob", "backend": "127.0.0.1:110"},
                   "json": True}
    assert control_cli.parse("kick", ["--backend", "[::1]:143"])["request"] == {
        "op": "kick", "backend": "[::1]:143"}


@pytest.mark.parametrize("command, words", [
    ("kick", []),                       # kick needs a filter: never every session at once
    ("kick", ["--json", "alice"]),
    ("sessions", ["alice", "bob"]),
    ("sessions", ["--backend"]),
    ("sessions", ["-x"]),
])
def test_parse_refuses(command, words):
    with pytest.raises(control_cli.UsageError):
        control_cli.parse(command, words)


def row(**kw):
    r = {"id": "abcdEFGH00000001", "protocol": "pop3", "user": "alice",
         "client": "127.0.0.1:40000", "backend": "127.0.0.1:110", "tls": None,
         "bytes_in": 12, "bytes_out": 345, "age": 61.7, "pid": 4242}
    r.update(kw)
    return r


def test_table_has_a_header_and_one_aligned_line_a_session():
    text = control_cli.table([row(), row(user="a much longer name", tls="TLSv1.3", backend=None)])
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "PROTOCOL", "USER", "CLIENT", "BACKEND", "TLS", "C>B",
                                "B>C", "AGE", "PID"]
    assert lines[1].split() == ["abcdEFGH00000001", "pop3", "alice", "127.0.0.1:40000",
                                "127.0.0.1:110", "-", "12", "345", "61", "4242"]
    # a client's spaces and controls cannot add columns or lines
    assert lines[2].split()[2] == "a\\x20much\\x20longer\\x20name"
    assert lines[1].index("127.0.0.1:40000") == lines[2].index("127.0.0.1:40000")
    evil = control_cli.table([row(user="x\r\nFAKE\x1b[2J")])
    assert len(evil.splitlines()) == 2 and "\x1b" not in evil and "\r" not in evil


def test_matches_user_and_backend():
    r = row(backend="[::1]:143")
    assert live.matches(r, "alice", None) and not live.matches(r, "alic", None)
    assert live.matches(r, None, "[::1]:143") and live.matches(r, None, "::1")
    assert live.matches(r, None, "[::1]") and not live.matches(r, None, "[::1]:110")
    assert not live.matches(row(backend=None), None, "127.0.0.1")
    assert live.matches(row(), "alice", "127.0.0.1") and not live.matches(row(), "bob",
                                                                           "127.0.0.1")
    assert live.user_text(b"caf\xe9") == "caf\udce9"    # a kick by that name matches it


def test_combine_sorts_sums_and_reports_missing():
    answers = [{"pid": 1, "sessions": [row(age=1.0)], "kicked": 2},
               {"pid": 2, "sessions": [row(age=9.0, pid=2)], "kicked": 1},
               {"pid": 3, "gone": True}]
    got = master_loop.combine(answers, [4])
    assert [r["age"] for r in got["sessions"]] == [9.0, 1.0]
    assert got["kicked"] == 3 and got["missing"] == [3, 4] and got["workers"] == 4


def test_one_word_of_a_line_for_the_access_log_and_the_listing():
    from mailproxy import access_log, log
    assert log.word("a much\tlonger name\r\n") == "a\\x20much\\tlonger\\x20name\\r\\n"
    assert log.word(None) == "-" and log.word("") == "-" and log.word(110) == "110"
    evil = "x y\r\nFAKE\x1b[2J"
    assert control_cli.table([row(user=evil)]).splitlines()[1].split()[2] == log.word(evil)
    rec = access_log.record(session="s", protocol="pop3", client_ip="127.0.0.1",
                            client_port=1, user=None, backend=evil, tls=None, bytes_in=0,
                            bytes_out=0, duration=0.0, result="ok", now=0.0)
    assert access_log.text_line(rec).split()[6] == log.word(evil)
