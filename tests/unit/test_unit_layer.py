"""The unit layer's own promises: no network and no processes, and a real configuration."""

import os
import socket
import subprocess

import pytest

from mailproxy.config import AuthURL
from playbook import IOInUnitTest


@pytest.mark.parametrize("call", [
    lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
    lambda: socket.socketpair(),
    lambda: socket.create_connection(("127.0.0.1", 9)),
    lambda: socket.getaddrinfo("localhost", 110),
    lambda: subprocess.run(["true"]),
    lambda: os.fork(),
], ids=["socket", "socketpair", "create_connection", "getaddrinfo", "subprocess", "fork"])
def test_io_is_refused_loudly(no_io, call):
    try:
        call()
    except OSError:
        pytest.fail("the guard raised an OSError, which the code under test may swallow")
    except Exception:
        pytest.fail("the guard raised an Exception, which the code under test may swallow")
    except IOInUnitTest as e:
        assert "unit test" in str(e)
    else:
        pytest.fail("I/O was allowed in a unit test")
    assert len(no_io.attempts) == 1
    no_io.attempts.clear()          # handled here; teardown would fail the test otherwise


def test_swallowed_attempt_still_fails_in_teardown(no_io):
    # The teardown check, as the fixture runs it: an attempt the code swallowed is reported.
    try:
        socket.socket()
    except BaseException:
        pass
    assert no_io.attempts == ["socket.socket"]
    no_io.attempts.clear()


def test_conf_is_a_real_server_conf(conf):
    c = conf("pop3")
    assert c.protocol == "pop3" and c.server_name == "mx.example.test"
    assert isinstance(c.auth_http[0], AuthURL) and c.proxy_pass is None
    assert c.pop3_auth == ["plain"] and c.starttls == "off" and c.max_errors == 5
    assert c.pop3_capabilities == ["TOP", "USER", "UIDL"]
    c = conf("pop3", pop3_auth="apop cram-md5", starttls="only", max_errors="2",
             pop3_capabilities='TOP "SASL X"')
    assert (c.pop3_auth, c.starttls, c.max_errors) == (["apop", "cram-md5"], "only", 2)
    assert c.pop3_capabilities == ["TOP", "SASL X"]
    assert conf("smtp").protocol == "smtp" and conf("imap").protocol == "imap"


def test_conf_refuses_unknown_directives(conf):
    with pytest.raises(KeyError):
        conf("pop3", pop3_auht="plain")
