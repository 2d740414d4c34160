"""Real mail software for the integration suite: private Dovecot, Postfix, HAProxy and nginx
instances, each started from its own configuration in a temporary folder, on ephemeral loopback
ports, as a child of the test process, and stopped by pid.

  need(*programs)            fail (CI=true) or skip (locally) when a program is not installed
  TempDir()                  a world-traversable folder under /tmp (daemons drop privileges)
  Dovecot(dir, users)        IMAP + POP3 (+ haproxy listeners, + auth socket for Postfix SASL,
                             + an oauth2 passdb for OAUTHBEARER/XOAUTH2 with `oauth2=`),
                             ManageSieve (Pigeonhole) when dovecot-managesieved is installed
  Postfix(dir, ...)          smtpd on a loopback port, virtual Maildir delivery into dir
  HAProxy(dir, cfg)          haproxy -f cfg (foreground)
  Nginx(dir, config, ports)  nginx on our INI dict (servers/mail), translated by
                             bench/nginx_conf.py, with `daemon off`
  versions()                 {program: version string} of what is installed
"""

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from bench.nginx_conf import DEBIAN_MAIL_MODULE, nginx_conf
from tests.support.process import free_port, ini

CI = os.environ.get("CI") == "true"
LOOPBACK = "127.0.0.1"
CLIENT_IP = "127.0.0.2"          # a client address distinguishable from the proxy's own

USERS = {
    "alice": "secret",
    # a password that needs IMAP quoting/literals: spaces, a quote, a backslash, non-ASCII
    "bob": 'pa ss"w\\ord-\u00e9',
}

PROGRAMS = {
    "dovecot": "/usr/sbin/dovecot",
    "postfix": "/usr/sbin/postfix",
    "haproxy": "/usr/sbin/haproxy",
    "nginx": "/usr/sbin/nginx",
    "swaks": "/usr/bin/swaks",
    "curl": "/usr/bin/curl",
    "managesieve": "/usr/lib/dovecot/managesieve",
    "sieve-connect": "/usr/bin/sieve-connect",
    "openssl": "/usr/bin/openssl",
}
NGINX_MAIL_MODULE = DEBIAN_MAIL_MODULE


def program(name):
    path = PROGRAMS.get(name, name)
    if os.path.exists(path):
        return path
    return shutil.which(os.path.basename(path))


def need(*names):
    """Every named program must be installed: with CI=true a missing one fails the test (the
    install step is broken), locally it skips."""
    missing = [n for n in names if program(n) is None]
    if "nginx" in names and not os.path.exists(NGINX_MAIL_MODULE):
        missing.append(NGINX_MAIL_MODULE)
    if os.geteuid() != 0 and any(n in ("dovecot", "postfix") for n in names):
        missing.append("root (Dovecot and Postfix instances are started as root)")
    if missing:
        msg = "not available: %s (install with .ci/install-integration)" % ", ".join(missing)
        if CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def wait_port(host, port, timeout=10.0, proc=None, what="server", log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = ""
    if log is not None:
        tail = "\n" + tail_of(log)
    raise AssertionError(f"{what} is not listening on {host}:{port}{tail}")


def tail_of(path, lines=40):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not readable)"


class TempDir:
    """A folder under /tmp that daemons' unprivileged users can traverse (pytest's tmp_path
    lives in a 0700 folder), removed by cleanup()."""

    def __init__(self, prefix="mailproxy-it-"):
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        os.chmod(self.path, 0o755)

    def __truediv__(self, other):
        return self.path / other

    def cleanup(self):
        shutil.rmtree(self.path, ignore_errors=True)


