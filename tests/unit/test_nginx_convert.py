"""nginx's configuration syntax (nginx_syntax.py) and its mapping to the INI (convert.py), with
files given by a reader function: no I/O."""

import pytest

from mailproxy import config
from mailproxy.convert import convert, resolve_paths
from mailproxy.nginx_syntax import NginxSyntaxError, parse


def tree(text, files=None):
    files = dict(files or {})

    def reader(name):
        if name not in files:
            raise FileNotFoundError(2, "No such file or directory")
        return files[name]
    return parse(text, "/etc/nginx/nginx.conf", conf_prefix="/etc/nginx/", reader=reader)


def flat(directives):
    return [(d.name, d.args, d.line, None if d.block is None else flat(d.block))
            for d in directives]


# -- the tokenizer: ngx_conf_read_token ----------------------------------------------------------

def test_words_quotes_escapes_and_comments():
    t = tree('a "x y" \'q"r\' b\\ c "e\\"f\\\\" \\t\\n\\z; # comment ;{}\n'
             "b#notcomment c#d;  #x\n")
    assert flat(t) == [("a", ["x y", 'q"r', "b\\ c", 'e"f\\', "\t\n\\z"], 1, None),
                       ("b#notcomment", ["c#d"], 2, None)]


def test_blocks_nest_and_variables_keep_their_braces():
    t = tree("mail {\n  server {\n    auth_http_header X ${var}x;\n  }\n}\nevents{}\n")
    assert flat(t) == [("mail", [], 1, [("server", [], 2, [
        ("auth_http_header", ["X", "${var}x"], 3, None)])]), ("events", [], 6, [])]


def test_a_brace_inside_a_word_is_part_of_it():
    assert flat(tree("a b}c;")) == [("a", ["b}c"], 1, None)]


def test_line_of_a_directive_is_its_first_word():
    assert [d.line for d in tree("\n\n  a\n  b;\nc\n;")] == [3, 5]


@pytest.mark.parametrize("text, message, line", [
    ("a b", 'unexpected end of file, expecting ";" or "}"', 1),
    ("mail {\n a b;\n", 'unexpected end of file, expecting "}"', 3),
    ("a;\n}", 'unexpected "}"', 2),
    (";", 'unexpected ";"', 1),
    ('a "b"c;', 'unexpected "c"', 1),
    ("a b }", 'unexpected "}"', 1),
    ('a "b;\n', 'unexpected end of file, expecting ";" or "}"', 2),
])
def test_syntax_errors_name_file_and_line(text, message, line):
    with pytest.raises(NginxSyntaxError) as e:
        tree(text)
    assert (e.value.message, e.value.line) == (message, line)
    assert str(e.value) == "%s in /etc/nginx/nginx.conf:%d" % (message, line)


def test_quoted_word_may_end_at_semicolon_or_brace():
    assert flat(tree('a "b";c \'d\'{}')) == [("a", ["b"], 1, None), ("c", ["d"], 1, [])]


# -- include ---------------------------------------------------------------------------------------

def test_include_relative_to_the_main_folder_in_place():
    files = {"/etc/nginx/mail.conf": "server { listen 143; }\n",
             "/etc/nginx/sub/x.conf": "include mail.conf;\n"}
    t = tree("mail {\n include sub/x.conf;\n timeout 5s;\n}\n", files)
    server = t[0].block[0]
    assert (server.name, server.file, server.line) == ("server", "/etc/nginx/mail.conf", 1)
    assert t[0].block[1].name == "timeout"


def test_include_of_a_missing_plain_file_is_an_error():
    with pytest.raises(NginxSyntaxError) as e:
        tree("include nothere.conf;")
    assert 'open() "/etc/nginx/nothere.conf" failed (2: No such file or directory)' in str(e.value)
    assert e.value.line == 1


def test_include_cannot_loop_forever():
    with pytest.raises(NginxSyntaxError, match="nested deeper"):
        tree("include /etc/nginx/a.conf;", {"/etc/nginx/a.conf": "include a.conf;"})


# -- the mapping -----------------------------------------------------------------------------------

NGINX = """\
user mail;
worker_processes 2;
error_log logs/error.log info;
pid run/nginx.pid;
events { worker_connections 512; use epoll; }
http { server { listen 80; } }
mail {
    server_name mx.example.org;
    auth_http 127.0.0.1:9000/auth;
    ssl_certificate certs/mail.pem;
    ssl_certificate_key /etc/ssl/mail.key;
    imap_capabilities IMAP4rev1 "X Y";
    server {
        listen 143;
        listen 127.0.0.2:1143;
        protocol imap;
        ssl_session_ticket_key keys/t.key;
        ssl on;
        unknown_thing 1;
    }
    server {
        server_name mx.example.org;
        listen 25;
        protocol smtp;
    }
    server {
        listen 26;
        protocol smtp;
        server_name mx.example.org;
    }
}
"""


