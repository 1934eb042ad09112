"""Importing torchvision-style ResNets: layouts, exact round trips, projected steps, errors, export, fine-tuning."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from resode_export.convert import load_model, probe_inputs
from resode_export.curves import Curve
from resode_export.errors import ResodeError
from resode_export.evaluate import relative_deviation
from resode_export.fields import ResBlockField
from resode_export.gradients import ReconstructionMonitor, integrate, reconstruction_error
from resode_export.importers.torchvision import (
    PRESETS,
    check_preset,
    detect_layout,
    expected_shapes,
    import_resnet,
    read_state_dict,
    reference_forward,
)
from resode_export.io import load_checkpoint
from resode_export.network import ODEBlock

from .helpers import fitted_slope, run_cli
from .tv_models import BasicBlock, Bottleneck, ResNet, randomize_bn, resnet18, resnet50

SIZE = (32, 32)


def small(name: str) -> torch.nn.Module:
    """Random small-width versions of each layout (seeded)."""
    torch.manual_seed(0)
    nets = {
        "resnet18": lambda: resnet18(width=8),
        "resnet50": lambda: resnet50(width=8),
        "resnext": lambda: ResNet(Bottleneck, [2, 3, 2], width=8, groups=4, width_per_group=16),
        "wide": lambda: ResNet(Bottleneck, [2, 2], width=8, width_per_group=128),
    }
    return randomize_bn(nets[name]())


LAYOUTS = ["resnet18", "resnet50", "resnext", "wide"]


@pytest.mark.parametrize("bn", ["fold", "frozen"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_round_trip_at_native_depth_is_exact_in_float64(name, bn):
    net = small(name).double()
    sd = net.state_dict()
    model = import_resnet(sd, input_size=SIZE, bn=bn, dtype=torch.float64)
    x = torch.randn(3, 3, *SIZE, dtype=torch.float64)
    with torch.no_grad():
        want = net(x)
        got = model(x)
        ref = reference_forward(sd, detect_layout(sd), x)
    assert float((ref - want).abs().max() / want.abs().max()) < 1e-13  # the reference is the network
    assert float((got - want).abs().max() / want.abs().max()) < 1e-12
    # and Euler at the native depth is what discretize gives back
    with torch.no_grad():
        again = model.discretize(depth=model.config.depths, scheme="euler")(x)
    assert torch.equal(again, got)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_round_trip_float32(name):
    net = small(name)
    model = import_resnet(net.state_dict(), input_size=SIZE)
    x = torch.randn(4, 3, *SIZE)
    with torch.no_grad():
        want, got = net(x), model(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_layout_recognized_from_keys():
    r18, r50, rx = (detect_layout(small(n).state_dict()) for n in ("resnet18", "resnet50", "resnext"))
    assert (r18.block, r18.blocks, r18.widths, r18.inner) == ("basic", (2, 2, 2, 2), (8, 16, 32, 64), (8, 16, 32, 64))
    assert (r50.block, r50.blocks, r50.widths, r50.inner) == ("bottleneck", (3, 4, 6, 3), (32, 64, 128, 256),
                                                              (8, 16, 32, 64))
    assert rx.cardinality == 4 and rx.inner == (8, 16, 32)
    model = import_resnet(small("resnet50").state_dict(), input_size=SIZE)
    assert model.config.depths == (2, 3, 5, 2)  # N = blocks − 1 knots per stage
    assert [b.curve.num_knots for b in model.blocks] == [2, 3, 5, 2]


def test_full_width_presets():
    torch.manual_seed(0)
    sd = resnet18(num_classes=5).state_dict()
    check_preset(detect_layout(sd), "resnet18")
    with pytest.raises(ResodeError, match="not a resnet34"):
        check_preset(detect_layout(sd), "resnet34")
    shapes = expected_shapes(detect_layout(sd))
    assert shapes == {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def test_projected_step_is_relu_of_euler():
    field = ResBlockField(8, 4, "bottleneck", cardinality=2)
    theta = {k: torch.randn(v, dtype=torch.float64) for k, v in field.param_shapes().items()}
    x = torch.rand(2, 8, 5, 5, dtype=torch.float64)
    curve = Curve({k: v[None] for k, v in theta.items()})
    y = integrate(field, x, curve, "euler", 1)
    assert torch.equal(y, torch.relu(x + 1.0 * field(x, theta)))
    assert (y >= 0).all()


@pytest.mark.parametrize("scheme", ["euler", "heun", "rk4"])
@pytest.mark.parametrize("method", ["checkpoint", "symplectic"])
def test_exact_gradients_through_projected_steps(scheme, method):
    """Exact methods equal backprop through relu-projected steps (the mask comes from x_{n+1} itself)."""
    field = ResBlockField(4, 4, "basic")
    gen = torch.Generator().manual_seed(1)
    knots = {k: 0.5 * torch.randn(5, *v, generator=gen, dtype=torch.float64) for k, v in field.param_shapes().items()}
    x0 = torch.rand(2, 4, 4, 4, generator=gen, dtype=torch.float64) - 0.2
    grads = {}
    for m in ("backprop", method):
        curve = Curve({k: v.clone() for k, v in knots.items()}, "linear")
        x = x0.clone().requires_grad_(True)
        y = integrate(field, x, curve, scheme, 7, m)
        (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)).sum().backward()
        grads[m] = [x.grad] + [p.grad for p in curve.parameters()]
    for a, b in zip(grads["backprop"], grads[method]):
        assert float((a - b).abs().max()) <= 1e-10 * max(1.0, float(a.abs().max()))


def _projected_problem(scale: float):
    field = ResBlockField(4, 4, "basic")
    gen = torch.Generator().manual_seed(2)
    base = {k: scale * torch.randn(*v, generator=gen, dtype=torch.float64) for k, v in field.param_shapes().items()}
    knots = {k: torch.stack([v * (1 + 0.3 * np.sin(2 * t)) for t in np.linspace(0, 1, 4)]) for k, v in base.items()}
    x0 = torch.rand(2, 4, 4, 4, generator=gen, dtype=torch.float64) + 0.5
    return field, knots, x0


def _adjoint_gradient_error(field, knots, x0, depth, method="adjoint") -> float:
    grads = {}
    for m in ("backprop", method):
        curve = Curve({k: v.clone() for k, v in knots.items()}, "cubic")
        integrate(field, x0, curve, "euler", depth, m).square().sum().backward()
        grads[m] = torch.cat([p.grad.reshape(-1) for p in curve.parameters()])
    return float((grads[method] - grads["backprop"]).norm() / grads["backprop"].norm())


def test_adjoint_through_projected_steps():
    """Where the ReLU never clips along the path the projected adjoint converges like the plain one (order 1);
    where it clips, the step forgets what it clipped: the reconstruction error does not shrink with depth, and
    the ``auto`` monitor sees it and switches to the exact symplectic adjoint."""
    depths = [8, 16, 32, 64]
    field, knots, x0 = _projected_problem(0.1)
    y = integrate(field, x0, Curve(knots, "cubic"), "euler", 64)
    assert (y > 0).all()  # the projection is inactive on this path
    errors = [_adjoint_gradient_error(field, knots, x0, d) for d in depths]
    assert fitted_slope(depths, errors) < -0.9, errors
    fast = [_adjoint_gradient_error(field, knots, x0, d, "adjoint_fast") for d in depths]
    assert fitted_slope(depths, fast) < -1.5, fast  # its second-order reconstruction, through the projection
    field, knots, x0 = _projected_problem(0.5)
    assert (integrate(field, x0, Curve(knots, "cubic"), "euler", 64) == 0).any()  # it clips
    recon = [reconstruction_error(field, x0, Curve(knots, "cubic"), "euler", d) for d in depths]
    assert min(recon) > 1.0, recon  # lost, at every depth
    block = ODEBlock(field, Curve({k: v.clone() for k, v in knots.items()}, "cubic"), 16, "euler", "auto")
    block(x0).sum().backward()
    assert block.monitor.switched_at == 1 and block.monitor.method == "symplectic"


@pytest.mark.parametrize("method", ["adjoint", "adjoint_fast", "auto", "symplectic"])
def test_projected_adjoints_are_exact_where_the_reconstruction_is(method):
    """A branch that does not depend on x (w1 = w2 = 0: F = b2 > 0) is reversed exactly, even through the projection,
    and states that start at 0 become positive: the ReLU mask of each step must come from its output (from its input
    it would zero step 0's gradient on those coordinates). Every adjoint then equals backprop to rounding."""
    field = ResBlockField(4, 4, "basic")
    gen = torch.Generator().manual_seed(3)
    knots = {k: 0.3 * torch.randn(4, *v, generator=gen, dtype=torch.float64) for k, v in field.param_shapes().items()}
    knots["w1"].zero_()
    knots["w2"].zero_()
    # dyadic values and h = 1/4: every step and its reversal are exact, so states at 0 reconstruct to exactly 0;
    # F constant in t, so adjoint_fast's extrapolation F_{n-1} = 2F_n - F_{n+1} is exact too
    knots["b2"] = (torch.randint(1, 8, (4,), generator=gen).double() / 8).expand(4, 4).clone()
    x0 = torch.randint(0, 8, (2, 4, 3, 3), generator=gen).double() / 8
    x0[:, :2] = 0.0  # on the boundary of the projection's range
    grads = {}
    for m in ("backprop", method):
        curve = Curve({k: v.clone() for k, v in knots.items()}, "linear")
        x = x0.clone().requires_grad_(True)
        y = integrate(field, x, curve, "euler", 4, m, ReconstructionMonitor() if m == "auto" else None)
        (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)).sum().backward()
        grads[m] = [x.grad] + [p.grad for p in curve.parameters()]
    assert float(grads["backprop"][-1].abs().max()) > 0  # b2 gets a gradient
    for a, b in zip(grads["backprop"], grads[method]):
        assert float((a - b).abs().max()) <= 1e-12 * max(1.0, float(a.abs().max()))


