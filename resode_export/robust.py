"""Depth-robust training: every batch is solved at a depth and scheme drawn from lists.

A model trained at one depth learns that discretization, not its limit ODE: re-solved at another
depth it loses accuracy. Drawing the depth (and the scheme) per batch makes the same curve
accurate at all of them (the knots are shared; only the solve changes). The draw is a function
of the seed and the global step, so every process of a torchrun job and a resumed run draw the
same ones.

A depth list entry is either an integer (that many steps in every stage) or a factor of the
native depths written with an ``x`` (``0.5x``: half of each stage's native depth, at least 1).
"""

from __future__ import annotations

import math
import random

from .errors import ResodeError, check_choice
from .network import MAX_DEPTH, check_depth
from .schemes import SCHEMES

DEFAULT_SCALES = "0.5x,1x,2x"  # distillation's default: half to twice the teacher's native depths
MAX_CHOICES = 64


def parse_depth_choices(text: str, native: tuple[int, ...], option: str = "--depths") -> list[list[int]]:
    """``"4,8,16"`` or ``"0.5x,1x,2x"`` (or a mix) → per-stage depth lists, once each, in order."""
    entries = [e.strip() for e in str(text).split(",") if e.strip()]
    if not entries:
        raise ResodeError(f"{option} is empty; give a comma list such as 4,8,16,32 (steps) or 0.5x,1x,2x "
                          "(factors of the native depths)")
    if len(entries) > MAX_CHOICES:
        raise ResodeError(f"{option} lists {len(entries)} depths; give at most {MAX_CHOICES}")
    choices: list[list[int]] = []
    for entry in entries:
        try:
            if entry.lower().endswith("x"):
                scale = float(entry[:-1])
                if not 0 < scale < math.inf:
                    raise ValueError
                depths = [max(1, math.floor(d * scale + 0.5)) for d in native]
            else:
                depths = [int(entry)] * len(native)
        except ValueError:
            raise ResodeError(f"{option} entries are integers (steps in every stage) or factors such as 0.5x, "
                              f"got {entry!r}") from None
        if max(depths) > MAX_DEPTH or min(depths) < 1:
            raise ResodeError(f"{option} entry {entry!r} gives depths {depths}; each must be from 1 to {MAX_DEPTH}")
        depths = [check_depth(d) for d in depths]
        if depths not in choices:
            choices.append(depths)
    return choices


def parse_schemes(text: str, option: str = "--schemes") -> list[str]:
    names = list(dict.fromkeys(s.strip() for s in str(text).split(",") if s.strip()))
    if not names:
        raise ResodeError(f"{option} is empty; give a comma list such as euler,heun")
    return [check_choice("scheme", s, SCHEMES) for s in names]


def draw(depths: list[list[int]] | None, schemes: list[str] | None, seed: int, step: int) -> tuple[list[int] | None,
                                                                                                  str | None]:
    """The depths and scheme of global step ``step``: the same in every process and in a resumed run."""
    if not depths and not schemes:
        return None, None
    rng = random.Random(seed * 1_000_003 + step)
    return (rng.choice(depths) if depths else None), (rng.choice(schemes) if schemes else None)


def extremes(depths: list[list[int]] | None, schemes: list[str] | None) -> list[tuple[list[int], str | None]]:
    """What a depth-robust run is measured at every epoch: its shallowest and deepest depths, each scheme."""
    if not depths:
        return []
    ends = [min(depths, key=sum), max(depths, key=sum)]
    ends = [d for i, d in enumerate(ends) if d not in ends[:i]]
    return [(d, s) for s in (schemes or [None]) for d in ends]


__all__ = ["DEFAULT_SCALES", "draw", "extremes", "parse_depth_choices", "parse_schemes"]
