"""What a Session writes about itself: its error_log lines (nginx's context tail, then the
session id), its `debug` trace (trace.py masks the credentials) and its access_log line.

`SessionLog` is a base class of session.Session and reads the session's attributes; it does
no I/O of its own beyond the log writes.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Tuple

from . import access_log, trace
from .log import addr_text, sanitize


class SessionLog:
    """Logging of session.Session (see there for the attributes read here)."""

    @property
    def relay_name(self) -> str:
        """The session's name in the relay (nginx's `*N` connection number): given at the
        hand-over, and how live.py finds it there to list and kick it."""
        return "*%d" % self.conn

    # ---- error_log lines --------------------------------------------------------------------

    @staticmethod
    def _server_text(listen: Any) -> str:
        if listen is None:
            return "-"
        return addr_text(listen.host or "0.0.0.0", listen.port)

    def context(self) -> str:
        """nginx's tail (ngx_mail_log_error): client, server, login, upstream."""
        parts = [", client: ", str(self.client_ip)]
        if self.starttls_used:
            parts.append(" using starttls")
        parts += [", server: ", self.server_text]
        if self.conv.login is not None:
            parts += [', login: "', sanitize(self.conv.login, 128), '"']
        if self.upstream:
            parts += [", upstream: ", self.upstream]
        return "".join(parts)

    def logmsg(self, level: str, message: str, err: Optional[int] = None, action: bool = True,
               tail: str = "") -> None:
        """A line of this session: the session id comes last, after nginx's fields, so that
        parsers of nginx's lines read every field as before."""
        if not self.log.enabled(level):
            return
        if err is not None:
            message += " (%d: %s)" % (err, os.strerror(err))
        if action and self.action:
            message += " while " + self.action
        self.log.log(level, message + self.context() + tail + ", session: " + self.session_id,
                     self.conn)

    def info(self, message: str, **kw: Any) -> None:
        self.logmsg("info", message, **kw)

    def error(self, message: str, **kw: Any) -> None:
        self.logmsg("error", message, **kw)

    def _peer_text(self) -> str:
        return addr_text(str(self.client_ip), self.client_port)

    # ---- debug trace (only called when self.debug: nothing is formatted otherwise) ----------

    def trace(self, message: str) -> None:
        self.logmsg("debug", message, action=False)

    def trace_client(self, data: bytes, kind: str) -> None:
        """A client input before login: a line, or an IMAP literal's bytes (kind 'bytes')."""
        sasl = getattr(self.conv, "expect", None) is not None
        continued = kind == "bytes" or bool(getattr(self.conv, "parts", None))
        self.trace('client sent "%s"' % trace.client_line(self.protocol, data, sasl, continued))

    def trace_reply(self, data: bytes) -> None:
        for line in trace.reply_lines(data):
            self.trace('sent to client "%s"' % line)

    def trace_auth(self, kind: str, lines: list) -> None:
        """auth_http.query's `trace`: the request (without Auth-Pass) and the response."""
        for line in lines:
            self.trace("auth http %s %s" % (kind, line))

    def trace_backend(self, data: bytes, action: Optional[str] = None) -> None:
        """A backend login line sent (`action` given: the step's) or a reply received."""
        if action is None:
            for line in trace.reply_lines(data):
                self.trace('upstream sent "%s"' % line)
        else:
            self.trace('sent to upstream "%s"' % trace.backend_line(data, action))

    # ---- access_log ---------------------------------------------------------------------------

    def tls_fields(self) -> Optional[Tuple[str, str]]:
        """(version, cipher) of the client's TLS, None without (read before the socket goes)."""
        if not self.tls_handshaked:
            return None
        try:
            cipher = self.sock.cipher()
            return (self.sock.version() or "-", cipher[0] if cipher else "-")
        except (OSError, AttributeError, ValueError):
            return None

    def access(self, result: str, bytes_in: int = 0, bytes_out: int = 0,
               tls: Optional[Tuple[str, str]] = None) -> None:
        """The session's access_log line (when its server has one)."""
        if self.access_log is None:
            return
        try:
            self.access_log.write(access_log.record(
                session=self.session_id, protocol=self.protocol, client_ip=self.client_ip,
                client_port=self.client_port, user=self.conv.login, backend=self.upstream,
                tls=tls, bytes_in=bytes_in, bytes_out=bytes_out,
                duration=time.monotonic() - self.started, result=result))
        except Exception as e:      # a log line never takes a session down
            self.logmsg("alert", "access_log failed: %s: %s" % (type(e).__name__, e))

    def access_prelogin(self, tls: Optional[Tuple[str, str]]) -> None:
        """The line of a session that ended before the relay."""
        if self.access_log is not None:
            self.access(access_log.prelogin_result(
                self.outcome, self.failed_logins, self.conv.errors, self.conf.max_errors),
                tls=tls)

    def access_relayed(self, stats: Any, tls: Optional[Tuple[str, str]]) -> None:
        """The line of a relayed session (relay.Stats: bytes each way, why it ended)."""
        # kicked between the relay's add and LiveSessions.relayed: its socket was shut down
        result = "kicked" if self.outcome == "kicked" else access_log.relay_result(stats.reason)
        self.access(result, stats.bytes_in, stats.bytes_out, tls)
