"""The benchmark scripts run, and the memory claims hold on small sizes (bytes, not seconds)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(script, *args):
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--json"], capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def memory_rows():
    return _run("memory.py", "--depths", "8,64")["rows"]


MEMORY_FREE = [(arch, method) for arch in ("mlp", "conv", "resnet") for method in ("adjoint", "reversible", "adjoint_fast")
               if (arch, method) != ("resnet", "reversible")]  # relu-projected blocks have no reversible scheme


@pytest.mark.parametrize("arch, method", MEMORY_FREE)
def test_memory_free_methods_are_flat_in_depth(memory_rows, arch, method):
    saved = {r["depth"]: r["saved_bytes"] for r in memory_rows if r["arch"] == arch and r["method"] == method}
    assert saved[64] <= 1.05 * saved[8], saved
    peak = {r["depth"]: r["peak_bytes"] for r in memory_rows if r["arch"] == arch and r["method"] == method}
    assert 0 < peak[64] <= 1.05 * peak[8], peak  # the backward's working memory is flat too


@pytest.mark.parametrize("arch", ["mlp", "conv", "resnet"])
def test_backprop_memory_grows_linearly(memory_rows, arch):
    """What backprop saves beyond the adjoint's depth-free part (stem, transitions, head, the block's input)."""
    saved = {r["depth"]: r["saved_bytes"] for r in memory_rows if r["arch"] == arch and r["method"] == "backprop"}
    fixed = {r["depth"]: r["saved_bytes"] for r in memory_rows if r["arch"] == arch and r["method"] == "adjoint"}
    assert (saved[64] - fixed[64]) / (saved[8] - fixed[8]) > 0.8 * 8, (saved, fixed)
    peak = {r["depth"]: r["peak_bytes"] for r in memory_rows if r["arch"] == arch and r["method"] == "backprop"}
    assert peak[64] > 4 * peak[8], peak


def test_gpu_benchmark_smoke_on_cpu():
    result = _run("gpu.py", "--device", "cpu", "--channels", "8", "--size", "8", "--batch", "2", "--depths", "4",
                  "--repeats", "1", "--no-torchdiffeq")
    assert {r["method"] for r in result["rows"]} >= {"backprop", "adjoint", "symplectic", "reversible"}
    assert all(r["step_ms"] > 0 for r in result["rows"])


def test_import_benchmark_smoke():
    result = _run("import_resnet.py", "--smoke")
    for row in result["round_trip"]:
        assert row["rel_dev_float64_fold"] < 1e-12 and row["rel_dev_float64_frozen"] < 1e-12, row
        assert row["rel_dev_float32_fold"] < 1e-5 and row["rel_dev_onnx_fold"] < 1e-5, row
    verdicts = result["verdicts"]
    for stage in ("random_init", "trained", "fine_tuned_adjoint", "smoothed"):
        assert isinstance(verdicts[stage]["ode_like"], bool) and verdicts[stage]["verdict"], stage
    assert verdicts["smoothed"]["max_relative_jump"] == [0.0, 0.0]  # 2 knots smoothed onto one B-spline: tied


def test_dynamic_forms_are_the_model():
    """benchmarks/dynamic_forms.py: every alternative dynamic-depth form it times computes the model (so its
    latency comparison is between equivalent graphs), at a depth that is and one that is not a multiple of 8."""
    result = _run("dynamic_forms.py", "--depths", "12,16", "--batches", "1", "--repeats", "5", "--budget", "0.01")
    for row in result["rows"]:
        for form in ("shipped", "unrolled_loop", "unrolled_loop_matmul", "precompute_scan"):
            assert row[form]["max_rel_deviation"] < 1e-5, (row["depth"], form)
        for bound in ("loop_no_formation", "scan_given_weights"):
            assert row[bound]["max_rel_deviation"] is None and row[bound]["ms"] > 0
        assert row["one_pass_formation"]["max_rel_deviation"] < 1e-5  # against its own (piecewise-constant) model


def test_kernel_counts_per_step():
    """benchmarks/kernels.py: per step, backprop runs 2 conv forwards and 2 backwards; the adjoint adds the
    reconstruction's full field and the VJP's replay up to the last conv (Field.vjp: 3 more forwards, no
    more backwards); the reversible backward keeps to the few activation-sized kernels its algebra needs."""
    methods = "backprop,adjoint,adjoint_fast,symplectic,reversible"
    rows = {r["method"]: r for r in _run("kernels.py", "--methods", methods)["rows"]}
    assert (rows["backprop"]["conv_forward"], rows["backprop"]["conv_backward"]) == (2, 2)
    assert (rows["adjoint"]["conv_forward"], rows["adjoint"]["conv_backward"], rows["adjoint"]["conv_passes"]) == (5, 2, 9)
    assert rows["symplectic"]["conv_passes"] == 7 and rows["symplectic"]["elementwise"] == rows["backprop"]["elementwise"]
    assert rows["reversible"]["elementwise"] <= 11, rows["reversible"]
    assert rows["adjoint_fast"]["conv_passes"] == 8 and rows["adjoint_fast"]["elementwise"] <= 8, rows["adjoint_fast"]
