#!/usr/bin/env python3
"""Where does mailproxy spend its CPU?  Profile one worker under one bench load.

    python3 bench/hotspots.py [--load rate|throughput] [--proto imap|pop3|smtp] [--seconds 8]
                             [--conc 16] [--workers 1] [--pyspy PATH] [--zipapp FILE]

Starts the bench's backends and auth_http service and mailproxy from bench/bench.ini, runs the
load for --seconds, and meanwhile
  * samples /proc per thread of the worker (CPU split: relay thread, listener threads, main,
    and exited handler threads = process total minus live threads), and
  * if py-spy is available (--pyspy, or on PATH; `pip install py-spy`), records the worker with
    `py-spy record --format raw` and prints the functions with the most samples (self and
    inclusive).
"""

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import run       # noqa: E402
import servers   # noqa: E402
import targets as tg   # noqa: E402


def top(raw_path, n=30):
    self_c = {}
    incl = {}
    threads = {}
    total = 0
    with open(raw_path) as f:
        for line in f:
            line = line.rstrip('\n')
            if not line:
                continue
            stack, _, count = line.rpartition(' ')
            try:
                c = int(count)
            except ValueError:
                continue
            frames = stack.split(';')
            total += c
            thread = frames[0] if frames and frames[0].startswith(('thread', 'process')) else '?'
            threads[thread] = threads.get(thread, 0) + c
            fr = [x for x in frames if not x.startswith(('thread', 'process'))]
            if not fr:
                continue
            self_c[fr[-1]] = self_c.get(fr[-1], 0) + c
            for x in set(fr):
                incl[x] = incl.get(x, 0) + c
    out = ['py-spy: %d samples (CPU only, idle excluded)' % total, '', 'by thread:']
    for k, v in sorted(threads.items(), key=lambda kv: -kv[1])[:10]:
        out.append('  %5.1f%%  %s' % (100.0 * v / max(total, 1), k))
    out += ['', 'self:']
    for k, v in sorted(self_c.items(), key=lambda kv: -kv[1])[:n]:
        out.append('  %5.1f%%  %s' % (100.0 * v / max(total, 1), k))
    out += ['', 'inclusive:']
    for k, v in sorted(incl.items(), key=lambda kv: -kv[1])[:n]:
        out.append('  %5.1f%%  %s' % (100.0 * v / max(total, 1), k))
    return '\n'.join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--load', default='rate', choices=['rate', 'throughput'])
    ap.add_argument('--proto', default='imap', choices=list(tg.PROTOS))
    ap.add_argument('--seconds', type=float, default=8.0)
    ap.add_argument('--conc', type=int, default=16, help='rate: clients; throughput: sessions')
    ap.add_argument('--workers', default='1')
    ap.add_argument('--pyspy', default=shutil.which('py-spy'))
    ap.add_argument('--rate', type=int, default=250, help='py-spy samples per second')
    ap.add_argument('--zipapp')
    args = ap.parse_args()
    servers.raise_nofile()
    tmp = tempfile.mkdtemp(prefix='mailproxy-prof-')
    svc = run.Services()
    svc.start()
    with open(os.path.join(BENCH, 'bench.ini')) as f:
        template = f.read()
    cmd = ([sys.executable, os.path.abspath(args.zipapp)] if args.zipapp
           else [sys.executable, os.path.join(tg.REPO, 'mailproxy.py')])
    t = tg.ProxyTarget('mailproxy', 'mailproxy', args.workers, tmp, template, svc.auth_port,
                       cmd=cmd, nofile=servers.raise_nofile())
    spy = None
    try:
        t.start()
        workers = [p for p in t.pids() if p != t.pid]
        wpid = workers[0]
        before = tg.thread_cpu(wpid)
        total0 = tg.cpu_seconds([wpid])
        raw = os.path.join(tmp, 'profile.raw')
        if args.pyspy:
            spy = subprocess.Popen([args.pyspy, 'record', '-p', str(wpid), '-r', str(args.rate),
                                    '-d', str(int(args.seconds)), '-f', 'raw', '-o', raw,
                                    '--threads', '--nonblocking'],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
        t0 = time.monotonic()
        done = {'sessions': 0, 'mb': 0.0}
        while time.monotonic() - t0 < args.seconds:
            if args.load == 'rate':
                r = run.measure_rate(t, args.proto, args.conc, min(2.0, args.seconds), False, 2)
                done['sessions'] += r['ok']
            else:
                r = run.measure_throughput(t, args.proto, args.conc, 10 ** 8, False)
                done['mb'] += r.get('mb', 0)
        after = tg.thread_cpu(wpid)
        total1 = tg.cpu_seconds([wpid])
        print('load: %s %s conc %d for %.1f s: %s' % (args.load, args.proto, args.conc,
                                                      time.monotonic() - t0, done))
        live = 0.0
        print('worker %d CPU %.2f s; per live thread:' % (wpid, total1 - total0))
        for name, v in sorted(after.items(), key=lambda kv: -(kv[1] - before.get(kv[0], 0))):
            d = v - before.get(name, 0)
            live += d
            print('  %-28s %.2f s' % (name, d))
        print('  %-28s %.2f s' % ('(exited threads)', (total1 - total0) - live))
        if done['sessions']:
            print('CPU per session: %.0f us' % ((total1 - total0) * 1e6 / done['sessions']))
        if done['mb']:
            print('CPU per MB: %.2f ms' % ((total1 - total0) * 1e3 / done['mb']))
        if spy is not None:
            try:
                _, err = spy.communicate(timeout=args.seconds + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
            spy = None
            if os.path.exists(raw):
                print()
                print(top(raw))
            else:
                print('py-spy wrote nothing: %s' % err.decode(errors='replace')[-500:])
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        t.stop()
        svc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    mp.set_start_method('fork')
    main()
