"""End-to-end test harness: the proxy as a subprocess, a fake auth_http server, scripted backends.

Everything here speaks real sockets on loopback and records what it saw, so tests can assert
byte-exact what the client, the backend and the auth server each got.

Main pieces (see each docstring):
  free_port(host)                  an unused TCP port
  ini(servers=, mail=, main=)      INI text in mailproxy's format
  ProxyProcess(tmp_path, config)   the proxy as a subprocess (pid file = readiness)
  AuthServer / UnixAuthServer      recording auth_http server, per-test `respond(request)`
  ScriptedBackend(handler)         recording threaded TCP server; handler(conn) speaks a script
  Pop3Backend(users=...)           a ready POP3 backend with a fake mailbox and a streamed big message
  LineClient(host, port)           a raw line-oriented client (sees exact bytes and closes)
"""

import base64
import hashlib
import http.server
import os
import re
import shlex
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CRLF = b"\r\n"
# MAIL and RCPT as smtplib writes them: "mail FROM:<a>" up to Python 3.12, "mail from:<a>" on 3.13
SMTPLIB_MAIL, SMTPLIB_RCPT = (("mail from:", "rcpt to:") if sys.version_info >= (3, 13)
                              else ("mail FROM:", "rcpt TO:"))


# ---------------------------------------------------------------------------------------------
# small helpers

class RecordingLog:
    """An ErrorLog stand-in for in-process tests: every line kept as (level, message)."""

    def __init__(self):
        self.lines = []

    def enabled(self, level):
        return True

    def log(self, level, message, conn=None):
        self.lines.append((level, message))


def free_port(host="127.0.0.1"):
    """An ephemeral TCP port free on `host` right now (bound then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def b64(data):
    """base64 of str/bytes as str (the SASL wire form)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def unb64(text):
    if isinstance(text, bytes):
        text = text.decode("ascii")
    return base64.b64decode(text)


