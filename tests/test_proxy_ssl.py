"""TLS to backends (our addition): `proxy_ssl on|starttls`, verification, names, client
certificates, and the auth service's per-user `Auth-SSL-Backend` header, for POP3, IMAP and SMTP.

The proxy runs as a subprocess; the backends are scripted servers that speak TLS (implicit, or
after STLS/STARTTLS) and record what they saw before and after the handshake.
"""

import base64

import pytest

from mailproxy.errors import ConfigError
from mailproxy.supervisor import load_config
from tests.support.auth import auth_ok
from tests.support.common import fail_on_errors
from tests.support.process import SharedProxy
from tests.support.tlsbackend import TlsBackend, server_context

INTERNAL = {
    "pop3": b"-ERR internal server error\r\n",
    "imap": b"* BAD internal server error\r\n",
    "smtp": b"451 4.3.2 Internal server error\r\n",
}


# ---------------------------------------------------------------------------------------------
# clients

def login(setup, protocol):
    """Log in as alice/secret with a plain client; (client, reply to the login)."""
    c = setup.connect()
    if protocol == "pop3":
        assert c.greeting.startswith(b"+OK")
        assert c.cmd("USER alice") == b"+OK\r\n"
        return c, c.cmd("PASS secret")
    if protocol == "imap":
        assert c.greeting.startswith(b"* OK")
        return c, c.cmd("a1 LOGIN alice secret")
    assert c.greeting.startswith(b"220")
    c.sendline("EHLO client.test")
    while True:
        line = c.readline()
        if not line.startswith(b"250-"):
            break
    plain = base64.b64encode(b"\0alice\0secret").decode()
    return c, c.cmd("AUTH PLAIN " + plain)


LOGGED_IN = {"pop3": b"+OK logged in\r\n", "imap": b"a1 OK Logged in\r\n",
             "smtp": b"235 2.0.0 OK\r\n"}
AFTER = {"pop3": ("STAT", b"+OK echo STAT tls=TLSv1.3\r\n"),
         "imap": ("a2 NOOP", b"* echo a2 NOOP tls=TLSv1.3\r\n"),
         "smtp": ("NOOP", b"250 echo NOOP tls=TLSv1.3\r\n")}


def start(mail_setup, backend_factory, certs, protocol, mode, backend_ctx=None,
          refuse_starttls=False, backend_mode=None, expect_errors=False, **directives):
    """expect_errors: the backend's handshake is meant to fail (its handler raises)."""
    be = backend_factory(TlsBackend, protocol, backend_mode or mode,
                         backend_ctx or server_context(certs), refuse_starttls=refuse_starttls,
                         expect_errors=expect_errors)
    directives.setdefault("proxy_ssl_trusted_certificate", certs["ca"])
    if mode is not None:
        directives.setdefault("proxy_ssl", mode)
    return be, mail_setup(protocol, be, **directives)


PROTOCOLS = ["pop3", "imap", "smtp"]


def _configs(certs):
    """Every configuration the tests use (mail_setup's protocol and directives), one server
    block each of the module's shared proxy."""
    ca, other = certs["ca"], certs["otherca"]
    t = "proxy_ssl_trusted_certificate"
    configs = [{"protocol": p, "proxy_ssl": m, t: c} for p in PROTOCOLS
               for m in ("on", "starttls") for c in (ca, other)]
    configs += [{"protocol": p, "proxy_ssl": "on", "proxy_ssl_verify": "off", t: other}
                for p in PROTOCOLS]
    configs += [{"protocol": p, "proxy_ssl": "starttls", "proxy_ssl_name": "wrong.test", t: ca}
                for p in PROTOCOLS]
    configs += [{"protocol": "pop3", "proxy_ssl": "on", "proxy_ssl_name": "backend.test", t: ca},
                {"protocol": "imap", "proxy_ssl": "on", t: ca,
                 "proxy_ssl_certificate": certs["client"],
                 "proxy_ssl_certificate_key": certs["client_key"]},
                {"protocol": "pop3", t: ca}, {"protocol": "pop3"}]
    return configs


@pytest.fixture(scope="module")
def shared(tmp_path_factory, certs):
    proxy = SharedProxy(tmp_path_factory.mktemp("proxy_ssl"), _configs(certs),
                        defaults={"timeout": "2s"})
    yield proxy
    proxy.stop()


