"""`mailproxy -c FILE check`: after the configuration test (cli.py), probe what the
configuration points at (probes.py) and print one line per finding, `SEVERITY  WHAT: TEXT`;
exit status 0 when all is well, 1 with warnings, 2 with errors.

The probes run concurrently in a small thread pool (this is a command, not the master); each
is bounded by its server's `timeout` (auth_http_timeout for the auth service) and all of them
together by GLOBAL_LIMIT. A target several servers share with the same settings is probed once.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Dict, List, Tuple

from . import probes
from .probes import Finding

GLOBAL_LIMIT = 30.0     # seconds for every probe together
WORKERS = 8
PROBE_TIMEOUT = 10.0    # at most this per probe, below a longer `timeout`
EXIT = {"ok": 0, "warn": 1, "error": 2}
USAGE = "usage: mailproxy -c FILE check [--timeout SECONDS]\n"


def probes_of(cfg: Any, limit: float) -> Dict[tuple, Tuple[List[str], Callable[[], List[Finding]]]]:
    """{key: (server names, probe)}: one probe per distinct target and settings."""
    jobs: Dict[tuple, Tuple[List[str], Callable[[], List[Finding]]]] = {}

    def add(key, name, fn):
        if key in jobs:
            if name not in jobs[key][0]:
                jobs[key][0].append(name)
        else:
            jobs[key] = ([name], fn)

    for conf in cfg.servers:
        timeout = min(conf.timeout, limit, PROBE_TIMEOUT)
        auth_timeout = min(conf.auth_http_timeout, limit, PROBE_TIMEOUT)
        for url in conf.auth_http or ():
            add(("auth", url.text, conf.protocol, id(conf._auth_http_tls)), conf.name,
                lambda c=conf, u=url, t=auth_timeout: probes.auth_service(c, u, t))
        for host, port in probes.backend_targets(conf):
            settings = (conf.protocol, conf.proxy_ssl, id(conf._proxy_ssl_context),
                        conf.proxy_ssl_name, conf.xclient, conf.proxy_smtp_auth,
                        tuple(conf.smtp_capabilities), conf.server_name)
            add(("backend", host, port) + settings, conf.name,
                lambda c=conf, h=host, p=port, t=timeout: probes.backend(c, h, p, t))
        for path in conf.ssl_certificate:
            add(("cert", path), conf.name, lambda p=path: probes.own_certificate(p))
    return jobs


def run(cfg: Any, limit: float = GLOBAL_LIMIT) -> List[Tuple[List[str], Finding]]:
    jobs = probes_of(cfg, limit)
    results: List[Tuple[List[str], Finding]] = []
    if not jobs:
        return [([], Finding("ok", "nothing to probe (no auth_http, proxy_pass or "
                                   "certificates)"))]
    pool = ThreadPoolExecutor(max_workers=min(WORKERS, len(jobs)))
    futures = {key: pool.submit(fn) for key, (_names, fn) in jobs.items()}
    wait(list(futures.values()), timeout=limit)
    for key, future in futures.items():
        names = jobs[key][0]
        if not future.done():
            results.append((names, Finding("error", "%s: no result within %gs"
                                           % (" ".join(map(str, key[:3])), limit))))
            continue
        try:
            found = future.result()
        except Exception as e:          # a probe's own failure is reported, not raised
            found = [Finding("error", "%s: probe failed (%s)" % (key[0], e))]
        results.extend((names, f) for f in found)
    pool.shutdown(wait=False, cancel_futures=True)
    return results


def format_line(names: List[str], f: Finding) -> str:
    where = "[server %s] " % ",".join(names) if names else ""
    return "%-5s %s%s" % (f.severity, where, f.text)


def main(cfg: Any, args: List[str]) -> int:
    limit = GLOBAL_LIMIT
    i = 0
    while i < len(args):
        if args[i] == "--timeout" and i + 1 < len(args):
            try:
                limit = float(args[i + 1])
            except ValueError:
                limit = -1
            if not 0 < limit <= 3600:
                sys.stderr.write('mailproxy: invalid "--timeout" value\n' + USAGE)
                return 2
            i += 2
        else:
            sys.stderr.write('mailproxy: invalid option for "check": "%s"\n%s'
                             % (args[i][:64].encode("ascii", "replace").decode(), USAGE))
            return 2
    results = run(cfg, limit)
    worst = 0
    for names, f in results:
        sys.stdout.write(format_line(names, f) + "\n")
        worst = max(worst, EXIT[f.severity])
    sys.stdout.flush()
    return worst
