"""`mailproxy -c FILE sessions [USER] [--backend ADDR] [--json]` and
`mailproxy -c FILE kick USER | --backend ADDR`: the running instance asked through its
control socket (`[main] control_socket`, master_loop.py), never the network.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any, Callable, Dict, List, Optional, TextIO

from .log import sanitize, word

COMMANDS = ("sessions", "kick")
TIMEOUT = 10.0          # seconds for the whole exchange (the master waits 2 s per worker)

COLUMNS = (("ID", "id"), ("PROTOCOL", "protocol"), ("USER", "user"), ("CLIENT", "client"),
           ("BACKEND", "backend"), ("TLS", "tls"), ("C>B", "bytes_in"), ("B>C", "bytes_out"),
           ("AGE", "age"), ("PID", "pid"))


class UsageError(Exception):
    pass


def parse(command: str, args: List[str]) -> Dict[str, Any]:
    """The request of a command line's words after the command: USER, --backend ADDR,
    --json (sessions only)."""
    req: Dict[str, Any] = {"op": command}
    as_json = False
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--json" and command == "sessions":
            as_json = True
        elif a == "--backend" or a.startswith("--backend="):
            if "=" in a:
                value = a.split("=", 1)[1]
            elif i < len(args):
                value, i = args[i], i + 1
            else:
                raise UsageError('option "--backend" requires an address')
            if not value or "backend" in req:
                raise UsageError('"--backend" needs one address')
            req["backend"] = value
        elif a.startswith("-") and a != "-":
            raise UsageError('invalid option for "%s": "%s"' % (command, sanitize(a, 64)))
        elif "user" in req:
            raise UsageError('"%s" takes one user name' % command)
        else:
            req["user"] = a
    if command == "kick" and "user" not in req and "backend" not in req:
        raise UsageError('"kick" needs a user name or --backend ADDR')
    return {"request": req, "json": as_json}


def ask(path: str, request: Dict[str, Any], timeout: float = TIMEOUT) -> Dict[str, Any]:
    """One request to the instance's control socket; OSError (with the path) or ValueError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise OSError(e.errno, 'connect() to unix:%s failed (%d: %s)'
                          % (path, e.errno or 0, e.strerror)) from None
        sock.sendall(json.dumps(request).encode("ascii") + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    answer = json.loads(data) if data.strip() else None
    if not isinstance(answer, dict):
        raise ValueError("no answer from the instance on unix:%s" % path)
    return answer


def _cell(row: Dict[str, Any], key: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if key == "age":
        return "%d" % int(v)
    return word(v)          # one cell one word: a client's spaces would shift the columns


def table(rows: List[Dict[str, Any]]) -> str:
    """The listing: a header line, then one line a session, columns aligned."""
    cells = [[h for h, _ in COLUMNS]] + [[_cell(r, k) for _, k in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() + "\n"
                   for line in cells)


def run(path: Optional[str], conf_path: str, command: str, args: List[str],
        out: TextIO = sys.stdout, err: Optional[Callable[[str], None]] = None) -> int:
    """The command's exit code: 0 done, 1 an error (said on stderr)."""
    from .supervisor import err as say
    err = err or say
    try:
        parsed = parse(command, args)
    except UsageError as e:
        err(str(e))
        return 1
    if not path:
        err('[error] no control socket is configured in %s ([main] control_socket), cannot '
            'run "%s"' % (conf_path, command))
        return 1
    try:
        answer = ask(path, parsed["request"])
    except OSError as e:
        err("[error] %s: is mailproxy running?" % (e.strerror or e))
        return 1
    except ValueError as e:
        err("[error] %s" % e)
        return 1
    if answer.get("error"):
        err("[error] %s" % sanitize(str(answer["error"])))
        return 1
    if command == "sessions":
        rows = [r for r in answer.get("sessions") or () if isinstance(r, dict)]
        out.write(json.dumps(rows, indent=1) + "\n" if parsed["json"] else table(rows))
    else:
        n = int(answer.get("kicked") or 0)
        out.write("%d session%s kicked\n" % (n, "" if n == 1 else "s"))
    out.flush()
    missing = answer.get("missing") or []
    for pid in missing:
        err("[warn] worker process %s did not answer" % sanitize(str(pid), 16))
    return 1 if missing else 0
