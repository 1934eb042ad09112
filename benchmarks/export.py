"""Export time, file size and onnxruntime latency of each export form against depth (CPU, one thread).

    python benchmarks/export.py --json > benchmarks/results/export.json

A residual-MLP ODENet (width 64, hidden 64, in_shape (64,), 10 classes, one stage, iid knots,
linear interpolation): one curve of ``--knots`` knots per scheme, re-solved at every depth
(``model.discretize``), so the dynamic-depth file is the same model at every depth and its size
must not grow with depth (the static graph and TorchScript grow linearly: one weight sample per
stage time). For each (depth, scheme) row:

- ``static_onnx``, ``dynamic_onnx``, ``torchscript``: ``export_seconds`` (graph build + write, the
  ``seconds`` of :func:`export_model`'s record), ``verify_seconds``, ``bytes``, the verification's
  ``max_rel_deviation``;
- for both ONNX forms, onnxruntime (``intra_op_num_threads=1``) median ``ort_ms_b1`` / ``ort_ms_b256``
  per :func:`run_onnx` call after warm-up, the session's load time, and the ratios to torch eager
  (``ratio_b1``, ``ratio_b256``; the dynamic form also ``ratio_to_static_b1/_b256``);
- ``torch_eager``: the same model, ``eval()``, ``no_grad``, one thread (it samples its curve on
  every call, as a user's model does);
- ``stock_dynamo`` / ``stock_legacy``: ``torch.onnx.export`` of the same model (``dynamo=True``, the
  default, and ``dynamo=False``), export time only (plus bytes and a deviation check), or the
  exporter's error as a string; skipped above ``--stock-max-depth`` (minutes at depth 1024).

Targets: onnxruntime ≤ 0.7× torch eager at batch 1 and ≤ 1.0× at batch 256; dynamic ≤ 1.3× static
at the same depth (``targets`` in each row, failures listed in ``targets_missed``). The stock
exporter prints to stdout, so with ``--json`` everything but the JSON goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from resode_export.export import export_model, onnx_session, run_onnx
from resode_export.network import ODENet, ODENetConfig

BATCHES = (1, 256)
TARGETS = {"ort_vs_torch_b1": 0.7, "ort_vs_torch_b256": 1.0, "dynamic_vs_static": 1.3}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median_ms(call, repeats: int, budget: float) -> tuple[float, int]:
    """(median ms per call, calls timed): two warm-up calls, then up to ``repeats`` timed calls,
    fewer when one call is slow (about ``budget`` seconds per measurement, at least 3 calls or
    ``repeats`` if smaller)."""
    call()
    start = time.perf_counter()
    call()
    one = time.perf_counter() - start
    n = min(repeats, max(3, math.ceil(budget / max(one, 1e-9))))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 4), n


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / max |b|: how far an output is from the reference."""
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4)


def _export(model: ODENet, fmt: str, path: Path, **kw) -> dict:
    rec = export_model(model, fmt, path, **kw)
    entry = {"export_seconds": rec["seconds"], "verify_seconds": rec["verify_seconds"], "bytes": rec["bytes"],
             "max_rel_deviation": rec["max_rel_deviation"]}
    if fmt == "onnx":  # the file's metadata names the model's depth: the graph alone, to compare across depths
        import onnx

        proto = onnx.load(str(path))
        entry["metadata"] = {p.key: p.value for p in proto.metadata_props}
        del proto.metadata_props[:]
        entry["bytes_without_metadata"] = proto.ByteSize()
    return entry


