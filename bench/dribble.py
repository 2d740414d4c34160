#!/usr/bin/env python3
"""Pre-login limits under dribbling clients, on loopback, in one command.

    python3 bench/dribble.py [--duration 90] [--proto pop3|imap] [--caps 100,0]
                             [--baseline SECONDS] [--zipapp FILE] [--json FILE] [--keep]

One mailproxy worker (worker_processes 1, `timeout` 60s, `worker_connections` and
`limit_prelogin` at their defaults, `limit_conn_per_ip` from --caps, one run per value) in
front of the scripted backends and auth service of bench/servers.py.  This process holds the
dribblers in one selectors loop: 2,000 connections from 127.0.0.2 and 300 from 300 other
loopback addresses, each sending one byte of a valid command (`NOOP`) every 2 s; a refused
or closed dribbler connects again at most once a second.  A second process is the normal
client: from 127.0.0.9 it logs in every 100 ms (greeting, login through auth_http, logout)
and records each login time.  The worker's /proc/PID/status (Threads, VmRSS, VmSize) is
sampled every second.  See bench/README.md, "Dribbling clients".
"""

import argparse
import errno
import heapq
import json
import multiprocessing as mp
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import run       # noqa: E402   Services (backends + auth_http), pct, log
import servers   # noqa: E402
import targets as tg   # noqa: E402

# Linux: choose the source port at connect, not at bind (2,000 sockets share one address).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, 'IP_BIND_ADDRESS_NO_PORT', 24)
MAIN_SRC = '127.0.0.2'
NORMAL_SRC = '127.0.0.9'
GREETING_WAIT = 30.0        # a dribbler with no first reply after this is given up
LOGIN_TIMEOUT = 15.0        # each step of the normal client's session
REFUSALS = {'pop3': b'-ERR [SYS/TEMP]', 'imap': b'* BYE [UNAVAILABLE]'}
GREETINGS = {'pop3': b'+OK', 'imap': b'* OK'}
DRIBBLE = {'pop3': b'NOOP\r\n', 'imap': b'a NOOP\r\n'}

def other_sources(n):
    """n loopback addresses other than 127.0.0.1 (the servers), MAIN_SRC and NORMAL_SRC:
    127.0.0.3 upwards; past 127.0.0.254 they go on in 127.0.1.x (still loopback)."""
    out = []
    i = 3
    while len(out) < n and i < 1 << 16:
        a, b = divmod(i, 256)
        ip = '127.0.%d.%d' % (a, b)
        if 0 < b < 255 and ip not in (MAIN_SRC, NORMAL_SRC):
            out.append(ip)
        i += 1
    return out


# ---------------------------------------------------------------------------------------------
# /proc of the worker

def read_status(pid):
    out = {}
    try:
        with open('/proc/%d/status' % pid) as f:
            for line in f:
                key = line.split(':', 1)[0]
                if key in ('Threads', 'VmRSS', 'VmSize'):
                    out[key] = int(line.split()[1])
    except OSError:
        return None
    return out


def worker_pid(target, wait=10.0):
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        kids = [p for p in target.pids() if p != target.pid]
        if kids:
            return kids[0]
        time.sleep(0.05)
    raise RuntimeError('no worker process under pid %s' % target.pid)


# ---------------------------------------------------------------------------------------------
# the normal client (a process of its own, so that the dribblers' loop does not delay it)

class Closed(Exception):
    pass


def _lines(sock):
    buf = b''
    while True:
        i = buf.find(b'\n')
        if i >= 0:
            line, buf = buf[:i + 1], buf[i + 1:]
            yield line
            continue
        data = sock.recv(4096)
        if not data:
            raise Closed()
        buf += data


