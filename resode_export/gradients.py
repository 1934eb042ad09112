"""Gradient methods: how the backward pass goes through the steps of an ODE block.

Each method solves the block forward and makes the gradient reach the curve's knots:

- ``backprop``: plain autograd through every stage of every step (the reference; memory O(M s)).
- ``checkpoint``: ``torch.utils.checkpoint`` over segments of ⌈√M⌉ steps; exact.
- ``symplectic``: the symplectic adjoint (Matsubara et al. 2021). Forward keeps only each step's
  input x_n; backward recomputes the step's stage inputs without a graph and back-propagates one
  stage evaluation at a time. Exact for every explicit scheme (stages with b_i = 0 included):
  it is reverse-mode differentiation of the step, organized to hold one stage's graph.
- ``reversible``: exact gradients with memory flat in depth, for the algebraically reversible
  scheme ``reversible_heun`` (Kidger et al. 2021): backward undoes each step exactly, then takes
  one vector–Jacobian product per step.
- ``auto``: ``adjoint`` watched by a :class:`ReconstructionMonitor`, which switches the block to
  ``symplectic`` when the reconstruction of the block's input drifts past a tolerance.
- ``adjoint_fast`` (Euler only): the adjoint with one evaluation of f per backward step. The
  evaluation F_n = f(x̃_n, θ_n) at the reconstructed input serves the step's vector–Jacobian
  product and the next reconstruction, x̃_{n−1} = x̃_n − h(2F_n − F_{n+1}): the path's f
  extrapolated linearly in time (Adams–Bashforth 2 run backwards), so the reconstruction is second
  order and, on weights smooth in depth, the gradient error falls like 1/M² (measured in the tests)
  with one evaluation per step fewer than ``adjoint``. Rough weights break the extrapolation.
- ``adjoint``: the memory-free discrete adjoint (Sander et al. 2022). Forward keeps only the
  output; backward reconstructs each step's input by running the scheme backwards, then takes one
  vector–Jacobian product through the step. Memory does not grow with depth.

.. warning:: ``adjoint`` is approximate: the reconstruction x̃_n is exact only as the depth grows
   (error O(h) per step for ``euler``, O(h³) for ``heun`` on weights smooth in depth), so its
   gradients converge to backprop's like 1/M (euler) or 1/M² (heun). With weights that are rough in
   depth the reconstruction, hence the gradient, can be far off.

The custom functions take the knots themselves as inputs and sample the curve step by step, so
what they save for backward is the knots and O(1) (adjoint) or O(M) (symplectic) states, never
the per-step weights.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .curves import Curve, sparse_weights
from .errors import ResodeError, check_choice
from .fields import Field, Theta
from .schemes import (
    ButcherTableau,
    ReversibleHeun,
    check_field_scheme,
    get_scheme,
    rk_step,
    solve,
    stage_grid,
)


@lru_cache(maxsize=64)
def _stage_weights(interp: str, num_knots: int, n_basis: int | None, scheme: str, depth: int):
    """For each stage time of a solve: (knot indices, weights). Cached: training repeats the same solve."""
    times, _ = stage_grid(scheme, depth)
    return sparse_weights(interp, num_knots, n_basis, times)


@lru_cache(maxsize=64)
def _stage_plan(interp: str, num_knots: int, n_basis: int | None, scheme: str, depth: int,
                device: torch.device, dtype: torch.dtype) -> tuple:
    """``_stage_weights`` on the knots' device: for each stage time either the index of the one knot
    it equals (weight 1: the sample is a view, its gradient one add) or (indices, weights) tensors
    there. Built once per solve shape, so stepping never copies from the host (a synchronizing copy
    per step stalled the GPU)."""
    plan = []
    for rows, w in _stage_weights(interp, num_knots, n_basis, scheme, depth):
        keep = w != 0
        rows, w = rows[keep], w[keep]
        if len(rows) == 1 and float(w[0]) == 1.0:
            plan.append(int(rows[0]))
        else:
            plan.append((rows.to(device), w.to(dtype=dtype, device=device)))
    return tuple(plan)


class _Steps:
    """The weights of each step's stages, sampled from the knots one step at a time."""

    def __init__(self, curve: Curve, scheme: str, depth: int):
        times, self.index = stage_grid(scheme, depth)
        self.names = list(curve.knots.keys())
        self.key = (curve.interp, curve.num_knots, curve.n_basis, scheme, depth)
        self.tableau = get_scheme(scheme)
        self.depth, self.h = depth, 1.0 / depth

    def _plan(self, like: Tensor, n: int, stage: int):
        return _stage_plan(*self.key, like.device, like.dtype)[self.index[n][stage]]

    def theta(self, knots: list[Tensor], n: int, stage: int) -> Theta:
        """The weights of one stage of step n."""
        plan = self._plan(knots[0], n, stage)
        if isinstance(plan, int):
            return {name: k[plan] for name, k in zip(self.names, knots)}
        rows, w = plan
        return {name: torch.tensordot(w, k.index_select(0, rows), dims=1) for name, k in zip(self.names, knots)}

    def thetas(self, knots: list[Tensor], n: int) -> list[Theta]:
        """Stage weights of step n: one {name: tensor} per stage."""
        return [self.theta(knots, n, i) for i in range(len(self.index[n]))]

    def accumulate(self, grads: list[Tensor], n: int, stage: int, theta_grads: list[Tensor | None],
                   scale: float = 1.0) -> None:
        """Add ``scale`` × a stage's weight gradients to the knots' gradients (the adjoint of sampling)."""
        plan = self._plan(grads[0], n, stage)
        for g, tg in zip(grads, theta_grads):
            if tg is None:
                continue
            if isinstance(plan, int):
                g[plan].add_(tg, alpha=scale)
            else:
                rows, w = plan
                g.index_add_(0, rows, w.reshape(-1, *[1] * tg.dim()) * tg.unsqueeze(0), alpha=scale)


