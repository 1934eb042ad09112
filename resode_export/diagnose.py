"""``resode inspect``: does this ResNet behave like an ODE, and how far down can it be re-discretized?

Per stage: depth, knots, parameters; how smooth the weights are in depth (the step weights
θ_n = θ(n/N) the model actually runs: N·max‖θ_{n+1} − θ_n‖ / max‖θ_n‖, the quantity Marion et al.
2024 bound, and its mean form); and the relative distance between the stage's hidden-state
trajectory and its limit ODE (Sander et al. 2022), the reference being rk4 at 16× the depth from
the same stage input. For the whole model: the observed convergence order of Euler and Heun under
re-discretization, and per scheme the smallest depth whose logits stay within ``tolerance``
(relative) of the reference.

Verdict: ODE-like when every stage's weights are smooth in depth (max relative jump
max‖θ_{n+1} − θ_n‖ / max‖θ_n‖ ≤ ``MAX_JUMP``: for i.i.d. weights it is of order 1 at any depth)
and the model lies within ``MAX_DISTANCE`` of its limit ODE.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import Tensor

from .errors import ResodeError
from .evaluate import relative_deviation
from .network import MAX_DEPTH, ODEBlock, ODENet
from .schemes import ButcherTableau, get_scheme, rk_step, solve, stage_grid

REFERENCE_SCHEME, REFERENCE_FACTOR = "rk4", 16
MAX_JUMP = 0.5  # relative jump between consecutive step weights
MAX_DISTANCE = 0.5  # relative distance of the stage trajectories from the limit ODE
SCHEMES = ("euler", "heun", "rk4")


def _step_weights(block: ODEBlock) -> dict[str, Tensor]:
    """θ_n = θ(n/N), n = 0..N−1: the weights the model's steps start from."""
    with torch.no_grad():
        return block.curve.sample(np.arange(block.depth) / block.depth)


def smoothness(block: ODEBlock) -> dict:
    theta = _step_weights(block)
    flat = torch.cat([v.reshape(v.shape[0], -1) for v in theta.values()], dim=1).double()
    n = flat.shape[0]
    scale = float(flat.norm(dim=1).max())
    if n < 2 or scale == 0:
        return {"roughness_max": 0.0, "roughness_mean": 0.0, "max_relative_jump": 0.0}
    jumps = (flat[1:] - flat[:-1]).norm(dim=1)
    return {"roughness_max": float(n * jumps.max() / scale), "roughness_mean": float(n * jumps.mean() / scale),
            "max_relative_jump": float(jumps.max() / scale)}


@torch.no_grad()
def trajectory(block: ODEBlock, x: Tensor, scheme: str, depth: int, every: int = 1) -> list[Tensor]:
    """States x_0, x_every, x_2·every, ... of the block solved at ``depth`` with ``scheme``."""
    times, index = stage_grid(scheme, depth)
    params = block.curve.sample(times)
    tableau, h = get_scheme(scheme), 1.0 / depth
    states = [x]
    for n in range(depth):
        x = rk_step(block.field, x, [{k: v[u] for k, v in params.items()} for u in index[n]], tableau, h)
        if (n + 1) % every == 0:
            states.append(x)
    return states


def trajectory_distance(block: ODEBlock, x: Tensor) -> float:
    """max_n ‖x_n − x*(t_n)‖ / max_n ‖x*(t_n)‖ between the block as it runs and its limit ODE."""
    if not isinstance(get_scheme(block.scheme), ButcherTableau):
        own = [x, _solve(block, x, block.scheme, block.depth)]  # reversible Heun: compare the end points
        ref = [x, _solve(block, x, REFERENCE_SCHEME, REFERENCE_FACTOR * block.depth)]
    else:
        own = trajectory(block, x, block.scheme, block.depth)
        ref = trajectory(block, x, REFERENCE_SCHEME, REFERENCE_FACTOR * block.depth, every=REFERENCE_FACTOR)
    num = max(float((a - b).double().norm()) for a, b in zip(own, ref))
    den = max(float(b.double().norm()) for b in ref)
    return num / den if den > 0 else 0.0


@torch.no_grad()
def _solve(block: ODEBlock, x: Tensor, scheme: str, depth: int) -> Tensor:
    times, _ = stage_grid(scheme, depth)
    return solve(block.field, x, block.curve.sample(times), scheme, depth)


def _deviation(model: ODENet, x: Tensor, reference: Tensor) -> float:
    with torch.no_grad():
        return float(relative_deviation(model(x), reference).max())


def _fitted_slope(depths, errors) -> float | None:
    pts = [(math.log(d), math.log(e)) for d, e in zip(depths, errors) if e > 0]
    if len(pts) < 2:
        return None
    xs, ys = np.array(pts).T
    return float(np.polyfit(xs, ys, 1)[0])


