"""The gradient experiments (Sander et al. 2022, Matsubara et al. 2021) run in smoke mode, and their numbers
carry the science: the adjoint converges with depth, the exact methods equal backprop, memory scales as claimed."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PNG = b"\x89PNG\r\n\x1a\n"


def _run(script: str, out: Path) -> dict[str, list[dict]]:
    done = subprocess.run([sys.executable, f"experiments/{script}.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "summary:" in done.stdout
    png, md = out / f"{script}.png", out / f"{script}.md"
    assert png.read_bytes()[:8] == PNG
    text = md.read_text()
    assert "OMP_NUM_THREADS=1 python experiments/" in text and "| claim | measured | verdict |" in text
    tables = {}
    for path in sorted(out.glob(f"{script}_*.csv")):
        with path.open() as fh:
            tables[path.stem.removeprefix(f"{script}_")] = list(csv.DictReader(fh))
    return tables


@pytest.fixture(scope="module")
def sander(tmp_path_factory):
    return _run("sander_adjoint", tmp_path_factory.mktemp("sander"))


@pytest.fixture(scope="module")
def matsubara(tmp_path_factory):
    return _run("matsubara_symplectic", tmp_path_factory.mktemp("matsubara"))


def _errors(rows, weights, scheme, method):
    sel = sorted((int(r["depth"]), float(r["rel_grad_error"])) for r in rows
                 if (r["weights"], r["scheme"], r["method"]) == (weights, scheme, method))
    assert len(sel) >= 3
    return [e for _, e in sel]


def test_sander_adjoint_error_falls_with_depth_and_heun_wins_on_smooth_weights(sander):
    rows = sander["gradients"]
    euler, heun = _errors(rows, "smooth", "euler", "adjoint"), _errors(rows, "smooth", "heun", "adjoint")
    assert all(b < a for a, b in zip(euler, euler[1:])), euler
    assert euler[-1] < euler[0] / 30  # 8 → 512 is 64×: at least ~1/N
    assert heun[-1] < euler[-1] / 100, (heun, euler)  # higher order on smooth weights
    # rough weights take Heun's advantage away: no longer orders of magnitude better than Euler
    rough_e, rough_h = _errors(rows, "smooth+iid", "euler", "adjoint"), _errors(rows, "smooth+iid", "heun", "adjoint")
    assert rough_h[-1] > rough_e[-1] / 100, (rough_h, rough_e)
    assert all(0 < float(r["rel_grad_error"]) < 1 for r in rows)


def test_sander_training_rows(sander):
    rows = sander["training"]
    assert {(r["scheme"], r["method"]) for r in rows} == {(s, m) for s in ("euler", "heun") for m in ("backprop", "adjoint")}
    acc = {(r["scheme"], int(r["depth"]), r["method"]): float(r["test_accuracy"]) for r in rows}
    deepest = max(d for _, d, _ in acc)
    for scheme in ("euler", "heun"):
        assert all(a > 0.5 for (s, _, m), a in acc.items() if (s, m) == (scheme, "backprop"))  # chance is 0.1
        # at the deepest smoke depth, training through the adjoint lands where backprop does
        assert abs(acc[(scheme, deepest, "adjoint")] - acc[(scheme, deepest, "backprop")]) <= 0.05


def test_matsubara_exact_methods_equal_backprop_and_the_adjoint_does_not(matsubara):
    rows = matsubara["exactness"]
    exact = [float(r["rel_grad_diff"]) for r in rows if r["method"] in ("symplectic", "checkpoint", "reversible")]
    assert len(exact) >= 14 and max(exact) <= 1e-12
    assert {r["scheme"] for r in rows if r["method"] == "symplectic"} == {"euler", "heun", "rk4"}
    adjoint = [float(r["rel_grad_diff"]) for r in rows if r["method"] == "adjoint"]
    assert min(adjoint) > 1e-8  # the check can tell an approximate gradient from an exact one


def test_matsubara_memory_scaling(matsubara):
    rows = matsubara["cost"]
    mem = {(r["scheme"], r["method"], int(r["depth"])): int(r["saved_bytes"]) for r in rows}
    depths = sorted({int(r["depth"]) for r in rows})
    d0, d1 = depths[0], depths[-1]
    for scheme, method in [("euler", "adjoint"), ("euler", "adjoint_fast"), ("rk4", "adjoint"),
                           ("reversible_heun", "reversible")]:
        assert mem[(scheme, method, d1)] <= 1.05 * mem[(scheme, method, d0)], (scheme, method)
    for scheme in ("euler", "rk4"):
        assert mem[(scheme, "backprop", d1)] > 0.6 * (d1 / d0) * mem[(scheme, "backprop", d0)]
        assert mem[(scheme, "adjoint", d1)] < mem[(scheme, "symplectic", d1)] < mem[(scheme, "backprop", d1)]
    # symplectic keeps one state per step whatever the stages: the same bytes for euler and rk4
    assert mem[("rk4", "symplectic", d1)] == mem[("euler", "symplectic", d1)]
    assert all(float(r["median_seconds"]) > 0 for r in rows)
