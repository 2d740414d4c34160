"""A worker's live sessions, for `mailproxy sessions` and `kick` (README "Live sessions").

`LiveSessions` (one per worker, `Runtime.live`) holds every Session from its start to its end,
before login and relayed.  `serve(sock, runtime)` answers the master over the worker's
channel (master_loop.py) in a small thread: one JSON object a line each way, `{"id", "op":
"sessions"|"kick", "user", "backend"}` in, `{"id", "pid", "sessions"|"kicked"}` out.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Dict, List, Optional

from .log import addr_text, sanitize

# runtime.py imports this module and a Session is any object with its attributes: the
# annotations below name them without importing them (no import cycle)
Runtime = Session = Any

KICK_REASON = "kicked by control command"
RELAY_WAIT = 1.0            # seconds a listing waits for the relay thread's byte counts
MAX_REQUEST = 1 << 16       # a request line from the master is small


class _Entry:
    __slots__ = ("session", "started", "relayed")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.started = time.monotonic()
        self.relayed = False


def user_text(login: Optional[bytes]) -> Optional[str]:
    """A login as text for JSON (bytes that are not UTF-8 kept as surrogates: a kick by the
    same name from the command line matches it)."""
    if login is None:
        return None
    return login.decode("utf-8", "surrogateescape")


def matches(row: Dict[str, Any], user: Optional[str], backend: Optional[str]) -> bool:
    """Whether a listed session is one the request names: its user (exactly), its backend
    (host:port as listed, or only the host)."""
    if user is not None and row.get("user") != user:
        return False
    if backend is not None:
        up = row.get("backend")
        if up is None:
            return False
        host = up.rsplit(":", 1)[0]
        if backend not in (up, host, host.strip("[]")):
            return False
    return True


class LiveSessions:
    """Every session of this worker from Session.run's start to its end (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: Dict[int, _Entry] = {}

    def add(self, session: Session) -> None:
        with self._lock:
            self._entries[id(session)] = _Entry(session)

    def relayed(self, session: Session) -> None:
        """Handed to the relay (after Relay.add: a kick from then on goes through the relay)."""
        with self._lock:
            entry = self._entries.get(id(session))
            if entry is not None:
                entry.relayed = True

    def remove(self, session: Session) -> None:
        with self._lock:
            self._entries.pop(id(session), None)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> List[_Entry]:
        with self._lock:
            return list(self._entries.values())

    # -- answers ------------------------------------------------------------------------------
    def rows(self, relay: Any, user: Optional[str] = None,
             backend: Optional[str] = None) -> List[Dict[str, Any]]:
        entries = self.entries()
        counts = _relay_counts(relay) if any(e.relayed for e in entries) else {}
        now, pid = time.monotonic(), os.getpid()
        out = []
        for e in entries:
            row = describe(e, now, pid, counts)
            if matches(row, user, backend):
                out.append(row)
        return out

    def kick(self, relay: Any, user: Optional[str], backend: Optional[str]) -> int:
        """End the sessions named (a user, a backend, or both; never all for want of a
        filter): relayed ones through the relay's queue, those before login by shutting their
        client socket down (their handler thread then ends them as a closed client)."""
        if user is None and backend is None:
            return 0
        now, pid = time.monotonic(), os.getpid()
        names, n = set(), 0
        for e in self.entries():
            if not matches(describe(e, now, pid, {}), user, backend):
                continue
            sess = e.session
            n += 1
            sess.logmsg("notice", "session %s kicked by control command" % sess.session_id,
                        action=False)
            if e.relayed:
                names.add(sess.relay_name)
            else:
                _end(sess, "kicked")
        if names:
            def close(live, close_one):
                for s in live:
                    if s.name in names:
                        close_one(s, KICK_REASON)
            relay.visit(close)
        return n


    def end_prelogin(self, outcome: str) -> int:
        """End every session before login (worker_shutdown_timeout): `outcome` is the result
        of its access_log line; returns how many."""
        ended = [e.session for e in self.entries() if not e.relayed]
        for sess in ended:
            _end(sess, outcome)
        return len(ended)


def _end(sess: Session, outcome: str) -> None:
    """A session before login ends: its client socket is shut down, and its handler thread
    then ends it as a closed client, its access_log line saying `outcome`."""
    sess.outcome = outcome          # access_log.RESULTS
    try:        # the plain socket's own call: an SSLSocket's would drop its state
        socket.socket.shutdown(sess.sock, socket.SHUT_RDWR)
    except (OSError, TypeError):
        pass


def describe(entry: _Entry, now: float, pid: int, counts: Dict[str, tuple]) -> Dict[str, Any]:
    """One session's listing (attributes read from the handler thread's Session: each read
    is one attribute, a consistent enough view for a listing)."""
    s = entry.session
    tls = None
    if s.tls_handshaked:
        try:
            tls = s.sock.version()
        except (AttributeError, ValueError, OSError):
            tls = None
    b_in, b_out = counts.get(s.relay_name, (0, 0)) if entry.relayed else (0, 0)
    return {"id": s.session_id, "protocol": s.protocol, "user": user_text(s.conv.login),
            "client": addr_text(str(s.client_ip), s.client_port), "backend": s.upstream,
            "tls": tls, "bytes_in": b_in, "bytes_out": b_out,
            "age": round(now - entry.started, 3), "state": "relayed" if entry.relayed
            else "login", "pid": pid}


def _relay_counts(relay: Any) -> Dict[str, tuple]:
    """{relay name: (bytes client -> backend, bytes backend -> client)}, read in the relay
    thread (its counters change there); empty if it does not answer within RELAY_WAIT."""
    got: Dict[str, tuple] = {}
    done = threading.Event()

    def read(live, close_one):
        for s in live:
            got[s.name] = (s.bytes_in, s.bytes_out)
        done.set()
    try:
        relay.visit(read)
    except Exception:
        return {}
    done.wait(RELAY_WAIT)
    return dict(got) if done.is_set() else {}


def answer(runtime: Runtime, request: Dict[str, Any]) -> Dict[str, Any]:
    """The worker's answer to one request from the master."""
    user, backend = request.get("user"), request.get("backend")
    out: Dict[str, Any] = {"id": request.get("id"), "pid": os.getpid()}
    if request.get("op") == "sessions":
        out["sessions"] = runtime.live.rows(runtime.relay, user, backend)
    elif request.get("op") == "kick":
        out["kicked"] = runtime.live.kick(runtime.relay, user, backend)
        if user is not None:        # a kicked user's cached auth_http answers go too
            runtime.auth.forget(user.encode("utf-8", "surrogateescape"))
    else:
        out["error"] = "unknown request %s" % sanitize(str(request.get("op")), 64)
    return out


def serve(sock: socket.socket, runtime: Runtime) -> threading.Thread:
    """Answer the master's requests on this worker's channel until the master closes it."""
    t = threading.Thread(target=_serve, args=(sock, runtime), name="mailproxy-control",
                         daemon=True)
    t.start()
    return t


def _serve(sock, runtime):
    buf = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    request = json.loads(line)
                except ValueError:
                    request = None
                if not isinstance(request, dict):
                    request = {}
                try:
                    reply = answer(runtime, request)
                except Exception as e:   # a bad request must not end the channel
                    runtime.log.log("alert", "control request failed: %s" % sanitize(str(e)))
                    reply = {"id": request.get("id"), "pid": os.getpid(),
                             "error": "internal error"}
                sock.sendall(json.dumps(reply).encode("ascii") + b"\n")
            if len(buf) > MAX_REQUEST:
                buf = b""
    except OSError:
        return
    finally:
        sock.close()
