"""Conversion ResNet → ODE → ResNet: exact at the native depth, convergent elsewhere."""

import pytest
import torch

from resode_export.curves import INTERPOLATIONS
from resode_export.errors import ResodeError
from resode_export.io import load_checkpoint, save_checkpoint
from resode_export.network import ODENet

from .helpers import conv_config, fitted_slope, mlp_config, reference_resnet, smooth_knots_

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _input(model, batch=16, dtype=torch.float32):
    return torch.randn(batch, *model.config.in_shape, dtype=dtype)


@pytest.mark.parametrize("make_config", [mlp_config, conv_config], ids=["mlp", "conv"])
@pytest.mark.parametrize("interp", ["constant", "linear", "cubic"])
def test_native_euler_reproduces_the_resnet(make_config, interp, dtype):
    """i.i.d. weights, the hardest case: nothing smooth to lean on, still exact at the knots."""
    source = ODENet(make_config(depths=(7, 5)), init="iid", seed=3).to(dtype)
    with torch.no_grad():  # i.i.d. non-zero output layers so every step matters
        for block in source.blocks:
            for knots in block.curve.knots.values():
                knots.add_(0.3 * torch.randn_like(knots))
    x = _input(source, dtype=dtype)
    with torch.no_grad():
        expected = reference_resnet(source, x)
        converted = source.discretize(depth=(7, 5), scheme="euler", interp=interp)
        out = converted(x)
    assert _rel(out, expected) <= TOL[dtype]


def test_native_euler_survives_a_checkpoint_round_trip(tmp_path):
    source = ODENet(mlp_config(), init="iid", seed=1)
    smooth_knots_(source)
    path = save_checkpoint(tmp_path / "m.safetensors", source, {"data": {"name": "digits"}})
    loaded, header = load_checkpoint(path)
    x = _input(source)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference_resnet(source, x))
    assert header["data"]["name"] == "digits"


def _smooth_resnet(depth=64, interp="cubic"):
    model = ODENet(mlp_config(depths=(depth, depth), interp=interp), seed=2).double()
    return smooth_knots_(model, scale=0.5)


def test_smooth_resnet_heun_at_quarter_depth_stays_close():
    source = _smooth_resnet()
    x = _input(source, dtype=torch.float64)
    with torch.no_grad():
        deviation = _rel(source.discretize(16, "heun")(x), source(x))
    print(f"depth 64 euler -> depth 16 heun: relative deviation {deviation:.3e}")
    assert deviation <= 1e-2


@pytest.mark.parametrize("interp, scheme, order", [("cubic", "heun", 2), ("cubic", "ralston", 2),
                                                   ("cubic", "midpoint", 2), ("cubic", "euler", 1)])
def test_deviation_shrinks_with_the_schemes_order(interp, scheme, order):
    """Deviation from the converted ODE's limit (rk4 at depth 1024) against target depth.

    Only orders ≤ 2 on the C² cubic spline: a spline is not smooth enough at its knots for
    rk4 to show order 4 (rk4's order is measured on analytic weights in test_schemes.py), and
    the kinks of ``linear`` make steps coarser than the knot spacing Δ plateau at O(Δ²).
    """
    source = _smooth_resnet(interp=interp)
    x = _input(source, dtype=torch.float64)
    with torch.no_grad():
        limit = source.discretize(1024, "rk4")(x)
        depths = [8, 16, 32, 64]
        errors = [_rel(source.discretize(m, scheme)(x), limit) for m in depths]
    slope = fitted_slope([1 / m for m in depths], errors)
    print(f"conversion {interp} {scheme}: slope {slope:.3f} (declared {order}), errors {errors}")
    assert abs(slope - order) <= 0.3, (slope, errors)


def test_discretize_copies_and_validates():
    source = ODENet(mlp_config())
    target = source.discretize(depth=(3, 5), scheme="rk4", interp="smooth", n_basis=2)
    assert [b.depth for b in target.blocks] == [3, 5] and target.config.depths == (3, 5)
    assert target.blocks[0].curve.interp == "smooth" and target.config.n_basis == 2
    assert source.config.depths == (8, 8) and source.blocks[0].scheme == "euler"
    assert source.blocks[0].curve.knots["W"].data_ptr() != target.blocks[0].curve.knots["W"].data_ptr()
    with pytest.raises(ResodeError, match="depth must be an integer from 1"):
        source.discretize(0)
    with pytest.raises(ResodeError, match="2 stages"):
        source.discretize((3, 4, 5))
    with pytest.raises(ResodeError, match="valid schemes"):
        source.discretize(scheme="leapfrog")
    with pytest.raises(ResodeError, match="valid interpolations"):
        source.discretize(interp="quintic")


@pytest.mark.parametrize("interp", list(INTERPOLATIONS))
def test_tied_weights_are_depth_independent(interp):
    """A tied-weight net is one ODE: every scheme at any depth solves the same ODE."""
    source = ODENet(mlp_config(widths=(5,), depths=(8,), knots=(1,), interp=interp), seed=4).double()
    with torch.no_grad():
        v = source.blocks[0].curve.knots["V"]
        v.copy_(0.5 * torch.randn(v.shape[1:], generator=torch.Generator().manual_seed(0), dtype=v.dtype))
        x = _input(source, dtype=torch.float64)
        a, b = source.discretize(256, "rk4")(x), source.discretize(128, "rk38")(x)
    assert _rel(a, b) < 1e-8


def test_initializations():
    from resode_export.curves import roughness

    smooth, iid = ODENet(mlp_config(), init="smooth"), ODENet(mlp_config(), init="iid")
    assert roughness(dict(smooth.blocks[0].curve.knots.items())) == 0.0
    assert roughness(dict(iid.blocks[0].curve.knots.items())) > 1.0
    assert torch.count_nonzero(smooth.blocks[0].curve.knots["V"]) == 0  # V = 0: starts as the identity
    with pytest.raises(ResodeError, match="smooth, iid"):
        ODENet(mlp_config(), init="orthogonal")


def test_building_a_model_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ODENet(mlp_config(), seed=11)
    assert torch.equal(torch.rand(3), expected)
