"""Process-wide pieces shared by every session: the current config, logs, the relay."""

from __future__ import annotations

import base64
import itertools
import os
import threading
from typing import TYPE_CHECKING, Any, Dict, Optional

from . import limits
from .auth_client import AuthClient
from .live import LiveSessions
from .upstreams import Upstreams

if TYPE_CHECKING:      # annotations only
    from .config import Config, ServerConf
    from .log import ErrorLog
    from .relay import Relay


class Runtime:
    """What a session may use beyond its own socket.

    Created once per (worker) process by supervisor.py; reload swaps `config` and `logs`.
    """

    def __init__(self, config: Config, log: ErrorLog, relay: Relay,
                 server_logs: Optional[Dict[int, ErrorLog]] = None) -> None:
        self.config = config
        self.log = log                      # main ErrorLog
        self.relay = relay                  # relay.Relay
        self.server_logs = server_logs or {}  # id(ServerConf) -> ErrorLog for servers with error_log
        self.shutting_down = threading.Event()
        # id(ServerConf) -> access_log.AccessLog: supervisor keeps the files with the error logs
        self.access_logs: Dict[int, Any] = getattr(self.server_logs.get("access"), "by_server", {})
        self.admission = limits.Admission.from_config(config.main)   # this worker's limits
        self.live = LiveSessions()          # sessions now, for `sessions` and `kick`
        self.auth = AuthClient()            # auth_http connections, failover state, cache
        self.upstreams = Upstreams(config, log, self.shutting_down)   # pools' health, checks
        self._ids = itertools.count(1)
        self._ids_lock = threading.Lock()
        # drawn in each worker (Runtime is made after fork): ids never repeat across workers,
        # restarts or instances, without a system call per session
        self._sid_prefix = base64.urlsafe_b64encode(os.urandom(6)).decode("ascii")
        self._sids = itertools.count(1)

    def next_conn_id(self) -> int:
        """nginx's *N connection counter (also advanced for auth and backend connections)."""
        with self._ids_lock:
            return next(self._ids)

    def new_session_id(self) -> str:
        """A 16-character id naming one client session in every log, the auth request and
        the backend (letters, digits, '-' and '_' only: safe in any header or log field)."""
        with self._ids_lock:
            n = next(self._sids)
        return "%s%08x" % (self._sid_prefix, n & 0xFFFFFFFF)

    def log_for(self, server_conf: ServerConf) -> ErrorLog:
        """The ErrorLog a session of this server writes to."""
        return self.server_logs.get(id(server_conf), self.log)
