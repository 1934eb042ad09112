"""``resode check``: accuracy, deviation and latency of exported graphs against depth, in onnxruntime.

For a resode model, every depth × scheme is exported to a static ONNX graph, run on the test
split in onnxruntime (one thread, as a CPU server would pin it) and compared with the PyTorch
model at that depth and scheme. For a dynamic-depth ``.onnx`` file, the same file is swept over
the depths. The recommendation is the lowest-latency (batch 1) row whose accuracy is within
``tolerance`` points of the source model's.
"""

from __future__ import annotations

import copy
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .data import Dataset, check_samples
from .errors import ResodeError, one_line
from .evaluate import accuracy, predict, relative_deviation
from .export import onnx_session, run_onnx
from .io import atomic_write
from .network import ODENet


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


__all__ = ["check_model", "check_onnx", "plot", "recommend"]
