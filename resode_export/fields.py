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


FIELDS: dict[str, type[Field]] = {f.name: f for f in (MLPField, ConvField, LinearField)}


def make_field(config: dict) -> Field:
    """Build a field from its :meth:`Field.config` dict."""
    kwargs = dict(config)
    kind = check_choice("field", kwargs.pop("kind"), FIELDS)
    return FIELDS[kind](**kwargs)
