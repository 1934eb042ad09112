import pytest
import torch
import torch.nn.functional as F

from resode_export.errors import ResodeError
from resode_export.fields import ACTIVATIONS, FIELDS, ConvField, LinearField, MLPField, ResBlockField, make_field

CASES = [(MLPField(5, 7, "gelu"), (4, 5)), (ConvField(8, 4, "relu"), (4, 8, 6, 6)), (LinearField(5), (4, 5)),
         (ResBlockField(8, 4, "bottleneck", 2, "fold"), (2, 8, 5, 5)), (ResBlockField(6, 6, "basic", 1, "frozen"), (2, 6, 4, 4))]


@pytest.mark.parametrize("field, x_shape", CASES, ids=lambda c: getattr(c, "name", ""))
def test_shapes_and_zero_start(field, x_shape):
    theta = {k: v.float() for k, v in field.init(torch.Generator().manual_seed(0)).items()}
    assert {k: tuple(v.shape) for k, v in theta.items()} == field.param_shapes()
    x = torch.randn(x_shape)
    out = field(x, theta)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0, "smooth init starts every residual function at 0 (V = 0)"


@pytest.mark.parametrize("field, x_shape", CASES, ids=lambda c: getattr(c, "name", ""))
def test_config_round_trip(field, x_shape):
    assert make_field(field.config()) == field


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_mlp_matches_formula(activation):
    field = MLPField(3, 4, activation)
    theta = {"W": torch.randn(4, 3), "b": torch.randn(4), "V": torch.randn(3, 4)}
    x = torch.randn(2, 3)
    expected = ACTIVATIONS[activation](x @ theta["W"].T + theta["b"]) @ theta["V"].T
    assert torch.allclose(field(x, theta), expected, atol=1e-6)


def test_conv_field_does_not_mix_samples():
    field = ConvField(8, 4)
    theta = {k: torch.randn(v) for k, v in field.param_shapes().items()}
    x = torch.randn(5, 8, 6, 6)
    alone = field(x[:1], theta)
    y = x.clone()
    y[1:] = 100 * torch.randn(4, 8, 6, 6)  # change the rest of the batch
    assert torch.allclose(field(y, theta)[:1], alone, atol=1e-5)


def test_bad_field_arguments():
    with pytest.raises(ResodeError, match="valid activations are: relu, gelu, tanh"):
        MLPField(3, 4, "swish")
    with pytest.raises(ValueError, match="multiple of groups"):
        ConvField(6, 4)
    assert set(FIELDS) == {"mlp", "conv", "linear", "resblock"}


VJP_CASES = CASES + [(MLPField(5, 7, "tanh"), (2, 3, 5)), (MLPField(5, 7, "tanh"), (5,)),
                     (ResBlockField(8, 4, "bottleneck", 2, "frozen"), (2, 8, 5, 5)),
                     (ResBlockField(6, 6, "basic", 1, "fold"), (2, 6, 4, 4)),
                     (ResBlockField(6, 4, "basic", 1, "fold"), (6, 4, 4)),  # unbatched, as F.conv2d takes it
                     (ResBlockField(6, 4, "basic", 1, "frozen"), (6, 4, 4))]


def assert_vjp_matches_autograd(field, x_shape, device="cpu", rel=1e-12):
    """Field.vjp against autograd's VJP in float64 on ``device``, with theta's keys in reversed order and,
    for the frozen BN form, half the last scale zero."""
    gen = torch.Generator().manual_seed(3)
    theta = {k: torch.randn(s, generator=gen, dtype=torch.float64).to(device) for k, s in field.param_shapes().items()}
    if getattr(field, "bn", None) == "frozen":
        last = len(field.convs())
        theta[f"s{last}"][::2] = 0.0
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64).to(device)
    v = torch.randn(x_shape, generator=gen, dtype=torch.float64).to(device)
    theta = dict(reversed(theta.items()))  # gradients come back in theta's order, whatever it is
    leaves = {k: t.clone().requires_grad_(True) for k, t in theta.items()}
    xl = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(field(xl, leaves), [xl, *leaves.values()], v)
    x_bar, theta_bars = field.vjp(x, theta, v)
    assert x_bar.shape == x.shape and len(theta_bars) == len(theta)
    for got, want in zip([x_bar, *theta_bars], expected):
        assert got.shape == want.shape and got.device == want.device
        assert float((got - want).norm()) <= rel * float(want.norm())


@pytest.mark.parametrize("field, x_shape", VJP_CASES, ids=lambda c: getattr(c, "name", ""))
def test_vjp_matches_autograd_without_the_last_layer_forward(field, x_shape):
    """Field.vjp (which never runs the last linear layer forward) is autograd's VJP, in float64; a
    zero BN scale (the frozen form's init) included, where w̄ = s G must not divide by s."""
    assert_vjp_matches_autograd(field, x_shape)


def test_conv_vjp_runs_only_the_first_convolution_forward():
    """The point of Field.vjp: the last convolution's forward is never run (its VJP needs only its input)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.calls[name] = self.calls.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    field = ConvField(8, 4)
    theta = {k: torch.randn(s) for k, s in field.param_shapes().items()}
    x, v = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    with Count() as count:
        field.vjp(x, theta, v)
    assert count.calls.get("convolution", 0) == 1, count.calls
    assert count.calls.get("convolution_backward", 0) == 2, count.calls


@pytest.mark.parametrize("scale", [False, True])
def test_grouped_conv_tail_vjp(scale):
    """The tail VJP of a grouped convolution (a custom field may end with one): autograd's, float64."""
    from resode_export.fields import _conv_vjp

    gen = torch.Generator().manual_seed(8)
    theta = {"w": torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64),
             "t": torch.randn(6, generator=gen, dtype=torch.float64),
             "s": torch.randn(6, generator=gen, dtype=torch.float64)}
    h = torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 6, 5, 5, generator=gen, dtype=torch.float64)
    leaves = {k: t.clone().requires_grad_(True) for k, t in theta.items()}
    hl = h.clone().requires_grad_(True)
    y = F.conv2d(hl, leaves["w"], None if scale else leaves["t"], padding=1, groups=2)
    if scale:
        y = y * leaves["s"][:, None, None] + leaves["t"][:, None, None]
    names = ["w", "t", "s"] if scale else ["w", "t"]
    expected = torch.autograd.grad(y, [hl, *(leaves[k] for k in names)], v)
    h_bar, grads = _conv_vjp("w", "t", "s" if scale else None, 1, 2)(h, theta, v)
    for got, want in zip([h_bar, *(grads[k] for k in names)], expected):
        assert float((got - want).norm()) <= 1e-12 * float(want.norm())
