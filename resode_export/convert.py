"""Conversion: a ResNet → its limit ODE → a ResNet at another depth, scheme or interpolation.

A depth-N ResNet in this package's format already is an ODENet whose curves have N knots at
t_n = n/N, so conversion is :meth:`ODENet.discretize` plus the measurements that tell a user
whether the re-discretized network still does the job: test accuracy and the deviation of
its outputs from the source's.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import torch

from .data import Dataset, check_samples, load_data
from .errors import ResodeError
from .evaluate import accuracy, predict, relative_deviation
from .io import METADATA_KEY, load_checkpoint
from .network import MAX_DEPTH, ODENet, check_depth

MODELS_DIRS = (Path(__file__).parent / "models", Path(__file__).parent.parent / "models")
DEFAULT_MODEL = "digits-mlp"


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A checkpoint path, a shipped model's name (``digits-mlp``, ``fashion-conv``) or None (the default)."""
    name = DEFAULT_MODEL if model is None else str(model)
    if Path(name).exists() or os.sep in name or name.endswith(".safetensors"):
        return Path(name)
    for folder in MODELS_DIRS:
        for suffix in (".safetensors", ".pth"):  # fashion-resnet ships as the state dict a user holds
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return Path(name)  # load_checkpoint reports it missing


FOREIGN_SUFFIXES = (".pt", ".pth", ".bin")
IMPORT_PROBES = 4  # random inputs on which an import is compared with the original network
PROBE_SIZE = 64  # at most this many pixels a side: a ResNet runs at any size, and the comparison needs no more


def is_foreign(path: Path) -> bool:
    """A state dict for an importer: ``.pt``/``.pth``, or a safetensors file without resode metadata."""
    suffix = path.suffix.lower()
    if suffix in FOREIGN_SUFFIXES:
        return True
    if suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return METADATA_KEY not in (fh.metadata() or {})
    except Exception:  # noqa: BLE001 - corrupt: load_checkpoint reports it
        return False


def parse_input_size(text: str | None) -> tuple[int, int] | None:
    """``--input-size``: "224" or "224,192" (height, width)."""
    if text is None:
        return None
    try:
        sizes = [int(v) for v in str(text).split(",")]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) < 1 or max(sizes) > 16384:
        raise ResodeError(f"--input-size takes a size or height,width in pixels (1..16384), got {text!r}")
    return sizes[0], sizes[1]


