"""--normalize: recorded in the checkpoint, applied before the stem in PyTorch and in every exported graph."""

import json

import numpy as np
import onnx
import pytest
import torch

from resode_export.errors import ResodeError
from resode_export.export import export_model
from resode_export.io import load_checkpoint, save_checkpoint
from resode_export.network import ODENet, ODENetConfig

from .helpers import run_cli


def test_normalization_is_applied_before_the_stem_and_round_trips(tmp_path):
    plain = ODENet(ODENetConfig(arch="conv", in_shape=(3, 8, 8), widths=(8,), depths=(3,), groups=4), seed=1)
    config = ODENetConfig(**{**plain.config.to_dict(), "normalize": (0.5, 0.4, 0.3, 0.2, 0.25, 0.5)})
    normed = ODENet(config, seed=1)
    normed.load_state_dict(plain.state_dict())
    x = torch.rand(4, 3, 8, 8)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).reshape(3, 1, 1), torch.tensor([0.2, 0.25, 0.5]).reshape(3, 1, 1)
    assert torch.allclose(normed(x), plain((x - mean) / std), atol=1e-6)
    path = save_checkpoint(tmp_path / "n.safetensors", normed)
    loaded, _ = load_checkpoint(path)
    assert loaded.config.normalize == config.normalize and torch.equal(loaded(x), normed(x))
    for fmt, kw in (("onnx", {}), ("onnx", {"dynamic_depth": True}), ("pt2", {}), ("torchscript", {})):
        suffix = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}[fmt]
        result = export_model(loaded, fmt, tmp_path / f"n-{len(kw)}{suffix}", **kw)
        assert result["max_rel_deviation"] < 1e-5, (fmt, kw, result)
    graph = onnx.load(str(tmp_path / "n-0.onnx"))
    assert [n.op_type for n in graph.graph.node[:2]] == ["Sub", "Div"]


def test_one_pair_applies_to_every_channel_and_bad_values_are_refused():
    cfg = ODENetConfig(arch="conv", in_shape=(3, 8, 8), widths=(8,), depths=(2,), groups=4, normalize=(0.5, 2.0))
    assert cfg.normalize == (0.5, 0.5, 0.5, 2.0, 2.0, 2.0)
    for bad in ((0.1, 0.2, 0.3), (0.0, 0.0), (0.0, float("nan")), (1, 2, 3, 4)):
        with pytest.raises(ResodeError, match="--normalize"):
            ODENetConfig(arch="conv", in_shape=(3, 8, 8), widths=(8,), depths=(2,), groups=4, normalize=bad)


def test_cli_train_records_normalization_and_refuses_a_wrong_channel_count(capsys, tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(60, 1, 8, 8)).astype(np.uint8)
    y = np.arange(60) % 3
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(capsys, "train", "--arch", "conv", "--width", "8", "--depth", "2", "--data", data,
                           "--normalize", "0.4,0.3", "--epochs", "1", "--out", out)
    assert code == 0, err
    model, _ = load_checkpoint(out)
    assert model.config.normalize == (0.4, 0.3)
    code, stdout, err = run_cli(capsys, "convert", out, "--depth", "4", "--json")
    assert code == 0 and json.loads(stdout)["source_accuracy"] is not None, err
    out2 = tmp_path / "m2.safetensors"
    for value, words in (("0.1,0.2,0.3,0.4", "1 channel"), ("a,b", "numbers"), ("0.5,0", "positive")):
        code, _, err = run_cli(capsys, "train", "--arch", "conv", "--width", "8", "--depth", "2", "--data", data,
                               "--normalize", value, "--epochs", "1", "--out", out2)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert not out2.exists()
    code, _, err = run_cli(capsys, "convert", out, "--normalize", "0.1,0.2", "--out", out2)
    assert code == 2 and "keeps the normalization" in err and not out2.exists()


def test_cli_image_folders_train_and_bad_folders_are_one_line(capsys, tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "eel"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, size=(10, 12), dtype=np.uint8)).save(root / c / f"{i}.png")
    out = tmp_path / "m.safetensors"
    code, stdout, err = run_cli(capsys, "train", "--arch", "conv", "--width", "8", "--depth", "2", "--data", root,
                                "--input-size", "8", "--epochs", "1", "--out", out, "--json")
    assert code == 0, err
    model, header = load_checkpoint(out)
    assert model.config.in_shape == (1, 8, 8) and header["data"]["classes"] == ["cat", "dog", "eel"]
    Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).save(root / "cat" / "big.png")  # now the sizes differ
    code, stdout, err = run_cli(capsys, "check", out, "--data", root, "--depths", "2", "--schemes", "euler",
                                "--repeats", "3", "--json")
    assert code == 0 and json.loads(stdout)["rows"][0]["depth"] == 2, err  # read at the model's 8×8
    empty, single = tmp_path / "empty", tmp_path / "single"
    empty.mkdir()
    (single / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(single / "only" / "a.png")
    for folder, words in ((empty, "no images"), (single, "one class")):
        code, _, err = run_cli(capsys, "train", "--arch", "conv", "--data", folder, "--epochs", "1",
                               "--out", tmp_path / "x.safetensors")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.safetensors").exists()


def test_cli_warns_when_float_data_look_unnormalized(capsys, tmp_path):
    x = np.random.default_rng(0).uniform(0, 255, size=(60, 16)).astype(np.float32)
    y = np.arange(60) % 2
    data = tmp_path / "raw.npz"
    np.savez(data, x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    code, _, err = run_cli(capsys, "train", "--data", data, "--width", "8", "--depth", "2", "--epochs", "1",
                           "--out", tmp_path / "m.safetensors")
    assert code == 0 and "warning:" in err and "--normalize" in err, err
    code, _, err = run_cli(capsys, "train", "--data", data, "--width", "8", "--depth", "2", "--epochs", "1",
                           "--normalize", "127,73", "--out", tmp_path / "n.safetensors")
    assert code == 0 and "warning:" not in err, err


def test_normalization_of_a_converted_import_is_kept_and_torchvision_export_refuses_it(capsys, tmp_path):
    from .tv_models import BasicBlock, ResNet, randomize_bn

    net = randomize_bn(ResNet(BasicBlock, [2, 2], width=8, in_channels=1))
    pth = tmp_path / "r.pth"
    torch.save(net.state_dict(), pth)
    conv = tmp_path / "c.safetensors"
    assert run_cli(capsys, "convert", pth, "--input-size", "16", "--normalize", "0.3,0.4", "--out", conv)[0] == 0
    assert load_checkpoint(conv)[0].config.normalize == (0.3, 0.4)
    code, _, err = run_cli(capsys, "convert", conv, "--normalize", "0.1,0.2", "--out", tmp_path / "d.safetensors")
    assert code == 2 and "keeps the normalization" in err, err
    code, _, err = run_cli(capsys, "export", conv, "--format", "torchvision", "--out", tmp_path / "t.pth")
    assert code == 2 and "no place for the model's input normalization" in err and not (tmp_path / "t.pth").exists()
