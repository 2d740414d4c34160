"""The protocols the proxy speaks: each module's descriptor (`PROTOCOL`, nginx's
`ngx_mail_protocol_t`, defined next to its conversation), by name and by the ports that imply
them.  A new protocol is one module with its Conversation, BackendLogin and PROTOCOL, plus its
name in the tuple below.
"""

from . import imap, pop3, sieve, smtp
from .conversation import Protocol

PROTOCOLS = {p.name: p for p in (pop3.PROTOCOL, imap.PROTOCOL, smtp.PROTOCOL,
                                          sieve.PROTOCOL)}

# the port a `listen` names -> the protocol it implies (ngx_mail_core_listen's guess)
PORTS = {port: p.name for p in PROTOCOLS.values() for port in p.ports}

__all__ = ["PROTOCOLS", "PORTS", "Protocol"]
