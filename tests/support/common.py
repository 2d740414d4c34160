"""Small helpers every part of the test support shares: paths, line ends, base64, polling, the
recording error log, and the check that makes a fake's unexpected errors fail the test."""

import base64
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
CRLF = b"\r\n"
# MAIL and RCPT as smtplib writes them: "mail FROM:<a>" up to Python 3.12, "mail from:<a>" on 3.13
SMTPLIB_MAIL, SMTPLIB_RCPT = (("mail from:", "rcpt to:") if sys.version_info >= (3, 13)
                              else ("mail FROM:", "rcpt TO:"))

CLOSE = "close"      # auth respond() result / script step: close without a reply
RESET = "reset"      # close with RST (SO_LINGER 0)
HANG = "hang"        # never answer (until the server stops or the peer closes)


class RecordingLog:
    """An ErrorLog stand-in for in-process tests: every line kept as (level, message)."""

    def __init__(self):
        self.lines = []

    def enabled(self, level):
        return True

    def log(self, level, message, conn=None):
        self.lines.append((level, message))


def b64(data):
    """base64 of str/bytes as str (the SASL wire form)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def unb64(text):
    if isinstance(text, bytes):
        text = text.decode("ascii")
    return base64.b64decode(text)


def wait_for(predicate, timeout=3.0, interval=0.01, what="condition"):
    """Poll `predicate` until truthy (returns its value) or raise AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def to_bytes(data):
    if isinstance(data, str):
        return data.encode("utf-8")
    return bytes(data)


def as_line(data):
    """str/bytes -> bytes ending in CRLF (a str or bytes without a line end gets CRLF)."""
    data = to_bytes(data)
    if not data.endswith(b"\n"):
        data += CRLF
    return data


_opened = []


def track(resource, close=None):
    """Register a client-side resource (socket, line client, poplib/imaplib/smtplib object) the
    helper that made it hands to a test; the autouse fixture `close_tracked` closes it after the
    test, so a test that stops midway (or does not close) leaves no socket open."""
    _opened.append(close or resource.close)
    return resource


def close_all_tracked():
    while _opened:
        close = _opened.pop()
        try:
            close()
        except OSError:
            pass


def fail_on_errors(fake, what):
    """Fail the test if `fake` (an auth service, backend or DNS server) recorded an error it did
    not expect: an exception in a handler thread or a request it could not parse. A test that
    provokes such errors on purpose sets `fake.expect_errors = True`."""
    if fake.errors and not getattr(fake, "expect_errors", False):
        errors = list(fake.errors)
        fake.errors.clear()
        pytest.fail(f"{what} met unexpected errors: {errors!r}", pytrace=False)


class OwnsSocket:
    """close() and `with` for a test client holding its socket in `self.sock`."""

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
