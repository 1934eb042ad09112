"""Smoke runs of experiments/marion_smoothness.py and experiments/deployment_pareto.py, checked on their CSVs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(script: str, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, f"experiments/{script}.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / f"{script}.png").read_bytes()[:8] == PNG_MAGIC
    md = (out / f"{script}.md").read_text()
    assert "Claim" in md and "--smoke" in md and "Agreement" in md
    with (out / f"{script}.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    return rows


def test_marion_smoothness_smoke(tmp_path):
    rows = _run("marion_smoothness", tmp_path)
    q = {(r["init"], int(r["depth"]), int(r["step"])): (float(r["L_max_dtheta"]), float(r["loss"])) for r in rows}
    depths = sorted({d for _, d, _ in q})
    last = max(s for *_, s in q)
    assert len(depths) >= 3 and last > 0
    for d in depths:
        iid = q["iid", d, last][0]
        for kind in ("smooth-tied", "smooth-curve"):
            # smooth init stays far below i.i.d. at every checkpoint, not just at the end
            for (k, dd, s), (val, _) in q.items():
                if k == kind and dd == d:
                    assert val < q["iid", d, s][0], (kind, d, s)
            assert q[kind, d, last][0] < 0.5 * iid
        assert q["smooth-tied", d, 0][0] == 0.0  # tied weights: no variation in depth at init
        for kind in ("smooth-tied", "smooth-curve", "iid"):
            assert q[kind, d, last][1] < 0.2 * q[kind, d, 0][1], (kind, d)  # gradient descent trains
    lo, hi = depths[0], depths[-1]
    growth = hi / lo
    # i.i.d.: grows like L; smooth: bounded in L
    assert q["iid", hi, last][0] > 0.7 * growth * q["iid", lo, last][0]
    for kind in ("smooth-tied", "smooth-curve"):
        assert q[kind, hi, last][0] < 1.5 * q[kind, lo, last][0]


def _dominates(s: dict, r: dict) -> bool:
    return (s["lat"] <= r["lat"] and s["acc"] >= r["acc"]) and (s["lat"] < r["lat"] or s["acc"] > r["acc"])


def test_deployment_pareto_smoke(tmp_path):
    rows = _run("deployment_pareto", tmp_path)
    by_model = defaultdict(list)
    for r in rows:
        assert r["on_front"] in ("True", "False")
        by_model[r["model"]].append({"lat": float(r["latency_ms_b1"]), "acc": float(r["accuracy"]),
                                     "front": r["on_front"] == "True", "rec": r["recommended"] == "True"})
    assert set(by_model) == {"digits-mlp"} and len(by_model["digits-mlp"]) == 2
    for model, rs in by_model.items():
        assert any(r["front"] for r in rs), model
        for r in rs:  # on the front exactly when no other row dominates it
            assert r["front"] == (not any(_dominates(s, r) for s in rs if s is not r)), (model, r)
        fastest = min(rs, key=lambda r: (r["lat"], -r["acc"]))
        assert fastest["front"]
        assert sum(r["rec"] for r in rs) <= 1
        assert all(r["front"] for r in rs if r["rec"])
        assert all(0 < r["acc"] <= 1 and r["lat"] > 0 for r in rs)
    # digits-mlp at depth 4 (euler) keeps accuracy near the source's and is faster than depth 32
    assert max(r["acc"] for r in by_model["digits-mlp"]) > 0.9
