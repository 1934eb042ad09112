"""Export: ONNX (static, dynamic depth), TorchScript, torch.export; self-verification; resode export / check."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from resode_export.check import recommend
from resode_export.curves import Curve
from resode_export.export import ExportMismatch, export_model, onnx_graph, onnx_session, run_onnx
from resode_export.export.onnx_graph import piecewise_polynomial
from resode_export.network import ODENet

from .helpers import conv_config, mlp_config, run_cli, smooth_knots_

REPO = Path(__file__).resolve().parent.parent


def _model(arch="mlp", seed=0, **kw):
    cfg = (mlp_config if arch == "mlp" else conv_config)(**kw)
    return smooth_knots_(ODENet(cfg, init="iid", seed=seed), scale=1.0, seed=seed).eval()


def _x(model, batch=5, seed=0):
    return torch.randn(batch, *model.config.in_shape, generator=torch.Generator().manual_seed(seed))


def _max_rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max())


@pytest.mark.parametrize("arch, scheme, interp", [
    ("mlp", "euler", "linear"), ("mlp", "heun", "cubic"), ("mlp", "rk4", "smooth"), ("mlp", "rk38", "constant"),
    ("mlp", "reversible_heun", "linear"), ("conv", "euler", "linear"), ("conv", "midpoint", "cubic"),
    ("conv", "reversible_heun", "cubic"),
])
def test_static_onnx_matches_pytorch(tmp_path, arch, scheme, interp):
    model = _model(arch, scheme=scheme, interp=interp)
    rec = export_model(model, "onnx", tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert not list(tmp_path.glob("*.data")) and len(list(tmp_path.iterdir())) == 1  # one self-contained file
    session = onnx_session(tmp_path / "m.onnx")
    for batch in (1, 7):  # the batch axis is dynamic
        x = _x(model, batch)
        with torch.no_grad():
            assert _max_rel(run_onnx(session, x.numpy()), model(x)) <= 1e-5
    assert rec["max_rel_deviation"] <= 1e-5 and rec["bytes"] == (tmp_path / "m.onnx").stat().st_size


@pytest.mark.parametrize("arch, scheme, interp, depths", [
    ("mlp", "euler", "linear", (4, 16, 64, 256)), ("mlp", "heun", "cubic", (3, 13, 64)),
    ("mlp", "rk4", "smooth", (1, 9, 32)), ("mlp", "reversible_heun", "linear", (5, 16, 40)),
    ("mlp", "ralston", "constant", (7, 24)), ("conv", "heun", "linear", (4, 11, 17, 33)),
    ("mlp", "midpoint", "linear", (15, 17)), ("mlp", "rk38", "cubic", (16, 33)),
    ("conv", "reversible_heun", "cubic", (17,)),
])
def test_one_dynamic_depth_graph_matches_every_depth(tmp_path, arch, scheme, interp, depths):
    """Depths below, at and off multiples of the chunk: the same file reproduces the model at each."""
    model = _model(arch, scheme=scheme, interp=interp)
    export_model(model, "onnx", tmp_path / "d.onnx", dynamic_depth=True)
    proto = onnx.load(str(tmp_path / "d.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input", "depth"]
    session = onnx_session(tmp_path / "d.onnx")
    x = _x(model, 4)
    for depth in depths:
        with torch.no_grad():
            reference = model.discretize(depth=depth)(x)
        assert _max_rel(run_onnx(session, x.numpy(), depth), reference) <= 1e-5, depth
    for depth in (0, -3):  # meaningless depths give NaN, never plausible logits
        assert np.isnan(run_onnx(session, x.numpy(), depth)).all()


def test_dynamic_graph_follows_the_onnx_specification(tmp_path):
    """onnx's reference evaluator (the specification's semantics, not onnxruntime's) runs the dynamic graph
    to the model's logits too, across a chunk boundary; it once misread a Loop without a condition."""
    from onnx.reference import ReferenceEvaluator

    model = _model("mlp", scheme="heun", interp="linear")
    export_model(model, "onnx", tmp_path / "d.onnx", dynamic_depth=True)
    evaluator = ReferenceEvaluator(str(tmp_path / "d.onnx"))
    x = _x(model, 3)
    for depth in (5, 17):
        (out,) = evaluator.run(None, {"input": x.numpy(), "depth": np.array(depth, np.int64)})
        with torch.no_grad():
            assert _max_rel(out, model.discretize(depth=depth)(x)) <= 1e-5, depth


