"""The IMAP command parser and the pure helpers of mailproxy.imap (no sockets)."""

import random

import pytest

from mailproxy import imap
from mailproxy.clientio import BackendRejected, LineTooLong
from mailproxy.imap import (Command, ParseError, TooLong, backend_id_command,
                            backend_login_complete, capability_line, check_login_reply,
                            ends_with_nonsync_literal, parse_command, parse_sasl_line, tag_of)


class FakeIO:
    """Client bytes after the first line; records when `+ OK` would have been sent."""

    def __init__(self, data=b""):
        self.buf = bytearray(data)
        self.consumed = 0
        self.continues = []            # bytes consumed when each continuation was asked for

    def readline(self, limit=1 << 30):
        i = self.buf.find(b"\n")
        if i < 0 or i >= limit:
            self.asked = limit
            raise LineTooLong(bytes(self.buf[:limit]))
        return self._take(i + 1)

    def read_exact(self, n):
        if len(self.buf) < n:
            raise LineTooLong(bytes(self.buf))
        return self._take(n)

    def _take(self, n):
        data = bytes(self.buf[:n])
        del self.buf[:n]
        self.consumed += n
        return data

    def continue_literal(self):
        self.continues.append(self.consumed)


def parse(data, limit=4096):
    """Parse the first command of `data`; returns (Command, io) with io holding the rest."""
    i = data.index(b"\n")
    io = FakeIO(data[i + 1:])
    return parse_command(data[:i + 1], io, limit), io


def error(data, limit=4096):
    with pytest.raises(ParseError) as e:
        parse(data, limit)
    return e.value


def too_long(data, limit):
    with pytest.raises(TooLong) as e:
        parse(data, limit)
    return e.value


# ---- tags ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", [b"a", b"A1", b"x.y-z_0", b"t" * 32, b"0", b"_", b"-.-"])
def test_valid_tags(tag):
    cmd, _ = parse(tag + b" NOOP\r\n")
    assert cmd.tag == tag + b" "
    assert cmd.verb == "NOOP"


@pytest.mark.parametrize("line", [
    b"t" * 33 + b" NOOP\r\n",      # over 32 characters
    b"a* NOOP\r\n",                # bad character
    b"a+b NOOP\r\n",
    b"a\"b NOOP\r\n",
    b"\xc3\xa9 NOOP\r\n",
    b" NOOP\r\n",                  # empty tag (nginx would take it; the spec says 1-32)
    b"\r\n",                       # an empty line
    b"\n",
    b"NOOP\r\n",                   # no space after the tag
    b"a\r\n",
    b"a\tNOOP\r\n",
])
def test_bad_tags_are_untagged_errors(line):
    e = error(line)
    assert e.tag is None
    assert not e.close


def test_tag_keeps_exactly_one_space():
    cmd, _ = parse(b"a1    noop\r\n")
    assert cmd.tag == b"a1 "


def test_tag_then_line_end_is_a_tagged_error():
    assert error(b"a \r\n").tag == b"a "
    assert error(b"a   \n").tag == b"a "


def test_tag_of():
    assert tag_of(b"abc NOOP") == b"abc "
    assert tag_of(b"abc") is None
    assert tag_of(b"a*c NOOP") is None
    assert tag_of(b"x" * 33 + b" ") is None
    assert tag_of(b"x" * 32 + b" ") == b"x" * 32 + b" "
    assert tag_of(b"") is None


# ---- command words -------------------------------------------------------------------------------

@pytest.mark.parametrize("word,verb", [
    (b"NOOP", "NOOP"), (b"noop", "NOOP"), (b"NoOp", "NOOP"), (b"LOGIN", "LOGIN"),
    (b"logout", "LOGOUT"), (b"STARTTLS", "STARTTLS"), (b"capability", "CAPABILITY"),
    (b"Authenticate", "AUTHENTICATE"),
])
def test_command_words(word, verb):
    cmd, _ = parse(b"a " + word + b"\r\n")
    assert cmd.verb == verb
    assert cmd.args == []


@pytest.mark.parametrize("word", [b"SELECT", b"ENABLE", b"NOOPX", b"NOP", b"LOG1N", b"NOOP1",
                                  b"AUTH", b"X-NOOP", b"CAPABILITIES", b"\xffNOOP"])
def test_unknown_command_words_are_tagged_errors(word):
    e = error(b"t1 " + word + b" x\r\n")
    assert e.tag == b"t1 "
    assert not e.close