class LogWatch:
    """A log file read from a mark on (so a shared server's log is looked at per test)."""

    def __init__(self, path):
        self.path = Path(path)
        self.offset = 0

    def mark(self):
        try:
            self.offset = self.path.stat().st_size
        except FileNotFoundError:
            self.offset = 0

    def text(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait(self, pattern, timeout=5.0):
        """The first line (after the mark) matching the regex `pattern`."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.text().splitlines():
                if re.search(pattern, line):
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(f"no line matching {pattern!r} in {self.path} within "
                                     f"{timeout}s; since the mark:\n{self.text()[-4000:]}")
            time.sleep(0.05)


class Child:
    """A started daemon process (ours): stop() sends TERM to its pid (or to `stop_pid()`)."""

    proc = None

    def _spawn(self, argv, cwd, out_name):
        self.out_path = Path(cwd) / out_name
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=str(cwd), stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @contextlib.contextmanager
    def _stopped_on_error(self):
        """Stop what was spawned if the start-up check fails (nothing is left running)."""
        try:
            yield
        except BaseException:
            self.stop()
            raise

    def stop_pid(self):
        return self.proc.pid

    def stop(self, timeout=10.0):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                pid = self.stop_pid()
            except Exception:
                pid = self.proc.pid
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._out.close()


# ---------------------------------------------------------------------------------------------
# Dovecot

class Dovecot(Child):
    """A private Dovecot: IMAP and POP3 listeners, plain and `haproxy = yes` ones, a
    passwd-file of users, Maildirs under dir/mail, log in dir/dovecot.log, an auth socket for
    Postfix SASL at dir/auth-client. Trusts 127.0.0.0/8 for ID (login_trusted_networks) and
    PROXY headers (haproxy_trusted_networks)."""

    def __init__(self, tmp, users, cert=None, oauth2=None):
        """cert: (certificate, key) files to offer TLS (STARTTLS on the plain listeners, plus
        implicit-TLS imaps / pop3s listeners); None: ssl = no.  oauth2: the text of a
        dovecot-oauth2.conf.ext: OAUTHBEARER and XOAUTH2 through an oauth2 passdb (the
        passwd-file one keeps the other mechanisms), refusals without auth_failure_delay."""
        self.dir = Path(tmp)
        self.users = dict(users)
        names = ["imap", "imap_haproxy", "pop3", "pop3_haproxy"]
        # ManageSieve (dovecot-managesieved) when installed: the sieve tests need() it
        self.sieve = program("managesieve") is not None
        if self.sieve:
            names += ["sieve", "sieve_haproxy"]
        if cert:
            names += ["imaps", "pop3s"]
        self.ports = {k: free_port() for k in names}
        ports = set()
        for k in names:                     # distinct (free_port may hand one out twice)
            while self.ports[k] in ports:
                self.ports[k] = free_port()
            ports.add(self.ports[k])
        if cert:
            ssl = f"ssl = yes\nssl_cert = <{cert[0]}\nssl_key = <{cert[1]}\n"
            imaps = (f"  inet_listener imaps {{\n    port = {self.ports['imaps']}\n"
                     f"    ssl = yes\n  }}\n")
            pop3s = (f"  inet_listener pop3s {{\n    port = {self.ports['pop3s']}\n"
                     f"    ssl = yes\n  }}\n")
        else:
            ssl, imaps, pop3s = "ssl = no\n", "", ""
        sieve = ""
        if self.sieve:
            sieve = f"""service managesieve-login {{
  inet_listener sieve {{
    port = {self.ports['sieve']}
  }}
  inet_listener sieve_haproxy {{
    port = {self.ports['sieve_haproxy']}
    haproxy = yes
  }}
}}
plugin {{
  sieve = file:~/sieve;active=~/.dovecot.sieve
}}
"""
        self.log_path = self.dir / "dovecot.log"
        self.auth_socket = self.dir / "auth-client"
        nobody = pwd.getpwnam("nobody")
        mail = self.dir / "mail"
        mail.mkdir()
        os.chown(mail, nobody.pw_uid, nobody.pw_gid)
        passwd = self.dir / "passwd"
        passwd.write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.users.items()))
        os.chmod(passwd, 0o644)
        mechanisms, oauth_passdb, passwd_mechs, delay = "plain login cram-md5", "", "", ""
        if oauth2 is not None:
            ext = self.dir / "dovecot-oauth2.conf.ext"
            ext.write_text(oauth2)
            mechanisms += " oauthbearer xoauth2"
            delay = "auth_failure_delay = 0\n"
            oauth_passdb = ("passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
                            f"  args = {ext}\n}}\n")
            passwd_mechs = "  mechanisms = plain login cram-md5\n"
        conf = f"""
base_dir = {self.dir}/run
state_dir = {self.dir}/state
log_path = {self.log_path}
protocols = imap pop3{" sieve" if self.sieve else ""}
listen = {LOOPBACK}
{ssl}disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_verbose = yes
{delay}login_trusted_networks = 127.0.0.0/8
haproxy_trusted_networks = 127.0.0.0/8
{oauth_passdb}passdb {{
  driver = passwd-file
{passwd_mechs}  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid={nobody.pw_uid} gid={nobody.pw_gid} home={mail}/%u
}}
mail_location = maildir:~/Maildir
pop3_uidl_format = %08Xu%08Xv
service imap-login {{
  inet_listener imap {{
    port = {self.ports['imap']}
  }}
  inet_listener imap_haproxy {{
    port = {self.ports['imap_haproxy']}
    haproxy = yes
  }}
{imaps}}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.ports['pop3']}
  }}
  inet_listener pop3_haproxy {{
    port = {self.ports['pop3_haproxy']}
    haproxy = yes
  }}
{pop3s}}}
{sieve}service auth {{
  unix_listener {self.auth_socket} {{
    mode = 0666
  }}
}}
"""
        self.conf_path = self.dir / "dovecot.conf"
        self.conf_path.write_text(conf)
        self.log = LogWatch(self.log_path)
        self._spawn([program("dovecot"), "-F", "-c", str(self.conf_path)], self.dir, "dovecot.out")
        with self._stopped_on_error():
            for name in ("imap", "pop3") + (("sieve",) if self.sieve else ()):
                wait_port(LOOPBACK, self.ports[name], proc=self.proc, what="dovecot " + name,
                          log=self.out_path)

    def version(self):
        return subprocess.run([program("dovecot"), "--version"], capture_output=True,
                              text=True).stdout.strip()


# ---------------------------------------------------------------------------------------------
# Postfix

MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix(Child):
    """A private Postfix (`postfix -c DIR start-fg`): smtpd on a loopback port, trusting
    127.0.0.0/8 for XCLIENT, delivering mail for `domain` to Maildirs under dir/vmail
    (one per `mailboxes` local part), logging to dir/maillog. With `sasl_path` (a Dovecot
    auth socket), smtpd offers AUTH through Dovecot. `xclient_hosts`: who may send XCLIENT
    ("" for nobody: the common mistake `mailproxy check` finds)."""

    def __init__(self, tmp, mailboxes=("alice", "bob"), domain="example.org", sasl_path=None,
                 hostname="backend.test", xclient_hosts="127.0.0.0/8"):
        self.dir = Path(tmp)
        self.port = free_port()
        self.domain = domain
        etc = self.dir / "etc"
        etc.mkdir()
        self.queue = self.dir / "queue"
        data = self.dir / "data"
        self.vmail = self.dir / "vmail"
        for d in (self.queue, data, self.vmail):
            d.mkdir()
        nobody = pwd.getpwnam("nobody")
        os.chown(self.vmail, nobody.pw_uid, nobody.pw_gid)
        os.chown(data, pwd.getpwnam("postfix").pw_uid, -1)
        (etc / "vmailbox").write_text("".join(f"{m}@{domain} {m}/\n" for m in mailboxes))
        self.maillog = self.dir / "maillog"
        sasl = ""
        if sasl_path:
            sasl = (f"smtpd_sasl_auth_enable = yes\nsmtpd_sasl_type = dovecot\n"
                    f"smtpd_sasl_path = {sasl_path}\n")
        (etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = {LOOPBACK}
inet_protocols = ipv4
myhostname = {hostname}
mydomain = {hostname}
myorigin = {hostname}
mydestination =
mynetworks = 127.0.0.1/32
maillog_file_prefixes = /tmp
maillog_file = {self.maillog}
alias_maps =
alias_database =
smtpd_authorized_xclient_hosts = {xclient_hosts}
smtpd_banner = $myhostname ESMTP Postfix
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {self.vmail}
virtual_mailbox_maps = texthash:{etc}/vmailbox
virtual_uid_maps = static:{nobody.pw_uid}
virtual_gid_maps = static:{nobody.pw_gid}
biff = no
{sasl}""")
        (etc / "master.cf").write_text(MASTER_CF.format(listen=f"{LOOPBACK}:{self.port}"))
        self.etc = etc
        self.log = LogWatch(self.maillog)
        subprocess.run([program("postfix"), "-c", str(etc), "check"], check=True,
                       capture_output=True, stdin=subprocess.DEVNULL)
        self._spawn([program("postfix"), "-c", str(etc), "start-fg"], self.dir, "postfix.out")
        with self._stopped_on_error():
            wait_port(LOOPBACK, self.port, proc=self.proc, what="postfix smtpd",
                      log=self.maillog)

    def stop_pid(self):
        # start-fg keeps postfix-script (a shell) in front of the master: stop the master
        return int((self.queue / "pid" / "master.pid").read_text().split()[0])

    def delivered(self, mailbox, timeout=10.0):
        """The delivered messages (bytes) of `mailbox`, waiting for at least one."""
        new = self.vmail / mailbox / "new"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if new.is_dir():
                files = sorted(new.iterdir())
                if files:
                    return [f.read_bytes() for f in files]
            time.sleep(0.05)
        raise AssertionError(f"nothing delivered to {mailbox} within {timeout}s\n"
                             + tail_of(self.maillog))

    def wait_message(self, mailbox, token, timeout=10.0):
        """The delivered message of `mailbox` that holds `token` (bytes, as stored: LF line
        ends), waiting for it."""
        token = token.encode() if isinstance(token, str) else token
        deadline = time.monotonic() + timeout
        while True:
            new = self.vmail / mailbox / "new"
            if new.is_dir():
                for f in new.iterdir():
                    try:
                        data = f.read_bytes()
                    except FileNotFoundError:
                        continue
                    if token in data:
                        return data
            if time.monotonic() >= deadline:
                raise AssertionError(f"no message with {token!r} delivered to {mailbox} within "
                                     f"{timeout}s\n" + tail_of(self.maillog))
            time.sleep(0.05)

    def clear(self, mailbox):
        for sub in ("new", "cur"):
            d = self.vmail / mailbox / sub
            if d.is_dir():
                for f in d.iterdir():
                    f.unlink()

    @staticmethod
    def version():
        out = subprocess.run([program("postfix").replace("postfix", "postconf"), "-d",
                              "mail_version"], capture_output=True, text=True).stdout
        return out.split("=", 1)[-1].strip()


