"""The same checks on a CUDA GPU: run where one is present (CI has none; the device machine has one)."""

import pytest
import torch

from resode_export.data import load_data
from resode_export.network import ODENet
from resode_export.train import TrainOptions, train

from .helpers import conv_config, mlp_config, smooth_knots_
from .test_fields import VJP_CASES, assert_vjp_matches_autograd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("arch, method, scheme", [
    ("mlp", "checkpoint", "rk4"), ("mlp", "symplectic", "heun"), ("mlp", "symplectic", "rk4"),
    ("mlp", "reversible", "reversible_heun"),
    # the conv model (the GPU benchmark's field) through cuDNN
    ("conv", "symplectic", "heun"), ("conv", "checkpoint", "euler"), ("conv", "reversible", "reversible_heun")])
def test_exact_methods_equal_backprop_on_cuda(arch, method, scheme):
    if arch == "mlp":
        model = ODENet(mlp_config(depths=(5, 3), knots=(4, 6), scheme=scheme, interp="cubic"), init="iid", seed=1)
    else:
        model = ODENet(conv_config(scheme=scheme), init="iid", seed=2)
    model = smooth_knots_(model.double(), scale=0.5).cuda()
    x = torch.randn(3, *model.config.in_shape, dtype=torch.float64, device="cuda")
    grads = {}
    for grad in ("backprop", method):
        m = model.discretize(grad=grad)
        m.zero_grad()
        (m(x) ** 2).sum().backward()
        grads[grad] = torch.cat([p.grad.flatten() for p in m.parameters()])
    assert grads[method].is_cuda
    assert float((grads[method] - grads["backprop"]).norm() / grads["backprop"].norm()) <= 1e-10


def test_adjoint_training_on_cuda_matches_cpu():
    """One epoch of --adjoint on digits: same loss on the GPU as on the CPU (float32, up to reduction order)."""
    data = load_data("digits")
    cfg = mlp_config(widths=(16,), depths=(16,), knots=(16,), in_shape=data.in_shape, num_classes=data.num_classes,
                     grad="adjoint")
    losses = {}
    for device in ("cpu", "cuda"):
        _, record = train(ODENet(cfg, seed=0), data, TrainOptions(epochs=1, batch_size=64, lr=3e-3, device=device),
                          show_progress=False)
        losses[device] = record["metrics"]["train_loss"]
        assert record["training"]["device"].startswith("cpu") == (device == "cpu")
    assert abs(losses["cuda"] - losses["cpu"]) <= 1e-3 * abs(losses["cpu"])


@pytest.mark.parametrize("field, x_shape", VJP_CASES, ids=lambda c: getattr(c, "name", ""))
def test_field_vjp_matches_autograd_on_cuda(field, x_shape):
    """Field.vjp's tail (aten.convolution_backward / two matmuls, cuDNN and cuBLAS here) is autograd's
    VJP on the GPU too, in float64."""
    assert_vjp_matches_autograd(field, x_shape, device="cuda", rel=1e-10)


@pytest.mark.parametrize("method", ["adjoint", "symplectic"])
def test_conv_adjoints_under_cuda_autocast(method):
    """Backward inside CUDA autocast (bfloat16): the tail VJP runs in autocast's dtype and the gradients
    come back in float32, close to the same method's without autocast."""
    from resode_export.curves import Curve
    from resode_export.fields import ConvField
    from resode_export.gradients import integrate

    field = ConvField(8, 4)
    gen = torch.Generator().manual_seed(7)
    knots = {k: 0.3 * torch.randn(4, *s, generator=gen).cuda() for k, s in field.param_shapes().items()}
    x0 = torch.randn(4, 8, 6, 6, generator=gen).cuda()
    grads = {}
    for autocast in (False, True):
        curve = Curve({k: v.clone() for k, v in knots.items()}, "linear").cuda()
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            integrate(field, x, curve, "euler", 4, method).float().square().sum().backward()
        grads[autocast] = [x.grad, *(p.grad for p in curve.parameters())]
        assert all(g.dtype == torch.float32 and g.is_cuda for g in grads[autocast])
    for a, b in zip(grads[False], grads[True]):
        assert float((a - b).norm()) <= 0.05 * float(a.norm())