def test_command_word_followed_by_junk():
    assert error(b"a NOOP\"x\r\n").tag == b"a "
    assert error(b"a NOOP{1}\r\n").tag == b"a "


def test_bare_lf_and_crlf_both_end_a_line():
    assert parse(b"a NOOP\n")[0].verb == "NOOP"
    assert parse(b"a NOOP\r\n")[0].verb == "NOOP"
    assert parse(b"a LOGIN x y\n")[0].args == [b"x", b"y"]


@pytest.mark.parametrize("line", [b"a NOOP\rx\n", b"a NO\rOP\n", b"a LOGIN x\ry\r\n",
                                  b"a LOGIN x y\r\r\n", b"a LOGIN x y \rz\n"])
def test_cr_not_before_lf_is_an_error(line):
    assert error(line).tag == b"a "


def test_extra_spaces_everywhere():
    cmd, _ = parse(b"a1   LOGIN    alice     secret   \r\n")
    assert cmd.args == [b"alice", b"secret"]


# ---- atoms and quoted strings --------------------------------------------------------------------

def test_atoms_take_quotes_and_backslashes_literally():
    cmd, _ = parse(b'a LOGIN us"er pa\\ss\r\n')
    assert cmd.args == [b'us"er', b"pa\\ss"]


def test_atoms_take_eight_bit_and_braces_inside():
    cmd, _ = parse(b"a LOGIN \xc3\xa9t\xc3\xa9 x{3}\r\n")
    assert cmd.args == [b"\xc3\xa9t\xc3\xa9", b"x{3}"]


@pytest.mark.parametrize("quoted,value", [
    (b'"alice"', b"alice"),
    (b'"p w"', b"p w"),
    (b'""', b""),
    (b'"al\\"ice"', b'al"ice'),
    (b'"a\\\\b"', b"a\\b"),
    (b'"\\a\\b"', b"ab"),             # any escaped character stands for itself (nginx)
    (b'"  "', b"  "),
    (b'"{3}"', b"{3}"),
    (b'"\xff\x00"', b"\xff\x00"),
])
def test_quoted_strings(quoted, value):
    cmd, _ = parse(b"a LOGIN " + quoted + b" x\r\n")
    assert cmd.args == [value, b"x"]


def test_closing_quote_ends_the_argument_without_a_space():
    cmd, _ = parse(b'a LOGIN "al"ice\r\n')
    assert cmd.args == [b"al", b"ice"]
    cmd, _ = parse(b'a LOGIN "a""b"\r\n')
    assert cmd.args == [b"a", b"b"]


@pytest.mark.parametrize("line", [
    b'a LOGIN "abc\r\n',               # unterminated
    b'a LOGIN x "p w\r\n',
    b'a LOGIN "abc\\"\r\n',            # escaped closing quote, so unterminated
    b'a LOGIN "abc\\\r\n',             # backslash before CR
    b'a LOGIN "abc\\\n',               # backslash before LF
    b'a LOGIN "ab\rc" x\r\n',          # CR inside
])
def test_bad_quoted_strings_are_tagged_errors(line):
    e = error(line)
    assert e.tag == b"a "
    assert not e.close


def test_unterminated_quote_does_not_leak_into_the_next_command():
    # nginx answers the second command `c BAD invalid command` (ngx_mail_imap_parse_command
    # keeps its quoted state across the line end)
    data = b'a LOGIN "abc\r\nc LOGIN x y\r\n'
    i = data.index(b"\n")
    io = FakeIO(data[i + 1:])
    with pytest.raises(ParseError):
        parse_command(data[:i + 1], io, 4096)
    cmd = parse_command(io.readline(), io, 4096)
    assert (cmd.tag, cmd.verb, cmd.args) == (b"c ", "LOGIN", [b"x", b"y"])


def test_at_most_three_arguments():
    assert parse(b"a LOGIN x y z\r\n")[0].args == [b"x", b"y", b"z"]
    assert error(b"a LOGIN w x y z\r\n").tag == b"a "
    assert error(b'a NOOP w x y "z"\r\n').tag == b"a "
    assert error(b"a NOOP w x y {1}\r\n").tag == b"a "


# ---- literals ------------------------------------------------------------------------------------

def test_synchronising_literal_waits_for_continuation():
    cmd, io = parse(b"a LOGIN {5}\r\nalice secret\r\n")
    assert cmd.args == [b"alice", b"secret"]
    assert io.continues == [0]          # `+ OK` asked for before any literal byte was taken


