import math

import numpy as np
import pytest
import torch

from resode_export.curves import Curve
from resode_export.errors import ResodeError
from resode_export.fields import LinearField
from resode_export.schemes import SCHEMES, ButcherTableau, get_scheme, solve, stage_grid

from .helpers import fitted_slope

DIM = 4


def _problem():
    """dx/dt = a(t) A0 x: since the A(t) commute, x(1) = exp((∫₀¹ a) A0) x0 exactly."""
    gen = torch.Generator().manual_seed(1)
    a0 = torch.randn(DIM, DIM, generator=gen, dtype=torch.float64) / 2
    x0 = torch.randn(3, DIM, generator=gen, dtype=torch.float64)
    return a0, x0


def _error(scheme: str, depth: int, a_of_t, integral: float, params_from) -> float:
    a0, x0 = _problem()
    exact = x0 @ torch.linalg.matrix_exp(integral * a0).T
    times, _ = stage_grid(scheme, depth)
    out = solve(LinearField(DIM), x0, params_from(times, a_of_t, a0), scheme, depth)
    return float((out - exact).norm() / exact.norm())


def _exact_params(times, a_of_t, a0):
    return {"A": torch.tensor(a_of_t(times))[:, None, None] * a0}


def _cubic_curve_params(times, a_of_t, a0):
    knots = 16
    t = np.arange(knots) / knots
    curve = Curve({"A": torch.tensor(a_of_t(t))[:, None, None] * a0}, interp="cubic")
    return {k: v.detach() for k, v in curve.sample(times).items()}


def problem_id(params_from) -> str:
    return "exact-weights" if params_from is _exact_params else "cubic-curve"


SMOOTH = (lambda t: 1 + 0.5 * np.sin(3 * t), 1 + 0.5 * (1 - math.cos(3)) / 3)
CUBIC = (lambda t: 1 + t - 2 * t**2 + 3 * t**3, 1 + 1 / 2 - 2 / 3 + 3 / 4)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize(
    "problem", [(SMOOTH, _exact_params), (CUBIC, _cubic_curve_params)], ids=["exact-weights", "cubic-curve"]
)
def test_measured_order_matches_declared(scheme, problem):
    (a_of_t, integral), params_from = problem
    order = get_scheme(scheme).order
    depths = [16, 32, 64, 128] if order >= 3 else [8, 16, 32, 64, 128]
    errors = [_error(scheme, m, a_of_t, integral, params_from) for m in depths]
    assert min(errors) > 1e-13, f"errors {errors} hit rounding: the slope would be meaningless"
    slope = fitted_slope([1 / m for m in depths], errors)
    print(f"order {scheme} {problem_id(params_from)}: slope {slope:.3f} (declared {order})")
    assert abs(slope - order) <= 0.3, f"{scheme}: slope {slope:.2f}, declared order {order}, errors {errors}"


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_stage_grid_maps_each_stage_to_its_time(scheme):
    depth = 5
    times, index = stage_grid(scheme, depth)
    c = get_scheme(scheme).c
    assert index.shape == (depth, len(c))
    for n in range(depth):
        for i, ci in enumerate(c):
            assert times[index[n, i]] == pytest.approx((n + ci) / depth, abs=1e-12)
    assert len(times) == len(set(np.round(times, 12)))


def test_unknown_scheme_lists_valid_names():
    with pytest.raises(ResodeError, match="valid schemes are: euler, midpoint, heun"):
        get_scheme("rk45")


@pytest.mark.parametrize(
    "a, b, order, message",
    [
        (((0, 1), (0, 0)), (0.5, 0.5), 1, "strictly lower triangular"),
        (((0, 0), (1, 0)), (0.6, 0.6), 1, "order 1"),
        (((0, 0), (1, 0)), (0.25, 0.75), 2, "order 2"),
        (((0, 0), (1, 0)), (0.5,), 1, "must be"),
    ],
)
def test_invalid_tableaux_are_rejected(a, b, order, message):
    c = tuple(float(sum(row)) for row in a)
    with pytest.raises(ValueError, match=message):
        ButcherTableau("bad", a, b, c, order)


def test_rows_must_sum_to_c():
    with pytest.raises(ValueError, match="sum to c"):
        ButcherTableau("bad", ((0, 0), (1, 0)), (0.5, 0.5), (0.0, 0.5), 1)
