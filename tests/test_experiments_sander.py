"""The Sander et al. 2022 experiment scripts run in smoke mode, and their numbers say what the paper says."""

import csv
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_smoke(script: str, out: Path) -> str:
    done = subprocess.run([sys.executable, f"experiments/{script}.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for suffix in (".csv", ".png", ".md"):
        assert (out / f"{script}{suffix}").is_file(), f"{script}{suffix} missing"
    assert (out / f"{script}.png").read_bytes()[:8] == PNG_MAGIC
    assert "Command" in (out / f"{script}.md").read_text()
    return done.stdout


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _slope(depths, values) -> float:
    return float(np.polyfit(np.log(depths), np.log(values), 1)[0])


@pytest.fixture(scope="module")
def distance(tmp_path_factory):
    out = tmp_path_factory.mktemp("sander_distance")
    stdout = _run_smoke("sander_distance", out)
    mean = defaultdict(lambda: defaultdict(list))
    rows = _rows(out / "sander_distance.csv")
    for r in rows:
        mean[r["weights"]][int(r["depth"])].append(float(r["dist"]))
    depths = sorted(mean["smooth"])
    return stdout, depths, {w: [np.mean(by[d]) for d in depths] for w, by in mean.items()}, rows


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    out = tmp_path_factory.mktemp("sander_linear")
    stdout = _run_smoke("sander_linear", out)
    assert (out / "sander_linear_coefficients.csv").is_file()
    return stdout, _rows(out / "sander_linear.csv"), _rows(out / "sander_linear_coefficients.csv")


def test_distance_smooth_weights_converge_at_rate_one_over_n(distance):
    stdout, depths, dist, _ = distance
    assert "sander_distance" in stdout and "slope" in stdout
    assert -1.15 < _slope(depths, dist["smooth"]) < -0.85, dist["smooth"]


def test_distance_rough_weights_do_not_converge_like_smooth_ones(distance):
    _, depths, dist, _ = distance
    deep = depths[-3:]
    rough = _slope(deep, dist["smooth+iid"][-3:])
    assert rough > -0.6, dist["smooth+iid"]  # levels off (slope ~ 0 at larger depths in the full run)
    assert rough > _slope(deep, dist["smooth"][-3:]) + 0.4
    assert dist["smooth+iid"][-1] > 5 * dist["smooth"][-1]
    # zero-mean i.i.d. weights: the gap closes, but only at the central-limit rate 1/sqrt(N), not 1/N
    assert -0.8 < _slope(depths, dist["iid"]) < -0.35, dist["iid"]


def test_distance_reference_odes_are_accurate(distance):
    _, _, _, rows = distance
    for r in rows:
        assert float(r["ref_err"]) < 0.1 * float(r["dist"]), r


def test_linear_training_from_zero_stays_smooth_and_iid_stays_rough(linear):
    stdout, rows, _ = linear
    assert "roughness" in stdout
    last = max(int(r["step"]) for r in rows)
    final = defaultdict(dict)
    for r in rows:
        if int(r["step"]) == last:
            final[r["init"]][int(r["depth"])] = r
    depths = sorted(final["zero"])
    zero = [float(final["zero"][d]["roughness"]) for d in depths]
    iid = [float(final["iid"][d]["roughness"]) for d in depths]
    assert all(0 < z < 1 for z in zero), zero  # O(1): weights trained from 0 are a smooth curve in n/N
    assert max(zero) < 1.5 * min(zero), zero  # ... and do not get rougher with depth
    assert all(z < 0.1 * i for z, i in zip(zero, iid)), (zero, iid)
    assert iid[-1] / iid[0] > 0.5 * depths[-1] / depths[0], iid  # i.i.d. roughness grows like N
    for init in ("zero", "iid"):
        start = [float(r["loss"]) for r in rows if r["init"] == init and int(r["step"]) == 0]
        end = [float(final[init][d]["loss"]) for d in depths]
        assert max(end) < 0.1 * min(start), (init, start, end)  # both actually trained
    gaps = [float(final["zero"][d]["gap"]) for d in depths[:-1]]
    assert all(g < 0.2 * float(final["iid"][d]["gap"]) for g, d in zip(gaps, depths)), gaps
    assert gaps[0] > 2 * gaps[-1], gaps  # trained weights approach a common limit as N grows


def test_linear_coefficients_start_at_zero_and_move(linear):
    _, _, coefficients = linear
    entries = [k for k in coefficients[0] if k.startswith("A[")]
    steps = sorted({int(c["step"]) for c in coefficients})
    zero = [c for c in coefficients if c["init"] == "zero"]
    assert all(float(c[k]) == 0.0 for c in zero if int(c["step"]) == 0 for k in entries)
    assert any(abs(float(c[k])) > 1e-3 for c in zero if int(c["step"]) == steps[-1] for k in entries)