def _latency_worker(path: str, depth: int | None, xs: dict, repeats: int, budget: float) -> tuple[dict, np.ndarray]:
    """In a fresh process: the session's load time, median ms per call at each batch, and the batch-256 output."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    session = onnx_session(path, threads=1)
    entry = {"session_seconds": round(time.perf_counter() - start, 3)}
    for b in BATCHES:
        entry[f"ort_ms_b{b}"], entry[f"calls_b{b}"] = median_ms(lambda b=b: run_onnx(session, xs[b], depth=depth),
                                                                 repeats, budget)
    return entry, run_onnx(session, xs[256], depth=depth)


def _onnx_latency(entry: dict, path: Path, depth: int | None, xs: dict, ref: dict, torch_ms: dict,
                  repeats: int, budget: float) -> None:
    """Each graph is timed in a process of its own (spawned): in this one, the static graph's tens of MB of
    weights and the exports' allocations had slowed the dynamic graph's loop by up to 1.3× (measured:
    15.5 → 19.7 ms for the depth-1024 Heun graph at batch 1 while a static session was alive)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        measured, out = pool.apply(_latency_worker, (str(path), depth, xs, repeats, budget))
    entry.update(measured)
    for b in BATCHES:
        entry[f"ratio_b{b}"] = _ratio(entry[f"ort_ms_b{b}"], torch_ms[b])
    entry["max_rel_deviation_from_torch_b256"] = _rel(out, ref[256])


def _stock(model: ODENet, path: Path, dynamo: bool, x1: np.ndarray, ref1: np.ndarray) -> dict:
    """torch.onnx.export of the model (batch 1 example): seconds, bytes, deviation, or the error."""
    entry: dict = {"dynamo": dynamo}
    start = time.perf_counter()
    try:
        torch.onnx.export(model, (torch.from_numpy(x1),), str(path), dynamo=dynamo,
                          input_names=["input"], output_names=["logits"])
    except Exception as e:  # noqa: BLE001 - the stock exporter's failures are a result
        entry["export_seconds"] = round(time.perf_counter() - start, 3)
        entry["error"] = f"{type(e).__name__}: {e}"[:1000]
        return entry
    entry["export_seconds"] = round(time.perf_counter() - start, 3)
    entry["bytes"] = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))
    entry["error"] = None
    try:
        session = onnx_session(path, threads=1)
        name = session.get_inputs()[0].name
        out = session.run(None, {name: x1})[0]
        entry["max_rel_deviation_from_torch_b1"] = _rel(out, ref1)
    except Exception as e:  # noqa: BLE001
        entry["run_error"] = f"{type(e).__name__}: {e}"[:1000]
    return entry


def _targets(row: dict) -> dict:
    s, d = row["static_onnx"], row["dynamic_onnx"]
    return {
        "static_b1_le_0.7x_torch": s["ratio_b1"] <= TARGETS["ort_vs_torch_b1"],
        "static_b256_le_1.0x_torch": s["ratio_b256"] <= TARGETS["ort_vs_torch_b256"],
        "dynamic_b1_le_0.7x_torch": d["ratio_b1"] <= TARGETS["ort_vs_torch_b1"],
        "dynamic_b256_le_1.0x_torch": d["ratio_b256"] <= TARGETS["ort_vs_torch_b256"],
        "dynamic_b1_le_1.3x_static": d["ratio_to_static_b1"] <= TARGETS["dynamic_vs_static"],
        "dynamic_b256_le_1.3x_static": d["ratio_to_static_b256"] <= TARGETS["dynamic_vs_static"],
    }


