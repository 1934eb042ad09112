"""torchvision (and timm) ResNets → ODENets, from their state dicts alone.

torchvision is not needed: the layout is recognized from the keys and shapes (``conv1``, ``bn1``,
``layer{i}.{j}.conv{1,2[,3]}``, ``…bn…``, ``layer{i}.0.downsample.{0,1}``, ``fc``), BasicBlock
(resnet18/34) or Bottleneck (resnet50/101/152, wide_resnet50_2/101_2, resnext50_32x4d, …), and
checked against the full list of keys and shapes that layout implies.

Each stage becomes a transition, its first (downsampling) block kept as it is, and an ODE block
holding the stage's other N = blocks − 1 blocks as the N knots of a curve. A torchvision block
computes relu(x + F(x)); the ODE block runs the projected Euler step
x_{n+1} = relu(x_n + h g(x_n, θ_n)) with h = 1/N and g = N·F (the last conv's BN scale and shift
multiplied by N), so at its native depth it is the original network, to float rounding, and at
another depth or with another scheme it is the same curve re-discretized, each step projected.

BatchNorm uses its inference statistics, in one of two forms: folded into the convolutions
(``bn="fold"``) or kept as a frozen per-channel scale and shift (``bn="frozen"``), the trainable
form for fine-tuning. Files are read with ``torch.load(weights_only=True)`` (``.pt``/``.pth``) or as
safetensors: nothing is unpickled.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ResodeError, check_choice, one_line
from ..io import read_safetensors
from ..network import MAX_DEPTH, ODENet, ODENetConfig

BN_EPS = 1e-5  # torchvision's BatchNorm2d default
PREFIXES = ("module.", "_orig_mod.", "model.")  # DataParallel, torch.compile, Lightning-style wrappers
WRAPPERS = ("state_dict", "model_state_dict", "model", "net")  # training scripts' checkpoint dicts


@dataclass(frozen=True)
class Preset:
    block: str
    blocks: tuple[int, ...]
    cardinality: int = 1
    inner_factor: int = 1  # inner width = planes × this (wide ResNets 2, ResNeXt 32×4d/64 = 2, …)


PRESETS = {
    "resnet18": Preset("basic", (2, 2, 2, 2)),
    "resnet34": Preset("basic", (3, 4, 6, 3)),
    "resnet50": Preset("bottleneck", (3, 4, 6, 3)),
    "resnet101": Preset("bottleneck", (3, 4, 23, 3)),
    "resnet152": Preset("bottleneck", (3, 8, 36, 3)),
    "wide_resnet50_2": Preset("bottleneck", (3, 4, 6, 3), inner_factor=2),
    "wide_resnet101_2": Preset("bottleneck", (3, 4, 23, 3), inner_factor=2),
    "resnext50_32x4d": Preset("bottleneck", (3, 4, 6, 3), cardinality=32, inner_factor=2),
    "resnext101_32x8d": Preset("bottleneck", (3, 4, 23, 3), cardinality=32, inner_factor=4),
    "resnext101_64x4d": Preset("bottleneck", (3, 4, 23, 3), cardinality=64, inner_factor=4),
}
SOURCES = ("auto", *PRESETS)


@dataclass(frozen=True)
class Layout:
    """What the keys and shapes say about a torchvision-style ResNet."""

    block: str  # "basic" or "bottleneck"
    blocks: tuple[int, ...]  # blocks per stage
    widths: tuple[int, ...]  # output channels per stage
    inner: tuple[int, ...]  # inner width per stage
    cardinality: int
    stem_width: int
    in_channels: int
    num_classes: int
    stem_kernel: int = 7  # 7: torchvision's stem; 3: the small-image (CIFAR-style) 3×3/1 conv without maxpool

    def describe(self) -> str:
        kind = "BasicBlock" if self.block == "basic" else "Bottleneck"
        extra = f", {self.cardinality} groups" if self.cardinality > 1 else ""
        stem = ", 3×3 stem without maxpool" if self.stem_kernel == 3 else ""
        return f"{kind} ResNet, blocks {list(self.blocks)}, widths {list(self.widths)}{extra}{stem}"


# --- reading ---------------------------------------------------------------------------------


def _is_torchscript(path: Path) -> bool:
    """torch.jit.save archives hold compiled code (``code/``) and ``constants.pkl``; torch.save files do not."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or foreign ``.safetensors`` file.

    Unwraps training checkpoints (``{"state_dict": …}``, ``{"model": …}``) and strips the prefixes
    DataParallel (``module.``) and torch.compile (``_orig_mod.``) add.
    """
    path = Path(path)
    if not path.is_file():
        raise ResodeError(f"no such file: {str(path)!r}; give a torchvision-style state dict (.pth/.pt) or a "
                          "resode .safetensors checkpoint")
    if path.suffix == ".safetensors":
        loaded: object = read_safetensors(path)[0]
    else:
        if _is_torchscript(path):
            raise ResodeError(f"{str(path)!r} is a TorchScript archive (torch.jit.save, or resode export --format "
                              "torchscript), not a state dict; give the model's state_dict() saved with torch.save")
        try:
            with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says it all
                warnings.simplefilter("ignore")
                loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if not any(w in str(exc) for w in ("GLOBAL", "global", "Unsupported class", "reduce", "REDUCE")):
                raise ResodeError(f"{str(path)!r} is not a readable torch.save file (truncated or corrupt?); save the "
                                  "weights again with torch.save(model.state_dict(), ...)") from None
            raise ResodeError(
                f"{str(path)!r} holds pickled objects other than tensors, and resode loads .pt/.pth files only with "
                "torch.load(weights_only=True), which never runs their code; save the weights alone with "
                f"torch.save(model.state_dict(), ...) ({one_line(str(exc)).split('.')[0]})") from None
        except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
            raise ResodeError(f"{str(path)!r} is not a readable torch.save file (truncated or corrupt?): "
                              f"{type(exc).__name__}") from None
    def count(d: dict) -> int:
        return sum(isinstance(v, Tensor) for v in d.values())

    def has_tensors(v, depth: int = 3) -> bool:
        return isinstance(v, Tensor) or (depth > 0 and isinstance(v, dict) and any(has_tensors(u, depth - 1)
                                                                                  for u in v.values()))

    for _ in range(3):  # {"state_dict": …} or {"model": {"state_dict": …}}, beside e.g. "epoch" or a best-accuracy tensor
        if isinstance(loaded, dict):
            inner = next((loaded[k] for k in WRAPPERS if isinstance(loaded.get(k), dict)), None)
            if inner is None and not count(loaded):  # the one dict of tensors under another name: {"weights": {...}}
                dicts = {k: v for k, v in loaded.items() if isinstance(v, dict) and has_tensors(v)}
                if len(dicts) > 1:
                    raise ResodeError(f"{str(path)!r} holds several dicts of tensors ({', '.join(map(str, dicts))}); "
                                      "save the state dict to import on its own with torch.save")
                inner = next(iter(dicts.values()), None)
            if inner is not None and (not count(loaded) or count(inner) > count(loaded)):
                loaded = inner
    if isinstance(loaded, dict) and not loaded:
        raise ResodeError(f"{str(path)!r} holds an empty dict; give a model's state_dict() saved with torch.save")
    if not isinstance(loaded, dict):
        raise ResodeError(f"{str(path)!r} holds a {type(loaded).__name__}, not a state dict of named tensors")
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ResodeError(f"{str(path)!r} holds no tensors; give a model's state_dict()")
    stripped = True
    while stripped:  # nested wrappers: _orig_mod.module.conv1.weight
        stripped = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
                stripped = True
    return tensors


# --- recognizing the layout ------------------------------------------------------------------


_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")
_BN_STATS = ("weight", "bias", "running_mean", "running_var")


def _shape(sd: dict[str, Tensor], key: str) -> tuple[int, ...] | None:
    return tuple(sd[key].shape) if key in sd else None


def detect_layout(sd: dict[str, Tensor]) -> Layout:
    """Recognize a torchvision-style ResNet; ResodeError naming what is missing or unexpected otherwise."""
    stem = _shape(sd, "conv1.weight")
    fc = _shape(sd, "fc.weight")
    blocks: dict[int, set[int]] = {}
    for key in sd:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if stem is None and any(k.startswith("conv1.0.") for k in sd):
        raise ResodeError("this ResNet has a deep stem (conv1.0, conv1.1, …: a ResNet-C/-D variant, as in timm); resode "
                          "imports torchvision's single-convolution stem (conv1.weight) only")
    if stem is None or fc is None or not blocks:
        missing = [k for k, ok in (("conv1.weight", stem), ("fc.weight", fc), ("layer1.0.*", blocks)) if not ok]
        sample = ", ".join(sorted(sd)[:6])
        raise ResodeError(f"not a resode checkpoint, nor a torchvision-style ResNet state dict: missing "
                          f"{', '.join(missing)} (its keys begin {sample}); resode imports its own .safetensors "
                          "checkpoints and BasicBlock/Bottleneck ResNets (resnet18 … resnext101)")
    stages = sorted(blocks)
    if stages != list(range(1, len(stages) + 1)):
        raise ResodeError(f"ResNet stages must be layer1..layerN, found layers {stages}")
    counts = []
    for s in stages:
        idx = sorted(blocks[s])
        if idx != list(range(len(idx))):
            raise ResodeError(f"layer{s} has blocks {idx}; expected 0..{len(idx) - 1}")
        counts.append(len(idx))
    if len(fc) != 2 or min(fc) < 1:
        raise ResodeError(f"fc.weight has shape {fc}; a ResNet's classifier is a (classes, features) matrix")
    if len(stem) != 4 or stem[2:] not in ((7, 7), (3, 3)):
        raise ResodeError(f"conv1.weight has shape {stem}; the torchvision stem is a 7×7 conv (stride 2, then maxpool) "
                          "and the small-image stem a 3×3 conv (stride 1, no maxpool); others (deep stems such as "
                          "timm's resnet50d) are not supported")
    bottleneck = "layer1.0.conv3.weight" in sd
    widths, inner, cardinality = [], [], 1
    for s in stages:
        last = _shape(sd, f"layer{s}.0.conv{3 if bottleneck else 2}.weight")
        first = _shape(sd, f"layer{s}.0.conv1.weight")
        if last is None or first is None or len(last) != 4 or len(first) != 4:
            raise ResodeError(f"layer{s}.0 lacks its conv weights (conv1, conv{3 if bottleneck else 2}); "
                              "not a torchvision BasicBlock/Bottleneck layout")
        widths.append(last[0])
        inner.append(first[0])
        if bottleneck:
            mid = _shape(sd, f"layer{s}.0.conv2.weight")
            if mid is None or len(mid) != 4 or mid[1] < 1 or first[0] % mid[1]:
                raise ResodeError(f"layer{s}.0.conv2.weight has shape {mid}; expected (width, width/groups, 3, 3)")
            cardinality = first[0] // mid[1]
    layout = Layout("bottleneck" if bottleneck else "basic", tuple(counts), tuple(widths), tuple(inner),
                    cardinality, stem[0], stem[1], fc[0], stem[2])
    _check_keys(sd, layout)
    too_short = [f"layer{s}" for s, n in zip(stages, counts) if n < 2]
    if too_short:
        raise ResodeError(f"{', '.join(too_short)} {'holds' if len(too_short) == 1 else 'hold'} a single block: a stage "
                          "needs at least 2 blocks, its first "
                          "kept as the transition and the others as the ODE block")
    if max(counts) - 1 > MAX_DEPTH:
        raise ResodeError(f"a stage of {max(counts)} blocks is above resode's maximum depth {MAX_DEPTH}")
    return layout


def expected_shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """Every key (but ``num_batches_tracked``) a torchvision ResNet of this layout has, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(conv: str, bn: str, shape: tuple[int, ...]):
        shapes[f"{conv}.weight"] = shape
        for stat in _BN_STATS:
            shapes[f"{bn}.{stat}"] = (shape[0],)

    conv_bn("conv1", "bn1", (layout.stem_width, layout.in_channels, layout.stem_kernel, layout.stem_kernel))
    cin = layout.stem_width
    for s, (n, width, m) in enumerate(zip(layout.blocks, layout.widths, layout.inner), start=1):
        for j in range(n):
            p = f"layer{s}.{j}"
            if layout.block == "basic":
                conv_bn(f"{p}.conv1", f"{p}.bn1", (m, cin, 3, 3))
                conv_bn(f"{p}.conv2", f"{p}.bn2", (width, m, 3, 3))
            else:
                conv_bn(f"{p}.conv1", f"{p}.bn1", (m, cin, 1, 1))
                conv_bn(f"{p}.conv2", f"{p}.bn2", (m, m // layout.cardinality, 3, 3))
                conv_bn(f"{p}.conv3", f"{p}.bn3", (width, m, 1, 1))
            if j == 0 and (s > 1 or cin != width):
                conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", (width, cin, 1, 1))
            cin = width
    shapes["fc.weight"] = (layout.num_classes, cin)
    shapes["fc.bias"] = (layout.num_classes,)
    return shapes


def _check_keys(sd: dict[str, Tensor], layout: Layout) -> None:
    want = expected_shapes(layout)
    have = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key{'s' if len(missing) > 1 else ''} ({', '.join(missing[:4])}"
                         f"{', …' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key{'s' if len(unexpected) > 1 else ''} ({', '.join(unexpected[:4])}"
                         f"{', …' if len(unexpected) > 4 else ''})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensors of the wrong shape ({k}: {have[k]}, expected {want[k]})")
        raise ResodeError(f"the state dict does not fit a {layout.describe()}: " + "; ".join(parts))
    typed = [k for k, v in sd.items() if not k.endswith("num_batches_tracked") and not v.is_floating_point()]
    if typed:
        raise ResodeError(f"the state dict holds {sd[typed[0]].dtype} values in {typed[0]}, where a ResNet has "
                          "floating-point weights; restore the file")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ResodeError(f"the state dict holds NaN or infinite values in {bad[0]}; restore the file")
    negative = [k for k, v in sd.items() if k.endswith("running_var") and bool((v.double() + BN_EPS <= 0).any())]
    if negative:
        raise ResodeError(f"{negative[0]} holds variances at or below -eps: not BatchNorm statistics; restore the file")


def check_preset(layout: Layout, source: str) -> None:
    """``--from resnet50`` etc.: the recognized layout must be that architecture."""
    check_choice("source architecture", source, dict.fromkeys(SOURCES))
    if source == "auto":
        return
    p = PRESETS[source]
    planes = [64 * 2**i for i in range(len(p.blocks))]
    expansion = 1 if p.block == "basic" else 4
    want = {"block": p.block, "blocks": p.blocks, "widths": tuple(q * expansion for q in planes),
            "inner": tuple(q * p.inner_factor for q in planes), "cardinality": p.cardinality}
    diffs = [f"{k} {getattr(layout, k)!r} (expected {v!r})" for k, v in want.items() if getattr(layout, k) != v]
    if diffs:
        raise ResodeError(f"--from {source}: the state dict is a {layout.describe()}, not a {source}: "
                          + "; ".join(diffs) + "; use --from auto to import it as it is")


# --- the original network, for reference -----------------------------------------------------


def _bn(x: Tensor, sd: dict[str, Tensor], name: str, eps: float) -> Tensor:
    s = {k: sd[f"{name}.{k}"].to(x.dtype) for k in _BN_STATS}
    return F.batch_norm(x, s["running_mean"], s["running_var"], s["weight"], s["bias"], False, 0.0, eps)


@torch.no_grad()
def reference_forward(sd: dict[str, Tensor], layout: Layout, x: Tensor, eps: float = BN_EPS) -> Tensor:
    """The torchvision network itself (eval mode), written from the state dict: what an import must match."""
    w = {k: v.to(x.dtype) for k, v in sd.items() if v.is_floating_point()}

    def cbn(x, conv, bn, stride=1, padding=0, groups=1):
        return _bn(F.conv2d(x, w[f"{conv}.weight"], None, stride, padding, 1, groups), w, bn, eps)

    if layout.stem_kernel == 3:  # the small-image stem: 3×3 / 1, no maxpool
        x = F.relu(cbn(x, "conv1", "bn1", 1, 1))
    else:
        x = F.max_pool2d(F.relu(cbn(x, "conv1", "bn1", 2, 3)), 3, 2, 1)
    for s, n in enumerate(layout.blocks, start=1):
        for j in range(n):
            p, stride = f"layer{s}.{j}", (2 if s > 1 and j == 0 else 1)
            if layout.block == "basic":
                out = F.relu(cbn(x, f"{p}.conv1", f"{p}.bn1", stride, 1))
                out = cbn(out, f"{p}.conv2", f"{p}.bn2", 1, 1)
            else:
                out = F.relu(cbn(x, f"{p}.conv1", f"{p}.bn1"))
                out = F.relu(cbn(out, f"{p}.conv2", f"{p}.bn2", stride, 1, layout.cardinality))
                out = cbn(out, f"{p}.conv3", f"{p}.bn3")
            identity = cbn(x, f"{p}.downsample.0", f"{p}.downsample.1", stride) if f"{p}.downsample.0.weight" in w else x
            x = F.relu(out + identity)
    return F.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), w["fc.weight"], w["fc.bias"])


