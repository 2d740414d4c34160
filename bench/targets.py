"""The targets under test: mailproxy and nginx as child processes, and `direct`.

Each target knows its three client ports and, for the proxies, the process ids of the proxy
and all its descendants (master and workers), from which it reads CPU time (utime+stime of
/proc/PID/stat), RSS and thread count (/proc/PID/status).
"""

import os
import signal
import socket
import string
import subprocess
import sys
import time

CLK_TCK = os.sysconf('SC_CLK_TCK')
PAGE = os.sysconf('SC_PAGE_SIZE')
BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
if REPO not in sys.path:        # run as `python3 bench/run.py`: the checkout's packages
    sys.path.insert(1, REPO)

from bench.nginx_conf import nginx_conf   # noqa: E402
from mailproxy import config              # noqa: E402
PROTOS = ('imap', 'pop3', 'smtp')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# /proc

def _children_map():
    kids = {}
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % d, 'rb') as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st[st.rindex(b')') + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid):
    """pid and all its live descendants."""
    kids = _children_map()
    out = [pid]
    i = 0
    while i < len(out):
        out.extend(kids.get(out[i], ()))
        i += 1
    return out


def cpu_seconds(pids):
    """utime+stime of the processes (all their threads, live and exited), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open('/proc/%d/stat' % pid, 'rb') as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(b')') + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def status_sum(pids, key):
    total = 0
    for pid in pids:
        try:
            with open('/proc/%d/status' % pid) as f:
                for line in f:
                    if line.startswith(key):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def thread_cpu(pid):
    """{thread name: cpu seconds} for the live threads of one process."""
    out = {}
    try:
        tids = os.listdir('/proc/%d/task' % pid)
    except OSError:
        return out
    for tid in tids:
        try:
            with open('/proc/%d/task/%s/stat' % (pid, tid), 'rb') as f:
                st = f.read()
        except OSError:
            continue
        name = st[st.index(b'(') + 1:st.rindex(b')')].decode(errors='replace')
        fields = st[st.rindex(b')') + 2:].split()
        out[name] = out.get(name, 0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


# ---------------------------------------------------------------------------------------------
# configuration

def render_ini(template, **fields):
    return string.Template(template).substitute(**fields)


# ---------------------------------------------------------------------------------------------
# targets

class Direct:
    name = 'direct'
    is_proxy = False

    def __init__(self, backend_ports):
        self.ports = dict(backend_ports)
        self.pid = None

    def start(self):
        pass

    def stop(self):
        pass

    def pids(self):
        return []

    def cpu(self):
        return None

    def rss_kb(self):
        return None

    def threads(self):
        return None


class ProxyTarget:
    is_proxy = True

    def __init__(self, name, kind, workers, tmp, template, auth_port, cmd=None, nofile=1024,
                 fields=None):
        self.name = name
        self.kind = kind                # 'mailproxy' or 'nginx'
        self.workers = workers
        self.tmp = tmp
        self.template = template
        self.auth_port = auth_port
        self.cmd = cmd
        self.nofile = nofile
        # a port for every ${X_port} of the template (bench-tls.ini has imaps, pop3s, ...)
        ids = string.Template(template).get_identifiers()
        self.listened = [i[:-5] for i in ids if i.endswith('_port') and i != 'auth_port']
        self.ports = {p: free_port() for p in set(PROTOS) | set(self.listened)}
        self.proc = None
        self.pid = None
        self.known = {}
        self.ini_text = render_ini(template, tmp=tmp, name=name, workers=workers,
                                   auth_port=auth_port, nofile=nofile,
                                   **{k + '_port': v for k, v in self.ports.items()},
                                   **(fields or {}))
        self.ini = os.path.join(tmp, name + '.ini')
        with open(self.ini, 'w') as f:
            f.write(self.ini_text)
        cfg = config.load(self.ini)
        self.pidfile = cfg.main.pid or ''
        if kind == 'mailproxy':
            self.conf = self.ini
            self.argv = list(cmd) + ['-c', self.conf]
        else:
            # fds at the hard limit: nginx's default 512 connections would not hold the idle
            # scenario
            self.conf = os.path.join(tmp, name + '.conf')
            with open(self.conf, 'w') as f:
                f.write(nginx_conf(cfg, main={'worker_rlimit_nofile': nofile,
                                              'worker_connections': nofile}))
            self.argv = ['nginx', '-p', tmp + '/', '-c', self.conf,
                         '-e', os.path.join(tmp, name + '-startup.log')]

    def check(self):
        """Configuration test (-t); raises RuntimeError with the output."""
        argv = self.argv + ['-t'] if self.kind == 'mailproxy' else self.argv + ['-t', '-q']
        r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=30)
        if r.returncode != 0:
            raise RuntimeError('%s: configuration test failed:\n%s%s' % (self.name, r.stdout,
                                                                        r.stderr))

    def start(self, timeout=20.0):
        if self.proc is not None:
            return
        if self.pidfile and os.path.exists(self.pidfile):
            os.unlink(self.pidfile)
        self._out = open(os.path.join(self.tmp, self.name + '.stdout'), 'ab')
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE='1')
        self.proc = subprocess.Popen(self.argv, cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while not (self.pidfile and os.path.exists(self.pidfile)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                try:
                    with open(self._out.name, 'rb') as f:
                        tail = f.read()[-1500:].decode(errors='replace')
                except OSError:
                    tail = ''
                raise RuntimeError('%s did not start:\n%s' % (self.name, tail))
            time.sleep(0.02)
        # ready when every port greets (the workers have started); a TLS port when it accepts
        for proto in self.listened:
            port = self.ports[proto]
            while True:
                try:
                    with socket.create_connection(('127.0.0.1', port), timeout=2) as s:
                        if proto not in PROTOS or s.recv(100):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError('%s: no greeting on %s port %d' % (self.name, proto, port))
                time.sleep(0.05)
        # every worker up (auto: one per CPU)
        want = 1 + (os.cpu_count() if self.workers == 'auto' else int(self.workers))
        while len(self.pids()) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        self.known = _starttimes(self.pids())

    def pids(self):
        if self.pid is None:
            return []
        return descendants(self.pid)

    def cpu(self):
        return cpu_seconds(self.pids())

    def rss_kb(self):
        return status_sum(self.pids(), 'VmRSS:')

    def threads(self):
        return status_sum(self.pids(), 'Threads:')

    def fds(self):
        n = 0
        for pid in self.pids():
            try:
                n += len(os.listdir('/proc/%d/fd' % pid))
            except OSError:
                pass
        return n

    def stop(self, timeout=15.0):
        if self.proc is None:
            return
        family = dict(self.known)
        family.update(_starttimes(self.pids()))
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # workers still closing their sessions (or orphaned): wait, then end them, by pid and
        # only while /proc shows the very process we started (same start time)
        deadline = time.monotonic() + timeout
        for pid, st in family.items():
            while time.monotonic() < deadline and _same_process(pid, st):
                time.sleep(0.05)
            if _same_process(pid, st):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
                t = time.monotonic() + 5
                while time.monotonic() < t and _same_process(pid, st):
                    time.sleep(0.05)
        self.proc = None
        self.pid = None
        self.known = {}
        try:
            self._out.close()
        except Exception:
            pass


def _stat_fields(pid):
    try:
        with open('/proc/%d/stat' % pid, 'rb') as f:
            st = f.read()
    except OSError:
        return None
    return st[st.rindex(b')') + 2:].split()


def _starttimes(pids):
    out = {}
    for pid in pids:
        f = _stat_fields(pid)
        if f is not None:
            out[pid] = f[19]
    return out


def _same_process(pid, starttime):
    """pid still runs (not a zombie) and is the process that had this start time."""
    f = _stat_fields(pid)
    return f is not None and f[0] != b'Z' and f[19] == starttime
