"""Gradient methods against backprop: exact ones to rounding, the adjoint by its order in depth."""

import pytest
import torch

from resode_export.curves import Curve
from resode_export.errors import ResodeError
from resode_export.fields import ConvField, MLPField, ResBlockField
from resode_export.gradients import GRADIENTS, adjoint_supported, integrate
from resode_export.network import ODEBlock, ODENet
from resode_export.schemes import SCHEMES, ButcherTableau

from .helpers import fitted_slope, mlp_config, smooth_knots_

RK = [name for name, s in SCHEMES.items() if isinstance(s, ButcherTableau)]

EXACT = ["checkpoint", "symplectic"]


def _grads(model, x, grad):
    model = model.discretize(grad=grad)
    model.zero_grad()
    loss = (model(x) ** 2).sum()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _rel_error(grads, reference):
    num = sum(float((grads[k] - reference[k]).norm() ** 2) for k in reference) ** 0.5
    return num / sum(float(reference[k].norm() ** 2) for k in reference) ** 0.5


@pytest.mark.parametrize(
    "method, scheme", [(m, s) for m in EXACT for s in RK] + [("reversible", "reversible_heun")]
)
@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_exact_methods_equal_backprop(method, scheme, interp):
    """Two stages with a transition, stem and head by ordinary autograd, i.i.d. weights, float64."""
    model = ODENet(mlp_config(depths=(5, 3), knots=(4, 6), scheme=scheme, interp=interp), init="iid", seed=1)
    model = smooth_knots_(model.double(), scale=0.5)
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    loss_ref, ref = _grads(model, x, "backprop")
    loss, grads = _grads(model, x, method)
    assert torch.equal(loss, loss_ref) or abs(float(loss - loss_ref)) <= 1e-12 * float(loss_ref)
    assert _rel_error(grads, ref) <= 1e-10


@pytest.mark.parametrize("field", [ConvField(4, 2, "gelu"), ResBlockField(4, 6, "bottleneck", 2, "frozen"),
                                   ResBlockField(4, 4, "basic", 1, "fold")], ids=lambda f: f"{f.name}-{getattr(f, 'bn', '')}")
@pytest.mark.parametrize("scheme", ["euler", "heun", "rk4"])
def test_symplectic_equals_backprop_on_conv_fields(field, scheme):
    """The symplectic adjoint's per-stage VJP (Field.vjp, with the last conv's forward skipped) on conv
    fields, projected or not, folded or frozen BatchNorm: backprop's gradients, float64."""
    gen = torch.Generator().manual_seed(4)
    knots = {k: 0.5 * torch.randn(3, *s, generator=gen, dtype=torch.float64) for k, s in field.param_shapes().items()}
    x0 = torch.rand(2, 4, 5, 5, generator=gen, dtype=torch.float64) - 0.3
    weight = torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64)
    grads = {}
    for method in ("backprop", "symplectic"):
        curve = Curve({k: v.clone() for k, v in knots.items()}, "linear")
        x = x0.clone().requires_grad_(True)
        (integrate(field, x, curve, scheme, 5, method) * weight).sum().backward()
        grads[method] = [x.grad, *(p.grad for p in curve.parameters())]
    for a, b in zip(grads["backprop"], grads["symplectic"]):
        assert float((a - b).norm()) <= 1e-10 * float(a.norm())


@pytest.mark.parametrize("method, scheme", [("adjoint", "euler"), ("adjoint", "heun"), ("symplectic", "rk4"),
                                           ("adjoint_fast", "euler"), ("auto", "euler"),
                                           ("reversible", "reversible_heun")])
def test_the_incoming_gradient_is_left_as_it_was(method, scheme):
    """The custom backwards update their adjoints in place: never the gradient the engine hands them,
    which a hook on the block's output (or another branch of the graph) may still hold."""
    field = MLPField(5, 7, "tanh")
    gen = torch.Generator().manual_seed(5)
    curve = Curve({k: 0.5 * torch.randn(3, *s, generator=gen, dtype=torch.float64)
                   for k, s in field.param_shapes().items()}, "linear")
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    block = ODEBlock(field, curve, 6, scheme, method) if method == "auto" else None
    y = block(x) if block is not None else integrate(field, x, curve, scheme, 6, method)
    seen = []
    y.register_hook(seen.append)
    (y * weight).sum().backward()
    assert len(seen) == 1 and torch.equal(seen[0], weight)


