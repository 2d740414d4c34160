"""Fixtures of the integration suite: real Dovecot, Postfix, HAProxy and nginx started from
temporary configurations (see tests/support/realservers.py), mailproxy between them and real clients.

Every test here carries the `integration` marker (`python3 -m pytest -m integration`). A
program that is not installed fails the test when CI=true and skips it otherwise; install them
with `.ci/install-integration`.
"""

import imaplib
import poplib
import socket

import pytest

from tests.support import realservers
from tests.support.realservers import CLIENT_IP, USERS, Dovecot, Postfix, TempDir, need


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "integration: runs mailproxy against real mail software from Debian's "
                   "packages (install with .ci/install-integration)")


def pytest_report_header(config):
    try:
        found = realservers.versions()
    except Exception:          # never break collection over a version string
        return None
    return "integration: " + "; ".join(f"{k} {v}" for k, v in found.items() if v)


@pytest.fixture(scope="session")
def dovecot(request):
    need("dovecot", "openssl")
    pki = request.getfixturevalue("pki")       # tests/support/certs.py: Dovecot offers TLS too
    tmp = TempDir("mailproxy-dovecot-")
    d = Dovecot(tmp.path, USERS, cert=pki.server_rsa)
    yield d
    d.stop()
    tmp.cleanup()


@pytest.fixture
def dovecot_log(dovecot):
    """Dovecot's log from the start of this test on."""
    dovecot.log.mark()
    return dovecot.log


@pytest.fixture(scope="session")
def postfix(dovecot):
    need("postfix")
    tmp = TempDir("mailproxy-postfix-")
    p = Postfix(tmp.path, mailboxes=("alice", "bob", "carol"), sasl_path=str(dovecot.auth_socket))
    yield p
    p.stop()
    tmp.cleanup()


@pytest.fixture
def postfix_log(postfix):
    postfix.log.mark()
    return postfix.log


@pytest.fixture
def workdir():
    """A traversable temporary folder for one test's daemons."""
    tmp = TempDir()
    yield tmp.path
    tmp.cleanup()


@pytest.fixture
def children():
    """Register started realservers.Child objects; stopped (by pid) in teardown."""
    started = []
    yield started
    for c in reversed(started):
        c.stop()


# ---------------------------------------------------------------------------------------------
# clients connecting from CLIENT_IP

class IMAPFrom(imaplib.IMAP4):
    def __init__(self, host, port, source=CLIENT_IP, timeout=10):
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))


class POP3From(poplib.POP3):
    def __init__(self, host, port, source=CLIENT_IP, timeout=10):
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))


@pytest.fixture
def imap_from():
    made = []

    def make(port, source=CLIENT_IP):
        c = IMAPFrom("127.0.0.1", port, source)
        made.append(c)
        return c
    yield make
    for c in made:
        try:
            c.shutdown()
        except Exception:
            pass


@pytest.fixture
def pop3_from():
    made = []

    def make(port, source=CLIENT_IP):
        c = POP3From("127.0.0.1", port, source)
        made.append(c)
        return c
    yield make
    for c in made:
        try:
            c.close()
        except Exception:
            pass
