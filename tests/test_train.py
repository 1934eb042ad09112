import pytest
import torch

from resode_export.data import digits
from resode_export.errors import ResodeError
from resode_export.network import ODENetConfig
from resode_export.train import train


def _config(**kw):
    return ODENetConfig(**{"arch": "mlp", "in_shape": (64,), "widths": (16,), "depths": (6,), "hidden": 16,
                           "scheme": "heun", **kw})


@pytest.fixture(scope="module")
def data():
    return digits()


def test_training_learns_and_records(data):
    model, record = train(_config(), data, epochs=6, batch_size=64, lr=3e-3, device="cpu", show_progress=False)
    assert record["metrics"]["test_accuracy"] > 0.85
    assert record["training"]["loss_history"][-1] < record["training"]["loss_history"][0]
    assert record["training"]["method"] == "backprop" and record["data"]["name"] == "digits"


@pytest.mark.parametrize("method", ["symplectic", "checkpoint"])
def test_exact_methods_train_like_backprop(data, method):
    """Exact gradients give the same training run as backprop, up to float32 rounding."""
    kw = dict(epochs=2, batch_size=64, lr=3e-3, device="cpu", show_progress=False)
    _, ref = train(_config(), data, **kw)
    _, rec = train(_config(grad=method), data, **kw)
    assert rec["training"]["method"] == method
    assert rec["training"]["loss_history"] == pytest.approx(ref["training"]["loss_history"], rel=1e-4)


def test_adjoint_trains(data):
    _, rec = train(_config(grad="adjoint", depths=(16,)), data, epochs=6, batch_size=64, lr=3e-3, device="cpu",
                   show_progress=False)
    assert rec["metrics"]["test_accuracy"] > 0.85


def test_bad_training_arguments(data):
    with pytest.raises(ResodeError, match="learning rate"):
        train(_config(), data, lr=0.0, show_progress=False)
    with pytest.raises(ResodeError, match="shape"):
        train(_config(in_shape=(10,)), data, show_progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: --device cuda is valid here")
def test_cuda_without_a_gpu_is_bad_input(data):
    with pytest.raises(ResodeError, match="no CUDA"):
        train(_config(), data, device="cuda", show_progress=False)
