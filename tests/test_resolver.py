"""mailproxy.resolver: client host names for SMTP against a scripted DNS server."""

import ipaddress
import socket
import struct
import threading
import time
from types import SimpleNamespace

import pytest

from mailproxy import resolver
from mailproxy.resolver import (T_A, T_AAAA, T_CNAME, T_PTR, TEMPUNAVAIL, UNAVAILABLE, DnsClient,
                                client_name)
from tests.support.dns import DnsServer, wire_name


def conf(*servers, valid=0, ipv4=True, ipv6=True):
    return SimpleNamespace(servers=[s.address if isinstance(s, DnsServer) else s
                                    for s in servers], valid=valid, ipv4=ipv4, ipv6=ipv6)


PTR_127 = "1.0.0.127.in-addr.arpa"


@pytest.fixture(autouse=True)
def fresh_clients(monkeypatch):
    """Each test gets its own DnsClient caches."""
    monkeypatch.setattr(resolver, "_clients", {})


# ------------------------------------------------------------------------------------------------
# client_name with `resolver ADDR`

def test_no_resolver_is_unavailable():
    assert client_name("127.0.0.1", None, 1) == (UNAVAILABLE, None)
    assert client_name("127.0.0.1", "off", 1) == (UNAVAILABLE, None)


def test_unix_client_is_tempunavail(dns):
    assert client_name(None, conf(dns()), 1) == (TEMPUNAVAIL, None)
    assert client_name("unix:", conf(dns()), 1) == (TEMPUNAVAIL, None)


def test_reverse_and_forward_agree(dns):
    srv = dns({(PTR_127, T_PTR): [(T_PTR, 60, "client.example.test")],
               ("client.example.test", T_A): [(T_A, 60, "127.0.0.1")],
               ("client.example.test", T_AAAA): 0})
    assert client_name("127.0.0.1", conf(srv), 2) == ("client.example.test", None)
    assert (PTR_127, T_PTR) in srv.queries
    assert ("client.example.test", T_A) in srv.queries
    assert ("client.example.test", T_AAAA) in srv.queries


def test_forward_points_elsewhere(dns):
    srv = dns({(PTR_127, T_PTR): [(T_PTR, 60, "client.example.test")],
               ("client.example.test", T_A): [(T_A, 60, "127.0.0.2"), (T_A, 60, "10.0.0.1")],
               ("client.example.test", T_AAAA): [(T_AAAA, 60, "::1")]})
    assert client_name("127.0.0.1", conf(srv), 2) == (UNAVAILABLE, None)


def test_one_of_several_addresses_matches(dns):
    srv = dns({(PTR_127, T_PTR): [(T_PTR, 60, "c.example")],
               ("c.example", T_A): [(T_A, 60, "10.0.0.1"), (T_A, 60, "127.0.0.1")],
               ("c.example", T_AAAA): 0})
    assert client_name("127.0.0.1", conf(srv), 2) == ("c.example", None)


def test_ptr_nxdomain(dns):
    srv = dns({(PTR_127, T_PTR): 3})
    host, msg = client_name("127.0.0.1", conf(srv), 2)
    assert host == UNAVAILABLE
    assert msg == "127.0.0.1 could not be resolved (3: Host not found)"
    assert msg.action == "in resolving client address"


def test_ptr_noerror_without_answer_is_nxdomain(dns):
    srv = dns({(PTR_127, T_PTR): []})
    assert client_name("127.0.0.1", conf(srv), 2) == (
        UNAVAILABLE, "127.0.0.1 could not be resolved (3: Host not found)")


def test_ptr_servfail(dns):
    srv = dns({(PTR_127, T_PTR): 2})
    host, msg = client_name("127.0.0.1", conf(srv), 2)
    assert (host, msg) == (TEMPUNAVAIL, "127.0.0.1 could not be resolved (2: Server failure)")


def test_ptr_refused(dns):
    srv = dns({(PTR_127, T_PTR): 5})
    assert client_name("127.0.0.1", conf(srv), 2) == (
        TEMPUNAVAIL, "127.0.0.1 could not be resolved (5: Operation refused)")


