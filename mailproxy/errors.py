"""The configuration error, apart from the config package so that the modules that build the
TLS contexts after loading (tls.py, tls_contexts.py) raise it without importing the package."""

from __future__ import annotations

from typing import Optional


class ConfigError(Exception):
    """A configuration problem; str() is nginx-shaped: ``MESSAGE in FILE:LINE``."""

    def __init__(self, message: str, file: Optional[str] = None, line: Optional[int] = None,
                 key: Optional[str] = None):
        super().__init__(message, file, line, key)
        self.message = message
        self.file = file
        self.line = line
        self.key = key

    def __str__(self) -> str:
        if self.file is None:
            return self.message
        if self.line is None:
            return "%s in %s" % (self.message, self.file)
        return "%s in %s:%d" % (self.message, self.file, self.line)
