"""``resode check``: accuracy, deviation and latency of exported graphs against depth, in onnxruntime.

For a resode model, every depth × scheme is exported to a static ONNX graph, run on the test
split in onnxruntime (one thread, as a CPU server would pin it) and compared with the PyTorch
model at that depth and scheme. For a dynamic-depth ``.onnx`` file, the same file is swept over
the depths. The recommendation is the lowest-latency (batch 1) row whose accuracy is within
``tolerance`` points of the source model's. :func:`search_stage_depths` searches a depth per stage
instead (greedily, halving one stage at a time), for ``export --depth a,b,c``.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .data import Dataset, check_samples
from .errors import ResodeError, check_choice, one_line
from .evaluate import accuracy, predict, relative_deviation
from .export import onnx_session, run_onnx
from .io import atomic_write
from .network import ODENet, check_depth
from .schemes import SCHEMES


def latency_ms(session, sample: np.ndarray, depth: int | None, repeats: int, budget_s: float = 1.0) -> float:
    """Median milliseconds of one call on ``sample`` (after a warm-up), at most ~``budget_s`` seconds."""
    run_onnx(session, sample, depth, batch_size=len(sample))
    times = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run_onnx(session, sample, depth, batch_size=len(sample))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _row(session, x: np.ndarray, y: torch.Tensor, depth: int | None, repeats: int) -> tuple[dict, torch.Tensor]:
    logits = torch.from_numpy(run_onnx(session, x, depth))
    row = {"accuracy": accuracy(logits, y),
           "latency_ms_b1": round(latency_ms(session, x[:1], depth, repeats), 4),
           "latency_ms_b256": round(latency_ms(session, np.resize(x, (256, *x.shape[1:])), depth, max(3, repeats // 10)), 4)}
    return row, logits


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is bad input
        raise ResodeError(f"{path} is not a readable ONNX file ({type(exc).__name__}); give a .onnx file from "
                          "resode export or a resode checkpoint") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if "resode.scheme" not in meta:
        raise ResodeError(f"{path} was not made by resode export (no resode metadata); check sweeps resode's own "
                          "graphs only")
    # resode's graphs take "input" (and "depth") and give "logits"; metadata alone can be forged
    inputs = {i.name for i in proto.graph.input} - {t.name for t in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}
    depths = meta.get("resode.depths", "")
    if (inputs not in ({"input"}, {"input", "depth"}) or outputs != {"logits"}
            or not re.fullmatch(r"[1-9][0-9]{0,8}(,[1-9][0-9]{0,8})*", depths)
            or meta.get("resode.dynamic_depth") not in ("true", "false")):
        raise ResodeError(f"{path} carries resode metadata but is not a graph resode export wrote (inputs "
                          f"{sorted(inputs)}, outputs {sorted(outputs)}, depths {depths!r}); export it again with "
                          "resode export")
    return meta


def recommend(rows: list[dict], source_accuracy: float, tolerance: float) -> dict | None:
    ok = [r for r in rows if r["accuracy"] >= source_accuracy - tolerance / 100 - 1e-12]
    if not ok:
        return None
    best = min(ok, key=lambda r: (r["latency_ms_b1"], r["latency_ms_b256"], r["depth"]))
    return {"depth": best["depth"], "scheme": best["scheme"], "accuracy": best["accuracy"],
            "latency_ms_b1": best["latency_ms_b1"]}


def check_model(model: ODENet, data: Dataset, depths: list[int], schemes: list[str], tolerance: float,
                repeats: int = 50, limit: int | None = None, progress=None) -> dict:
    """Sweep depth × scheme of a resode model through static ONNX graphs."""
    import onnx

    from .export.onnx_graph import static_graph

    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model keeps its dtype, device and mode
    x_t, y = data.x_test[:limit].float(), data.y_test[:limit]
    check_samples(x_t.shape[1:], model.config.in_shape)
    source_accuracy = accuracy(predict(model, x_t), y)
    x = x_t.numpy()
    rows = []
    task = progress.add_task("checking", total=len(depths) * len(schemes)) if progress else None
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in schemes:
            for depth in depths:
                target = model.discretize(depth=depth, scheme=scheme, grad="backprop")
                path = Path(tmp) / f"{scheme}-{depth}.onnx"
                onnx.save_model(static_graph(target), str(path))
                session = onnx_session(path)
                row, logits = _row(session, x, y, None, repeats)
                dev = relative_deviation(logits, predict(target, x_t))
                rows.append({"depth": depth, "scheme": scheme, **row, "max_rel_deviation": float(dev.max()),
                             "bytes": path.stat().st_size})
                if progress:
                    progress.advance(task)
    return {"source_accuracy": source_accuracy, "source_depth": list(model.config.depths),
            "source_scheme": model.config.scheme, "reference": "the PyTorch model", "dynamic_depth": False,
            "test_samples": len(y), "rows": rows,
            "recommended": recommend(rows, source_accuracy, tolerance), "tolerance": tolerance}


def check_onnx(path: Path, data: Dataset, depths: list[int], tolerance: float, repeats: int = 50,
               limit: int | None = None, progress=None) -> dict:
    """Sweep a resode ``.onnx`` file: a dynamic-depth graph over ``depths``, a static one at its own depth."""
    meta = _onnx_metadata(path)
    try:
        session = onnx_session(path)
    except ResodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a file onnxruntime cannot load is bad input
        message = one_line(str(exc))
        raise ResodeError(f"onnxruntime cannot load {path.name} ({message}); export it again with resode "
                          "export") from None
    in_shape = tuple(session.get_inputs()[0].shape[1:])
    x_t, y = data.x_test[:limit].float(), data.y_test[:limit]
    check_samples(x_t.shape[1:], in_shape, model=path.name)
    x = x_t.numpy()
    dynamic = meta.get("resode.dynamic_depth") == "true"
    native = [int(d) for d in meta["resode.depths"].split(",")]
    scheme = meta["resode.scheme"]
    sweep = depths if dynamic else [None]
    rows = []
    task = progress.add_task("checking", total=len(sweep)) if progress else None
    for depth in sweep:
        row, _ = _row(session, x, y, depth, repeats)
        rows.append({"depth": depth if dynamic else (native[0] if len(set(native)) == 1 else native), "scheme": scheme,
                     **row, "max_rel_deviation": None, "bytes": path.stat().st_size})
        if progress:
            progress.advance(task)
    if not dynamic:  # the file is its own reference
        source_accuracy, reference = rows[0]["accuracy"], "the file itself"
    elif len(set(native)) == 1:  # the exported model's own depth
        source_accuracy = accuracy(torch.from_numpy(run_onnx(session, x, native[0])), y)
        reference = f"the file at its native depth {native[0]}"
    else:  # one run-time depth cannot give blocks of different native depths: the finest sweep is the reference
        deepest = max(rows, key=lambda r: r["depth"])
        source_accuracy, reference = deepest["accuracy"], f"the file at depth {deepest['depth']} (deepest swept)"
    return {"source_accuracy": source_accuracy, "source_depth": native, "source_scheme": scheme,
            "reference": reference, "dynamic_depth": dynamic, "test_samples": len(y), "rows": rows,
            "recommended": recommend(rows, source_accuracy, tolerance), "tolerance": tolerance}


def _greedy(start: tuple[int, ...], evaluate, floor: float) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Greedy per-stage halving from ``start``: (the path taken, every depth tuple tried, in order).

    ``evaluate(depths)`` gives (accuracy, latency). Each round tries every stage with depth > 1 halved
    (rounded up: 3 → 2, so no depth is skipped), the others kept; of the candidates with accuracy >= ``floor`` it moves to the
    one of lowest latency; it stops when none qualifies. Every tuple is evaluated once.
    """
    tried, path, current = [start], [start], start
    evaluate(start)
    while True:
        candidates = [current[:i] + ((d + 1) // 2,) + current[i + 1:] for i, d in enumerate(current) if d > 1]
        for c in candidates:
            if c not in tried:
                tried.append(c)
        scores = {c: evaluate(c) for c in candidates}
        ok = [c for c in candidates if scores[c][0] >= floor]
        if not ok:
            return path, tried
        current = min(ok, key=lambda c: (scores[c][1], sum(c), c))
        path.append(current)


def search_stage_depths(model: ODENet, data: Dataset, tolerance: float, scheme: str | None = None,
                        start: tuple[int, ...] | None = None, repeats: int = 50, limit: int | None = None,
                        progress=None) -> dict:
    """The fastest depth per stage (onnxruntime, batch 1) within ``tolerance`` accuracy points of ``start``.

    The reference is the model at ``start`` (default its native depths) with ``scheme`` (default its own),
    run like every candidate: a static ONNX graph in onnxruntime, one thread, on ``data.x_test[:limit]``.
    From ``start``, each round halves one stage (see :func:`_greedy`), keeping the candidate of lowest
    batch-1 latency whose accuracy is at least the reference's minus ``tolerance`` / 100; the search stops
    when no candidate qualifies, and recommends where it stopped (every step removes steps of the solve).
    """
    import onnx

    from .export.onnx_graph import static_graph
    from .resources import check_static_export

    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ResodeError(f"the tolerance must be a finite number of accuracy points >= 0, got {tolerance!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ResodeError(f"repeats must be a positive integer (timed calls per latency), got {repeats!r}")
    scheme = check_choice("scheme", scheme or model.config.scheme, SCHEMES)
    stages = len(model.blocks)
    native = tuple(model.config.depths)
    if start is None:
        start = native
    else:
        try:
            start = tuple(start)
        except TypeError:
            raise ResodeError(f"start needs one depth per stage ({stages}), got {start!r}") from None
        if len(start) != stages:
            raise ResodeError(f"start has {len(start)} depths for a model with {stages} stages (native depths "
                              f"{','.join(map(str, native))}); give one depth per stage")
        for d in start:
            check_depth(d)
    x_t, y = data.x_test[:limit].float(), data.y_test[:limit]
    if len(y) == 0:
        raise ResodeError("no test samples to measure accuracy on; give data with a test split (and --limit >= 1)")
    check_samples(x_t.shape[1:], model.config.in_shape)
    check_static_export(model, start, scheme)  # the deepest graph of the search, refused before any work
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model keeps its dtype, device and mode
    x = x_t.numpy()
    results: dict[tuple[int, ...], dict] = {}
    task = progress.add_task("searching stage depths", total=None) if progress else None

    with tempfile.TemporaryDirectory() as tmp:
        def evaluate(depths: tuple[int, ...]) -> tuple[float, float]:
            if depths not in results:
                target = model.discretize(depth=depths, scheme=scheme, grad="backprop")
                path = Path(tmp) / f"{'-'.join(map(str, depths))}.onnx"
                onnx.save_model(static_graph(target), str(path))
                session = onnx_session(path)
                results[depths] = {"depths": list(depths),
                                   "accuracy": accuracy(torch.from_numpy(run_onnx(session, x)), y),
                                   "latency_ms_b1": round(latency_ms(session, x[:1], None, repeats), 4)}
                del session
                path.unlink()
                if progress:
                    progress.advance(task)
            return results[depths]["accuracy"], results[depths]["latency_ms_b1"]

        reference = evaluate(start)[0]
        path, tried = _greedy(start, evaluate, reference - tolerance / 100 - 1e-12)
    if progress:
        progress.update(task, total=len(results))
    kept = set(path)
    best, first = results[path[-1]], results[start]
    speedup = first["latency_ms_b1"] / best["latency_ms_b1"] if best["latency_ms_b1"] > 0 else None
    return {"scheme": scheme, "start_depths": list(start), "reference_accuracy": reference, "tolerance": tolerance,
            "test_samples": len(y), "tried": [{**results[d], "kept": d in kept} for d in tried],
            "recommended": {**best, "speedup": round(speedup, 4) if speedup is not None else None}}


def plot(result: dict, path: str | Path, title: str) -> Path:
    """Accuracy and latency against depth, one line per scheme, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    schemes = sorted({r["scheme"] for r in result["rows"]})
    for i, scheme in enumerate(schemes):
        rows = sorted((r for r in result["rows"] if r["scheme"] == scheme), key=lambda r: r["depth"])
        d = [r["depth"] for r in rows]
        ax_acc.plot(d, [100 * r["accuracy"] for r in rows], "o-", color=f"C{i}", label=scheme)
        ax_lat.plot(d, [r["latency_ms_b1"] for r in rows], "o-", color=f"C{i}", label=f"{scheme}, batch 1")
        ax_lat.plot(d, [r["latency_ms_b256"] for r in rows], "s--", color=f"C{i}", label=f"{scheme}, batch 256")
    ax_acc.axhline(100 * result["source_accuracy"], color="k", ls=":", label="source model")
    rec = result.get("recommended")
    if rec:
        ax_acc.plot([rec["depth"]], [100 * rec["accuracy"]], "r*", ms=14, label=f"recommended: {rec['scheme']} {rec['depth']}")
    for ax in (ax_acc, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("depth (steps per ODE block)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_acc.set_ylabel("test accuracy (%)")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("onnxruntime latency (ms, median, 1 thread)")
    fig.suptitle(title)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out


__all__ = ["check_model", "check_onnx", "plot", "recommend", "search_stage_depths"]