@pytest.mark.parametrize("records", [[(T_A, 60, "10.0.0.1")], [(16, 60, "txt")],
                                     [(T_AAAA, 60, "::1"), (T_A, 60, "10.0.0.1")]])
def test_ptr_answer_of_wrong_type_is_tempunavail(dns, records):
    # nginx: "no PTR type in DNS response", the lookup then times out ([TEMPUNAVAIL])
    srv = dns({(PTR_127, T_PTR): records})
    host, msg = client_name("127.0.0.1", conf(srv), 2)
    assert (host, msg) == (TEMPUNAVAIL,
                           "127.0.0.1 could not be resolved (no PTR type in DNS response)")
    assert msg.action == "in resolving client address"
    assert not any(q[1] in (T_A, T_AAAA) for q in srv.queries)   # no forward lookup


CLASSLESS = "1.0/25.0.0.127.in-addr.arpa"     # RFC 2317 delegation of a part of a /24


def test_ptr_cname_is_followed(dns):
    srv = dns({(PTR_127, T_PTR): [(T_CNAME, 60, CLASSLESS)],
               (CLASSLESS, T_PTR): [(T_PTR, 60, "c.example")],
               ("c.example", T_A): [(T_A, 60, "127.0.0.1")], ("c.example", T_AAAA): []})
    assert client_name("127.0.0.1", conf(srv), 2) == ("c.example", None)
    assert srv.queries[:2] == [(PTR_127, T_PTR), (CLASSLESS, T_PTR)]


def test_ptr_cname_with_its_ptr_in_the_same_answer(dns):
    srv = dns({(PTR_127, T_PTR): [(T_CNAME, 60, CLASSLESS), (T_PTR, 60, "c.example")],
               ("c.example", T_A): [(T_A, 60, "127.0.0.1")], ("c.example", T_AAAA): []})
    assert client_name("127.0.0.1", conf(srv), 2) == ("c.example", None)
    assert (CLASSLESS, T_PTR) not in srv.queries


def test_ptr_cname_to_nothing_and_cname_loop(dns):
    srv = dns({(PTR_127, T_PTR): [(T_CNAME, 60, CLASSLESS)], (CLASSLESS, T_PTR): 3})
    assert client_name("127.0.0.1", conf(srv), 2)[0] == UNAVAILABLE
    srv = dns({(PTR_127, T_PTR): [(T_CNAME, 60, CLASSLESS)],
               (CLASSLESS, T_PTR): [(T_CNAME, 60, PTR_127)]})
    assert client_name("127.0.0.1", conf(srv), 2) == (
        TEMPUNAVAIL, "127.0.0.1 could not be resolved (no PTR type in DNS response)")
    assert len(srv.queries) <= resolver.MAX_CNAME


def test_ptr_timeout_is_bounded(dns):
    srv = dns({(PTR_127, T_PTR): "drop"})
    t0 = time.monotonic()
    host, msg = client_name("127.0.0.1", conf(srv), 0.4)
    took = time.monotonic() - t0
    assert (host, msg) == (TEMPUNAVAIL,
                           "127.0.0.1 could not be resolved (110: Operation timed out)")
    assert 0.35 <= took < 1.5


@pytest.mark.parametrize("bad", ["bad_name.example", "evil.example NAME=x", "x\"y",
                                 "a\r\nRCPT TO:<x>"])
def test_ptr_invalid_host_name(dns, bad):
    srv = dns({(PTR_127, T_PTR): [(T_PTR, 60, bad)]})
    host, msg = client_name("127.0.0.1", conf(srv), 2)
    assert host == TEMPUNAVAIL
    assert msg.startswith('127.0.0.1 resolved to invalid host name "')
    assert "\r" not in msg and "\n" not in msg
    assert msg.action == "in resolving client address"
    assert not any(q[1] in (T_A, T_AAAA) for q in srv.queries)   # no forward lookup


def test_forward_nxdomain(dns):
    srv = dns({(PTR_127, T_PTR): [(T_PTR, 60, "gone.example")]})
    host, msg = client_name("127.0.0.1", conf(srv), 2)
    assert host == UNAVAILABLE
    assert msg == '"gone.example" could not be resolved (3: Host not found)'
    assert msg.action == "in resolving client hostname"


