import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resode_export.curves import INTERPOLATIONS, Curve, bspline_basis, roughness
from resode_export.errors import ResodeError

EXACT = ["constant", "linear", "cubic"]


def _curve(values, interp, **kw) -> Curve:
    return Curve({"w": torch.as_tensor(values, dtype=torch.float64)}, interp, **kw)


@pytest.mark.parametrize("interp", EXACT)
@pytest.mark.parametrize("num_knots", [1, 2, 3, 4, 7, 32])
def test_exact_at_knots(interp, num_knots, dtype):
    knots = torch.randn(num_knots, 3, 2, dtype=dtype)
    curve = Curve({"w": knots}, interp)
    sampled = curve.sample(np.arange(num_knots) / num_knots)["w"]
    assert torch.equal(sampled, knots), "a knot must come back bit for bit"


def test_three_knot_cubic_is_the_parabola_up_to_t_1():
    curve = _curve([0.0, 1.0, 4.0], "cubic")  # knots of 9 t², t_k = k/3
    values = curve.sample([0.5, 2 / 3, 0.99999, 1.0])["w"].detach().numpy()
    assert values == pytest.approx([9 * 0.25, 4.0, 9 * 0.99999**2, 9.0], abs=1e-9)


@pytest.mark.parametrize("num_knots", [4, 5, 9, 33])
def test_cubic_reproduces_cubic_polynomials(num_knots):
    poly = lambda t: 0.3 - 1.2 * t + 2.5 * t**2 - 4.0 * t**3  # noqa: E731
    curve = _curve(poly(np.arange(num_knots) / num_knots), "cubic")
    ts = np.random.default_rng(0).uniform(0, 1, 200)  # includes the last interval [t_{K-1}, 1]
    assert np.abs(curve.sample(ts)["w"].detach().numpy() - poly(ts)).max() < 1e-12


def test_cubic_is_not_the_natural_spline():
    # the natural spline has zero curvature at the ends and cannot reproduce t²
    curve = _curve((np.arange(8) / 8) ** 2, "cubic")
    assert curve.sample([0.0, 0.99])["w"].detach().numpy() == pytest.approx([0.0, 0.99**2], abs=1e-12)


@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_linear_functions_are_reproduced(interp):
    curve = _curve(2 - 3 * np.arange(6) / 6, interp)
    ts = np.linspace(0, 1, 37)
    assert np.abs(curve.sample(ts)["w"].detach().numpy() - (2 - 3 * ts)).max() < 1e-12


@settings(max_examples=50, deadline=None)
@given(
    interp=st.sampled_from(list(INTERPOLATIONS)),
    num_knots=st.integers(1, 40),
    t=st.lists(st.floats(0, 1), min_size=1, max_size=20),
)
def test_basis_rows_sum_to_one(interp, num_knots, t):
    """Every interpolation reproduces constants (tied weights stay tied)."""
    w = Curve({"w": torch.zeros(num_knots)}, interp).basis(t)
    assert w.shape == (len(t), num_knots)
    assert torch.allclose(w.sum(dim=1), torch.ones(len(t), dtype=torch.float64), atol=1e-12)


def test_sampling_is_vectorized_and_matches_single_calls():
    curve = Curve({"a": torch.randn(5, 2), "b": torch.randn(5, 3, 3)}, "cubic")
    ts = [0.0, 0.13, 0.5, 0.97]
    batch = curve.sample(ts)
    assert batch["a"].shape == (4, 2) and batch["b"].shape == (4, 3, 3)
    for i, t in enumerate(ts):
        assert torch.equal(curve(t)["b"], batch["b"][i])


def test_sampling_is_differentiable_in_the_knots():
    knots = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    curve = Curve({"w": knots}, "cubic")
    ts = [0.1, 0.55, 0.9]
    assert torch.autograd.gradcheck(lambda k: curve.basis(ts) @ k, (knots,))
    curve.sample(ts)["w"].sum().backward()
    assert curve.knots["w"].grad is not None and curve.knots["w"].grad.abs().sum() > 0


def test_roughness_measure():
    n_small, n_large = 16, 256
    tied = {"w": torch.ones(n_large, 4)}
    assert roughness(tied) == 0.0

    def smooth(n):
        t = torch.arange(n, dtype=torch.float64)[:, None] / n
        return {"w": torch.sin(2 * math.pi * t)}

    # sampled from a curve: bounded in N, close to max|θ'| / max|θ| = 2π / 1
    assert roughness(smooth(n_large)) == pytest.approx(roughness(smooth(n_small)), rel=0.1)
    assert roughness(smooth(n_large)) == pytest.approx(2 * math.pi, rel=0.05)
    # i.i.d. weights: grows like N
    gen = torch.Generator().manual_seed(0)
    iid = lambda n: {"w": torch.randn(n, 8, generator=gen)}  # noqa: E731
    assert roughness(iid(n_large)) / roughness(iid(n_small)) > 8


def test_smooth_reduces_roughness_and_stays_close_to_the_underlying_curve():
    n = 256
    t = np.arange(n) / n
    clean = np.stack([np.sin(2 * np.pi * t), 1 + t**2], axis=1)
    noisy = clean + 0.1 * np.random.default_rng(0).standard_normal(clean.shape)
    curve = _curve(noisy, "smooth")
    fitted = curve.sample(t)["w"].detach()
    rough_clean = roughness({"w": torch.as_tensor(clean)})
    rough_before = roughness({"w": torch.as_tensor(noisy)})
    rough_after = roughness({"w": fitted})
    assert rough_after < rough_before / 5, (rough_before, rough_after)
    assert rough_after < 1.5 * rough_clean, (rough_clean, rough_after)
    assert np.abs(fitted.numpy() - clean).max() < np.abs(noisy - clean).max() / 2
    # a smooth curve passes through the smoothing almost unchanged
    assert np.abs(_curve(clean, "smooth").sample(t)["w"].detach().numpy() - clean).max() < 1e-2


def test_smooth_basis_size_is_checked():
    with pytest.raises(ResodeError, match="n_basis"):
        Curve({"w": torch.zeros(8)}, "smooth", n_basis=8).basis([0.5])


def test_bspline_basis_is_a_partition_of_unity():
    b = bspline_basis(np.linspace(0, 1, 101), 7)
    assert b.shape == (101, 7) and np.all(b >= 0)
    assert np.allclose(b.sum(axis=1), 1)


def test_unknown_interpolation_lists_valid_names():
    with pytest.raises(ResodeError, match="constant, linear, cubic, smooth"):
        Curve({"w": torch.zeros(3)}, "spline")
