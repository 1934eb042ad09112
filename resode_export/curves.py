"""Weights as functions of depth: θ(t) for t ∈ [0, 1].

A curve holds K knots θ_k (stacked tensors, leading axis K) at times t_k = k/K, so a
ResNet of depth N gives a curve with N knots and its step n sits at t_n = n/N
(Sander et al. 2022). Every interpolation here is linear in the knots:
θ(t) = Σ_k w_k(t) θ_k, so :meth:`Curve.basis` returns the weights w (T, K) and sampling is
one matrix product. On [t_{K-1}, 1] each interpolation continues its last piece.

Interpolations (``INTERPOLATIONS``):

- ``constant``: θ(t) = θ_k on [t_k, t_{k+1}) (the ResNet's own piecewise-constant weights).
- ``linear``: piecewise linear between neighbouring knots.
- ``cubic``: the not-a-knot cubic spline (the default of scipy's ``CubicSpline``). Unlike the
  natural spline it reproduces every cubic polynomial exactly. K = 3 gives the
  interpolating parabola, K ≤ 2 falls back to ``linear``.
- ``smooth``: least-squares fit of the knots on J < K clamped uniform cubic B-splines
  (J = ``n_basis``, default ⌈√K⌉), for ResNets whose weights are rough in depth. It does
  not pass through the knots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ResodeError, check_choice

_SNAP = 1e-9  # knot coordinates this close to an integer are that integer (t = n/N rounding)


def _knot_coordinates(ts: np.ndarray, num_knots: int) -> np.ndarray:
    u = np.asarray(ts, dtype=np.float64) * num_knots
    r = np.round(u)
    return np.where(np.abs(u - r) <= _SNAP * np.maximum(1.0, np.abs(u)), r, u)


def _constant(u: np.ndarray, num_knots: int) -> np.ndarray:
    w = np.zeros((len(u), num_knots))
    w[np.arange(len(u)), np.clip(np.floor(u), 0, num_knots - 1).astype(int)] = 1.0
    return w


def _segments(u: np.ndarray, num_knots: int) -> tuple[np.ndarray, np.ndarray]:
    """Index i of the segment [i, i+1] holding u (the first/last segment extends outwards)."""
    i = np.clip(np.floor(u), 0, num_knots - 2).astype(int)
    return i, u - i


def _linear(u: np.ndarray, num_knots: int) -> np.ndarray:
    if num_knots == 1:
        return _constant(u, num_knots)
    i, s = _segments(u, num_knots)
    w = np.zeros((len(u), num_knots))
    rows = np.arange(len(u))
    w[rows, i] = 1 - s
    w[rows, i + 1] += s
    return w


@lru_cache(maxsize=64)
def _not_a_knot_second_derivatives(num_knots: int) -> np.ndarray:
    """S (K, K) with m = S y the spline's second derivatives at the knots (unit spacing)."""
    k = num_knots
    a = np.zeros((k, k))
    d = np.zeros((k, k))
    for i in range(1, k - 1):
        a[i, i - 1 : i + 2] = (1, 4, 1)
        d[i, i - 1 : i + 2] = (6, -12, 6)
    # not-a-knot: the third derivative is continuous at the second and second-to-last knots
    a[0, :3] = (1, -2, 1)
    a[-1, -3:] = (1, -2, 1)
    return np.linalg.solve(a, d)


def _cubic(u: np.ndarray, num_knots: int) -> np.ndarray:
    if num_knots <= 2:
        return _linear(u, num_knots)
    if num_knots == 3:  # the not-a-knot spline on 3 points is the interpolating parabola
        w = np.stack([(u - 1) * (u - 2) / 2, -u * (u - 2), u * (u - 1) / 2], axis=1)
        exact = (u == np.round(u)) & (u >= 0) & (u <= 2)  # at the knots themselves, bit for bit
        w[exact] = _constant(u[exact], 3)
        return w
    i, s = _segments(u, num_knots)
    m = _not_a_knot_second_derivatives(num_knots)
    w = np.zeros((len(u), num_knots))
    rows = np.arange(len(u))
    w += (((1 - s) ** 3 - (1 - s)) / 6)[:, None] * m[i] + ((s**3 - s) / 6)[:, None] * m[i + 1]
    w[rows, i] += 1 - s
    w[rows, i + 1] += s
    return w