def one_login(proto, port):
    """(status, login seconds, session seconds): status 'ok', 'refused' (temporary-failure
    greeting), 'rejected' (a negative reply), 'timeout', 'closed' or 'error:...'."""
    t0 = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((NORMAL_SRC, 0))
        s.settimeout(LOGIN_TIMEOUT)
        s.connect(('127.0.0.1', port))
        rd = _lines(s)
        greet = next(rd)
        if greet.startswith(REFUSALS[proto]):
            return 'refused', time.monotonic() - t0, None
        if not greet.startswith(GREETINGS[proto]):
            return 'rejected', time.monotonic() - t0, None
        if proto == 'pop3':
            s.sendall(b'USER normal\r\n')
            if not next(rd).startswith(b'+OK'):
                return 'rejected', time.monotonic() - t0, None
            s.sendall(b'PASS secret\r\n')
            ok = next(rd).startswith(b'+OK')
        else:
            s.sendall(b'a LOGIN normal secret\r\n')
            line = next(rd)
            while not line.startswith(b'a '):
                line = next(rd)
            ok = line.startswith(b'a OK')
        t_login = time.monotonic() - t0
        if not ok:
            return 'rejected', t_login, None
        s.sendall(b'QUIT\r\n' if proto == 'pop3' else b'b LOGOUT\r\n')
        try:
            for _ in range(10):         # the logout reply, then the server's close
                next(rd)
        except Closed:
            pass
        return 'ok', t_login, time.monotonic() - t0
    except socket.timeout:
        return 'timeout', time.monotonic() - t0, None
    except Closed:
        return 'closed', time.monotonic() - t0, None
    except OSError as e:
        return 'error:%s' % (errno.errorcode.get(e.errno, e.errno) if e.errno else
                             type(e).__name__), time.monotonic() - t0, None
    finally:
        s.close()


