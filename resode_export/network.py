"""ODE blocks and ODENets: stem → stages (ODE block, transition) → head.

An ODE block integrates dx/dt = f(x, θ(t)) on [0, 1] with a field f, a curve θ, a depth M and
a scheme. With K = M knots and ``euler`` it *is* the ResNet x_{n+1} = x_n + (1/M) f(x_n, θ_n)
(Sander et al. 2022); :meth:`ODENet.discretize` re-solves the same curve at any depth with any
scheme and interpolation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import Tensor, nn

from .curves import INTERPOLATIONS, Curve
from .errors import ResodeError, check_choice
from .fields import ACTIVATIONS, BLOCK_KINDS, BN_FORMS, ConvField, Field, LinearField, MLPField, ResBlockField
from .gradients import GRADIENTS, ReconstructionMonitor, check_compatible, integrate
from .resnet import STEM_KERNELS, Head, ResidualBlock, Stem, stage_stride
from .schemes import SCHEMES, check_field_scheme

MAX_DEPTH = 65536
ARCHS = ("mlp", "conv", "resnet")
INITS = ("smooth", "iid")


def check_normalize(values, in_shape: tuple[int, ...]) -> tuple[float, ...]:
    """Per-channel (mean…, std…): 2 numbers (every channel) or 2 C (C = channels of images, 1 for flat samples)."""
    values = tuple(float(v) for v in values)
    channels = int(in_shape[0]) if len(in_shape) == 3 else 1
    if len(values) == 2 and channels > 1:
        values = (values[0],) * channels + (values[1],) * channels
    if len(values) != 2 * channels:
        raise ResodeError(f"--normalize takes MEAN,STD or {channels} means then {channels} standard deviations for "
                          f"inputs of {channels} channel(s), got {len(values)} numbers")
    if not all(math.isfinite(v) for v in values) or min(values[channels:]) <= 0:
        raise ResodeError(f"--normalize needs finite means and positive standard deviations, got {list(values)}")
    return values


def normalization(config) -> tuple[Tensor, Tensor] | None:
    """(mean, std) shaped to broadcast over one sample, or None."""
    if config.normalize is None:
        return None
    c = len(config.normalize) // 2
    shape = (c, 1, 1) if len(config.in_shape) == 3 else ()
    mean, std = torch.tensor(config.normalize[:c]), torch.tensor(config.normalize[c:])
    return (mean.reshape(shape), std.reshape(shape)) if shape else (mean[0], std[0])


def check_depth(depth: int) -> int:
    if not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise ResodeError(f"depth must be an integer from 1 to {MAX_DEPTH}, got {depth!r}")
    return depth


class ODEBlock(nn.Module):
    """One stage: integrates the field from t = 0 to 1 in ``depth`` steps of ``scheme``.

    Args:
        field: the residual function family (owns no parameters).
        curve: the weights θ(t); its knots are this block's parameters.
        depth: number of steps M (step size 1/M).
        scheme: a key of ``SCHEMES``.
        grad: how backward goes through the steps, a key of ``GRADIENTS``.
    """

    def __init__(self, field: Field, curve: Curve, depth: int, scheme: str, grad: str = "backprop"):
        super().__init__()
        self.field = field
        self.curve = curve
        self.depth = check_depth(depth)
        self.scheme = check_choice("scheme", scheme, SCHEMES)
        self.grad = check_choice("gradient method", grad, GRADIENTS)
        check_compatible(self.grad, self.scheme)
        check_field_scheme(field, self.scheme)
        self.monitor = ReconstructionMonitor() if self.grad == "auto" else None

    def forward(self, x: Tensor) -> Tensor:
        return integrate(self.field, x, self.curve, self.scheme, self.depth, self.grad, self.monitor)

    def extra_repr(self) -> str:
        return (f"field={self.field}, depth={self.depth}, scheme={self.scheme!r}, interp={self.curve.interp!r}, "
                f"grad={self.grad!r}")


class FlatLinear(nn.Linear):
    """The mlp stem: a Linear layer on the flattened sample, so that an mlp takes images too
    (Fashion-MNIST's (1, 28, 28) as 784 features). Only the sample's own ``sample_dims`` axes are
    flattened, so leading axes pass through as with ``nn.Linear``. Its state-dict keys are Linear's."""

    def __init__(self, in_shape: tuple[int, ...], out_features: int):
        super().__init__(math.prod(in_shape), out_features)
        self.sample_dims = len(in_shape)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.flatten(-self.sample_dims) if self.sample_dims > 1 else x)