def test_forward_both_empty_is_nxdomain(dns):
    srv = dns({(PTR_127, T_PTR): [(T_PTR, 60, "empty.example")],
               ("empty.example", T_A): [], ("empty.example", T_AAAA): []})
    assert client_name("127.0.0.1", conf(srv), 2) == (
        UNAVAILABLE, '"empty.example" could not be resolved (3: Host not found)')


def test_forward_servfail(dns):
    srv = dns({(PTR_127, T_PTR): [(T_PTR, 60, "c.example")],
               ("c.example", T_A): 2, ("c.example", T_AAAA): 0})
    assert client_name("127.0.0.1", conf(srv), 2) == (
        TEMPUNAVAIL, '"c.example" could not be resolved (2: Server failure)')


def test_forward_timeout(dns):
    srv = dns({(PTR_127, T_PTR): [(T_PTR, 60, "c.example")],
               ("c.example", T_A): "drop", ("c.example", T_AAAA): "drop"})
    t0 = time.monotonic()
    assert client_name("127.0.0.1", conf(srv), 0.4) == (
        TEMPUNAVAIL, '"c.example" could not be resolved (110: Operation timed out)')
    assert time.monotonic() - t0 < 1.5


def test_ipv6_client(dns):
    rev = ipaddress.ip_address("2001:db8::5").reverse_pointer
    srv = dns({(rev, T_PTR): [(T_PTR, 60, "six.example")],
               ("six.example", T_A): [],
               ("six.example", T_AAAA): [(T_AAAA, 60, "2001:db8:0:0::5")]})
    assert client_name("2001:db8::5", conf(srv), 2) == ("six.example", None)


def test_ipv4_mapped_client_uses_in_addr_arpa(dns):
    srv = dns({(PTR_127, T_PTR): [(T_PTR, 60, "c.example")],
               ("c.example", T_A): [(T_A, 60, "127.0.0.1")], ("c.example", T_AAAA): []})
    assert client_name("::ffff:127.0.0.1", conf(srv), 2) == ("c.example", None)


def test_ipv4_off_queries_only_aaaa(dns):
    srv = dns({(PTR_127, T_PTR): [(T_PTR, 60, "c.example")],
               ("c.example", T_A): [(T_A, 60, "127.0.0.1")],
               ("c.example", T_AAAA): [(T_AAAA, 60, "::1")]})
    assert client_name("127.0.0.1", conf(srv, ipv4=False), 2) == (UNAVAILABLE, None)
    assert ("c.example", T_A) not in srv.queries


def test_ipv6_off_queries_only_a(dns):
    srv = dns({(PTR_127, T_PTR): [(T_PTR, 60, "c.example")],
               ("c.example", T_A): [(T_A, 60, "127.0.0.1")]})
    assert client_name("127.0.0.1", conf(srv, ipv6=False), 2) == ("c.example", None)
    assert ("c.example", T_AAAA) not in srv.queries


def test_cname_followed(dns):
    srv = dns({(PTR_127, T_PTR): [(T_PTR, 60, "alias.example")],
               ("alias.example", T_A): [(T_CNAME, 60, "real.example")],
               ("real.example", T_A): [(T_A, 60, "127.0.0.1")],
               ("alias.example", T_AAAA): []})
    assert client_name("127.0.0.1", conf(srv), 2) == ("alias.example", None)


def test_wrong_id_and_garbage_are_ignored(dns):
    def sneaky(name, qtype, ident, question):
        return [b"garbage",
                DnsServer.reply((ident + 1) & 0xFFFF, question,
                                records=[(T_PTR, 60, "forged.example")]),
                DnsServer.reply(ident, question, flags=0x0100),       # not a response
                DnsServer.reply(ident, question, records=[(T_PTR, 60, "real.example")])]
    srv = dns({(PTR_127, T_PTR): sneaky,
               ("real.example", T_A): [(T_A, 60, "127.0.0.1")], ("real.example", T_AAAA): []})
    assert client_name("127.0.0.1", conf(srv), 2) == ("real.example", None)


