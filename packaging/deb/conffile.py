#!/usr/bin/env python3
"""The Debian package's /etc/mailproxy/mailproxy.ini, made from the sample configuration:
`python3 packaging/deb/conffile.py etc/mailproxy.ini OUTPUT`.

The sample with the package's places: pid file and control socket in /run/mailproxy (the
unit's RuntimeDirectory), logs in /var/log/mailproxy (rotated by /etc/logrotate.d/mailproxy),
workers as the system user mailproxy. Each change must match exactly one line of the sample,
so a changed sample stops the build instead of giving a wrong package.
"""

import sys

HEADER = """\
# /etc/mailproxy/mailproxy.ini: mailproxy's configuration, installed by the Debian package
# (a conffile: your changes are kept on upgrades). Every key: mailproxy.ini(5).  Check it with
#     mailproxy -t
# and apply it with `systemctl reload mailproxy` (or `mailproxy -s reload`).
#
# As installed it proxies POP3 on 127.0.0.1:1110, IMAP on 127.0.0.1:1143 and SMTP
# submission on 127.0.0.1:1587 to the mail server on this machine (ports 110, 143, 25;
# the notes below say what it expects there).
# The master runs as root (systemd's mailproxy.service, or by hand) and its workers as the
# user mailproxy; logs go to /var/log/mailproxy, the pid file and control socket to
# /run/mailproxy (made by systemd; by hand: `install -d /run/mailproxy` first).
#
"""

# (line of the sample, line of the package)
CHANGES = [
    ("pid = mailproxy.pid", "pid = /run/mailproxy/mailproxy.pid"),
    ("control_socket = mailproxy.sock", "control_socket = /run/mailproxy/mailproxy.sock"),
    ("error_log = stderr info", "error_log = /var/log/mailproxy/error.log info"),
    ("#user = mailproxy mailproxy", "user = mailproxy"),
    ("#access_log = /var/log/mailproxy/access.log", "access_log = /var/log/mailproxy/access.log"),
    ("#     mailproxy -c mailproxy.ini sessions [USER] [--backend ADDR] [--json]",
     "#     mailproxy sessions [USER] [--backend ADDR] [--json]"),
    ("#     mailproxy -c mailproxy.ini kick USER | --backend ADDR",
     "#     mailproxy kick USER | --backend ADDR"),
]


def packaged(text):
    lines = text.split("\n")
    for old, new in CHANGES:
        at = [i for i, line in enumerate(lines) if line.rstrip() == old]
        if len(at) != 1:
            raise SystemExit("conffile.py: the sample has %d lines %r (expected one): update "
                             "packaging/deb/conffile.py" % (len(at), old))
        lines[at[0]] = new
    return HEADER + "\n".join(lines)


def main(argv):
    if len(argv) != 2:
        raise SystemExit("usage: conffile.py SAMPLE OUTPUT")
    with open(argv[0], encoding="utf-8") as f:
        text = packaged(f.read())
    with open(argv[1], "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
