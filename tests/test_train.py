import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from resode_export import train as train_module
from resode_export.data import digits, load_data
from resode_export.errors import ResodeError
from resode_export.io import load_checkpoint
from resode_export.network import ODENet, ODENetConfig, untie
from resode_export.train import TrainingDiverged, TrainOptions, state_path, train

from .helpers import run_cli


def _model(seed=0, **kw):
    config = ODENetConfig(**{"arch": "mlp", "in_shape": (64,), "widths": (16,), "depths": (6,), "hidden": 16,
                             "scheme": "heun", **kw})
    return ODENet(config, seed=seed)


@pytest.fixture(scope="module")
def data():
    return digits()


def _opts(**kw):
    return TrainOptions(**{"epochs": 2, "batch_size": 64, "lr": 3e-3, "device": "cpu", **kw})


def test_training_learns_and_records(data):
    model, record = train(_model(), data, _opts(epochs=10), show_progress=False)
    assert record["metrics"]["test_accuracy"] > 0.85
    history = record["training"]["history"]
    assert history[-1]["loss"] < history[0]["loss"] and len(history) == 10
    assert record["training"]["method"] == "backprop" and record["data"]["name"] == "digits"


@pytest.mark.parametrize("method", ["symplectic", "checkpoint"])
def test_exact_methods_train_like_backprop(data, method):
    """Exact gradients give the same training run as backprop, up to float32 rounding."""
    _, ref = train(_model(), data, _opts(), show_progress=False)
    _, rec = train(_model(grad=method), data, _opts(), show_progress=False)
    assert rec["training"]["method"] == method
    losses = [row["loss"] for row in rec["training"]["history"]]
    assert losses == pytest.approx([row["loss"] for row in ref["training"]["history"]], rel=1e-4)


def test_adjoint_trains_and_logs_its_reconstruction_error(data, tmp_path):
    log = tmp_path / "log.jsonl"
    _, rec = train(_model(grad="adjoint", depths=(16,)), data, _opts(epochs=10), log=log, show_progress=False)
    assert rec["metrics"]["test_accuracy"] > 0.85
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    for key in ("loss", "train_accuracy", "test_accuracy", "seconds", "peak_memory_bytes"):
        assert all(r[key] > 0 for r in rows), key
    errors = rows[-1]["reconstruction_error"]
    assert len(errors) == 1 and 0 < errors[0] < 0.1


@pytest.mark.parametrize("optimizer, schedule", [("adam", "cosine"), ("sgd", "step")])
def test_resume_ends_with_the_same_weights(data, tmp_path, monkeypatch, optimizer, schedule):
    opts = _opts(epochs=4, optimizer=optimizer, schedule=schedule, lr=3e-3 if optimizer == "adam" else 0.05)
    full, _ = train(_model(), data, opts, out=tmp_path / "full.safetensors", show_progress=False)

    save_state = train_module._save_state

    def interrupted(path, optimizer, meta):
        save_state(path, optimizer, meta)
        if meta["epoch"] == 2:
            raise KeyboardInterrupt  # killed right after the epoch-2 checkpoint

    out = tmp_path / "run.safetensors"
    monkeypatch.setattr(train_module, "_save_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_model(), data, opts, out=out, show_progress=False)
    monkeypatch.setattr(train_module, "_save_state", save_state)
    assert len(load_checkpoint(out)[1]["training"]["history"]) == 2
    resumed, record = train(_model(seed=1), data, opts, out=out, resume=True, show_progress=False)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["epoch"] for r in record["training"]["history"]] == [1, 2, 3, 4]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "m.safetensors"
    train(_model(), data, _opts(epochs=1), out=out, show_progress=False)
    before = out.read_bytes()
    model, _ = load_checkpoint(out)
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))  # whatever made it diverge: the first step names itself
    with pytest.raises(TrainingDiverged, match="at epoch 1, step 1; nothing was written"):
        train(model, data, _opts(epochs=1), out=out, show_progress=False)
    assert out.read_bytes() == before


