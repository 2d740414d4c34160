"""The SMTP client host name: reverse then forward DNS, as nginx does it
(ngx_mail_smtp_resolve_addr_handler, then ngx_mail_smtp_resolve_name_handler).

`client_name(ip, conf_resolver, timeout)` gives what XCLIENT `NAME=` and `Client-Host` carry:

* the PTR name of `ip`, when that name is made only of `A-Z a-z 0-9 - .` and one of its A/AAAA
  addresses is `ip` again;
* `[UNAVAILABLE]` when there is no resolver, no PTR record (NXDOMAIN), no such name, or the name
  points elsewhere;
* `[TEMPUNAVAIL]` on any other lookup failure (SERVFAIL, timeout, a PTR answer without a PTR
  record, ...), an invalid PTR name, or a client that has no IP address (UNIX socket).

A CNAME answering the PTR query is followed (RFC 2317 delegations; nginx cannot).

Two back ends:

* `resolver system` (our addition): `socket.gethostbyaddr` then `socket.getaddrinfo`, each run in
  a daemon worker thread with a bounded wait, so a hung system resolver never holds a session
  past `resolver_timeout`;
* `resolver ADDR[:PORT] ...`: `DnsClient`, a small DNS client over UDP (TCP when a reply comes
  back truncated) sending PTR, A and AAAA queries to the configured servers, checking ids and
  questions, moving on to the next server every `RESEND` seconds, and caching positive answers
  for `valid=` or the records' TTL. Thread-safe; one client (and cache) per distinct resolver
  configuration.

With DNS servers each lookup (PTR, then forward) is bounded by `timeout`, as nginx's
`resolver_timeout` is; `resolver system` bounds both lookups together by `timeout`.
"""

from __future__ import annotations

import ipaddress
import random
import selectors
import socket
import struct
import threading
import time
from typing import Any, Callable, Iterable, List, Optional, Tuple, TypeVar, Union

from .log import sanitize

UNAVAILABLE = "[UNAVAILABLE]"
TEMPUNAVAIL = "[TEMPUNAVAIL]"

# nginx's resolver result codes (ngx_resolver_strerror)
FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, TIMEDOUT = 1, 2, 3, 4, 5, 110
_STRERROR = {FORMERR: "Format error", SERVFAIL: "Server failure", NXDOMAIN: "Host not found",
             NOTIMP: "Unimplemented", REFUSED: "Operation refused",
             TIMEDOUT: "Operation timed out"}

RESEND = 5.0            # seconds before a query is sent again to the next server (nginx: 5s)
MAX_CNAME = 8           # CNAME hops followed for a forward lookup

T_A, T_PTR, T_CNAME, T_AAAA = 1, 12, 5, 28
T_OTHER = 0             # parse_response's type for any other record (type 0 is reserved)
_HOST_OK = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Answer = Tuple[int, int, bytes]        # record type, TTL, data (names decoded, addresses raw)
_T = TypeVar("_T")


def strerror(code: int) -> str:
    return _STRERROR.get(code, "Unknown error")


class LogMessage(str):
    """An error-level log message; `.action` is the `while ...` part that goes with it."""

    def __new__(cls, text: str, action: str) -> LogMessage:
        obj = super().__new__(cls, text)
        obj.action = action
        return obj


class LookupFailed(Exception):
    """str(): `CODE: TEXT`, or `text` when given (a failure without an rcode of its own)."""

    def __init__(self, code: int, text: Optional[str] = None) -> None:
        super().__init__(text or "%d: %s" % (code, strerror(code)))
        self.code = code


def valid_host(name: Union[str, bytes]) -> bool:
    """nginx 1.29.7+: a PTR name must be non-empty and only `A-Z a-z 0-9 - .`."""
    if isinstance(name, str):
        try:
            name = name.encode("ascii")
        except UnicodeEncodeError:
            return False
    return bool(name) and all(c in _HOST_OK for c in name)