def wait_for(predicate, timeout=3.0, interval=0.01, what="condition"):
    """Poll `predicate` until truthy (returns its value) or raise AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _to_bytes(data):
    if isinstance(data, str):
        return data.encode("utf-8")
    return bytes(data)


def _line(data):
    """str/bytes -> bytes ending in CRLF (a str or bytes without a line end gets CRLF)."""
    data = _to_bytes(data)
    if not data.endswith(b"\n"):
        data += CRLF
    return data


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
# auth_http server

class AuthRequest:
    """One request the auth server received."""

    def __init__(self, raw, peer):
        self.raw = raw                       # bytes up to and including the empty line
        self.peer = peer
        self.time = time.monotonic()
        text = raw.decode("latin-1")
        lines = text.split("\r\n") if "\r\n" in text else text.split("\n")
        if lines and lines[-1] == "":
            lines = lines[:-1]
        if lines and lines[-1] == "":
            lines = lines[:-1]
        self.lines = lines                   # str lines without line ends (latin-1 decoded)
        self.request_line = lines[0] if lines else ""
        self.headers = []                    # [(name, value)] in order, value after ': '
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers.append((name, value[1:] if value.startswith(" ") else value))

    def header(self, name, default=None):
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return default

    def header_names(self):
        return [n for n, _ in self.headers]

    def __repr__(self):
        return f"AuthRequest({self.raw!r})"


class Delay:
    """A respond() result: sleep `seconds`, then act on `then` (another respond() result)."""

    def __init__(self, seconds, then=None):
        self.seconds = seconds
        self.then = then


CLOSE = "close"      # respond() result: close without a reply
RESET = "reset"      # respond() result: close with RST (SO_LINGER 0)
HANG = "hang"        # respond() result: never answer (until the server stops or the peer closes)


def auth_ok(port, server="127.0.0.1", user=None, password=None, status="OK", extra=()):
    """Header lines of a successful auth_http answer pointing at server:port."""
    lines = [f"Auth-Status: {status}", f"Auth-Server: {server}", f"Auth-Port: {port}"]
    if user is not None:
        lines.append(f"Auth-User: {user}")
    if password is not None:
        lines.append(f"Auth-Pass: {password}")
    return lines + list(extra)


def auth_fail(text, wait=None, extra=()):
    lines = [f"Auth-Status: {text}"]
    if wait is not None:
        lines.append(f"Auth-Wait: {wait}")
    return lines + list(extra)


class _AuthHandler(socketserver.StreamRequestHandler):
    timeout = 10

    def handle(self):
        srv = self.server.owner
        raw = bytearray()
        try:
            while len(raw) < 65536:
                line = self.rfile.readline(65536)
                if not line:
                    break
                raw += line
                if line in (b"\r\n", b"\n"):
                    break
        except OSError:
            pass
        peer = self.client_address
        req = AuthRequest(bytes(raw), peer)
        with srv.lock:
            srv.requests.append(req)
            srv.cond.notify_all()
        try:
            result = srv.respond(req)
        except Exception as exc:  # a broken test handler: record, answer nothing
            srv.errors.append(exc)
            return
        self._act(result)

    def _act(self, result):
        srv = self.server.owner
        while isinstance(result, Delay):
            if srv.stopping.wait(result.seconds):
                return
            result = result.then
        if result is None or result == CLOSE:
            return
        if result == RESET:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if result == HANG:
            self.connection.settimeout(0.2)
            while not srv.stopping.is_set():
                try:
                    if not self.connection.recv(4096):
                        return
                except socket.timeout:
                    continue
                except OSError:
                    return
            return
        if isinstance(result, (bytes, bytearray)):
            data = bytes(result)
        else:
            data = ("HTTP/1.0 200 OK\r\n" + "".join(f"{h}\r\n" for h in result) + "\r\n").encode("latin-1")
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            pass


class _TCPAuthServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):            # skip HTTPServer's getfqdn() (a DNS lookup)
        socketserver.TCPServer.server_bind(self)


class _TCP6AuthServer(_TCPAuthServer):
    address_family = socket.AF_INET6


class _UnixAuthServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


class AuthServer:
    """A recording auth_http server (HTTP/1.0 GET in, scripted answer out).

    respond(request) -> one of:
      list of header lines  -> sent after `HTTP/1.0 200 OK`, then an empty line, then close;
      bytes                 -> sent raw (broken responses, custom status lines), then close;
      Delay(s, then)        -> sleep first (timeouts), then act on `then`;
      CLOSE / None, RESET, HANG.
    Default: `auth_ok(backend_port)` once `route_to(port)` was called, else Auth-Status failure.
    `requests` holds every AuthRequest in arrival order.
    """

    def __init__(self, respond=None, host="127.0.0.1", unix_path=None):
        self.requests = []
        self.errors = []
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self._respond = respond
        self._route = None
        self.unix_path = unix_path
        if unix_path:
            self.server = _UnixAuthServer(str(unix_path), _AuthHandler)
            self.host, self.port = None, None
        else:
            cls = _TCP6AuthServer if ":" in host else _TCPAuthServer
            self.server = cls((host, 0), _AuthHandler)
            self.host, self.port = host, self.server.server_address[1]
        self.server.owner = self
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def url(self):
        """The auth_http value for the config."""
        if self.unix_path:
            return f"unix:{self.unix_path}:/auth"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/auth"

    def route_to(self, port, server="127.0.0.1", **kw):
        """Default answer: OK to server:port."""
        self._route = (port, server, kw)

    def set_respond(self, respond):
        self._respond = respond

    def respond(self, req):
        if self._respond is not None:
            return self._respond(req)
        if self._route is not None:
            port, server, kw = self._route
            return auth_ok(port, server, **kw)
        return auth_fail("no route configured")

    def wait_requests(self, n, timeout=3.0):
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.requests) >= n, timeout):
                raise AssertionError(f"auth server got {len(self.requests)} requests, expected {n}")
            return list(self.requests)

    def stop(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# scripted backends

class BackendConn:
    """One accepted backend connection: recording I/O for a handler script.

    Recording (thread-safe reads are fine in tests):
      raw         bytes received (after the PROXY header, which is in `proxy_header`)
      lines       complete received lines without their line end (bytes)
      raw_lines   complete received lines with their line end
      proxy_header  the PROXY v1 line (with CRLF) or v2 header bytes, or None
      sent        bytes sent to the proxy
      closed      Event set when the connection ended
      peer, local  socket addresses
    """

    def __init__(self, sock, backend):
        self.sock = sock
        self.backend = backend
        self.peer = sock.getpeername()
        self.local = sock.getsockname()
        self.raw = bytearray()
        self.lines = []
        self.raw_lines = []
        self.sent = bytearray()
        self.proxy_header = None
        self.closed = threading.Event()
        self.eof = False
        self.data = {}                       # free for handler scripts
        self._buf = bytearray()
        self._cond = threading.Condition()
        self.sock.settimeout(backend.io_timeout)

    # receiving -----------------------------------------------------------------------------
    def _fill(self, timeout=None):
        """Read more bytes into the buffer; False at EOF/timeout."""
        if self.eof:
            return False
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except OSError:
            data = b""
        finally:
            if timeout is not None:
                self.sock.settimeout(self.backend.io_timeout)
        if not data:
            self.eof = True
            return False
        with self._cond:
            self._buf += data
            self.raw += data
            self._cond.notify_all()
        return True

    def readline(self, timeout=None):
        """Next received line (bytes, line end kept) or None at EOF/timeout; recorded in `lines`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i + 1])
                del self._buf[:i + 1]
                with self._cond:
                    self.raw_lines.append(line)
                    self.lines.append(line.rstrip(b"\n").rstrip(b"\r") if line.endswith(b"\n") else line)
                    self._cond.notify_all()
                return line
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            if not self._fill(remaining):
                if self.eof and self._buf:
                    rest = bytes(self._buf)
                    self._buf.clear()
                    with self._cond:
                        self.raw_lines.append(rest)
                        self.lines.append(rest)
                    return rest
                if self.eof or remaining is not None:
                    return None

    def read_exact(self, n, timeout=None):
        while len(self._buf) < n:
            if not self._fill(timeout):
                return None
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def read_proxy_header(self, timeout=5.0):
        """Read a PROXY v1 line or v2 header; stored in `proxy_header` (the buffer keeps the rest)."""
        while len(self._buf) < 16:
            if not self._fill(timeout):
                break
        sig2 = b"\r\n\r\n\x00\r\nQUIT\n"
        if self._buf.startswith(sig2) and len(self._buf) >= 16:
            length = struct.unpack("!H", bytes(self._buf[14:16]))[0]
            hdr = self.read_exact(16 + length, timeout)
        elif self._buf.startswith(b"PROXY"):
            while b"\r\n" not in self._buf[:108]:
                if not self._fill(timeout):
                    break
            i = self._buf.find(b"\r\n")
            hdr = bytes(self._buf[:i + 2]) if i >= 0 else bytes(self._buf)
            del self._buf[:len(hdr)]
        else:
            hdr = None
        self.proxy_header = hdr
        # raw records what follows the header
        if hdr:
            with self._cond:
                del self.raw[:len(hdr)]
        return hdr

    def wait_lines(self, n, timeout=3.0):
        """Wait until the handler has read `n` lines; returns `lines`."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.lines) >= n, timeout):
                raise AssertionError(f"backend got lines {self.lines!r}, expected at least {n}")
            return list(self.lines)

    # sending -------------------------------------------------------------------------------
    def send(self, data):
        """Send str/bytes as is (no line end added)."""
        data = _to_bytes(data)
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        self.sent += data
        return True

    def sendline(self, data):
        """Send a line; CRLF added unless it already ends in LF."""
        return self.send(_line(data))

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def reset(self):
        """Close with RST."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    def stall(self):
        """Say nothing more; return when the peer closes or the backend stops."""
        while not self.backend.stopping.is_set():
            if self._fill(0.1):
                continue
            if self.eof:
                return

    def drain(self):
        """Record (and line-split) everything until EOF."""
        while self.readline(0.1) is not None or not (self.eof or self.backend.stopping.is_set()):
            pass

    def __repr__(self):
        return f"<BackendConn peer={self.peer} lines={self.lines!r}>"