def test_untie_keeps_the_outputs(data):
    tied = _model(knots=(1,))
    with torch.no_grad():
        tied.blocks[0].curve.knots["V"].normal_(generator=torch.Generator().manual_seed(0))
    deep = untie(tied)
    assert deep.config.knots == (6,) and deep.blocks[0].curve.num_knots == 6
    with torch.no_grad():
        assert torch.allclose(deep(data.x_test), tied(data.x_test), atol=1e-6)


def test_npz_data(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=rng.normal(size=(40, 5)), y_train=rng.integers(0, 3, 40), x_test=rng.normal(size=(10, 5)),
             y_test=rng.integers(0, 3, 10))
    ds = load_data(str(path))
    assert ds.in_shape == (5,) and ds.num_classes == 3
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.full((4, 5), np.nan), y_train=np.zeros(4, int), x_test=np.zeros((2, 5)),
             y_test=np.zeros(2, int))
    with pytest.raises(ResodeError, match="finite"):
        load_data(str(bad))
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1, int), x_test=np.zeros((1, 5)),
             y_test=np.zeros(1, int))
    with pytest.raises(ResodeError, match="cannot read"):
        load_data(str(pickled))


def test_bad_training_arguments(data):
    with pytest.raises(ResodeError, match=r"--lr must be a number in \(0, 1e\+06\], got 0"):
        TrainOptions(lr=0.0)
    with pytest.raises(ResodeError, match="valid optimizers are: adam, sgd"):
        TrainOptions(optimizer="lbfgs")
    with pytest.raises(ResodeError, match="shape"):
        train(_model(in_shape=(10,)), data, _opts(), show_progress=False)
    with pytest.raises(ResodeError, match="--resume needs"):
        train(_model(), data, _opts(), resume=True, show_progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: --device cuda is valid here")
def test_cuda_without_a_gpu_is_bad_input(data):
    with pytest.raises(ResodeError, match="no CUDA"):
        train(_model(), data, _opts(device="cuda"), show_progress=False)


def test_cli_fine_tunes_a_tied_model_with_the_adjoint(capsys, tmp_path):
    tied = tmp_path / "tied.safetensors"
    code, out, err = run_cli(capsys, "train", "--init", "tied", "--depth", "8", "--width", "16", "--hidden", "16",
                             "--epochs", "3", "--lr", "3e-3", "--out", tied, "--json")
    assert code == 0, err
    assert load_checkpoint(tied)[0].config.knots == (1,)
    tuned = tmp_path / "tuned.safetensors"
    code, out, err = run_cli(capsys, "train", tied, "--untie", "--depth", "32", "--adjoint", "--epochs", "2",
                             "--lr", "1e-3", "--out", tuned, "--json")
    assert code == 0, err
    result = json.loads(out)
    for key in ("test_accuracy", "train_accuracy", "epochs", "grad", "scheme", "depth", "checkpoint", "seconds"):
        assert key in result, key
    assert result["grad"] == "adjoint" and result["depth"] == 32
    model, header = load_checkpoint(tuned)
    assert model.config.knots == (32,) and header["training"]["init"].startswith("fine-tuned from")
    assert state_path(tuned).is_file() and (tmp_path / "tuned.log.jsonl").is_file()


def test_cli_resume_and_bad_input(capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(capsys, "train", "--resume", "--out", out)
    assert code == 2 and "no such file" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "train", "--grad", "adjoint", "--scheme", "midpoint", "--out", out)
    assert code == 2 and "euler, heun, rk4 or rk38" in err
    code, _, err = run_cli(capsys, "train", "--grad", "fast", "--out", out)
    assert code == 2 and "backprop" in err
    code, _, err = run_cli(capsys, "train", "--depth", "0", "--out", out)
    assert code == 2 and "depth" in err
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path / "missing.npz"), "--out", out)
    assert code == 2 and "no such file" in err
    assert not out.exists()


def test_torchrun_two_processes_match_one(tmp_path):
    """DDP on CPU (gloo): 2 processes with the same global batch reach the same loss as 1."""
    def run(n):
        out = tmp_path / f"ddp{n}.safetensors"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
               str(29500 + n), "-m", "resode_export", "train", "--depth", "4", "--width", "16", "--hidden", "16",
               "--epochs", "1", "--batch-size", "64", "--lr", "3e-3", "--device", "cpu", "--out", str(out), "--json"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return load_checkpoint(out)[1]["training"]["history"][0]["loss"]

    assert run(2) == pytest.approx(run(1), rel=1e-5)


