#!/usr/bin/env python3
"""Start-up time: mailproxy and nginx side by side, alternating, from exec to every port
greeting and every worker up (ProxyTarget.start), and stop time.

    python3 bench/startup.py [--rounds 7] [--workers 1] [--zipapp FILE]

Prints the median and the slowest of each, and mailproxy's median as a ratio of nginx's.
Start-up is measured here, never asserted in the tests.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import run       # noqa: E402
import servers   # noqa: E402
import targets as tg   # noqa: E402


def once(target):
    t0 = time.monotonic()
    target.start()
    t1 = time.monotonic()
    target.stop()
    return t1 - t0, time.monotonic() - t1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--rounds', type=int, default=7)
    ap.add_argument('--workers', default='1')
    ap.add_argument('--zipapp')
    args = ap.parse_args()
    nofile = servers.raise_nofile()
    svc = run.Services()
    svc.start()
    with open(os.path.join(BENCH, 'bench.ini')) as f:
        template = f.read()
    cmd = ([sys.executable, os.path.abspath(args.zipapp)] if args.zipapp
           else [sys.executable, os.path.join(tg.REPO, 'mailproxy.py')])
    results = {'mailproxy': [], 'nginx': []}
    try:
        for i in range(args.rounds):
            for kind in (('mailproxy', 'nginx') if i % 2 == 0 else ('nginx', 'mailproxy')):
                tmp = tempfile.mkdtemp(prefix='mailproxy-startup-')
                t = tg.ProxyTarget(kind, kind, args.workers, tmp, template, svc.auth_port,
                                   cmd=cmd if kind == 'mailproxy' else None, nofile=nofile)
                results[kind].append(once(t))
    finally:
        svc.stop()
    print('start-up to every port greeting, %d rounds, worker_processes %s'
          % (args.rounds, args.workers))
    print('%-10s %10s %10s %10s' % ('target', 'median s', 'max s', 'stop s'))
    med = {}
    for kind, runs in results.items():
        starts = [r[0] for r in runs]
        med[kind] = statistics.median(starts)
        print('%-10s %10.3f %10.3f %10.3f' % (kind, med[kind], max(starts),
                                              statistics.median(r[1] for r in runs)))
    print('mailproxy / nginx start-up: %.2fx' % (med['mailproxy'] / med['nginx']))


if __name__ == '__main__':
    main()
