"""Explicit Runge–Kutta schemes as validated Butcher tableaux, run by one generic stepper.

A block integrates dx/dt = f(x, θ(t)) on [0, 1] in M steps of size h = 1/M. Step n starts
at t_n = n/M and its stage i evaluates f at t_n + c_i h with the weights θ(t_n + c_i h).
``euler`` at the native depth N is exactly the ResNet x_{n+1} = x_n + h f(x_n, θ_n).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np
from torch import Tensor

from .errors import ResodeError, check_choice
from .fields import Field, Theta

_TOL = 1e-12


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method: a (s, s) strictly lower triangular, b (s,), c (s,).

    Construction checks the shapes, Σ_j a_ij = c_i, and the order conditions up to the
    declared ``order`` (at most 4), so a mistyped coefficient fails at import time.
    """

    name: str
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    order: int

    def __post_init__(self):
        s = len(self.b)
        a, b, c = np.array(self.a, dtype=float), np.array(self.b, dtype=float), np.array(self.c, dtype=float)
        if a.shape != (s, s) or c.shape != (s,):
            raise ValueError(f"{self.name}: a must be ({s}, {s}) and c ({s},) for {s} stages")
        if np.any(np.triu(a) != 0):
            raise ValueError(f"{self.name}: a must be strictly lower triangular (explicit scheme)")
        if np.max(np.abs(a.sum(axis=1) - c)) > _TOL:
            raise ValueError(f"{self.name}: rows of a must sum to c")
        conditions = [
            (1, b.sum(), 1.0),
            (2, b @ c, 1 / 2),
            (3, b @ c**2, 1 / 3),
            (3, b @ a @ c, 1 / 6),
            (4, b @ c**3, 1 / 4),
            (4, (b * c) @ a @ c, 1 / 8),
            (4, b @ a @ c**2, 1 / 12),
            (4, b @ a @ a @ c, 1 / 24),
        ]
        if not 1 <= self.order <= 4:
            raise ValueError(f"{self.name}: declared order must be 1..4, got {self.order}")
        for order, value, target in conditions:
            if order <= self.order and abs(value - target) > _TOL:
                raise ValueError(f"{self.name}: order condition of order {order} fails ({value} != {target})")

    @property
    def stages(self) -> int:
        return len(self.b)


def _tableau(name, a, b, order) -> ButcherTableau:
    a = tuple(tuple(float(Fraction(v)) for v in row) for row in a)
    return ButcherTableau(name, a, tuple(float(Fraction(v)) for v in b), tuple(sum(r) for r in a), order)


SCHEMES: dict[str, ButcherTableau] = {
    t.name: t
    for t in (
        _tableau("euler", [[0]], [1], 1),
        _tableau("midpoint", [[0, 0], ["1/2", 0]], [0, 1], 2),
        _tableau("heun", [[0, 0], [1, 0]], ["1/2", "1/2"], 2),
        _tableau("ralston", [[0, 0], ["2/3", 0]], ["1/4", "3/4"], 2),
        _tableau(
            "rk4",
            [[0, 0, 0, 0], ["1/2", 0, 0, 0], [0, "1/2", 0, 0], [0, 0, 1, 0]],
            ["1/6", "1/3", "1/3", "1/6"],
            4,
        ),
        _tableau(
            "rk38",
            [[0, 0, 0, 0], ["1/3", 0, 0, 0], ["-1/3", 1, 0, 0], [1, -1, 1, 0]],
            ["1/8", "3/8", "3/8", "1/8"],
            4,
        ),
    )
}


@dataclass(frozen=True)
class ReversibleHeun:
    """Reversible Heun (Kidger, Foster, Li, Lyons 2021): an algebraically reversible order-2 scheme.

    It carries a second state ẑ (ẑ_0 = x_0) and evaluates f once per step:

        ẑ_{n+1} = 2 x_n − ẑ_n + h f(ẑ_n, θ(t_n))
        x_{n+1} = x_n + (h/2) [f(ẑ_n, θ(t_n)) + f(ẑ_{n+1}, θ(t_{n+1}))]

    and each step can be undone exactly (up to rounding), from (x_{n+1}, ẑ_{n+1}) alone:

        ẑ_n = 2 x_{n+1} − ẑ_{n+1} − h f(ẑ_{n+1}, θ(t_{n+1}))
        x_n = x_{n+1} − (h/2) [f(ẑ_n, θ(t_n)) + f(ẑ_{n+1}, θ(t_{n+1}))]

    so the ``reversible`` gradient method back-propagates exactly with memory flat in depth. It
    solves the same ODE as every other scheme: a model moves to it with
    ``model.discretize(scheme="reversible_heun", grad="reversible")`` and back with
    ``model.discretize(scheme="heun", grad="backprop")``; the outputs differ by the schemes'
    O(1/M²) discretization errors.
    """

    name: str = "reversible_heun"
    c: tuple[float, ...] = (0.0, 1.0)  # weights are sampled at t_n and t_{n+1}
    order: int = 2

    @property
    def stages(self) -> int:
        return len(self.c)