def test_reversible_scheme_refused_for_projected_blocks():
    model = import_resnet(small("resnet18").state_dict(), input_size=SIZE)
    with pytest.raises(ResodeError, match="projection cannot be undone"):
        model.discretize(scheme="reversible_heun", grad="reversible")
    block = model.blocks[0]
    with pytest.raises(ResodeError, match="projection cannot be undone"):  # the functional API too
        integrate(block.field, torch.rand(1, 8, 8, 8), block.curve, "reversible_heun", 2, "reversible")


def test_rediscretized_import_converges_in_depth():
    """The import is a curve: re-solving it deeper with rk4 converges (Cauchy differences shrink) when its residual
    branches are small, as in a ResNet trained from zero-initialized last BatchNorms (random full-size branches make
    an explosive ODE: no limit to converge to, which inspect reports)."""
    sd = small("resnet50").state_dict()
    for k in sd:
        if k.endswith("bn3.weight") or k.endswith("bn3.bias"):
            sd[k] = 0.05 * sd[k]
    model = import_resnet(sd, input_size=SIZE, interp="cubic", dtype=torch.float64)
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64)
    with torch.no_grad():
        outs = [model.discretize(depth=d, scheme="rk4")(x) for d in (8, 16, 32, 64)]
    diffs = [float((a - b).norm()) for a, b in zip(outs[:-1], outs[1:])]
    assert diffs[2] < diffs[1] < diffs[0], diffs