def _stage_adjoint(field: Field, steps: _Steps, x: Tensor, thetas: list[Theta], g: Tensor,
                   grads: list[Tensor], n: int) -> Tensor:
    """Reverse-mode through one explicit RK step from its input x, one stage graph at a time.

    x_{n+1} = P(x + h Σ b_i k_i), k_i = f(X_i, θ_i), X_i = x + h Σ_{j<i} a_ij k_j. ``g`` is ḡ, the
    cotangent of P's input (the caller applies P's VJP, so x_{n+1} need not be held here):
    k̄_i = h b_i ḡ + h Σ_{l>i} a_li X̄_l, X̄_i = (∂f/∂x)ᵀ k̄_i, θ̄_i = (∂f/∂θ)ᵀ k̄_i, x̄ = ḡ + Σ_i X̄_i.
    """
    tab, h = steps.tableau, steps.h
    s = tab.stages
    stage_inputs, ks = [], []
    for i in range(s):  # (inside the once-differentiable backward: no graph is recorded)
        xi = x
        for j in range(i):
            if tab.a[i][j]:
                xi = xi + (h * tab.a[i][j]) * ks[j]
        stage_inputs.append(xi)
        ks.append(field(xi, thetas[i]) if i < s - 1 else None)  # the last stage's k is never reused
    # With k̄_i = h u_i and X̄_i = h Y_i: u_i = b_i ḡ + h Σ_{l>i} a_li Y_l and Y_i = (∂f/∂x)ᵀ u_i. Factoring
    # h out makes Euler's u the cotangent ḡ itself: no scaled copy of it is held through the VJP.
    x_bar = g
    ys: list[Tensor | None] = [None] * s
    for i in reversed(range(s)):
        u = None
        if tab.b[i]:
            u = g if tab.b[i] == 1 else tab.b[i] * g
        for ell in range(i + 1, s):
            if tab.a[ell][i] and ys[ell] is not None:
                term = (h * tab.a[ell][i]) * ys[ell]
                u = term if u is None else u + term
        if u is None:  # a stage nothing depends on (b_i = 0 and unused later)
            continue
        ys[i], theta_grads = field.vjp(stage_inputs[i], thetas[i], u)  # f's value is not needed
        steps.accumulate(grads, n, i, theta_grads, scale=h)
        x_bar = torch.add(x_bar, ys[i], alpha=h)
    return x_bar


