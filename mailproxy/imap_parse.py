"""The IMAP command parser (a pure piece of imap.py, tested without sockets).

`parse_command` reads the rest of a command with literals from any object with `readline()`,
`read_exact(n)` and `continue_literal()`; `parse_sasl_line` takes an AUTHENTICATE continuation
line.  It follows nginx's ngx_mail_imap_parse_command, with these corrections:

* an unterminated quoted string is a syntax error of its own line (nginx cuts it at the line
  end and leaks the "inside quotes" state into the next command);
* a tag must have at least one character (nginx takes a line starting with a space as an empty
  tag); `{}` / `{+}` (no digits) are syntax errors, and `{0}` is an empty literal (nginx takes
  one byte for it); only one CR may precede the LF after a literal announcement;
* a synchronising literal that cannot fit in `imap_client_buffer` is refused at once as a too
  long command, before `+ OK` (nginx says `+ OK`, lets the client send, then refuses);
* `ID` is parsed (a parenthesised list of strings, or NIL), as our addition.

Commands are bounded as a whole (line, literals, continuation lines) by `imap_client_buffer`,
so no command ever holds more than that in memory.
"""

from __future__ import annotations

import re
from typing import Any, List, Optional

from .clientio import LineTooLong

MAX_TAG = 32                # tag characters (since nginx 1.21.0)
MAX_ARGS = 3                # arguments per command (nginx's args array check)

# Command words ngx_mail_imap_parse_command knows, and ID (ours); any other is a parser error.
COMMANDS = frozenset(("NOOP", "LOGIN", "LOGOUT", "STARTTLS", "CAPABILITY", "AUTHENTICATE", "ID"))

_TAG_RE = re.compile(rb"[A-Za-z0-9._-]{1,%d} " % MAX_TAG)
_WORD_RE = re.compile(rb"[A-Za-z]+")
_SPACES_RE = re.compile(rb" *")
_ATOM_RE = re.compile(rb"[^ \r\n]+")
_LIST_ATOM_RE = re.compile(rb"[^ ()\r\n\"{]+")
_QUOTED_RE = re.compile(rb'"((?:[^"\\\r\n]|\\[^\r\n])*)"')
_UNESCAPE_RE = re.compile(rb"\\(.)", re.S)
_LITERAL_RE = re.compile(rb"\{([0-9]+)(\+?)\}\r?\n\Z")
_MAX_DIGITS = 18            # longer literal lengths are "too long" without converting them


class ParseError(Exception):
    """A command rejected by the parser (counts towards max_errors).

    `tag` is the tag with its space when the tag was complete and valid, else None (the reply
    is then untagged). `close` is the {N+} safety rule: the line ended in a non-synchronising
    literal announcement, whose bytes would otherwise be executed as commands.
    """

    def __init__(self, tag: Optional[bytes], close: bool = False, why: str = ""):
        super().__init__(why or "invalid command")
        self.tag = tag
        self.close = close


class TooLong(Exception):
    """The command does not fit in the client buffer: answered, then the session closes."""

    def __init__(self, tag: Optional[bytes], data: bytes):
        super().__init__("too long command")
        self.tag = tag
        self.data = data


class Command:
    """One parsed command: tag (bytes with its space), verb (upper-case str), args (bytes)."""

    __slots__ = ("tag", "verb", "args", "size")

    def __init__(self, tag: bytes, verb: str, args: Optional[List[Optional[bytes]]], size: int):
        self.tag = tag
        self.verb = verb
        self.args = args            # ID: the list items, None standing for NIL
        self.size = size            # bytes the command took from the client

    def __repr__(self):
        return "Command(%r, %r, %r)" % (self.tag, self.verb, self.args)


def ends_with_nonsync_literal(line: bytes) -> bool:
    """nginx's safety check on a skipped line: does it end in `+}` (before CR LF / LF)?"""
    if line.endswith(b"\n"):
        line = line[:-1]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line.endswith(b"+}")


def tag_of(data: bytes) -> Optional[bytes]:
    """The tag (with its space) at the start of `data` if it is complete and valid, else None."""
    m = _TAG_RE.match(data)
    return m.group() if m else None


