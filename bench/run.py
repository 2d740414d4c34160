#!/usr/bin/env python3
"""mailproxy against nginx's mail proxy, on loopback, in one command.

    python3 bench/run.py [--quick] [--targets mailproxy,mailproxyauto,nginx1,nginxauto,direct]
        (also mailproxyka0: auth_http_keepalive = 0; mailproxycache: auth_http_cache on)
                         [--scenarios throughput,rate,idle] [--zipapp FILE] [--ini FILE]
                         [--reps N] [--json FILE]

Starts (all on 127.0.0.1, each in a process of its own): scripted IMAP, POP3 and SMTP
backends, an auth_http service, the proxies under test from one INI (bench/bench.ini), and
the load generator (multiprocessing).  Targets alternate A B A B over the repetitions of each
case; every figure is reported as median [min-max] and as a ratio to nginx1's median from the
same run.  See bench/README.md.
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import load      # noqa: E402
import servers   # noqa: E402
import targets as tg   # noqa: E402
import tls_cases       # noqa: E402

ALL_TARGETS = ['mailproxy', 'mailproxyauto', 'nginx1', 'nginxauto', 'direct']
ALL_SCENARIOS = ['throughput', 'rate', 'idle'] + tls_cases.KINDS
REFERENCE = 'nginx1'
# mailproxy with one worker and one directive added to bench.ini's [mail]: the auth_http
# client's figures beside `mailproxy` (keep-alive at its default, no cache) and nginx1
VARIANTS = {'mailproxyka0': 'auth_http_keepalive = 0',
            'mailproxycache': 'auth_http_cache = valid=5m size=100000'}


def log(msg):
    sys.stderr.write('[%s] %s\n' % (time.strftime('%H:%M:%S'), msg))
    sys.stderr.flush()


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    k = min(len(v) - 1, max(0, int(round(p / 100.0 * (len(v) - 1)))))
    return v[k]


# ---------------------------------------------------------------------------------------------
# the fixed services

class Services:
    def __init__(self):
        self.procs = []
        self.backend_ports = {}
        self.auth_port = None

    def _spawn(self, proto, ports=None):
        lsock = servers.listen_socket('127.0.0.1', 0)
        port = lsock.getsockname()[1]
        p = mp.Process(target=servers.serve, args=(proto, '127.0.0.1', port, ports, None, lsock),
                       name='bench-%s' % proto, daemon=True)
        p.start()
        lsock.close()
        self.procs.append(p)
        return port

    def start(self):
        for proto in tg.PROTOS:
            self.backend_ports[proto] = self._spawn(proto)
        self.auth_port = self._spawn('auth', dict(self.backend_ports))

    def cpu(self):
        return tg.cpu_seconds([p.pid for p in self.procs])

    def stop(self):
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(5)


# ---------------------------------------------------------------------------------------------
# scenarios (one measurement of one target)

def measure_throughput(target, proto, nsess, size, direct, port=None, tls=None):
    port = port or target.ports[proto]
    barrier = mp.Barrier(nsess + 1)
    q = mp.Queue()
    procs = [mp.Process(target=load.throughput_worker,
                        args=(proto, port, size, direct, barrier, q, i, tls), daemon=True)
             for i in range(nsess)]
    for p in procs:
        p.start()
    res = []
    cpu0 = cpu1 = None
    try:
        barrier.wait(60)            # all logged in
        cpu0 = target.cpu()
        barrier.wait(60)            # go
    except Exception:
        pass
    deadline = time.monotonic() + 300
    while len(res) < nsess and time.monotonic() < deadline:
        try:
            res.append(q.get(timeout=1))
        except Exception:
            if not any(p.is_alive() for p in procs) and q.empty():
                break
    cpu1 = target.cpu()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.terminate()
            p.join(5)
    ok = [r for r in res if r[1]]
    errors = nsess - len(ok)
    err_text = [r[5] for r in res if not r[1]][:3]
    if not ok:
        return dict(errors=errors, error_text=err_text)
    t0 = min(r[2] for r in ok)
    t1 = max(r[3] for r in ok)
    total = sum(r[4] for r in ok)
    out = dict(mbps=total / 1e6 / max(t1 - t0, 1e-9), errors=errors, error_text=err_text,
               seconds=t1 - t0, mb=total / 1e6)
    if cpu0 is not None and cpu1 is not None:
        out['cpu_ms_per_mb'] = (cpu1 - cpu0) * 1000.0 / (total / 1e6)
    return out


def split(n, parts):
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def measure_rate(target, proto, conc, duration, direct, nproc, port=None, make_loop=load.Loop,
                 steps=None):
    port = port or target.ports[proto]
    q = mp.Queue()
    shares = [c for c in split(conc, nproc) if c]
    # TLS resumption: each process first makes the session it resumes (before the window)
    start_at = time.time() + (0.3 if make_loop is load.Loop else 1.0)
    procs = [mp.Process(target=load.rate_worker,
                        args=(proto, port, direct, c, start_at, duration, 1000000, q, i,
                              make_loop, steps),
                        daemon=True) for i, c in enumerate(shares)]
    for p in procs:
        p.start()
    while time.time() < start_at:
        time.sleep(0.005)
    cpu0 = target.cpu()
    res = []
    deadline = time.monotonic() + duration + 30
    while len(res) < len(procs) and time.monotonic() < deadline:
        try:
            res.append(q.get(timeout=1)[1])
        except Exception:
            if not any(p.is_alive() for p in procs) and q.empty():
                break
    cpu1 = target.cpu()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.terminate()
            p.join(5)
    lat = []
    for r in res:
        lat.extend(r['latencies'])
    ok = sum(r['ok'] for r in res)
    in_window = sum(r['in_window'] for r in res)
    kinds = {}
    for r in res:
        for k, v in r['error_kinds'].items():
            kinds[k] = kinds.get(k, 0) + v
    out = dict(rate=in_window / duration, ok=ok,
               errors=sum(r['errors'] for r in res) + (len(procs) - len(res)),
               error_kinds=kinds,
               p50_ms=(pct(lat, 50) or 0) * 1000, p99_ms=(pct(lat, 99) or 0) * 1000)
    if cpu0 is not None and ok:
        out['cpu_us_per_session'] = (cpu1 - cpu0) * 1e6 / ok
    handshakes = sum(r.get('handshakes', 0) for r in res)
    if handshakes:
        out['resumed_pct'] = 100.0 * sum(r.get('reused', 0) for r in res) / handshakes
    return out


def measure_idle(target, proto, count, direct, nproc, port=None, make_loop=load.Loop,
                 steps=None):
    port = port or target.ports[proto]
    target.start()
    time.sleep(0.3)
    rss0 = target.rss_kb()
    thr0 = target.threads()
    shares = [c for c in split(count, nproc) if c]
    pipes = []
    procs = []
    for i, c in enumerate(shares):
        a, b = mp.Pipe()
        p = mp.Process(target=load.idle_worker,
                       args=(proto, port, direct, c, 16, b, i, make_loop, steps), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)

    def collect(kind, timeout):
        out = []
        deadline = time.monotonic() + timeout
        for a in pipes:
            left = deadline - time.monotonic()
            if left > 0 and a.poll(left):
                try:
                    msg = a.recv()
                except EOFError:
                    continue
                if msg[0] == kind:
                    out.append(msg[1])
        return out

    out = dict(count=count)
    try:
        ready = collect('ready', 150)
        held = sum(r['idle'] for r in ready)
        open_s = max((r['open_s'] for r in ready), default=None)
        kinds = {}
        for r in ready:
            for k, v in r['error_kinds'].items():
                kinds[k] = kinds.get(k, 0) + v
        time.sleep(1.0)
        rss1 = target.rss_kb()
        thr1 = target.threads()
        fds = target.fds() if target.is_proxy else None
        for a in pipes:
            a.send(('noop', time.time() + 0.3))
        noop = collect('noop', 90)
        answered = sum(r['answered'] for r in noop)

        for r in noop:
            for k, v in r['error_kinds'].items():
                kinds[k] = kinds.get(k, 0) + v
        noop_s = (max(r['last_wall'] for r in noop) - min(r['start_wall'] for r in noop)
                  if noop else None)
        for a in pipes:
            a.send(('close', None))
        collect('closed', 60)
        out.update(held=held, open_s=open_s, noop_s=noop_s, answered=answered,
                   errors=(count - answered), error_kinds=kinds, fds=fds)
        if target.is_proxy:
            out.update(rss_mb=rss1 / 1024.0, threads=thr1, threads_before=thr0,
                       rss_kb_per_session=(rss1 - rss0) / max(1, held))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
        if target.is_proxy:
            target.stop()
    return out


# ---------------------------------------------------------------------------------------------
# table

FIGURES = {
    # key: (label, format, higher is better)
    'mbps': ('MB/s', '%.0f', True),
    'cpu_ms_per_mb': ('proxy CPU ms/MB', '%.2f', False),
    'rate': ('sessions/s', '%.0f', True),
    'p50_ms': ('p50 ms', '%.1f', False),
    'p99_ms': ('p99 ms', '%.1f', False),
    'cpu_us_per_session': ('proxy CPU us/session', '%.0f', False),
    'held': ('sessions held', '%.0f', True),
    'errors': ('errors', '%.0f', False),
    'open_s': ('time to open all, s', '%.2f', False),
    'noop_s': ('NOOP on all, s', '%.3f', False),
    'rss_kb_per_session': ('RSS KB/session', '%.1f', False),
    'rss_mb': ('RSS total MB', '%.1f', False),
    'threads': ('threads', '%.0f', False),
    'resumed_pct': ('resumed %', '%.0f', True),
}

CASE_FIGURES = {
    'throughput': ['mbps', 'cpu_ms_per_mb', 'errors'],
    'rate': ['rate', 'p50_ms', 'p99_ms', 'cpu_us_per_session', 'errors'],
    'idle': ['held', 'errors', 'open_s', 'noop_s', 'rss_kb_per_session', 'rss_mb', 'threads'],
}
CASE_FIGURES['tls-throughput'] = CASE_FIGURES['throughput']
CASE_FIGURES['tls-rate'] = CASE_FIGURES['rate'][:-1] + ['resumed_pct', 'errors']
CASE_FIGURES['tls-idle'] = CASE_FIGURES['idle']


def cell(values, key, ref):
    vals = [v for v in values if v is not None]
    if not vals:
        return '-'
    if key == 'errors':
        return '%d' % sum(vals)
    fmt = FIGURES[key][1]
    med = statistics.median(vals)
    text = fmt % med
    if len(vals) > 1:
        text += ' [%s-%s]' % (fmt % min(vals), fmt % max(vals))
    if ref and key != 'errors':
        text += ' (%.2fx)' % (med / ref) if ref else ''
    return text


def table(results, target_names):
    """Markdown table: one row per (case, figure), one column per target."""
    lines = ['| case | figure | ' + ' | '.join(target_names) + ' |',
             '|---|---|' + '---|' * len(target_names)]
    for case in results['order']:
        kind = results['cases'][case]['kind']
        per_target = results['cases'][case]['runs']
        for key in CASE_FIGURES[kind]:
            cols = []
            ref_vals = [r.get(key) for r in per_target.get(REFERENCE, []) if r.get(key) is not None]
            ref = statistics.median(ref_vals) if ref_vals else None
            any_value = False
            for t in target_names:
                vals = [r.get(key) for r in per_target.get(t, [])]
                if any(v is not None for v in vals):
                    any_value = True
                cols.append(cell(vals, key, ref if t != REFERENCE else None))
            if not any_value:
                continue
            lines.append('| %s | %s | %s |' % (case, FIGURES[key][0], ' | '.join(cols)))
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------

def with_main(template, directives):
    """The INI template with `KEY=VALUE` lines added at the top of its [main] section."""
    extra = ''.join('%s = %s\n' % tuple(x.strip() for x in d.split('=', 1))
                    for d in directives)
    if not extra:
        return template
    head, sep, rest = template.partition('[main]\n')
    if not sep:
        raise SystemExit('bench: no [main] section to add %s to' % ', '.join(directives))
    return head + sep + extra + rest


def machine():
    model = ''
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        ngv = subprocess.run(['nginx', '-v'], capture_output=True, text=True).stderr.strip()
    except OSError:
        ngv = 'nginx: not installed'
    return dict(nproc=os.cpu_count(), cpu=model, python=platform.python_version(),
                nginx=ngv.replace('nginx version: ', ''), kernel=platform.release(),
                nofile=resource.getrlimit(resource.RLIMIT_NOFILE))


def _variant(template, name):
    """The INI template of target `name`: VARIANTS' directive added first in [mail]."""
    extra = VARIANTS.get(name)
    if extra is None:
        return template
    return template.replace('[mail]\n', '[mail]\n%s\n' % extra, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='small version of everything (~2 min)')
    ap.add_argument('--targets', default=','.join(ALL_TARGETS))
    ap.add_argument('--scenarios', default=','.join(ALL_SCENARIOS),
                    help='throughput, rate, idle, tls-throughput, tls-rate, tls-idle (or a case '
                    'name such as rate-imap-c16)')
    ap.add_argument('--zipapp', help='run mailproxy from this zipapp instead of the checkout')
    ap.add_argument('--ini', default=os.path.join(BENCH, 'bench.ini'))
    ap.add_argument('--tls-ini', default=os.path.join(BENCH, 'bench-tls.ini'),
                    help='the INI of the tls-* scenarios')
    ap.add_argument('--main', action='append', default=[], metavar='KEY=VALUE',
                    help='add a [main] directive to both INIs (e.g. worker_cpu_affinity=auto); '
                         'both proxies get it')
    ap.add_argument('--no-quickack', action='store_true',
                    help='tls-rate/tls-idle clients with delayed ACKs (as most clients)')
    ap.add_argument('--reps', type=int, help='repetitions of each case')
    ap.add_argument('--json', help='also write the raw results here')
    ap.add_argument('--keep', action='store_true', help='keep the temporary folder')
    args = ap.parse_args(argv)

    target_names = [t.strip() for t in args.targets.split(',') if t.strip()]
    for t in target_names:
        if t not in ALL_TARGETS and t not in VARIANTS:
            ap.error('unknown target %r (known: %s)'
                     % (t, ', '.join(ALL_TARGETS + list(VARIANTS))))
    wanted = [s.strip() for s in args.scenarios.split(',') if s.strip()]

    nofile = servers.raise_nofile()       # inherited by the proxies and the generator
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    max_idle = max(100, (min(hard, 1 << 20) - 40) // 2)
    ncpu = os.cpu_count() or 1
    if args.quick:
        p = dict(size=10 ** 7, tp_sessions=[1, 8], tp_reps=2, rate_conc=[16, 64],
                 rate_duration=0.5, rate_reps=2, idle_counts=[200, 1000], idle_reps=1)
    else:
        p = dict(size=10 ** 8, tp_sessions=[1, 8], tp_reps=3, rate_conc=[16, 64],
                 rate_duration=2.0, rate_reps=3, idle_counts=[1000, 5000, max_idle], idle_reps=2)
    p['tls'] = tls_cases.params(args.quick, max_idle)
    if args.reps:
        p.update(tp_reps=args.reps, rate_reps=args.reps, idle_reps=args.reps)
        p['tls'].update(tp_reps=args.reps, rate_reps=args.reps, idle_reps=args.reps)
    gen_procs = max(2, ncpu)

    with open(args.ini) as f:
        template = with_main(f.read(), args.main)

    cases = []
    for proto in tg.PROTOS:
        for n in p['tp_sessions']:
            cases.append(('throughput', '%s-%s-x%d' % (proto, 'FETCH' if proto == 'imap' else
                                                         'RETR' if proto == 'pop3' else 'DATA', n),
                          proto, n, p['tp_reps'], None))
    for proto in tg.PROTOS:
        for c in p['rate_conc']:
            cases.append(('rate', 'rate-%s-c%d' % (proto, c), proto, c, p['rate_reps'], None))
    for n in p['idle_counts']:
        cases.append(('idle', 'idle-imap-%d' % n, 'imap', n, p['idle_reps'], None))
    cases += tls_cases.cases(p['tls'])
    cases = [c for c in cases if c[0] in wanted or c[1] in wanted]
    use_tls = any(c[0].startswith('tls-') for c in cases)
    if use_tls:
        with open(args.tls_ini) as f:
            tls_template = with_main(f.read(), args.main)
    tmp = tempfile.mkdtemp(prefix='mailproxy-bench-')
    os.chmod(tmp, 0o755)
    mp_cmd = ([sys.executable, os.path.abspath(args.zipapp)] if args.zipapp
              else [sys.executable, os.path.join(tg.REPO, 'mailproxy.py')])
    svc = Services()
    tgts = {}
    ttgts = {}          # the same targets on bench-tls.ini
    results = dict(machine=machine(), params=p, command=' '.join(['python3', 'bench/run.py']
                                                                  + (argv or sys.argv[1:])),
                   date=time.strftime('%Y-%m-%d %H:%M:%S %Z'), order=[], cases={})
    t_begin = time.monotonic()
    try:
        svc.start()
        if use_tls:     # both proxies read the same two certificates
            os.makedirs(os.path.join(tmp, 'tls'))
            fields = tls_cases.make_certs(tmp)
        log('backends %s, auth_http %d, tmp %s, RLIMIT_NOFILE %d'
            % (svc.backend_ports, svc.auth_port, tmp, nofile))
        for name in target_names:
            if name == 'direct':
                tgts[name] = tg.Direct(svc.backend_ports)
                continue
            kind = 'mailproxy' if name.startswith('mailproxy') else 'nginx'
            if kind == 'nginx' and not shutil.which('nginx'):
                log('nginx not installed: target %s skipped' % name)
                continue
            workers = {'mailproxy': '1', 'mailproxyauto': 'auto', 'nginx1': '1',
                       'nginxauto': 'auto'}.get(name, '1')
            t = tg.ProxyTarget(name, kind, workers, tmp, _variant(template, name), svc.auth_port,
                               cmd=mp_cmd, nofile=nofile)
            t.check()
            tgts[name] = t
            if use_tls:
                t = tg.ProxyTarget(name, kind, workers, os.path.join(tmp, 'tls'),
                                   _variant(tls_template, name),
                                   svc.auth_port, cmd=mp_cmd, nofile=nofile, fields=fields)
                t.check()
                ttgts[name] = t
        groups = {'plain': tgts, 'tls': ttgts}

        def tls_kw(kind, t, extra):
            return tls_cases.kwargs(kind, t, extra, quickack=not args.no_quickack)

        running = set()         # (group, name)
        for kind, case, proto, n, reps, extra in cases:
            group = 'tls' if kind.startswith('tls-') else 'plain'
            pool = groups[group]
            names = [n_ for n_ in target_names if n_ in pool]
            # throughput and rate run on started targets; idle starts one per measurement
            want = set() if kind.endswith('idle') else {(group, n_) for n_ in names}
            for key in sorted(running - want):
                groups[key[0]][key[1]].stop()
                running.discard(key)
            for key in sorted(want - running):
                groups[key[0]][key[1]].start()
                running.add(key)
            results['order'].append(case)
            entry = results['cases'][case] = dict(kind=kind, runs={})
            for rep in range(reps):
                order = names if rep % 2 == 0 else names[::-1]
                for name in order:
                    t = pool[name]
                    direct = name == 'direct'
                    t0 = time.monotonic()
                    try:
                        if kind == 'throughput':
                            r = measure_throughput(t, proto, n, p['size'], direct)
                        elif kind == 'rate':
                            r = measure_rate(t, proto, n, p['rate_duration'], direct, gen_procs)
                        elif kind == 'idle':
                            r = measure_idle(t, proto, n, direct, max(2, (n + 2499) // 2500))
                        elif kind == 'tls-throughput':
                            r = measure_throughput(t, proto, n, p['tls']['size'], False,
                                                   **tls_kw(kind, t, extra))
                        elif kind == 'tls-rate':
                            r = measure_rate(t, proto, n, p['tls']['rate_duration'], False,
                                             gen_procs, **tls_kw(kind, t, extra))
                        else:
                            r = measure_idle(t, proto, n, False, max(2, (n + 2499) // 2500),
                                             **tls_kw(kind, t, extra))
                    except Exception as e:      # one failed measurement does not end the run
                        log('%s rep %d %s FAILED: %s' % (case, rep + 1, name, e))
                        r = dict(errors=n, error_text=[str(e)[:300]])
                        if not kind.endswith('idle'):
                            try:
                                t.stop()
                                t.start()
                            except Exception as e2:
                                log('restart of %s failed: %s' % (name, e2))
                    r['wall'] = time.monotonic() - t0
                    entry['runs'].setdefault(name, []).append(r)
                    short = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                             if k in ('mbps', 'cpu_ms_per_mb', 'rate', 'p99_ms',
                                      'cpu_us_per_session', 'held', 'noop_s',
                                      'rss_kb_per_session', 'threads', 'errors',
                                      'resumed_pct')}
                    log('%s rep %d %s: %s' % (case, rep + 1, name, short))
                    if r.get('errors') and (r.get('error_kinds') or r.get('error_text')):
                        log('   errors: %s' % (r.get('error_kinds') or r.get('error_text')))
        for key in list(running):
            groups[key[0]][key[1]].stop()
    except KeyboardInterrupt:
        log('interrupted')
    finally:
        for t in list(tgts.values()) + list(ttgts.values()):
            t.stop()
        svc.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    results['seconds'] = time.monotonic() - t_begin
    m = results['machine']
    print('\n%s, %s CPUs (%s), Python %s, nginx %s, RLIMIT_NOFILE %s; %.0f s'
          % (results['date'], m['nproc'], m['cpu'], m['python'], m['nginx'], m['nofile'][0],
             results['seconds']))
    print('command: %s' % results['command'])
    print('median [min-max] (ratio to %s) over %s repetitions; %s\n'
          % (REFERENCE, '/'.join(str(p[k]) for k in ('tp_reps', 'rate_reps', 'idle_reps')),
             'throughput %d MB per session' % (p['size'] // 10 ** 6)))
    if use_tls:
        print('TLS: %d MB per session; median over %s repetitions'
              % (p['tls']['size'] // 10 ** 6,
                 '/'.join(str(p['tls'][k]) for k in ('tp_reps', 'rate_reps', 'idle_reps'))))
    print(table(results, [n for n in target_names if n in tgts]))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1, default=str)
    return 0


def _terminate(signo, frame):
    raise KeyboardInterrupt


if __name__ == '__main__':
    mp.set_start_method('fork')
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
