"""What ``resode train`` trains: a new model (with defaults that learn in a few epochs), a checkpoint or
import to fine-tune, or the run to resume; with its data and its depth-robust choices.

Measured on digits (mlp, depth 64, heun, 5 epochs): Adam at 1e-3 with batch 128 ends at 66.7 %
(55 optimizer steps); at 1e-2 with batch 32 and a 5 % warm-up, 96.2 % with backprop and with the
adjoint (`benchmarks/results/defaults.json`). Conv models default to two stages of 16 and 32
channels and a stride-2 stem on images of 16 pixels or more, which keeps a CPU epoch short.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .data import Dataset, load_data
from .errors import ResodeError
from .network import ODENet, ODENetConfig
from .network import untie as untie_model
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


def as_images(dataset: Dataset, images: bool) -> Dataset:
    """digits-images in place of the flat digits for a model that takes images (the same samples, 1×8×8)."""
    return load_data("digits-images") if images and dataset.name == "digits" else dataset


def _resumed_choices(depths: str | None, depth: str | None, net: ODENet, header: dict) -> list[list[int]] | None:
    """A resumed run's --depths, read as the run read them: factors (0.5x) scale the depths the run started from,
    its --depth or the default for a new model, the checkpoint's own for a fine-tuned one. The run's recorded
    choices when the text gives them either way; else the text against the checkpoint (and the resume check
    then names the difference)."""
    if depths is None:
        return None
    stages = len(net.config.depths)
    bases = [net.config.depths,
             per_stage(int_list(depth, "--depth"), stages, "--depth") if depth else (DEFAULT_DEPTH,) * stages]
    recorded = (header.get("training") or {}).get("depths")
    for base in bases:
        choices = parse_depth_choices(depths, base)
        if choices == recorded:
            return choices
    return parse_depth_choices(depths, net.config.depths)


def training_model(model: str | None, *, resume: bool, out: Path, data: str | None, data_dir, input_size,
                   normalize, depth: str | None, depths: str | None, scheme: str | None, schemes: list[str] | None,
                   grad: str | None, untie: bool, arch: str, width: str | None, knots: str | None,
                   stem_stride: int | None, init: str, hidden: int, activation: str, interp: str,
                   seed: int) -> tuple[ODENet, Dataset, list[list[int]] | None]:
    """(model, data, depth-robust choices) of a ``resode train`` run: resumed (``out``'s own), fine-tuned
    (``model``; an imported ResNet keeps BatchNorm as a trainable frozen affine) or new."""
    from .convert import apply_normalize, dataset_for, fit_input, is_foreign, load_model, parse_depths, resolve_model
    from .io import load_checkpoint
    from .resources import check_training

    def own_data(net, header):  # --data, else the checkpoint's data set; digits as images for an image model
        loaded = load_data(data, data_dir, input_size=input_size) if data else dataset_for(header, input_size)
        return as_images(loaded, len(net.config.in_shape) == 3)

    if resume:  # the run's own model and data; its checkpoint carries them
        if not out.is_file():
            raise ResodeError(f"nothing to resume: no such file: {str(out)!r}")
        net, header = load_checkpoint(out)
        return net, own_data(net, header), _resumed_choices(depths, depth, net, header)
    if model is not None:
        foreign = is_foreign(resolve_model(model))
        net, header, _ = load_model(model, bn="frozen" if foreign else None)
        net = apply_normalize(net, normalize, foreign)
        dataset = own_data(net, header)
        net = fit_input(net, dataset)
        native = parse_depths(depth, None, net.config.depths)
        if untie:
            net = untie_model(net.discretize(native))
        choices = parse_depth_choices(depths, native) if depths is not None else None
        new_scheme = scheme or (schemes[0] if schemes else None)
        return net.discretize(native, new_scheme, grad=grad or net.config.grad), dataset, choices
    flat = load_data(data or "digits", data_dir, input_size=input_size)
    dataset = as_images(flat, arch != "mlp")
    config, choices = new_config(arch, dataset.in_shape, dataset.num_classes, width, depth, depths, knots, stem_stride,
                                 scheme, schemes, init == "tied", hidden=hidden, activation=activation, interp=interp,
                                 grad=grad or "backprop", normalize=normalize)
    check_training(config)  # before any allocation
    if dataset is not flat:
        print("note: a conv model takes digits as (1, 8, 8) images (data set digits-images)", file=sys.stderr)
    return ODENet(config, init="iid" if init == "iid" else "smooth", seed=seed), dataset, choices


__all__ = ["DEFAULT_WIDTHS", "as_images", "int_list", "new_config", "per_stage", "training_model"]