def test_dynamic_file_size_does_not_grow_with_depth(tmp_path):
    model = _model(depths=(8, 8), knots=(8, 8))
    sizes = {}
    for depth in (8, 512):
        m = model.discretize(depth=depth)
        sizes[("dyn", depth)] = export_model(m, "onnx", tmp_path / f"d{depth}.onnx", dynamic_depth=True)["bytes"]
        sizes[("static", depth)] = export_model(m, "onnx", tmp_path / f"s{depth}.onnx")["bytes"]
    assert abs(sizes[("dyn", 8)] - sizes[("dyn", 512)]) <= 16  # the depth only enters the metadata text
    assert sizes[("static", 512)] > 20 * sizes[("static", 8)]


@pytest.mark.parametrize("interp", ["constant", "linear", "cubic", "smooth"])
@pytest.mark.parametrize("num_knots", [1, 2, 3, 4, 9, 30])
def test_curves_are_exact_piecewise_polynomials(interp, num_knots):
    curve = Curve({"w": torch.randn(num_knots, 3, dtype=torch.float64)}, interp)
    scale, degree, weights = piecewise_polynomial(curve)  # raises if the form does not rebuild the curve
    t = np.random.default_rng(0).uniform(0, 1, 200)
    u = t * scale
    i = np.clip(np.floor(u), 0, weights.shape[0] - 1).astype(int)
    rebuilt = np.einsum("tm,tmk->tk", (u - i)[:, None] ** np.arange(degree + 1), weights[i])
    np.testing.assert_allclose(rebuilt, curve.basis(t).numpy(), atol=1e-10)