def inspect_model(model: ODENet, x: Tensor, tolerance: float = 0.05, max_depth: int | None = None,
                  progress=None) -> dict:
    """The report of ``resode inspect`` on inputs x (a batch of the model's test data).

    ``progress``: a rich Progress to advance, one unit per solve of the model (the reference, each stage's
    trajectories, each re-discretization).
    """
    if not tolerance > 0:
        raise ResodeError(f"--tolerance must be positive, got {tolerance}")
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model keeps its dtype, device and mode
    x = x.float().cpu()
    native = model.config.depths
    base = max(1, min(native))
    limit = max_depth or 4 * max(native)
    sweeps = len(SCHEMES) * (int(math.log2(limit)) + 1)
    task = progress.add_task("inspecting", total=1 + len(model.blocks) + 8 + sweeps) if progress else None

    def advance():
        if progress:
            progress.advance(task)

    ref_model = model.discretize(depth=tuple(REFERENCE_FACTOR * d for d in native), scheme=REFERENCE_SCHEME,
                                 grad="backprop")
    if max(ref_model.config.depths) > MAX_DEPTH:
        raise ResodeError(f"the reference needs depth {max(ref_model.config.depths)}, above {MAX_DEPTH}")
    with torch.no_grad():
        reference = ref_model(x)
    advance()
    stages = []
    with torch.no_grad():
        inputs = model.block_inputs(x)
    for i, (block, xin) in enumerate(zip(model.blocks, inputs)):
        stages.append({"stage": i, "depth": block.depth, "knots": block.curve.num_knots, "scheme": block.scheme,
                       "interp": block.curve.interp,
                       "parameters": sum(p.numel() for p in block.parameters()), **smoothness(block),
                       "distance_to_limit_ode": trajectory_distance(block, xin)})
        advance()
    # convergence order under re-discretization: logits against the reference, depths around the native one
    orders = {}
    for scheme in ("euler", "heun"):
        scales = [s for s in (0.25, 0.5, 1, 2) if base * s >= 1]
        depths = [tuple(max(1, round(d * s)) for d in native) for s in scales]
        errors = []
        for d in depths:
            errors.append(_deviation(model.discretize(depth=d, scheme=scheme, grad="backprop"), x, reference))
            advance()
        # the depth of a row: the geometric mean of its stages' (rounded) depths, not stage 0's alone
        slope = _fitted_slope([math.exp(np.mean(np.log(d))) for d in depths], errors)
        orders[scheme] = None if slope is None else -slope
    min_depth: dict[str, int | None] = {}
    deviations: dict[str, dict[int, float]] = {}
    for scheme in SCHEMES:
        min_depth[scheme], deviations[scheme] = None, {}
        depth = 1
        while depth <= limit:
            dev = _deviation(model.discretize(depth=depth, scheme=scheme, grad="backprop"), x, reference)
            advance()
            deviations[scheme][depth] = dev
            if dev <= tolerance:
                min_depth[scheme] = depth
                break
            depth *= 2
    native_dev = _deviation(model, x, reference)
    if progress:
        progress.remove_task(task)
    rough = [s for s in stages if s["max_relative_jump"] > MAX_JUMP]
    far = [s for s in stages if s["distance_to_limit_ode"] > MAX_DISTANCE]
    single = all(s["depth"] < 2 for s in stages)  # one step a stage: no change in depth to measure
    ode_like = not rough and not far and not single
    cost = {s: min_depth[s] * get_scheme(s).stages for s in SCHEMES if min_depth[s] is not None}
    if single and not far:
        verdict = ("cannot judge: every stage runs a single step, so how smooth the weights are in depth cannot be "
                   f"measured (the model is {native_dev:.3g} from its limit ODE); a deeper ResNet, or one trained "
                   "from a smooth initialization, can be judged")
    elif ode_like and cost:
        best = min(cost, key=lambda s: (cost[s], s))
        verdict = (f"ODE-like: safe to re-discretize down to depth {min_depth[best]} with {best} "
                   f"(logits within {tolerance:g} of the limit ODE; the model itself is {native_dev:.3g} from it)")
    elif ode_like:
        verdict = (f"ODE-like, but no depth up to {limit} with {', '.join(SCHEMES)} comes within {tolerance:g} of the "
                   f"limit ODE (the model itself is {native_dev:.3g} from it): re-discretize with care")
    else:
        why = []
        if rough:
            why.append("weights are rough in depth (max relative jump between steps "
                       + ", ".join(f"stage {s['stage']}: {s['max_relative_jump']:.2f}" for s in rough)
                       + f", above {MAX_JUMP})")
        if far:
            why.append("hidden states are far from the limit ODE ("
                       + ", ".join(f"stage {s['stage']}: {s['distance_to_limit_ode']:.2f}" for s in far) + ")")
        verdict = ("not ODE-like: " + "; ".join(why) + "; re-discretization will change the outputs — distil it "
                   "into a smooth student (resode distill), or train with --depths")
    return {"stages": stages, "ode_like": ode_like, "verdict": verdict, "min_depth": min_depth,
            "tolerance": tolerance, "convergence_order": orders, "native_deviation_from_limit": native_dev,
            "reference": f"{REFERENCE_SCHEME} at {REFERENCE_FACTOR}x the depth", "samples": len(x),
            "deviations": {s: {str(d): v for d, v in dv.items()} for s, dv in deviations.items()}}


__all__ = ["inspect_model", "smoothness", "trajectory_distance"]