def test_reversible_gradients_under_create_graph():
    """A gradient taken with create_graph=True (as a gradient penalty does) is still the exact one."""
    field = MLPField(5, 7, "tanh")
    gen = torch.Generator().manual_seed(6)
    knots = {k: 0.5 * torch.randn(3, *s, generator=gen, dtype=torch.float64) for k, s in field.param_shapes().items()}
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    grads = {}
    for method in ("backprop", "reversible"):
        y = integrate(field, x, Curve({k: v.clone() for k, v in knots.items()}, "linear"), "reversible_heun", 4, method)
        (grads[method],) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    diff, ref = (grads["reversible"] - grads["backprop"]).detach(), grads["backprop"].detach()
    assert float(diff.norm()) <= 1e-12 * float(ref.norm())


@pytest.mark.parametrize("method, scheme", [("adjoint", "heun"), ("symplectic", "rk4"), ("adjoint_fast", "euler"),
                                            ("auto", "euler"), ("reversible", "reversible_heun")])
def test_second_derivatives_raise_rather_than_mislead(method, scheme):
    """The memory-free methods take their VJPs at reconstructed (or stored, detached) states, so a second
    derivative through them (a gradient penalty) would silently miss terms: it raises instead, while
    the first derivative under create_graph stays exact. Backprop and checkpoint give second derivatives."""
    field = MLPField(3, 4, "tanh")
    gen = torch.Generator().manual_seed(2)
    knots = {k: 0.5 * torch.randn(3, *s, generator=gen, dtype=torch.float64) for k, s in field.param_shapes().items()}
    x = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    penalties = {}
    exact = ["backprop"] + (["checkpoint"] if scheme != "reversible_heun" else [])  # checkpoint: no reversible
    for grad in (*exact, method):
        curve = Curve({k: v.clone() for k, v in knots.items()}, "linear")
        block = ODEBlock(field, curve, 4, scheme, grad) if grad == "auto" else None
        y = block(x) if block is not None else integrate(field, x, curve, scheme, 4, grad)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        penalties[grad] = gx
        if grad == method:
            with pytest.raises(RuntimeError, match="differentiate twice"):
                gx.square().sum().backward()
        else:
            (second,) = torch.autograd.grad(gx.square().sum(), x)
            penalties[grad + "'"] = second
    for grad in exact[1:]:
        assert torch.allclose(penalties[grad + "'"], penalties["backprop'"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["adjoint", "symplectic"])
def test_conv_adjoints_run_under_autocast(method):
    """Backward inside torch.autocast: the conv tail VJP runs in autocast's dtype, as F.conv2d would, and
    hands back gradients in the weights' dtype, close to the same method's without autocast."""
    field = ConvField(4, 2)
    gen = torch.Generator().manual_seed(7)
    knots = {k: 0.3 * torch.randn(3, *s, generator=gen) for k, s in field.param_shapes().items()}
    x0 = torch.randn(2, 4, 5, 5, generator=gen)
    grads = {}
    for autocast in (False, True):
        curve = Curve({k: v.clone() for k, v in knots.items()}, "linear")
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            integrate(field, x, curve, "euler", 3, method).float().square().sum().backward()
        grads[autocast] = [x.grad, *(p.grad for p in curve.parameters())]
        assert all(g.dtype == torch.float32 for g in grads[autocast])
    for a, b in zip(grads[False], grads[True]):
        assert float((a - b).norm()) <= 0.05 * float(a.norm())


@pytest.mark.parametrize("method, scheme", [("checkpoint", "heun"), ("symplectic", "rk4"),
                                           ("reversible", "reversible_heun")])
def test_exact_methods_match_finite_differences(method, scheme):
    field = MLPField(3, 4, "tanh")
    knots = {k: torch.randn(3, *s, dtype=torch.float64) * 0.5 for k, s in field.param_shapes().items()}
    curve = Curve(knots, "cubic")
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, *values):
        for p, v in zip(curve.knots.values(), values):
            p.data = v.data
        return integrate(field, x, curve, scheme, 4, method)

    inputs = (x, *curve.knots.values())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("method, scheme, bound", [("adjoint", "euler", -0.8), ("adjoint", "heun", -1.8),
                                                   ("adjoint_fast", "euler", -1.5)])