def _reverse_step(field: Field, x_next: Tensor, thetas: list[Theta], tableau: ButcherTableau, h: float) -> Tensor:
    """x̃_n from x_{n+1}: the scheme run backwards in time (Sander et al. 2022).

    Euler: x̃_n = x_{n+1} − h f(x_{n+1}, θ_n). Schemes with symmetric nodes (c reversed = 1 − c:
    heun, rk4, rk38) take a step of −h with the stage weights in reverse time order, e.g. Heun:
    x̃_n = x_{n+1} − (h/2)[f(x_{n+1}, θ_{n+1}) + f(x_{n+1} − h f(x_{n+1}, θ_{n+1}), θ_n)].
    A projected field's reconstruction is projected too: every state of its solve lies in P's range
    (the block's input included, for torchvision blocks, whose transitions end with the same ReLU).
    """
    if tableau.stages == 1:
        return field.project(torch.sub(x_next, field(x_next, thetas[0]), alpha=h))  # one kernel, no h·f copy
    return rk_step(field, x_next, thetas[::-1], tableau, -h)


def adjoint_supported(scheme: str) -> bool:
    tableau = get_scheme(scheme)
    c = np.array(tableau.c)
    return isinstance(tableau, ButcherTableau) and (len(c) == 1 or bool(np.allclose(1 - c[::-1], c)))


class _SolveFunction(torch.autograd.Function):
    """Forward without a graph; backward by ``adjoint`` or ``symplectic``."""

    @staticmethod
    def forward(ctx, method: str, field: Field, steps: _Steps, monitor: ReconstructionMonitor | None, x: Tensor,
                *knots: Tensor) -> Tensor:
        states = [x] if monitor is not None else []  # a monitored adjoint keeps x_0 to compare with x̃_0
        with torch.no_grad():
            for n in range(steps.depth):
                if method == "symplectic":
                    states.append(x)
                x = rk_step(field, x, steps.thetas(list(knots), n), steps.tableau, steps.h)
        ctx.method, ctx.field, ctx.steps, ctx.monitor = method, field, steps, monitor
        ctx.save_for_backward(x, *states, *knots)
        ctx.num_states = len(states)
        return x

    @staticmethod
    @once_differentiable  # the VJPs are taken at reconstructed states: a second derivative would be wrong.
    # It also runs the backward under no_grad: only Field.vjp's own enable_grad builds a graph.
    def backward(ctx, g: Tensor):
        saved = ctx.saved_tensors
        y, states, knots = saved[0], saved[1 : 1 + ctx.num_states], list(saved[1 + ctx.num_states :])
        field, steps = ctx.field, ctx.steps
        grads = [torch.zeros_like(k) for k in knots]
        x = x_out = y
        for n in reversed(range(steps.depth)):
            thetas = [{k: v.detach() for k, v in t.items()} for t in steps.thetas(knots, n)]
            if ctx.method == "adjoint_fast":  # here x is already step n's input x̃_n, x_out its output
                if n == steps.depth - 1:  # x̃_{M−1} as the plain adjoint has it
                    f_later = field(x, thetas[0])
                    x = field.project(x - steps.h * f_later)
                g = field.project_vjp(x_out, g)
                fx, x_grad, theta_grads = field.vjp_with_value(x, thetas[0], g)  # VJPs with ḡ, then × h
                steps.accumulate(grads, n, 0, theta_grads, scale=steps.h)
                # x̃_{n−1} = x̃_n − h f(x_{n−1}, θ_{n−1}), with f along the path extrapolated from its last two values
                x_out = x
                x = field.project(torch.sub(x, fx, alpha=2 * steps.h).add_(f_later, alpha=steps.h))  # two kernels
                g, f_later = torch.add(g, x_grad, alpha=steps.h), fx
                continue
            # P's VJP first, so that x_{n+1} is released before the step's VJP: one state less at the peak
            if ctx.method == "adjoint":
                g = field.project_vjp(x, g)
                x = _reverse_step(field, x, thetas, steps.tableau, steps.h)
            else:
                g = field.project_vjp(states[n + 1] if n + 1 < steps.depth else y, g)
                x = states[n]
            g = _stage_adjoint(field, steps, x, thetas, g, grads, n)
        if ctx.monitor is not None:
            x0 = states[0]
            ctx.monitor.record(float((x - x0).norm() / x0.norm().clamp_min(torch.finfo(x0.dtype).tiny)))
        return (None, None, None, None, g, *grads)


