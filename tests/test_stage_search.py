"""``search_stage_depths``: the greedy per-stage depth search of ``resode check``, on models with a known answer."""

from __future__ import annotations

import json
import math
import tempfile

import pytest
import torch

from resode_export.check import _greedy, search_stage_depths
from resode_export.data import Dataset
from resode_export.errors import ResodeError
from resode_export.evaluate import predict
from resode_export.network import ODENet, ODENetConfig

TOLERANCE = 1.0  # accuracy points


def two_stage_model(zero_stage: int, zero_depth: int = 16, rough_depth: int = 8) -> tuple[ODENet, Dataset]:
    """Two mlp stages: in ``zero_stage`` every knot of the field's output layer V is 0 (the field is 0, so any
    depth gives the same outputs); the other stage has rough i.i.d. weights of scale 1, one knot per step, so
    that halving its depth skips half its weights. The labels are the model's own predictions (100 %)."""
    depths = (zero_depth, rough_depth) if zero_stage == 0 else (rough_depth, zero_depth)
    config = ODENetConfig(arch="mlp", in_shape=(6,), num_classes=3, widths=(8, 8), depths=depths, hidden=16)
    model = ODENet(config, init="iid", seed=0)
    gen = torch.Generator().manual_seed(1)
    assert set(model.blocks[zero_stage].curve.knots) == {"W", "b", "V"}  # MLPField: V σ(W x + b)
    with torch.no_grad():
        model.blocks[zero_stage].curve.knots["V"].zero_()
        for knots in model.blocks[1 - zero_stage].curve.knots.values():
            knots.copy_(torch.randn(knots.shape, generator=gen, dtype=knots.dtype))
    x = torch.randn(300, 6, generator=gen)
    y = predict(model, x).argmax(1)
    assert len(set(y.tolist())) > 1  # not one class: a halved rough stage has labels to get wrong
    return model, Dataset("constructed", x, y, x, y, preprocessing="none", split="train = test")


class RecordingProgress:
    def __init__(self):
        self.tasks, self.advanced, self.totals = [], 0, []

    def add_task(self, description, total=None):
        self.tasks.append(description)
        return len(self.tasks) - 1

    def advance(self, task, n=1):
        self.advanced += n

    def update(self, task, total=None, **_):
        self.totals.append(total)


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_search_takes_the_zero_field_stage_to_depth_1_and_keeps_the_rough_stage(zero_stage, tmp_path, monkeypatch):
    model, data = two_stage_model(zero_stage)
    native = model.config.depths
    rough = 1 - zero_stage
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the search's temporary graphs go here
    progress = RecordingProgress()
    result = search_stage_depths(model, data, TOLERANCE, repeats=3, progress=progress)
    assert json.loads(json.dumps(result)) == result
    assert list(tmp_path.iterdir()) == []  # every temporary graph and folder removed
    assert model.config.depths == native and [b.depth for b in model.blocks] == list(native)  # caller's model

    assert result["scheme"] == "euler" and result["start_depths"] == list(native)
    assert result["reference_accuracy"] == 1.0 and result["tolerance"] == TOLERANCE
    rec = result["recommended"]
    expected = [1, 1]
    expected[rough] = native[rough]
    assert rec["depths"] == expected and rec["accuracy"] == 1.0

    tried = result["tried"]
    depths = [tuple(t["depths"]) for t in tried]
    assert depths[0] == native and tried[0]["kept"] and tried[0]["accuracy"] == 1.0
    assert len(set(depths)) == len(depths)  # each tuple measured once
    assert progress.tasks and progress.advanced == len(tried)
    # the path kept: the zero stage halved 16 → 8 → 4 → 2 → 1, the rough stage untouched
    path = [tuple(t["depths"]) for t in tried if t["kept"]]
    assert [d[zero_stage] for d in path] == [16, 8, 4, 2, 1] and {d[rough] for d in path} == {native[rough]}
    halved_rough = [t for t in tried if t["depths"][rough] < native[rough]]
    assert len(halved_rough) == 5  # tried once from every point of the path, refused every time
    assert all(t["accuracy"] < 1.0 - TOLERANCE / 100 and not t["kept"] for t in halved_rough)
    assert len(tried) == 10
    start_latency = tried[0]["latency_ms_b1"]
    assert all(t["latency_ms_b1"] > 0 for t in tried)
    assert rec["latency_ms_b1"] == next(t["latency_ms_b1"] for t in tried if t["depths"] == expected)
    assert rec["speedup"] == pytest.approx(start_latency / rec["latency_ms_b1"], rel=1e-3)