def normal_client(proto, port, start_wall, end_wall, every, q):
    """Log in every `every` seconds from start_wall until end_wall (one at a time: a login
    slower than `every` delays the next one, counted as late)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = []
    late = 0
    k = 0
    while True:
        due = start_wall + k * every
        now = time.time()
        if due >= end_wall or now >= end_wall:
            break
        if now < due:
            time.sleep(due - now)
        elif now - due > every:
            late += 1
            k = int((now - start_wall) / every)      # skip the ticks already missed
            due = now
        k += 1
        status, t_login, t_all = one_login(proto, port)
        out.append((due - start_wall, status, t_login, t_all))
    q.put(dict(logins=out, late=late))


# ---------------------------------------------------------------------------------------------
# the dribblers: one selectors loop in this process

class Slot:
    __slots__ = ('group', 'src', 'sock', 'state', 'buf', 't_conn', 'pos', 'gen')

    def __init__(self, group, src):
        self.group = group
        self.src = src
        self.sock = None
        self.state = 'wait'         # wait -> greet -> drib -> wait
        self.buf = b''
        self.t_conn = 0.0
        self.pos = 0
        self.gen = 0


def new_stats():
    return dict(attempts=0, admitted=0, refused=0, closed_before_greeting=0, connect_errors=0,
                greeting_timeouts=0, other_first_line=0, cut=0, cut_lifetimes=[], held=0,
                held_peak=0)


class Dribblers:
    def __init__(self, proto, port, groups, interval, reconnect=1.0):
        self.proto = proto
        self.addr = ('127.0.0.1', port)
        self.interval = interval
        self.reconnect = reconnect
        self.pattern = DRIBBLE[proto]
        self.refusal = REFUSALS[proto]
        self.greeting = GREETINGS[proto]
        self.sel = selectors.DefaultSelector()
        self.slots = []
        self.stats = {}
        for name, sources in groups:
            self.stats[name] = new_stats()
            self.slots += [Slot(name, ip) for ip in sources]
        self.heap = []
        self.seq = 0

    def _at(self, when, slot, kind):
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, slot.gen, kind, slot))

    def _connect(self, slot, now):
        st = self.stats[slot.group]
        st['attempts'] += 1
        slot.gen += 1
        slot.t_conn = now
        slot.buf = b''
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((slot.src, 0))
            s.setblocking(False)
            err = s.connect_ex(self.addr)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
        except OSError:
            s.close()
            st['connect_errors'] += 1
            slot.state = 'wait'
            self._at(now + self.reconnect, slot, 'connect')
            return
        slot.sock = s
        slot.state = 'greet'
        self.sel.register(s, selectors.EVENT_READ, slot)
        self._at(now + GREETING_WAIT, slot, 'greet_timeout')

    def _drop(self, slot, now):
        """Close the slot's socket; connect again at most once per `reconnect` seconds."""
        if slot.state == 'drib':
            self.stats[slot.group]['held'] -= 1
        try:
            self.sel.unregister(slot.sock)
        except (KeyError, ValueError):
            pass
        slot.sock.close()
        slot.sock = None
        slot.state = 'wait'
        slot.gen += 1
        self._at(max(now, slot.t_conn + self.reconnect), slot, 'connect')

    def _readable(self, slot, now):
        st = self.stats[slot.group]
        try:
            data = slot.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        if slot.state == 'drib':
            if not data:                    # the proxy ended the session
                st['cut'] += 1
                st['cut_lifetimes'].append(now - slot.t_conn)
                self._drop(slot, now)
            return                          # replies to NOOP: read and forgotten
        if not data:
            if slot.buf:
                st['other_first_line'] += 1
            else:
                st['closed_before_greeting'] += 1
            self._drop(slot, now)
            return
        slot.buf += data
        if b'\n' not in slot.buf:
            if len(slot.buf) > 4096:
                st['other_first_line'] += 1
                self._drop(slot, now)
            return
        first = slot.buf
        slot.buf = b''
        if first.startswith(self.refusal):
            st['refused'] += 1
            self._drop(slot, now)
        elif first.startswith(self.greeting):
            st['admitted'] += 1
            st['held'] += 1
            st['held_peak'] = max(st['held_peak'], st['held'])
            slot.state = 'drib'
            slot.pos = 0
            self._at(now + self.interval, slot, 'send')
        else:
            st['other_first_line'] += 1
            self._drop(slot, now)

    def _event(self, slot, kind, now, due):
        if kind == 'connect':
            if slot.state == 'wait':
                self._connect(slot, now)
        elif kind == 'greet_timeout':
            if slot.state == 'greet':
                self.stats[slot.group]['greeting_timeouts'] += 1
                self._drop(slot, now)
        elif kind == 'send' and slot.state == 'drib':
            try:
                slot.sock.send(self.pattern[slot.pos:slot.pos + 1])
                slot.pos = (slot.pos + 1) % len(self.pattern)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                st = self.stats[slot.group]
                st['cut'] += 1
                st['cut_lifetimes'].append(now - slot.t_conn)
                self._drop(slot, now)
                return
            self._at(max(now, due + self.interval), slot, 'send')

    def run(self, seconds, ramp, tick=None):
        """Connect every slot over `ramp` seconds, then keep them up for `seconds` in all;
        tick(now) is called about once a second.  Bounded by time; slots bounded in count."""
        start = time.monotonic()
        n = len(self.slots)
        for i, slot in enumerate(self.slots):
            self._at(start + ramp * i / max(1, n), slot, 'connect')
        end = start + seconds
        next_tick = start
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_tick:
                if tick is not None:
                    tick(now)
                next_tick += 1.0
            wait = min(end, next_tick) - now
            if self.heap:
                wait = min(wait, self.heap[0][0] - now)
            for key, _ in self.sel.select(max(0.0, wait)):
                self._readable(key.data, now)
            now = time.monotonic()
            for _ in range(len(self.heap)):             # every event due now, no more
                if not self.heap or self.heap[0][0] > now:
                    break
                due, _, gen, kind, slot = heapq.heappop(self.heap)
                if gen == slot.gen:
                    self._event(slot, kind, now, due)

    def close(self):
        for slot in self.slots:
            if slot.sock is not None:
                try:
                    self.sel.unregister(slot.sock)
                except (KeyError, ValueError):
                    pass
                slot.sock.close()
                slot.sock = None
        self.sel.close()


# ---------------------------------------------------------------------------------------------
# one measurement