class ScriptedBackend:
    """A threaded TCP server on 127.0.0.1 (or ::1) that runs `handler(conn)` per connection.

    handler(conn: BackendConn) speaks the script (conn.sendline / conn.readline / ...). With
    `proxy_protocol=True` each connection first reads a PROXY v1/v2 header into
    conn.proxy_header before the handler runs (as a backend configured for it would).
    `sessions` lists every BackendConn in accept order.
    """

    io_timeout = 10.0

    def __init__(self, handler=None, host="127.0.0.1", port=0, proxy_protocol=False):
        self.handler = handler
        self.host = host
        self.proxy_protocol = proxy_protocol
        self.sessions = []
        self.errors = []
        self.stopping = threading.Event()
        self._cond = threading.Condition()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.1)
        self._threads = []
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    @property
    def address(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _accept_loop(self):
        while not self.stopping.is_set():
            try:
                sock, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = BackendConn(sock, self)
            with self._cond:
                self.sessions.append(conn)
                self._cond.notify_all()
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, conn):
        try:
            if self.proxy_protocol:
                conn.read_proxy_header()
            self.handle(conn)
        except Exception as exc:  # recorded; a test may assert backend.errors == []
            self.errors.append(exc)
        finally:
            try:
                conn.sock.close()
            except OSError:
                pass
            conn.closed.set()

    def handle(self, conn):
        if self.handler is not None:
            self.handler(conn)
        else:
            conn.drain()

    def wait_session(self, i=0, timeout=3.0):
        """The i-th accepted connection, waiting for it."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.sessions) > i, timeout):
                raise AssertionError(f"backend accepted {len(self.sessions)} connections, expected {i + 1}")
            return self.sessions[i]

    def stop(self):
        self.stopping.set()
        try:
            self.sock.close()
        except OSError:
            pass
        for c in list(self.sessions):
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(2)


class Read:
    """Script step: read one line (recorded)."""

    def __init__(self, timeout=None):
        self.timeout = timeout


class Sleep:
    """Script step: sleep."""

    def __init__(self, seconds):
        self.seconds = seconds


def script(*steps):
    """A handler from simple steps: str/bytes -> sendline, Read(), Sleep(s), CLOSE, RESET, HANG,
    or a callable(conn). After the last step the connection is drained until EOF."""
    def handler(conn):
        for step in steps:
            if isinstance(step, Read):
                if conn.readline(step.timeout) is None:
                    return
            elif isinstance(step, Sleep):
                time.sleep(step.seconds)
            elif step == CLOSE:
                conn.close()
                return
            elif step == RESET:
                conn.reset()
                return
            elif step == HANG:
                conn.stall()
                return
            elif callable(step):
                step(conn)
            else:
                conn.sendline(step)
        conn.drain()
    return handler


# --- the big message: deterministic, generated in chunks, never starts a line with "."

_BIG_LINE = 64


def big_message_chunks(size, chunk_lines=1024):
    """Yield the bytes of a deterministic `size`-byte message (CRLF lines of 64 bytes, last shorter)."""
    filler = (b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-_" * 2)
    remaining = size
    n = 0
    while remaining > 0:
        parts = []
        for _ in range(chunk_lines):
            head = b"L%010d " % n
            line = head + filler[:_BIG_LINE - len(head) - 2] + CRLF
            parts.append(line)
            n += 1
        chunk = b"".join(parts)
        if len(chunk) > remaining:
            chunk = chunk[:remaining]
            if remaining >= 2:
                chunk = chunk[:-2] + CRLF
        remaining -= len(chunk)
        yield chunk


def big_message_digest(size):
    h = hashlib.sha256()
    for chunk in big_message_chunks(size):
        h.update(chunk)
    return h.hexdigest()


class Pop3Backend(ScriptedBackend):
    """A POP3 server with a fake mailbox, recording everything.

    users:        {login: password} accepted by PASS (login/password compared as str, raw bytes
                  decoded as UTF-8 with surrogateescape)
    messages:     list of message bytes (CRLF lines); RETR dot-stuffs them
    big_size:     if set, one extra last message of that many bytes, generated and streamed
    greeting:     first line (None: send nothing; a list: several lines)
    user_reply / pass_reply: replies to USER / to a correct PASS (pass_reply may be a list of lines)
    refuse:       reply line to a wrong PASS (default `-ERR [AUTH] Authentication failed.`)
    refuse_user:  if set, USER is answered with this line (e.g. `-ERR no such user`)
    close_after:  'accept' (close before greeting), 'greeting', 'user', 'pass'
    stall_at:     'greeting' (never greet), 'user', 'pass' (never answer that command)
    reset_at:     like close_after but with RST
    extra_after_pass: lines sent right after the PASS reply (unsolicited)
    """

    def __init__(self, users=None, messages=None, big_size=None, greeting=b"+OK ready",
                 user_reply=b"+OK", pass_reply=b"+OK logged in",
                 refuse=b"-ERR [AUTH] Authentication failed.", refuse_user=None,
                 close_after=None, stall_at=None, reset_at=None, extra_after_pass=(),
                 host="127.0.0.1", proxy_protocol=False):
        self.users = dict(users if users is not None else {"alice": "secret"})
        self.messages = list(messages if messages is not None else [
            b"From: a@example.com\r\nSubject: one\r\n\r\nhello\r\n",
            b"From: b@example.com\r\nSubject: two\r\n\r\n.leading dot\r\nworld\r\n",
        ])
        self.big_size = big_size
        self.greeting = greeting
        self.user_reply = user_reply
        self.pass_reply = pass_reply
        self.refuse = refuse
        self.refuse_user = refuse_user
        self.close_after = close_after
        self.stall_at = stall_at
        self.reset_at = reset_at
        self.extra_after_pass = list(extra_after_pass)
        super().__init__(None, host=host, proxy_protocol=proxy_protocol)

    def _sizes(self):
        sizes = [len(m) for m in self.messages]
        if self.big_size:
            sizes.append(self.big_size)
        return sizes

    def _stop_point(self, conn, point):
        """Apply close_after / stall_at / reset_at at `point`; True if the session must end."""
        if self.stall_at == point:
            conn.stall()
            return True
        if self.reset_at == point:
            conn.reset()
            return True
        return False

    def _after(self, conn, point):
        if self.close_after == point:
            conn.close()
            return True
        return False

    def handle(self, conn):
        if self._after(conn, "accept") or self._stop_point(conn, "greeting"):
            return
        if self.greeting is not None:
            for g in (self.greeting if isinstance(self.greeting, list) else [self.greeting]):
                conn.sendline(g)
        if self._after(conn, "greeting"):
            return
        user = None
        authed = False
        while True:
            line = conn.readline()
            if line is None:
                return
            text = line.rstrip(b"\r\n")
            verb, _, arg = text.partition(b" ")
            verb = verb.upper()
            if verb == b"USER" and not authed:
                if self._stop_point(conn, "user"):
                    return
                if self.refuse_user is not None:
                    conn.sendline(self.refuse_user)
                else:
                    user = arg.decode("utf-8", "surrogateescape")
                    conn.sendline(self.user_reply)
                if self._after(conn, "user"):
                    return
            elif verb == b"PASS" and not authed:
                if self._stop_point(conn, "pass"):
                    return
                password = arg.decode("utf-8", "surrogateescape")
                if user is not None and self.users.get(user) == password:
                    authed = True
                    conn.data["user"] = user
                    for r in (self.pass_reply if isinstance(self.pass_reply, list) else [self.pass_reply]):
                        conn.sendline(r)
                    for extra in self.extra_after_pass:
                        conn.sendline(extra)
                else:
                    conn.sendline(self.refuse)
                if self._after(conn, "pass"):
                    return
            elif verb == b"QUIT":
                conn.sendline(b"+OK bye")
                conn.close()
                return
            elif verb == b"NOOP":
                conn.sendline(b"+OK")
            elif not authed:
                conn.sendline(b"-ERR not authenticated")
            elif verb == b"STAT":
                sizes = self._sizes()
                conn.sendline(b"+OK %d %d" % (len(sizes), sum(sizes)))
            elif verb == b"LIST":
                sizes = self._sizes()
                if arg:
                    n = int(arg)
                    conn.sendline(b"+OK %d %d" % (n, sizes[n - 1]))
                else:
                    conn.send(b"+OK %d messages\r\n" % len(sizes)
                              + b"".join(b"%d %d\r\n" % (i + 1, s) for i, s in enumerate(sizes))
                              + b".\r\n")
            elif verb == b"RETR":
                n = int(arg)
                sizes = self._sizes()
                if not 1 <= n <= len(sizes):
                    conn.sendline(b"-ERR no such message")
                elif n <= len(self.messages):
                    body = self.messages[n - 1]
                    stuffed = b"\r\n".join((b"." + ln if ln.startswith(b".") else ln)
                                           for ln in body.split(b"\r\n"))
                    conn.send(b"+OK %d octets\r\n" % len(body) + stuffed + b".\r\n")
                else:
                    conn.send(b"+OK %d octets\r\n" % self.big_size)
                    for chunk in big_message_chunks(self.big_size):
                        if not conn.send(chunk):
                            return
                    conn.send(b".\r\n")
            else:
                conn.sendline(b"-ERR unknown command")


# ---------------------------------------------------------------------------------------------
# client side

class LineClient:
    """A raw TCP client that shows exact bytes: readline() keeps CRLF."""

    def __init__(self, host, port, timeout=5.0, family=None):
        if family is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.timeout = timeout
        self.buf = bytearray()
        self.received = bytearray()
        self.eof = False

    def _fill(self, timeout=None):
        if self.eof:
            return False
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            raise
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        self.received += data
        return True

    def send(self, data):
        self.sock.sendall(_to_bytes(data))

    def sendline(self, data):
        self.sock.sendall(_line(data))

    def readline(self, timeout=None):
        """Next line with its line end; b'' at EOF (partial tail returned as is)."""
        while b"\n" not in self.buf:
            if not self._fill(timeout):
                rest = bytes(self.buf)
                self.buf.clear()
                return rest
        i = self.buf.index(b"\n")
        line = bytes(self.buf[:i + 1])
        del self.buf[:i + 1]
        return line

    def cmd(self, line, timeout=None):
        """Send a line, return the reply line."""
        self.sendline(line)
        return self.readline(timeout)

    def read_multiline(self, timeout=None):
        """Lines up to and including '.\\r\\n' (POP3 multi-line)."""
        lines = []
        while True:
            line = self.readline(timeout)
            lines.append(line)
            if line in (b".\r\n", b""):
                return lines

    def read_until_closed(self, timeout=None):
        """Everything until EOF (raises socket.timeout if the peer never closes)."""
        while self._fill(timeout):
            pass
        rest = bytes(self.buf)
        self.buf.clear()
        return rest

    def closed(self, timeout=2.0):
        """True if the peer closes within `timeout` with no more data pending; data -> AssertionError."""
        try:
            rest = self.read_until_closed(timeout)
        except socket.timeout:
            return False
        if rest:
            raise AssertionError(f"unexpected data before close: {rest!r}")
        return True

    def silent(self, seconds):
        """True if nothing arrives (and no close) for `seconds`."""
        try:
            got = self._fill(seconds)
        except socket.timeout:
            return True
        return False if got or self.eof else True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# a whole set-up: proxy + auth server + backend

def server_block(protocol, port, host="127.0.0.1", **directives):
    """One `[server]` dict: listen on host:port with `protocol`, plus directives (nginx names;
    use underscores as in nginx, e.g. pop3_auth='plain apop')."""
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    block = {"listen": listen, "protocol": protocol}
    block.update(directives)
    return block


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
        return poplib.POP3(self.host, self.port, timeout=timeout)

    def imap(self, timeout=5.0):
        import imaplib
        return imaplib.IMAP4(self.host, self.port, timeout=timeout)

    def smtp(self, timeout=5.0):
        import smtplib
        return smtplib.SMTP(self.host, self.port, timeout=timeout)
