"""The unit layer: conversations and the session driver with no socket and no subprocess.

Every test here runs with the network and process creation taken away (`no_io`, autouse):
a test that reaches for a socket, a name lookup, a subprocess or a fork fails loudly, even
when the code under test catches OSError or Exception.  Warnings are errors in this layer.

Fixtures: `conf(protocol, **directives)` builds a real ServerConf (config.load, no socket);
`imap(...)` and `make_conv(...)` an IMAP and an SMTP conversation past its greeting on one;
`no_io` is the guard (its `.attempts` lists what was refused).  Non-fixture helpers are in
playbook.py.
"""

from __future__ import annotations

import _socket
import os
import socket
import subprocess
from pathlib import Path

import pytest

from mailproxy.conversation import Reply, RestartTimer
from mailproxy.imap import ImapConversation
from mailproxy.smtp import SmtpConversation
from playbook import IOInUnitTest, make_conf

HERE = Path(__file__).resolve().parent


# (module, attribute) pairs taken away from every unit test
BLOCKED = (
    [(socket, name) for name in (
        "socket", "socketpair", "create_connection", "create_server", "fromfd",
        "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo")]
    + [(_socket, name) for name in ("socket", "socketpair", "getaddrinfo")]
    + [(subprocess, name) for name in ("Popen",)]
    + [(os, name) for name in (
        "fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp",
        "execv", "execve", "execvp", "execvpe") if hasattr(os, name)]
)


class Guard:
    def __init__(self):
        self.attempts: list = []

    def blocker(self, module, name):
        what = "%s.%s" % (module.__name__, name)

        def refuse(*args, **kwargs):
            self.attempts.append(what)
            raise IOInUnitTest("%s called in a unit test (tests/unit has no network and no "
                               "processes)" % what)
        refuse.__name__ = name
        return refuse


@pytest.fixture(autouse=True)
def no_io(monkeypatch):
    """Sockets, name lookups, subprocesses and forks raise IOInUnitTest; teardown fails the
    test if anything tried (in case the code under test swallowed even that)."""
    guard = Guard()
    for module, name in BLOCKED:
        monkeypatch.setattr(module, name, guard.blocker(module, name))
    yield guard
    monkeypatch.undo()
    assert not guard.attempts, "unit test used I/O: %s" % ", ".join(guard.attempts)


@pytest.fixture
def conf(tmp_path):
    """conf(protocol, **directives) -> a complete ServerConf from config.load (see
    playbook.make_conf); directive values are nginx text ("plain apop", "on", "3")."""
    def build(protocol="pop3", **directives):
        return make_conf(tmp_path, protocol, **directives)
    return build


@pytest.fixture
def imap(conf):
    """imap(tls=False, **directives) -> an ImapConversation past its greeting (directives as
    for `conf`)."""
    def make(tls=False, **directives):
        conv = ImapConversation(conf("imap", **directives), tls=tls)
        assert conv.start() == [Reply(b"* OK IMAP4 ready\r\n")]
        return conv
    return make


@pytest.fixture
def make_conv(conf):
    """make_conv(tls=False, **directives) -> an SmtpConversation past its greeting (no
    resolver, no delay; directives as for `conf`)."""
    def make(tls=False, **directives):
        conv = SmtpConversation(conf("smtp", **directives), tls=tls)
        assert conv.start() == [RestartTimer(), Reply(b"220 mx.example.test ESMTP ready\r\n")]
        return conv
    return make


def pytest_collection_modifyitems(config, items):
    # Warnings are errors in the unit layer (an unclosed file or a deprecated call fails).
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.filterwarnings("error"))