def test_two_synchronising_literals():
    cmd, io = parse(b"a LOGIN {5}\r\nalice {6}\r\nsecret\r\n")
    assert cmd.args == [b"alice", b"secret"]
    assert io.continues == [0, 5 + len(b" {6}\r\n")]


def test_reference_example_quoted_and_literal():
    cmd, io = parse(b'a6 LOGIN "al\\"ice" {3}\r\np w\r\n')
    assert cmd.args == [b'al"ice', b"p w"]
    assert len(io.continues) == 1


def test_non_synchronising_literals_need_no_continuation():
    cmd, io = parse(b"b1 LOGIN {5+}\r\nalice {2+}\r\npw\r\n")
    assert cmd.args == [b"alice", b"pw"]
    assert io.continues == []


def test_literal_bytes_are_verbatim():
    data = b'a"\\ \r\n\x00{1}\xff'
    cmd, _ = parse(b"a LOGIN {%d+}\r\n" % len(data) + data + b" x\r\n")
    assert cmd.args == [data, b"x"]


def test_literal_then_line_end():
    cmd, _ = parse(b"a LOGIN x {2}\r\npw\r\n")
    assert cmd.args == [b"x", b"pw"]
    cmd, _ = parse(b"a LOGIN x {2}\npw\n")
    assert cmd.args == [b"x", b"pw"]


def test_empty_literal():
    cmd, io = parse(b"a LOGIN x {0}\r\n\r\n")
    assert cmd.args == [b"x", b""]
    assert io.continues == [0]
    cmd, io = parse(b"a LOGIN {0+}\r\n y\r\n")
    assert cmd.args == [b"", b"y"]


def test_literal_leading_zeros():
    assert parse(b"a LOGIN {003+}\r\nabc x\r\n")[0].args == [b"abc", b"x"]


def test_pipelined_input_after_a_literal_stays_buffered():
    cmd, io = parse(b"a LOGIN {1+}\r\nx y\r\nb NOOP\r\n")
    assert cmd.args == [b"x", b"y"]
    assert bytes(io.buf) == b"b NOOP\r\n"


@pytest.mark.parametrize("after", [b"x", b'"', b"{", b"(", b")"])
def test_only_space_or_line_end_may_follow_literal_bytes(after):
    e = error(b"a LOGIN {3+}\r\nabc" + after + b" y\r\n")
    assert e.tag == b"a "


@pytest.mark.parametrize("announce", [
    b"{}", b"{+}", b"{3} ", b"{3}x", b"{-1}", b"{3++}", b"{ 3}", b"{3", b"{3}\r\r", b"{3+",
    b"{0x3}", b"{3}{", b"{+3}",
])
def test_bad_literal_announcements(announce):
    e = error(b"a LOGIN " + announce + b"\r\nabc\r\n")
    assert e.tag == b"a "


def test_literal_count_toward_three_arguments():
    assert parse(b"a LOGIN {1+}\r\nx {1+}\r\ny {1+}\r\nz\r\n")[0].args == [b"x", b"y", b"z"]
    e = error(b"a LOGIN {1+}\r\nx {1+}\r\ny {1+}\r\nz w\r\n")
    assert e.tag == b"a " and not e.close


# ---- the {N+} safety rule ------------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    b"a SELECT {5+}\r\n",
    b"a APPEND INBOX {500+}\n",
    b"a LOGIN w x y {3+}\r\n",            # a fourth argument
    b"{5+}\r\n",                         # not even a tag
    b"a LOGIN {3+} \r\n",               # not a valid announcement, but the line ends in "+}"?
])
def test_invalid_line_ending_in_nonsync_literal_closes(line):
    e = error(line)
    assert e.close == line.rstrip(b"\r\n").endswith(b"+}")


def test_invalid_line_with_synchronising_literal_does_not_close():
    e = error(b"a SELECT {5}\r\n")
    assert e.tag == b"a " and not e.close


def test_safety_rule_applies_to_the_segment_after_a_literal():
    e = error(b"a LOGIN {1+}\r\nx y z w {9+}\r\n")
    assert e.close


def test_ends_with_nonsync_literal():
    assert ends_with_nonsync_literal(b"a X {1+}\r\n")
    assert ends_with_nonsync_literal(b"a X {1+}\n")
    assert not ends_with_nonsync_literal(b"a X {1}\r\n")
    assert not ends_with_nonsync_literal(b"a X {1+} \r\n")


# ---- too long ------------------------------------------------------------------------------------

