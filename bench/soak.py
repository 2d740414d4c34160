#!/usr/bin/env python3
"""The production-day soak: everything at once against one mailproxy worker, on loopback.

    python3 bench/soak.py [--duration 120] [--idle 5000] [--dribble 500] [--quick]

For `--duration` seconds, at the same time: `--idle` logged-in IMAP sessions over TLS (half
implicit, half STARTTLS; opened in the first 35% of the run), loops of login / move 1 MB
(sha256 checked) / logout over TLS for IMAP, POP3 and SMTP, `--dribble` pre-login connections
sending one byte every 2 s; at 45% a HUP, at 55% a USR1 (after the error log was renamed, as
logrotate does), at 65% the auth service restarted (a new process on the same listening socket,
the old one drains).  Then NOOP on every idle session.  Reports failed legitimate logins,
relayed sessions cut, bytes lost, worst login time, and the peak threads and RSS of the proxy's
processes (sampled from /proc every second).  See bench/README.md.
"""

import argparse
import json
import multiprocessing as mp
import os
import resource
import shlex
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import servers         # noqa: E402
import soak_clients    # noqa: E402
import targets as tg   # noqa: E402

INI = """\
[main]
pid = ${tmp}/${name}.pid
error_log = ${tmp}/${name}-error.log $log_level
worker_processes = ${workers}
$extra_main
[mail]
server_name = bench.local
auth_http = 127.0.0.1:${auth_port}/auth
proxy = on
starttls = on
ssl_certificate = $cert
ssl_certificate_key = $key
$extra_mail
[server imap]
listen =
    127.0.0.1:${imap_port}
    127.0.0.1:$imaps_port ssl
protocol = imap

[server pop3]
listen =
    127.0.0.1:${pop3_port}
    127.0.0.1:$pop3s_port ssl
protocol = pop3

[server smtp]
listen =
    127.0.0.1:${smtp_port}
    127.0.0.1:$smtps_port ssl
protocol = smtp
"""


def log(msg):
    sys.stderr.write('[%s] %s\n' % (time.strftime('%H:%M:%S'), msg))
    sys.stderr.flush()


def make_cert(tmp):
    """A self-signed ECDSA P-256 certificate for localhost / 127.0.0.1 (cheap handshakes)."""
    cert, key = os.path.join(tmp, 'soak.pem'), os.path.join(tmp, 'soak.key')
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt',
                    'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', cert,
                    '-days', '2', '-subj', '/CN=localhost',
                    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(p / 100.0 * (len(v) - 1)))))]


class Services:
    """Backends (SMTP with sha256 of DATA) and the auth service, which can be restarted on
    its listening socket (kept open here)."""

    def __init__(self):
        self.procs = {}
        self.ports = {}
        self.auth_sock = None
        self.auth_proc = None
        self.ended = []

    def _spawn(self, proto, lsock, ports=None):
        p = mp.Process(target=servers.serve,
                       args=(proto, '127.0.0.1', 0, ports, None, lsock),
                       kwargs=dict(hash_data=proto == 'smtp', drain_on_term=proto == 'auth'),
                       name='soak-%s' % proto, daemon=True)
        p.start()
        return p

    def start(self):
        for proto in tg.PROTOS:
            ls = servers.listen_socket('127.0.0.1', 0)
            self.ports[proto] = ls.getsockname()[1]
            self.procs[proto] = self._spawn(proto, ls)
            ls.close()
        self.auth_sock = servers.listen_socket('127.0.0.1', 0)
        self.auth_port = self.auth_sock.getsockname()[1]
        self.auth_proc = self._spawn('auth', self.auth_sock, dict(self.ports))

    def restart_auth(self):
        """New process first (same socket), then SIGTERM: the old one stops accepting and
        ends once its accepted requests are answered.  Returns the seconds it took."""
        t = time.monotonic()
        old, self.auth_proc = self.auth_proc, self._spawn('auth', self.auth_sock,
                                                          dict(self.ports))
        old.terminate()
        old.join(5)
        if old.is_alive():
            old.kill()
            old.join(5)
        return time.monotonic() - t

    def stop(self):
        procs = list(self.procs.values()) + [self.auth_proc]
        for p in procs:
            if p is not None and p.is_alive():
                p.terminate()
        for p in procs:
            if p is not None:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        if self.auth_sock is not None:
            self.auth_sock.close()


