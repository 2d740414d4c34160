"""`proxy_map = FILE` (ours): a static map of users to backends, for sites with several
backends and no auth service.

One line per `user@domain` (or a whole user name without a domain), `@domain` or `*`, then
the backends as `proxy_pass` takes them
(parameters included); `#` starts a comment.  The most specific entry wins: the whole user
name, then its domain (the part after the last @), then `*`.  Names are compared without
regard to case.  The file is read by config/pool_parsers.py at start, `-t` and every reload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .upstreams import Backend


@dataclass(eq=False)
class ProxyMap:
    path: str
    users: Dict[str, List[Backend]] = field(default_factory=dict)
    domains: Dict[str, List[Backend]] = field(default_factory=dict)
    default: Optional[List[Backend]] = None

    def lookup(self, user: Optional[bytes]) -> Optional[List[Backend]]:
        """The backends of `user`, or None when no line matches."""
        name = (user or b"").decode("utf-8", "replace").lower()
        hit = self.users.get(name)
        if hit is None and "@" in name:
            hit = self.domains.get(name.rpartition("@")[2])
        return hit if hit is not None else self.default

    def backends(self) -> List[Backend]:
        """Every backend of the map, each (host, port) once (the active check's list)."""
        out, seen = [], set()
        lists = list(self.users.values()) + list(self.domains.values()) + [self.default or []]
        for lst in lists:
            for b in lst:
                if b.key not in seen:
                    seen.add(b.key)
                    out.append(b)
        return out

    def add(self, pattern: str, backends: List[Backend]) -> Optional[str]:
        """One line's entry; the error text when the pattern is bad or repeated."""
        p = pattern.lower()
        if p == "*":
            if self.default is not None:
                return "duplicate entry \"*\""
            self.default = backends
            return None
        if p.startswith("@"):
            table, key = self.domains, p[1:]
        else:
            table, key = self.users, p
        if not key or key.startswith("@") or any(c in key for c in "*\\\"") \
                or not key.isprintable():
            return 'invalid pattern "%s": expected user@domain, @domain or *' % pattern
        if key in table:
            return 'duplicate entry "%s"' % pattern
        table[key] = backends
        return None
