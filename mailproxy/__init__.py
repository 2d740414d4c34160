"""mailproxy: an IMAP, POP3 and SMTP proxy compatible with nginx's mail modules."""

__version__ = "0.1.0"
