"""Which Session class serves which `protocol`."""

import importlib

_MODULES = {"pop3": ("mailproxy.pop3", "Pop3Session"),
            "imap": ("mailproxy.imap", "ImapSession"),
            "smtp": ("mailproxy.smtp", "SmtpSession")}


def session_class(protocol):
    """The Session subclass for `protocol` ('pop3', 'imap' or 'smtp')."""
    module, name = _MODULES[protocol]
    return getattr(importlib.import_module(module), name)
