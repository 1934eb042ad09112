"""resode inspect on models whose answer is known."""

import json

import torch

from resode_export.diagnose import inspect_model, smoothness
from resode_export.network import ODENet

from .helpers import mlp_config, run_cli, smooth_knots_


def _random_knots_(model: ODENet, tied: bool, seed: int = 0) -> ODENet:
    """Knots drawn at random (output layers included): the same draw at every knot, or one per knot."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for knots in block.curve.knots.values():
                k, shape = knots.shape[0], knots.shape[1:]
                draw = torch.randn(1 if tied else k, *shape, generator=gen) / shape[-1] ** 0.5
                knots.copy_(draw.expand_as(knots))
    return model


def _x(model, n=32):
    return torch.randn(n, *model.config.in_shape, generator=torch.Generator().manual_seed(1))


def test_tied_weights_are_perfectly_smooth_and_ode_like():
    model = _random_knots_(ODENet(mlp_config(widths=(8,), depths=(16,), hidden=16)), tied=True)
    report = inspect_model(model, _x(model))
    stage = report["stages"][0]
    assert stage["roughness_max"] == 0.0 and stage["max_relative_jump"] == 0.0
    assert report["ode_like"] and report["verdict"].startswith("ODE-like: safe to re-discretize down to depth")
    assert stage["distance_to_limit_ode"] < 0.1  # Euler at depth 16 of an autonomous ODE
    assert all(d is not None for d in report["min_depth"].values())
    assert report["min_depth"]["rk4"] <= report["min_depth"]["heun"] <= report["min_depth"]["euler"]
    assert 0.7 < report["convergence_order"]["euler"] < 1.4 and report["convergence_order"]["heun"] > 1.5


def test_iid_weights_are_rough_and_not_ode_like():
    model = _random_knots_(ODENet(mlp_config(widths=(8,), depths=(32,), hidden=16)), tied=False)
    report = inspect_model(model, _x(model))
    stage = report["stages"][0]
    assert stage["max_relative_jump"] > 0.5 and stage["roughness_max"] > 10
    assert not report["ode_like"]
    assert report["verdict"].startswith("not ODE-like: weights are rough in depth")
    assert "resode distill" in report["verdict"]


def test_smoothness_grows_with_depth_only_for_iid_weights():
    rough = {}
    for depth in (16, 64):
        for tied in (True, False):
            m = ODENet(mlp_config(widths=(4,), depths=(depth,), hidden=4))
            m = _random_knots_(m, tied=False) if not tied else smooth_knots_(m)
            rough[(depth, tied)] = smoothness(m.blocks[0])["roughness_max"]
    assert rough[(64, False)] > 3 * rough[(16, False)]  # i.i.d.: ∝ N
    assert rough[(64, True)] < 1.5 * rough[(16, True)]  # a smooth curve: bounded


def test_cli_inspect_json(capsys):
    code, out, err = run_cli(capsys, "inspect", "--limit", "64", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert {"stages", "ode_like", "verdict", "min_depth"} <= set(result)
    assert result["ode_like"] is True and set(result["min_depth"]) == {"euler", "heun", "rk4"}
    assert result["stages"][0]["depth"] == 16 and result["stages"][0]["parameters"] > 0


def test_cli_inspect_bad_input(capsys):
    for args, message in ((["--tolerance", "0"], "tolerance"), (["--tolerance", "nan"], "tolerance"),
                          (["no-such-model"], "no-such-model"), (["--limit", "0"], "limit")):
        code, _, err = run_cli(capsys, "inspect", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_progress_counts_every_solve():
    """inspect advances its progress bar once per solve: the reference, each stage, each re-discretization."""
    from resode_export.convert import load_model
    from resode_export.data import load_data

    class Recorder:
        def __init__(self):
            self.total, self.done, self.removed = None, 0, False

        def add_task(self, description, total):
            self.total = total
            return 0

        def advance(self, task):
            self.done += 1

        def remove_task(self, task):
            self.removed = True

    model, _, _ = load_model("digits-mlp")
    bar = Recorder()
    result = inspect_model(model, load_data("digits").x_test[:32], progress=bar)
    order_rows = 2 * len([s for s in (0.25, 0.5, 1, 2) if 32 * s >= 1])  # euler and heun around depth 32
    sweeps = sum(len(v) for v in result["deviations"].values())
    assert bar.done == 1 + len(result["stages"]) + order_rows + sweeps <= bar.total and bar.removed