_CLEAN_LOAD = """
import sys
sys.modules["resode_export"] = None  # any import of the package fails
import numpy as np, torch
fmt, path, x_path, out_path = sys.argv[1:]
x = torch.from_numpy(np.load(x_path))
with torch.no_grad():
    m = torch.jit.load(path) if fmt == "torchscript" else torch.export.load(path).module()
    np.save(out_path, m(x).numpy())
assert not any(name.startswith("resode") for name in sys.modules if sys.modules[name] is not None)
"""


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_torch_formats_load_without_resode(tmp_path, fmt, arch):
    model = _model(arch, scheme="heun", depths=(3, 4), knots=(5, 2))
    path = tmp_path / f"m.{fmt}"
    rec = export_model(model, fmt, path)
    assert rec["max_rel_deviation"] <= 1e-6
    x = _x(model, 6, seed=3)
    np.save(tmp_path / "x.npy", x.numpy())
    done = subprocess.run([sys.executable, "-I", "-c", _CLEAN_LOAD, fmt, str(path), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        assert _max_rel(np.load(tmp_path / "y.npy"), model(x)) <= 1e-6


def test_a_wrong_graph_is_refused_and_removed(tmp_path, monkeypatch):
    original = onnx_graph.emit_head

    def shifted(g, model, x):
        return g.op("Add", [original(g, model, x), g.scalar(1e-2)])

    monkeypatch.setattr(onnx_graph, "emit_head", shifted)
    model = _model()
    with pytest.raises(ExportMismatch, match="deviates"):
        export_model(model, "onnx", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one


def test_graphs_above_protobufs_limit_keep_their_weights_beside_them(tmp_path, monkeypatch, capsys):
    import resode_export.export as export

    monkeypatch.setattr(export, "PROTOBUF_LIMIT", 1000)  # stands for 2 GB
    model = _model()
    x = _x(model)

    def files():
        return sorted(p.name for p in tmp_path.iterdir())

    def runs_right():
        with torch.no_grad():
            return _max_rel(run_onnx(onnx_session(tmp_path / "m.onnx"), x.numpy()), model(x)) <= 1e-5

    rec = export_model(model, "onnx", tmp_path / "m.onnx")
    data = Path(rec["external_data"])
    assert data.name in capsys.readouterr().err
    assert files() == ["m.onnx", data.name] and data.name.startswith("m.onnx.") and data.suffix == ".data"
    assert rec["bytes"] == (tmp_path / "m.onnx").stat().st_size + data.stat().st_size and data.stat().st_size > 0
    assert rec["max_rel_deviation"] <= 1e-5 and runs_right()
    # a failed re-export leaves the earlier graph and its weights as they were
    with pytest.raises(ExportMismatch):
        export_model(model, "onnx", tmp_path / "m.onnx", tolerance=-1.0)
    assert files() == ["m.onnx", data.name] and runs_right()
    # a successful one replaces both, and the earlier weights file goes
    rec2 = export_model(model, "onnx", tmp_path / "m.onnx")
    assert files() == ["m.onnx", Path(rec2["external_data"]).name] and rec2["external_data"] != rec["external_data"]
    assert runs_right()
    monkeypatch.setattr(export, "PROTOBUF_LIMIT", 2**31)  # back to one file: no weights file is left behind
    export_model(model, "onnx", tmp_path / "m.onnx")
    assert files() == ["m.onnx"] and runs_right()


def test_static_export_of_depth_1024_is_fast(tmp_path):
    """Not a timing assertion on the machine's speed: a guard that the build stays linear and light."""
    model = _model(widths=(16,), depths=(1024,), knots=(8,), hidden=16, interp="cubic", scheme="heun")
    rec = export_model(model, "onnx", tmp_path / "m.onnx")
    assert rec["max_rel_deviation"] <= 1e-4
    assert rec["seconds"] < 30  # measured ~1 s here; the stock exporter took minutes


# --- CLI ----------------------------------------------------------------------------------


def test_cli_export_json(capsys, tmp_path):
    out = tmp_path / "digits.onnx"
    code, stdout, err = run_cli(capsys, "export", "--format", "onnx", "--depth", "16", "--scheme", "heun",
                                "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert {"path", "format", "depth", "scheme", "dynamic_depth", "bytes", "max_rel_deviation", "seconds"} <= set(result)
    assert (result["format"], result["depth"], result["scheme"], result["dynamic_depth"]) == ("onnx", 16, "heun", False)
    assert result["bytes"] == out.stat().st_size and result["max_rel_deviation"] <= 1e-4
    code, stdout, err = run_cli(capsys, "export", "--dynamic-depth", "--out", tmp_path / "dyn.onnx", "--json")
    assert code == 0, err
    assert json.loads(stdout)["dynamic_depth"] is True and json.loads(stdout)["depth"] is None


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite"], "tflite"),
    (["--format", "torchscript", "--dynamic-depth"], "--format onnx"),
    (["--dynamic-depth", "--depth", "8"], "run time"),
    (["--depth", "0"], "depth must be"),
    (["--scheme", "nosuch"], "nosuch"),
    (["--out", "/nonexistent-dir/m.onnx"], "nonexistent-dir"),
])
def test_cli_export_bad_input(capsys, args, message):
    code, out, err = run_cli(capsys, "export", *args)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_cli_export_mismatch_exits_1_and_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_graph, "GN_EPS", 1.0)  # a wrong GroupNorm epsilon: the conv model's outputs move
    code, out, err = run_cli(capsys, "export", "fashion-conv", "--depth", "2", "--out", tmp_path / "m.onnx")
    assert code == 1 and "deviates" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_cli_check_sweeps_depths_and_schemes(capsys, tmp_path):
    png = tmp_path / "check.png"
    code, out, err = run_cli(capsys, "check", "--depths", "2,8,32", "--schemes", "euler,heun", "--plot", png,
                             "--repeats", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["rows"]) == 6 and 0.9 < result["source_accuracy"] <= 1
    for row in result["rows"]:
        assert {"depth", "scheme", "accuracy", "max_rel_deviation", "latency_ms_b1", "latency_ms_b256", "bytes"} <= set(row)
        assert row["max_rel_deviation"] <= 1e-4 and row["latency_ms_b1"] > 0 and row["bytes"] > 0
    rec = result["recommended"]
    best = [r for r in result["rows"] if (r["depth"], r["scheme"]) == (rec["depth"], rec["scheme"])][0]
    assert best["accuracy"] >= result["source_accuracy"] - 0.005
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_check_sweeps_a_dynamic_depth_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "--dynamic-depth", "--out", tmp_path / "d.onnx")
    assert code == 0, err
    code, out, err = run_cli(capsys, "check", tmp_path / "d.onnx", "--depths", "4,16,32", "--repeats", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [r["depth"] for r in result["rows"]] == [4, 16, 32] and result["dynamic_depth"] is True
    at_native = [r for r in result["rows"] if r["depth"] == 32][0]
    assert at_native["accuracy"] == result["source_accuracy"]  # the file at the model's native depth
    assert "ignored" not in err


def test_cli_check_says_which_options_a_fixed_graph_ignores(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "--out", tmp_path / "s.onnx")
    assert code == 0, err
    code, out, err = run_cli(capsys, "check", tmp_path / "s.onnx", "--depths", "4,8", "--schemes", "heun",
                             "--repeats", "3", "--limit", "20", "--json")
    assert code == 0, err
    assert "fixed-depth graph (depth 16), so --depths is ignored" in err and "--schemes is ignored" in err
    assert [(r["depth"], r["scheme"]) for r in json.loads(out)["rows"]] == [(16, "euler")]


def test_cli_check_refuses_foreign_and_broken_onnx(capsys, tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 64])])
    onnx.save_model(helper.make_model(graph), str(tmp_path / "foreign.onnx"))
    (tmp_path / "broken.onnx").write_bytes(b"\x00not onnx at all")
    for name, message in (("foreign.onnx", "not made by resode"), ("broken.onnx", "not a readable ONNX"),
                          ("missing.onnx", "does not exist")):
        code, _, err = run_cli(capsys, "check", tmp_path / name, "--data", "digits")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_recommend_takes_the_fastest_row_within_tolerance():
    rows = [{"depth": 2, "scheme": "euler", "accuracy": 0.90, "latency_ms_b1": 0.1, "latency_ms_b256": 1},
            {"depth": 8, "scheme": "euler", "accuracy": 0.951, "latency_ms_b1": 0.4, "latency_ms_b256": 4},
            {"depth": 4, "scheme": "heun", "accuracy": 0.955, "latency_ms_b1": 0.3, "latency_ms_b256": 3}]
    assert recommend(rows, 0.956, tolerance=0.5)["depth"] == 4
    assert recommend(rows, 0.956, tolerance=1.0)["depth"] == 4
    assert recommend(rows, 0.956, tolerance=7.0)["depth"] == 2
    assert recommend(rows, 0.99, tolerance=0.5) is None


