"""The SMTP command parser and reply composition as pure functions."""

import pytest

from mailproxy.protocols import PROTOCOLS
from mailproxy.smtp import (Command, ehlo_reply, parse_command, parse_sasl_response,
                            rejected_text, xclient_addr, xtext)


@pytest.mark.parametrize("verb", ["HELO", "EHLO", "AUTH", "QUIT", "NOOP", "MAIL", "RSET", "RCPT",
                                  "VRFY", "EXPN", "HELP", "STARTTLS"])
def test_known_words(verb):
    assert parse_command(verb.encode() + b"\r\n").verb == verb
    assert parse_command(verb.lower().encode() + b"\r\n").verb == verb
    assert parse_command(verb.title().encode() + b" x\n").verb == verb


@pytest.mark.parametrize("line", [
    b"DATA\r\n", b"XCLIENT ADDR=1.2.3.4\r\n", b"EHLOX x\r\n", b"EHL x\r\n", b"\r\n", b"\n",
    b" HELO x\r\n", b"HEL0 x\r\n", b"STARTTLX\r\n", b"BDAT 10\r\n", b"ETRN x\r\n",
    b"HELO\tx\r\n", b"H\xc3LO x\r\n", b"TURN\r\n",
])
def test_parser_errors(line):
    assert parse_command(line) is None


def test_cr_rules():
    assert parse_command(b"NOOP\r\n") == Command("NOOP", [], b"NOOP")
    assert parse_command(b"NOOP\n") == Command("NOOP", [], b"NOOP")       # bare LF is fine
    assert parse_command(b"NOOP\rx\r\n") is None                         # CR not before LF
    assert parse_command(b"HELO a\rb\r\n") is None
    assert parse_command(b"HELO a\r\r\n") is None


def test_arguments_and_spacing():
    c = parse_command(b"HELO  client.example  \r\n")
    assert c.args == [b"client.example"]
    c = parse_command(b"MAIL FROM:<a@b> SIZE=100\r\n")
    assert (c.verb, c.args, c.text) == ("MAIL", [b"FROM:<a@b>", b"SIZE=100"],
                                        b"MAIL FROM:<a@b> SIZE=100")
    # the stored text keeps case and inner spacing, not trailing spaces
    c = parse_command(b"rcpt TO:<c@d>  NOTIFY=NEVER   \r\n")
    assert c.text == b"rcpt TO:<c@d>  NOTIFY=NEVER"
    assert c.args == [b"TO:<c@d>", b"NOTIFY=NEVER"]
    # tabs are not separators
    assert parse_command(b"HELO a\tb\r\n").args == [b"a\tb"]
    assert parse_command(b"MAIL FROM: <a@b>\r\n").args == [b"FROM:", b"<a@b>"]


def test_argument_count_limit():
    eleven = b"HELO " + b" ".join(b"a%d" % i for i in range(11)) + b"\r\n"
    assert len(parse_command(eleven).args) == 11
    twelve = b"HELO " + b" ".join(b"a%d" % i for i in range(12)) + b"\r\n"
    assert parse_command(twelve) is None


def test_command_without_args_text():
    c = parse_command(b"MAIL   \r\n")
    assert c.args == [] and c.text == b"MAIL"


def test_sasl_response():
    assert parse_sasl_response(b"AGFsaWNlAHNlY3JldA==\r\n") == b"AGFsaWNlAHNlY3JldA=="
    assert parse_sasl_response(b"\r\n") == b""
    assert parse_sasl_response(b"*\r\n") == b"*"
    assert parse_sasl_response(b"abc def\r\n") == b"abc"
    assert parse_sasl_response(b"abc\rdef\r\n") is None
    assert parse_sasl_response(b"x " + b" ".join([b"y"] * 10) + b"\r\n") == b"x"
    assert parse_sasl_response(b"x " + b" ".join([b"y"] * 11) + b"\r\n") is None


def test_xtext():
    assert xtext(b"alice") == b"alice"
    assert xtext("usér+x=y".encode()) == b"us+C3+A9r+2Bx+3Dy"
    assert xtext(b"al ice") == b"al+20ice"
    assert xtext(b"a\x7fb~!") == b"a+7Fb~!"


def test_xclient_addr():
    assert xclient_addr("127.0.0.1") == b"127.0.0.1"
    assert xclient_addr("2001:db8::1") == b"IPV6:2001:db8::1"


def test_sasl_mechanisms_order():
    sasl_mechanisms = PROTOCOLS["smtp"].mechanisms
    assert sasl_mechanisms(["external", "login", "none", "cram-md5", "plain"]) == \
        ["PLAIN", "LOGIN", "CRAM-MD5", "EXTERNAL"]
    assert sasl_mechanisms(["none"]) == []


def test_ehlo_defaults():
    assert ehlo_reply(b"mx.example.com", [], ["plain", "login"]) == (
        b"250-mx.example.com\r\n250 AUTH PLAIN LOGIN\r\n")


def test_ehlo_capabilities_and_starttls():
    assert ehlo_reply(b"mx.example.com", ["PIPELINING"], ["plain", "login"], "on") == (
        b"250-mx.example.com\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n")
    assert ehlo_reply(b"mx.example.com", ["PIPELINING"], ["plain", "login"], "only") == (
        b"250-mx.example.com\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
    assert ehlo_reply(b"mx.example.com", [], ["none"], "on") == (
        b"250-mx.example.com\r\n250 STARTTLS\r\n")
    # TLS active: the plain list
    assert ehlo_reply(b"mx", ["8BITMIME"], ["plain"], "only", tls=True) == (
        b"250-mx\r\n250-8BITMIME\r\n250 AUTH PLAIN\r\n")


def test_ehlo_without_auth_line():
    assert ehlo_reply(b"mx", [], ["none"]) == b"250 mx\r\n"
    assert ehlo_reply(b"mx", ["PIPELINING", "SIZE 10485760"], ["none"]) == (
        b"250-mx\r\n250-PIPELINING\r\n250 SIZE 10485760\r\n")
    assert ehlo_reply(b"mx", [], ["plain", "login", "cram-md5", "external", "none"]) == (
        b"250-mx\r\n250 AUTH PLAIN LOGIN CRAM-MD5 EXTERNAL\r\n")


def test_rejected_text():
    assert rejected_text(b"MAIL FROM:<a@b>\r\n") == "MAIL FROM:<a@b>__"
    assert "\x00" not in rejected_text(b"a\x00b")
