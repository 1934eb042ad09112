"""Memory estimates, checked before the work starts: an export that would not fit is refused up front.

A static export unrolls the solve: it holds the weights of every stage time of every step
(``stage_times`` per block, each the size of one knot), once as arrays, once in the serialized
graph and once more in the runtime that verifies it. The limit is ``RESODE_MEMORY_LIMIT`` (bytes,
or with a K/M/G/T suffix) if set, else the memory the system reports available.
"""

from __future__ import annotations

import math
import os
import re

from .errors import ResodeError
from .network import ODENet
from .schemes import get_scheme

STATIC_COPIES = 3  # arrays, serialized graph, the verifying runtime's copy
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([KMGT]?)i?B?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ResodeError(f"RESODE_MEMORY_LIMIT must be a size such as 8G or 512M, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def memory_limit() -> tuple[int, str]:
    """(bytes, where the number comes from)."""
    env = os.environ.get("RESODE_MEMORY_LIMIT")
    if env:
        return parse_bytes(env), "RESODE_MEMORY_LIMIT"
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "the memory available"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "the memory available"
    except (ValueError, OSError, AttributeError):
        return 1 << 62, "no known limit"


def stage_times(scheme: str, depth: int) -> int:
    """How many distinct times a solve samples the weights at (``len(stage_grid(scheme, depth)[0])``), in O(1)."""
    cs = sorted(set(float(c) for c in get_scheme(scheme).c))
    shared = 0.0 in cs and 1.0 in cs  # the end of one step is the start of the next
    return depth * (len(cs) - shared) + shared


def unrolled_bytes(model: ODENet, depths: tuple[int, ...], scheme: str | None = None) -> int:
    """Bytes of float32 weights of the model unrolled at ``depths``: every stage time's sample, and the rest."""
    scheme = scheme or model.config.scheme
    total = sum(p.numel() for name, p in model.named_parameters() if ".curve." not in name) * 4
    for block, depth in zip(model.blocks, depths):
        per_time = sum(k[0].numel() for k in block.curve.knots.values())
        total += stage_times(scheme, depth) * per_time * 4
    return total


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_static_export(model: ODENet, depths: tuple[int, ...], scheme: str | None = None) -> int:
    """Refuse an unrolled export whose weights would not fit in memory; returns the estimate (bytes)."""
    weights = unrolled_bytes(model, depths, scheme)
    need = STATIC_COPIES * weights
    limit, source = memory_limit()
    if need > limit:
        shown = depths[0] if len(set(depths)) == 1 else list(depths)
        raise ResodeError(f"unrolled at depth {shown}, the export holds {_gib(weights)} of weights and needs about "
                          f"{_gib(need)} of memory, above {_gib(limit)} ({source}); export with --dynamic-depth "
                          "(its size does not grow with depth) or at a smaller --depth")
    return need


def check_training(config) -> int:
    """Refuse training a new model whose weights, gradients and optimizer state would not fit; the estimate."""
    from .io import _expected_tensors

    expected = _expected_tensors(config)  # shapes on the meta device: nothing allocated
    if expected is None:
        return 0
    weights = 4 * sum(math.prod(shape) for shape, _ in expected.values())
    need = 4 * weights  # weights, gradients, Adam's two moments (activations come on top)
    limit, source = memory_limit()
    if need > limit:
        raise ResodeError(f"this model has {_gib(weights)} of weights and training it needs about {_gib(need)} "
                          f"(weights, gradients, optimizer state), above {_gib(limit)} ({source}); use a smaller "
                          "--width, --hidden or --depth")
    return need


__all__ = ["check_static_export", "check_training", "memory_limit", "parse_bytes", "stage_times", "unrolled_bytes"]
