"""What the TLS session resumption tests share (test_tls_tickets.py, test_tls_session_cache.py):
a POP3 server block over implicit TLS, the debug log line of a resumed session and the pids it
names, the workers' pids from the master's log, and a directive's line in a written INI file."""

import re

from tests.support.process import free_port

REUSED = "SSL reused session"


def tls_block(pki, port, keys=None, cert=None, **extra):
    """A POP3 server block over implicit TLS on `port`, with optional ticket key files."""
    cert = cert or pki.server_rsa
    block = {"listen": "127.0.0.1:%d ssl" % port, "protocol": "pop3",
             "proxy_pass": "127.0.0.1:%d" % free_port(), "timeout": "3s",
             "ssl_certificate": cert[0], "ssl_certificate_key": cert[1]}
    if keys:
        block["ssl_session_ticket_key"] = list(keys)
    block.update(extra)
    return block


def reused_pids(p):
    """The pids of the workers that logged a resumed session."""
    return {m.group(1) for m in (re.search(r"\] (\d+)#\d+: .*" + REUSED, ln)
                                 for ln in p.log_lines()) if m}


def worker_pids(p):
    """The pids of the workers the master logged starting, oldest first."""
    return re.findall(r"start worker process (\d+)", p.log_text())


def line_of(path, key):
    """The line number of `key = ...` in the INI file at `path`."""
    with open(path) as f:
        return next(n for n, text in enumerate(f, 1) if text.startswith(key + " ="))