class Sampler:
    """Peak threads and RSS of the proxy's processes (master + workers, old ones included)."""

    def __init__(self, target):
        self.target = target
        self.peak = dict(threads=0, rss_kb=0, proc_threads=0, proc_rss_kb=0, procs=0)
        self.series = []

    def sample(self, t):
        pids = self.target.pids()
        threads = rss = 0
        for pid in pids:
            th = tg.status_sum([pid], 'Threads:')
            kb = tg.status_sum([pid], 'VmRSS:')
            threads += th
            rss += kb
            self.peak['proc_threads'] = max(self.peak['proc_threads'], th)
            self.peak['proc_rss_kb'] = max(self.peak['proc_rss_kb'], kb)
        self.peak['threads'] = max(self.peak['threads'], threads)
        self.peak['rss_kb'] = max(self.peak['rss_kb'], rss)
        self.peak['procs'] = max(self.peak['procs'], len(pids))
        self.series.append((round(t, 1), len(pids), threads, rss))


def run(args):
    nofile = servers.raise_nofile()        # inherited by the proxy and the clients
    need = 2 * args.idle + args.dribble + 200
    if nofile < need:
        log('RLIMIT_NOFILE %d is below the %d this run needs' % (nofile, need))
    tmp = tempfile.mkdtemp(prefix='mailproxy-soak-')
    os.chmod(tmp, 0o755)
    cert, key = make_cert(tmp)
    cmd = ([sys.executable, os.path.abspath(args.zipapp)] if args.zipapp
           else [sys.executable, os.path.join(tg.REPO, 'mailproxy.py')])
    svc = Services()
    target = None
    procs = []
    out = dict(params=vars(args), nofile=nofile, events={})
    t_begin = time.monotonic()
    try:
        svc.start()
        ssl_ports = {p + 's': tg.free_port() for p in tg.PROTOS}
        template = string.Template(INI).safe_substitute(
            cert=cert, key=key, log_level=args.log_level, extra_main='\n'.join(args.main), extra_mail='\n'.join(args.mail),
            **{k + '_port': v for k, v in ssl_ports.items()})
        target = tg.ProxyTarget('soak', 'mailproxy', str(args.workers), tmp, template,
                                svc.auth_port, cmd=cmd, nofile=nofile)
        target.check()
        target.start()
        ports = dict(target.ports, **ssl_ports)
        log('proxy pid %d, ports %s, backends %s, auth %d, tmp %s, RLIMIT_NOFILE %d'
            % (target.pid, ports, svc.ports, svc.auth_port, tmp, nofile))
        sampler = Sampler(target)
        sampler.sample(0.0)

        d = args.duration
        t0w = time.time()
        end_at = t0w + d
        q = mp.Queue()
        idle_pipe, child_end = mp.Pipe()
        procs.append(mp.Process(target=soak_clients.idle_holder,
                                args=({'imap': ports['imap'], 'imaps': ports['imaps']}, cert,
                                      args.idle, 0.35 * d, args.inflight, child_end),
                                name='soak-idle', daemon=True))
        for i, proto in enumerate(tg.PROTOS):
            procs.append(mp.Process(target=soak_clients.looper,
                                    args=(proto, ports, cert, args.loopers, t0w, end_at,
                                          args.pause, i, q),
                                    name='soak-loop-%s' % proto, daemon=True))
        if args.dribble:
            procs.append(mp.Process(target=soak_clients.dribbler,
                                    args=(ports, args.dribble, end_at, q),
                                    name='soak-dribble', daemon=True))
        for p in procs:
            p.start()
        t0 = time.monotonic()
        errlog = os.path.join(tmp, 'soak-error.log')
        plan = [(0.45 * d, 'hup'), (0.55 * d, 'usr1'), (0.65 * d, 'auth')]
        ready = None
        while time.monotonic() - t0 < d:
            now = time.monotonic() - t0
            sampler.sample(now)
            while plan and plan[0][0] <= now:
                _, what = plan.pop(0)
                if what == 'hup':
                    os.kill(target.pid, signal.SIGHUP)
                elif what == 'usr1':
                    if os.path.exists(errlog):
                        os.rename(errlog, errlog + '.1')
                    os.kill(target.pid, signal.SIGUSR1)
                else:
                    out['events']['auth_restart_s'] = round(svc.restart_auth(), 3)
                out['events'][what] = round(now, 1)
                log('%s at %.1f s' % (what, now))
            if ready is None and idle_pipe.poll(0):
                ready = idle_pipe.recv()[1]
                out['events']['idle_opened'] = round(ready['opened_s'], 1)
                log('idle sessions: %d logged in, %d failed, in %.1f s'
                    % (ready['logged_in'], ready['login_fail'], ready['opened_s']))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0 - now)))
        out['events']['log_reopened'] = os.path.exists(errlog)
        log('end of the run: NOOP on every idle session')
        idle_pipe.send('check')
        final = None
        deadline = time.monotonic() + 40 + (0 if ready else 0.35 * d + 60)
        while time.monotonic() < deadline and (procs[0].is_alive() or idle_pipe.poll(0)):
            if idle_pipe.poll(0.5):
                msg = idle_pipe.recv()
                if msg[0] == 'final':
                    final = msg[1]
                    break
                ready = msg[1]
        results = []
        deadline = time.monotonic() + 100
        want = len(procs) - 1
        while len(results) < want and time.monotonic() < deadline:
            try:
                results.append(q.get(timeout=1))
            except Exception:
                if not any(p.is_alive() for p in procs[1:]) and q.empty():
                    break
        sampler.sample(time.monotonic() - t0)
        out.update(idle=final, loops=[r for k, r in results if k == 'loop'],
                   dribble=next((r for k, r in results if k == 'dribble'), None),
                   peak=sampler.peak, series=sampler.series)
        alerts = []
        for path in (errlog + '.1', errlog):
            if os.path.exists(path):
                with open(path, 'rb') as f:
                    alerts += [ln.decode(errors='replace').rstrip() for ln in f
                               if b'[alert]' in ln or b'[emerg]' in ln or b'[crit]' in ln]
        out['log_alerts'] = alerts[:10]
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)
        if target is not None:
            target.stop()
        svc.stop()
        if args.keep:
            log('kept %s' % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    out['seconds'] = time.monotonic() - t_begin
    return out


def report(out, args):
    idle = out.get('idle') or {}
    loops = out.get('loops') or []
    ev = out['events']
    login_times = list(idle.get('login_times', []))
    for r in loops:
        login_times += r['login_times']
    idle_fail = idle.get('login_fail', args.idle)
    loop_fail = sum(r['login_fail'] for r in loops)
    answered = idle.get('answered', 0)
    logged = idle.get('logged_in', 0)
    cut = logged - answered
    broken = sum(r['broken'] for r in loops)
    lost = sum(r['bytes_lost'] for r in loops)
    closed_times = idle.get('closed_times', [])
    peak = out.get('peak', {})
    worst = max(login_times) if login_times else None
    rows = [
        ('failed legitimate logins', '%d (idle %d of %d, loops %d of %d)'
         % (idle_fail + loop_fail, idle_fail, args.idle, loop_fail,
            sum(r['sessions'] for r in loops)), '0'),
        ('relayed sessions cut', '%d of %d idle (closed by the proxy at %s s); loop sessions '
         'broken after login: %d' % (cut, logged, _times(closed_times), broken), '0'),
        ('bytes lost', '%d (%d MB moved and checked)'
         % (lost, sum(r['bytes_ok'] for r in loops) // 10 ** 6), '0'),
        ('worst login time', '%s s (p99 %s s, %d logins)'
         % (_f(worst), _f(pct(login_times, 99)), len(login_times)), '< 2 s'),
        ('peak threads', '%d in %d processes (one process at most %d)'
         % (peak.get('threads', 0), peak.get('procs', 0), peak.get('proc_threads', 0)),
         'bounded by the caps'),
        ('peak RSS', '%.0f MB (one process at most %.0f MB)'
         % (peak.get('rss_kb', 0) / 1024.0, peak.get('proc_rss_kb', 0) / 1024.0),
         'bounded by the caps'),
    ]
    lines = ['| figure | measured | target |', '|---|---|---|']
    lines += ['| %s | %s | %s |' % r for r in rows]
    notes = []
    notes.append('idle: %d logged in by %s s, NOOP answered %d (%.2f s), unanswered %d'
                 % (logged, ev.get('idle_opened'), answered, idle.get('noop_s', 0),
                    idle.get('unanswered', 0)))
    for r in loops:
        notes.append('loop %s: %d sessions, %d complete' % (r['proto'], r['sessions'], r['ok']))
    dr = out.get('dribble') or {}
    notes.append('dribblers: %d opened, %d closed by the proxy (at %s s), at most %d open '
                 'at once' % (dr.get('opened', 0), dr.get('closed_by_proxy', 0),
                              _times(dr.get('closed_at', [])), dr.get('max_open', 0)))
    notes.append('events: HUP %s s, USR1 %s s (log reopened: %s), auth restart %s s (took %s s)'
                 % (ev.get('hup'), ev.get('usr1'), ev.get('log_reopened'), ev.get('auth'),
                    ev.get('auth_restart_s')))
    errs = {}
    for k, v in (idle.get('fail_kinds') or {}).items():
        errs['idle ' + k] = v
    for r in loops:
        errs.update(r['errors'])
    if errs:
        notes.append('failures: %s' % errs)
    if out.get('log_alerts'):
        notes.append('proxy alerts: %s' % out['log_alerts'])
    return '\n'.join(lines) + '\n\n' + '\n'.join('- ' + n for n in notes)


def _f(v):
    return '-' if v is None else '%.3f' % v


def _times(ts):
    if not ts:
        return '-'
    ts = sorted(ts)
    return '%.1f-%.1f' % (ts[0], ts[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--duration', type=float, default=120.0)
    ap.add_argument('--idle', type=int, default=5000)
    ap.add_argument('--dribble', type=int, default=500)
    ap.add_argument('--quick', action='store_true', help='20 s, 200 idle, 50 dribbling')
    ap.add_argument('--loopers', type=int, default=2, help='looping clients per protocol')
    ap.add_argument('--pause', type=float, default=0.1, help='seconds between loop sessions')
    ap.add_argument('--inflight', type=int, default=32, help='idle logins in flight at most')
    ap.add_argument('--workers', default='1', help='worker_processes')
    ap.add_argument('--main', action='append', default=[], metavar='LINE',
                    help='extra [main] line, e.g. "worker_shutdown_timeout = 10s"')
    ap.add_argument('--mail', action='append', default=[], metavar='LINE',
                    help='extra [mail] line')
    ap.add_argument('--log-level', default='notice', help="the proxy's error_log level")
    ap.add_argument('--zipapp', help='run mailproxy from this zipapp instead of the checkout')
    ap.add_argument('--json', help='also write the raw results here')
    ap.add_argument('--keep', action='store_true', help='keep the temporary folder')
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.idle, args.dribble, args.loopers = 20.0, 200, 50, 1
    args.duration = max(10.0, min(args.duration, 3600.0))
    out = run(args)
    head = ('%s, %d s, commit %s, RLIMIT_NOFILE %d, command: python3 bench/soak.py %s'
            % (time.strftime('%Y-%m-%d %H:%M %Z'), out['seconds'], _commit(),
               out['nofile'], shlex.join(argv if argv is not None else sys.argv[1:])))
    print(head + '\n')
    print(report(out, args))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1, default=str)
    idle = out.get('idle') or {}
    bad = (idle.get('login_fail', 1) or idle.get('logged_in', 0) != idle.get('answered', 0)
           or any(r['login_fail'] or r['broken'] for r in out.get('loops') or []))
    return 1 if bad else 0


def _commit():
    try:
        r = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=tg.REPO,
                           capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=tg.REPO, capture_output=True, text=True, timeout=10).stdout
        return r.stdout.strip() + ('+changes' if dirty.strip() else '')
    except (OSError, subprocess.SubprocessError):
        return '?'


def _terminate(signo, frame):
    raise KeyboardInterrupt


if __name__ == '__main__':
    mp.set_start_method('fork')
    signal.signal(signal.SIGTERM, _terminate)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