@pytest.mark.parametrize("scheme", ["euler", "midpoint", "heun", "ralston", "rk4", "rk38", "reversible_heun"])
@pytest.mark.parametrize("fmt", ["onnx", "onnx-dynamic", "torchscript", "pt2"])
def test_every_format_runs_every_scheme(tmp_path, fmt, scheme):
    """Parity on random inputs, rtol 1e-5, for each format × scheme (the file is run by its own runtime)."""
    from resode_export.export import verify

    model = _model(scheme=scheme, depths=(3, 2), knots=(4, 3), interp="cubic")
    dynamic = fmt == "onnx-dynamic"
    fmt = "onnx" if dynamic else fmt
    export_model(model, fmt, tmp_path / "m", dynamic_depth=dynamic)
    assert verify(model, fmt, str(tmp_path / "m"), None, dynamic, depths=(1, 3, 10)) <= 1e-5


def test_check_recommends_the_known_answer():
    """Zero residual functions: every depth × scheme gives the same logits, so the cheapest row must win."""
    from resode_export.check import check_model
    from resode_export.data import load_data

    data = load_data("digits")
    model = ODENet(mlp_config(in_shape=data.in_shape, num_classes=10, widths=(256,), depths=(4,), hidden=512), seed=0)
    result = check_model(model, data, depths=[1, 48], schemes=["euler", "rk4"], tolerance=0.0, repeats=20, limit=64)
    accuracies = {r["accuracy"] for r in result["rows"]}
    assert accuracies == {result["source_accuracy"]}  # the ODE blocks are the identity at every depth
    assert (result["recommended"]["depth"], result["recommended"]["scheme"]) == (1, "euler")


