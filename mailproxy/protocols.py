"""One descriptor per protocol, as nginx's `ngx_mail_protocol_t`: what the rest of the proxy
needs to know of a protocol without importing its module (the config loader guesses the
protocol from the port, tls.py needs the ALPN name and the certificate-error replies,
listeners.py the session class).  A new protocol is one module with its Session subclass plus
one entry here.
"""

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Protocol:
    name: str               # the `protocol` directive's value
    ports: tuple            # listen ports that imply it when `protocol` is not set
    alpn: bytes             # its ALPN name (ngx_mail_ssl_alpn_select)
    cert_error: bytes       # after the handshake: the certificate did not verify
    no_cert: bytes          # after the handshake: a required certificate is missing
    session: tuple          # (module, class) of its Session subclass, imported on first use


PROTOCOLS = {p.name: p for p in (
    Protocol("pop3", (110, 995), b"pop3",
             b"-ERR SSL certificate error\r\n", b"-ERR No required SSL certificate\r\n",
             ("mailproxy.pop3", "Pop3Session")),
    Protocol("imap", (143, 993), b"imap",
             b"* BYE SSL certificate error\r\n", b"* BYE No required SSL certificate\r\n",
             ("mailproxy.imap", "ImapSession")),
    Protocol("smtp", (25, 465, 587), b"smtp",
             b"421 4.7.1 SSL certificate error\r\n",
             b"421 4.7.1 No required SSL certificate\r\n",
             ("mailproxy.smtp", "SmtpSession")),
)}

# the port a `listen` names -> the protocol it implies (ngx_mail_core_listen's guess)
PORTS = {port: p.name for p in PROTOCOLS.values() for port in p.ports}


def session_class(protocol):
    """The Session subclass for `protocol` ('pop3', 'imap' or 'smtp')."""
    module, name = PROTOCOLS[protocol].session
    return getattr(importlib.import_module(module), name)
