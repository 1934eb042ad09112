"""Depth-robust training (--depths/--schemes), augmentation, warm-up and the defaults that train."""

import json

import pytest
import torch

from resode_export.data import digits
from resode_export.errors import ResodeError
from resode_export.evaluate import accuracy, predict
from resode_export.io import load_checkpoint
from resode_export.network import ODENet, ODENetConfig
from resode_export.robust import draw, extremes, parse_depth_choices, parse_schemes
from resode_export.train import TrainOptions, augment, train

from .helpers import interrupt_training, run_cli


@pytest.fixture(scope="module")
def data():
    return digits()


def test_depth_choices_take_steps_and_factors():
    assert parse_depth_choices("4,8,16", (32, 32)) == [[4, 4], [8, 8], [16, 16]]
    assert parse_depth_choices("0.5x,1x,2x", (1, 7, 7, 1)) == [[1, 4, 4, 1], [1, 7, 7, 1], [2, 14, 14, 2]]
    assert parse_depth_choices("8, 8x,8", (1,)) == [[8]]  # once each
    for bad in ("", ",", "0", "-2", "abc", "0x", "1e9", "nanx"):
        with pytest.raises(ResodeError, match="--depths"):
            parse_depth_choices(bad, (4,))
    assert parse_schemes("heun,euler,heun") == ["heun", "euler"]
    for bad in ("", "euler,nope"):
        with pytest.raises(ResodeError):
            parse_schemes(bad)


def test_draws_depend_on_seed_and_step_only_and_cover_the_lists():
    depths, schemes = [[2], [4], [8]], ["euler", "heun"]
    seen = {(tuple(d), s) for d, s in (draw(depths, schemes, 0, step) for step in range(200))}
    assert seen == {(tuple(d), s) for d in depths for s in schemes}
    assert [draw(depths, schemes, 3, k) for k in range(20)] == [draw(depths, schemes, 3, k) for k in range(20)]
    assert [draw(depths, schemes, 3, k) for k in range(20)] != [draw(depths, schemes, 4, k) for k in range(20)]
    assert draw(None, None, 0, 5) == (None, None)
    assert extremes([[8], [2], [4]], ["euler"]) == [([2], "euler"), ([8], "euler")]


def test_solving_at_restores_the_model_and_refuses_what_cannot_run():
    model = ODENet(ODENetConfig(depths=(8,), grad="adjoint_fast"))
    with model.solving_at([2], "euler"):
        assert model.blocks[0].depth == 2
    assert model.blocks[0].depth == 8 and model.blocks[0].scheme == "euler"
    with pytest.raises(ResodeError, match="adjoint_fast"), model.solving_at([4], "heun"):
        pass
    assert model.blocks[0].depth == 8 and model.blocks[0].scheme == "euler"


def _spread(model, data, depths):
    accs = []
    for d in depths:
        with model.solving_at([d], "euler"):
            accs.append(accuracy(predict(model, data.x_test), data.y_test))
    return max(accs) - min(accs), accs


def test_multi_depth_training_flattens_accuracy_against_depth(data):
    """The same model trained at depth 16 only and at depths drawn from 2, 16: measured at 2 and 16."""
    config = ODENetConfig(arch="mlp", in_shape=(64,), widths=(16,), depths=(16,), hidden=32)
    opts = dict(epochs=6, batch_size=32, lr=1e-2, warmup=0.05, device="cpu")
    single, _ = train(ODENet(config, init="iid"), data, TrainOptions(**opts), show_progress=False)
    multi, record = train(ODENet(config, init="iid"), data, TrainOptions(**opts, depths=[[2], [16]]),
                          show_progress=False)
    gap_single, accs_single = _spread(single, data, [2, 16])
    gap_multi, accs_multi = _spread(multi, data, [2, 16])
    assert gap_multi < 0.01 < gap_single, (accs_single, accs_multi)
    assert min(accs_multi) > 0.9
    at = record["training"]["history"][-1]["test_accuracy_at"]
    assert [r["depths"] for r in at] == [[2], [16]] and record["training"]["depths"] == [[2], [16]]


def test_augment_shifts_and_flips_deterministically():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    a, b = augment(x, 0, 7), augment(x, 0, 7)
    assert torch.equal(a, b) and a.shape == x.shape
    outs = [augment(x, 0, step) for step in range(8)]
    assert any(not torch.equal(o, x) for o in outs)
    flipped = [o for o in outs if torch.equal(o[0, 0, 2:4, 2:4], x[0, 0, 2:4, 2:4].flip(1))]
    assert len({o[0].sum().item() for o in outs}) > 1 or flipped  # content moves
    with pytest.raises(ResodeError, match="--augment"):
        train(ODENet(ODENetConfig(depths=(2,))), digits(), TrainOptions(epochs=1, augment=True), show_progress=False)


