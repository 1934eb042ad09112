"""Residual function families f(x, θ).

A field is pure: it describes the shapes of its parameters and how to apply them, but owns
no parameters, so one field serves a ResNet of any depth and the curve θ(t) of its limit
ODE (Sander et al. 2022; Marion et al. 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import check_choice

Theta = dict[str, Tensor]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


@dataclass(frozen=True)
class Field:
    """Base class: ``f(x, theta)`` with ``theta`` a dict of tensors of :meth:`param_shapes`."""

    name: ClassVar[str]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def init(self, generator: torch.Generator | None = None) -> Theta:
        """One layer's parameters for a smooth-in-depth start (Marion et al. 2024).

        The output layer is zero, so every residual function starts at 0 and the network
        starts as the identity ODE; copying the same draw to every knot gives tied weights.
        """
        raise NotImplementedError

    def __call__(self, x: Tensor, theta: Theta) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        return {"kind": self.name, **self.__dict__}

    # A projected field makes every step of a solve end with a projection P onto its state set:
    # x_{n+1} = P(x_n + h Σ b_i k_i). torchvision blocks compute relu(x + F(x)), the Euler step projected
    # by P = relu. The identity for every other field.
    projection: ClassVar[str | None] = None

    def project(self, x: Tensor) -> Tensor:
        """P(x): the end of every step."""
        return x

    def project_vjp(self, projected: Tensor, cotangent: Tensor) -> Tensor:
        """The cotangent of P's input, from P's *output* and the cotangent of that output."""
        return cotangent


def _uniform(shape, bound: float, generator) -> Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


@dataclass(frozen=True)
class MLPField(Field):
    """Two-layer perceptron ``V σ(W x + b)``: x (B, dim) → (B, dim), hidden width ``hidden``."""

    name: ClassVar[str] = "mlp"
    dim: int
    hidden: int
    activation: str = "gelu"

    def __post_init__(self):
        check_choice("activation", self.activation, ACTIVATIONS)

    def param_shapes(self):
        return {"W": (self.hidden, self.dim), "b": (self.hidden,), "V": (self.dim, self.hidden)}

    def init(self, generator=None):
        bound = 1 / math.sqrt(self.dim)
        return {
            "W": _uniform((self.hidden, self.dim), math.sqrt(3) * bound, generator),
            "b": _uniform((self.hidden,), bound, generator),
            "V": torch.zeros(self.dim, self.hidden, dtype=torch.float64),
        }

    def __call__(self, x, theta):
        z = F.linear(x, theta["W"], theta["b"])  # (B, hidden)
        return F.linear(ACTIVATIONS[self.activation](z), theta["V"])  # (B, dim)


@dataclass(frozen=True)
class ConvField(Field):
    """Conv block ``conv3x3 → GroupNorm → σ → conv3x3`` on x (B, C, H, W) → (B, C, H, W).

    GroupNorm normalizes each sample on its own, so a sample's output never depends on the
    rest of its batch (unlike BatchNorm), which keeps the field a function of x alone.
    """

    name: ClassVar[str] = "conv"
    channels: int
    groups: int = 8
    activation: str = "relu"

    def __post_init__(self):
        check_choice("activation", self.activation, ACTIVATIONS)
        if self.channels % self.groups:
            raise ValueError(f"channels ({self.channels}) must be a multiple of groups ({self.groups})")

    def param_shapes(self):
        c = self.channels
        return {
            "w1": (c, c, 3, 3), "b1": (c,), "gamma": (c,), "beta": (c,),
            "w2": (c, c, 3, 3), "b2": (c,),
        }

    def init(self, generator=None):
        c = self.channels
        bound = math.sqrt(6 / (9 * c))  # Kaiming uniform for ReLU
        return {
            "w1": _uniform((c, c, 3, 3), bound, generator),
            "b1": torch.zeros(c, dtype=torch.float64),
            "gamma": torch.ones(c, dtype=torch.float64),
            "beta": torch.zeros(c, dtype=torch.float64),
            "w2": torch.zeros(c, c, 3, 3, dtype=torch.float64),
            "b2": torch.zeros(c, dtype=torch.float64),
        }

    def __call__(self, x, theta):
        z = F.conv2d(x, theta["w1"], theta["b1"], padding=1)  # (B, C, H, W)
        z = F.group_norm(z, self.groups, theta["gamma"], theta["beta"])
        return F.conv2d(ACTIVATIONS[self.activation](z), theta["w2"], theta["b2"], padding=1)


@dataclass(frozen=True)
class LinearField(Field):
    """Linear residual ``A x``: x (B, dim) → (B, dim) (the linear case of Sander et al. 2022)."""

    name: ClassVar[str] = "linear"
    dim: int

    def param_shapes(self):
        return {"A": (self.dim, self.dim)}

    def init(self, generator=None):
        return {"A": torch.zeros(self.dim, self.dim, dtype=torch.float64)}

    def __call__(self, x, theta):
        return F.linear(x, theta["A"])


BLOCK_KINDS = ("basic", "bottleneck")
BN_FORMS = ("fold", "frozen")


@dataclass(frozen=True)
class ResBlockField(Field):
    """A torchvision ResNet block's residual branch F, on x (B, C, H, W) → (B, C, H, W), with the
    step projected by ReLU: x_{n+1} = relu(x_n + h g(x_n, θ_n)) is the block relu(x + F(x)) when
    h g = F.

    ``basic`` (resnet18/34): conv3x3 → BN → relu → conv3x3 → BN, inner width ``inner``.
    ``bottleneck`` (resnet50/101/152, wide, ResNeXt): conv1x1 → BN → relu → conv3x3 (``cardinality``
    groups) → BN → relu → conv1x1 → BN, inner width ``inner``.

    BatchNorm with inference statistics is an affine map per channel. ``bn="fold"`` folds it into
    the convolution (weights w_i and biases b_i: what a deployed graph runs); ``bn="frozen"`` keeps it
    as a per-channel scale s_i and shift t_i after a bias-free convolution (torchvision's
    FrozenBatchNorm2d): the same function, but fine-tuning moves the convolution and the BN affine at
    their own scales, as they were trained.
    """

    name: ClassVar[str] = "resblock"
    projection: ClassVar[str | None] = "relu"
    channels: int
    inner: int
    block: str = "basic"  # not "kind": Field.config() stores the field's name under that key
    cardinality: int = 1
    bn: str = "fold"

    def __post_init__(self):
        check_choice("block", self.block, dict.fromkeys(BLOCK_KINDS))
        check_choice("BatchNorm form", self.bn, dict.fromkeys(BN_FORMS))
        if self.inner % self.cardinality:
            raise ValueError(f"inner width {self.inner} must be a multiple of the cardinality {self.cardinality}")

    def convs(self) -> list[tuple[tuple[int, ...], int, int]]:
        """(weight shape, padding, groups) of each convolution."""
        c, m = self.channels, self.inner
        if self.block == "basic":
            return [((m, c, 3, 3), 1, 1), ((c, m, 3, 3), 1, 1)]
        return [((m, c, 1, 1), 0, 1), ((m, m // self.cardinality, 3, 3), 1, self.cardinality), ((c, m, 1, 1), 0, 1)]

    def param_shapes(self):
        shapes = {}
        for i, (shape, _, _) in enumerate(self.convs(), start=1):
            shapes[f"w{i}"] = shape
            if self.bn == "fold":
                shapes[f"b{i}"] = (shape[0],)
            else:
                shapes[f"s{i}"], shapes[f"t{i}"] = (shape[0],), (shape[0],)
        return shapes

    def init(self, generator=None):
        theta = {}
        convs = self.convs()
        for i, (shape, _, _) in enumerate(convs, start=1):
            fan_in = shape[1] * shape[2] * shape[3]
            last = i == len(convs)
            theta[f"w{i}"] = (torch.zeros(shape, dtype=torch.float64) if last and self.bn == "fold"
                              else _uniform(shape, math.sqrt(6 / fan_in), generator))
            if self.bn == "fold":
                theta[f"b{i}"] = torch.zeros(shape[0], dtype=torch.float64)
            else:  # a zero last scale: the branch starts at 0 (torchvision's zero_init_residual)
                theta[f"s{i}"] = torch.full((shape[0],), 0.0 if last else 1.0, dtype=torch.float64)
                theta[f"t{i}"] = torch.zeros(shape[0], dtype=torch.float64)
        return theta

    def __call__(self, x, theta):
        convs = self.convs()
        for i, (_, padding, groups) in enumerate(convs, start=1):
            if self.bn == "fold":
                x = F.conv2d(x, theta[f"w{i}"], theta[f"b{i}"], padding=padding, groups=groups)
            else:
                x = F.conv2d(x, theta[f"w{i}"], None, padding=padding, groups=groups)
                x = x * theta[f"s{i}"][:, None, None] + theta[f"t{i}"][:, None, None]
            if i < len(convs):
                x = F.relu(x)
        return x

    def project(self, x):
        return F.relu(x)

    def project_vjp(self, projected, cotangent):
        # relu'(z) = [z > 0] (torch's choice at 0), and z > 0 exactly where relu(z) > 0
        return cotangent * (projected > 0).to(cotangent.dtype)


FIELDS: dict[str, type[Field]] = {f.name: f for f in (MLPField, ConvField, LinearField, ResBlockField)}


def make_field(config: dict) -> Field:
    """Build a field from its :meth:`Field.config` dict."""
    kwargs = dict(config)
    kind = check_choice("field", kwargs.pop("kind"), FIELDS)
    return FIELDS[kind](**kwargs)