def test_adjoint_error_falls_with_depth_on_smooth_weights(method, scheme, bound):
    depths = [8, 16, 32, 64, 128, 256]
    errors = []
    for depth in depths:
        model = ODENet(mlp_config(widths=(5,), depths=(depth,), knots=(8,), interp="cubic", scheme=scheme), seed=2)
        model = smooth_knots_(model.double(), scale=0.5)
        x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        _, ref = _grads(model, x, "backprop")
        _, grads = _grads(model, x, method)
        errors.append(_rel_error(grads, ref))
    slope = fitted_slope(depths, errors)
    print(f"{method} {scheme}: slope {slope:.2f}, errors {[f'{e:.2e}' for e in errors]}")
    assert slope <= bound, (slope, errors)


@pytest.mark.parametrize("scheme", ["euler", "heun"])
def test_adjoint_on_iid_weights(scheme):
    """Weights i.i.d. in depth (1/N-scaled residuals): the errors are printed, not hidden.

    The Euler reconstruction x̃_n = x_{n+1} − h f(x_{n+1}, θ_n) uses the step's own weights, so it
    only needs f Lipschitz in x (Sander et al. 2022): its error still falls like 1/N.
    """
    depths, errors = [16, 64, 256], []
    for depth in depths:
        model = ODENet(mlp_config(widths=(5,), depths=(depth,), scheme=scheme), init="iid", seed=3).double()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for knots in model.blocks[0].curve.knots.values():
                knots.copy_(torch.randn(knots.shape, generator=gen, dtype=knots.dtype) / knots.shape[-1] ** 0.5)
        x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        _, ref = _grads(model, x, "backprop")
        _, grads = _grads(model, x, "adjoint")
        errors.append(_rel_error(grads, ref))
    slope = fitted_slope(depths, errors)
    print(f"adjoint {scheme} on i.i.d. weights: slope {slope:.2f}, errors {[f'{e:.2e}' for e in errors]}")
    assert slope <= -0.8, (slope, errors)


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if not adjoint_supported(s)])
def test_adjoint_refuses_schemes_without_a_reverse_step(scheme):
    with pytest.raises(ResodeError, match="--grad"):
        ODENet(mlp_config(scheme=scheme, grad="adjoint"))
    with pytest.raises(ResodeError, match="--grad"):
        ODENet(mlp_config(scheme="euler")).discretize(scheme=scheme, grad="adjoint")


@pytest.mark.parametrize("grad, scheme", [("reversible", "heun"), ("symplectic", "reversible_heun"),
                                          ("checkpoint", "reversible_heun"), ("adjoint_fast", "heun")])
def test_methods_refuse_schemes_they_cannot_run(grad, scheme):
    with pytest.raises(ResodeError, match="--grad"):
        ODENet(mlp_config(scheme=scheme, grad=grad))


def test_fast_adjoint_error_against_the_plain_adjoint():
    """The one-evaluation variant reconstructs to second order: its error overtakes the plain adjoint's."""
    ratios = {}
    for depth in (32, 256):
        model = smooth_knots_(ODENet(mlp_config(widths=(5,), depths=(depth,), knots=(8,), interp="cubic"), seed=2).double(),
                              scale=0.5)
        x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        _, ref = _grads(model, x, "backprop")
        plain = _rel_error(_grads(model, x, "adjoint")[1], ref)
        fast = _rel_error(_grads(model, x, "adjoint_fast")[1], ref)
        ratios[depth] = fast / plain
        print(f"depth {depth} euler: adjoint error {plain:.2e}, adjoint_fast error {fast:.2e} ({fast / plain:.2f}x)")
    assert ratios[256] < 1 and ratios[256] < ratios[32] / 4