def test_line_longer_than_the_buffer():
    line = b"a LOGIN " + b"x" * 100 + b"\r\n"
    e = too_long(line, 50)
    assert e.tag == b"a "
    assert e.data == line


def test_command_exactly_at_the_limit_fits():
    line = b"a LOGIN xx yy\r\n"
    assert parse(line, limit=len(line))[0].args == [b"xx", b"yy"]
    too_long(line, len(line) - 1)


def test_synchronising_literal_too_big_is_refused_before_continuation():
    line = b"a LOGIN {100}\r\n"
    io = FakeIO(b"x" * 100 + b"\r\n")
    with pytest.raises(TooLong) as e:
        parse_command(line, io, 64)
    assert io.continues == []              # no `+ OK`: the client never sends the bytes
    assert io.consumed == 0
    assert e.value.tag == b"a "


def test_non_synchronising_literal_too_big():
    e = too_long(b"a LOGIN {100+}\r\n" + b"x" * 100 + b" y\r\n", 64)
    assert e.tag == b"a "


def test_literal_budget_counts_the_whole_command():
    head = b"a LOGIN {10+}\r\n"
    body = b"0123456789 y\r\n"
    assert parse(head + body, limit=len(head) + len(body))[0].args == [b"0123456789", b"y"]
    too_long(head + body, len(head) + len(body) - 1)


def test_literal_length_with_many_digits_is_too_long_not_a_crash():
    e = too_long(b"a LOGIN {" + b"9" * 5000 + b"}\r\nabc\r\n", 8192)
    assert e.tag == b"a "
    e = too_long(b"a LOGIN {18446744073709551616}\r\nabc\r\n", 4096)


def test_segment_after_literal_is_bounded_by_the_commands_budget():
    head = b"a LOGIN {10+}\r\n"
    io = FakeIO(b"0123456789" + b" " + b"y" * 100 + b"\r\n")
    with pytest.raises(TooLong) as e:
        parse_command(head, io, 64)
    assert io.asked == 64 - len(head) - 10          # the reader is never asked for more
    assert e.value.tag == b"a "


def test_segment_after_literal_that_overflows_the_reader():
    line = b"a LOGIN {1+}\r\n"
    io = FakeIO(b"x" + b"y" * 50)          # no LF: the reader's buffer filled up
    with pytest.raises(TooLong) as e:
        parse_command(line, io, 4096)
    assert e.value.tag == b"a "
    assert e.value.data.startswith(line)


# ---- ID (our addition) ---------------------------------------------------------------------------

@pytest.mark.parametrize("line,items", [
    (b"a ID NIL\r\n", None),
    (b"a ID nil\r\n", None),
    (b'a ID ("name" "Thunderbird" "version" "115.0")\r\n',
     [b"name", b"Thunderbird", b"version", b"115.0"]),
    (b'a ID ("name" NIL)\r\n', [b"name", None]),
    (b"a ID ()\r\n", []),
    (b'a ID  ( "x"   "y" )  \r\n', [b"x", b"y"]),
    (b'a ID ("a\\"b" "c d")\r\n', [b'a"b', b"c d"]),
])
def test_id(line, items):
    cmd, _ = parse(line)
    assert cmd.verb == "ID"
    assert cmd.args == items


def test_id_with_literals():
    cmd, io = parse(b'a ID ("name" {3}\r\nabc)\r\n')
    assert cmd.args == [b"name", b"abc"]
    assert len(io.continues) == 1
    cmd, io = parse(b'a ID ({4+}\r\nname {1+}\r\nx "v" "w")\r\n')
    assert cmd.args == [b"name", b"x", b"v", b"w"]
    assert io.continues == []


@pytest.mark.parametrize("line", [
    b"a ID\r\n", b"a ID \r\n", b"a ID foo\r\n", b'a ID ("x" "y"\r\n', b"a ID NIL x\r\n",
    b'a ID ("x" foo)\r\n', b"a ID (\r\n", b'a ID ("x") y\r\n', b'a ID "x"\r\n',
])
def test_bad_id(line):
    assert error(line).tag == b"a "


# ---- AUTHENTICATE continuation lines -------------------------------------------------------------

def test_sasl_lines():
    assert parse_sasl_line(b"dGVzdA==\r\n") == b"dGVzdA=="
    assert parse_sasl_line(b"dGVzdA==\n") == b"dGVzdA=="
    assert parse_sasl_line(b"abc def\r\n") == b"abc"
    assert parse_sasl_line(b"\r\n") == b""
    assert parse_sasl_line(b"*\r\n") == b"*"
    with pytest.raises(ParseError) as e:
        parse_sasl_line(b"ab\rc\r\n", b"t ")
    assert e.value.tag == b"t "


