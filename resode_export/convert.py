"""Conversion: a ResNet → its limit ODE → a ResNet at another depth, scheme or interpolation.

A depth-N ResNet in this package's format already is an ODENet whose curves have N knots at
t_n = n/N, so conversion is :meth:`ODENet.discretize` plus the measurements that tell a user
whether the re-discretized network still does the job: test accuracy and the deviation of
its outputs from the source's.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .data import Dataset, load_data
from .errors import ResodeError
from .evaluate import accuracy, predict, relative_deviation
from .io import load_checkpoint
from .network import MAX_DEPTH, ODENet, check_depth

MODELS_DIRS = (Path(__file__).parent / "models", Path(__file__).parent.parent / "models")
DEFAULT_MODEL = "digits-mlp"


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A checkpoint path, a shipped model's name (``digits-mlp``, ``fashion-conv``) or None (the default)."""
    name = DEFAULT_MODEL if model is None else str(model)
    if Path(name).exists() or os.sep in name or name.endswith(".safetensors"):
        return Path(name)
    for folder in MODELS_DIRS:
        if (folder / f"{name}.safetensors").is_file():
            return folder / f"{name}.safetensors"
    return Path(name)  # load_checkpoint reports it missing


def load_model(model: str | os.PathLike | None) -> tuple[ODENet, dict, Path]:
    path = resolve_model(model)
    net, header = load_checkpoint(path)
    return net, header, path


def parse_depths(depth: str | int | None, depth_scale: float | None, native: tuple[int, ...]) -> tuple[int, ...]:
    """Target depths per stage from ``--depth`` ("64" or "16,32") or ``--depth-scale``."""
    if depth is not None and depth_scale is not None:
        raise ResodeError("give --depth or --depth-scale, not both")
    if depth_scale is not None:
        if not 0 < depth_scale < math.inf:
            raise ResodeError(f"--depth-scale must be positive and finite, got {depth_scale}")
        scaled = [d * depth_scale for d in native]
        if any(s > MAX_DEPTH for s in scaled):
            raise ResodeError(f"--depth-scale {depth_scale} gives depths {scaled} above the maximum {MAX_DEPTH}")
        if any(abs(s - round(s)) > 1e-9 for s in scaled):
            raise ResodeError(f"--depth-scale {depth_scale} does not give whole depths from {list(native)}")
        return tuple(check_depth(round(s)) for s in scaled)
    if depth is None:
        return native
    try:
        depths = [int(d) for d in str(depth).split(",")]
    except ValueError:
        raise ResodeError(f"--depth must be an integer or a comma list of integers, got {depth!r}") from None
    if len(depths) == 1:
        depths = depths * len(native)
    if len(depths) != len(native):
        raise ResodeError(f"--depth lists {len(depths)} depths but the model has {len(native)} stages")
    return tuple(check_depth(d) for d in depths)


def dataset_for(header: dict) -> Dataset:
    """The data set a checkpoint was trained on, from its header."""
    name = header.get("data", {}).get("name")
    if not name:
        raise ResodeError("the checkpoint names no data set, so it has no test split to measure on")
    return load_data(name)


def compare(source: ODENet, target: ODENet, data: Dataset, limit: int | None = None, progress=None) -> dict:
    """Test accuracy of both models and the relative deviation of target's logits from source's."""
    x, y = data.x_test, data.y_test
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if tuple(x.shape[1:]) != tuple(source.config.in_shape):
        raise ResodeError(f"test data has samples of shape {tuple(x.shape[1:])}, the model expects {source.config.in_shape}")
    ref = predict(source, x, progress=progress, description="source model")
    out = predict(target, x, progress=progress, description="converted model")
    dev = relative_deviation(out, ref)
    return {
        "source_accuracy": accuracy(ref, y),
        "accuracy": accuracy(out, y),
        "max_rel_deviation": float(dev.max()),
        "mean_rel_deviation": float(dev.mean()),
        "test_samples": len(y),
    }
