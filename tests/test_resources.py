"""Memory estimates: unrolled exports that would not fit are refused up front, with the estimate."""

from __future__ import annotations

import pytest

from resode_export.convert import load_model
from resode_export.errors import ResodeError
from resode_export.export import export_model
from resode_export.export.torch_graph import FrozenODENet
from resode_export.resources import parse_bytes, stage_times, unrolled_bytes
from resode_export.schemes import SCHEMES, stage_grid

from .helpers import run_cli


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("depth", [1, 2, 7, 64])
def test_stage_times_formula(scheme, depth):
    assert stage_times(scheme, depth) == len(stage_grid(scheme, depth)[0])


@pytest.mark.parametrize("scheme", ["euler", "heun", "rk4"])
def test_unrolled_bytes_is_what_an_unrolled_model_holds(scheme):
    model, _, _ = load_model("fashion-conv")
    target = model.discretize(depth=(5, 9), scheme=scheme)
    frozen = FrozenODENet(target)
    held = sum(t.numel() * t.element_size() for t in [*frozen.parameters(), *frozen.buffers()])
    assert unrolled_bytes(model, (5, 9), scheme) == held


def test_parse_bytes():
    assert parse_bytes("8G") == 8 * 2**30 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1000") == 1000
    with pytest.raises(ResodeError, match="RESODE_MEMORY_LIMIT"):
        parse_bytes("lots")


def test_absurd_depth_refused_with_the_estimate(capsys, tmp_path):
    out = tmp_path / "m.onnx"
    code, stdout, err = run_cli(capsys, "export", "fashion-conv", "--depth", "10000000", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "unrolled at depth 10000000" in err and "GiB of weights" in err and "--dynamic-depth" in err
    assert list(tmp_path.iterdir()) == []


def test_limit_from_the_environment(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RESODE_MEMORY_LIMIT", "50M")
    code, _, err = run_cli(capsys, "export", "fashion-conv", "--depth", "512", "--out", tmp_path / "m.onnx")
    assert code == 2 and "above 50.0 MiB (RESODE_MEMORY_LIMIT)" in err, err
    model, _, _ = load_model("digits-mlp")
    with pytest.raises(ResodeError, match="needs about"):  # the library refuses too, before any copy
        export_model(model.discretize(depth=4096), "torchscript", tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []
    # the dynamic-depth graph does not grow with depth: not refused
    code, _, err = run_cli(capsys, "export", "fashion-conv", "--dynamic-depth", "--out", tmp_path / "d.onnx")
    assert code == 0, err
    monkeypatch.setenv("RESODE_MEMORY_LIMIT", "lots")
    code, _, err = run_cli(capsys, "export", "digits-mlp", "--out", tmp_path / "x.onnx")
    assert code == 2 and "must be a size" in err


def test_training_a_model_too_large_is_refused_before_allocating(capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(capsys, "train", "--width", "100000", "--hidden", "100000", "--depth", "64",
                           "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "GiB of weights" in err and "--width" in err and list(tmp_path.iterdir()) == []
