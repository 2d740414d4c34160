"""Process-wide pieces shared by every session: the current config, logs, the relay."""

import itertools
import threading

from . import limits


class Runtime:
    """What a session may use beyond its own socket.

    Created once per (worker) process by supervisor.py; reload swaps `config` and `logs`.
    """

    def __init__(self, config, log, relay, server_logs=None):
        self.config = config
        self.log = log                      # main ErrorLog
        self.relay = relay                  # relay.Relay
        self.server_logs = server_logs or {}  # id(ServerConf) -> ErrorLog for servers with error_log
        self.shutting_down = threading.Event()
        self.admission = limits.Admission.from_config(config.main)   # this worker's limits
        self._ids = itertools.count(1)
        self._ids_lock = threading.Lock()

    def next_conn_id(self):
        """nginx's *N connection counter (also advanced for auth and backend connections)."""
        with self._ids_lock:
            return next(self._ids)

    def log_for(self, server_conf):
        """The ErrorLog a session of this server writes to."""
        return self.server_logs.get(id(server_conf), self.log)