def import_model(path: Path, source: str = "auto", input_size: tuple[int, int] | None = None,
                 bn: str = "fold") -> tuple[ODENet, dict]:
    """A torchvision-style ResNet file as an ODENet, and a header describing the import.

    The header's ``imported.max_rel_deviation`` is the import's logits against the original network's
    (BatchNorm with running statistics, written from the state dict) on random inputs.
    """
    from .importers.torchvision import BN_EPS, check_preset, detect_layout, import_resnet, read_state_dict, reference_forward

    sd = read_state_dict(path)
    layout = detect_layout(sd)
    check_preset(layout, source)
    size = input_size or (224, 224)
    net = import_resnet(sd, layout, size, bn=bn)
    probe = tuple(min(s, PROBE_SIZE) for s in size)
    x = torch.randn(IMPORT_PROBES, layout.in_channels, *probe, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dev = relative_deviation(net(x), reference_forward(sd, layout, x))
    if not torch.isfinite(dev).all():
        raise ResodeError(f"{str(path)!r}: the imported network's outputs are not finite on random inputs "
                          "(its weights or BatchNorm statistics overflow); restore the file")
    header = {"imported": {"format": "torchvision", "path": str(path), "layout": layout.describe(),
                           "blocks": list(layout.blocks), "bn": bn, "bn_eps": BN_EPS,
                           "max_rel_deviation": float(dev.max()),
                           "probe": f"{IMPORT_PROBES} random normal inputs of {probe[0]}×{probe[1]} pixels"}}
    return net, header


def load_model(model: str | os.PathLike | None, source: str = "auto", input_size: tuple[int, int] | None = None,
               bn: str | None = None) -> tuple[ODENet, dict, Path]:
    """A resode checkpoint, a shipped model's name, or a torchvision-style ResNet file (imported).

    ``source``, ``input_size`` and ``bn`` apply to imports only (``--from``, ``--input-size``, ``--bn``).
    """
    path = resolve_model(model)
    suffix = path.suffix.lower()
    if suffix == ".npz" and path.is_file():
        raise ResodeError(f"{str(path)!r} is a data archive (.npz), not a model; pass it as --data, and give a "
                          ".safetensors checkpoint (or a .pt/.pth state dict) as the model")
    if suffix in (".onnx", ".pt2") and path.is_file():
        raise ResodeError(f"{str(path)!r} is an exported graph, not a checkpoint; give the .safetensors checkpoint it "
                          "was exported from (resode check runs .onnx files)")
    if is_foreign(path):
        net, header = import_model(path, source, input_size, bn or "fold")
        return net, header, path
    if source != "auto" or input_size is not None or bn is not None:
        raise ResodeError(f"--from, --input-size and --bn apply to torchvision-style state dicts (.pth/.pt); "
                          f"{str(path)!r} is a resode checkpoint")
    net, header = load_checkpoint(path)
    return net, header, path


def parse_normalize(text: str | None) -> tuple[float, ...] | None:
    """``--normalize``: "MEAN,STD" or per channel "m1,m2,m3,s1,s2,s3" (checked against the model's channels)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise ResodeError(f"--normalize takes numbers MEAN,STD (or the means of every channel, then their standard "
                          f"deviations), got {text!r}") from None


def apply_normalize(net: ODENet, values: tuple[float, ...] | None, imported: bool) -> ODENet:
    """Record ``--normalize`` in an import's config (it then applies in every command and exported graph)."""
    from .network import check_normalize

    if values is None:
        return net
    if not imported:
        raise ResodeError("--normalize applies to new models and imports (.pth state dicts); a resode checkpoint "
                          "keeps the normalization it was trained with")
    net.config = replace(net.config, normalize=check_normalize(values, net.config.in_shape))
    return net


def fit_input(net: ODENet, data: Dataset) -> ODENet:
    """An imported ResNet takes images of any size: adopt the data's, if the channels agree."""
    shape, want = tuple(data.x_test.shape[1:]), tuple(net.config.in_shape)
    if net.config.arch == "resnet" and len(shape) == 3 and shape[0] == want[0] and shape != want:
        net.config = replace(net.config, in_shape=shape)
    return net


def probe_inputs(net: ODENet, count: int = 64, seed: int = 0) -> torch.Tensor:
    """Random normal inputs of the model's shape: for models without a data set (imports)."""
    return torch.randn(count, *net.config.in_shape, generator=torch.Generator().manual_seed(seed))


def parse_depths(depth: str | int | None, depth_scale: float | None, native: tuple[int, ...],
                 fits=None) -> tuple[int, ...]:
    """Target depths per stage from ``--depth`` ("64" or "16,32") or ``--depth-scale``.

    ``fits(depths)``, if given, runs before the range check (an export's memory estimate, so that an
    absurd depth is refused with what it would cost).
    """
    if depth is not None and depth_scale is not None:
        raise ResodeError("give --depth or --depth-scale, not both")
    if depth_scale is not None:
        if not 0 < depth_scale < math.inf:
            raise ResodeError(f"--depth-scale must be positive and finite, got {depth_scale}")
        scaled = [d * depth_scale for d in native]
        if fits is not None and all(1 <= s < 2**62 for s in scaled):
            fits(tuple(round(s) for s in scaled))
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
    if fits is not None and all(1 <= d < 2**62 for d in depths):
        fits(tuple(depths))
    return tuple(check_depth(d) for d in depths)


def image_size(net: ODENet) -> tuple[int, int] | None:
    """(height, width) of an image model's inputs: the size an image folder is read at for it."""
    shape = net.config.in_shape
    return (shape[1], shape[2]) if len(shape) == 3 else None


def dataset_for(header: dict, input_size: tuple[int, int] | None = None) -> Dataset:
    """The data set a checkpoint was trained on, from its header.

    ``input_size`` (height, width) resizes an image folder's images; without it, an image model's own
    size (its config's ``in_shape[1:]``) is used, so a model trained on an image folder reloads its data
    at the size it was trained at. Other data sets ignore it.
    """
    name = header.get("data", {}).get("name")
    if not name:
        raise ResodeError("the model names no data set, so it has no test split to measure on; give --data")
    in_shape = header.get("config", {}).get("in_shape")
    if (input_size is None and isinstance(in_shape, (list, tuple)) and len(in_shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in in_shape)):
        input_size = (in_shape[1], in_shape[2])
    try:
        return load_data(name, input_size=input_size)
    except ResodeError as exc:
        raise ResodeError(f"the model's data set {name!r} (named in its checkpoint) cannot be loaded here: "
                          f"{str(exc).rstrip('.')}; give --data") from None


def compare(source: ODENet, target: ODENet, data: Dataset | None, limit: int | None = None, progress=None) -> dict:
    """Test accuracy of both models and the relative deviation of target's logits from source's.

    With no data (an imported model), the deviation on random normal inputs and no accuracy.
    """
    if data is None:
        x = probe_inputs(source, limit or 16)
        ref, out = predict(source, x, progress=progress), predict(target, x, progress=progress)
        dev = relative_deviation(out, ref)
        return {"source_accuracy": None, "accuracy": None, "max_rel_deviation": float(dev.max()),
                "mean_rel_deviation": float(dev.mean()), "test_samples": 0, "probe_samples": len(x)}
    x, y = data.x_test, data.y_test
    if limit is not None:
        x, y = x[:limit], y[:limit]
    check_samples(x.shape[1:], source.config.in_shape)
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
