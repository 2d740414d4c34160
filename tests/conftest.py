"""Fixtures for the end-to-end tests: every process, server and backend started here is stopped
in teardown (only what the test started). A fake (auth service, backend, DNS server) that met
an unexpected error fails the test in teardown; the helpers live in tests/support."""

import pytest

from tests.support.auth import AuthServer
from tests.support.common import close_all_tracked, fail_on_errors
from tests.support.mailbackends import Pop3Backend
from tests.support.process import ProxyProcess, Setup, free_port, server_block

# fixtures kept with their helpers: pki and certs (certs.py), the relay's (relaying.py), dns
pytest_plugins = ["tests.support.certs", "tests.support.relaying", "tests.support.dns"]


@pytest.fixture(autouse=True)
def close_tracked():
    """Closes the clients the support helpers handed to the test (see common.track)."""
    yield
    close_all_tracked()


@pytest.fixture
def auth_server():
    srv = AuthServer()
    yield srv
    srv.stop()
    fail_on_errors(srv, "the auth service")


@pytest.fixture
def unix_auth_server(tmp_path):
    srv = AuthServer(unix_path=str(tmp_path / "auth.sock"))
    yield srv
    srv.stop()
    fail_on_errors(srv, "the auth service")


@pytest.fixture
def backend_factory():
    """make(cls=Pop3Backend, *args, expect_errors=False, **kw) -> a started backend
    (ScriptedBackend subclass or handler); `expect_errors` lets its handler fail on purpose."""
    made = []

    def make(cls=Pop3Backend, *args, expect_errors=False, **kw):
        b = cls(*args, **kw)
        b.expect_errors = expect_errors
        made.append(b)
        return b
    yield make
    for b in made:
        b.stop()
    for b in made:
        fail_on_errors(b, f"the backend {type(b).__name__} on port {b.port}")


@pytest.fixture
def pop3_backend(backend_factory):
    return backend_factory(Pop3Backend, users={"alice": "secret"})


@pytest.fixture
def proxy_factory(tmp_path):
    """start(config, **kw) -> a running ProxyProcess (stopped in teardown)."""
    started = []

    def start(config, **kw):
        name = kw.pop("name", f"mailproxy{len(started)}")
        p = ProxyProcess(tmp_path, config, name=name, **kw)
        started.append(p)
        return p
    yield start
    for p in started:
        p.stop()


@pytest.fixture
def mail_setup(proxy_factory, auth_server):
    """start(protocol, backend, auth=True, host='127.0.0.1', mail=None, **directives) -> Setup.

    One server block for `protocol` on a free port. By default auth_http points at
    `auth_server`, which routes everyone to `backend` (pass `auth=False` and `proxy_pass=...`
    for the static route). Directives use nginx names (max_errors=..., pop3_auth=...);
    `timeout` defaults to 2s.
    """
    def start(protocol, backend, auth=True, host="127.0.0.1", mail=None, **directives):
        port = free_port(host)
        if auth:
            directives.setdefault("auth_http", auth_server.url)
            auth_server.route_to(backend.port, server=backend.host)
        directives.setdefault("timeout", "2s")
        config = {"servers": {protocol: server_block(protocol, port, host=host, **directives)}}
        if mail is not None:
            config["mail"] = mail
        proxy = proxy_factory(config)
        return Setup(proxy, host, port, auth_server if auth else None, backend)
    return start


@pytest.fixture
def pop3_setup(mail_setup, pop3_backend):
    """start(backend=None, **kw) -> Setup: mail_setup('pop3', backend or pop3_backend, **kw)."""
    def start(backend=None, **kw):
        return mail_setup("pop3", backend or pop3_backend, **kw)
    return start
