"""benchmarks/export.py runs on tiny options and reports every field; the dynamic file does not grow with depth."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "export.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def result():
    done = subprocess.run([sys.executable, str(SCRIPT), "--depths", "4,8", "--schemes", "euler", "--stock-max-depth",
                           "0", "--repeats", "2", "--budget", "0", "--json"],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)  # stdout is the JSON object alone


def test_machine_and_workload_recorded(result):
    assert {"machine", "torch", "onnxruntime", "torch_threads", "ort_intra_op_threads"} <= set(result["machine"])
    assert result["machine"]["torch_threads"] == 1 and result["machine"]["ort_intra_op_threads"] == 1
    assert result["workload"]["width"] == 64 and result["workload"]["hidden"] == 64


def test_rows_have_every_field(result):
    rows = result["rows"]
    assert [(r["depth"], r["scheme"]) for r in rows] == [(4, "euler"), (8, "euler")]
    for r in rows:
        for form in ("static_onnx", "dynamic_onnx", "torchscript"):
            entry = r[form]
            assert entry["export_seconds"] >= 0 and entry["verify_seconds"] >= 0 and entry["bytes"] > 0
            assert entry["max_rel_deviation"] <= 1e-4
        for form in ("static_onnx", "dynamic_onnx"):
            entry = r[form]
            for b in (1, 256):
                assert entry[f"ort_ms_b{b}"] > 0 and entry[f"calls_b{b}"] == 2
                assert entry[f"ratio_b{b}"] == pytest.approx(entry[f"ort_ms_b{b}"] / r["torch_eager"][f"torch_ms_b{b}"],
                                                             rel=1e-3, abs=1e-4)
            assert entry["max_rel_deviation_from_torch_b256"] <= 1e-4
        assert r["dynamic_onnx"]["ratio_to_static_b1"] > 0 and r["dynamic_onnx"]["ratio_to_static_b256"] > 0
        assert r["torch_eager"]["torch_ms_b1"] > 0 and r["torch_eager"]["torch_ms_b256"] > 0
        for key in ("stock_dynamo", "stock_legacy"):
            assert "skipped" in r[key]  # --stock-max-depth 0
        assert set(r["targets"]) >= {"static_b1_le_0.7x_torch", "dynamic_b1_le_1.3x_static"}


def test_dynamic_file_does_not_grow_with_depth(result):
    rows = result["rows"]
    assert rows[0]["dynamic_onnx"]["bytes"] == rows[1]["dynamic_onnx"]["bytes"]
    assert rows[0]["dynamic_onnx"]["bytes_without_metadata"] == rows[1]["dynamic_onnx"]["bytes_without_metadata"]
    assert rows[1]["static_onnx"]["bytes"] > rows[0]["static_onnx"]["bytes"]  # the unrolled graph does
    assert result["summary"]["dynamic_bytes_constant_in_depth"] == {"euler": True}
