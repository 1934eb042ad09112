"""The same checks on a CUDA GPU: run where one is present (CI has none; the device machine has one)."""

import pytest
import torch

from resode_export.data import load_data
from resode_export.network import ODENet
from resode_export.train import TrainOptions, train

from .helpers import mlp_config, smooth_knots_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("method, scheme", [("checkpoint", "rk4"), ("symplectic", "heun"), ("symplectic", "rk4"),
                                            ("reversible", "reversible_heun")])
def test_exact_methods_equal_backprop_on_cuda(method, scheme):
    model = ODENet(mlp_config(depths=(5, 3), knots=(4, 6), scheme=scheme, interp="cubic"), init="iid", seed=1)
    model = smooth_knots_(model.double(), scale=0.5).cuda()
    x = torch.randn(7, model.config.in_shape[0], dtype=torch.float64, device="cuda")
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