def test_moving_a_model_to_reversible_heun_and_back():
    """Same ODE, another scheme: outputs move by the order-2 discretization error only."""
    model = smooth_knots_(ODENet(mlp_config(scheme="heun", depths=(32, 32), interp="cubic"), seed=7).double(), scale=0.5)
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        there = model.discretize(scheme="reversible_heun", grad="reversible")
        back = there.discretize(scheme="heun", grad="backprop")
        assert torch.equal(back(x), model(x))
        errors = [float((model.discretize(d, "reversible_heun")(x) - model.discretize(1024, "rk4")(x)).norm())
                  for d in (16, 32, 64)]
    assert fitted_slope([16, 32, 64], errors) <= -1.7, errors


def test_evaluation_without_grad_is_the_same_for_every_method():
    model = smooth_knots_(ODENet(mlp_config(scheme="heun"), seed=5))
    x = torch.randn(4, 6)
    with torch.no_grad():
        outs = [model.discretize(grad=g)(x) for g in GRADIENTS if g not in ("reversible", "adjoint_fast")]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.parametrize("method", EXACT + ["adjoint", "reversible"])
def test_float32_and_tied_weights(method):
    """One knot per stage (weights shared across depth), float32."""
    scheme = "reversible_heun" if method == "reversible" else "heun"
    model = smooth_knots_(ODENet(mlp_config(knots=(1, 1), scheme=scheme), seed=6), scale=0.5)
    x = torch.randn(5, 6)
    _, ref = _grads(model, x, "backprop")
    _, grads = _grads(model, x, method)
    assert _rel_error(grads, ref) <= (1e-5 if method != "adjoint" else 5e-2)


def test_unknown_gradient_method():
    with pytest.raises(ResodeError, match="backprop, checkpoint, adjoint, symplectic, reversible, auto, adjoint_fast"):
        ODENet(mlp_config(grad="magic"))


def _auto_model(depth, tolerance, every=1):
    model = smooth_knots_(ODENet(mlp_config(widths=(5,), depths=(depth,), knots=(8,), interp="cubic",
                                            grad="auto"), seed=2).double(), scale=0.5)
    model.blocks[0].monitor.every, model.blocks[0].monitor.tolerance = every, tolerance
    return model


def test_auto_stays_adjoint_while_the_reconstruction_holds():
    model = _auto_model(64, tolerance=1.0)
    x = torch.randn(7, 6, dtype=torch.float64)
    _, grads = _grads_keep(model, x)
    _, adjoint = _grads(model, x, "adjoint")
    monitor = model.blocks[0].monitor
    assert monitor.switched_at is None and len(monitor.history) == 1 and 0 < monitor.history[0][1] < 1e-2
    assert _rel_error(grads, adjoint) == 0.0


def test_auto_switches_to_symplectic_past_the_tolerance():
    model = _auto_model(16, tolerance=1e-12)
    x = torch.randn(7, 6, dtype=torch.float64)
    _grads_keep(model, x)  # checked: error > 1e-12 → switch
    monitor = model.blocks[0].monitor
    assert monitor.switched_at == 1 and monitor.method == "symplectic"
    _, grads = _grads_keep(model, x)
    _, ref = _grads(model, x, "backprop")
    assert _rel_error(grads, ref) <= 1e-10 and len(monitor.history) == 1


def test_auto_checks_every_k_steps_and_its_error_falls_with_depth():
    errors = []
    for depth in (16, 64, 256):
        model = _auto_model(depth, tolerance=1.0, every=3)
        x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        for _ in range(7):
            _grads_keep(model, x)
        monitor = model.blocks[0].monitor
        assert [call for call, _ in monitor.history] == [1, 4, 7]
        errors.append(monitor.history[0][1])
    assert fitted_slope([16, 64, 256], errors) <= -0.8, errors  # Euler reconstruction: O(1/N)


def _grads_keep(model, x):
    """Backward through the model as it is (its own gradient method and monitor)."""
    model.zero_grad()
    loss = (model(x) ** 2).sum()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}