def test_mapping_to_sections_keys_and_notes():
    conv = convert(tree(NGINX), "/usr/share/nginx/", "/etc/nginx/")
    text = conv.ini("/etc/nginx/nginx.conf")
    body = text[text.index("[main]"):]
    assert body == """\
[main]
user = mail
worker_processes = 2
error_log = /usr/share/nginx/logs/error.log info
pid = /usr/share/nginx/run/nginx.pid
worker_connections = 512

[mail]
server_name = mx.example.org
auth_http = 127.0.0.1:9000/auth
ssl_certificate = /etc/nginx/certs/mail.pem
ssl_certificate_key = /etc/ssl/mail.key
imap_capabilities = IMAP4rev1 "X Y"

[server 143]
listen =
    143
    127.0.0.2:1143
protocol = imap
ssl_session_ticket_key = /etc/nginx/keys/t.key

[server mx.example.org]
server_name = mx.example.org
listen = 25
protocol = smtp

[server mx.example.org-2]
listen = 26
protocol = smtp
server_name = mx.example.org
"""
    notes = text[:text.index("[main]")]
    assert "/etc/nginx/nginx.conf:5: use epoll; (not in mailproxy)" in notes
    assert "/etc/nginx/nginx.conf:6: http {...} (not a mail block)" in notes
    assert '/etc/nginx/nginx.conf:18: ssl on; (removed in nginx 1.25.1' in notes
    assert "/etc/nginx/nginx.conf:19: unknown_thing 1; (not in mailproxy)" in notes
    assert all(line.startswith("#") for line in notes.strip().splitlines())
    assert len(conv.notes) == 4


def test_converted_ini_loads(tmp_path):
    text = NGINX.replace("ssl_certificate", "#").replace("127.0.0.1:9000/auth", "unix:/a.sock")
    conv = convert(tree(text), "/p/", "/etc/nginx/")
    path = tmp_path / "x.ini"
    path.write_text(conv.ini("nginx.conf"))
    cfg = config.load(str(path))
    assert [s.name for s in cfg.servers] == ["143", "mx.example.org", "mx.example.org-2"]
    assert cfg.servers[0].imap_capabilities == ["IMAP4rev1", "X Y"]
    assert cfg.main.pid == "/p/run/nginx.pid"


def test_directives_in_the_wrong_block_are_listed():
    conv = convert(tree("listen 1;\nmail { listen 2; server { pid x; } }\nworker_connections 9;"),
                   "/p/", "/c/")
    assert conv.main == [] and conv.mail == []
    assert [n.split(": ", 1)[0] for n in conv.notes] == [
        "/etc/nginx/nginx.conf:1", "/etc/nginx/nginx.conf:2", "/etc/nginx/nginx.conf:2",
        "/etc/nginx/nginx.conf:3"]


def test_no_mail_block_is_said():
    assert convert(tree("events {}"), "/p/", "/c/").notes == [
        "no mail {} block: no [server] sections"]


@pytest.mark.parametrize("name, args, expected", [
    ("error_log", ["stderr", "info"], ["stderr", "info"]),
    ("error_log", ["syslog:server=127.0.0.1"], ["syslog:server=127.0.0.1"]),
    ("error_log", ["/abs/e.log"], ["/abs/e.log"]),
    ("access_log", ["a.log", "json"], ["/p/a.log", "json"]),
    ("ssl_certificate", ["data:xyz"], ["data:xyz"]),
    ("ssl_certificate_key", ["engine:x:y"], ["engine:x:y"]),
    ("ssl_certificate_sni", ["a.test", "c.pem", "/k.pem"], ["a.test", "/c/c.pem", "/k.pem"]),
    ("ssl_conf_command", ["ChainCAFile", "ca.pem"], ["ChainCAFile", "/c/ca.pem"]),
    ("ssl_conf_command", ["Options", "x"], ["Options", "x"]),
    ("proxy_ssl_trusted_certificate", ["ca.pem"], ["/c/ca.pem"]),
    ("timeout", ["5s"], ["5s"]),
])
def test_paths_as_nginx_resolves_them(name, args, expected):
    assert resolve_paths(name, args, "/p/", "/c/") == expected


# -- check's certificate expiry (probes.expiry, pure) ----------------------------------------------

def test_expiry_severities():
    from mailproxy.probes import EXPIRY_WARN, expiry
    now = 1_000_000_000.0
    assert expiry(now - 1, "c", now).severity == "error"
    assert expiry(now + EXPIRY_WARN - 60, "c", now).severity == "warn"
    assert expiry(now + EXPIRY_WARN + 60, "c", now).severity == "ok"
    assert expiry(now - 1, "c", now).text == "c expired on 2001-09-09 01:46:39 UTC"


def test_check_targets_are_every_pool_member_and_map_target_once():
    from types import SimpleNamespace
    from mailproxy import probes
    from mailproxy.upstreams import Backend
    pool = [Backend("127.0.0.1", 1143), Backend("127.0.0.2", 1143, backup=True)]
    mapped = SimpleNamespace(backends=lambda: [Backend("127.0.0.2", 1143),
                                               Backend("127.0.0.3", 143)])
    conf = SimpleNamespace(proxy_pass=pool, proxy_map=mapped)
    assert probes.backend_targets(conf) == [("127.0.0.1", 1143), ("127.0.0.2", 1143),
                                            ("127.0.0.3", 143)]
    assert probes.backend_targets(SimpleNamespace(proxy_pass=None, proxy_map=None)) == []