def test_reply_for_another_question_is_ignored(dns):
    def other(name, qtype, ident, question):
        wrong = wire_name("2.0.0.127.in-addr.arpa") + struct.pack("!HH", T_PTR, 1)
        return [DnsServer.reply(ident, wrong, records=[(T_PTR, 60, "forged.example")])]
    srv = dns({(PTR_127, T_PTR): other})
    assert client_name("127.0.0.1", conf(srv), 0.3)[0] == TEMPUNAVAIL


def test_next_server_after_silence(dns, monkeypatch):
    monkeypatch.setattr(resolver, "RESEND", 0.2)
    silent = dns(default="drop")
    good = dns({(PTR_127, T_PTR): [(T_PTR, 60, "c.example")],
                ("c.example", T_A): [(T_A, 60, "127.0.0.1")], ("c.example", T_AAAA): []})
    cfg = conf(silent, good)
    t0 = time.monotonic()
    assert client_name("127.0.0.1", cfg, 3) == ("c.example", None)
    assert time.monotonic() - t0 < 2
    assert silent.queries and good.queries


def test_unreachable_server_moves_on(dns):
    # a closed UDP port answers with ICMP: the next server is asked at once
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()
    s.close()
    good = dns({(PTR_127, T_PTR): [(T_PTR, 60, "c.example")],
                ("c.example", T_A): [(T_A, 60, "127.0.0.1")], ("c.example", T_AAAA): []})
    client = DnsClient([dead, good.address], resend=10)
    t0 = time.monotonic()
    assert client.reverse(ipaddress.ip_address("127.0.0.1"), 3) == "c.example"
    assert time.monotonic() - t0 < 2


def test_truncated_reply_retried_over_tcp(dns):
    srv = dns({(PTR_127, T_PTR): "truncated"}, tcp=True)
    srv.tcp_zone[(PTR_127, T_PTR)] = [(T_PTR, 60, "tcp.example")]
    client = DnsClient([srv.address])
    assert client.reverse(ipaddress.ip_address("127.0.0.1"), 2) == "tcp.example"
    assert srv.tcp_queries == [(PTR_127, T_PTR)]


def test_answers_cached_for_ttl(dns):
    srv = dns({(PTR_127, T_PTR): [(T_PTR, 60, "c.example")],
               ("c.example", T_A): [(T_A, 60, "127.0.0.1")], ("c.example", T_AAAA): []})
    cfg = conf(srv)
    assert client_name("127.0.0.1", cfg, 2) == ("c.example", None)
    n = len(srv.queries)
    assert client_name("127.0.0.1", cfg, 2) == ("c.example", None)
    # positive answers come from the cache; the empty AAAA answer is asked again
    assert len(srv.queries) == n + 1
    assert srv.queries[-1] == ("c.example", T_AAAA)


def test_ttl_zero_not_cached_and_valid_overrides(dns):
    zone = {(PTR_127, T_PTR): [(T_PTR, 0, "c.example")],
            ("c.example", T_A): [(T_A, 0, "127.0.0.1")], ("c.example", T_AAAA): []}
    srv = dns(zone)
    client_name("127.0.0.1", conf(srv), 2)
    n = len(srv.queries)
    client_name("127.0.0.1", conf(srv), 2)
    assert len(srv.queries) == 2 * n
    srv2 = dns(zone)
    client_name("127.0.0.1", conf(srv2, valid=30), 2)
    n = len(srv2.queries)
    client_name("127.0.0.1", conf(srv2, valid=30), 2)
    assert len(srv2.queries) == n + 1          # only the empty AAAA again


def test_cache_expires(dns):
    srv = dns({(PTR_127, T_PTR): [(T_PTR, 1, "c.example")]})
    client = DnsClient([srv.address])
    addr = ipaddress.ip_address("127.0.0.1")
    client.reverse(addr, 2)
    client.reverse(addr, 2)
    assert len(srv.queries) == 1
    key = (PTR_127, T_PTR)
    exp, ans = client._cache[key]
    client._cache[key] = (time.monotonic() - 1, ans)
    client.reverse(addr, 2)
    assert len(srv.queries) == 2