def refusal_reasons(path):
    """Counts of the worker's log lines: refusals by limit, and alert/crit lines."""
    out = {}
    # one line a second per limit and address, counting the refusals it did not log
    pat = re.compile(rb'\((limit_conn_per_ip|limit_prelogin|worker_connections) \d+'
                     rb'(?:; (\d+) more not logged since the last line)?\)')
    try:
        with open(path, 'rb') as f:
            for line in f:
                m = pat.search(line)
                n = 1
                if m:
                    key = m.group(1).decode()
                    n += int(m.group(2) or 0)
                    out['lines'] = out.get('lines', 0) + 1
                elif b'[alert]' in line or b'[crit]' in line or b'[emerg]' in line:
                    key = 'alert/crit lines'
                else:
                    continue
                out[key] = out.get(key, 0) + n
    except OSError:
        pass
    return out


def measure(args, svc, tmp, cap, mp_cmd, main_n, others_n, seconds, label):
    limits = '' if cap is None else 'limit_conn_per_ip = %d\n' % cap
    if args.limit_prelogin is not None:
        limits += 'limit_prelogin = %d\n' % args.limit_prelogin
    with open(os.path.join(BENCH, 'bench.ini')) as f:     # run.py's INI, with the limits
        template = f.read().replace('\n[mail]\n', '%s\n[mail]\ntimeout = %s\n'
                                    % (limits, args.timeout), 1)
    name = 'dribble-%s' % label
    target = tg.ProxyTarget(name, 'mailproxy', '1', tmp, template, svc.auth_port,
                            cmd=mp_cmd, nofile=servers.raise_nofile())
    target.check()
    target.start()
    port = target.ports[args.proto]
    samples = []
    res = dict(label=label, limit_conn_per_ip=cap, seconds=seconds,
               limit_prelogin=args.limit_prelogin or 1000)
    drib = None
    client = None
    try:
        wpid = worker_pid(target)
        cpu0 = tg.cpu_seconds([wpid])
        groups = [(MAIN_SRC, [MAIN_SRC] * main_n), ('others', other_sources(others_n))]
        drib = Dribblers(args.proto, port, groups, args.interval)
        q = mp.Queue()
        start_wall = time.time() + args.warmup
        client = mp.Process(target=normal_client,
                            args=(args.proto, port, start_wall, start_wall + seconds - args.warmup,
                                  args.every, q), daemon=True)
        client.start()
        t0 = time.monotonic()

        def tick(now):
            st = read_status(wpid)
            if st is not None:
                st['t'] = round(now - t0, 1)
                st.update(('held_' + g, v['held']) for g, v in drib.stats.items())
                samples.append(st)

        drib.run(seconds, ramp=min(2.0, args.interval), tick=tick)
        tick(time.monotonic())
        cpu1 = tg.cpu_seconds([wpid])
        try:
            got = q.get(timeout=3 * LOGIN_TIMEOUT + 10)
        except Exception:
            got = dict(logins=[], late=0, lost=True)
        res['cpu_s'] = cpu1 - cpu0
    finally:
        if drib is not None:
            drib.close()
        if client is not None:
            client.join(10)
            if client.is_alive():
                client.terminate()
                client.join(5)
        target.stop()
    logins = got['logins']
    ok = [t for _, s, t, _ in logins if s == 'ok']
    kinds = {}
    for _, s, _, _ in logins:
        if s != 'ok':
            kinds[s] = kinds.get(s, 0) + 1
    worst = max(((t, at) for at, s, t, _ in logins if s == 'ok'), default=(None, None))
    res.update(logins=len(logins), ok=len(ok), failed=len(logins) - len(ok), fail_kinds=kinds,
               late=got['late'], p50_ms=ms(run.pct(ok, 50)), p99_ms=ms(run.pct(ok, 99)),
               max_ms=ms(worst[0]),
               worst_at_s=None if worst[1] is None else round(worst[1] + args.warmup, 1),
               threads_peak=max((s['Threads'] for s in samples), default=None),
               rss_peak_mb=max((s['VmRSS'] for s in samples), default=0) / 1024.0,
               vmsize_peak_mb=max((s['VmSize'] for s in samples), default=0) / 1024.0,
               samples=samples, log=refusal_reasons(os.path.join(tmp, name + '-error.log')),
               windows=windows(logins, args.warmup, 10.0))
    try:
        res['log_mb'] = os.path.getsize(os.path.join(tmp, name + '-error.log')) / 1e6
    except OSError:
        res['log_mb'] = 0.0
    res['dribblers'] = {}
    for g, st in drib.stats.items():
        life = sorted(st.pop('cut_lifetimes'))
        st['cut_lifetime_median_s'] = round(run.pct(life, 50), 1) if life else None
        res['dribblers'][g] = st
    return res


