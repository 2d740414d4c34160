"""bench/run.py's TLS scenarios: the certificates, the cases and what each needs from the
generator (load_tls.py).  The proxies run bench/bench-tls.ini (mailproxy as is, nginx through
nginx_conf.py), which names the ports used here.

* tls-throughput  implicit TLS (TLS 1.3, ECDSA), like `throughput`: IMAP FETCH, POP3 RETR,
                  SMTP DATA, 1 and 8 sessions.
* tls-rate        implicit-TLS IMAP sessions (handshake, greeting, LOGIN, LOGOUT, the close):
                  full handshakes of new clients with the RSA and with the ECDSA certificate
                  (TLS 1.3), resumed by session ID (TLS 1.2, no tickets) and by ticket
                  (TLS 1.3), both with the ECDSA certificate (a resumption signs nothing).
* tls-idle        logged-in IMAP sessions over implicit TLS and over STARTTLS (ECDSA), then
                  NOOP on all, like `idle`.
"""

import functools
import os
import subprocess

import load_tls

KINDS = ['tls-throughput', 'tls-rate', 'tls-idle']
# (case name part, port of bench-tls.ini, client context mode)
RATE_MODES = [('full-rsa', 'imaps_rsa', 'full'), ('full-ecdsa', 'imaps', 'full'),
              ('resumed-id', 'imaps', 'id'), ('resumed-ticket', 'imaps', 'ticket')]


def make_certs(tmp):
    """Self-signed RSA 2048 and ECDSA P-256 certificates in tmp; bench-tls.ini's fields."""
    out = {}
    for kind, newkey in (('rsa', ['-newkey', 'rsa:2048']),
                         ('ecdsa', ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256'])):
        cert, key = os.path.join(tmp, kind + '.pem'), os.path.join(tmp, kind + '.key')
        subprocess.run(['openssl', 'req', '-x509'] + newkey
                       + ['-nodes', '-keyout', key, '-out', cert, '-days', '2',
                          '-subj', '/CN=localhost',
                          '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'],
                       check=True, capture_output=True, timeout=60)
        out[kind + '_cert'], out[kind + '_key'] = cert, key
    return out


def params(quick, max_idle):
    if quick:
        return dict(size=10 ** 7, tp_sessions=[1, 8], tp_reps=2, rate_conc=[16],
                    rate_duration=0.5, rate_reps=2, idle_counts=[200], idle_reps=1)
    return dict(size=10 ** 8, tp_sessions=[1, 8], tp_reps=3, rate_conc=[16, 64],
                rate_duration=2.0, rate_reps=3, idle_counts=[1000, 5000, max_idle], idle_reps=2)


def cases(p):
    """[(kind, case, proto, n, reps, extra)] as run.py's plain cases, extra for kwargs()."""
    out = []
    for proto, verb in (('imap', 'FETCH'), ('pop3', 'RETR'), ('smtp', 'DATA')):
        for n in p['tp_sessions']:
            out.append(('tls-throughput', 'tls-%s-%s-x%d' % (proto, verb, n), proto, n,
                        p['tp_reps'], dict(port=proto + 's')))
    for name, port, mode in RATE_MODES:
        for c in p['rate_conc']:
            out.append(('tls-rate', 'tls-rate-%s-c%d' % (name, c), 'imap', c, p['rate_reps'],
                        dict(port=port, mode=mode)))
    for n in p['idle_counts']:
        for starttls in (False, True):
            out.append(('tls-idle', 'tls-idle-%s-%d' % ('starttls' if starttls else 'imaps', n),
                        'imap', n, p['idle_reps'],
                        dict(port='imap' if starttls else 'imaps', starttls=starttls)))
    return out


def kwargs(kind, target, extra, quickack=True):
    """The measure_* keyword arguments of one TLS case against one target (the generator
    processes are forked: contexts and loop factories are passed as they are).  quickack: the
    event-loop clients ACK at once (load_tls.TLSLoop)."""
    port = target.ports[extra['port']]
    if kind == 'tls-throughput':
        return dict(port=port, tls=load_tls.client_context('full'))
    if kind == 'tls-rate':
        mode = extra['mode']
        return dict(port=port, steps=load_tls.rate_steps(),
                    make_loop=functools.partial(load_tls.TLSLoop,
                                                ctx=load_tls.client_context(mode),
                                                resume=mode != 'full', quickack=quickack))
    starttls = extra['starttls']
    return dict(port=port, steps=load_tls.idle_steps(starttls),
                make_loop=functools.partial(load_tls.TLSLoop,
                                            ctx=load_tls.client_context('full'),
                                            implicit=not starttls, quickack=quickack))