class _Scanner:
    """One command being parsed: the current line segment, position, and byte budget."""

    def __init__(self, line, io, limit):
        self.io = io
        self.limit = limit
        self.line = line
        self.pos = 0
        self.used = len(line)
        self.tag = None
        self.seen = [line]          # the command's segments so far (for the too-long log)
        if self.used > limit:
            raise TooLong(tag_of(line), line)

    # ---- errors ------------------------------------------------------------------------------

    def invalid(self, why=""):
        raise ParseError(self.tag, ends_with_nonsync_literal(self.line), why)

    def too_long(self, data=None):
        if data is None:
            data = b"".join(self.seen)
        raise TooLong(self.tag, data)

    # ---- small scanning steps ------------------------------------------------------------------

    def peek(self):
        line, pos = self.line, self.pos
        return line[pos:pos + 1]

    def skip_spaces(self):
        self.pos = _SPACES_RE.match(self.line, self.pos).end()

    def at_end(self):
        """True at the line end (CR LF or LF); a CR followed by anything else is invalid."""
        c = self.peek()
        if c == b"\n":
            return True
        if c == b"\r":
            if self.line[self.pos + 1:self.pos + 2] == b"\n":
                return True
            self.invalid("CR not followed by LF")
        return False

    def quoted(self):
        m = _QUOTED_RE.match(self.line, self.pos)
        if m is None:
            # unterminated (or a backslash before the line end): a syntax error of this line
            self.invalid("unterminated quoted string")
        self.pos = m.end()
        value = m.group(1)
        if b"\\" in value:
            value = _UNESCAPE_RE.sub(rb"\1", value)
        return value

    def literal(self, followers):
        """`{n}` / `{n+}` ending the line: the n bytes that follow, verbatim.

        Afterwards the scanner is on the next segment, whose first byte must be in `followers`
        (or the line end).
        """
        m = _LITERAL_RE.match(self.line, self.pos)
        if m is None:
            self.invalid("bad literal")
        digits, plus = m.group(1), m.group(2)
        room = self.limit - self.used - 1           # at least the LF must follow the data
        n = int(digits) if len(digits) <= _MAX_DIGITS else room + 1
        if n > room:
            self.too_long()
        if not plus:
            self.io.continue_literal()
        try:
            data = self.io.read_exact(n) if n else b""
            self.used += n
            self.seen.append(data)
            line = self.io.readline(self.limit - self.used)
        except LineTooLong as e:
            self.seen.append(e.data)
            self.too_long()
        self.used += len(line)
        self.seen.append(line)
        self.line, self.pos = line, 0
        if self.used > self.limit:
            self.too_long()
        c = line[:1]
        if c not in followers and c not in (b"\r", b"\n"):
            self.invalid("bad character after literal")
        return data

    # ---- the grammar -----------------------------------------------------------------------------

    def command(self):
        m = _TAG_RE.match(self.line)
        if m is None:
            self.invalid("bad tag")
        self.tag = m.group()
        self.pos = m.end()
        self.skip_spaces()
        m = _WORD_RE.match(self.line, self.pos)
        if m is None:
            self.invalid("bad command word")
        self.pos = m.end()
        if self.peek() not in (b" ", b"\r", b"\n"):
            self.invalid("bad command word")
        verb = m.group().upper().decode("ascii")
        if verb not in COMMANDS:
            self.invalid("unknown command")
        if verb == "ID":
            args = self.id_params()
        else:
            args = self.arguments()
        return Command(self.tag, verb, args, self.used)

    def arguments(self):
        """Up to three atoms, quoted strings or literals, separated by spaces."""
        args = []
        while True:
            self.skip_spaces()
            if self.at_end():
                return args
            if len(args) >= MAX_ARGS:
                self.invalid("too many arguments")
            c = self.peek()
            if c == b'"':
                args.append(self.quoted())
            elif c == b"{":
                args.append(self.literal((b" ",)))
            else:
                m = _ATOM_RE.match(self.line, self.pos)
                self.pos = m.end()
                args.append(m.group())

    def id_params(self):
        """`ID NIL` or `ID (string nstring ...)`: the items (None for NIL) or None for NIL."""
        if self.peek() != b" ":
            self.invalid("ID without arguments")
        self.skip_spaces()
        if self.peek() == b"(":
            self.pos += 1
            items = []
            while True:
                self.skip_spaces()
                c = self.peek()
                if c == b")":
                    self.pos += 1
                    break
                if c == b'"':
                    items.append(self.quoted())
                elif c == b"{":
                    items.append(self.literal((b" ", b")")))
                else:
                    m = _LIST_ATOM_RE.match(self.line, self.pos)
                    if m is None or m.group().upper() != b"NIL":
                        self.invalid("bad ID list item")
                    self.pos = m.end()
                    items.append(None)
            args = items
        else:
            m = _ATOM_RE.match(self.line, self.pos)
            if m is None or m.group().upper() != b"NIL":
                self.invalid("bad ID argument")
            self.pos = m.end()
            args = None
        self.skip_spaces()
        if not self.at_end():
            self.invalid("junk after ID arguments")
        return args


def parse_command(line: bytes, io: Any, limit: int) -> Command:
    """Parse one command starting with `line` (a line including its LF, at most `limit` bytes).

    `io` supplies the rest of a command with literals: `continue_literal()` is called before the
    bytes of a synchronising literal are awaited (the client gets `+ OK`), `read_exact(n)` and
    `readline(limit)` return client bytes (and raise clientio.LineTooLong when no LF comes
    within `limit` bytes).
    Returns a Command; raises ParseError or TooLong.
    """
    return _Scanner(line, io, limit).command()


def parse_sasl_line(line: bytes, tag: Optional[bytes] = None) -> bytes:
    """An AUTHENTICATE continuation line -> its first token (the base64 response).

    Raises ParseError (with `tag`) for a CR that does not end the line.
    """
    content = line[:-1] if line.endswith(b"\n") else line
    if content.endswith(b"\r"):
        content = content[:-1]
    if b"\r" in content:
        raise ParseError(tag, ends_with_nonsync_literal(line), "CR not followed by LF")
    return content.split(b" ", 1)[0]

