"""nginx's configuration syntax, read as nginx reads it (ngx_conf_read_token, ngx_conf_parse,
ngx_conf_include): words, quotes, backslash escapes, `#` comments, `;`, `{}` blocks and
`include` with globs; `${var}` is kept as written. Pure but for reading the files.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional

# ngx_conf_read_token's results
_OK, _BLOCK_START, _BLOCK_DONE, _EOF = "ok", "block", "done", "eof"
_SPACE = " \t\r\n"
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "t": "\t", "r": "\r", "n": "\n"}
MAX_INCLUDE_DEPTH = 32      # nginx has none; a file including itself would never end


class NginxSyntaxError(Exception):
    """nginx-shaped: `MESSAGE in FILE:LINE`."""

    def __init__(self, message: str, file: Optional[str] = None, line: Optional[int] = None):
        super().__init__(message)
        self.message, self.file, self.line = message, file, line

    def __str__(self) -> str:
        if self.file:
            return "%s in %s:%s" % (self.message, self.file, self.line)
        return self.message


@dataclass
class Directive:
    name: str
    args: List[str]
    file: str
    line: int
    block: Optional[List["Directive"]] = field(default=None)

    def where(self) -> str:
        return "%s:%d" % (self.file, self.line)


def _unescape(raw: str) -> str:
    """The word's text as ngx_conf_read_token copies it: \\" \\' \\\\ \\t \\r \\n, other
    backslashes kept."""
    out, i = [], 0
    while i < len(raw):
        c = raw[i]
        if c == "\\" and i + 1 < len(raw) and raw[i + 1] in _ESCAPES:
            out.append(_ESCAPES[raw[i + 1]])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


class _Tokens:
    """ngx_conf_read_token over one file's text: `next()` -> (kind, words, line of the first
    word)."""

    def __init__(self, text: str, file: str):
        self.text, self.file = text, file
        self.pos, self.line = 0, 1

    def error(self, message: str) -> NginxSyntaxError:
        return NginxSyntaxError(message, self.file, self.line)

    def next(self):
        text, n = self.text, len(self.text)
        words: List[str] = []
        first_line = None
        last_space, need_space, sharp, quoted = True, False, False, False
        d_quoted = s_quoted = variable = False
        start = 0
        while True:
            if self.pos >= n:
                if words or not last_space:
                    raise self.error('unexpected end of file, expecting ";" or "}"')
                return _EOF, words, first_line or self.line
            ch = text[self.pos]
            self.pos += 1
            if ch == "\n":
                self.line += 1
                sharp = False
            if sharp:
                continue
            if quoted:
                quoted = False
                continue
            if need_space:
                if ch in _SPACE:
                    last_space, need_space = True, False
                    continue
                if ch == ";":
                    return _OK, words, first_line
                if ch == "{":
                    return _BLOCK_START, words, first_line
                if ch == ")":
                    last_space, need_space = True, False
                else:
                    raise self.error('unexpected "%s"' % ch)
            if last_space:
                start = self.pos - 1
                if ch in _SPACE:
                    continue
                if ch in ";{":
                    if not words:
                        raise self.error('unexpected "%s"' % ch)
                    return (_BLOCK_START if ch == "{" else _OK), words, first_line
                if ch == "}":
                    if words:
                        raise self.error('unexpected "}"')
                    return _BLOCK_DONE, words, self.line
                if ch == "#":
                    sharp = True
                    continue
                if first_line is None:
                    first_line = self.line
                last_space = False
                if ch == "\\":
                    quoted = True
                elif ch == '"':
                    start += 1
                    d_quoted = True
                elif ch == "'":
                    start += 1
                    s_quoted = True
                elif ch == "$":
                    variable = True
                continue
            if ch == "{" and variable:
                continue
            variable = False
            if ch == "\\":
                quoted = True
                continue
            if ch == "$":
                variable = True
                continue
            found = False
            if d_quoted:
                if ch == '"':
                    d_quoted, need_space, found = False, True, True
            elif s_quoted:
                if ch == "'":
                    s_quoted, need_space, found = False, True, True
            elif ch in _SPACE or ch in ";{":
                last_space, found = True, True
            if found:
                words.append(_unescape(text[start:self.pos - 1]))
                if ch == ";":
                    return _OK, words, first_line
                if ch == "{":
                    return _BLOCK_START, words, first_line


def read_file(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def parse(text: str, file: str = "nginx.conf", *, conf_prefix: Optional[str] = None,
          reader: Callable[[str], str] = read_file) -> List[Directive]:
    """The directives of `text` as a tree; `include` is replaced by the directives of the files
    it names (relative to `conf_prefix`, the main file's folder as nginx's cycle->conf_prefix;
    a pattern with * ? [ may match none, a plain name must exist). NginxSyntaxError on errors."""
    if conf_prefix is None:
        conf_prefix = os.path.dirname(os.path.abspath(file))
    return _parse_file(text, file, conf_prefix, reader, 0)


def load(path: str) -> List[Directive]:
    """The file at `path` (made absolute) parsed with its includes."""
    path = os.path.abspath(path)
    try:
        text = read_file(path)
    except OSError as e:
        raise NginxSyntaxError('open() "%s" failed (%d: %s)' % (path, e.errno or 0,
                                                               e.strerror)) from None
    return parse(text, path)


def _parse_file(text, file, conf_prefix, reader, depth):
    tokens = _Tokens(text, file)
    stack: List[List[Directive]] = [[]]
    opened: List[Directive] = []
    while True:
        kind, words, line = tokens.next()
        if kind == _EOF:
            if opened:
                raise tokens.error('unexpected end of file, expecting "}"')
            return stack[0]
        if kind == _BLOCK_DONE:
            if not opened:
                raise tokens.error('unexpected "}"')
            opened.pop()
            stack.pop()
            continue
        d = Directive(words[0], words[1:], file, line)
        if kind == _BLOCK_START:
            d.block = []
            stack[-1].append(d)
            stack.append(d.block)
            opened.append(d)
            continue
        if d.name == "include":
            stack[-1].extend(_include(d, conf_prefix, reader, depth))
            continue
        stack[-1].append(d)


def _include(d, conf_prefix, reader, depth):
    if len(d.args) != 1:
        raise NginxSyntaxError('invalid number of arguments in "include" directive',
                               d.file, d.line)
    if depth >= MAX_INCLUDE_DEPTH:
        raise NginxSyntaxError("includes nested deeper than %d" % MAX_INCLUDE_DEPTH,
                               d.file, d.line)
    pattern = d.args[0]
    full = pattern if pattern.startswith("/") else os.path.join(conf_prefix, pattern)
    if any(c in pattern for c in "*?["):
        names = sorted(glob.glob(full))      # ngx_open_glob: glob(3), sorted, none is fine
    else:
        names = [full]
    out: List[Directive] = []
    for name in names:
        try:
            text = reader(name)
        except OSError as e:
            raise NginxSyntaxError('open() "%s" failed (%d: %s)' % (name, e.errno or 0,
                                                                   e.strerror),
                                   d.file, d.line) from None
        out.extend(_parse_file(text, name, conf_prefix, reader, depth + 1))
    return out
