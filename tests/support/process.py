"""The proxy as a subprocess (ProxyProcess, readiness = its pid file), its INI text (ini,
server_block), free ports, and Setup: a started proxy with its auth service and backend."""

import collections
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.clients import LineClient
from tests.support.common import REPO, track, wait_for


_GIVEN = collections.deque(maxlen=2048)   # ports handed out lately by free_port


def free_port(host="127.0.0.1"):
    """An ephemeral TCP port free on `host` right now (bound then released), never one of the
    last ports it gave (a config asking for several ports gets distinct ones)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            break
    _GIVEN.append(port)
    return port


# ---------------------------------------------------------------------------------------------
# INI

def _format_value(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        # a repeated directive: one key, one indented continuation line per occurrence
        return "\n" + "\n".join("    " + str(v) for v in value)
    return str(value)


def _section(name, values):
    lines = [f"[{name}]"]
    for key, value in (values or {}).items():
        if value is None:
            continue
        lines.append(f"{key} = {_format_value(value)}")
    return "\n".join(lines) + "\n"


def ini(servers=None, mail=None, main=None):
    """INI text in mailproxy's format.

    servers: {name: {key: value}} -> one `[server NAME]` each (use a list for repeated directives,
    e.g. listen or auth_http_header; a bool becomes on/off; None values are left out).
    mail: {key: value} for `[mail]` (written even when empty only if given).
    main: {key: value} for `[main]`.
    """
    parts = []
    if main is not None:
        parts.append(_section("main", main))
    if mail is not None:
        parts.append(_section("mail", mail))
    for name, values in (servers or {}).items():
        parts.append(_section(f"server {name}", values))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------


def server_block(protocol, port, host="127.0.0.1", **directives):
    """One `[server]` dict: listen on host:port with `protocol`, plus directives (nginx names;
    use underscores as in nginx, e.g. pop3_auth='plain apop')."""
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    block = {"listen": listen, "protocol": protocol}
    block.update(directives)
    return block


# ---------------------------------------------------------------------------------------------
# the proxy subprocess

def proxy_command():
    """Command prefix that runs mailproxy: $MAILPROXY_TEST_CMD (shell words) or `python -m mailproxy`."""
    custom = os.environ.get("MAILPROXY_TEST_CMD")
    if custom:
        return shlex.split(custom)
    return [sys.executable, "-m", "mailproxy"]


class ProxyProcess:
    """mailproxy running as a subprocess on a written INI file.

    config: INI text (see ini()) or a dict {'servers':..., 'mail':..., 'main':...} passed to ini().
    `[main] pid` and `[main] error_log` are set to files in tmp_path unless the config sets them.
    The pid file appearing is the readiness signal (start fails with the log tail after
    `start_timeout`). Only the process started here is ever signalled.
    """

    def __init__(self, tmp_path, config, command=None, log_level="info", start=True,
                 start_timeout=5.0, env=None, name="mailproxy"):
        self.dir = Path(tmp_path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf_path = self.dir / f"{name}.ini"
        self.pid_path = self.dir / f"{name}.pid"
        self.log_path = self.dir / f"{name}-error.log"
        self.stdout_path = self.dir / f"{name}.stdout"
        self.stderr_path = self.dir / f"{name}.stderr"
        self.command = list(command) if command else proxy_command()
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.env = env
        self.proc = None
        self.pid = None
        self.write_config(config)
        if start:
            self.start()

    # config -------------------------------------------------------------------------------
    def render(self, config):
        if isinstance(config, dict):
            config = dict(config)
            main = dict(config.pop("main", None) or {})
            main.setdefault("pid", str(self.pid_path))
            main.setdefault("error_log", f"{self.log_path} {self.log_level}")
            return ini(main=main, **config)
        text = config
        has_main = re.search(r"^\[main\]\s*$", text, re.M)
        extra = []
        if not re.search(r"^pid\s*=", text, re.M):
            extra.append(f"pid = {self.pid_path}")
        if not re.search(r"^error_log\s*=", text, re.M):
            extra.append(f"error_log = {self.log_path} {self.log_level}")
        if not extra:
            return text
        if has_main:
            return text[:has_main.end()] + "\n" + "\n".join(extra) + text[has_main.end():]
        return "[main]\n" + "\n".join(extra) + "\n\n" + text

    def write_config(self, config):
        self.config_text = self.render(config)
        self.conf_path.write_text(self.config_text)

    # lifecycle ----------------------------------------------------------------------------
    def start(self):
        if self.pid_path.exists():
            self.pid_path.unlink()
        env = dict(os.environ)                 # cwd = repo root makes `-m mailproxy` importable
        env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        if self.env:
            env.update(self.env)
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.command + ["-c", str(self.conf_path)], cwd=str(REPO),
                                     stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
                                     env=env)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.pid_path.exists():
                text = self.pid_path.read_text().strip()
                if text.isdigit():
                    self.pid = int(text)
                    return self
            if self.proc.poll() is not None:
                self.stop()                    # closes the output files
                raise AssertionError(f"mailproxy exited with {self.proc.returncode} before writing "
                                     f"its pid file\n{self.diagnostics()}")
            time.sleep(0.01)
        self.stop()
        raise AssertionError(f"mailproxy wrote no pid file within {self.start_timeout}s\n"
                             f"{self.diagnostics()}")

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        """Send `sig` to the process started here."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self, timeout=5.0):
        """Wait for exit; the return code."""
        return self.proc.wait(timeout)

    def stop(self, timeout=5.0):
        """TERM the started process, wait, KILL if it hangs. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
            except ProcessLookupError:
                pass
        for f in (getattr(self, "_out", None), getattr(self, "_err", None)):
            if f and not f.closed:
                f.close()
        return self.proc.returncode

    # logs ---------------------------------------------------------------------------------
    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self):
        return self.log_text().splitlines()

    def stderr_text(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern, timeout=3.0, regex=False):
        """First error_log line containing `pattern` (or matching the regex), waiting up to `timeout`."""
        def find():
            for line in self.log_lines():
                if (re.search(pattern, line) if regex else pattern in line):
                    return line
            return None
        try:
            return wait_for(find, timeout, what=f"log line {pattern!r}")
        except AssertionError:
            raise AssertionError(f"no log line {pattern!r} within {timeout}s\n{self.diagnostics()}")

    def diagnostics(self, lines=30):
        log = "\n".join(self.log_lines()[-lines:])
        err = "\n".join(self.stderr_text().splitlines()[-lines:])
        return f"--- error_log tail ---\n{log}\n--- stderr tail ---\n{err}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------------------------
# a whole set-up: proxy + auth server + backend

class Setup:
    """A started proxy with the pieces around it (any may be None)."""

    def __init__(self, proxy, host, port, auth=None, backend=None):
        self.proxy = proxy
        self.host = host
        self.port = port
        self.auth = auth
        self.backend = backend

    def connect(self, timeout=5.0, greeting=True):
        """A LineClient; with greeting=True the greeting line is read into `.greeting`."""
        c = LineClient(self.host, self.port, timeout)
        c.greeting = c.readline() if greeting else None
        return c

    def pop3(self, timeout=5.0):
        import poplib
        return track(poplib.POP3(self.host, self.port, timeout=timeout))

    def imap(self, timeout=5.0):
        import imaplib
        m = imaplib.IMAP4(self.host, self.port, timeout=timeout)
        return track(m, m.shutdown)           # IMAP4.close() is the CLOSE command

    def smtp(self, timeout=5.0):
        import smtplib
        return track(smtplib.SMTP(self.host, self.port, timeout=timeout))

    def raw(self, timeout=5.0):
        """A plain connected socket (closed after the test)."""
        return track(socket.create_connection((self.host, self.port), timeout=timeout))


class SessionLog:
    """The shared proxy's error_log as one test sees it: only the lines of the sessions it
    opened (`connect` records the client port; the `connected to` line, written first, names
    it and gives the connection number that its later lines carry)."""

    def __init__(self, proxy, server=None):
        self.proxy = proxy
        self.start = len(proxy.log_lines())
        self.ports = set()
        self.server = server       # "host:port": every session on that listener counts too

    def log_lines(self):
        mine, out = set(), []
        for line in self.proxy.log_lines()[self.start:]:
            m = re.search(r" (\d+)#\d+: \*(\d+) ", line)
            if not m:
                continue
            c = re.search(r"\*\d+ client [^ ]+:(\d+) connected to ([^\s,]+)", line)
            if c and (int(c.group(1)) in self.ports or c.group(2) == self.server):
                mine.add(m.groups())
            if m.groups() in mine:
                out.append(line)
        return out

    def log_text(self):
        return "\n".join(self.log_lines())

    def wait_log(self, pattern, timeout=3.0, regex=False):
        def find():
            for line in self.log_lines():
                if re.search(pattern, line) if regex else pattern in line:
                    return line
            return None
        try:
            return wait_for(find, timeout, what=f"log line {pattern!r}")
        except AssertionError:
            raise AssertionError(f"no log line {pattern!r} of this test's sessions within "
                                 f"{timeout}s\n{self.proxy.diagnostics()}")


def have_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def config_key(config):
    """A hashable key of a configuration dict (lists, as repeated directives, become tuples)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()))