# --- files and errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.module."])
def test_read_wrapped_and_prefixed(tmp_path, prefix):
    sd = small("resnet18").state_dict()
    path = tmp_path / "ckpt.PTH"  # any case
    torch.save({"epoch": 3, "state_dict": {f"{prefix}{k}": v for k, v in sd.items()}}, path)
    read = read_state_dict(path)
    assert set(read) == set(sd) and all(torch.equal(read[k], sd[k]) for k in sd)
    model, header, _ = load_model(str(path), input_size=SIZE)
    assert header["imported"]["blocks"] == [2, 2, 2, 2]


@pytest.mark.parametrize("wrap", ["beside a best-accuracy tensor", "beside an EMA scalar", "under another name, twice"])
def test_read_training_checkpoints(tmp_path, wrap):
    """Training scripts save {"epoch": …, "state_dict": …, "best_acc1": tensor(…)}: the state dict is unwrapped
    even with a tensor beside it, and one dict nested under any name too."""
    sd = small("resnet18").state_dict()
    saved = {"beside a best-accuracy tensor": {"epoch": 5, "state_dict": sd, "best_acc1": torch.tensor(70.0)},
             "beside an EMA scalar": {"state_dict": sd, "ema": torch.tensor(1.0)},
             "under another name, twice": {"a": {"b": sd}}}[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(saved, path)
    read = read_state_dict(path)
    assert set(read) == set(sd) and all(torch.equal(read[k], sd[k]) for k in sd)


def test_an_empty_state_dict_is_named(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({}, path)
    with pytest.raises(ResodeError, match="holds an empty dict"):
        read_state_dict(path)
    torch.save({"epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, path)  # no weights in it at all
    with pytest.raises(ResodeError, match="holds no tensors"):
        read_state_dict(path)
    sd = small("resnet18").state_dict()
    torch.save({"weights": sd, "ema_weights": sd}, path)
    with pytest.raises(ResodeError, match=r"several dicts of tensors \(weights, ema_weights\)"):
        read_state_dict(path)


def test_torchscript_archive_is_not_a_state_dict(capsys, tmp_path, r50_file):
    path, _ = r50_file
    ts = tmp_path / "r50.pt"
    code, _, err = run_cli(capsys, "export", path, "--input-size", "32", "--format", "torchscript", "--out", ts)
    assert code == 0, err
    code, _, err = run_cli(capsys, "convert", ts)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "TorchScript archive" in err, err


def test_pickle_payload_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, path)
    with pytest.raises(ResodeError, match="weights_only"):
        read_state_dict(path)
    assert not marker.exists()


def _mutated(tmp_path, change) -> str:
    sd = dict(small("resnet18").state_dict())
    change(sd)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    return str(path)


BAD_LAYOUTS = {
    "not a resnet": (lambda sd: [sd.clear(), sd.update({"features.0.weight": torch.zeros(4, 3, 3, 3)})],
                     "nor a torchvision-style ResNet state dict: missing conv1.weight, fc.weight, layer1.0.*"),
    "missing key": (lambda sd: sd.pop("layer2.1.bn2.running_var"), "missing 1 key (layer2.1.bn2.running_var)"),
    "unexpected key": (lambda sd: sd.update({"layer2.1.extra.weight": torch.zeros(2)}),
                       "unexpected 1 key (layer2.1.extra.weight)"),
    "wrong shape": (lambda sd: sd.update({"layer3.1.conv1.weight": torch.zeros(32, 32, 1, 1)}),
                    "wrong shape (layer3.1.conv1.weight: (32, 32, 1, 1), expected (32, 32, 3, 3))"),
    "5×5 stem": (lambda sd: sd.update({"conv1.weight": torch.zeros(8, 3, 5, 5)}), "7×7"),
    "single-block stage": (lambda sd: [sd.pop(k) for k in [k for k in sd if k.startswith("layer4.1.")]],
                           "layer4 holds a single block"),
    "deep stem of timm's ResNet-D": (lambda sd: [sd.pop("conv1.weight"), sd.update({"conv1.0.weight": torch.zeros(8, 3, 3, 3)})],
                                     "has a deep stem (conv1.0, conv1.1, …"),
    "gap in stages": (lambda sd: [sd.pop(k) for k in [k for k in sd if k.startswith("layer2.")]],
                      "layer1..layerN"),
    "nan weights": (lambda sd: sd["layer1.1.conv1.weight"].fill_(float("nan")), "NaN"),
    "integer weights": (lambda sd: sd.update({"layer1.1.conv1.weight": sd["layer1.1.conv1.weight"].long()}),
                        "torch.int64 values in layer1.1.conv1.weight"),
    "scalar classifier": (lambda sd: sd.update({"fc.weight": torch.tensor(1.0)}), "fc.weight has shape ()"),
    "negative variance": (lambda sd: sd["layer2.1.bn1.running_var"].fill_(-1.0), "layer2.1.bn1.running_var holds"),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_unknown_layouts_get_one_clear_line(capsys, tmp_path, case):
    change, hint = BAD_LAYOUTS[case]
    path = _mutated(tmp_path, change)
    code, out, err = run_cli(capsys, "convert", path, "--out", tmp_path / "out.safetensors")
    assert code == 2 and len(err.strip().splitlines()) == 1 and hint in err, err
    assert "Traceback" not in err and not (tmp_path / "out.safetensors").exists()


def test_from_preset_mismatch_and_options_for_resode_checkpoints(capsys, tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(small("resnet18").state_dict(), path)
    code, _, err = run_cli(capsys, "convert", path, "--from", "resnet50")
    assert code == 2 and "not a resnet50" in err and "block 'basic' (expected 'bottleneck')" in err
    code, _, err = run_cli(capsys, "convert", path, "--input-size", "0")
    assert code == 2 and "--input-size" in err
    code, _, err = run_cli(capsys, "convert", "digits-mlp", "--from", "resnet18")
    assert code == 2 and "apply to torchvision-style state dicts" in err
    code, _, err = run_cli(capsys, "export", "digits-mlp", "--bn", "frozen")
    assert code == 2 and "apply to torchvision-style state dicts" in err


# --- the CLI end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tv")
    net = small("resnet50")
    torch.save(net.state_dict(), folder / "r50.pth")
    return folder / "r50.pth", net


def test_convert_imports_and_records_the_round_trip(capsys, tmp_path, r50_file):
    path, net = r50_file
    out = tmp_path / "r50.safetensors"
    code, stdout, err = run_cli(capsys, "convert", path, "--input-size", "32", "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["imported"]["blocks"] == [3, 4, 6, 3] and result["imported"]["max_rel_deviation"] < 1e-5
    assert result["max_rel_deviation"] == 0.0 and result["accuracy"] is None
    model, header = load_checkpoint(out)
    assert header["imported"]["layout"].startswith("Bottleneck ResNet")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert float((model(x) - net(x)).abs().max() / net(x).abs().max()) < 1e-5
    # re-discretized: another depth and scheme, the same curve
    code, stdout, err = run_cli(capsys, "convert", out, "--depth", "8", "--scheme", "heun", "--json")
    assert code == 0, err
    probe = probe_inputs(model, 16)  # what convert measures on when the model has no data set
    with torch.no_grad():
        expected = float(relative_deviation(model.discretize(depth=8, scheme="heun")(probe), model(probe)).max())
    assert expected > 0 and json.loads(stdout)["max_rel_deviation"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_of_an_import_matches_the_original_network(capsys, tmp_path, r50_file, fmt):
    path, net = r50_file
    out = tmp_path / f"r50.{fmt}"
    code, stdout, err = run_cli(capsys, "export", path, "--input-size", "32", "--format", fmt, "--out", out, "--json")
    assert code == 0, err
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want = net(x).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x.numpy()})[0]
    else:
        got = torch.jit.load(str(out))(x).detach().numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_dynamic_depth_onnx_of_an_import(capsys, tmp_path):
    """resnet18 has one knot per stage: the dynamic graph at depth 1 is the original network."""
    net = small("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    out = tmp_path / "r18.onnx"
    code, _, err = run_cli(capsys, "export", path, "--input-size", "32", "--bn", "frozen", "--dynamic-depth",
                           "--out", out)
    assert code == 0, err
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    got = session.run(["logits"], {"input": x.numpy(), "depth": np.array(1, dtype=np.int64)})[0]
    with torch.no_grad():
        want = net(x).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    model, _, _ = load_model(str(path), input_size=(32, 32), bn="frozen")
    deeper = session.run(["logits"], {"input": x.numpy(), "depth": np.array(4, dtype=np.int64)})[0]
    with torch.no_grad():
        assert np.abs(deeper - model.discretize(depth=4)(x).numpy()).max() < 1e-4 * np.abs(deeper).max()


def test_inspect_an_import_says_it_plainly(capsys, r50_file):
    path, _ = r50_file
    code, stdout, err = run_cli(capsys, "inspect", path, "--input-size", "32", "--limit", "4", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert "random normal inputs" in err
    assert not result["ode_like"] and result["verdict"].startswith("not ODE-like: weights are rough in depth")
    assert "usually rough in depth" in result["note"]


def test_inspect_of_one_step_stages_cannot_judge(capsys, tmp_path):
    """resnet18: a transition and one ODE step a stage, so there is no smoothness in depth to measure."""
    path = tmp_path / "r18.pth"
    torch.save(small("resnet18").state_dict(), path)
    code, stdout, err = run_cli(capsys, "inspect", path, "--input-size", "32", "--limit", "4", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert not result["ode_like"] and result["verdict"].startswith("cannot judge: every stage runs a single step")


def _tiny_images(tmp_path):
    """A 3×16×16 task a ResNet learns in a few steps: the class is the brightest quadrant."""
    gen = np.random.default_rng(0)
    x = gen.normal(0, 1, (160, 3, 16, 16)).astype(np.float32)
    y = gen.integers(0, 4, 160)
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, :, 8 * r : 8 * r + 8, 8 * q : 8 * q + 8] += 1.5
    path = tmp_path / "quadrants.npz"
    np.savez(path, x_train=x[:128], y_train=y[:128], x_test=x[128:], y_test=y[128:])
    return path


@pytest.mark.parametrize("grad", ["adjoint", "symplectic", "auto"])
def test_fine_tune_an_import(capsys, tmp_path, grad):
    torch.manual_seed(0)
    net = randomize_bn(ResNet(Bottleneck, [3, 3], width=8, num_classes=4))
    path = tmp_path / "r.pth"
    torch.save(net.state_dict(), path)
    data = _tiny_images(tmp_path)
    out = tmp_path / "tuned.safetensors"
    code, stdout, err = run_cli(capsys, "train", path, "--data", data, "--grad", grad, "--epochs", "3", "--lr", "3e-3",
                                "--batch-size", "32", "--out", out, "--json")
    assert code == 0, err
    model, header = load_checkpoint(out)
    assert model.config.bn == "frozen" and model.config.grad == grad and model.config.in_shape == (3, 16, 16)
    rows = [json.loads(line) for line in out.with_name("tuned.log.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["loss"] < rows[0]["loss"]
    errors = rows[-1]["reconstruction_error"]
    if grad == "adjoint":  # the log and a warning report how far the reconstruction is off on these rough weights
        assert errors is not None and max(errors) > 0.1 and "reconstruction error" in err
    if grad == "auto":  # the monitor sees it and switches the blocks to the exact symplectic adjoint
        assert all(s is not None for s in rows[-1]["monitor_switched"]), rows[-1]
    # BatchNorm stayed a trainable affine and moved
    before = import_resnet(net.state_dict(), input_size=(16, 16), bn="frozen")
    assert not torch.equal(before.blocks[0].curve.knots["s1"], model.blocks[0].curve.knots["s1"])


def test_smoothing_path(capsys, tmp_path):
    """--interp smooth conversion, then fine-tuning: the smoothed model runs at any depth."""
    torch.manual_seed(0)
    net = randomize_bn(ResNet(Bottleneck, [6, 2], width=8, num_classes=4))
    path = tmp_path / "r.pth"
    torch.save(net.state_dict(), path)
    smooth = tmp_path / "smooth.safetensors"
    code, stdout, err = run_cli(capsys, "convert", path, "--input-size", "16", "--interp", "smooth", "--out", smooth,
                                "--json")
    assert code == 0, err
    assert json.loads(stdout)["max_rel_deviation"] > 0  # smoothing changes a rough network
    data = _tiny_images(tmp_path)
    out = tmp_path / "tuned.safetensors"
    code, _, err = run_cli(capsys, "train", smooth, "--data", data, "--epochs", "2", "--batch-size", "32",
                           "--lr", "3e-3", "--out", out)
    assert code == 0, err
    model, _ = load_checkpoint(out)
    assert model.config.interp == "smooth"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.isfinite(model.discretize(depth=20, scheme="heun")(x)).all()


HAVE_TORCHVISION = "torchvision" in sys.modules or __import__("importlib").util.find_spec("torchvision") is not None
needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision is an optional extra; the "
                                       "definitions in tv_models.py stand in for it")


@needs_torchvision
@pytest.mark.parametrize("arch", list(PRESETS))
def test_against_torchvision(arch):
    """Every preset, built by torchvision itself: recognized as that preset, exact in float64 at the native depth."""
    import torchvision

    torch.manual_seed(0)
    net = randomize_bn(getattr(torchvision.models, arch)(weights=None, num_classes=7))
    sd = net.state_dict()
    layout = detect_layout(sd)
    check_preset(layout, arch)  # raises unless the keys and shapes say it is this architecture
    others = [name for name in PRESETS if name != arch]
    for other in others:  # and no other preset accepts it
        with pytest.raises(ResodeError, match=f"not a {other}"):
            check_preset(layout, other)
    model = import_resnet(sd, input_size=(32, 32), dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = net.double()(x)
        assert float((model(x) - want).abs().max() / want.abs().max()) < 1e-12


@needs_torchvision
@pytest.mark.parametrize("bn", ["fold", "frozen"])
def test_back_to_real_torchvision(capsys, tmp_path, bn):
    """export --format torchvision at twice the depth loads strictly into torchvision's own ResNet."""
    from torchvision.models.resnet import Bottleneck as TVBottleneck
    from torchvision.models.resnet import ResNet as TVResNet

    torch.manual_seed(0)
    net = randomize_bn(TVResNet(TVBottleneck, [3, 4, 6, 3], num_classes=5)).eval()
    path = tmp_path / "r50.pth"
    torch.save(net.state_dict(), path)
    out = tmp_path / "r50x2.pth"
    code, _, err = run_cli(capsys, "export", path, "--input-size", "32", "--bn", bn, "--format", "torchvision",
                           "--depth-scale", "2", "--out", out)
    assert code == 0, err
    deeper = TVResNet(TVBottleneck, [5, 7, 11, 5], num_classes=5).eval()
    deeper.load_state_dict(torch.load(out, weights_only=True))
    model, _, _ = load_model(str(path), input_size=(32, 32), bn=bn)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model.discretize(depth=(4, 6, 10, 4), scheme="euler")(x)
        assert float((deeper(x) - want).abs().max() / want.abs().max()) < 1e-5


def test_check_an_import_on_data(capsys, tmp_path):
    """resode check sweeps an imported model's depths in onnxruntime on the data given."""
    torch.manual_seed(0)
    net = randomize_bn(ResNet(Bottleneck, [3, 3], width=8, num_classes=4))
    path = tmp_path / "r.pth"
    torch.save(net.state_dict(), path)
    code, stdout, err = run_cli(capsys, "check", path, "--data", _tiny_images(tmp_path), "--depths", "2,4",
                                "--schemes", "euler,heun", "--repeats", "3", "--json")
    assert code == 0, err
    rows = json.loads(stdout)["rows"]
    assert {(r["depth"], r["scheme"]) for r in rows} == {(2, "euler"), (4, "euler"), (2, "heun"), (4, "heun")}
    assert all(r["max_rel_deviation"] < 1e-4 for r in rows)  # each ONNX graph matches PyTorch at its depth
    x = torch.from_numpy(np.load(tmp_path / "quadrants.npz")["x_test"])
    with torch.no_grad():
        want = float((net(x).argmax(1) == torch.from_numpy(np.load(tmp_path / "quadrants.npz")["y_test"])).double().mean())
    assert json.loads(stdout)["source_accuracy"] == pytest.approx(want)  # native depth 2 = the original network


def test_corrupt_pickle_inside_a_torch_file(capsys, tmp_path):
    """A torch.save archive whose pickle is damaged is called corrupt, not 'objects other than tensors'."""
    import zipfile

    good = tmp_path / "good.pth"
    torch.save(small("resnet18").state_dict(), good)
    with zipfile.ZipFile(good) as z:
        files = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in files if n.endswith("data.pkl"))
    files[name] = files[name][:5] + b"\xff\xfe" + files[name][7:]
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(bad, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
    code, _, err = run_cli(capsys, "convert", bad)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "truncated or corrupt" in err, err


@pytest.mark.parametrize("bn", ["fold", "frozen"])
def test_back_to_torchvision_at_any_depth(capsys, tmp_path, r50_file, bn):
    """export --format torchvision: the model at depths M_s is torchvision's ResNet with 1 + M_s blocks per stage."""
    path, net = r50_file
    x = torch.randn(3, 3, 32, 32)
    model, _, _ = load_model(str(path), input_size=(32, 32), bn=bn)
    for args, blocks in ((["--depth-scale", "1"], [3, 4, 6, 3]), (["--depth-scale", "2"], [5, 7, 11, 5]),
                         (["--depth", "1"], [2, 2, 2, 2])):
        out = tmp_path / f"{bn}-{blocks[0]}.pth"
        code, _, err = run_cli(capsys, "export", path, "--input-size", "32", "--bn", bn, "--format", "torchvision",
                               *args, "--out", out)
        assert code == 0, err
        deeper = ResNet(Bottleneck, blocks, width=8).eval()
        deeper.load_state_dict(torch.load(out, weights_only=True))  # strict: every key torchvision has
        with torch.no_grad():
            want = model.discretize(depth=tuple(b - 1 for b in blocks), scheme="euler")(x)
            got = deeper(x)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5
        if blocks == [3, 4, 6, 3]:  # at the native depth: the original network
            with torch.no_grad():
                assert float((got - net(x)).abs().max() / net(x).abs().max()) < 1e-5


def test_back_to_torchvision_needs_euler_and_a_resnet(capsys, tmp_path, r50_file):
    path, _ = r50_file
    code, _, err = run_cli(capsys, "export", path, "--input-size", "32", "--format", "torchvision", "--scheme", "heun",
                           "--out", tmp_path / "x.pth")
    assert code == 2 and "one Euler step" in err
    code, _, err = run_cli(capsys, "export", "digits-mlp", "--format", "torchvision", "--out", tmp_path / "y.pth")
    assert code == 2 and "imported models" in err
    assert list(tmp_path.iterdir()) == []


def test_the_small_image_stem_imports_exactly_and_exports(tmp_path):
    """CIFAR-style ResNets replace torchvision's stem by a 3×3 / 1 conv without maxpool: recognized by the kernel."""
    import onnxruntime as ort

    from resode_export.export.onnx_graph import static_graph

    torch.manual_seed(0)
    net = ResNet(BasicBlock, [2, 3, 2], width=8, in_channels=1)
    net.conv1 = torch.nn.Conv2d(1, 8, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    randomize_bn(net)
    sd = net.state_dict()
    layout = detect_layout(sd)
    assert layout.stem_kernel == 3 and "3×3 stem without maxpool" in layout.describe()
    x = torch.randn(3, 1, 20, 20)
    with torch.no_grad():
        reference = net(x)
        for bn in ("fold", "frozen"):
            imported = import_resnet(sd, layout, (20, 20), bn=bn)
            assert imported.config.stem_kernel == 3
            assert float(relative_deviation(imported(x), reference).max()) < 1e-5
    session = ort.InferenceSession(static_graph(imported).SerializeToString())
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - reference.numpy()).max() < 1e-4
    # a 7×7 stem is still torchvision's, with its maxpool
    assert detect_layout(small("resnet18").state_dict()).stem_kernel == 7