def bspline_basis(ts: np.ndarray, num_basis: int) -> np.ndarray:
    """Clamped uniform B-splines of degree min(3, J − 1) on [0, 1]: (T,) → (T, J)."""
    p = min(3, num_basis - 1)
    inner = np.linspace(0.0, 1.0, num_basis - p + 1)[1:-1]
    knots = np.concatenate([np.zeros(p + 1), inner, np.ones(p + 1)])
    t = np.clip(np.asarray(ts, dtype=np.float64), 0.0, 1.0)
    b = ((knots[:-1] <= t[:, None]) & (t[:, None] < knots[1:])).astype(np.float64)
    b[t >= 1.0] = 0.0
    b[t >= 1.0, np.flatnonzero(knots[:-1] < knots[1:])[-1]] = 1.0
    for d in range(1, p + 1):
        left, right = knots[: -d - 1], knots[d:-1]
        den = np.where(right > left, right - left, 1.0)
        up = np.where(right > left, (t[:, None] - left) / den, 0.0) * b[:, :-1]
        left2, right2 = knots[1:-d], knots[d + 1 :]
        den2 = np.where(right2 > left2, right2 - left2, 1.0)
        down = np.where(right2 > left2, (right2 - t[:, None]) / den2, 0.0) * b[:, 1:]
        b = up + down
    return b


def default_num_basis(num_knots: int) -> int:
    return max(1, min(num_knots - 1, math.ceil(math.sqrt(num_knots))))


def _smooth(u: np.ndarray, num_knots: int, num_basis: int | None = None) -> np.ndarray:
    j = num_basis or default_num_basis(num_knots)
    if num_knots == 1:
        return _constant(u, 1)
    if not 1 <= j < num_knots:
        raise ResodeError(f"smooth interpolation needs 1 <= n_basis < {num_knots} knots, got {j}")
    fit = np.linalg.pinv(bspline_basis(np.arange(num_knots) / num_knots, j))  # (J, K)
    return bspline_basis(u / num_knots, j) @ fit


INTERPOLATIONS = {"constant": _constant, "linear": _linear, "cubic": _cubic, "smooth": _smooth}


@lru_cache(maxsize=256)
def _basis(interp: str, num_knots: int, n_basis: int | None, ts_bytes: bytes) -> Tensor:
    """Cached weights: every forward pass of a block samples the same stage times."""
    u = _knot_coordinates(np.frombuffer(ts_bytes, dtype=np.float64), num_knots)
    if interp == "smooth":
        return torch.from_numpy(_smooth(u, num_knots, n_basis))
    return torch.from_numpy(INTERPOLATIONS[interp](u, num_knots))


@lru_cache(maxsize=256)
def _pairs(interp: str, num_knots: int, n_basis: int | None, ts_bytes: bytes) -> tuple[Tensor, Tensor] | None:
    """(index (T, 2), weight (T, 2)) for ``constant`` and ``linear``, built without the dense basis."""
    u = _knot_coordinates(np.frombuffer(ts_bytes, dtype=np.float64), num_knots)
    if interp == "constant" or (interp in ("linear", "cubic") and num_knots == 1):
        i = np.clip(np.floor(u), 0, num_knots - 1).astype(np.int64)
        idx, w = np.stack([i, i], axis=1), np.stack([np.ones_like(u), np.zeros_like(u)], axis=1)
    elif interp == "linear" or (interp == "cubic" and num_knots == 2):
        i, s = _segments(u, num_knots)
        idx, w = np.stack([i, i + 1], axis=1).astype(np.int64), np.stack([1 - s, s], axis=1)
    else:
        return None
    return torch.from_numpy(idx), torch.from_numpy(w)


