"""Residual function families f(x, θ).

A field is pure: it describes the shapes of its parameters and how to apply them, but owns
no parameters, so one field serves a ResNet of any depth and the curve θ(t) of its limit
ODE (Sander et al. 2022; Marion et al. 2024).
"""

from __future__ import annotations

import functools
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

    def vjp(self, x: Tensor, theta: Theta, cotangent: Tensor) -> tuple[Tensor, list[Tensor | None]]:
        """(∂f/∂x)ᵀ v and [(∂f/∂θ_k)ᵀ v in ``theta``'s key order] at (x, θ), for v = ``cotangent``.

        The adjoint methods need these without f's value. This default differentiates f by
        autograd; fields that end with a linear layer override :meth:`_vjp_split` so that the
        layer's forward is never run: its VJP needs only its input (one convolution or matmul
        fewer per backward step, and one activation less held).
        """
        split = self._vjp_split()
        if split is None:
            _, x_bar, theta_bars = self.vjp_with_value(x, theta, cotangent)
            return x_bar, theta_bars
        head, tail = split
        tail_grads: dict[str, Tensor] = {}
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            leaves = {k: theta[k].detach().requires_grad_(True) for k in head}
            # the graph, not this frame, holds the hidden input: freed as soon as its last user ran
            tail_theta = {k: v.detach() for k, v in theta.items() if k not in leaves}
            root = _TailVJP.apply(tail, tail_theta, cotangent, tail_grads, self._vjp_hidden(x, leaves))
            grads = torch.autograd.grad(root, [x, *leaves.values()], allow_unused=True)
        by_name = dict(zip(head, grads[1:])) | tail_grads
        return grads[0], [by_name.get(k) for k in theta]

    def vjp_with_value(self, x: Tensor, theta: Theta, cotangent: Tensor) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        """f(x, θ) and the VJPs of :meth:`vjp`, from one evaluation by autograd (for methods that need f too)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
            out = self(x, leaves)
            grads = torch.autograd.grad(out, [x, *leaves.values()], cotangent, allow_unused=True)
        return out.detach(), grads[0], list(grads[1:])

    def _vjp_split(self):
        """None, or (names of the weights before the last linear layer, that layer's VJP): the VJP is a
        function (hidden, θ, v) → (cotangent of hidden, {name: weight gradient}), and
        :meth:`_vjp_hidden` computes the hidden input of that layer."""
        return None

    def _vjp_hidden(self, x: Tensor, theta: Theta) -> Tensor:
        raise NotImplementedError

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


class _TailVJP(torch.autograd.Function):
    """The root of a field's VJP graph (:meth:`Field.vjp`): a scalar whose backward is the last linear
    layer's VJP with the cotangent v, computed from the layer's input h alone. It writes the layer's
    weight gradients into ``out_grads`` and hands the cotangent of h to the rest of the graph."""

    @staticmethod
    def forward(ctx, tail, theta, v, out_grads, h):
        ctx.tail, ctx.theta, ctx.v, ctx.out_grads = tail, theta, v, out_grads
        ctx.save_for_backward(h)
        return h.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        (h,) = ctx.saved_tensors
        h_bar, grads = ctx.tail(h, ctx.theta, ctx.v)
        ctx.out_grads.update(grads)
        return None, None, None, None, h_bar


def _linear_vjp(weight: str, bias: str | None):
    """The VJP of y = h Wᵀ (+ b) over the last axis, from its input h alone."""

    def vjp(h, theta, v):
        w = theta[weight]
        grads = {weight: v.reshape(-1, v.shape[-1]).T @ h.reshape(-1, h.shape[-1])}
        if bias is not None:
            grads[bias] = v.reshape(-1, v.shape[-1]).sum(0)
        return v @ w, grads

    return vjp


def _conv_vjp(weight: str, shift: str, scale: str | None, padding: int, groups: int):
    """The VJP of y = conv(h, w) · s + t (per output channel; s = 1 without ``scale``), from h alone.

    With G = ∂⟨v, conv(h, w)⟩/∂w (one weight-gradient convolution): w̄ = s G, s̄_c = Σ w_c ⊙ G_c
    (⟨v_c, conv(h, w)_c⟩ is linear in w_c), t̄ = Σ v, h̄ = conv_input_grad(w, s v).
    """

    def vjp(h, theta, v):
        if h.dim() == 3:  # an unbatched sample, which F.conv2d takes too
            h_bar, grads = vjp(h[None], theta, v[None])
            return h_bar[0], grads
        # in the dtype F.conv2d would run in (autocast's, when it is on), gradients back in their tensors' dtypes
        dtype = _conv_dtype(h)
        w, hc, vc = theta[weight].to(dtype), h.to(dtype), v.to(dtype)
        conv_grads = functools.partial(torch.ops.aten.convolution_backward, stride=[1, 1], padding=[padding] * 2,
                                       dilation=[1, 1], transposed=False, output_padding=[0, 0], groups=groups)
        if scale is None:
            h_bar, w_bar, t_bar = conv_grads(vc, hc, w, bias_sizes=[w.shape[0]], output_mask=[True, True, True])
            return h_bar.to(h.dtype), {weight: w_bar.to(theta[weight].dtype), shift: t_bar.to(theta[shift].dtype)}
        s = theta[scale].to(dtype)
        h_bar = conv_grads(vc * s[:, None, None], hc, w, bias_sizes=None, output_mask=[True, False, False])[0]
        g = conv_grads(vc, hc, w, bias_sizes=None, output_mask=[False, True, False])[1]  # G (not w̄ / s: s may be 0)
        return h_bar.to(h.dtype), {weight: (g * s[:, None, None, None]).to(theta[weight].dtype),
                                   scale: (w * g).sum((1, 2, 3)).to(theta[scale].dtype),
                                   shift: vc.sum((0, 2, 3)).to(theta[shift].dtype)}

    return vjp


def _conv_dtype(h: Tensor) -> torch.dtype:
    """The dtype a convolution of h runs in: autocast's when autocast is on for h's device, else h's."""
    kind = h.device.type
    try:  # the device-type forms of these two came with torch 2.4
        if h.is_floating_point() and torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (TypeError, AttributeError, RuntimeError):
        pass
    return h.dtype


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
        return F.linear(self._vjp_hidden(x, theta), theta["V"])  # (B, dim)

    def _vjp_hidden(self, x, theta):
        return ACTIVATIONS[self.activation](F.linear(x, theta["W"], theta["b"]))  # (B, hidden)

    def _vjp_split(self):
        return ("W", "b"), _linear_vjp("V", None)


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
        return F.conv2d(self._vjp_hidden(x, theta), theta["w2"], theta["b2"], padding=1)

    def _vjp_hidden(self, x, theta):
        z = F.conv2d(x, theta["w1"], theta["b1"], padding=1)  # (B, C, H, W)
        return ACTIVATIONS[self.activation](F.group_norm(z, self.groups, theta["gamma"], theta["beta"]))

    def _vjp_split(self):
        return ("w1", "b1", "gamma", "beta"), _conv_vjp("w2", "b2", None, padding=1, groups=1)


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

    def _vjp_hidden(self, x, theta):
        return x

    def _vjp_split(self):
        return (), _linear_vjp("A", None)


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
        return self._layers(x, theta, len(self.convs()))

    def _layers(self, x, theta, count):
        """The first ``count`` conv (+ BN) layers, each but the branch's last followed by ReLU."""
        convs = self.convs()
        for i, (_, padding, groups) in enumerate(convs[:count], start=1):
            if self.bn == "fold":
                x = F.conv2d(x, theta[f"w{i}"], theta[f"b{i}"], padding=padding, groups=groups)
            else:
                x = F.conv2d(x, theta[f"w{i}"], None, padding=padding, groups=groups)
                x = x * theta[f"s{i}"][:, None, None] + theta[f"t{i}"][:, None, None]
            if i < len(convs):
                x = F.relu(x)
        return x

    def _vjp_hidden(self, x, theta):
        return self._layers(x, theta, len(self.convs()) - 1)

    def _vjp_split(self):
        last = len(self.convs())
        _, padding, groups = self.convs()[-1]
        head = tuple(k for k in self.param_shapes() if int(k[1:]) < last)
        if self.bn == "fold":
            return head, _conv_vjp(f"w{last}", f"b{last}", None, padding, groups)
        return head, _conv_vjp(f"w{last}", f"t{last}", f"s{last}", padding, groups)

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