def test_warmup_rises_linearly_then_follows_the_schedule():
    opts = TrainOptions(lr=1.0, warmup=0.1, schedule="constant")
    assert [opts.lr_at(s, 100) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert opts.lr_at(50, 100) == 1.0
    assert TrainOptions(lr=1.0).lr_at(0, 100) == 1.0  # no warm-up unless asked
    for bad in (dict(warmup=1.0), dict(warmup=-0.1), dict(clip_grad=0.0), dict(depths=[]), dict(schemes=["nope"])):
        with pytest.raises(ResodeError):
            TrainOptions(**bad)


@pytest.mark.parametrize("grad", ["backprop", "adjoint"])
def test_defaults_train_digits_at_depth_64_with_heun(capsys, tmp_path, grad):
    """The issue's command with every other option at its default, in 5 epochs."""
    out = tmp_path / "m.safetensors"
    code, stdout, err = run_cli(capsys, "train", "--arch", "mlp", "--data", "digits", "--depth", "64", "--scheme", "heun",
                                "--epochs", "5", "--grad", grad, "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["test_accuracy"] >= 0.95


def test_cli_depth_robust_run_records_resumes_and_joins_check(capsys, tmp_path, monkeypatch):

    args = ["train", "--data", "digits", "--width", "8", "--hidden", "8", "--depths", "3,5", "--schemes", "euler,heun",
            "--epochs", "2", "--batch-size", "256", "--json"]
    full = tmp_path / "r.safetensors"
    code, stdout, err = run_cli(capsys, *args, "--out", full)
    assert code == 0, err
    model, header = load_checkpoint(full)
    assert model.config.depths == (5,) and model.config.knots == (3,) and model.config.scheme == "euler"
    assert header["training"]["depths"] == [[3], [5]] and header["training"]["schemes"] == ["euler", "heun"]

    out = tmp_path / "run.safetensors"
    restore = interrupt_training(monkeypatch, 1)
    assert run_cli(capsys, *args, "--out", out)[0] == 130
    restore()
    code, _, err = run_cli(capsys, *args, "--out", out, "--resume")
    assert code == 0, err
    for (name, a), b in zip(model.state_dict().items(), load_checkpoint(out)[0].state_dict().values()):
        assert torch.equal(a, b), name
    code, _, err = run_cli(capsys, *[a if a != "3,5" else "3,6" for a in args], "--out", out, "--resume")
    assert code == 2 and "resume with the run's own options" in err, err
    # check's default sweep (2, 4, 8, …) gains the trained depths
    code, stdout, err = run_cli(capsys, "check", full, "--schemes", "euler", "--repeats", "3", "--limit", "50", "--json")
    assert code == 0, err
    assert {3, 5} <= {r["depth"] for r in json.loads(stdout)["rows"]}


def test_cli_depth_robust_bad_input(capsys, tmp_path):
    out = tmp_path / "x.safetensors"
    for extra, words in ((["--depths", ","], "--depths is empty"), (["--depths", "0"], "--depths"),
                         (["--schemes", "euler,bogus"], "scheme"), (["--warmup", "2"], "--warmup"),
                         (["--depths", "4", "--knots", "0"], "--knots"), (["--augment"], "--augment"),
                         (["--clip-grad", "-1"], "--clip-grad")):
        code, _, err = run_cli(capsys, "train", "--epochs", "1", "--out", out, *extra)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists()


def test_cli_resume_reads_depth_factors_as_the_run_did(capsys, tmp_path, monkeypatch):

    args = ["train", "--data", "digits", "--width", "8", "--hidden", "8", "--depths", "0.25x,0.5x", "--epochs", "2",
            "--batch-size", "512"]
    out = tmp_path / "f.safetensors"
    restore = interrupt_training(monkeypatch)
    assert run_cli(capsys, *args, "--out", out)[0] == 130
    restore()
    assert load_checkpoint(out)[1]["training"]["depths"] == [[8], [16]]  # factors of the default depth 32
    code, _, err = run_cli(capsys, *args, "--out", out, "--resume")
    assert code == 0, err


def test_train_refuses_a_log_that_is_its_model(capsys, tmp_path):
    model = tmp_path / "m.safetensors"
    assert run_cli(capsys, "train", "--width", "8", "--depth", "2", "--epochs", "1", "--out", model)[0] == 0
    before = model.read_bytes()
    code, _, err = run_cli(capsys, "train", model, "--augment", "--log", model, "--out", tmp_path / "n.safetensors")
    assert code == 2 and "would destroy it" in err and model.read_bytes() == before, err