class _ReversibleFunction(torch.autograd.Function):
    """Reversible Heun: forward keeps (x_M, ẑ_M); backward reconstructs and back-propagates.

    With F_k = f(ẑ_k, θ(t_k)) the forward is ẑ_{k+1} = 2x_k − ẑ_k + hF_k, x_{k+1} = x_k + (h/2)(F_k + F_{k+1}).
    Walking the evaluation points k = M..0 with adjoints (x̄, ẑ̄, F̄): F̄ += (h/2)x̄ (the x-update
    that uses F_k), one VJP at ẑ_k gives ẑ̄ += JᵀF̄ and the θ(t_k) gradient; then step k−1 gives
    F̄ ← (h/2)x̄ + hẑ̄, x̄ ← x̄ + 2ẑ̄, ẑ̄ ← −ẑ̄; finally x̄_0 = x̄ + ẑ̄ (ẑ_0 = x_0).

    F̄ is never held: at the VJP of point k it is c_k x̄ (c = h/2 at k = M and k = 0, h between),
    since (h/2)x̄ + hẑ̄ + (h/2)(x̄ + 2ẑ̄) = h(x̄ + 2ẑ̄). So the VJP takes x̄ and its results are
    scaled by c_k; ẑ̄ is kept unflipped with its sign apart. The same c_k steps the reconstruction:
    x_k − (h/2)F_k = x_{k+1} − (h/2)F_{k+1} − c_k F_k, and ẑ_{k−1} = 2(x_k − (h/2)F_k) − ẑ_k.
    """

    @staticmethod
    def forward(ctx, field: Field, steps: _Steps, x: Tensor, *knots: Tensor) -> Tensor:
        h = steps.h
        with torch.no_grad():  # reversible_heun_step fused (four activation-sized kernels, not seven)
            z, fz = x, field(x, steps.theta(list(knots), 0, 0))
            for n in range(steps.depth):
                z = torch.lerp(z, x, 2.0).add_(fz, alpha=h)  # ẑ_{n+1} = 2x_n − ẑ_n + hF_n
                f_next = field(z, steps.theta(list(knots), n, 1))
                x = torch.add(x, fz, alpha=h / 2).add_(f_next, alpha=h / 2)
                fz = f_next
            del fz, f_next
        ctx.field, ctx.steps = field, steps
        ctx.save_for_backward(x, z, *knots)
        return x

    @staticmethod
    @once_differentiable  # as _SolveFunction: first derivatives only (a second one raises, never a wrong value)
    def backward(ctx, g: Tensor):
        x, z, *knots = ctx.saved_tensors
        field, steps, h = ctx.field, ctx.steps, ctx.steps.h
        grads = [torch.zeros_like(k) for k in knots]
        # Out of place where a tensor may be held elsewhere (the saved x_M and ẑ_M, the engine's g); in
        # place only on ẑ̄, which nothing else reads later.
        x_bar, z_bar, sign = g, None, 1.0
        x_half = x  # x_k − (h/2)F_k as it goes, x_M itself at the start
        for k in reversed(range(steps.depth + 1)):
            n, stage = (k - 1, 1) if k > 0 else (0, 0)  # point k is stage 1 of step k−1 (or stage 0 of step 0)
            c = h / 2 if k in (0, steps.depth) else h
            theta = {name: v.detach() for name, v in steps.theta(knots, n, stage).items()}
            fz, z_grad, theta_grads = field.vjp_with_value(z, theta, x_bar)  # F̄ = c x̄: scaled below
            steps.accumulate(grads, n, stage, theta_grads, scale=c)
            z_bar = z_grad * (sign * c) if z_bar is None else z_bar.add_(z_grad, alpha=sign * c)
            del z_grad, theta_grads
            if k == 0:
                break
            x_bar = torch.add(x_bar, z_bar, alpha=2 * sign)  # x̄ ← x̄ + 2ẑ̄
            sign = -sign  # ẑ̄ ← −ẑ̄
            x_half = torch.sub(x_half, fz, alpha=c)
            z = torch.lerp(z, x_half, 2.0)  # ẑ_{k−1} = 2 x_half − ẑ_k
            del fz
        return (None, None, torch.add(x_bar, z_bar, alpha=sign), *grads)


