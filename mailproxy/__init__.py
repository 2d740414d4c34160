"""mailproxy: an IMAP, POP3 and SMTP proxy compatible with nginx's mail modules."""

__version__ = "0.1.0"

# The nginx release whose mail behaviour mailproxy follows: the newest one whose changes the
# reference (nginx-mail-behaviour.md) records and mailproxy implements; named in the start notice.
NGINX_VERSION = "1.29.7"