def test_more_bad_npz_files(tmp_path):
    single = tmp_path / "single.npz"
    np.save(tmp_path / "a.npy", np.zeros((3, 4)))
    (tmp_path / "a.npy").rename(single)
    with pytest.raises(ResodeError, match="single .npy array"):
        load_data(str(single))
    empty = tmp_path / "empty.npz"
    np.savez(empty, x_train=np.zeros((0, 4)), y_train=np.zeros(0, int), x_test=np.zeros((0, 4)),
             y_test=np.zeros(0, int))
    with pytest.raises(ResodeError, match="non-empty"):
        load_data(str(empty))


def test_labels_beyond_the_models_classes(data):
    wide = _model()
    small = ODENet(ODENetConfig(arch="mlp", in_shape=(64,), num_classes=5, widths=(8,), depths=(2,), hidden=8))
    with pytest.raises(ResodeError, match="labels up to 9, the model has 5 classes"):
        train(small, data, _opts(), show_progress=False)
    assert wide.config.num_classes == 10


def test_cli_resumes_an_interrupted_run(capsys, tmp_path, monkeypatch):
    args = ["train", "--depth", "4", "--width", "16", "--hidden", "16", "--epochs", "3", "--lr", "3e-3", "--json"]
    full = tmp_path / "full.safetensors"
    code, _, err = run_cli(capsys, *args, "--out", full)
    assert code == 0, err

    save_state = train_module._save_state

    def interrupted(path, optimizer, meta):
        save_state(path, optimizer, meta)
        if meta["epoch"] == 1:
            raise KeyboardInterrupt

    out = tmp_path / "run.safetensors"
    monkeypatch.setattr(train_module, "_save_state", interrupted)
    code, _, err = run_cli(capsys, *args, "--out", out)
    assert code == 130, err
    monkeypatch.setattr(train_module, "_save_state", save_state)
    code, _, err = run_cli(capsys, *args[:-3], "--epochs", "5", "--resume", "--out", out)  # another schedule
    assert code == 2 and "--epochs 3 (given 5)" in err, err
    code, out_json, err = run_cli(capsys, *args, "--resume", "--out", out)
    assert code == 0, err
    for (name, a), b in zip(load_checkpoint(full)[0].state_dict().items(), load_checkpoint(out)[0].state_dict().values()):
        assert torch.equal(a, b), name
    rows = [json.loads(line) for line in (tmp_path / "run.log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    code, _, err = run_cli(capsys, *args, "--resume", "--out", out)
    assert code == 2 and "already finished" in err


def test_cli_refuses_an_out_the_card_would_overwrite(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "notes.md")
    assert code == 2 and "train writes a .safetensors checkpoint" in err  # the card would overwrite a .md


def test_mlp_takes_images_flattened(capsys, tmp_path):
    """`--arch mlp` on image data (Fashion-MNIST's (1, 28, 28)): the stem flattens each sample, the
    checkpoint keeps Linear's keys, and the exports flatten as PyTorch does."""
    rng = np.random.default_rng(0)
    path = tmp_path / "images.npz"
    np.savez(path, x_train=rng.normal(size=(48, 1, 6, 6)), y_train=rng.integers(0, 3, 48),
             x_test=rng.normal(size=(12, 1, 6, 6)), y_test=rng.integers(0, 3, 12))
    out = tmp_path / "mlp.safetensors"
    code, _, err = run_cli(capsys, "train", "--data", str(path), "--arch", "mlp", "--depth", "4", "--width", "8",
                           "--hidden", "8", "--epochs", "1", "--out", out, "--json")
    assert code == 0, err
    model, _ = load_checkpoint(out)
    assert model.config.in_shape == (1, 6, 6) and model.stem.weight.shape == (8, 36)
    x = torch.from_numpy(rng.normal(size=(5, 1, 6, 6))).float()
    with torch.no_grad():
        flat = torch.nn.functional.linear(x.reshape(5, 36), model.stem.weight, model.stem.bias)
        assert torch.equal(model.stem(x), flat)
        assert torch.allclose(model(x[0]), model(x)[0], atol=1e-6)  # one unbatched sample, as nn.Linear takes
        vector = ODENet(ODENetConfig(in_shape=(7,), widths=(4,), hidden=4, depths=(2,)))
        assert vector(torch.randn(3, 5, 7)).shape == (3, 5, 10)  # leading axes pass through, as with nn.Linear
    for extra in ([], ["--dynamic-depth"]):
        code, _, err = run_cli(capsys, "export", out, "--format", "onnx", *extra, "--out",
                               tmp_path / f"m{len(extra)}.onnx", "--json")
        assert code == 0, err  # each export verified itself against PyTorch on the image inputs
    code, _, err = run_cli(capsys, "export", out, "--format", "torchscript", "--out", tmp_path / "m.pt", "--json")
    assert code == 0, err


def _interrupted_after_epoch_1(monkeypatch):
    save_state = train_module._save_state

    def interrupted(path, optimizer, meta):
        save_state(path, optimizer, meta)
        if meta["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_state", interrupted)
    return lambda: monkeypatch.setattr(train_module, "_save_state", save_state)


@pytest.mark.parametrize("record", ["relative", "absolute"])
def test_cli_resumes_a_run_folder_moved_elsewhere(capsys, tmp_path, monkeypatch, record):
    """The training state records its default log relative to its folder: a run copied to another machine
    or folder resumes there, with its log, and still refuses a second log. A state from before (an
    absolute path, now gone) finds the moved log by its content."""
    args = ["train", "--depth", "2", "--width", "4", "--hidden", "4", "--epochs", "2"]
    if record == "absolute":
        monkeypatch.setattr(train_module, "_log_record", lambda log, state: str(log.resolve()))
    restore = _interrupted_after_epoch_1(monkeypatch)
    (tmp_path / "a").mkdir()
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "a" / "run.safetensors")
    assert code == 130, err
    restore()
    (tmp_path / "a").rename(tmp_path / "b")
    out = tmp_path / "b" / "run.safetensors"
    if record == "relative":
        code, _, err = run_cli(capsys, *args, "--resume", "--out", out, "--log", tmp_path / "other.jsonl")
        assert code == 2 and "would split its history" in err and str(tmp_path / "b" / "run.log.jsonl") in err, err
    code, _, err = run_cli(capsys, *args, "--resume", "--out", out)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "b" / "run.log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_resume_never_writes_into_another_log_and_never_splits_history(capsys, tmp_path, monkeypatch):
    """Without its own log (lost, or recorded as an absolute path by an older version and since moved), a
    resumed run takes a new log, written from its training state's history first, or its own log found
    by content; never a file holding other lines, which would be mixed with or cut to this run's."""
    args = ["train", "--depth", "2", "--width", "4", "--hidden", "4", "--epochs", "3"]
    monkeypatch.setattr(train_module, "_log_record", lambda log, state: str(log.resolve()))  # the older record
    restore = _interrupted_after_epoch_1(monkeypatch)
    (tmp_path / "a").mkdir()
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "a" / "run.safetensors")
    assert code == 130, err
    restore()
    (tmp_path / "a").rename(tmp_path / "b")  # the recorded absolute log is gone; its copy moved along
    out, own = tmp_path / "b" / "run.safetensors", tmp_path / "b" / "run.log.jsonl"
    other = tmp_path / "other.jsonl"
    other.write_text('{"epoch": 1, "note": "another run"}\nfree text\n')
    code, _, err = run_cli(capsys, *args, "--resume", "--out", out, "--log", other)
    assert code == 2 and "is not this run's log" in err and len(err.strip().splitlines()) == 1, err
    assert other.read_text() == '{"epoch": 1, "note": "another run"}\nfree text\n'
    other.write_text(own.read_text() + '{"epoch": 2}\n{"epoch": 3}\n')  # another continuation of this run
    code, _, err = run_cli(capsys, *args, "--resume", "--out", out, "--log", other)
    assert code == 2 and "another continuation" in err, err
    first = own.read_text()
    own.unlink()
    code, _, err = run_cli(capsys, *args, "--resume", "--out", out, "--log", tmp_path / "new.jsonl")
    assert code == 0, err
    lines = (tmp_path / "new.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3] and lines[0] + "\n" == first
