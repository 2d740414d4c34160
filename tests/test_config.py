"""mailproxy.config: INI reading, nginx token syntax, units, directives, errors, dump."""

import os
import socket
import textwrap

import pytest

from mailproxy import config
from mailproxy.config import ConfigError, split_tokens, Invalid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER = """\
[server pop]
listen = 127.0.0.1:1110
protocol = pop3
proxy_pass = 127.0.0.1:110
"""


def write(tmp_path, text, name="mailproxy.ini"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def load(tmp_path, text):
    return config.load(write(tmp_path, text))


def error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        config.load(path)
    return ei.value


def line_of(text, needle, nth=1):
    """1-based number of the nth line of dedented `text` containing `needle`."""
    count = 0
    for i, line in enumerate(textwrap.dedent(text).splitlines(), start=1):
        if needle in line:
            count += 1
            if count == nth:
                return i
    raise AssertionError(needle)


def server(**kw):
    """SERVER with keys replaced/added (value None removes a key)."""
    keys = {"listen": "127.0.0.1:1110", "protocol": "pop3", "proxy_pass": "127.0.0.1:110"}
    keys.update(kw)
    return "[server pop]\n" + "".join("%s = %s\n" % (k, v) for k, v in keys.items()
                                      if v is not None)


# ---------------------------------------------------------------------------------------------
# tokens and units

@pytest.mark.parametrize("text,tokens", [
    ("a b  c", ["a", "b", "c"]),
    ("  a\tb ", ["a", "b"]),
    ('"a b" c', ["a b", "c"]),
    ("'a b' \"c\"", ["a b", "c"]),
    (r'"say \"hi\""', ['say "hi"']),
    (r"'it\'s'", ["it's"]),
    (r'"a\\b"', ["a\\b"]),
    (r'"a\nb\r\tc"', ["a\nb\r\tc"]),
    (r'"a\xb"', ["a\\xb"]),
    (r"a\ b", ["a\\ b"]),
    (r"a\"b", ['a"b']),
    ('a"b', ['a"b']),
    ('""', [""]),
    ("a b;", ["a", "b"]),
    ("a b ;", ["a", "b"]),
    ('"a;";', ["a;"]),
    ('"a b";', ["a b"]),
    ("a;b", ["a;b"]),
    (r"a\;", ["a\\;"]),
    ("HIGH:!aNULL:!MD5", ["HIGH:!aNULL:!MD5"]),
    ("", []),
])
def test_split_tokens(text, tokens):
    assert split_tokens(text) == tokens


@pytest.mark.parametrize("text", ['"abc', "'abc", '"a"b'])
def test_split_tokens_errors(text):
    with pytest.raises(Invalid):
        split_tokens(text)


@pytest.mark.parametrize("token", ["plain", "a b", "", 'q"x', "back\\slash", "tab\there",
                                   "nl\n", "#x", ";x", "x;", "{", "'", "ü"])
def test_quote_token_round_trip(token):
    assert split_tokens(config.quote_token(token)) == [token]


@pytest.mark.parametrize("text,seconds", [
    ("500ms", 0.5), ("60s", 60), ("60", 60), ("5m", 300), ("1h30m", 5400), ("24h", 86400),
    ("1d", 86400), ("1w", 604800), ("1M", 30 * 86400), ("1y", 365 * 86400), ("0", 0),
    ("1m30s", 90), ("1s500ms", 1.5), ("1h30", 3630),
])
def test_parse_time(text, seconds):
    assert config.parse_time(text) == seconds
    assert config.parse_time(config.format_time(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1x", "m", "5s1m", "1.5s", "-1s", "1 s", "1ss"])
def test_parse_time_invalid(text):
    assert config.parse_time(text) is None


@pytest.mark.parametrize("text,size", [
    ("4096", 4096), ("8k", 8192), ("8K", 8192), ("1m", 1048576), ("1M", 1048576),
    ("1g", 1 << 30), ("1G", 1 << 30),
])
def test_parse_size(text, size):
    assert config.parse_size(text) == size
    assert config.parse_size(config.format_size(size)) == size


@pytest.mark.parametrize("text", ["", "k", "1kb", "1.5k", "-1", "1t"])
def test_parse_size_invalid(text):
    assert config.parse_size(text) is None


# ---------------------------------------------------------------------------------------------
# a complete load

def test_defaults(tmp_path):
    cfg = load(tmp_path, SERVER)
    assert cfg.path == str(tmp_path / "mailproxy.ini")
    m = cfg.main
    assert m.pid is None and m.daemon is False and m.user is None
    assert m.worker_processes == 1 and m.worker_shutdown_timeout is None
    assert [(t.kind, t.level) for t in m.error_log] == [("stderr", "error")]
    (s,) = cfg.servers
    assert (s.name, s.file, s.line) == ("pop", cfg.path, 1)
    assert s.protocol == "pop3"
    assert s.server_name == socket.gethostname()
    assert s.timeout == 60.0 and s.proxy_timeout == 86400.0 and s.auth_http_timeout == 60.0
    assert s.max_errors == 5
    assert s.proxy is False and s.proxy_pass_error_message is False
    assert s.proxy_buffer == 65536
    assert s.proxy_protocol == "off"
    assert s.auth_http is None and s.auth_http_header == []
    assert s.pop3_auth == ["plain"] and s.pop3_capabilities == ["TOP", "USER", "UIDL"]
    assert s.imap_capabilities == ["IMAP4", "IMAP4rev1", "UIDPLUS"]
    assert s.smtp_auth == ["plain", "login"] and s.smtp_capabilities == []
    assert s.ssl_protocols == ["TLSv1.2", "TLSv1.3"] and s.ssl_ciphers == "HIGH:!aNULL:!MD5"
    assert s.starttls == "off" and s.proxy_ssl == "off" and s.proxy_ssl_verify is True
    assert s.resolver is None and s.resolver_timeout == 30.0
    assert s.error_log is None and s.set_real_ip_from == [] and s.ssl_certificate == []
    assert s.xclient is True and s.imap_client_id is False and s.smtp_greeting_delay == 0
    assert [b.key for b in s.proxy_pass] == [("127.0.0.1", 110)]
    assert s.where("timeout") == (None, None)
    assert s.where("proxy_pass") == (cfg.path, 4)
    (li,) = s.listen
    assert (li.host, li.port, li.family) == ("127.0.0.1", 1110, socket.AF_INET)
    assert li.backlog == 1024 and li.ipv6only is True and li.ssl is False
    assert li.so_keepalive is None and li.rcvbuf is None and li.sndbuf is None
    assert (li.text, li.file, li.line) == ("127.0.0.1:1110", cfg.path, 2)
    # every directive of every context is an attribute
    for name, d in config.DIRECTIVES.items():
        if "server" in d.contexts and name not in config.REMOVED:
            assert hasattr(s, name), name


def _conforms(value, tp):
    """isinstance for the annotations ServerConf uses (Optional, Union, list[X], tuple[X, ...])."""
    import typing
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return any(_conforms(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is typing.Any:
        return True
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is tuple:
        return (isinstance(value, tuple) and len(value) == len(args)
                and all(_conforms(v, a) for v, a in zip(value, args)))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _check_types(conf):
    import typing
    hints = typing.get_type_hints(config.ServerConf)
    for name in config.DIRECTIVE_FIELDS:
        assert _conforms(getattr(conf, name), hints[name]), (name, getattr(conf, name))


def test_server_conf_is_the_table():
    """ServerConf has one typed field per server-level directive of the table, in its order,
    and its annotations hold for the table's defaults."""
    import dataclasses
    assert dataclasses.is_dataclass(config.ServerConf)
    assert list(config.DIRECTIVE_FIELDS) == config.SERVER_KEYS
    assert [f.name for f in dataclasses.fields(config.ServerConf)][:3] == ["name", "file", "line"]
    for proto in ("pop3", "imap", "smtp"):
        _check_types(config.server_defaults(proto))


def test_server_defaults():
    """A complete ServerConf at the table's defaults, for code that needs one without a file."""
    s = config.server_defaults("imap", timeout=5.0, auth_http_header=[("X-A", "b")])
    assert (s.name, s.file, s.line, s.protocol) == ("imap", None, None, "imap")
    assert s.timeout == 5.0 and s.auth_http_header == [("X-A", "b")]
    assert s.imap_auth == ["plain"] and s.proxy_buffer == 65536 and s.listen == []
    assert s.server_name == socket.gethostname() and s.where("timeout") == (None, None)
    assert s._tls is None and s._proxy_ssl_context is None and s._realip_networks is None
    assert config.server_defaults("pop3", name="p").name == "p"
    # no list shared between two servers
    a, b = config.server_defaults("smtp"), config.server_defaults("smtp")
    a.smtp_auth.append("none")
    assert b.smtp_auth == ["plain", "login"]
    with pytest.raises(TypeError):
        config.server_defaults("pop3", no_such_directive=1)
    # identity, as a loaded server: usable as a dict key and never equal to another
    assert a != b and len({a, b}) == 2


def test_main_section(tmp_path):
    cfg = load(tmp_path, """\
        [main]
        pid = run/mailproxy.pid
        daemon = off
        worker_processes = auto
        user = mail
        worker_shutdown_timeout = 5s
        error_log =
            stderr
            logs/error.log info
            syslog:server=127.0.0.1:5514,facility=mail,tag=mp,nohostname debug
            syslog:server=[::1] warn
            syslog:server=loghost
        """ + SERVER)
    m = cfg.main
    assert m.pid == str(tmp_path / "run" / "mailproxy.pid")
    assert m.worker_processes == (os.cpu_count() or 1)
    assert m.user == ("mail", None) and m.worker_shutdown_timeout == 5.0
    t = m.error_log
    assert (t[0].kind, t[0].level) == ("stderr", "error")
    assert (t[1].kind, t[1].path, t[1].level) == ("file", str(tmp_path / "logs/error.log"), "info")
    assert (t[2].kind, t[2].server, t[2].facility, t[2].tag, t[2].nohostname, t[2].level) == \
        ("syslog", ("127.0.0.1", 5514), "mail", "mp", True, "debug")
    assert (t[3].server, t[3].facility, t[3].tag, t[3].nohostname, t[3].level) == \
        (("::1", 514), "local7", "mailproxy", False, "warn")
    assert t[4].server == ("loghost", 514)
    assert m.where("pid") == (cfg.path, 2)
    cfg = load(tmp_path, "[main]\nuser = mail mailgrp\nworker_processes = 3\npid = off\n"
               + SERVER)
    assert cfg.main.user == ("mail", "mailgrp") and cfg.main.worker_processes == 3
    assert cfg.main.pid is None


def test_relative_paths_use_config_folder(tmp_path, monkeypatch):
    sub = tmp_path / "conf"
    sub.mkdir()
    monkeypatch.chdir(tmp_path)
    path = write(sub, "[main]\npid = x.pid\nerror_log = ../log/e.log\n"
                 "[mail]\nerror_log = mail.log\n" + SERVER)
    cfg = config.load(os.path.relpath(path))
    assert cfg.path == path
    assert cfg.main.pid == str(sub / "x.pid")
    assert cfg.main.error_log[0].path == str(tmp_path / "log" / "e.log")
    assert cfg.servers[0].error_log[0].path == str(sub / "mail.log")


def test_inheritance_lists_replaced(tmp_path):
    text = """\
        [mail]
        timeout = 5s
        pop3_capabilities = TOP UIDL
        auth_http_header =
            X-A 1
            X-B 2
        error_log = mail.log info

        [server a]
        listen = 127.0.0.1:1110
        protocol = pop3
        proxy_pass = 127.0.0.1:110

        [server b]
        listen = 127.0.0.1:1111
        protocol = pop3
        proxy_pass = 127.0.0.1:110
        timeout = 7s
        pop3_capabilities = USER
        auth_http_header = X-C 3
        error_log = stderr
        """
    cfg = load(tmp_path, text)
    a, b = cfg.servers
    assert (a.name, b.name) == ("a", "b")
    assert a.timeout == 5 and b.timeout == 7
    assert a.pop3_capabilities == ["TOP", "UIDL"] and b.pop3_capabilities == ["USER"]
    assert a.auth_http_header == [("X-A", "1"), ("X-B", "2")]
    assert b.auth_http_header == [("X-C", "3")]
    assert a.error_log[0].path == str(tmp_path / "mail.log") and a.error_log[0].level == "info"
    assert b.error_log[0].kind == "stderr"
    assert a.where("timeout") == (cfg.path, line_of(text, "timeout = 5s"))
    assert b.where("timeout") == (cfg.path, line_of(text, "timeout = 7s"))
    assert a.auth_http_header is not b.auth_http_header
    # an empty [mail] is fine, and server order is file order
    cfg = load(tmp_path, "[mail]\n" + SERVER)
    assert cfg.servers[0].timeout == 60


def test_values_of_directives(tmp_path):
    cfg = load(tmp_path, server(**{
        "server_name": "mx.example.com", "proxy_buffer": "16k", "max_errors": "0",
        "proxy": "on", "proxy_protocol": "v2", "proxy_pass_error_message": "on",
        "proxy_timeout": "10m", "pop3_auth": "PLAIN", "pop3_capabilities": '"SASL X" TOP',
        "auth_http_timeout": "500ms"}))
    s = cfg.servers[0]
    assert s.server_name == "mx.example.com" and s.proxy_buffer == 16384 and s.max_errors == 0
    assert s.proxy is True and s.proxy_protocol == "v2" and s.proxy_pass_error_message is True
    assert s.proxy_timeout == 600 and s.auth_http_timeout == 0.5
    assert s.pop3_auth == ["plain"] and s.pop3_capabilities == ["SASL X", "TOP"]


def test_comments_blank_lines_and_semicolons(tmp_path):
    cfg = load(tmp_path, """\
        # comment
        ; comment
        [server pop]
        listen =
            127.0.0.1:1110;
            # a commented-out listen
            ; another

            127.0.0.1:1111 backlog=5;
        protocol = pop3;
        proxy_pass = 127.0.0.1:110
        pop3_capabilities = "A;B" "C # D"
        """)
    s = cfg.servers[0]
    assert [(li.port, li.line) for li in s.listen] == [(1110, 5), (1111, 9)]
    assert s.listen[1].backlog == 5
    assert s.pop3_capabilities == ["A;B", "C # D"]


def test_percent_and_dollar_are_literal(tmp_path):
    cfg = load(tmp_path, server(auth_http_header="X-Key %(a)s$b"))
    assert cfg.servers[0].auth_http_header == [("X-Key", "%(a)s$b")]


# ---------------------------------------------------------------------------------------------
# listen

def test_listen_forms_and_params(tmp_path):
    text = """\
        [server pop]
        protocol = pop3
        proxy_pass = 127.0.0.1:110
        listen =
            1110
            *:1111
            [::1]:1112 ipv6only=off
            [::]:1113 bind
            0.0.0.0:1114 rcvbuf=64k sndbuf=1m backlog=100
            127.0.0.1:1115 so_keepalive=on multipath
            127.0.0.1:1116 so_keepalive=off
            127.0.0.1:1117 so_keepalive=30m::10
            127.0.0.1:1118 so_keepalive=:75s:
            localhost:1119
        """
    cfg = load(tmp_path, text)
    ls = cfg.servers[0].listen
    by_port = {li.port: li for li in ls}
    assert (by_port[1110].host, by_port[1110].family) == ("", socket.AF_INET)
    assert by_port[1111].host == ""
    assert (by_port[1112].host, by_port[1112].family, by_port[1112].ipv6only) == \
        ("::1", socket.AF_INET6, False)
    assert (by_port[1113].host, by_port[1113].bind) == ("::", True)
    li = by_port[1114]
    assert (li.host, li.rcvbuf, li.sndbuf, li.backlog) == ("", 65536, 1048576, 100)
    assert by_port[1115].so_keepalive is True and by_port[1115].multipath is True
    assert by_port[1116].so_keepalive is False
    assert by_port[1117].so_keepalive == (1800, None, 10)
    assert by_port[1118].so_keepalive == (None, 75, None)
    assert by_port[1112].text == "[::1]:1112 ipv6only=off"
    assert by_port[1112].line == line_of(text, "[::1]:1112")
    local = [li for li in ls if li.port == 1119]
    assert local and {li.host for li in local} <= {"127.0.0.1", "::1"}
    assert all(li.text == "localhost:1119" for li in local)


def test_listen_defaults_is_what_the_parser_makes(tmp_path):
    """config.listen_defaults: a complete Listen for tests and tools, equal to a parsed
    `listen = HOST:PORT` without parameters but for where it was written."""
    import dataclasses
    cfg = load(tmp_path, server(listen=None) + "listen =\n    *:1110\n    127.0.0.1:1111\n"
               "    [::1]:1112\n    [::]:1113\n")
    for li in cfg.servers[0].listen:
        host = "*" if li.host == "" else li.host
        made = config.listen_defaults(host, li.port)
        assert isinstance(made, config.Listen)
        assert made == dataclasses.replace(li, file=None, line=None), li.text
    li = config.listen_defaults("127.0.0.1", 1110, ssl=True, backlog=5)
    assert (li.ssl, li.backlog, li.family, li.text) == (True, 5, socket.AF_INET, "127.0.0.1:1110")
    with pytest.raises(TypeError):
        config.listen_defaults("127.0.0.1", 1110, no_such_parameter=1)


@pytest.mark.parametrize("value,message", [
    ("unix:/tmp/x.sock", "unix: listen sockets are not supported"),
    ("127.0.0.1:1110 ssl", 'no "ssl_certificate" is defined for the "listen ... ssl" directive'),
    ("127.0.0.1:1110 foo", 'invalid parameter "foo"'),
    ("127.0.0.1:1110 backlog=x", 'invalid backlog "x"'),
    ("127.0.0.1:1110 backlog=0", 'invalid backlog "0"'),
    ("127.0.0.1:1110 rcvbuf=big", 'invalid rcvbuf "big"'),
    ("127.0.0.1:1110 ipv6only=yes", 'invalid ipv6only "yes"'),
    ("127.0.0.1:1110 so_keepalive=::", 'invalid so_keepalive "::"'),
    ("127.0.0.1:1110 so_keepalive=1:2", 'invalid so_keepalive "1:2"'),
    ("127.0.0.1", 'no port in "127.0.0.1"'),
    ("127.0.0.1:0", 'invalid port in "127.0.0.1:0"'),
    ("127.0.0.1:65536", 'invalid port'),
    ("70000", 'invalid port'),
    ("::1:1110", "write IPv6 addresses in brackets"),
    ("[zz]:1110", "invalid IPv6 address"),
    ("no-such-host.invalid:1110", 'host not found in "no-such-host.invalid:1110"'),
])
def test_listen_errors(tmp_path, value, message):
    text = "[mail]\n\n[server pop]\nprotocol = pop3\nproxy_pass = 127.0.0.1:110\nlisten =\n" \
        "    127.0.0.1:2000\n    %s\n" % value
    err = error(tmp_path, text)
    assert message in err.message
    assert (err.file, err.line, err.key) == (str(tmp_path / "mailproxy.ini"), 8, "listen")
    assert str(err) == "%s in %s:8" % (err.message, err.file)


def test_duplicate_listen(tmp_path):
    text = """\
        [server a]
        listen = 127.0.0.1:1110
        protocol = pop3
        proxy_pass = 127.0.0.1:110

        [server b]
        protocol = pop3
        proxy_pass = 127.0.0.1:110
        listen =
            127.0.0.1:1111
            127.0.0.1:1110
        """
    err = error(tmp_path, text)
    assert err.message == 'duplicate "127.0.0.1:1110" address and port pair'
    assert err.line == line_of(text, "127.0.0.1:1110", 2)
    # in one server, and with the wildcard spelled two ways
    err = error(tmp_path, server(listen=None) + "listen =\n    *:1110\n    0.0.0.0:1110\n")
    assert err.message == 'duplicate "*:1110" address and port pair' and err.line == 6
    err = error(tmp_path, server(listen=None) + "listen =\n    [::]:1110\n    [0::0]:1110\n")
    assert err.message == 'duplicate "[::]:1110" address and port pair'
    # wildcard plus a specific address on the same port is allowed
    cfg = load(tmp_path, server(listen=None) + "listen =\n    *:1110\n    127.0.0.1:1110\n"
               "    [::]:1110\n")
    assert len(cfg.servers[0].listen) == 3


# ---------------------------------------------------------------------------------------------
# protocol

@pytest.mark.parametrize("port", [110, 995])
def test_protocol_guessed_pop3(tmp_path, port):
    cfg = load(tmp_path, server(protocol=None, listen="127.0.0.1:%d" % port))
    s = cfg.servers[0]
    assert s.protocol == "pop3" and s.where("protocol") == (cfg.path, 2)


def test_protocol_guessed_from_later_listen(tmp_path):
    cfg = load(tmp_path, server(protocol=None, listen=None) + "listen =\n    127.0.0.1:1110\n"
               "    127.0.0.1:110\n")
    assert cfg.servers[0].protocol == "pop3"


@pytest.mark.parametrize("port,proto", [(143, "imap"), (993, "imap"), (25, "smtp"),
                                        (465, "smtp"), (587, "smtp")])
def test_protocol_guessed(tmp_path, port, proto):
    text = server(protocol=None, listen="127.0.0.1:%d" % port,
                  proxy_smtp_auth="on" if proto == "smtp" else None)
    cfg = load(tmp_path, text)
    assert cfg.servers[0].protocol == proto
    assert cfg.servers[0].where("protocol") == (cfg.path, 2)


@pytest.mark.parametrize("proto", ["imap", "smtp"])
def test_protocol_explicit(tmp_path, proto):
    text = server(protocol=proto, proxy_smtp_auth="on" if proto == "smtp" else None)
    assert load(tmp_path, text).servers[0].protocol == proto


def test_protocol_unknown(tmp_path):
    text = "[main]\n\n" + server(protocol=None)
    err = error(tmp_path, text)
    assert err.message.startswith('unknown mail protocol for server "pop"')
    assert err.line == 3
    err = error(tmp_path, server(protocol="http"))
    assert 'invalid value "http" in "protocol"' in err.message and err.line == 3


# ---------------------------------------------------------------------------------------------
# routing: auth_http and proxy_pass

@pytest.mark.parametrize("value,host,port,uri,family", [
    ("http://127.0.0.1:9000/auth?x=1&y", "127.0.0.1", 9000, "/auth?x=1&y", socket.AF_INET),
    ("127.0.0.1", "127.0.0.1", 80, "/", socket.AF_INET),
    ("127.0.0.1/a/b", "127.0.0.1", 80, "/a/b", socket.AF_INET),
    ("http://127.0.0.1:81?q", "127.0.0.1", 81, "/?q", socket.AF_INET),
    ("http://[::1]:9000/x", "::1", 9000, "/x", socket.AF_INET6),
    ("localhost:9000", "localhost", 9000, "/", None),
])
def test_auth_http_urls(tmp_path, value, host, port, uri, family):
    cfg = load(tmp_path, server(proxy_pass=None, auth_http=value))
    (u,) = cfg.servers[0].auth_http
    assert (u.text, u.host, u.port, u.uri, u.unix, u.host_header) == \
        (value, host, port, uri, None, host)
    if family is not None:
        assert u.family == family
    assert u.sockaddr[1] == port and u.family in (socket.AF_INET, socket.AF_INET6)


def test_auth_http_unix(tmp_path):
    cfg = load(tmp_path, server(proxy_pass=None, auth_http="unix:/run/auth.sock:/auth?a=b"))
    (u,) = cfg.servers[0].auth_http
    assert (u.unix, u.uri, u.host_header, u.sockaddr, u.family) == \
        ("/run/auth.sock", "/auth?a=b", "localhost", None, socket.AF_UNIX)
    cfg = load(tmp_path, server(proxy_pass=None, auth_http="unix:auth.sock"))
    (u,) = cfg.servers[0].auth_http
    assert (u.unix, u.uri) == (str(tmp_path / "auth.sock"), "/")


@pytest.mark.parametrize("value,message", [
    ("https://", "invalid value"),
    ("http://127.0.0.1:0/", "invalid port"),
    ("http:///x", "invalid value"),
    ("unix:", "invalid value"),
    ("unix:/x:auth", "invalid value"),
    ("no-such-host.invalid", "host not found"),
    ("ftp://x/", "invalid value"),
])
def test_auth_http_errors(tmp_path, value, message):
    err = error(tmp_path, "[mail]\nauth_http = %s\n" % value + server(proxy_pass=None))
    assert message in err.message and err.line == 2 and err.key == "auth_http"


def test_auth_http_inherited_from_mail(tmp_path):
    cfg = load(tmp_path, "[mail]\nauth_http = 127.0.0.1:9000\n" + server(proxy_pass=None))
    assert cfg.servers[0].auth_http[0].port == 9000
    assert cfg.servers[0].where("auth_http") == (cfg.path, 2)


@pytest.mark.parametrize("value,expected", [
    ("127.0.0.1:110", ("127.0.0.1", 110)),
    ("[::1]:110", ("::1", 110)),
    ("localhost:1110", ("localhost", 1110)),
])
def test_proxy_pass(tmp_path, value, expected):
    (b,) = load(tmp_path, server(proxy_pass=value)).servers[0].proxy_pass
    assert b.key == expected and (b.weight, b.max_fails, b.fail_timeout, b.backup) == \
        (1, 1, 10.0, False)
    assert b.addrs and all(sa[0] in ("127.0.0.1", "::1") for _f, sa in b.addrs)


@pytest.mark.parametrize("value,message", [
    ("127.0.0.1", 'no port in "127.0.0.1"'),
    ("127.0.0.1:x", "invalid port"),
    ("::1:110", "write IPv6 addresses in brackets"),
    ("bad_host!:110", 'invalid value "bad_host!:110" in "proxy_pass"'),
])
def test_proxy_pass_errors(tmp_path, value, message):
    err = error(tmp_path, server(proxy_pass=value))
    assert message in err.message and err.line == 4 and err.key == "proxy_pass"


def test_routing_errors(tmp_path):
    err = error(tmp_path, "[mail]\n" + server(proxy_pass=None))
    assert err.message == 'no "auth_http", "proxy_pass" or "proxy_map" is defined for server ' \
        '"pop"'
    assert err.line == 2
    text = "[mail]\nauth_http = 127.0.0.1:9000\n" + server()
    err = error(tmp_path, text)
    assert "cannot both be used" in err.message and err.line == 6
    err = error(tmp_path, "[mail]\nproxy_pass = 127.0.0.1:110\n" + server())
    assert err.message == '"proxy_pass" directive is not allowed in [mail], only in ' \
        '[server NAME]' and err.line == 2


@pytest.mark.parametrize("methods", ["plain apop", "cram-md5", "external"])
def test_proxy_pass_needs_auth_service_methods(tmp_path, methods):
    err = error(tmp_path, server(pop3_auth=methods))
    assert "cannot be used with \"proxy_pass\"" in err.message and "Auth-Pass" in err.message
    assert err.line == 5 and err.key == "pop3_auth"
    # fine with auth_http
    cfg = load(tmp_path, server(pop3_auth=methods, proxy_pass=None, auth_http="127.0.0.1"))
    assert cfg.servers[0].pop3_auth == methods.split()


def test_no_listen(tmp_path):
    err = error(tmp_path, "[main]\n" + server(listen=None))
    assert err.message == 'no "listen" is defined for server "pop"' and err.line == 2
    assert str(err) == 'no "listen" is defined for server "pop" in %s:2' % err.file


# ---------------------------------------------------------------------------------------------
# errors with file:line

def test_error_str_shapes():
    assert str(ConfigError("m", "/a.ini", 3, "k")) == "m in /a.ini:3"
    assert str(ConfigError("m", "/a.ini")) == "m in /a.ini"
    assert str(ConfigError("m")) == "m"
    e = ConfigError("m", "/f", 1, "key")
    assert (e.message, e.file, e.line, e.key) == ("m", "/f", 1, "key")


@pytest.mark.parametrize("text,message,line", [
    ("[server pop]\nfoo = 1\n", 'unknown directive "foo" in [server pop]', 2),
    ("[server pop]\nListen = 1\n", 'unknown directive "Listen" in [server pop]', 2),
    ("[mail]\nlisten = 110\n",
     '"listen" directive is not allowed in [mail], only in [server NAME]', 2),
    ("[server x]\npid = /x\n", '"pid" directive is not allowed in [server x], only in [main]', 2),
    ("[main]\ntimeout = 1s\n",
     '"timeout" directive is not allowed in [main], only in [mail] or [server NAME]', 2),
    ("[main]\n\n[foo]\n", "unknown section [foo]: expected [main], [mail] or [server NAME]", 3),
    ("[DEFAULT]\n", "unknown section [DEFAULT]", 1),
    ("[server]\n", "[server] needs a name", 1),
    ("[mail]\n[mail]\n", "duplicate section [mail]", 2),
    ("[server a]\n[server  a]\n", 'duplicate server name "a"', 2),
    ("[mail]\ntimeout = 1s\ntimeout = 2s\n", 'duplicate key "timeout" in [mail]', 3),
    ("timeout = 1s\n", '"timeout = 1s" is outside any section', 1),
    ("[mail]\ntimeout 1s\n", 'invalid line "timeout 1s": expected KEY = VALUE', 2),
    ("[mail]\n= 1s\n", "invalid line", 2),
    ("[mail]\ntimeout: 1s\n", "invalid line", 2),
    ("[mail]\ntimeout = abc\n",
     'invalid value "abc" in "timeout": expected a time such as 60s, 500ms or 1h30m', 2),
    ("[mail]\ntimeout =\n", 'invalid number of arguments in "timeout" directive', 2),
    ("[mail]\ntimeout = 1s 2s\n", 'invalid number of arguments in "timeout" directive', 2),
    ("[mail]\ntimeout =\n  1s\n  2s\n", '"timeout" directive is duplicate', 4),
    ("[mail]\nproxy = yes\n", 'invalid value "yes" in "proxy": expected "on" or "off"', 2),
    ("[mail]\nproxy_buffer = 1q\n", 'invalid value "1q" in "proxy_buffer"', 2),
    ("[mail]\nproxy_buffer = 0\n", 'invalid value "0" in "proxy_buffer"', 2),
    ("[mail]\nmax_errors = -1\n", 'invalid value "-1" in "max_errors"', 2),
    ("[mail]\nproxy_protocol = v3\n", 'invalid value "v3" in "proxy_protocol"', 2),
    ("[mail]\npop3_auth = plain digest\n", 'invalid value "digest" in "pop3_auth"', 2),
    ("[mail]\nserver_name = \"\"\n", 'invalid value "" in "server_name"', 2),
    ("[mail]\nserver_name = \"abc\n", "unterminated quoted string", 2),
    ("[mail]\nauth_http_header = X-A\n",
     'invalid number of arguments in "auth_http_header" directive', 2),
    ("[mail]\nauth_http_header =\n  X-A 1\n  X_B 2\n", 'invalid value "X_B"', 4),
    ("[mail]\nauth_http_header = X-A \"a\\nb\"\n", "without CR, LF or NUL", 2),
    ("[main]\ndaemon = on\n", "always runs in the foreground", 2),
    ("[main]\ndaemon = maybe\n", 'invalid value "maybe" in "daemon"', 2),
    ("[main]\nworker_processes = 0\n", 'invalid value "0" in "worker_processes"', 2),
    ("[main]\nworker_processes = many\n", 'invalid value "many" in "worker_processes"', 2),
    ("[main]\nuser = a b c\n", 'invalid number of arguments in "user" directive', 2),
    ("[main]\nerror_log = stderr loud\n", 'invalid value "loud" in "error_log"', 2),
    ("[main]\nerror_log =\n  stderr\n  syslog:facility=mail\n", 'no "server"', 4),
    ("[main]\nerror_log = syslog:server=127.0.0.1,facility=bogus\n", 'invalid value "bogus"', 2),
    ("[main]\nerror_log = syslog:server=127.0.0.1,tag=a-b\n", 'invalid value "a-b"', 2),
    ("[main]\nerror_log = syslog:server=127.0.0.1,foo=1\n", 'invalid value "foo=1"', 2),
    ("[main]\nerror_log = syslog:server=unix:/dev/log\n", "unix: syslog servers", 2),
    ("[main]\nerror_log = memory:32m\n", "not supported", 2),
])
def test_errors(tmp_path, text, message, line):
    path = write(tmp_path, text + "\n" + SERVER if "[server" not in text else text)
    with pytest.raises(ConfigError) as ei:
        config.load(path)
    err = ei.value
    assert message in err.message, err.message
    assert (err.file, err.line) == (path, line)
    assert str(err) == "%s in %s:%d" % (err.message, path, line)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as ei:
        config.load(str(tmp_path / "nope.ini"))
    assert "No such file" in str(ei.value)


def test_no_servers(tmp_path):
    err = error(tmp_path, "[main]\n")
    assert err.message == "no [server NAME] section is defined" and err.line is None
    assert str(err).endswith(" in " + err.file)


# ---------------------------------------------------------------------------------------------
# each directive's value checks (`ssl`: refused with what replaces it)

@pytest.mark.parametrize("name,value,message", [
    ("resolver", "off system", 'invalid value "off"'),
    ("resolver", "127.0.0.1 ipv4=off ipv6=off", "cannot both be"),
    ("resolver", "127.0.0.1 valid=x", 'invalid value "valid=x"'),
    ("starttls", "maybe", 'invalid value "maybe" in "starttls"'),
    ("ssl_protocols", "TLSv1.4", 'invalid value "TLSv1.4"'),
    ("ssl_session_cache", "shared:x", 'invalid session cache "shared:x"'),
    ("ssl_session_cache", "shared:SSL:16k", 'session cache "shared:SSL:16k" is too small'),
    ("ssl_session_cache", "shared::10m", 'invalid session cache "shared::10m"'),
    ("ssl_session_cache", "shared:SSL:10x", 'invalid session cache "shared:SSL:10x"'),
    ("ssl_session_cache", "none builtin", 'invalid value "none"'),
    ("ssl_verify_client", "always", 'invalid value "always"'),
    ("ssl_verify_depth", "x", 'invalid value "x"'),
    ("ssl_conf_command", "Options", "invalid number of arguments"),
    ("ssl_certificate_sni", "a.example c.pem", "invalid number of arguments"),
    ("set_real_ip_from", "10.0.0.0/99", 'invalid value "10.0.0.0/99"'),
    ("imap_auth", "apop", 'invalid value "apop" in "imap_auth"'),
    ("smtp_auth", "apop", 'invalid value "apop" in "smtp_auth"'),
    ("imap_client_buffer", "x", 'invalid value "x"'),
    ("proxy_ssl", "only", 'invalid value "only"'),
    ("proxy_ssl_verify", "yes", 'invalid value "yes"'),
    ("ssl", "on", 'the "ssl" directive was removed in nginx 1.25.1'),
    ("ssl", "off", 'the "ssl" directive was removed in nginx 1.25.1'),
])
def test_values_checked(tmp_path, name, value, message):
    err = error(tmp_path, "[mail]\n%s = %s\n" % (name, value) + server())
    assert message in err.message and err.line == 2 and err.key == name


def test_directive_value_shapes(tmp_path, monkeypatch):
    """The parsed value shapes the rest of mailproxy relies on."""
    # value shapes only: the certificate files named here do not exist, so no TLS context
    monkeypatch.setattr(config.loader, "_check_tls", lambda s: None)
    text = server(**{
        "resolver": "127.0.0.1 [::1]:5353 valid=30s ipv6=off",
        "ssl_certificate": "\n    a.pem\n    /etc/b.pem",
        "ssl_certificate_key": "\n    a.key\n    data:xyz",
        "ssl_certificate_sni": "*.example.com c.pem k.pem",
        "ssl_conf_command": "Options PrioritizeChaCha",
        "ssl_session_cache": "builtin:1000 shared:SSL:10m",
        "set_real_ip_from": "\n    10.1.2.3/8\n    192.0.2.1\n    ::1\n    unix:",
        "smtp_capabilities": 'PIPELINING "SIZE 10485760"',
        "smtp_auth": "LOGIN none", "starttls": "only", "ssl_verify_depth": "3",
        "proxy_ssl": "starttls", "proxy_ssl_trusted_certificate": "ca.pem",
        "imap_client_id": "on", "smtp_greeting_delay": "2s"})
    s = load(tmp_path, text).servers[0]
    assert s.resolver == config.Resolver(servers=[("127.0.0.1", 53), ("::1", 5353)], valid=30.0,
                                         ipv4=True, ipv6=False)
    assert s.ssl_certificate == [str(tmp_path / "a.pem"), "/etc/b.pem"]
    assert s.ssl_certificate_key == [str(tmp_path / "a.key"), "data:xyz"]
    assert s.ssl_certificate_sni == [("*.example.com", str(tmp_path / "c.pem"),
                                      str(tmp_path / "k.pem"))]
    assert s.ssl_conf_command == [("Options", "PrioritizeChaCha")]
    assert s.ssl_session_cache == ["builtin:1000", "shared:SSL:10m"]
    assert s.set_real_ip_from == ["10.0.0.0/8", "192.0.2.1", "::1", "unix:"]
    assert s.smtp_capabilities == ["PIPELINING", "SIZE 10485760"]
    assert s.smtp_auth == ["login", "none"] and s.starttls == "only"
    assert s.ssl_verify_depth == 3 and s.proxy_ssl == "starttls"
    assert s.proxy_ssl_trusted_certificate == str(tmp_path / "ca.pem")
    assert s.imap_client_id is True and s.smtp_greeting_delay == 2.0
    _check_types(s)
    s = load(tmp_path, server(resolver="system")).servers[0]
    assert s.resolver == "system"


# ---------------------------------------------------------------------------------------------
# dump

def effective(cfg):
    out = {"main": {k: getattr(cfg.main, k) for k in config.MAIN_KEYS}, "servers": []}
    for s in cfg.servers:
        values = s.values()
        values["listen"] = [(li.host, li.port, li.family, li.ssl, li.proxy_protocol, li.backlog,
                             li.rcvbuf, li.sndbuf, li.ipv6only, li.so_keepalive, li.multipath,
                             li.bind) for li in s.listen]
        if values["auth_http"] is not None:
            values["auth_http"] = [(u.host, u.port, u.uri, u.unix, u.host_header, u.family,
                                    u.sockaddr, u.tls) for u in values["auth_http"]]
        if values["proxy_pass"] is not None:
            values["proxy_pass"] = [(b.tokens(), b.addrs) for b in values["proxy_pass"]]
        out["servers"].append((s.name, values))
    return out


def test_dump_round_trip(tmp_path):
    text = """\
        [main]
        pid = run/x.pid
        worker_processes = 2
        user = mail mail
        worker_shutdown_timeout = 1500ms
        error_log =
            stderr info
            logs/e.log
            syslog:server=[::1]:5514,facility=mail,tag=t,nohostname debug

        [mail]
        timeout = 1h30m
        pop3_capabilities = TOP "SASL PLAIN" "a\\"b" UIDL
        auth_http_header =
            X-A "v 1"
            X-B #2
        error_log = m.log notice

        [server pop one]
        listen =
            127.0.0.1:1110 backlog=7 rcvbuf=8k sndbuf=1000 so_keepalive=1m:10s:3
            [::1]:1110 ipv6only=off bind multipath so_keepalive=on
            *:1111 so_keepalive=off
        protocol = pop3
        proxy_pass = [::1]:110
        server_name = "my host"

        [server two]
        listen = 110
        auth_http = unix:sock:/auth?a=%20
        pop3_auth = plain apop
        proxy_protocol = v2
        proxy_buffer = 3000
        max_errors = 0

        [server three]
        listen = 127.0.0.2:110
        auth_http = http://127.0.0.1:9000/x?y
        """
    cfg = load(tmp_path, text)
    dumped = cfg.dump()
    other = tmp_path / "elsewhere"
    other.mkdir()
    cfg2 = config.load(write(other, dumped))
    assert effective(cfg2) == effective(cfg)
    assert cfg2.dump().split("\n", 1)[1] == dumped.split("\n", 1)[1]
    assert "[server pop one]" in dumped


def test_dump_of_sample_round_trips(tmp_path):
    cfg = config.load(os.path.join(ROOT, "etc", "mailproxy.ini"))
    cfg2 = config.load(write(tmp_path, cfg.dump()))
    assert effective(cfg2) == effective(cfg)


# ---------------------------------------------------------------------------------------------
# the sample configuration

def test_sample_config_loads():
    path = os.path.join(ROOT, "etc", "mailproxy.ini")
    cfg = config.load(path)
    assert cfg.main.pid == os.path.join(ROOT, "etc", "mailproxy.pid")     # not in /tmp
    assert [(t.kind, t.level) for t in cfg.main.error_log] == [("stderr", "info")]
    routes = [(s.name, s.protocol, [(li.host, li.port) for li in s.listen],
               s.proxy_pass[0].key, s.auth_http) for s in cfg.servers]
    assert routes == [
        ("pop3", "pop3", [("127.0.0.1", 1110)], ("127.0.0.1", 110), None),
        ("imap", "imap", [("127.0.0.1", 1143)], ("127.0.0.1", 143), None),
        ("submission", "smtp", [("127.0.0.1", 1587)], ("127.0.0.1", 25), None)]
    # with proxy_pass an SMTP backend must get the password to decide
    assert cfg.servers[2].proxy_smtp_auth is True


def test_sample_config_documents_every_directive():
    import re
    with open(os.path.join(ROOT, "etc", "mailproxy.ini")) as f:
        text = f.read()
    keys = set(re.findall(r"^#?([a-z0-9_]+) =", text, re.M))
    assert set(config.DIRECTIVES) <= keys, set(config.DIRECTIVES) - keys
    # a removed directive appears only commented out
    for name in config.REMOVED:
        assert not re.search(r"^%s =" % name, text, re.M), name


def test_smtp_proxy_pass_needs_proxy_smtp_auth(tmp_path):
    """Without an auth service, only the backend can check an SMTP password: it must get it."""
    text = ("[server sub]\nlisten = 127.0.0.1:1587\nprotocol = smtp\n"
            "proxy_pass = 127.0.0.1:25\n")
    err = error(tmp_path, text)
    assert "proxy_smtp_auth on" in err.message and err.line == 4 and err.key == "proxy_pass"
    cfg = load(tmp_path, text + "proxy_smtp_auth = on\n")
    assert cfg.servers[0].proxy_smtp_auth is True


@pytest.mark.parametrize("route", ["proxy_pass = 127.0.0.1:25\nproxy_smtp_auth = on",
                                   "auth_http = 127.0.0.1:9/a"])
@pytest.mark.parametrize("methods", ["none", "plain login none"])
def test_smtp_auth_none_needs_xclient(tmp_path, methods, route):
    """Unauthenticated mail with no XCLIENT: the backend would see the proxy's (trusted)
    address for anyone's MAIL and RCPT (the auth service sees only the first RCPT TO), an
    open relay."""
    text = ("[server mx]\nlisten = 127.0.0.1:1025\nprotocol = smtp\n%s\nsmtp_auth = %s\n"
            "xclient = off\n" % (route, methods))
    err = error(tmp_path, text)
    assert '"xclient on"' in err.message and "relay" in err.message
    assert err.key == "xclient" and err.line == text.count("\n")
    cfg = load(tmp_path, text.replace("xclient = off", "xclient = on"))
    assert cfg.servers[0].xclient is True
    # the backend learns the client from a PROXY header instead
    load(tmp_path, text + "proxy_protocol = on\n")


def test_worker_cpu_affinity(tmp_path):
    assert load(tmp_path, "[main]\n" + SERVER).main.worker_cpu_affinity is None
    m = load(tmp_path, "[main]\nworker_cpu_affinity = auto\n" + SERVER).main
    assert m.worker_cpu_affinity == (True, ())
    m = load(tmp_path, "[main]\nworker_cpu_affinity = auto 0110\n" + SERVER).main
    assert m.worker_cpu_affinity == (True, (frozenset({1, 2}),))
    m = load(tmp_path, "[main]\nworker_cpu_affinity = 01 10\n" + SERVER).main
    assert m.worker_cpu_affinity == (False, (frozenset({0}), frozenset({1})))
    assert load(tmp_path, "[main]\nworker_cpu_affinity = off\n" + SERVER).main.worker_cpu_affinity is None


@pytest.mark.parametrize("value, message", [
    ("0120", 'invalid character "2" in "worker_cpu_affinity"'),
    ("auto 01 10", 'invalid number of arguments in "worker_cpu_affinity" directive'),
    ("0000", 'invalid value "0000" in "worker_cpu_affinity"'),
    ("1" * 1025, 'supports up to 1024 CPUs only'),
])
def test_worker_cpu_affinity_errors(tmp_path, value, message):
    e = error(tmp_path, "[main]\nworker_cpu_affinity = %s\n" % value + SERVER)
    assert message in str(e) and ":2" in str(e)


def test_the_package_docstring_names_every_main_key():
    import re
    doc = config.__doc__
    listed = doc[doc.index("``[main]``"):doc.index("``[mail]``")].split(":", 1)[1]
    names = re.findall(r"[a-z_]+", listed)
    assert sorted(names) == sorted(config.MAIN_KEYS)
