"""resode distill: a ResNet trained as a ResNet → a smooth-curve student that keeps the function across depths."""

import json

import pytest
import torch
import torch.nn.functional as F

from resode_export.convert import load_model
from resode_export.data import digits
from resode_export.distill import Distillation, default_knots, fit_curve, make_student
from resode_export.evaluate import predict
from resode_export.io import load_checkpoint
from resode_export.robust import parse_depth_choices
from resode_export.train import TrainOptions, train

from .helpers import interrupt_training, run_cli
from .tv_models import BasicBlock, ResNet


def _small_image_resnet(blocks=(2, 4), width=8, seed=0):
    torch.manual_seed(seed)
    net = ResNet(BasicBlock, list(blocks), width=width, in_channels=1)
    net.conv1 = torch.nn.Conv2d(1, width, 3, 1, 1, bias=False)  # the small-image stem, as CIFAR ResNets have
    net.maxpool = torch.nn.Identity()
    return net


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A BasicBlock ResNet trained *as a ResNet* (BatchNorm with batch statistics, SGD) on digits images."""
    data = digits(images=True)
    net = _small_image_resnet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        net.train()
        order = torch.randperm(len(data.x_train), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save({k: v.detach() for k, v in net.state_dict().items()}, path)
    return path


def _teacher(path):
    return load_model(path, input_size=(8, 8))[0]


def test_student_with_native_knots_is_the_teacher(teacher_file):
    teacher = _teacher(teacher_file)
    assert teacher.config.depths == (1, 3) and default_knots(teacher) == (1, 3)
    student = make_student(teacher)
    x = digits(images=True).x_test[:64]
    assert torch.allclose(predict(student, x), predict(teacher, x), rtol=0, atol=1e-5)
    # fewer knots than steps: the least-squares fit, which is exact for weights linear in depth
    block = teacher.blocks[1]
    with torch.no_grad():
        for knots in block.curve.knots.values():
            knots.copy_(knots[:1] + torch.arange(3.0).reshape(-1, *[1] * (knots.dim() - 1)) * 0.1 * knots[1:2])
    fitted = fit_curve(block, 2)
    ts = [0, 1 / 3, 2 / 3]
    for name, values in block.curve.sample(ts).items():
        assert torch.allclose(fitted.sample(ts)[name], values, atol=1e-5)


def _kl(student, teacher, x, depths, scheme):
    with student.solving_at(depths, scheme):
        s = predict(student, x)
    t = predict(teacher, x)
    return float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean"))


def test_distillation_shrinks_the_gap_to_the_teacher_at_every_depth(teacher_file):
    teacher = _teacher(teacher_file)
    data = digits(images=True)
    choices = parse_depth_choices("0.5x,1x,2x,3x", teacher.config.depths)
    start = make_student(teacher, knots=(1, 2))  # fewer knots than blocks: the weight-space fit alone is off
    before = {(tuple(d), s): _kl(start, teacher, data.x_test, d, s) for d in choices for s in ("euler", "heun")}
    student, record = train(make_student(teacher, knots=(1, 2)), data,
                            TrainOptions(epochs=6, batch_size=64, lr=2e-3, warmup=0.05, device="cpu", depths=choices,
                                         schemes=["euler", "heun"], clip_grad=1.0),
                            objective=Distillation(teacher, temperature=4.0, label_weight=0.0, local_epochs=1),
                            show_progress=False)
    after = {k: _kl(student, teacher, data.x_test, list(k[0]), k[1]) for k in before}
    for key in before:
        assert after[key] < 0.5 * before[key], (key, before[key], after[key])
    assert record["training"]["objective"]["distillation"]["label_weight"] == 0.0
    assert record["training"]["history"][0]["train_accuracy"] is None  # the stage-local epoch has no logits


def test_cli_distills_resumes_exactly_and_reports(capsys, tmp_path, teacher_file, monkeypatch):

    args = ["distill", teacher_file, "--data", "digits-images", "--input-size", "8", "--epochs", "3", "--batch-size",
            "256", "--depths", "0.5x,1x,2x", "--json"]
    full = tmp_path / "full.safetensors"
    code, stdout, err = run_cli(capsys, *args, "--out", full)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["knots"] == [1, 3] and 0 < result["teacher_accuracy"] <= 1
    assert {(tuple(r["depth"]) if isinstance(r["depth"], list) else r["depth"], r["scheme"]) for r in result["rows"]} == {
        (d, s) for d in ((1, 3), (1, 2), (2, 6)) for s in ("euler", "heun")}
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["conversion_accuracy"] <= 1 for r in result["rows"])
    model, header = load_checkpoint(full)
    assert header["distilled_from"]["test_accuracy"] == result["teacher_accuracy"]
    assert model.config.knots == (1, 3) and model.config.interp == "linear"
    assert "distilled from" in (tmp_path / "full.md").read_text()

    out = tmp_path / "run.safetensors"
    restore = interrupt_training(monkeypatch, 2)
    assert run_cli(capsys, *args, "--out", out)[0] == 130
    restore()
    code, _, err = run_cli(capsys, *args, "--temperature", "2", "--out", out, "--resume")
    assert code == 2 and "own settings" in err, err
    code, _, err = run_cli(capsys, *args, "--out", out, "--resume")
    assert code == 0, err
    for (name, a), b in zip(model.state_dict().items(), load_checkpoint(out)[0].state_dict().values()):
        assert torch.equal(a, b), name


def test_cli_distill_bad_input(capsys, tmp_path, teacher_file):
    out = tmp_path / "s.safetensors"
    base = [teacher_file, "--data", "digits-images", "--input-size", "8", "--epochs", "2", "--out", out]
    cases = [
        ([tmp_path / "missing.pth", "--data", "digits-images", "--out", out], "no such file"),
        ([teacher_file, "--input-size", "8", "--out", out], "give --data"),
        ([*base, "--knots", "0"], "--knots"),
        ([*base, "--knots", "1,2,3"], "--knots"),
        ([*base, "--depths", ","], "--depths is empty"),
        ([*base, "--schemes", ""], "--schemes is empty"),
        ([teacher_file, "--data", "digits", "--input-size", "8", "--out", out], "shape"),
        ([*base, "--local-epochs", "2"], "--local-epochs"),
        ([*base, "--temperature", "0"], "--temperature"),
        ([*base, "--grad", "reversible"], "reversible"),
    ]
    for args, words in cases:
        code, _, err = run_cli(capsys, "distill", *args)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not out.exists() and not (tmp_path / "s.md").exists()
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    code, _, err = run_cli(capsys, "distill", tmp_path / "garbage.pth", "--data", "digits-images", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("phase", [0, 1], ids=["stage-local", "end-to-end"])
def test_the_memory_saving_gradient_methods_distil_like_backprop(teacher_file, phase):
    """The exact low-memory method gives backprop's gradients of both distillation losses; the adjoint runs."""
    teacher = _teacher(teacher_file).double()
    x, y = digits(images=True).x_train[:16].double(), digits(images=True).y_train[:16]
    objective = Distillation(teacher, temperature=2.0, label_weight=0.5, local_epochs=1)
    grads = {}
    for grad in ("backprop", "symplectic", "adjoint"):
        student = make_student(teacher, knots=(1, 2)).discretize(grad=grad)
        with student.solving_at([2, 5], "heun"):
            loss, _ = objective(student, x, y, epoch=phase)
            loss.backward()
        grads[grad] = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        assert torch.isfinite(grads[grad]).all()
    assert torch.allclose(grads["symplectic"], grads["backprop"], rtol=1e-9, atol=1e-12)
    assert not torch.equal(grads["adjoint"], grads["backprop"])  # approximate, on these rough weights


