"""`worker_cpu_affinity`: which CPUs a worker process may run on (nginx's ngx_get_cpu_affinity).

Why it matters more here than in nginx: all threads of a worker share one interpreter lock, so
each login hands that lock between the accepting thread, handler threads and the relay several
times; kept on one CPU, every hand-off is a local context switch instead of a wake-up of
another CPU (see bench/README.md, "Session rate").
"""

from __future__ import annotations

from typing import FrozenSet, Iterable, NamedTuple, Optional, Tuple


class CpuAffinity(NamedTuple):
    """The parsed directive: `auto [MASK]` or one MASK per worker (the last one repeats)."""
    auto: bool
    masks: Tuple[FrozenSet[int], ...]      # CPU numbers; for auto at most one (empty: all)


def parse_mask(text: str) -> FrozenSet[int]:
    """nginx's binary mask, rightmost character CPU 0; spaces are skipped as nginx does.
    Raises ValueError naming the bad character."""
    cpus = set()
    i = 0
    for ch in reversed(text):
        if ch == " ":
            continue
        if ch == "1":
            cpus.add(i)
        elif ch != "0":
            raise ValueError('invalid character "%s"' % ch)
        i += 1
    return frozenset(cpus)


def cpus_for(aff: Optional[CpuAffinity], worker: int,
             allowed: Iterable[int]) -> Optional[FrozenSet[int]]:
    """The CPUs worker number `worker` (0-based) is bound to, or None for no binding.

    auto: the worker-th CPU of the mask (all CPUs without one), cycling as nginx does; unlike
    nginx, counted among the CPUs this process may use (a container's cpuset), so that the
    binding never names a CPU the kernel would refuse."""
    if aff is None:
        return None
    allowed = sorted(allowed)
    if aff.auto:
        mask = aff.masks[0] if aff.masks else None
        usable = [c for c in allowed if mask is None or c in mask]
        if not usable:
            return None
        return frozenset({usable[worker % len(usable)]})
    if not aff.masks:
        return None
    return aff.masks[worker] if worker < len(aff.masks) else aff.masks[-1]


def mismatch_warning(aff: Optional[CpuAffinity], workers: int) -> Optional[str]:
    """nginx's warning (ngx_core_module_init_conf) when masks and workers differ in number."""
    if aff is None or aff.auto or len(aff.masks) in (1, workers):
        return None
    return ('the number of "worker_processes" is not equal to the number of '
            '"worker_cpu_affinity" masks, using last mask for remaining worker processes')