# ---------------------------------------------------------------------------------------------
# HAProxy

class HAProxy(Child):
    def __init__(self, tmp, config):
        self.dir = Path(tmp)
        self.conf_path = self.dir / "haproxy.cfg"
        self.conf_path.write_text(config)
        check = subprocess.run([program("haproxy"), "-c", "-f", str(self.conf_path)],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self._spawn([program("haproxy"), "-db", "-f", str(self.conf_path)], self.dir,
                    "haproxy.out")

    @staticmethod
    def version():
        out = subprocess.run([program("haproxy"), "-v"], capture_output=True, text=True).stdout
        return out.splitlines()[0] if out else ""


# ---------------------------------------------------------------------------------------------
# nginx

class Nginx(Child):
    def __init__(self, tmp, config, ports, error_level="info"):
        """config: our INI dict (harness.ini), written as mailproxy.ini and translated by
        bench/nginx_conf.py; ports: the loopback ports to wait for."""
        self.dir = Path(tmp)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ini_path = self.dir / "mailproxy.ini"
        self.ini_path.write_text(ini(**config))
        self.log_path = self.dir / "nginx-error.log"
        self.conf_path = self.dir / "nginx.conf"
        self.conf_path.write_text(nginx_conf(self.ini_path, module=NGINX_MAIL_MODULE, main={
            "worker_processes": 1, "pid": self.dir / "nginx.pid",
            "error_log": f"{self.log_path} {error_level}", "worker_connections": 256}))
        self.log = LogWatch(self.log_path)
        self._spawn([program("nginx"), "-e", str(self.log_path), "-p", str(self.dir),
                     "-c", str(self.conf_path)], self.dir, "nginx.out")
        with self._stopped_on_error():
            for port in ports:
                wait_port(LOOPBACK, port, proc=self.proc, what="nginx", log=self.log_path)

    @staticmethod
    def version():
        out = subprocess.run([program("nginx"), "-v"], capture_output=True, text=True)
        return (out.stderr or out.stdout).strip()


def versions():
    found = {}
    for name, fn in (("nginx", Nginx.version), ("postfix", Postfix.version),
                     ("haproxy", HAProxy.version)):
        try:
            found[name] = fn() if program(name) else None
        except Exception:
            found[name] = None
    if program("dovecot"):
        found["dovecot"] = subprocess.run([program("dovecot"), "--version"], capture_output=True,
                                          text=True).stdout.strip()
    for name, arg in (("swaks", "--version"), ("curl", "--version")):
        if program(name):
            out = subprocess.run([program(name), arg], capture_output=True, text=True).stdout
            found[name] = next((ln.strip() for ln in out.splitlines() if ln.strip()), "")
    return found