def test_cli_distills_from_unlabelled_inputs(capsys, tmp_path, teacher_file):
    import numpy as np

    data = digits(images=True)
    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, x_train=data.x_train.numpy(), x_test=data.x_test.numpy())  # no y arrays at all
    out = tmp_path / "u.safetensors"
    code, stdout, err = run_cli(capsys, "distill", teacher_file, "--data", unlabelled, "--input-size", "8", "--epochs",
                                "2", "--depths", "1x", "--schemes", "euler", "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["teacher_accuracy"] == 1.0  # against its own predictions: accuracy is agreement
    _, header = load_checkpoint(out)
    assert "teacher's predictions stand in" in header["data"]["split"]
    assert header["training"]["objective"]["distillation"]["label_weight"] == 0.0
    code, _, err = run_cli(capsys, "train", "--data", unlabelled, "--arch", "conv", "--epochs", "1",
                           "--out", tmp_path / "t.safetensors")
    assert code == 2 and "lacks the array(s) y_train, y_test" in err, err


def test_distill_never_writes_over_its_inputs_and_checks_before_deleting(capsys, tmp_path, teacher_file):
    import shutil

    teacher = tmp_path / "t.pth"
    shutil.copy(teacher_file, teacher)
    before = teacher.read_bytes()
    base = ["distill", teacher, "--data", "digits-images", "--input-size", "8", "--epochs", "2"]
    for extra in (["--out", tmp_path / "t.safetensors", "--log", teacher],
                  ["--out", tmp_path / "s.safetensors", "--log", tmp_path / "s.safetensors"],
                  ["--out", tmp_path / "u.safetensors", "--log", teacher, "--augment"]):
        code, _, err = run_cli(capsys, *base, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert teacher.read_bytes() == before
    converted = tmp_path / "c.safetensors"
    assert run_cli(capsys, "convert", teacher, "--input-size", "8", "--out", converted)[0] == 0
    code, _, err = run_cli(capsys, "distill", converted, "--data", "digits-images", "--out", converted)
    assert code == 2 and "would destroy it" in err, err
    # an existing log of a new run is replaced only once every input checked out
    log = tmp_path / "keep.log.jsonl"
    log.write_text("mine\n")
    code, _, err = run_cli(capsys, *base, "--knots", "0", "--out", tmp_path / "k.safetensors", "--log", log)
    assert code == 2 and log.read_text() == "mine\n"


def test_distill_resume_refuses_another_teacher_and_student(capsys, tmp_path, teacher_file, monkeypatch):

    other = tmp_path / "other.pth"
    net = _small_image_resnet(seed=1)
    torch.save({k: v.detach() for k, v in net.state_dict().items()}, other)
    args = ["--data", "digits-images", "--input-size", "8", "--epochs", "2", "--batch-size", "512", "--depths", "1x"]
    out = tmp_path / "r.safetensors"
    restore = interrupt_training(monkeypatch)
    assert run_cli(capsys, "distill", teacher_file, *args, "--out", out)[0] == 130
    restore()
    for teacher, extra in ((other, []), (teacher_file, ["--knots", "1,2"]), (teacher_file, ["--grad", "symplectic"])):
        code, _, err = run_cli(capsys, "distill", teacher, *args, *extra, "--out", out, "--resume")
        assert code == 2 and "own settings" in err, (teacher, extra, err)
    assert run_cli(capsys, "distill", teacher_file, *args, "--out", out, "--resume")[0] == 0


def test_student_scheme_knots_and_teacher_gradient(capsys, tmp_path, teacher_file):
    from resode_export.io import save_checkpoint
    from resode_export.network import ODENet, ODENetConfig

    teacher = _teacher(teacher_file)
    x = digits(images=True).x_test[:32]
    wide = make_student(teacher, knots=(2, 6))  # more knots than steps: the teacher's curve at the new knots
    assert torch.allclose(predict(wide, x), predict(teacher, x), atol=1e-5)
    fast = tmp_path / "fast.safetensors"  # a teacher trained with an Euler-only gradient method
    save_checkpoint(fast, ODENet(ODENetConfig(depths=(4,), widths=(8,), hidden=8, grad="adjoint_fast")),
                    {"data": {"name": "digits"}})
    out = tmp_path / "s.safetensors"
    code, stdout, err = run_cli(capsys, "distill", fast, "--epochs", "2", "--schemes", "heun,euler", "--out", out,
                                "--json")
    assert code == 0, err
    model, _ = load_checkpoint(out)
    assert model.config.scheme == "heun" and model.config.grad == "backprop"
    code, _, err = run_cli(capsys, "distill", fast, "--knots", "100000000", "--out", tmp_path / "big.safetensors")
    assert code == 2 and "training it needs about" in err, err