@pytest.fixture
def mail_setup(shared):
    """start(protocol, backend, **directives) -> Setup on the shared proxy's block of that
    configuration, the auth service routed to `backend`."""
    def start(protocol, backend, **directives):
        return shared.setup(backend, protocol=protocol, **directives)
    yield start
    fail_on_errors(shared.auth, "the auth service")


@pytest.fixture
def auth_server(shared):
    return shared.auth


# ---------------------------------------------------------------------------------------------
# success

@pytest.mark.parametrize("mode", ["on", "starttls"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_backend_tls_login_and_relay(mail_setup, backend_factory, certs, protocol, mode):
    be, setup = start(mail_setup, backend_factory, certs, protocol, mode)
    c, reply = login(setup, protocol)
    assert reply == LOGGED_IN[protocol]
    cmd, answer = AFTER[protocol]
    assert c.cmd(cmd) == answer                  # relayed over the TLS backend connection
    conn = be.wait_session()
    assert conn.data["tls"] == "TLSv1.3"
    plain = conn.data["plain"]
    if mode == "on":
        assert plain == []                       # not one byte in the clear
    elif protocol == "pop3":
        assert plain == [b"STLS\r\n"]
    elif protocol == "imap":
        assert plain == [b"mpTLS STARTTLS\r\n"]
    else:
        assert [p.split(b" ")[0].rstrip(b"\r\n") for p in plain] == [b"EHLO", b"STARTTLS"]
    # the login itself went over TLS
    if protocol == "pop3":
        assert conn.data["login"] == [b"USER alice\r\n", b"PASS secret\r\n"]
    elif protocol == "imap":
        assert conn.data["login"][0].endswith(b"LOGIN {5}\r\n")
        assert conn.data["login"][2] == b"secret\r\n"
    else:
        assert conn.data["login"][0].startswith(b"XCLIENT ADDR=127.0.0.1")
    c.close()
    setup.proxy.wait_log("proxied session done", timeout=5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_verify_off_accepts_unknown_ca(mail_setup, backend_factory, certs, protocol):
    be, setup = start(mail_setup, backend_factory, certs, protocol, "on",
                      proxy_ssl_verify="off", proxy_ssl_trusted_certificate=certs["otherca"])
    c, reply = login(setup, protocol)
    assert reply == LOGGED_IN[protocol]
    c.close()


def test_proxy_ssl_name_checked(mail_setup, backend_factory, certs):
    be, setup = start(mail_setup, backend_factory, certs, "pop3", "on",
                      proxy_ssl_name="backend.test")
    c, reply = login(setup, "pop3")
    assert reply == LOGGED_IN["pop3"]
    c.close()


def test_client_certificate_to_backend(mail_setup, backend_factory, certs):
    be, setup = start(mail_setup, backend_factory, certs, "imap", "on",
                      backend_ctx=server_context(certs, require_client_cert=True),
                      proxy_ssl_certificate=certs["client"],
                      proxy_ssl_certificate_key=certs["client_key"])
    c, reply = login(setup, "imap")
    assert reply == LOGGED_IN["imap"]
    assert be.wait_session().data["peer_cert"] == "client.test"
    c.close()


# ---------------------------------------------------------------------------------------------
# failures: internal error to the client, an error line naming the TLS problem

@pytest.mark.parametrize("mode", ["on", "starttls"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_ca_is_internal_error(mail_setup, backend_factory, certs, protocol, mode):
    be, setup = start(mail_setup, backend_factory, certs, protocol, mode, expect_errors=True,
                      proxy_ssl_trusted_certificate=certs["otherca"])
    c, reply = login(setup, protocol)
    assert reply == INTERNAL[protocol]
    assert c.closed()
    line = setup.proxy.wait_log("upstream SSL certificate verify error")
    assert "[error]" in line
    assert "while SSL handshaking to upstream" in line
    assert 'login: "alice"' in line and "upstream: 127.0.0.1:%d" % be.port in line
    assert "client logged in" not in setup.proxy.log_text()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_name_is_internal_error(mail_setup, backend_factory, certs, protocol):
    be, setup = start(mail_setup, backend_factory, certs, protocol, "starttls",
                      expect_errors=True, proxy_ssl_name="wrong.test")
    c, reply = login(setup, protocol)
    assert reply == INTERNAL[protocol]
    line = setup.proxy.wait_log('upstream SSL certificate does not match "wrong.test"')
    assert "[error]" in line and "while SSL handshaking to upstream" in line


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_backend_refuses_starttls(mail_setup, backend_factory, certs, protocol):
    be, setup = start(mail_setup, backend_factory, certs, protocol, "starttls",
                      refuse_starttls=True)
    c, reply = login(setup, protocol)
    assert reply == INTERNAL[protocol]
    line = setup.proxy.wait_log("upstream refused STARTTLS")
    assert "[error]" in line


def test_plain_backend_with_proxy_ssl_on(mail_setup, backend_factory, certs):
    """The backend does not speak TLS: the handshake fails, the client gets an internal error."""
    be, setup = start(mail_setup, backend_factory, certs, "pop3", "on", backend_mode="off")
    c, reply = login(setup, "pop3")
    assert reply == INTERNAL["pop3"]
    line = setup.proxy.wait_log("while SSL handshaking to upstream", timeout=5)
    assert "[error]" in line


# ---------------------------------------------------------------------------------------------
# the auth service decides per user: Auth-SSL-Backend

@pytest.mark.parametrize("header,backend_mode,config_mode", [
    ("on", "on", None),
    ("starttls", "starttls", None),
    ("off", "off", "on"),
])
def test_auth_ssl_backend_header(mail_setup, backend_factory, auth_server, certs, header,
                                 backend_mode, config_mode):
    be = backend_factory(TlsBackend, "pop3", backend_mode, server_context(certs))
    directives = {"proxy_ssl_trusted_certificate": certs["ca"]}
    if config_mode:
        directives["proxy_ssl"] = config_mode
    setup = mail_setup("pop3", be, **directives)
    auth_server.set_respond(lambda req: auth_ok(be.port, extra=["Auth-SSL-Backend: " + header]))
    c, reply = login(setup, "pop3")
    assert reply == LOGGED_IN["pop3"]
    conn = be.wait_session()
    assert conn.data.get("tls", "none") == ("none" if header == "off" else "TLSv1.3")
    c.close()


def test_auth_ssl_backend_invalid_value(mail_setup, backend_factory, auth_server, certs):
    be = backend_factory(TlsBackend, "pop3", "off", server_context(certs))
    setup = mail_setup("pop3", be)
    auth_server.set_respond(lambda req: auth_ok(be.port, extra=["Auth-SSL-Backend: maybe"]))
    c, reply = login(setup, "pop3")
    assert reply == INTERNAL["pop3"]
    line = setup.proxy.wait_log('invalid "Auth-SSL-Backend" header: "maybe"')
    assert "[error]" in line


# ---------------------------------------------------------------------------------------------
# configuration

def _test_config(tmp_path, extra):
    """The configuration loaded as `-t` and a start load it (supervisor.load_config: the values,
    then the TLS contexts); the ConfigError, or None. test_cli covers how -t reports one."""
    conf = tmp_path / "t.ini"
    conf.write_text("[server p]\nlisten = 127.0.0.1:1\nprotocol = pop3\n"
                    "proxy_pass = 127.0.0.1:2\nproxy_ssl = on\n" + extra)
    try:
        load_config(str(conf))
    except ConfigError as e:
        return e
    return None


def test_config_certificate_without_key(tmp_path, certs):
    err = _test_config(tmp_path, "proxy_ssl_certificate = %s\n" % certs["client"])
    assert 'no "proxy_ssl_certificate_key" is defined' in err.message
    assert "t.ini:6" in str(err)


def test_config_missing_trusted_certificate(tmp_path):
    err = _test_config(tmp_path, "proxy_ssl_trusted_certificate = %s\n"
                       % (tmp_path / "nope.pem"))
    assert 'cannot load "proxy_ssl_trusted_certificate"' in err.message
    assert "t.ini:6" in str(err)


def test_config_good(tmp_path, certs):
    err = _test_config(tmp_path, "proxy_ssl_trusted_certificate = %s\nproxy_ssl_certificate = %s\n"
                       "proxy_ssl_certificate_key = %s\n"
                       % (certs["ca"], certs["client"], certs["client_key"]))
    assert err is None, str(err)


@pytest.mark.parametrize("value,expect", [("on", "on"), ("OFF", "off"), ("starttls", "starttls"),
                                          (None, None)])
def test_auth_ssl_backend_parsed(value, expect):
    from types import SimpleNamespace

    from mailproxy import auth_http
    req = SimpleNamespace(protocol="pop3", method="plain")
    head = b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 110\r\n"
    if value is not None:
        head += b"Auth-SSL-Backend: %s\r\n" % value.encode()
    res = auth_http.parse_response(head + b"\r\n", req, "127.0.0.1:9000")
    assert res.status == "OK" and res.ssl_backend == expect