def _backprop(field, x, curve, scheme, depth):
    times, _ = stage_grid(scheme, depth)
    return solve(field, x, curve.sample(times), scheme, depth)


def _checkpoint(field, x, curve, scheme, depth):
    check_compatible("checkpoint", scheme)
    if not torch.is_grad_enabled():
        return _backprop(field, x, curve, scheme, depth)
    times, index = stage_grid(scheme, depth)
    tableau, h = get_scheme(scheme), 1.0 / depth
    segment = math.ceil(math.sqrt(depth))

    def run(x, start, stop):
        # sample the weights inside the segment, so what checkpoint keeps is x, not per-step weights
        used = np.unique(index[start:stop])
        params = curve.sample(times[used])
        for n in range(start, stop):
            local = np.searchsorted(used, index[n])
            x = rk_step(field, x, [{k: v[u] for k, v in params.items()} for u in local], tableau, h)
        return x

    for start in range(0, depth, segment):
        x = checkpoint(run, x, start, min(depth, start + segment), use_reentrant=False)
    return x


class ReconstructionMonitor:
    """Watches the ``auto`` method's adjoint: every ``every`` backward passes it compares the block's
    reconstructed input x̃_0 with the true x_0 on the batch, ‖x̃_0 − x_0‖ / ‖x_0‖, logs it, and
    switches the block to ``symplectic`` (exact) for good once it exceeds ``tolerance``.
    """

    def __init__(self, every: int = 50, tolerance: float = 1e-2):
        if every < 1 or not tolerance > 0:
            raise ResodeError("the reconstruction monitor needs every >= 1 and tolerance > 0")
        self.every, self.tolerance = every, tolerance
        self.calls = 0
        self.history: list[tuple[int, float]] = []  # (call, relative reconstruction error)
        self.switched_at: int | None = None

    @property
    def method(self) -> str:
        return "adjoint" if self.switched_at is None else "symplectic"

    def due(self) -> bool:
        """Count one forward pass with gradients; True when this one is to be checked."""
        self.calls += 1
        return self.switched_at is None and (self.calls - 1) % self.every == 0

    def record(self, error: float) -> None:
        self.history.append((self.calls, error))
        if not error <= self.tolerance:  # NaN switches too
            self.switched_at = self.calls