def sparse_weights(interp: str, num_knots: int, n_basis: int | None, ts: np.ndarray) -> list[tuple[Tensor, Tensor]]:
    """For each time: (the knots it depends on, their weights, float64); two knots for constant/linear."""
    key = (interp, num_knots, n_basis, np.ascontiguousarray(ts, dtype=np.float64).tobytes())
    pairs = _pairs(*key)
    if pairs is not None:
        return list(zip(pairs[0], pairs[1]))
    dense = _basis(*key)
    out = []
    for row in dense:
        nz = torch.from_numpy(np.flatnonzero(row.numpy()))
        out.append((nz, row[nz]))
    return out


class Curve(nn.Module):
    """Weights θ(t) on [0, 1] from K knots at t_k = k/K.

    Args:
        knots: name → tensor (K, *shape), the weights of a depth-K ResNet, step by step.
        interp: a key of ``INTERPOLATIONS``.
        n_basis: number of B-splines for ``smooth`` (default ⌈√K⌉).
    """

    def __init__(self, knots: dict[str, Tensor], interp: str = "linear", n_basis: int | None = None):
        super().__init__()
        check_choice("interpolation", interp, INTERPOLATIONS)
        sizes = {v.shape[0] for v in knots.values()}
        if len(sizes) != 1:
            raise ValueError(f"all knots need the same leading size K, got {sorted(sizes)}")
        self.knots = nn.ParameterDict({k: nn.Parameter(v) for k, v in knots.items()})
        self.interp = interp
        self.n_basis = n_basis
        if interp == "smooth" and n_basis is not None and not 1 <= n_basis < max(2, self.num_knots):
            raise ResodeError(f"smooth interpolation needs 1 <= n_basis < {self.num_knots} knots, got {n_basis}")

    @property
    def num_knots(self) -> int:
        return next(iter(self.knots.values())).shape[0]

    def basis(self, ts: Sequence[float] | np.ndarray) -> Tensor:
        """Interpolation weights w (T, K), float64, with θ(ts[i]) = Σ_k w[i, k] θ_k."""
        ts = np.atleast_1d(np.asarray(ts, dtype=np.float64))
        return _basis(self.interp, self.num_knots, self.n_basis, ts.tobytes()).clone()

    def sample(self, ts: Sequence[float] | np.ndarray) -> dict[str, Tensor]:
        """θ at each of T times: name → tensor (T, *shape), differentiable in the knots.

        Interpolations with at most two knots per sample (``constant``, ``linear``) gather those
        two knots: O(T P) work instead of the dense O(T K P) product, which matters for deep
        conv stages.
        """
        ts = np.atleast_1d(np.asarray(ts, dtype=np.float64))
        key = (self.interp, self.num_knots, self.n_basis, ts.tobytes())
        pairs = _pairs(*key)
        out = {}
        for name, knots in self.knots.items():
            if pairs is not None:
                idx, w = (p.to(knots.device) for p in pairs)
                w = w.to(knots.dtype).reshape(*w.shape, *[1] * (knots.dim() - 1))
                out[name] = w[:, 0] * knots[idx[:, 0]] + w[:, 1] * knots[idx[:, 1]]
            else:
                wk = _basis(*key).to(dtype=knots.dtype, device=knots.device)
                out[name] = (wk @ knots.reshape(knots.shape[0], -1)).reshape(-1, *knots.shape[1:])
        return out

    def forward(self, t: float) -> dict[str, Tensor]:
        """θ(t): name → tensor (*shape)."""
        return {k: v[0] for k, v in self.sample([t]).items()}


def roughness(samples: dict[str, Tensor]) -> float:
    """How far weights θ_0..θ_{N-1} of a depth-N network are from a curve: N max‖Δθ‖ / max‖θ‖.

    The quantity Marion et al. (2024) bound: it stays O(1) as N grows for weights sampled from
    a smooth curve (it tends to max‖θ'‖ / max‖θ‖) and grows like N for i.i.d. weights. 0 for
    tied weights.
    """
    flat = torch.cat([v.detach().reshape(v.shape[0], -1) for v in samples.values()], dim=1).double()
    n = flat.shape[0]
    if n < 2:
        return 0.0
    scale = flat.norm(dim=1).max()
    if scale == 0:
        return 0.0
    return float(n * (flat[1:] - flat[:-1]).norm(dim=1).max() / scale)