def test_failures_not_cached(dns):
    srv = dns({(PTR_127, T_PTR): 2})
    cfg = conf(srv)
    client_name("127.0.0.1", cfg, 2)
    client_name("127.0.0.1", cfg, 2)
    assert len(srv.queries) == 2


def test_concurrent_lookups(dns):
    zone = {}
    for i in range(1, 21):
        ip = "127.0.1.%d" % i
        zone[(ipaddress.ip_address(ip).reverse_pointer, T_PTR)] = [(T_PTR, 60, "h%d.example" % i)]
        zone[("h%d.example" % i, T_A)] = [(T_A, 60, ip)]
        zone[("h%d.example" % i, T_AAAA)] = [(T_AAAA, 60, "::1")]
    srv = dns(zone)
    cfg = conf(srv)
    results = {}

    def one(i):
        results[i] = client_name("127.0.1.%d" % i, cfg, 3)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(1, 21)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: ("h%d.example" % i, None) for i in range(1, 21)}


def test_parse_rejects_pointer_loop():
    msg = struct.pack("!HHHHHH", 7, 0x8180, 1, 0, 0, 0) + b"\xc0\x0c"
    with pytest.raises(resolver.BadResponse):
        resolver.parse_response(msg, 7, "x.example", T_A)


def test_encode_name_limits():
    assert resolver.encode_name("a.bc") == b"\x01a\x02bc\x00"
    with pytest.raises(ValueError):
        resolver.encode_name("a" * 64 + ".example")
    with pytest.raises(ValueError):
        resolver.encode_name("a..b")


# ------------------------------------------------------------------------------------------------
# resolver system

def test_system_resolves_loopback():
    host, msg = client_name("127.0.0.1", "system", 5)
    # whatever the machine calls 127.0.0.1, its forward lookup must give 127.0.0.1 back
    assert msg is None, msg
    assert host not in (UNAVAILABLE, TEMPUNAVAIL)
    assert resolver.valid_host(host)
    addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    assert "127.0.0.1" in addrs


def test_system_slow_resolver_is_bounded(monkeypatch):
    release = threading.Event()

    def slow(ip):
        release.wait(5)
        return ("late.example", [], [ip])
    monkeypatch.setattr(socket, "gethostbyaddr", slow)
    t0 = time.monotonic()
    try:
        host, msg = client_name("127.0.0.1", "system", 0.3)
    finally:
        release.set()
    assert time.monotonic() - t0 < 1.0
    assert (host, msg) == (TEMPUNAVAIL,
                           "127.0.0.1 could not be resolved (110: Operation timed out)")


def test_system_not_found(monkeypatch):
    def nf(ip):
        raise socket.herror(1, "Unknown host")
    monkeypatch.setattr(socket, "gethostbyaddr", nf)
    assert client_name("127.0.0.1", "system", 1) == (
        UNAVAILABLE, "127.0.0.1 could not be resolved (3: Host not found)")


def test_system_try_again(monkeypatch):
    def ta(ip):
        raise socket.herror(2, "Host name lookup failure")
    monkeypatch.setattr(socket, "gethostbyaddr", ta)
    assert client_name("127.0.0.1", "system", 1) == (
        TEMPUNAVAIL, "127.0.0.1 could not be resolved (2: Server failure)")


def test_system_forward_mismatch_and_bad_name(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyaddr", lambda ip: ("elsewhere.example", [], [ip]))
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda *a, **k: [(socket.AF_INET, 1, 6, "", ("10.9.9.9", 0))])
    assert client_name("127.0.0.1", "system", 1) == (UNAVAILABLE, None)
    monkeypatch.setattr(socket, "gethostbyaddr", lambda ip: ("bad host", [], [ip]))
    assert client_name("127.0.0.1", "system", 1) == (
        TEMPUNAVAIL, '127.0.0.1 resolved to invalid host name "bad host"')


def test_system_forward_not_found(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyaddr", lambda ip: ("gone.example", [], [ip]))

    def gai(*a, **k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", gai)
    assert client_name("127.0.0.1", "system", 1) == (
        UNAVAILABLE, '"gone.example" could not be resolved (3: Host not found)')