# --- building the ODENet ---------------------------------------------------------------------


def _affine(sd: dict[str, Tensor], bn: str, eps: float) -> tuple[Tensor, Tensor]:
    """BatchNorm with inference statistics as y = scale·x + shift (float64)."""
    g, b, mean, var = (sd[f"{bn}.{k}"].double() for k in _BN_STATS)
    scale = g / torch.sqrt(var + eps)
    return scale, b - mean * scale


def _conv_params(sd, conv: str, bn: str, eps: float, form: str, factor: float = 1.0) -> tuple[Tensor, ...]:
    """(weight, bias) folded, or (weight, scale, shift) frozen; the affine times ``factor``."""
    weight = sd[f"{conv}.weight"].double()
    scale, shift = _affine(sd, bn, eps)
    if form == "fold":
        return weight * (factor * scale)[:, None, None, None], factor * shift
    return weight, factor * scale, factor * shift


def _load_conv(module, params: tuple[Tensor, ...]) -> None:
    module.conv.weight.copy_(params[0])
    if module.bn == "fold":
        module.conv.bias.copy_(params[1])
    else:
        module.scale.copy_(params[1])
        module.shift.copy_(params[2])


def import_resnet(sd: dict[str, Tensor], layout: Layout | None = None, input_size: tuple[int, int] = (224, 224),
                  bn: str = "fold", interp: str = "linear", eps: float = BN_EPS,
                  dtype: torch.dtype = torch.float32) -> ODENet:
    """The ODENet of a torchvision-style ResNet state dict, at its native depths (Euler, projected by ReLU).

    Args:
        sd: the state dict (``read_state_dict``).
        layout: ``detect_layout(sd)`` (computed if None).
        input_size: (height, width) of the inputs the model is meant for (recorded in the config).
        bn: ``fold`` or ``frozen`` (see the module docstring).
        interp: the interpolation of the curves in depth (at the native depth Euler uses the knots).
        eps: the BatchNorm epsilon the network was trained with.
        dtype: of the model's parameters (BatchNorm is folded in float64 either way).
    """
    layout = layout or detect_layout(sd)
    check_choice("BatchNorm form", bn, dict.fromkeys(("fold", "frozen")))
    depths = tuple(n - 1 for n in layout.blocks)
    config = ODENetConfig(arch="resnet", in_shape=(layout.in_channels, *input_size), num_classes=layout.num_classes,
                          widths=layout.widths, depths=depths, block=layout.block, inner=layout.inner,
                          cardinality=layout.cardinality, stem_width=layout.stem_width, stem_kernel=layout.stem_kernel,
                          bn=bn, scheme="euler",
                          interp=interp, activation="relu")
    model = ODENet(config, init="smooth").to(dtype)
    with torch.no_grad():
        _load_conv(model.stem.conv, _conv_params(sd, "conv1", "bn1", eps, bn))
        for s, transition in enumerate(model.transitions, start=1):
            p = f"layer{s}.0"
            for i, conv in enumerate(transition.convs, start=1):
                _load_conv(conv, _conv_params(sd, f"{p}.conv{i}", f"{p}.bn{i}", eps, bn))
            if transition.downsample is not None:
                _load_conv(transition.downsample, _conv_params(sd, f"{p}.downsample.0", f"{p}.downsample.1", eps, bn))
        for s, (block, depth) in enumerate(zip(model.blocks, depths), start=1):
            knots: dict[str, list[Tensor]] = {}
            convs = len(block.field.convs())
            for j in range(1, depth + 1):
                p = f"layer{s}.{j}"
                for i in range(1, convs + 1):
                    factor = float(depth) if i == convs else 1.0  # h g = F with h = 1/N: g = N·F
                    params = _conv_params(sd, f"{p}.conv{i}", f"{p}.bn{i}", eps, bn, factor)
                    keys = ("w", "b") if bn == "fold" else ("w", "s", "t")
                    for key, value in zip(keys, params):
                        knots.setdefault(f"{key}{i}", []).append(value)
            for name, values in knots.items():
                block.curve.knots[name].copy_(torch.stack(values))
        model.head.fc.weight.copy_(sd["fc.weight"])
        model.head.fc.bias.copy_(sd["fc.bias"])
    return model.eval()


__all__ = ["BN_EPS", "Layout", "PRESETS", "SOURCES", "check_preset", "detect_layout", "expected_shapes",
           "import_resnet", "read_state_dict", "reference_forward"]
