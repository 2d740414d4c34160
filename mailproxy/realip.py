"""PROXY protocol from a load balancer (`listen ... proxy_protocol`) and `set_real_ip_from`:
trust and the session's side.  The wire format (parse, the messages of a broken header) is in
proxy_protocol.py.

As nginx's ngx_mail_proxy_protocol_handler (ngx_proxy_protocol_read) and ngx_mail_realip_module:

* the header is read before anything else -- before the greeting and before the TLS handshake
  of an `ssl` listener -- within `timeout`;
* one peek at whatever has arrived (up to 4096 bytes); the complete v1 line or v2 header must
  be in it (a header split over several TCP segments is broken, as in nginx);
* only the header's bytes are consumed (recv of exactly its length after the peek): a
  ClientHello or a first command sent in the same packet stays for the session;
* a broken header logs its message `while reading PROXY protocol` (error) and closes the
  connection without a word;
* the addresses of a header that carries them are returned (`ProxyHeader.addrs`, the
  session's `proxy_header`: auth_http's `Proxy-Protocol-Addr/Port/Server-Addr/Server-Port`),
  trusted or not;
* realip: when the TCP peer matches `set_real_ip_from` (addresses, CIDRs, `unix:`) and the
  source parses as an IP address, the header is trusted (`ProxyHeader.client`): the session's
  client address and port become the header's (Client-IP, XCLIENT ADDR, the PROXY header to
  the backend, log lines).  Otherwise the peer stays, silently.  The `client ... connected to
  ...` line was written before and shows the real TCP peer.

`read_header` takes the socket and returns; the session applies the result
(Session.apply_proxy_header).

Deviation: a client that closes (or resets) before sending anything is logged as `client
closed connection while reading PROXY protocol` (info), where nginx logs `broken header: ""`.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional, Tuple

from .clientio import ClientClosed, ClientTimeout, Close
from .ktimeout import TIMEOUT_ERRORS
from .proxy_protocol import BrokenHeader, ip_text, parse

if TYPE_CHECKING:
    from .config import ServerConf

__all__ = ["read_header", "ProxyHeader", "trusted", "PEEK_SIZE"]

PEEK_SIZE = 4096


# ---------------------------------------------------------------------------------- realip

_nets_lock = threading.Lock()


def _networks(conf):
    """(networks, unix allowed) from conf.set_real_ip_from, parsed once per ServerConf."""
    cached = conf._realip_networks
    if cached is not None:
        return cached
    nets, unix = [], False
    for entry in conf.set_real_ip_from:
        if entry == "unix:":
            unix = True
            continue
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue
    cached = (tuple(nets), unix)
    with _nets_lock:
        conf._realip_networks = cached
    return cached


def trusted(conf: ServerConf, peer_ip: Optional[str], family: Optional[int] = None) -> bool:
    """True when the TCP peer may set the client address (set_real_ip_from)."""
    nets, unix = _networks(conf)
    if family == socket.AF_UNIX or not peer_ip:
        return unix
    try:
        ip = ipaddress.ip_address(str(peer_ip).split("%", 1)[0])
    except ValueError:
        return False
    candidates = [ip]
    if ip.version == 6 and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(c in net for c in candidates for net in nets if c.version == net.version)


# ---------------------------------------------------------------------------------- session

class ProxyHeader(NamedTuple):
    """A PROXY header read by `read_header`.

    addrs: (src_ip, src_port, dst_ip, dst_port) as received, None for a header without
    addresses (v1 UNKNOWN, v2 LOCAL or a family without addresses); client: (ip text, port)
    that stands for the client from now on when the header is trusted, else None."""
    addrs: Optional[tuple]
    client: Optional[Tuple[str, int]]

    @property
    def trusted(self) -> bool:
        return self.client is not None


def read_header(sock: socket.socket, conf: ServerConf, peer_ip: Optional[str],
                log: Callable[[str, str], None]) -> ProxyHeader:
    """Read the PROXY header on `sock`, the connection from `peer_ip` to server `conf` (the
    first thing in Session.run); the caller applies the returned ProxyHeader.

    Raises ClientTimeout or ClientClosed; a broken header is logged (`log("error", message)`,
    the session's logger) and raises Close.
    """
    # the session's `timeout` is already on the socket (Session.__init__, ktimeout)
    try:
        data = sock.recv(PEEK_SIZE, socket.MSG_PEEK)
    except TIMEOUT_ERRORS:
        raise ClientTimeout() from None
    except OSError as e:
        raise ClientClosed("recv() failed", e.errno) from None
    if not data:
        raise ClientClosed()
    try:
        size, addrs = parse(data)
    except BrokenHeader as e:
        log("error", str(e))
        raise Close() from None
    # consume exactly the header: what follows (a ClientHello, a command) stays queued
    got = 0
    try:
        while got < size:
            chunk = sock.recv(size - got)
            if not chunk:
                raise ClientClosed()
            got += len(chunk)
    except TIMEOUT_ERRORS:
        raise ClientTimeout() from None
    except OSError as e:
        raise ClientClosed("recv() failed", e.errno) from None
    client = None
    if addrs is not None:
        family = getattr(sock, "family", None)
        if conf.set_real_ip_from and trusted(conf, peer_ip, family):
            try:
                ip = ipaddress.ip_address(addrs[0])
            except ValueError:
                ip = None
            if ip is not None:
                client = (ip_text(ip), addrs[1])
    return ProxyHeader(addrs, client)