def _normalise(ip):
    """An ipaddress object for `ip` (IPv4-mapped IPv6 becomes IPv4), or None."""
    if not ip:
        return None
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def client_name(ip: Optional[str], conf_resolver: Any, timeout: float
                ) -> Tuple[str, Optional[LogMessage]]:
    """(host or marker, LogMessage or None) for a client address."""
    if conf_resolver is None or conf_resolver == "off":
        return UNAVAILABLE, None
    addr = _normalise(ip)
    if addr is None:
        return TEMPUNAVAIL, None            # UNIX-socket client
    if conf_resolver == "system":
        reverse, forward = _system_reverse, _system_forward
    else:
        client = client_for(conf_resolver)
        reverse, forward = client.reverse, client.forward
    text = str(ip)
    started = time.monotonic()
    try:
        name = reverse(addr, timeout)
    except LookupFailed as e:
        msg = LogMessage("%s could not be resolved (%s)" % (text, e), "in resolving client address")
        return (UNAVAILABLE if e.code == NXDOMAIN else TEMPUNAVAIL), msg
    if not valid_host(name):
        shown = name if isinstance(name, str) else name.decode("latin-1")
        return TEMPUNAVAIL, LogMessage('%s resolved to invalid host name "%s"'
                                       % (text, _printable(shown)),
                                       "in resolving client address")
    if conf_resolver == "system":
        # Ours: the machine's resolver gets one budget for both steps, so a slow one never
        # holds the session past resolver_timeout in all.
        timeout = max(timeout - (time.monotonic() - started), 0.0)
    try:
        addrs = forward(name, timeout)
    except LookupFailed as e:
        msg = LogMessage('"%s" could not be resolved (%d: %s)' % (name, e.code, strerror(e.code)),
                         "in resolving client hostname")
        return (UNAVAILABLE if e.code == NXDOMAIN else TEMPUNAVAIL), msg
    for a in addrs:
        if _normalise(str(a)) == addr:
            return name, None
    return UNAVAILABLE, None


def _printable(text):
    # the PTR name is the client's to choose: escaped like any client text (log.sanitize)
    return sanitize(text, 256)


# ------------------------------------------------------------------------------------------------
# resolver system

_system_slots = threading.BoundedSemaphore(64)    # at most this many lookups hung at once


def bounded(func: Callable[[], _T], timeout: float) -> _T:
    """Run func() in a daemon thread; its result, its exception, or LookupFailed(TIMEDOUT)
    after `timeout` (also backend.py's name lookups)."""
    deadline = time.monotonic() + timeout
    if not _system_slots.acquire(timeout=max(timeout, 0)):
        raise LookupFailed(TIMEDOUT)
    box = {}
    done = threading.Event()

    def work():
        try:
            box["value"] = func()
        except BaseException as e:      # handed to the waiting session
            box["error"] = e
        finally:
            _system_slots.release()
            done.set()

    threading.Thread(target=work, name="resolver-system", daemon=True).start()
    if not done.wait(max(deadline - time.monotonic(), 0)):
        raise LookupFailed(TIMEDOUT)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _herror_code(e):
    # netdb.h: HOST_NOT_FOUND 1, TRY_AGAIN 2, NO_RECOVERY 3, NO_DATA 4
    err = e.args[0] if e.args else None
    if err in (1, 4):
        return NXDOMAIN
    return SERVFAIL


def _gaierror_code(e):
    noname = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n)}
    if e.errno in noname:
        return NXDOMAIN
    return SERVFAIL


def _system_reverse(addr, timeout):
    def lookup():
        try:
            return socket.gethostbyaddr(str(addr))[0]
        except socket.herror as e:
            raise LookupFailed(_herror_code(e)) from None
        except socket.gaierror as e:
            raise LookupFailed(_gaierror_code(e)) from None
        except OSError:
            raise LookupFailed(SERVFAIL) from None
    name = bounded(lookup, timeout)
    return name[:-1] if name.endswith(".") and len(name) > 1 else name


