"""bench/nginx_conf.py: mailproxy INIs -> the expected nginx.conf text, and nginx itself accepts
each (`nginx -t`, when installed: with CI=true a missing nginx fails, as tests/integration does).
"""

import os
import shutil
import subprocess

import pytest

from bench.nginx_conf import nginx_conf
from mailproxy import config

CI = os.environ.get("CI") == "true"
MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"

# [main] and [mail] with three servers: what bench/bench.ini looks like
BENCH = """\
[main]
pid = {tmp}/p.pid
error_log = {tmp}/e.log error
worker_processes = 2
daemon = off

[mail]
server_name = bench.local
auth_http = 127.0.0.1:9000/auth
proxy = on

[server imap]
listen = 127.0.0.1:1143
protocol = imap

[server pop3]
listen = 127.0.0.1:1110
protocol = pop3

[server smtp]
listen = 127.0.0.1:1025
protocol = smtp
"""

BENCH_CONF = """\
# generated from {tmp}/m.ini by bench/nginx_conf.py
load_module {module};
daemon off;
master_process on;
pid {tmp}/p.pid;
error_log {tmp}/e.log error;
worker_processes 2;
worker_rlimit_nofile 4096;
events {{
    worker_connections 4096;
}}
mail {{
    server_name bench.local;
    auth_http http://127.0.0.1:9000/auth;
    proxy on;
    server {{  # [server imap]
        listen 127.0.0.1:1143;
        protocol imap;
    }}
    server {{  # [server pop3]
        listen 127.0.0.1:1110;
        protocol pop3;
    }}
    server {{  # [server smtp]
        listen 127.0.0.1:1025;
        protocol smtp;
    }}
}}
"""

# a [mail] value one server overrides, repeated directives, quoting, parsed values written
# back (units, the protocol guessed from the port), and what nginx lacks
MIXED = """\
[main]
worker_connections = 512
limit_prelogin = 100

[mail]
auth_http = http://127.0.0.1:9000/auth
timeout = 120s
pop3_auth = plain apop
resolver = system
smtp_auth = none
xclient = on

[server one]
listen =
    127.0.0.1:110
    127.0.0.2:110 proxy_protocol backlog=64
auth_http_header =
    X-Case one
    X-Name "a b"
imap_client_id = on
set_real_ip_from = 127.0.0.0/8

[server two]
listen = 127.0.0.1:143
timeout = 1m
imap_client_buffer = 8k
proxy_protocol = on
"""

MIXED_CONF = """\
# generated from {tmp}/m.ini by bench/nginx_conf.py
daemon off;
master_process on;
# not in nginx: limit_prelogin 100;
pid {tmp}/nginx.pid;
events {{
    worker_connections 512;
}}
mail {{
    auth_http http://127.0.0.1:9000/auth;
    pop3_auth plain apop;
    # not in nginx: resolver system;
    smtp_auth none;
    xclient on;
    server {{  # [server one]
        timeout 2m;
        listen 127.0.0.1:110;
        listen 127.0.0.2:110 proxy_protocol backlog=64;
        protocol pop3;
        auth_http_header X-Case one;
        auth_http_header X-Name "a b";
        # not in nginx: imap_client_id on;
        set_real_ip_from 127.0.0.0/8;
    }}
    server {{  # [server two]
        listen 127.0.0.1:143;
        protocol imap;
        timeout 60s;
        imap_client_buffer 8k;
        proxy_protocol on;
    }}
}}
"""

# one server: [mail] and the server's own lines cannot be told apart, all go in server {}
ONE = """\
[mail]
auth_http = 127.0.0.1:9000/auth
proxy_timeout = 5m

[server only]
listen = 127.0.0.1:1143
protocol = imap
xclient_extended = on
"""

# a static route (proxy_pass): nginx has none, so this one is not for nginx -t
STATIC = """\
[server static]
listen = 127.0.0.1:1143
protocol = imap
proxy_pass = 127.0.0.1:143
"""

ONE_CONF = """\
# generated from {tmp}/m.ini by bench/nginx_conf.py
daemon off;
master_process on;
events {{
}}
mail {{
    server {{  # [server only]
        auth_http http://127.0.0.1:9000/auth;
        proxy_timeout 5m;
        listen 127.0.0.1:1143;
        protocol imap;
        # not in nginx: xclient_extended on;
    }}
}}
"""


def write(tmp_path, text):
    path = tmp_path / "m.ini"
    path.write_text(text.format(tmp=tmp_path))
    return path


def test_main_mail_and_servers(tmp_path):
    got = nginx_conf(write(tmp_path, BENCH), module=MODULE,
                     main={"worker_rlimit_nofile": 4096, "worker_connections": 4096})
    assert got == BENCH_CONF.format(tmp=tmp_path, module=MODULE)


def test_overrides_repeats_and_directives_nginx_lacks(tmp_path):
    got = nginx_conf(write(tmp_path, MIXED), module=None, main={"pid": tmp_path / "nginx.pid"})
    assert got == MIXED_CONF.format(tmp=tmp_path)


def test_one_server_and_a_loaded_config(tmp_path):
    cfg = config.load(str(write(tmp_path, ONE)))
    assert nginx_conf(cfg, module=None) == ONE_CONF.format(tmp=tmp_path)


def test_a_static_route_is_a_comment(tmp_path):
    got = nginx_conf(write(tmp_path, STATIC), module=None)
    assert "\n        # not in nginx: proxy_pass 127.0.0.1:143;\n" in got


def test_config_errors_are_mailproxys(tmp_path):
    with pytest.raises(config.ConfigError, match="unknown directive"):
        nginx_conf(write(tmp_path, ONE + "no_such = 1\n"), module=None)


def _nginx():
    path = "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else shutil.which("nginx")
    if path is None or not os.path.exists(MODULE):
        msg = "nginx with its mail module is not installed (.ci/install-integration)"
        if CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return path


@pytest.mark.parametrize("ini", [BENCH, MIXED, ONE], ids=["bench", "mixed", "one"])
def test_nginx_accepts_it(tmp_path, ini):
    nginx = _nginx()
    text = nginx_conf(write(tmp_path, ini), main={"pid": tmp_path / "nginx.pid",
                                                   "error_log": tmp_path / "nginx-error.log"})
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    r = subprocess.run([nginx, "-t", "-q", "-p", f"{tmp_path}/", "-e",
                        str(tmp_path / "startup.log"), "-c", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, text + r.stdout + r.stderr
