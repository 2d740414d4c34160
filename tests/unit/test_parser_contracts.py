"""What the protocol modules promise beyond what a conversation reaches: imap_parse's `io`
contract (a reader that gives up with LineTooLong), the parsed commands' equality and repr (what
a failing test prints), and the sasl helpers kept for callers other than the conversations."""

import base64

import pytest

from mailproxy import imap_parse, sasl, smtp
from mailproxy.clientio import LineTooLong


class GivingUpReader:
    """imap_parse's io over a stream that ends the literal's following line too early:
    `read_exact` serves `data`, `readline` raises LineTooLong with what it had."""

    def __init__(self, data, partial):
        self.data, self.partial = data, partial
        self.continued = 0

    def continue_literal(self):
        self.continued += 1

    def read_exact(self, n):
        assert n == len(self.data)
        return self.data

    def readline(self, limit):
        raise LineTooLong(self.partial)


def test_imap_reader_giving_up_after_a_literal_is_too_long():
    io = GivingUpReader(b"alice", b" secret-without-end")
    with pytest.raises(imap_parse.TooLong) as caught:
        imap_parse.parse_command(b"a1 LOGIN {5}\r\n", io, 64)
    assert (caught.value.tag, caught.value.data) == (
        b"a1 ", b"a1 LOGIN {5}\r\nalice secret-without-end")
    assert io.continued == 1


def test_imap_command_repr():
    cmd = imap_parse.parse_command(b'a1 ID ("name" NIL)\r\n', None, 4096)
    assert repr(cmd) == "Command(b'a1 ', 'ID', [b'name', None])"


def test_smtp_command_equality_and_repr():
    cmd = smtp.parse_command(b"MAIL FROM:<a@example.test>  SIZE=10\r\n")
    same = smtp.Command("MAIL", [b"FROM:<a@example.test>", b"SIZE=10"],
                        b"MAIL FROM:<a@example.test>  SIZE=10")
    assert cmd == same and not cmd != same
    assert cmd != smtp.Command("MAIL", [b"FROM:<a@example.test>"], b"MAIL FROM:<a@example.test>")
    assert cmd != ("MAIL", [b"FROM:<a@example.test>", b"SIZE=10"])
    assert repr(cmd) == ("Command('MAIL', [b'FROM:<a@example.test>', b'SIZE=10'], "
                         "b'MAIL FROM:<a@example.test>  SIZE=10')")


def test_cram_md5_challenge_leaves_out_a_line_end():
    salt = b"<1896.697170952@mx.example.test>"
    assert sasl.cram_md5_challenge(salt) == base64.b64encode(salt)
    assert sasl.cram_md5_challenge(salt + b"\r\n") == base64.b64encode(salt)


def test_encode_plain():
    assert sasl.encode_plain(b"alice", b"secret") == b"AGFsaWNlAHNlY3JldA=="
    assert sasl.decode_plain(sasl.encode_plain(b"a b", b"p w")) == (b"a b", b"p w")