# ---- capability line -----------------------------------------------------------------------------

DEFAULT_CAPS = ["IMAP4", "IMAP4rev1", "UIDPLUS"]


@pytest.mark.parametrize("methods,starttls,tls,expected", [
    (["plain"], "off", False, b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN\r\n"),
    (["plain"], "on", False, b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN STARTTLS\r\n"),
    (["plain"], "only", False,
     b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS STARTTLS LOGINDISABLED\r\n"),
    (["plain"], "on", True, b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN\r\n"),
    (["plain"], "only", True, b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN\r\n"),
    (["external", "cram-md5", "login", "plain"], "off", False,
     b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5 "
     b"AUTH=EXTERNAL\r\n"),
    (["cram-md5"], "off", False, b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=CRAM-MD5\r\n"),
])
def test_capability_line(methods, starttls, tls, expected):
    assert capability_line(DEFAULT_CAPS, methods, starttls, tls) == expected


def test_capability_line_custom_words():
    assert (capability_line(["IMAP4rev1", "SASL-IR", "ID"], ["plain"])
            == b"* CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN\r\n")
    assert capability_line([], []) == b"* CAPABILITY\r\n"


# ---- backend login replies -----------------------------------------------------------------------

def test_login_reply_ok():
    check_login_reply(b"a1 OK Logged in\r\n", b"a1 ")
    check_login_reply(b"* CAPABILITY IMAP4rev1\r\na1 OK Logged in\r\n", b"a1 ")


@pytest.mark.parametrize("buf,text", [
    (b"a1 NO [AUTHENTICATIONFAILED] backend says no\r\n",
     b"NO [AUTHENTICATIONFAILED] backend says no\r\n"),
    (b"a2 OK wrong tag\r\n", b"a2 OK wrong tag\r\n"),
    (b"* BYE going away\r\na1 NO x\r\n", b"NO x\r\n"),
    (b"* A\r\n* B\r\na1 OK\r\n", b"* B\r\na1 OK\r\n"),      # only one untagged line
    (b"a1 BAD\r\n", b"BAD\r\n"),
])
def test_login_reply_rejected(buf, text):
    with pytest.raises(BackendRejected) as e:
        check_login_reply(buf, b"a1 ")
    assert e.value.reply == buf
    assert e.value.text == text


def test_login_reply_completion():
    assert backend_login_complete(b"a1 OK\r\n")
    assert not backend_login_complete(b"* CAPABILITY X\r\n")
    assert not backend_login_complete(b"* CAPABILITY X\r\na\r\n")
    assert backend_login_complete(b"* CAPABILITY X\r\na1 OK\r\n")


def test_backend_id_command():
    line = backend_id_command([("x-originating-ip", "192.0.2.1"), ("x-originating-port", 4321),
                               ("x-session-id", 'a"b\\c')])
    assert line == (b'mailproxy-id ID ("x-originating-ip" "192.0.2.1" "x-originating-port" '
                    b'"4321" "x-session-id" "a\\"b\\\\c")\r\n')
    assert imap.backend_id_complete(b"* ID NIL\r\nmailproxy-id OK done\r\n")
    assert imap.backend_id_complete(b"mailproxy-id BAD unknown\r\n")
    assert not imap.backend_id_complete(b"* ID NIL\r\n")


# ---- robustness: random input never escapes the two error types, memory stays bounded ------------

def test_fuzz():
    rng = random.Random(1234)
    alphabet = [b"a", b"A", b"1", b" ", b" ", b'"', b"\\", b"{", b"}", b"+", b"\r", b"\n", b"(",
                b")", b"LOGIN", b"ID", b"NIL", b"{3}", b"{2+}", b"\x00", b"\xff", b"5", b"x"]
    for _ in range(3000):
        data = b"t " + b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30))) + b"\n"
        limit = rng.choice([16, 64, 4096])
        i = data.index(b"\n")
        if i + 1 > limit:
            continue
        io = FakeIO(data[i + 1:] + b"\n")
        try:
            cmd = parse_command(data[:i + 1], io, limit)
        except (ParseError, TooLong):
            continue
        assert isinstance(cmd, Command)
        assert cmd.size <= limit
        assert cmd.verb in imap.COMMANDS