def test_check_bad_depths_and_schemes(capsys):
    for args, message in ((["--depths", "0,4"], "depth must be"), (["--depths", "4,x"], "comma list"),
                          (["--schemes", "euler,nosuch"], "nosuch"), (["--plot", "out.jpg"], ".png")):
        code, _, err = run_cli(capsys, "check", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_missing_onnxruntime_is_bad_input_not_a_crash(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    for args in (["export", "--out", tmp_path / "m.onnx"], ["check", "--depths", "2"]):
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and "pip install onnx onnxruntime" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_check_bad_data_and_unloadable_files(capsys, tmp_path):
    np.savez(tmp_path / "five.npz", x_train=np.zeros((4, 5), np.float32), y_train=np.zeros(4, np.int64),
             x_test=np.zeros((4, 5), np.float32), y_test=np.zeros(4, np.int64))
    code, _, err = run_cli(capsys, "check", "--data", tmp_path / "five.npz", "--depths", "2")
    assert code == 2 and "shape" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(capsys, "check", "--schemes", ",")
    assert code == 2 and "--schemes is empty" in err, err
    # a resode graph whose weights file is gone
    import resode_export.export as export

    model = _model()
    original = export.PROTOBUF_LIMIT
    export.PROTOBUF_LIMIT = 1000
    try:
        rec = export_model(model, "onnx", tmp_path / "m.onnx", metadata={"resode.data": "digits"})
    finally:
        export.PROTOBUF_LIMIT = original
    Path(rec["external_data"]).unlink()
    capsys.readouterr()
    code, _, err = run_cli(capsys, "check", tmp_path / "m.onnx")
    assert code == 2 and "cannot load" in err and len(err.strip().splitlines()) == 1, err


def test_temporaries_of_killed_exports_are_cleared(tmp_path):
    """A killed export leaves its temporary file behind; the next export to that path removes it (its writer
    is gone) and leaves a live writer's alone."""
    import os

    out = tmp_path / "m.onnx"
    dead = tmp_path / ".m.onnx.999999999-abc123.tmp"  # above any pid Linux hands out
    live = tmp_path / f".m.onnx.{os.getpid()}-xyz789.tmp"
    dead.write_bytes(b"half a graph")
    live.write_bytes(b"being written")
    export_model(ODENet(mlp_config(depths=(2, 2)), init="iid"), "onnx", out)
    assert out.is_file() and not dead.exists() and live.exists()


def test_a_failed_export_write_is_one_clear_error(capsys, tmp_path, monkeypatch):
    import resode_export.export as export_module

    def full_disk(proto, tmp, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "_write_onnx", full_disk)
    code, _, err = run_cli(capsys, "export", "--out", tmp_path / "m.onnx")
    assert code == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []
