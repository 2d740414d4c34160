"""One mailproxy worker under short-session load, with a profiler attached: the tool behind
bench/README.md's profiles of the session rate.

    python3 bench/rate_profile.py [--ini FILE] [--main KEY=VALUE ...] [--proto imap] [--conc 16]
                             [--duration 6] [--profiler "perf stat -e context-switches -p PID"]

Starts the bench backends and auth service, mailproxy with one worker on the INI (default
bench/bench.ini; `--main` adds [main] keys as bench/run.py does), keeps `--conc` sessions in
flight for `--duration` seconds, runs the profiler command one second in with PID replaced by
the worker's pid (bounded: it is killed after the run), and prints the rate, errors, p50/p99 and
proxy CPU per session.  Everything on 127.0.0.1; the processes it started are stopped by pid.
"""

import argparse
import multiprocessing as mp
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))

from bench import run, targets as tg  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ini", default=os.path.join(BENCH, "bench.ini"))
    ap.add_argument("--main", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--proto", default="imap", choices=tg.PROTOS)
    ap.add_argument("--conc", type=int, default=16)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--profiler", default="", help='a command; PID is the worker\'s pid')
    args = ap.parse_args(argv)
    with open(args.ini) as f:
        template = run.with_main(f.read(), args.main)
    tmp = tempfile.mkdtemp(prefix="mailproxy-profile-")
    svc = run.Services()
    svc.start()
    target = tg.ProxyTarget("mailproxy", "mailproxy", 1, tmp, template, svc.auth_port,
                            cmd=[sys.executable, os.path.join(tg.REPO, "mailproxy.py")],
                            nofile=4096)
    prof = None
    try:
        target.start()
        time.sleep(0.5)
        worker = [p for p in tg.descendants(target.pid) if p != target.pid][0]
        out = {}
        load = threading.Thread(target=lambda: out.update(run.measure_rate(
            target, args.proto, args.conc, args.duration, False, 2)))
        load.start()
        time.sleep(1.0)
        if args.profiler:
            cmd = shlex.split(args.profiler.replace("PID", str(worker)))
            prof = subprocess.Popen(cmd)
        load.join()
        if prof is not None:
            try:
                prof.wait(max(1.0, args.duration))
            except subprocess.TimeoutExpired:
                prof.terminate()
                prof.wait(5)
        print({k: out.get(k) for k in ("rate", "errors", "p50_ms", "p99_ms",
                                         "cpu_us_per_session")})
    finally:
        if prof is not None and prof.poll() is None:
            prof.kill()
        target.stop()
        svc.stop()


if __name__ == "__main__":
    mp.set_start_method("fork")
    main()