def nontrivial(model: ODENet, seed: int = 0) -> ODENet:
    """Draw the fields' output layers V too: ``MLPField.init`` gives V = 0 at every knot even with
    ``init="iid"``, which makes every ODE block the identity (and every export check trivially exact)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            v = block.curve.knots["V"]
            bound = 1 / math.sqrt(v.shape[-1])
            v.copy_((torch.rand(v.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
    return model


def measure_row(base: ODENet, depth: int, scheme: str, args, tmp: Path) -> dict:
    model = base.discretize(depth=depth, scheme=scheme).float().eval()
    row: dict = {"depth": depth, "scheme": scheme, "knots": base.config.knots[0]}
    gen = np.random.default_rng(depth)
    x256 = gen.standard_normal((256, *model.config.in_shape)).astype(np.float32)
    xs = {1: np.ascontiguousarray(x256[:1]), 256: x256}

    log(f"depth {depth} {scheme}: export static, dynamic, torchscript")
    paths = {"static_onnx": tmp / "static.onnx", "dynamic_onnx": tmp / "dynamic.onnx", "torchscript": tmp / "model.pt"}
    row["static_onnx"] = _export(model, "onnx", paths["static_onnx"])
    row["dynamic_onnx"] = _export(model, "onnx", paths["dynamic_onnx"], dynamic_depth=True)
    row["torchscript"] = _export(model, "torchscript", paths["torchscript"])
    paths["torchscript"].unlink()

    log(f"depth {depth} {scheme}: torch eager latency")
    eager: dict = {}
    ref = {}
    with torch.no_grad():
        for b in BATCHES:
            xt = torch.from_numpy(xs[b])
            eager[f"torch_ms_b{b}"], eager[f"calls_b{b}"] = median_ms(lambda xt=xt: model(xt), args.repeats,
                                                                      args.budget)
            ref[b] = model(xt).numpy()
    row["torch_eager"] = eager
    torch_ms = {b: eager[f"torch_ms_b{b}"] for b in BATCHES}

    log(f"depth {depth} {scheme}: onnxruntime latency (static, dynamic)")
    _onnx_latency(row["static_onnx"], paths["static_onnx"], None, xs, ref, torch_ms, args.repeats, args.budget)
    _onnx_latency(row["dynamic_onnx"], paths["dynamic_onnx"], depth, xs, ref, torch_ms, args.repeats, args.budget)
    for b in BATCHES:
        row["dynamic_onnx"][f"ratio_to_static_b{b}"] = _ratio(row["dynamic_onnx"][f"ort_ms_b{b}"],
                                                              row["static_onnx"][f"ort_ms_b{b}"])
    for p in paths.values():
        p.unlink(missing_ok=True)

    for key, dynamo in (("stock_dynamo", True), ("stock_legacy", False)):
        if depth > args.stock_max_depth:
            row[key] = {"dynamo": dynamo, "skipped": f"depth {depth} > --stock-max-depth {args.stock_max_depth}"}
            continue
        log(f"depth {depth} {scheme}: torch.onnx.export(dynamo={dynamo})")
        sub = tmp / key
        sub.mkdir()
        row[key] = _stock(model, sub / "model.onnx", dynamo, xs[1], ref[1])
        for f in sub.iterdir():
            f.unlink()
        sub.rmdir()
    row["targets"] = _targets(row)
    return row


def _summary(rows: list[dict]) -> dict:
    missed = [f"depth {r['depth']} {r['scheme']}: {name}" for r in rows for name, ok in r["targets"].items() if not ok]
    dyn_bytes, dyn_graph = {}, {}
    for r in rows:
        dyn_bytes.setdefault(r["scheme"], []).append(r["dynamic_onnx"]["bytes"])
        dyn_graph.setdefault(r["scheme"], []).append(r["dynamic_onnx"]["bytes_without_metadata"])
    return {"targets_missed": missed,
            "dynamic_bytes_by_scheme": dyn_bytes,
            "dynamic_bytes_constant_in_depth": {s: len(set(v)) == 1 for s, v in dyn_bytes.items()},
            "dynamic_bytes_max_over_min": {s: round(max(v) / min(v), 6) for s, v in dyn_bytes.items()},
            "dynamic_bytes_without_metadata_constant_in_depth": {s: len(set(v)) == 1 for s, v in dyn_graph.items()}}


def _print_table(result: dict) -> None:
    head = (f"{'depth':>5} {'scheme':>6} | {'static s':>8} {'dyn s':>6} {'ts s':>6} {'dynamo s':>8} {'legacy s':>8} | "
            f"{'static MB':>9} {'dyn MB':>7} | {'torch b1':>8} {'ort b1':>7} {'dyn b1':>7} | {'torch b256':>10} "
            f"{'ort b256':>8} {'dyn b256':>8} | ratios b1 / b256 / dyn:static")
    print(head)

    def stock(e):
        if "skipped" in e:
            return "-"
        return f"{e['export_seconds']:.2f}" + ("!" if e.get("error") else "")

    for r in result["rows"]:
        s, d, t, e = r["static_onnx"], r["dynamic_onnx"], r["torchscript"], r["torch_eager"]
        print(f"{r['depth']:>5} {r['scheme']:>6} | {s['export_seconds']:>8.3f} {d['export_seconds']:>6.3f} "
              f"{t['export_seconds']:>6.3f} {stock(r['stock_dynamo']):>8} {stock(r['stock_legacy']):>8} | "
              f"{s['bytes'] / 1e6:>9.2f} {d['bytes'] / 1e6:>7.2f} | {e['torch_ms_b1']:>8.3f} {s['ort_ms_b1']:>7.3f} "
              f"{d['ort_ms_b1']:>7.3f} | {e['torch_ms_b256']:>10.3f} {s['ort_ms_b256']:>8.3f} {d['ort_ms_b256']:>8.3f} "
              f"| {s['ratio_b1']:.2f}/{d['ratio_b1']:.2f} {s['ratio_b256']:.2f}/{d['ratio_b256']:.2f} "
              f"{d['ratio_to_static_b1']:.2f}/{d['ratio_to_static_b256']:.2f}")
    print("stock '!' = the exporter failed (error in the JSON); targets missed:",
          *(["none"] if not result["summary"]["targets_missed"] else result["summary"]["targets_missed"]), sep="\n  ")


def _git() -> dict:
    """The commit measured, and whether resode_export/ differed from it."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*a):
        done = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--", "resode_export")
    return {"commit": git("rev-parse", "HEAD"), "resode_export_modified": None if status is None else bool(status)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="16,64,256,1024")
    parser.add_argument("--schemes", default="euler,heun")
    parser.add_argument("--knots", type=int, default=16, help="knots of the curve (the same model at every depth)")
    parser.add_argument("--repeats", type=int, default=300, help="most timed calls per latency measurement")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="about this many seconds per latency measurement (at least 3 calls)")
    parser.add_argument("--stock-max-depth", type=int, default=256,
                        help="skip torch.onnx.export above this depth (it takes minutes at 1024)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = sys.stdout
    if args.json:  # the stock exporter prints progress on stdout: keep stdout for the JSON alone
        sys.stdout.flush()
        out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import onnx
    import onnxruntime

    depths = [int(d) for d in args.depths.split(",")]
    schemes = args.schemes.split(",")
    git = _git()  # before the run: the modules measured are the ones imported now
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="resode-export-bench-") as tmp:
        for scheme in schemes:
            cfg = ODENetConfig(arch="mlp", in_shape=(64,), num_classes=10, widths=(64,), depths=(args.knots,),
                               knots=(args.knots,), hidden=64, scheme=scheme)
            base = nontrivial(ODENet(cfg, init="iid", seed=0))
            for depth in depths:
                rows.append(measure_row(base, depth, scheme, args, Path(tmp)))
    log(f"done in {time.perf_counter() - start:.0f} s")
    result = {
        "machine": {"machine": platform.machine(), "processor": platform.processor(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                    "torch_threads": torch.get_num_threads(), "ort_intra_op_threads": 1,
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "git": git,
        "workload": {"arch": "mlp", "in_shape": [64], "width": 64, "hidden": 64, "num_classes": 10, "stages": 1,
                     "knots": args.knots, "interp": "linear",
                     "init": "iid; V knots drawn uniform(±1/sqrt(hidden)) (MLPField.init gives V = 0)", "batches": list(BATCHES),
                     "repeats": args.repeats, "budget_seconds": args.budget, "stock_max_depth": args.stock_max_depth},
        "targets": TARGETS,
        "total_seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    result["summary"] = _summary(rows)
    if args.json:
        out.write(json.dumps(result, indent=1) + "\n")
        out.flush()
    else:
        _print_table(result)


if __name__ == "__main__":
    main()