def test_search_from_given_start_depths_and_scheme():
    """``start`` replaces the native depths as the reference; a scheme other than the model's is used throughout."""
    model, data = two_stage_model(zero_stage=0)
    result = search_stage_depths(model, data, 0.0, scheme="heun", start=(4, 8), repeats=3, limit=200)
    assert result["scheme"] == "heun" and result["start_depths"] == [4, 8]
    assert [t["depths"] for t in result["tried"]] == [[4, 8], [2, 8], [4, 4], [1, 8], [2, 4], [1, 4]]
    assert result["recommended"]["depths"] == [1, 8]


def test_greedy_moves_to_the_fastest_qualifying_candidate():
    """Of the candidates within the tolerance the greedy step takes the lowest latency, not the first stage;
    a stage at depth 1 is not halved again, and every tuple is evaluated once."""
    calls = []

    def evaluate(depths):  # stage 1's steps cost ten times stage 0's; every tuple is accurate enough
        calls.append(depths)
        return 1.0, depths[0] + 10 * depths[1]

    path, tried = _greedy((4, 2), evaluate, 0.5)
    assert path == [(4, 2), (4, 1), (2, 1), (1, 1)]
    assert tried == [(4, 2), (2, 2), (4, 1), (2, 1), (1, 1)]
    assert sorted(set(calls)) == sorted(tried)

    def strict(depths):  # only one halving in all is accurate enough
        return (1.0 if sum(math.log2(a // b) for a, b in zip((8, 8), depths)) <= 1 else 0.0), depths[0] + 10 * depths[1]

    path, tried = _greedy((8, 8), strict, 0.5)
    assert path == [(8, 8), (8, 4)] and tried == [(8, 8), (4, 8), (8, 4), (4, 4), (8, 2)]


@pytest.mark.parametrize("kwargs, hint", [
    ({"start": (16,)}, "start has 1 depths for a model with 2 stages"),
    ({"start": (16, 8, 4)}, "start has 3 depths for a model with 2 stages"),
    ({"start": (0, 8)}, "depth must be an integer from 1"),
    ({"tolerance": -0.5}, "tolerance must be a finite number of accuracy points >= 0"),
    ({"tolerance": float("nan")}, "tolerance must be a finite number of accuracy points >= 0"),
    ({"tolerance": float("inf")}, "tolerance must be a finite number of accuracy points >= 0"),
    ({"scheme": "leapfrog"}, "unknown scheme 'leapfrog'"),
    ({"repeats": 0}, "repeats must be a positive integer"),
])
def test_bad_input_is_refused_in_one_line(kwargs, hint):
    model, data = two_stage_model(zero_stage=0)
    args = {"tolerance": TOLERANCE, **kwargs}
    with pytest.raises(ResodeError) as exc:
        search_stage_depths(model, data, repeats=kwargs.get("repeats", 3),
                            **{k: v for k, v in args.items() if k != "repeats"})
    assert hint in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_samples_of_the_wrong_shape_are_refused():
    model, data = two_stage_model(zero_stage=0)
    data.x_test = data.x_test[:, :5]
    with pytest.raises(ResodeError, match="expects"):
        search_stage_depths(model, data, TOLERANCE, repeats=3)


def test_cli_stage_search_prints_the_depths_for_export(capsys, tmp_path):
    from .helpers import run_cli

    code, stdout, err = run_cli(capsys, "check", "digits-mlp", "--stage-search", "--repeats", "3", "--limit", "100",
                                "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["start_depths"] == [16] and result["tried"][0]["depths"] == [16]
    assert len(result["recommended"]["depths"]) == 1 and result["recommended"]["depths"][0] <= 16
    code, stdout, err = run_cli(capsys, "check", "digits-mlp", "--stage-search", "--repeats", "3", "--limit", "100")
    assert code == 0 and "recommended: --depth" in stdout, err
    code, _, err = run_cli(capsys, "check", "digits-mlp", "--stage-search", "--plot", tmp_path / "p.png")
    assert code == 2 and "--stage-search" in err and not (tmp_path / "p.png").exists()
    graph = tmp_path / "g.onnx"
    assert run_cli(capsys, "export", "digits-mlp", "--out", graph)[0] == 0
    code, _, err = run_cli(capsys, "check", graph, "--stage-search")
    assert code == 2 and "needs the model" in err, err


def test_odd_depths_halve_upwards_so_no_depth_is_skipped():
    path, tried = _greedy((3,), lambda depths: (1.0, float(depths[0])), floor=0.5)
    assert [p[0] for p in path] == [3, 2, 1]