def reversible_heun_step(field: Field, x: Tensor, z: Tensor, fz: Tensor, theta_next: Theta, h: float):
    """(x_n, ẑ_n, f(ẑ_n)) → (x_{n+1}, ẑ_{n+1}, f(ẑ_{n+1}))."""
    z_next = 2 * x - z + h * fz
    f_next = field(z_next, theta_next)
    return x + (h / 2) * (fz + f_next), z_next, f_next


SCHEMES[ReversibleHeun.name] = ReversibleHeun()


def get_scheme(name: str) -> ButcherTableau | ReversibleHeun:
    return SCHEMES[check_choice("scheme", name, SCHEMES)]


def check_field_scheme(field: Field, scheme: str) -> None:
    """A projected field (torchvision blocks) cannot run the reversible scheme: P is not invertible."""
    if field.projection is not None and isinstance(get_scheme(scheme), ReversibleHeun):
        raise ResodeError(f"scheme {scheme!r} is not available for blocks whose steps end with a {field.projection} "
                          "projection (imported torchvision ResNets): the projection cannot be undone; use heun "
                          "(with --grad symplectic for exact low-memory gradients)")


@lru_cache(maxsize=256)
def stage_grid(scheme: str, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Times at which a solve samples the weights, and which time each stage uses.

    Returns ``times`` (U,) sorted and unique, and ``index`` (depth, stages) with stage i of
    step n at ``times[index[n, i]]`` = (n + c_i) / depth. Stages that share a time (the end of
    one Heun step is the start of the next) share one sample.
    """
    c = np.array(get_scheme(scheme).c)
    raw = (np.arange(depth)[:, None] + c[None, :]) / depth  # (depth, stages)
    times, index = np.unique(np.round(raw, 12), return_inverse=True)
    return times, index.reshape(raw.shape)


def rk_step(field: Field, x: Tensor, thetas: list[Theta], tableau: ButcherTableau, h: float) -> Tensor:
    """One explicit RK step x → P(x + h Σ_i b_i k_i), k_i = f(x + h Σ_j a_ij k_j, thetas[i]).

    P is the field's projection (:meth:`Field.project`): the identity, or ReLU for torchvision
    blocks, whose step relu(x + F(x)) is the projected Euler step.
    """
    ks: list[Tensor] = []
    for i, theta in enumerate(thetas):
        xi = x
        for j, aij in enumerate(tableau.a[i][:i]):
            if aij:
                xi = xi + (h * aij) * ks[j]
        ks.append(field(xi, theta))
    if tableau.stages == 1:
        return field.project(x + h * ks[0])  # the ResNet step, bit for bit
    update = sum((bi * k for bi, k in zip(tableau.b, ks) if bi), start=x.new_zeros(()))
    return field.project(x + h * update)


def solve(field: Field, x: Tensor, params: dict[str, Tensor], scheme: str, depth: int) -> Tensor:
    """Integrate dx/dt = f(x, θ(t)) over [0, 1] in ``depth`` steps of ``scheme``.

    Args:
        field: the residual function family.
        x: initial state (B, *state_shape).
        params: θ sampled at ``stage_grid(scheme, depth)[0]``: name → (U, *shape).
    Returns:
        the final state, same shape as x.
    """
    tableau = get_scheme(scheme)
    _, index = stage_grid(scheme, depth)
    h = 1.0 / depth
    if isinstance(tableau, ReversibleHeun):
        check_field_scheme(field, scheme)
        z, fz = x, field(x, {k: v[index[0][0]] for k, v in params.items()})
        for n in range(depth):
            x, z, fz = reversible_heun_step(field, x, z, fz, {k: v[index[n][1]] for k, v in params.items()}, h)
        return x
    for n in range(depth):
        thetas = [{k: v[u] for k, v in params.items()} for u in index[n]]
        x = rk_step(field, x, thetas, tableau, h)
    return x
