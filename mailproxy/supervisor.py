"""The process model (nginx's): a master process and forked workers.

Master: opens the error logs, binds every listen socket, writes the pid file (the readiness
signal), sends READY=1, forks the workers and then only handles signals: TERM/INT fast exit,
QUIT graceful exit, HUP reload, USR1 reopen logs, and restarts workers that die. Workers: a
Runtime, a Relay, one serve_forever thread per listen socket. The command line (cli.py) reads
the configuration and hands it to `Master(path, cfg).run()`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Optional

from . import NGINX_VERSION, __version__, login_table, metrics, metrics_http, probes
from .master_setup import (build_logs as _build_logs, chown_logs as _chown_logs,
                           resolve_user as _resolve_user, warn_affinity as _warn_affinity,
                           warn_native_tls as _warn_native_tls)

if TYPE_CHECKING:
    import socket

    from .config import Config

NAME = "mailproxy"

HANDLER_STACK = 1 << 20        # bytes of stack per thread in a worker (Worker.run)
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
           signal.SIGUSR1, signal.SIGCHLD)

FAST_EXIT_WAIT = 5.0        # seconds the master waits for workers after TERM before KILL
PRELOGIN_WAIT = 1.0         # seconds a worker at worker_shutdown_timeout waits for the
                            # sessions before login it ended to write their lines


def err(msg: str) -> None:
    """An nginx-shaped line on stderr, for what happens before (or without) an error log."""
    sys.stderr.write("%s: %s\n" % (NAME, msg))
    sys.stderr.flush()


def _signame(signo):
    try:
        return signal.Signals(signo).name
    except ValueError:
        return str(signo)


def load_config(path: str) -> Config:
    """The configuration at `path` with every TLS context built (tls_contexts.prepare): the
    one way a configuration is read, by the command line (`-t`, start, `-s`) and by a reload.
    Raises ConfigError (file:line) or OSError (the file cannot be read)."""
    from . import config, tls_contexts
    cfg = config.load(path)
    tls_contexts.prepare(cfg)
    return cfg



class Master:
    def __init__(self, path: str, cfg: Config):
        self.path = path
        self.cfg = cfg
        self.log = None
        self.server_logs = {}
        self.listeners = {}
        self.workers = {}           # pid -> start time (current generation)
        self.numbers = {}           # pid -> worker number (0..N-1) of the current generation
        self.old_workers = set()    # pids told to QUIT after a reload
        self.stopping = False
        self.pidfile = None
        self.pid_fd = None          # the pid file, held open while we run (pidfile.holder)
        self.user = None
        self.respawn = []           # monotonic times at which to start a worker
        self.recent_deaths = []
        self.hub = None             # master_loop.Hub: signals, control socket, channels

    # -- start-up ---------------------------------------------------------------------------
    def _fatal(self, msg):
        if self.log is not None:
            self.log.log("emerg", msg)
            if any(getattr(t, "path", None) == "stderr" for t in self.log.targets):
                return 1
        err("[emerg] %s" % msg)
        return 1

    def run(self) -> int:
        from . import listeners as lmod
        from . import notify as nmod
        self.lmod, self.notify = lmod, nmod.notify
        cfg = self.cfg
        if cfg.main.daemon:
            return self._fatal('"daemon on" is not supported: mailproxy always runs in the '
                               'foreground (use systemd or another supervisor)')
        try:
            self.log, self.server_logs = _build_logs(cfg)
        except OSError as e:
            return self._fatal(e.strerror)
        try:
            self._preload()
        except Exception as e:
            return self._fatal("cannot load the proxy's modules with this Python: %s" % e)
        try:
            self.user = _resolve_user(cfg, self.log)
        except ValueError as e:
            return self._fatal(str(e))
        _chown_logs([self.log] + list(self.server_logs.values()), self.user)
        # from here on signals wait for the loop (they are never lost, nor handled early)
        signal.signal(signal.SIGCHLD, _noop)
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        from .master_loop import Hub
        self.hub = Hub(HANDLED, lambda: self.log)
        try:
            self.listeners, _ = lmod.bind_all(cfg.servers)
            metrics_http.prepare(cfg.main)      # the area and socket before any fork
            metrics_http.commit()
            self.hub.listen(cfg.main.control_socket)
        except (lmod.ListenError, OSError) as e:
            self._close_listeners()
            return self._fatal(e.strerror if isinstance(e, OSError) else str(e))
        # before the pid file says "ready": the backends see the looks before any session
        probes.say_unreachable(cfg, self.log)
        try:
            self._write_pid(cfg.main.pid)
        except OSError as e:
            self._close_listeners()
            self.hub.close()
            return self._fatal('open() "%s" failed (%d: %s)' % (cfg.main.pid, e.errno or 0,
                                                               e.strerror))
        try:
            # the nginx mail version whose behaviour mailproxy follows (mailproxy/__init__.py)
            self.log.log("notice", "%s/%s (nginx/%s mail)" % (NAME, __version__, NGINX_VERSION))
            _warn_native_tls(cfg, self.log)
            _warn_affinity(cfg, self.log)
            self.notify("READY=1\nMAINPID=%d" % os.getpid())
            login_table.shared()        # before any fork: every worker's login counts
            self.log.log("notice", "start worker processes")
            for _ in range(self._nworkers()):
                self._spawn()
            return self._loop()
        finally:
            self._remove_pid()
            self.hub.close()

    def _nworkers(self):
        return self.cfg.main.worker_processes       # at least 1, "auto" resolved at load

    @staticmethod
    def _preload():
        """Import the session and every protocol module now: shared by forked workers, errors
        found early.

        All three protocols, whatever the configuration serves: a reload may add one, and `-t`
        (which calls this too) must fail on a Python that cannot import a module of the proxy."""
        from . import protocols, session  # noqa: F401  (every protocol module, via protocols)
        from . import limits, listeners, log, notify, pidfile, relay, runtime  # noqa: F401
        from . import master_loop  # noqa: F401
        from . import check, convert, nginx_syntax  # noqa: F401  (the commands: -t loads them)

    def _write_pid(self, path):
        """Exclusively created, renamed into place, kept open for `-s` (pidfile.py)."""
        if not path:
            return
        from . import pidfile as pidmod
        fd = pidmod.write(path, os.getpid())
        old_fd, self.pid_fd = self.pid_fd, fd
        if old_fd is not None:
            os.close(old_fd)
        self.pidfile = path

    def _remove_pid(self):
        path, self.pidfile = self.pidfile, None
        fd, self.pid_fd = self.pid_fd, None
        if path:
            from . import pidfile as pidmod
            pidmod.remove(path, fd, os.getpid())

    def _close_listeners(self):
        for lst in self.listeners.values():
            lst.server_close()
        self.listeners = {}

    # -- workers ----------------------------------------------------------------------------
    def _spawn(self):
        # nginx's worker slot: a restarted worker takes the number of the one it replaces
        taken = {self.numbers.get(p) for p in self.workers}
        number = next(n for n in range(len(taken) + 1) if n not in taken)
        channel = self.hub.pair()       # the worker's end answers `sessions` and `kick`
        metrics.claim()                 # a metrics slot for the child (given back if no fork)
        try:
            pid = os.fork()
        except OSError:
            metrics.unclaim()
            for end in channel:
                end.close()
            raise
        if pid == 0:
            code = 2
            try:
                code = Worker(self, number, self.hub.in_child(channel)).run()
            except BaseException as e:  # never return into the master's code
                try:
                    self.log.log("alert", "worker process failed: %r" % (e,))
                except BaseException:
                    pass
            finally:
                os._exit(code)
        self.hub.spawned(pid, channel)
        self.workers[pid] = time.monotonic()
        self.numbers[pid] = number
        metrics.assign(pid)
        self.log.log("notice", "start worker process %d" % pid)
        return pid

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._exited(pid, status)

    def _exited(self, pid, status):
        current = pid in self.workers
        metrics.release(pid)
        if login_table.release_pid(pid) is None:    # a dead worker's limit_sessions_per_user
            self.log.log("warn", "the login table is locked: the sessions of worker process "
                         "%d are given back later" % pid)
        self.hub.gone(pid)
        self.workers.pop(pid, None)
        self.numbers.pop(pid, None)
        self.old_workers.discard(pid)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            self.log.log("alert" if current and not self.stopping else "notice",
                         "worker process %d exited on signal %d" % (pid, sig))
            code = None
        else:
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 0
            self.log.log("alert" if (current and not self.stopping) or code else "notice",
                         "worker process %d exited with code %d" % (pid, code))
        if not current or self.stopping:
            return
        if code == 2:
            self.log.log("alert", "worker process %d could not start: not respawned" % pid)
            return
        now = time.monotonic()
        self.recent_deaths = [t for t in self.recent_deaths if now - t < 10] + [now]
        # a worker dying again and again is restarted at most once a second
        delay = 1.0 if len(self.recent_deaths) > 3 else 0.0
        self.respawn.append(now + delay)
        metrics.restarted()

    def _signal_all(self, sig, pids):
        for pid in list(pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    # -- main loop ---------------------------------------------------------------------------
    def _loop(self):
        while True:
            timeout = 1.0
            if self.respawn:
                timeout = max(0.0, min(self.respawn) - time.monotonic())
            info = self.hub.wait(max(0.0, timeout))    # and serves the control socket
            self._reap()
            login_table.release_pending()   # what the lock did not let _exited give back
            if self.respawn:
                now = time.monotonic()
                due = [t for t in self.respawn if t <= now]
                self.respawn = [t for t in self.respawn if t > now]
                for _ in due:
                    if len(self.workers) < self._nworkers():
                        self._spawn()
            if not self.workers and not self.respawn and not self.stopping:
                self.log.log("alert", "no worker processes left, exiting")
                self._stop(signal.SIGTERM)
                return 1
            if info is None:
                continue
            sig = info.si_signo
            sender = " from %d" % info.si_pid if info.si_pid else ""
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.log.log("notice", "signal %d (%s) received%s, exiting"
                             % (sig, _signame(sig), sender))
                self._stop(signal.SIGTERM)
                return 0
            if sig == signal.SIGQUIT:
                self.log.log("notice", "signal %d (SIGQUIT) received%s, shutting down"
                             % (sig, sender))
                self._stop(signal.SIGQUIT)
                return 0
            if sig == signal.SIGHUP:
                self.log.log("notice", "signal %d (SIGHUP) received%s, reconfiguring"
                             % (sig, sender))
                self._reload()
            elif sig == signal.SIGUSR1:
                self.log.log("notice", "signal %d (SIGUSR1) received%s, reopening logs"
                             % (sig, sender))
                self._reopen()
                self._signal_all(signal.SIGUSR1, list(self.workers) + list(self.old_workers))

    def _stop(self, sig):
        self.stopping = True
        self.respawn = []
        self.notify("STOPPING=1")
        everyone = set(self.workers) | self.old_workers
        self._signal_all(sig, everyone)
        self._close_listeners()
        deadline = time.monotonic() + FAST_EXIT_WAIT if sig == signal.SIGTERM else None
        while self.workers or self.old_workers:
            info = self.hub.wait(0.05)
            self._reap()
            if info is not None:
                if info.si_signo in (signal.SIGTERM, signal.SIGINT) and deadline is None:
                    # TERM during a graceful stop: hurry up
                    self._signal_all(signal.SIGTERM, set(self.workers) | self.old_workers)
                    deadline = time.monotonic() + FAST_EXIT_WAIT
                elif info.si_signo == signal.SIGUSR1:
                    self._reopen()
                    self._signal_all(signal.SIGUSR1, set(self.workers) | self.old_workers)
            if deadline is not None and time.monotonic() > deadline:
                self._signal_all(signal.SIGKILL, set(self.workers) | self.old_workers)
                deadline = time.monotonic() + FAST_EXIT_WAIT
        self.log.log("notice", "exit")

    def _reopen(self):
        self.log.reopen()
        for lg in self.server_logs.values():
            lg.reopen()
        # new files are the master's (root's): hand them over before the workers reopen them
        _chown_logs([self.log] + list(self.server_logs.values()), self.user)

    def _reload(self):
        self.notify("RELOADING=1")
        try:
            self._apply_reload()
        finally:
            self.notify("READY=1")

    def _apply_reload(self):
        from .errors import ConfigError
        try:
            cfg = load_config(self.path)        # as at start: the TLS contexts built anew
        except ConfigError as e:
            self.log.log("emerg", str(e))
            self.log.log("alert", "reload failed: the old configuration stays in use")
            return
        except Exception as e:
            self.log.log("emerg", "cannot read %s: %s" % (self.path, e))
            self.log.log("alert", "reload failed: the old configuration stays in use")
            return
        if cfg.main.daemon:
            self.log.log("emerg", '"daemon on" is not supported')
            return
        _warn_affinity(cfg, self.log)
        try:
            log, server_logs = _build_logs(cfg)
        except OSError as e:
            self.log.log("emerg", e.strerror)
            return
        try:
            self._preload()
            user = _resolve_user(cfg, log)
            metrics_http.prepare(cfg.main)      # a changed address: bound, not yet in use
            bound, removed = self.lmod.bind_all(cfg.servers, self.listeners)
        except Exception as e:
            metrics_http.abandon()
            self.log.log("emerg", str(e))
            self.log.log("alert", "reload failed: the old configuration stays in use")
            log.close()
            for lg in server_logs.values():
                lg.close()
            return
        metrics_http.commit()
        for lst in removed:
            lst.server_close()
        try:
            self.hub.listen(cfg.main.control_socket)    # anew only if the path changed
        except OSError as e:
            log.log("alert", "%s: no control socket" % e.strerror)
        old_log, old_server_logs = self.log, self.server_logs
        self.cfg, self.log, self.server_logs, self.user = cfg, log, server_logs, user
        _chown_logs([log] + list(server_logs.values()), user)
        self.listeners = bound
        new_pid = cfg.main.pid
        if new_pid != self.pidfile:
            old_path = self.pidfile
            try:
                self._write_pid(new_pid)
                if old_path and old_path != new_pid:
                    self.pidfile = new_pid
                    try:
                        os.unlink(old_path)
                    except OSError:
                        pass
            except OSError as e:
                self.log.log("alert", 'open() "%s" failed (%d: %s)'
                             % (new_pid, e.errno or 0, e.strerror))
        old = list(self.workers)
        self.old_workers.update(old)
        self.workers = {}
        self.respawn = []
        self.log.log("notice", "start worker processes")
        for _ in range(self._nworkers()):
            self._spawn()
        self._signal_all(signal.SIGQUIT, old)
        for lg in [old_log] + list(old_server_logs.values()):
            lg.close()


def _noop(signo, frame):
    pass


class Worker:
    """A worker process: serves every listener until told to stop."""

    def __init__(self, master: Master, number: int = 0,
                 channel: Optional[socket.socket] = None):
        self.master = master
        self.number = number                # 0..worker_processes-1 (worker_cpu_affinity)
        self.channel = channel              # live.serve answers the master on it
        self.master_pid = os.getppid()
        self.cfg = master.cfg
        self.log = master.log
        self.server_logs = master.server_logs
        self.listeners = list(master.listeners.values())

    def _drop_privileges(self):
        user = self.master.user
        if not user or os.geteuid() != 0:
            return
        uid, gid, name = user
        os.setgid(gid)
        os.initgroups(name, gid)
        os.setuid(uid)

    def run(self) -> int:
        # signals stay blocked in every thread: the main thread takes them with sigtimedwait
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            self._drop_privileges()
        except OSError as e:
            self.log.log("emerg", "cannot switch to user %s: %s" % (self.master.user[2], e))
            return 2
        from .relay import Relay
        from .runtime import Runtime
        self._bind_cpus()       # before any thread starts: threads inherit the binding
        # Handler threads need little stack: 1 MiB each instead of the usual 8 MiB
        # (ulimit -s) keeps limit_prelogin threads within an address-space limit.
        threading.stack_size(HANDLER_STACK)
        relay = Relay(log=self.log)
        relay.start()
        self.relay = relay
        self.runtime = Runtime(self.cfg, self.log, relay, self.server_logs)
        if self.channel is not None:
            from .live import serve
            serve(self.channel, self.runtime)
        self._check_nofile()
        metrics_http.start(self.runtime)    # its metrics slot, and GET /metrics if set
        for lst in self.listeners:
            lst.start(self.runtime)
        while True:
            info = signal.sigtimedwait(HANDLED, 1.0)
            if info is None:
                if os.getppid() != self.master_pid:
                    self.log.log("alert", "master process %d is gone, shutting down"
                                 % self.master_pid)
                    return self._graceful()
                continue
            sig = info.si_signo
            if sig in (signal.SIGTERM, signal.SIGINT):
                return self._fast()
            if sig == signal.SIGQUIT:
                return self._graceful()
            if sig == signal.SIGUSR1:
                self._reopen()
            # SIGHUP: the master reloads; a worker ignores it

    def _bind_cpus(self):
        """nginx's ngx_setaffinity, same log lines."""
        from .affinity import cpus_for
        cpus = cpus_for(self.cfg.main.worker_cpu_affinity, self.number,
                        os.sched_getaffinity(0))
        if not cpus:
            return
        for cpu in sorted(cpus):
            self.log.log("notice", "sched_setaffinity(): using cpu #%d" % cpu)
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as e:
            self.log.log("alert", "sched_setaffinity() failed (%d: %s)"
                         % (e.errno or 0, e.strerror))

    def _check_nofile(self):
        # Each session holds two descriptors (client, backend), and one more while it asks
        # the auth service; keep a margin for listeners, log files and resolver sockets.
        # nginx leaves this to worker_rlimit_nofile and warns.
        from .limits import raise_nofile
        wc = self.cfg.main.worker_connections
        soft = raise_nofile(wc + self.cfg.main.limit_prelogin + 64)
        if soft != -1 and soft < wc:
            self.log.log("warn", "%d worker_connections exceed open file resource limit: %d"
                         % (wc, soft))

    def _reopen(self):
        self.log.reopen()
        for lg in self.server_logs.values():
            lg.reopen()

    def _fast(self):
        self.runtime.shutting_down.set()
        self.log.log("notice", "exiting")
        return 0

    def _graceful(self):
        self.runtime.shutting_down.set()
        self.log.log("notice", "gracefully shutting down")
        stoppers = [threading.Thread(target=lst.stop_accepting, daemon=True)
                    for lst in self.listeners]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(2.0)
        limit = self.cfg.main.worker_shutdown_timeout
        deadline = time.monotonic() + limit if limit else None
        while True:
            busy = sum(lst.active() for lst in self.listeners) + self._relay_count()
            if not busy:
                break
            if deadline is not None and time.monotonic() >= deadline:
                self.log.log("info", "shutdown timeout")
                try:
                    self.relay.close_all("shutdown timeout")
                except Exception:
                    pass
                self._end_prelogin()
                break
            info = signal.sigtimedwait(HANDLED, 0.05)
            if info is not None:
                if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    return self._fast()
                if info.si_signo == signal.SIGUSR1:
                    self._reopen()
        try:
            self.relay.stop()
        except Exception:
            pass
        self.log.log("notice", "exiting")
        return 0

    def _end_prelogin(self):
        """Sessions before login end too, each with its access_log line; their threads get
        PRELOGIN_WAIT seconds (one waiting for the auth service may take longer: cut)."""
        if not self.runtime.live.end_prelogin("shutdown"):
            return
        until = time.monotonic() + PRELOGIN_WAIT
        while sum(lst.active() for lst in self.listeners) and time.monotonic() < until:
            time.sleep(0.02)

    def _relay_count(self):
        try:
            return self.relay.count()
        except Exception:
            return 0
