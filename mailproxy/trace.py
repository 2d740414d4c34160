"""What `error_log ... debug` shows of a session, with credentials masked: pure functions.

Each returns log-safe text (log.sanitize) in which no password, SASL response, digest or token
a client or an auth service sent can appear: the commands that carry one keep their verb (and
the user name where it is apart) and show `***` for the rest.  README.md "Debug log" lists
what is masked.
"""

from __future__ import annotations

from typing import Iterable, List

from .log import sanitize

MASK = "***"

# verb -> how many leading words stay visible (the verb's own position counted)
_KEEP = {
    b"PASS": 1,             # POP3 PASS password
    b"APOP": 2,             # POP3 APOP user digest
    b"AUTH": 2,             # POP3/SMTP AUTH mechanism [initial-response]
    b"AUTHENTICATE": 2,     # IMAP AUTHENTICATE mechanism [initial-response]
    b"LOGIN": 2,            # IMAP LOGIN user password
}

LIMIT = 512                 # characters of one traced line


def _strip(line: bytes) -> bytes:
    return line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")


def client_line(protocol: str, line: bytes, sasl: bool = False, continued: bool = False) -> str:
    """One client line before login, credentials masked.

    sasl: the line answers a SASL challenge (a continuation line): masked whole, except the
    `*` that cancels.  continued: IMAP input inside a command with literals (a literal's
    bytes or the line after one), which may hold any part of a LOGIN: masked whole."""
    body = _strip(bytes(line))
    if sasl:
        return "*" if body.strip() == b"*" else MASK
    if continued:
        return "%s (%d bytes)" % (MASK, len(body))
    words = body.split()                # any whitespace: a tab must not hide the verb
    start = 1 if protocol == "imap" else 0          # after the IMAP tag
    if len(words) > start:
        keep = _KEEP.get(words[start].upper())
        if keep is not None and len(words) > start + keep:
            shown = b" ".join(words[:start + keep])
            return sanitize(shown, LIMIT) + " " + MASK
    return sanitize(body, LIMIT)


def backend_line(data: bytes, action: str) -> str:
    """What a backend login sends (conversation.ToBackend), the password masked: the step that
    sends it says so in its action (`sending password to upstream`, `sending token to
    upstream`), and AUTH / AUTHENTICATE with an initial response carry it."""
    body = _strip(bytes(data))
    if "password" in action or "token" in action:      # a token's response or dummy line
        if body[:5].upper() == b"PASS ":
            return "PASS " + MASK
        return MASK
    words = body.split()
    if words and words[0].upper() in (b"AUTH", b"AUTHENTICATE") and len(words) > 2:
        return sanitize(b" ".join(words[:2]), LIMIT) + " " + MASK
    if len(words) > 3 and words[1].upper() in (b"LOGIN", b"AUTHENTICATE"):
        return sanitize(b" ".join(words[:3]), LIMIT) + " " + MASK
    return sanitize(body, LIMIT)


def reply_lines(data: bytes) -> List[str]:
    """Each line of a reply (to the client, or from a backend), log-safe."""
    return [sanitize(part, LIMIT) for part in bytes(data).split(b"\r\n") if part]


def _header(line: bytes, masked: bool = False) -> str:
    """`Name "value"` for a header line (the status line: `"line"`), log-safe."""
    name, colon, value = line.partition(b":")
    if not colon:
        return '"%s"' % sanitize(line, LIMIT)
    return '%s "%s"' % (sanitize(name.strip(), 64),
                        MASK if masked else sanitize(value.strip(b" "), LIMIT))


def auth_request_lines(request: bytes, secret_headers: Iterable[str] = ()) -> List[str]:
    """The auth_http request's lines without Auth-Pass (a password or a digest); the values of
    `secret_headers` (auth_http_header names: nginx's own example sends a shared key there)
    masked."""
    secret = {name.lower().encode("ascii", "replace") for name in secret_headers}
    out = []
    for line in bytes(request).split(b"\r\n"):
        if not line:
            continue
        name = line.partition(b":")[0].strip().lower()
        if name == b"auth-pass":
            continue
        out.append(_header(line, name in secret))
    return out


def auth_response_lines(response: bytes) -> List[str]:
    """The auth_http response's header lines, Auth-Pass's value masked."""
    head = bytes(response).split(b"\r\n\r\n", 1)[0]
    out = []
    for line in head.split(b"\n"):
        line = line.rstrip(b"\r")
        if line:
            out.append(_header(line, line.partition(b":")[0].strip().lower() == b"auth-pass"))
    return out