@torch.no_grad()
def reconstruction_error(field: Field, x: Tensor, curve: Curve, scheme: str, depth: int) -> float:
    """‖x̃_0 − x_0‖ / ‖x_0‖: solve forward from x, then run the adjoint's reverse steps back."""
    steps, knots = _Steps(curve, scheme, depth), list(curve.knots.values())
    y = x
    for n in range(depth):
        y = rk_step(field, y, steps.thetas(knots, n), steps.tableau, steps.h)
    for n in reversed(range(depth)):
        y = _reverse_step(field, y, steps.thetas(knots, n), steps.tableau, steps.h)
    return float((y - x).norm() / x.norm().clamp_min(torch.finfo(x.dtype).tiny))


def compatible(grad: str, scheme: str) -> bool:
    try:
        check_compatible(grad, scheme)
    except ResodeError:
        return False
    return True


def check_compatible(grad: str, scheme: str) -> None:
    """Raise a ResodeError naming the alternatives when ``grad`` cannot run ``scheme``."""
    reversible = isinstance(get_scheme(scheme), ReversibleHeun)
    if grad == "reversible" and not reversible:
        raise ResodeError(f"--grad reversible needs --scheme reversible_heun, got {scheme!r}; "
                          "or use --grad symplectic for exact low-memory gradients with any scheme")
    if reversible and grad not in ("backprop", "reversible"):
        raise ResodeError(f"scheme reversible_heun runs with --grad reversible or backprop, not {grad!r}")
    if grad == "adjoint_fast" and scheme != "euler":
        raise ResodeError(f"--grad adjoint_fast is an Euler method, got scheme {scheme!r}; use --grad adjoint")
    if grad in ("adjoint", "auto") and not adjoint_supported(scheme):
        raise ResodeError(
            f"the adjoint has no reverse step for scheme {scheme!r} (its nodes are not symmetric); "
            "use euler, heun, rk4 or rk38, or --grad symplectic"
        )


def _custom(method):
    def run(field, x, curve, scheme, depth, monitor=None):
        check_compatible(method, scheme)
        check_field_scheme(field, scheme)
        knots = list(curve.knots.values())
        if not torch.is_grad_enabled() or not (x.requires_grad or any(k.requires_grad for k in knots)):
            return _backprop(field, x, curve, scheme, depth)  # nothing to differentiate: save nothing
        if method == "reversible":
            return _ReversibleFunction.apply(field, _Steps(curve, scheme, depth), x, *knots)
        if method == "auto":
            if monitor is None:
                raise ValueError("grad='auto' needs a ReconstructionMonitor (ODEBlock owns one)")
            check = monitor.due()
            if monitor.method == "symplectic":
                return _SolveFunction.apply("symplectic", field, _Steps(curve, scheme, depth), None, x, *knots)
            return _SolveFunction.apply("adjoint", field, _Steps(curve, scheme, depth), monitor if check else None,
                                        x, *knots)
        return _SolveFunction.apply(method, field, _Steps(curve, scheme, depth), None, x, *knots)

    return run


GRADIENTS = {
    "backprop": _backprop,
    "checkpoint": _checkpoint,
    "adjoint": _custom("adjoint"),
    "symplectic": _custom("symplectic"),
    "reversible": _custom("reversible"),
    "auto": _custom("auto"),
    "adjoint_fast": _custom("adjoint_fast"),
}


def integrate(field: Field, x: Tensor, curve: Curve, scheme: str, depth: int, grad: str = "backprop",
              monitor: ReconstructionMonitor | None = None) -> Tensor:
    """Solve dx/dt = f(x, θ(t)) on [0, 1] in ``depth`` steps of ``scheme``; backward by ``grad``.

    ``monitor`` is the reconstruction monitor of ``grad="auto"``.
    """
    method = GRADIENTS[check_choice("gradient method", grad, GRADIENTS)]
    return method(field, x, curve, scheme, depth, monitor) if grad == "auto" else method(field, x, curve, scheme, depth)
