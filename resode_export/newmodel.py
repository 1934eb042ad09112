"""What ``resode train`` builds when no model is given: defaults that learn in a few epochs.

Measured on digits (mlp, depth 64, heun, 5 epochs): Adam at 1e-3 with batch 128 ends at 66.7 %
(55 optimizer steps); at 1e-2 with batch 32 and a 5 % warm-up, 96.2 % with backprop and with the
adjoint (`benchmarks/results/defaults.json`). Conv models default to two stages of 16 and 32
channels and a stride-2 stem on images of 16 pixels or more, which keeps a CPU epoch short.
"""

from __future__ import annotations

from .errors import ResodeError
from .network import ODENetConfig
from .robust import parse_depth_choices

DEFAULT_DEPTH = 32
DEFAULT_WIDTHS = {"mlp": "32", "conv": "16,32"}
STRIDE_FROM = 16  # conv stems stride 2 on images at least this many pixels a side


def int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ResodeError(f"{option} must be an integer or a comma list of integers, got {text!r}") from None
    if not values:
        raise ResodeError(f"{option} is empty")
    return values


def per_stage(values: tuple[int, ...], stages: int, option: str) -> tuple[int, ...]:
    if len(values) == 1:
        values = values * stages
    if len(values) != stages:
        raise ResodeError(f"{option} lists {len(values)} values but the model has {stages} stages")
    if min(values) < 1:
        raise ResodeError(f"{option} must be positive integers, got {list(values)}")
    return values


def new_config(arch: str, in_shape: tuple[int, ...], num_classes: int, width: str | None, depth: str | None,
               depths: str | None, knots: str | None, stem_stride: int | None, scheme: str | None,
               schemes: list[str] | None, tied: bool, **rest) -> tuple[ODENetConfig, list[list[int]] | None]:
    """The config of a new model and the depth-robust choices (None: one depth).

    With ``depths`` and no ``depth`` the model's own depth is the deepest choice; its knots default
    to the shallowest (a curve that every depth of the list samples), and its scheme to the first
    of ``schemes``.
    """
    widths = int_list(width or DEFAULT_WIDTHS[arch], "--width")
    stages = len(widths)
    native = per_stage(int_list(depth, "--depth"), stages, "--depth") if depth else (DEFAULT_DEPTH,) * stages
    choices = parse_depth_choices(depths, native) if depths is not None else None
    if choices and not depth:
        native = tuple(max(c[i] for c in choices) for i in range(stages))
    if tied:
        knot_list = (1,) * stages
    elif knots:
        knot_list = per_stage(int_list(knots, "--knots"), stages, "--knots")
    elif choices:
        knot_list = tuple(min(c[i] for c in choices) for i in range(stages))
    else:
        knot_list = None
    if stem_stride is None:
        stem_stride = 2 if arch != "mlp" and len(in_shape) == 3 and min(in_shape[1:]) >= STRIDE_FROM else 1
    config = ODENetConfig(arch=arch, in_shape=in_shape, num_classes=num_classes, widths=widths, depths=native,
                          knots=knot_list, stem_stride=stem_stride,
                          scheme=scheme or (schemes[0] if schemes else "euler"), **rest)
    return config, choices


__all__ = ["DEFAULT_WIDTHS", "int_list", "new_config", "per_stage"]