def _system_forward(name, timeout):
    def lookup():
        try:
            infos = socket.getaddrinfo(name, None, 0, socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise LookupFailed(_gaierror_code(e)) from None
        except (OSError, UnicodeError):
            raise LookupFailed(SERVFAIL) from None
        return [info[4][0] for info in infos]
    return bounded(lookup, timeout)


# ------------------------------------------------------------------------------------------------
# resolver ADDR ...: a small DNS client

_clients = {}
_clients_lock = threading.Lock()


def client_for(conf: Any) -> DnsClient:
    """The shared DnsClient (with its cache) for a `resolver` configuration object."""
    servers = tuple((str(h), int(p)) for h, p in conf.servers)
    key = (servers, conf.valid or 0, conf.ipv4, conf.ipv6)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = DnsClient(servers, valid=key[1], ipv4=key[2], ipv6=key[3])
        return client


def reverse_name(addr: IPAddress) -> str:
    """The in-addr.arpa / ip6.arpa name for an ipaddress object."""
    return addr.reverse_pointer


def encode_name(name: str) -> bytes:
    out = bytearray()
    name = name.rstrip(".")
    if name:
        for label in name.split("."):
            raw = label.encode("ascii")
            if not raw or len(raw) > 63:
                raise ValueError("bad label in %r" % name)
            out.append(len(raw))
            out += raw
    out.append(0)
    if len(out) > 255:
        raise ValueError("name too long")
    return bytes(out)


def build_query(ident: int, name: str, qtype: int) -> bytes:
    # RD set, as nginx sends it
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + encode_name(name) \
        + struct.pack("!HH", qtype, 1)


class BadResponse(Exception):
    pass


def read_name(msg: bytes, off: int) -> Tuple[bytes, int]:
    """(labels as bytes joined by '.', offset after the name) with compression pointers."""
    labels = []
    end = None
    hops = 0
    total = 0
    while True:
        if off >= len(msg):
            raise BadResponse("short name")
        n = msg[off]
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(msg):
                raise BadResponse("short pointer")
            if end is None:
                end = off + 2
            off = ((n & 0x3F) << 8) | msg[off + 1]
            hops += 1
            if hops > 64:
                raise BadResponse("pointer loop")
            continue
        if n & 0xC0:
            raise BadResponse("bad label type")
        off += 1
        if n == 0:
            break
        if off + n > len(msg):
            raise BadResponse("short label")
        labels.append(bytes(msg[off:off + n]))
        total += n + 1
        if total > 255:
            raise BadResponse("name too long")
        off += n
    return b".".join(labels), (end if end is not None else off)


def parse_response(msg: bytes, ident: int, qname: str, qtype: int
                   ) -> Tuple[int, bool, List[Answer]]:
    """(rcode, truncated, answers) for a reply to our query, or raise BadResponse.

    answers: list of (type, ttl, data) where data is bytes (names decoded, addresses raw).
    """
    if len(msg) < 12:
        raise BadResponse("short response")
    rid, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", msg[:12])
    if rid != ident:
        raise BadResponse("wrong id")
    if flags & 0xF870 != 0x8000:            # a response, standard query, Z bits clear
        raise BadResponse("not a response")
    if qd != 1:
        raise BadResponse("invalid number of questions")
    name, off = read_name(msg, 12)
    if off + 4 > len(msg):
        raise BadResponse("short question")
    rtype, rclass = struct.unpack("!HH", msg[off:off + 4])
    off += 4
    if rtype != qtype or rclass != 1 or name.lower() != qname.rstrip(".").lower().encode():
        raise BadResponse("question mismatch")
    rcode = flags & 0x000F
    truncated = bool(flags & 0x0200)
    answers = []
    if rcode == 0 and not truncated:
        for _ in range(an):
            _owner, off = read_name(msg, off)
            if off + 10 > len(msg):
                raise BadResponse("short answer")
            atype, aclass, ttl, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
            off += 10
            if off + rdlen > len(msg):
                raise BadResponse("short rdata")
            rdata = msg[off:off + rdlen]
            if aclass == 1:
                if ttl & 0x80000000:
                    ttl = 0
                if atype in (T_PTR, T_CNAME):
                    data, _ = read_name(msg, off)
                    answers.append((atype, ttl, data))
                elif atype == T_A and rdlen == 4:
                    answers.append((atype, ttl, bytes(rdata)))
                elif atype == T_AAAA and rdlen == 16:
                    answers.append((atype, ttl, bytes(rdata)))
                else:
                    answers.append((T_OTHER, ttl, b""))
            else:
                answers.append((T_OTHER, ttl, b""))
            off += rdlen
    return rcode, truncated, answers


class DnsClient:
    """PTR / A / AAAA lookups against fixed servers, with a positive-answer cache."""

    def __init__(self, servers: Iterable[Tuple[str, int]], valid: float = 0, ipv4: bool = True,
                 ipv6: bool = True, resend: Optional[float] = None) -> None:
        self.servers = [(str(h), int(p)) for h, p in servers]
        self.valid = valid or 0
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.resend = RESEND if resend is None else resend
        self._cache = {}                    # (name.lower(), qtype) -> (expires, answers)
        self._lock = threading.Lock()
        self._next = 0                      # round-robin start server

    # ---- public ----------------------------------------------------------------------------

    def reverse(self, addr: Union[IPAddress, str], timeout: float) -> str:
        """The PTR name (str) of an ipaddress object; LookupFailed on failure.

        An answer with a CNAME but no PTR (classless in-addr.arpa delegation, RFC 2317) is
        followed a few hops, which nginx cannot; an answer of other types only is a temporary
        failure, as nginx's ngx_resolver_process_ptr ("no PTR type in DNS response") makes it.
        """
        if not isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            addr = _normalise(str(addr))
        deadline = time.monotonic() + timeout
        name = reverse_name(addr)
        for _ in range(MAX_CNAME):
            answers = self.query(name, T_PTR, deadline)
            for atype, _ttl, data in answers:
                if atype == T_PTR:
                    return data.decode("latin-1")
            if not answers:
                raise LookupFailed(NXDOMAIN)
            cnames = [data for atype, _ttl, data in answers if atype == T_CNAME]
            if not cnames:
                break
            name = cnames[-1].decode("latin-1")
        raise LookupFailed(SERVFAIL, "no PTR type in DNS response")

    def forward(self, name: str, timeout: float) -> List[str]:
        """Addresses (str) of `name` from A (ipv4=on) and AAAA (ipv6=on); LookupFailed if none."""
        deadline = time.monotonic() + timeout
        qtypes = [t for t, on in ((T_A, self.ipv4), (T_AAAA, self.ipv6)) if on]
        results = {}
        errors = []

        def one(qtype):
            try:
                results[qtype] = self._follow(name, qtype, deadline)
            except LookupFailed as e:
                errors.append(e)

        threads = [threading.Thread(target=one, args=(t,), daemon=True) for t in qtypes[1:]]
        for t in threads:
            t.start()
        if qtypes:
            one(qtypes[0])
        for t in threads:
            t.join(max(deadline - time.monotonic(), 0) + 0.5)
        if errors:
            # nginx: an error on either query is the result (a timeout first, if any)
            codes = [e.code for e in errors]
            raise LookupFailed(TIMEDOUT if TIMEDOUT in codes else codes[0])
        addrs = []
        for qtype in qtypes:
            for atype, _ttl, data in results.get(qtype, ()):
                if atype == T_A:
                    addrs.append(str(ipaddress.IPv4Address(data)))
                elif atype == T_AAAA:
                    addrs.append(str(ipaddress.IPv6Address(data)))
        if not addrs:
            raise LookupFailed(NXDOMAIN)
        return addrs

    # ---- internals --------------------------------------------------------------------------

    def _follow(self, name, qtype, deadline):
        """Answers of `qtype` for name, following CNAMEs a few hops."""
        for _ in range(MAX_CNAME):
            answers = self.query(name, qtype, deadline)
            wanted = [a for a in answers if a[0] == qtype]
            if wanted:
                return wanted
            cnames = [a for a in answers if a[0] == T_CNAME]
            if not cnames:
                return []
            name = cnames[-1][2].decode("latin-1")
            if not valid_host(name):
                return []
        return []

    def query(self, name: str, qtype: int, deadline: float) -> List[Answer]:
        """Answer records for (name, qtype), from the cache or the servers."""
        key = (name.lower().rstrip("."), qtype)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                if hit[0] > now:
                    return hit[1]
                del self._cache[key]
        try:
            encode_name(name)
        except (ValueError, UnicodeError):
            raise LookupFailed(FORMERR) from None
        rcode, answers = self._ask(name, qtype, deadline)
        if rcode:
            raise LookupFailed(rcode)
        if not answers:
            return []       # NOERROR without data: "no such record" to the caller, not cached
        ttl = self.valid or min(a[1] for a in answers)
        if ttl > 0:
            with self._lock:
                if len(self._cache) > 10000:
                    self._purge(now)
                self._cache[key] = (time.monotonic() + ttl, answers)
        return answers

    def _purge(self, now):
        for k in [k for k, v in self._cache.items() if v[0] <= now]:
            del self._cache[k]
        if len(self._cache) > 10000:
            self._cache.clear()

    def _ask(self, name, qtype, deadline):
        """Send the query, moving to the next server every `resend` seconds; (rcode, answers)."""
        if not self.servers:
            raise LookupFailed(SERVFAIL)
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.servers)
        n = len(self.servers)
        order = [self.servers[(start + i) % n] for i in range(n)]
        dead = set()                        # servers that refused (send error, ICMP)
        sel = selectors.DefaultSelector()
        socks = []
        try:
            attempt = 0
            next_send = 0.0
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise LookupFailed(TIMEDOUT)
                if now >= next_send:
                    live = [s for s in order if s not in dead]
                    if not live:
                        if not sel.get_map():
                            raise LookupFailed(SERVFAIL)
                        next_send = deadline         # only wait for what is outstanding
                    else:
                        server = live[attempt % len(live)]
                        attempt += 1
                        if self._send(sel, socks, server, name, qtype) is None:
                            dead.add(server)
                            continue
                        next_send = now + self.resend
                wait = min(deadline, next_send) - time.monotonic()
                for key, _ in sel.select(max(wait, 0)):
                    sock, ident, server = key.data
                    try:
                        msg = sock.recv(65535)
                    except BlockingIOError:
                        continue
                    except OSError:
                        # ICMP port unreachable and the like: this server is out, go on
                        sel.unregister(sock)
                        dead.add(server)
                        next_send = time.monotonic()
                        continue
                    try:
                        rcode, truncated, answers = parse_response(msg, ident, name, qtype)
                    except BadResponse:
                        continue                # not ours / garbage: keep waiting
                    if truncated:
                        got = self._tcp(server, name, qtype, deadline)
                        if got is None:
                            continue
                        rcode, answers = got
                    return rcode, answers
        finally:
            sel.close()
            for s in socks:
                s.close()

    def _send(self, sel, socks, server, name, qtype):
        host, port = server
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ident = random.getrandbits(16)
        try:
            s = socket.socket(family, socket.SOCK_DGRAM)
        except OSError:
            return None
        try:
            s.setblocking(False)
            s.connect((host, port))
            s.send(build_query(ident, name, qtype))
        except OSError:
            s.close()
            return None
        socks.append(s)
        sel.register(s, selectors.EVENT_READ, (s, ident, server))
        return s

    def _tcp(self, server, name, qtype, deadline):
        host, port = server
        ident = random.getrandbits(16)
        query = build_query(ident, name, qtype)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            with socket.create_connection((host, port), timeout=remaining) as s:
                s.settimeout(max(deadline - time.monotonic(), 0.001))
                s.sendall(struct.pack("!H", len(query)) + query)
                head = _recv_exact(s, 2)
                msg = _recv_exact(s, struct.unpack("!H", head)[0])
            rcode, _trunc, answers = parse_response(msg, ident, name, qtype)
        except (OSError, BadResponse):
            return None
        return rcode, answers


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OSError("closed")
        buf += chunk
    return bytes(buf)