def windows(logins, warmup, width):
    """Per `width` seconds of the run: (start s, ok, failed, max login ms of the ok ones)."""
    out = {}
    for at, status, t, _ in logins:
        w = int((at + warmup) // width)
        o = out.setdefault(w, [w * width, 0, 0, 0.0])
        if status == 'ok':
            o[1] += 1
            o[3] = max(o[3], t * 1000.0)
        else:
            o[2] += 1
    return [tuple(out[k]) for k in sorted(out)]


def ms(v):
    return None if v is None else v * 1000.0


# ---------------------------------------------------------------------------------------------
# report

def fmt(v, f='%.1f'):
    return '-' if v is None else f % v


def table(results):
    lines = ['| run | logins ok / failed | login p50 / p99 / max ms | worker threads peak '
             '| RSS peak MB | VmSize peak MB | 127.0.0.2 admitted / refused (held peak) '
             '| others admitted / refused (held peak) | refusals in the log | worker CPU s |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in results:
        fails = ', '.join('%d %s' % (n, k) for k, n in sorted(r['fail_kinds'].items()))
        d = r['dribblers']

        def grp(g):
            st = d.get(g)
            if not st or not st['attempts']:
                return '-'
            return '%d / %d (%d)' % (st['admitted'], st['refused'], st['held_peak'])
        reasons = ', '.join('%s %d' % (k, n) for k, n in sorted(r['log'].items())) or '0'
        lines.append('| %s | %d / %d%s | %s / %s / %s%s | %s | %s | %s | %s | %s | %s | %.1f |' % (
            r['title'], r['ok'], r['failed'], ' (%s)' % fails if fails else '',
            fmt(r['p50_ms']), fmt(r['p99_ms']), fmt(r['max_ms']),
            ' (at %.0f s)' % r['worst_at_s'] if r['worst_at_s'] is not None else '',
            fmt(r['threads_peak'], '%d'), fmt(r['rss_peak_mb']), fmt(r['vmsize_peak_mb'], '%.0f'),
            grp(MAIN_SRC), grp('others'), reasons, r.get('cpu_s', 0)))
    return '\n'.join(lines)


def machine():
    """run.py's machine description, plus the commit mailproxy runs from."""
    out = run.machine()
    try:
        git = ['git', '-C', tg.REPO]
        head = subprocess.run(git + ['rev-parse', '--short', 'HEAD'], timeout=10,
                              capture_output=True, text=True).stdout.strip()
        if subprocess.run(git + ['diff', '--quiet', 'HEAD'], timeout=10).returncode:
            head += ' (modified)'
    except (OSError, subprocess.SubprocessError):
        head = '?'
    out['commit'] = head
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--duration', type=float, default=90.0,
                    help='seconds of each run with dribblers (default 90: past one `timeout`)')
    ap.add_argument('--proto', choices=('pop3', 'imap'), default='pop3')
    ap.add_argument('--caps', default='100,0',
                    help='limit_conn_per_ip of each run, comma-separated (0 = off)')
    ap.add_argument('--limit-prelogin', type=int, help='default: not set (mailproxy: 1000)')
    ap.add_argument('--timeout', default='60s', help='the proxy\'s `timeout` (default 60s)')
    ap.add_argument('--dribblers', type=int, default=2000, help='from 127.0.0.2')
    ap.add_argument('--others', type=int, default=300, help='one each from other addresses')
    ap.add_argument('--interval', type=float, default=2.0, help='seconds between dribbled bytes')
    ap.add_argument('--every', type=float, default=0.1, help='the normal client\'s login period')
    ap.add_argument('--warmup', type=float, default=3.0,
                    help='seconds of dribbling before the normal client starts')
    ap.add_argument('--baseline', type=float, default=15.0,
                    help='seconds of a first run without dribblers (0: none)')
    ap.add_argument('--zipapp', help='run mailproxy from this zipapp instead of the checkout')
    ap.add_argument('--json', help='also write the raw results here')
    ap.add_argument('--keep', action='store_true', help='keep the temporary folder')
    args = ap.parse_args(argv)
    caps = [int(c) for c in args.caps.split(',') if c.strip()]
    if args.duration <= args.warmup + 1 or args.duration > 3600:
        ap.error('--duration must be more than --warmup + 1 and at most 3600')

    nofile = servers.raise_nofile()           # inherited by the proxy
    need = args.dribblers + args.others + 100
    if nofile < need:
        ap.error('RLIMIT_NOFILE %d is below the %d descriptors this needs' % (nofile, need))
    tmp = tempfile.mkdtemp(prefix='mailproxy-dribble-')
    os.chmod(tmp, 0o755)
    mp_cmd = ([sys.executable, os.path.abspath(args.zipapp)] if args.zipapp
              else [sys.executable, os.path.join(tg.REPO, 'mailproxy.py')])
    svc = run.Services()
    info = machine()
    info.update(date=time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                command=' '.join(['python3', 'bench/dribble.py'] + list(argv or sys.argv[1:])))
    results = []
    runs = []
    if args.baseline > 0:
        runs.append((caps[0] if caps else None, 0, 0, args.baseline + args.warmup, 'baseline',
                     'no dribblers, limit_conn_per_ip %s' % (caps[0] if caps else 'unset')))
    for c in caps:
        runs.append((c, args.dribblers, args.others, args.duration, 'cap%d' % c,
                     'limit_conn_per_ip %d' % c + (' (off)' if c == 0 else '')))
    t_begin = time.monotonic()
    try:
        svc.start()
        run.log('backends %s, auth_http %d, tmp %s, RLIMIT_NOFILE %d'
                % (svc.backend_ports, svc.auth_port, tmp, nofile))
        for cap, main_n, others_n, seconds, label, title in runs:
            run.log('%s: %d dribblers from %s, %d from other addresses, %.0f s'
                    % (title, main_n, MAIN_SRC, others_n, seconds))
            r = measure(args, svc, tmp, cap, mp_cmd, main_n, others_n, seconds, label)
            r['title'] = title
            results.append(r)
            run.log('%s: logins %d ok / %d failed %s, p50 %s p99 %s max %s ms, threads %s, '
                    'RSS %.1f MB, dribblers %s, log %s'
                    % (label, r['ok'], r['failed'], r['fail_kinds'], fmt(r['p50_ms']),
                       fmt(r['p99_ms']), fmt(r['max_ms']), r['threads_peak'], r['rss_peak_mb'],
                       {g: (st['admitted'], st['refused']) for g, st in r['dribblers'].items()},
                       r['log']))
    except KeyboardInterrupt:
        run.log('interrupted')
    finally:
        svc.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    info['seconds'] = time.monotonic() - t_begin
    print('\n%s, commit %s, %s CPUs (%s), Python %s, kernel %s, RLIMIT_NOFILE %s; %.0f s'
          % (info['date'], info['commit'], info['nproc'], info['cpu'], info['python'],
             info['kernel'], '%d/%d' % tuple(info['nofile']), info['seconds']))
    print('command: %s\n' % info['command'])
    print(table(results))
    for r in results:
        print('\n%s: worker threads / RSS MB over the run: %s; error log %.1f MB; late logins %d'
              % (r['label'], ' '.join('%s:%d/%.0f' % (s['t'], s['Threads'], s['VmRSS'] / 1024.0)
                                      for s in r['samples'][::10]), r['log_mb'], r['late']))
        print('%s: logins per 10 s (from s: ok/failed, max ms): %s'
              % (r['label'], ' '.join('%d:%d/%d,%.0f' % w for w in r['windows'])))
        for g, st in r['dribblers'].items():
            if st['attempts']:
                print('%s %s: %s' % (r['label'], g, st))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(machine=info, results=results), f, indent=1, default=str)
    return 0


if __name__ == '__main__':
    mp.set_start_method('fork')
    signal.signal(signal.SIGTERM, run._terminate)
    sys.exit(main())
