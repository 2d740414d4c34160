"""One descriptor per protocol, as nginx's `ngx_mail_protocol_t`: what the rest of the proxy
needs to know of a protocol without importing its module (the config loader guesses the
protocol from the port, tls.py needs the ALPN name and the certificate-error replies,
listeners.py the temporary-failure greeting, session.py the internal-error reply and the
conversation class).  A new protocol is one module with its Conversation and BackendLogin
plus one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Protocol:
    name: str               # the `protocol` directive's value
    ports: Tuple[int, ...]  # listen ports that imply it when `protocol` is not set
    alpn: bytes             # its ALPN name (ngx_mail_ssl_alpn_select)
    cert_error: bytes       # after the handshake: the certificate did not verify
    no_cert: bytes          # after the handshake: a required certificate is missing
    internal_error: bytes   # a failure of ours or of the auth service / backend (s->out)
    temp_failure: bytes     # instead of the greeting when a limit refuses (limits.py);
                            # `%s` is the server_name where the protocol names itself
    sasl_order: Tuple[Tuple[str, str], ...]   # (method, advertised word) in nginx's order
    conversation: Tuple[str, str]             # (module, class), imported on first use

    def busy_reply(self, conf) -> bytes:
        """The temporary-failure greeting for a connection a limit refuses."""
        if b"%s" not in self.temp_failure:
            return self.temp_failure
        return self.temp_failure % str(conf.server_name).encode("utf-8", "surrogateescape")

    def mechanisms(self, methods) -> list:
        """The SASL words advertised for the enabled `methods`, in nginx's order."""
        return [word for name, word in self.sasl_order if name in methods]

    def conversation_class(self):
        module, name = self.conversation
        return getattr(importlib.import_module(module), name)


PROTOCOLS = {p.name: p for p in (
    Protocol("pop3", (110, 995), b"pop3",
             b"-ERR SSL certificate error\r\n", b"-ERR No required SSL certificate\r\n",
             b"-ERR internal server error\r\n",
             b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",      # RFC 3206
             # `pop3_auth plain` enables both (ngx_mail_pop3_merge_srv_conf)
             (("plain", "PLAIN"), ("plain", "LOGIN"), ("cram-md5", "CRAM-MD5"),
              ("external", "EXTERNAL")),
             ("mailproxy.pop3", "Pop3Conversation")),
    Protocol("imap", (143, 993), b"imap",
             b"* BYE SSL certificate error\r\n", b"* BYE No required SSL certificate\r\n",
             b"* BAD internal server error\r\n",
             b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",  # RFC 5530
             (("plain", "AUTH=PLAIN"), ("login", "AUTH=LOGIN"), ("cram-md5", "AUTH=CRAM-MD5"),
              ("external", "AUTH=EXTERNAL")),
             ("mailproxy.imap", "ImapConversation")),
    Protocol("smtp", (25, 465, 587), b"smtp",
             b"421 4.7.1 SSL certificate error\r\n",
             b"421 4.7.1 No required SSL certificate\r\n",
             b"451 4.3.2 Internal server error\r\n",
             b"421 4.7.0 %s Too many connections, try again later\r\n",
             (("plain", "PLAIN"), ("login", "LOGIN"), ("cram-md5", "CRAM-MD5"),
              ("external", "EXTERNAL")),
             ("mailproxy.smtp", "SmtpConversation")),
)}

# the port a `listen` names -> the protocol it implies (ngx_mail_core_listen's guess)
PORTS = {port: p.name for p in PROTOCOLS.values() for port in p.ports}


def session_class(protocol):
    """The class that runs a connection of `protocol` (one Session drives every protocol's
    conversation; tests replace this hook)."""
    return importlib.import_module("mailproxy.session").Session