class SharedProxy:
    """One proxy and one auth service for a test module, one server block per configuration the
    tests use (`configs`: dicts of directives with `protocol`, and optionally `host` and
    `listen_extra`, e.g. "ssl"; `defaults` fill in what a configuration leaves out, auth_http
    points at the auth service unless it sets auth_http or proxy_pass).

    `setup(backend, **config)` hands a test a Setup on its configuration's block, the auth
    service reset and routed to `backend`; its `proxy` is a SessionLog of the sessions opened on
    that block from then on. Tests stay independent that way (the module's tests run one after
    the other); a test that signals or reloads the process keeps a proxy of its own.
    """

    def __init__(self, directory, configs, defaults=None, name="shared", log_level="info"):
        from tests.support.auth import AuthServer
        self.auth = AuthServer()
        for attempt in range(3):
            servers = self._servers(configs, defaults or {})
            try:
                # many blocks (TLS contexts) load slower on a busy machine: a generous bound
                self.proxy = ProxyProcess(directory, {"servers": servers},
                                          name=f"{name}{attempt}", start_timeout=30.0,
                                          log_level=log_level)
                return
            except AssertionError as e:
                # another process took one of the free ports meanwhile: new ports, once more
                if attempt == 2 or "Address already in use" not in str(e):
                    self.auth.stop()
                    raise
            except BaseException:
                self.auth.stop()
                raise

    def _servers(self, configs, defaults):
        self.addresses, servers = {}, {}
        held = []       # each port stays bound until all are chosen: no port given twice
        try:
            for i, config in enumerate(configs):
                self._server(i, config, defaults, servers, held)
        finally:
            for sock in held:
                sock.close()
        return servers

    def _server(self, i, config, defaults, servers, held):
        directives = dict(config)
        host = directives.pop("host", "127.0.0.1")
        extra = directives.pop("listen_extra", "")
        if ":" in host and not have_ipv6():
            return
        for k, v in defaults.items():
            directives.setdefault(k, v)
        if "proxy_pass" not in directives:
            directives.setdefault("auth_http", self.auth.url)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        held.append(sock)
        sock.bind((host, 0))
        port = sock.getsockname()[1]
        block = server_block(directives.pop("protocol"), port, host=host, **directives)
        if extra:
            block["listen"] += " " + extra
        servers[f"s{i}"] = block
        self.addresses[config_key(config)] = (host, port)

    def setup(self, backend=None, **config):
        import pytest
        key = config_key(config)
        if key not in self.addresses:
            if ":" in config.get("host", "") and not have_ipv6():
                pytest.skip("no IPv6 loopback")
            raise AssertionError(f"add {config} to the module's shared configurations")
        host, port = self.addresses[key]
        self.auth.reset()
        if backend is not None:
            self.auth.route_to(backend.port, server=backend.host)
        server = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return Setup(SessionLog(self.proxy, server), host, port, self.auth, backend)

    def stop(self):
        self.proxy.stop()
        self.auth.stop()