@dataclass
class ODENetConfig:
    """Everything needed to rebuild an ODENet; stored in every checkpoint."""

    arch: str = "mlp"  # "mlp": vectors (or flattened images) in, two-layer-perceptron fields; "conv": images, conv fields;
    # "resnet": a torchvision-layout ResNet (stem → [transition block → ODE block] → head), see resnet.py
    in_shape: tuple[int, ...] = (64,)  # (features,) or (channels, height, width)
    num_classes: int = 10
    widths: tuple[int, ...] = (32,)  # state width (mlp) or channels (conv) of each stage
    depths: tuple[int, ...] = (32,)  # steps of each ODE block
    knots: tuple[int, ...] | None = None  # knots of each stage's curve (default: its depth)
    hidden: int = 64  # hidden width of the perceptron field
    field: str | None = None  # override the arch's field ("linear" for mlp)
    activation: str = "gelu"
    groups: int = 8  # GroupNorm groups in conv fields and head
    stem_stride: int = 1  # conv stem stride
    scheme: str = "euler"
    interp: str = "linear"
    n_basis: int | None = None  # B-splines of the "smooth" interpolation
    grad: str = "backprop"  # gradient method of the ODE blocks (training only; outputs do not depend on it)
    # arch "resnet" only:
    block: str = "basic"  # "basic" (resnet18/34) or "bottleneck" (resnet50/101/152, wide, ResNeXt)
    inner: tuple[int, ...] | None = None  # inner width of each stage's blocks (default: widths, or widths/4)
    cardinality: int = 1  # groups of the bottleneck's 3×3 conv (ResNeXt)
    stem_width: int = 64  # channels of the stem conv
    stem_kernel: int = 7  # 7: torchvision's 7×7/2 conv + maxpool; 3: the small-image 3×3/1 stem, no maxpool
    bn: str = "fold"  # BatchNorm folded into the convs, or kept "frozen" as scale and shift (fine-tuning)
    normalize: tuple[float, ...] | None = None  # per-channel means then standard deviations applied to every input,
    # (x − mean) / std, before the stem: in PyTorch, in exported graphs (a Sub/Div prefix) and by every command

    def __post_init__(self):
        for name in ("in_shape", "widths", "depths", "knots", "inner"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(int(v) for v in value))
        if self.normalize is not None:
            self.normalize = check_normalize(self.normalize, self.in_shape)
        check_choice("arch", self.arch, dict.fromkeys(ARCHS))
        check_choice("scheme", self.scheme, SCHEMES)
        check_choice("interpolation", self.interp, INTERPOLATIONS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("gradient method", self.grad, GRADIENTS)
        check_compatible(self.grad, self.scheme)
        if self.knots is None:
            self.knots = self.depths
        if not len(self.widths) == len(self.depths) == len(self.knots) >= 1:
            raise ResodeError("widths, depths and knots need one entry per stage")
        for name in ("in_shape", "widths", "knots"):
            if any(v < 1 for v in getattr(self, name)):
                raise ResodeError(f"{name} must be positive integers, got {list(getattr(self, name))}")
        for name in ("num_classes", "hidden", "groups", "stem_stride"):
            if getattr(self, name) < 1:
                raise ResodeError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.arch == "resnet":
            self._check_resnet()
        allowed = {"mlp": ("mlp", "linear"), "conv": ("conv",), "resnet": ("resnet",)}[self.arch]
        if (self.field or self.arch) not in allowed:
            raise ResodeError(f"arch {self.arch!r} takes fields {', '.join(allowed)}, not {self.field!r}")
        if self.arch == "conv" and any(w % self.groups for w in self.widths):
            raise ResodeError(f"conv widths {list(self.widths)} must be multiples of groups ({self.groups}, the "
                              f"GroupNorm groups); use --width {self.groups}, {2 * self.groups}, {4 * self.groups}, ...")
        for d in self.depths:
            check_depth(d)
        if not self.in_shape:
            raise ResodeError("in_shape needs at least one dimension, got ()")
        if self.arch != "mlp" and len(self.in_shape) != 3:  # an mlp flattens whatever it is given
            raise ResodeError(f"arch {self.arch!r} needs image inputs (channels, height, width), got samples of "
                              f"shape {self.in_shape}; use --arch mlp, or image data (fashion-mnist, digits-images, "
                              "or an .npz of images)")

    def _check_resnet(self) -> None:
        check_choice("block", self.block, dict.fromkeys(BLOCK_KINDS))
        check_choice("BatchNorm form", self.bn, dict.fromkeys(BN_FORMS))
        if self.inner is None:
            self.inner = self.widths if self.block == "basic" else tuple(w // 4 for w in self.widths)
        if len(self.inner) != len(self.widths) or min(self.inner) < 1:
            raise ResodeError(f"inner widths {list(self.inner)} need one positive entry per stage")
        if self.stem_kernel not in STEM_KERNELS:
            raise ResodeError(f"stem_kernel must be one of {list(STEM_KERNELS)}, got {self.stem_kernel}")
        if self.cardinality < 1 or self.stem_width < 1:
            raise ResodeError("cardinality and stem_width must be positive integers")
        if any(m % self.cardinality for m in self.inner):
            raise ResodeError(f"inner widths {list(self.inner)} must be multiples of the cardinality {self.cardinality}")
        if self.cardinality > 1 and self.block != "bottleneck":
            raise ResodeError("a cardinality above 1 (ResNeXt) needs bottleneck blocks")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ODENetConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ResodeError(f"unknown config keys {sorted(unknown)}")
        return cls(**data)


def _make_field(config: ODENetConfig, width: int, stage: int = 0) -> Field:
    kind = config.field or config.arch
    if kind == "resnet":
        return ResBlockField(width, config.inner[stage], config.block, config.cardinality, config.bn)
    if kind == "mlp":
        return MLPField(width, config.hidden, config.activation)
    if kind == "conv":
        return ConvField(width, config.groups, config.activation)
    if kind == "linear":
        return LinearField(width)
    raise ResodeError(f"unknown field {kind!r}; valid fields are: mlp, conv, linear")


def _init_knots(field: Field, num_knots: int, init: str, generator: torch.Generator) -> dict[str, Tensor]:
    if init == "smooth":  # tied weights: one draw copied to every knot (Marion et al. 2024)
        one = field.init(generator)
        return {k: v.expand(num_knots, *v.shape).clone() for k, v in one.items()}
    if init == "iid":
        draws = [field.init(generator) for _ in range(num_knots)]
        return {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
    raise ResodeError(f"unknown init {init!r}; valid inits are: {', '.join(INITS)}")


class ODENet(nn.Module):
    """stem → [ODE block → transition] × stages → head, built from an :class:`ODENetConfig`.

    Args:
        config: the architecture.
        init: ``smooth`` (tied weights, zero output layer) or ``iid`` (an independent draw per knot).
        seed: seed of the initialization.
    """

    def __init__(self, config: ODENetConfig, init: str = "smooth", seed: int = 0):
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):  # seed the torch.nn layers without touching the caller's RNG
            torch.manual_seed(seed)
            self._build(config, init, torch.Generator().manual_seed(seed))

    def _build(self, config: ODENetConfig, init: str, gen: torch.Generator) -> None:
        w = config.widths
        act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[config.activation]
        if config.arch == "resnet":
            self.stem = Stem(config.in_shape[0], config.stem_width, config.bn, config.stem_kernel)
            self.transitions = nn.ModuleList(
                ResidualBlock(a, b, m, stage_stride(i), config.block, config.cardinality, config.bn)
                for i, (a, b, m) in enumerate(zip((config.stem_width, *w[:-1]), w, config.inner))
            )
            self.head = Head(w[-1], config.num_classes)
        elif config.arch == "mlp":
            self.stem = FlatLinear(config.in_shape, w[0])
            self.transitions = nn.ModuleList(nn.Linear(a, b) for a, b in zip(w[:-1], w[1:]))
            self.head = nn.Linear(w[-1], config.num_classes)
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(config.in_shape[0], w[0], 3, stride=config.stem_stride, padding=1), act()
            )
            self.transitions = nn.ModuleList(
                nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(w[:-1], w[1:])
            )
            self.head = nn.Sequential(
                nn.GroupNorm(config.groups, w[-1]), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(w[-1], config.num_classes),
            )
        blocks = []
        for stage, (width, depth, num_knots) in enumerate(zip(w, config.depths, config.knots)):
            f = _make_field(config, width, stage)
            knots = {k: v.float() for k, v in _init_knots(f, num_knots, init, gen).items()}
            curve = Curve(knots, config.interp, config.n_basis)
            blocks.append(ODEBlock(f, curve, depth, config.scheme, config.grad))
        self.blocks = nn.ModuleList(blocks)

    def order(self) -> list[tuple[str, int]]:
        """The layers between stem and head in order: ("block", i) and ("transition", i).

        ``mlp``/``conv``: block 0, transition 0, block 1, …; ``resnet``: transition 0 (the stage's first
        torchvision block), block 0, transition 1, block 1, ….
        """
        stages = len(self.config.depths)
        if self.config.arch == "resnet":
            return [(kind, i) for i in range(stages) for kind in ("transition", "block")]
        return [item for i in range(stages) for item in [("block", i)] + ([("transition", i)] if i < stages - 1 else [])]

    def run(self, x: Tensor, solve_block=None) -> Tensor:
        """[normalization →] stem → the layers of :meth:`order` → head, with ``solve_block(i, block, x)`` for the
        ODE blocks."""
        norm = normalization(self.config)
        if norm is not None:
            x = (x - norm[0].to(x)) / norm[1].to(x)
        x = self.stem(x)
        for kind, i in self.order():
            if kind == "transition":
                x = self.transitions[i](x)
            else:
                x = self.blocks[i](x) if solve_block is None else solve_block(i, self.blocks[i], x)
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, *in_shape) → logits (B, num_classes)."""
        return self.run(x)

    @contextmanager
    def solving_at(self, depths: tuple[int, ...] | list[int] | None = None, scheme: str | None = None) -> Iterator[ODENet]:
        """Solve every block with these per-stage ``depths`` and this ``scheme`` inside the ``with``; the
        model's own come back after it. Depth-robust training draws one per batch; the knots are the same."""
        saved = [(b.depth, b.scheme) for b in self.blocks]
        if depths is not None and len(depths) != len(self.blocks):
            raise ResodeError(f"got {len(depths)} depths for a model with {len(self.blocks)} stages")
        try:
            for i, b in enumerate(self.blocks):
                if depths is not None:
                    b.depth = check_depth(int(depths[i]))
                if scheme is not None:
                    check_compatible(b.grad, scheme)
                    check_field_scheme(b.field, scheme)
                    b.scheme = check_choice("scheme", scheme, SCHEMES)
            yield self
        finally:
            for b, (d, s) in zip(self.blocks, saved):
                b.depth, b.scheme = d, s

    def block_inputs(self, x: Tensor) -> list[Tensor]:
        """The input of every ODE block on x."""
        inputs = []

        def keep(i, block, x):
            inputs.append(x)
            return block(x)

        self.run(x, keep)
        return inputs

    def discretize(
        self,
        depth: int | tuple[int, ...] | None = None,
        scheme: str | None = None,
        interp: str | None = None,
        n_basis: int | None = None,
        grad: str | None = None,
    ) -> ODENet:
        """A copy that solves the same curves with another depth, scheme or interpolation.

        Args:
            depth: steps of every block, or one per stage; None keeps each block's own.
            scheme: a key of ``SCHEMES``; None keeps the model's.
            interp: a key of ``INTERPOLATIONS``; None keeps the model's.
            grad: a key of ``GRADIENTS``; None keeps the model's.
        Returns:
            a new ODENet (the knots are copied, the source is untouched).
        """
        cfg = self.config
        if depth is None:
            depths = cfg.depths
        elif isinstance(depth, int):
            depths = (depth,) * len(self.blocks)
        else:
            depths = tuple(depth)
            if len(depths) != len(self.blocks):
                raise ResodeError(f"got {len(depths)} depths for a model with {len(self.blocks)} stages")
        new_cfg = replace(
            cfg,
            depths=depths,
            scheme=scheme or cfg.scheme,
            interp=interp or cfg.interp,
            n_basis=n_basis if n_basis is not None else (cfg.n_basis if interp in (None, cfg.interp) else None),
            grad=grad or cfg.grad,
        )
        return self._with_blocks(new_cfg, [
            ODEBlock(b.field, Curve(_copy_knots(b.curve.knots), new_cfg.interp, new_cfg.n_basis), d, new_cfg.scheme,
                     new_cfg.grad)
            for b, d in zip(self.blocks, depths)
        ])

    def _with_blocks(self, config: ODENetConfig, blocks: list[ODEBlock]) -> ODENet:
        """A copy with this config and these blocks; stem, transitions and head are copied."""
        own = self.blocks
        self.blocks = nn.ModuleList()  # the old knots need no copy: they are replaced
        try:
            new = copy.deepcopy(self)
        finally:
            self.blocks = own
        new.config, new.blocks = config, nn.ModuleList(blocks)
        return new.train(self.training)


def _copy_knots(knots: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in knots.items()}


def untie(model: ODENet) -> ODENet:
    """A copy whose curves have one knot per step, θ_n = θ(n/M), sampled from the current curves.

    A tied model (one knot per stage, Sander et al. 2022's pretraining) becomes a deep ResNet with
    identical weights at every step: a perfectly smooth start for fine-tuning, same outputs.
    """
    knots = tuple(b.depth for b in model.blocks)
    with torch.no_grad():
        blocks = [ODEBlock(b.field, Curve(_copy_knots(b.curve.sample([n / m for n in range(m)])), b.curve.interp, None),
                           m, b.scheme, b.grad)
                  for b, m in zip(model.blocks, knots)]
    return model._with_blocks(replace(model.config, knots=knots, n_basis=None), blocks)


__all__ = ["MAX_DEPTH", "ODEBlock", "ODENet", "ODENetConfig", "check_depth", "untie"]
