"""Deployment trade-off of the shipped models: test accuracy against onnxruntime latency, Pareto front.

    OMP_NUM_THREADS=1 python experiments/deployment_pareto.py               # from the committed check JSONs (~4 s)
    OMP_NUM_THREADS=1 python experiments/deployment_pareto.py --recompute   # rerun resode check's sweep (~270 s)
    OMP_NUM_THREADS=1 python experiments/deployment_pareto.py --smoke       # CI: digits-mlp, depths 4 and 32, euler

For each shipped model the rows are every depth × scheme of ``resode check`` (static ONNX graph,
onnxruntime on one thread): accuracy on the test split and median latency at batch 1 and 256.
By default they are read from ``benchmarks/results/check-<model>.json`` (written by
``resode check MODEL --json``); ``--recompute`` calls ``resode_export.check.check_model`` on the
shipped model instead (with the committed file's depths, schemes and test-sample limit unless given).

A row is on the Pareto front (accuracy against batch-1 latency) when no other row is at least as
fast and at least as accurate, and strictly better in one of the two. Checked: the recommendation
of ``resode check`` (fastest row within --tolerance points of the source accuracy) is on the front
and faster than the model's own discretization. Writes deployment_pareto.{csv,png,md} under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch

from resode_export.check import recommend

NAME = "deployment_pareto"
ROOT = Path(__file__).resolve().parents[1]
MODELS = ("digits-mlp", "fashion-conv")


def pareto_front(rows: list[dict], x: str = "latency_ms_b1", y: str = "accuracy") -> list[bool]:
    """on_front[i]: no row is at least as fast and as accurate as row i and strictly better in one."""
    return [not any(s[x] <= r[x] and s[y] >= r[y] and (s[x] < r[x] or s[y] > r[y]) for s in rows) for r in rows]


def committed(model: str, results_dir: Path) -> dict | None:
    path = results_dir / f"check-{model}.json"
    return json.loads(path.read_text()) if path.exists() else None


def recompute(model: str, depths: list[int] | None, schemes: list[str] | None, limit: int | None, repeats: int,
              tolerance: float, results_dir: Path) -> dict:
    from resode_export.check import check_model
    from resode_export.convert import dataset_for, load_model

    ref = committed(model, results_dir) or {}
    ref_rows = ref.get("rows", [])
    depths = depths or sorted({r["depth"] for r in ref_rows}) or [2, 4, 8, 16, 32, 64, 128]
    schemes = schemes or list(dict.fromkeys(r["scheme"] for r in ref_rows)) or ["euler", "heun", "rk4"]
    limit = limit if limit is not None else ref.get("test_samples")
    net, header, path = load_model(model)
    start = time.perf_counter()
    result = check_model(net, dataset_for(header), depths, schemes, tolerance, repeats=repeats, limit=limit)
    result.update(model=str(path), seconds=round(time.perf_counter() - start, 2))
    return result


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6.2 * len(results), 8.4), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1]})
    markers = {"euler": "o", "heun": "s", "rk4": "^"}
    for col, (model, res) in enumerate(results.items()):
        rows, src = res["rows"], 100 * res["source_accuracy"]
        front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["latency_ms_b1"])
        for row_i, ax in enumerate(axes[:, col]):
            for i, scheme in enumerate(dict.fromkeys(r["scheme"] for r in rows)):
                sel = [r for r in rows if r["scheme"] == scheme]
                ax.scatter([r["latency_ms_b1"] for r in sel], [100 * r["accuracy"] for r in sel], s=36,
                           marker=markers.get(scheme, "D"), color=f"C{i}", label=scheme, zorder=3)
                for r in sel:
                    ax.annotate(str(r["depth"]), (r["latency_ms_b1"], 100 * r["accuracy"]), fontsize=7,
                                xytext=(4, -9), textcoords="offset points", color=f"C{i}")
            ax.step([r["latency_ms_b1"] for r in front], [100 * r["accuracy"] for r in front], where="post",
                    color="k", lw=1.5, zorder=2, label="Pareto front")
            ax.scatter([r["latency_ms_b1"] for r in front], [100 * r["accuracy"] for r in front], s=140,
                       facecolors="none", edgecolors="k", lw=1.5, zorder=4)
            ax.axhline(src, color="gray", ls=":", label=f"source ({'+'.join(map(str, res['source_depth']))} "
                       f"{res['source_scheme']}): {src:.2f} %")
            ax.axhspan(src - res["tolerance"], src, color="gray", alpha=0.12,
                       label=f"within {res['tolerance']} points")
            rec = res.get("recommended")
            if rec:
                ax.plot([rec["latency_ms_b1"]], [100 * rec["accuracy"]], "r*", ms=15, zorder=5,
                        label=f"recommended: {rec['scheme']} {rec['depth']}")
            ax.set_xscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_xlabel("onnxruntime latency, batch 1 (ms, median, 1 thread)")
            ax.set_ylabel("test accuracy (%)")
            if row_i == 0:
                ax.set_title(f"{model} ({res['test_samples']} test samples; numbers: depth)")
                ax.legend(fontsize=7, loc="lower right")
            else:
                ax.set_ylim(src - 3, min(100, max(100 * r["accuracy"] for r in rows) + 0.8))
                ax.set_title(f"{model}: zoom on the top 3 points")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny run for CI: recompute digits-mlp at depths 4 and 32, euler, repeats 3")
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    parser.add_argument("--models", default=None, help=f"comma list (default {','.join(MODELS)}; smoke digits-mlp)")
    parser.add_argument("--recompute", action="store_true", help="rerun check_model instead of reading the JSON")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where check-<model>.json are read from")
    parser.add_argument("--depths", default=None, help="with --recompute (default: the committed file's)")
    parser.add_argument("--schemes", default=None, help="with --recompute (default: the committed file's)")
    parser.add_argument("--limit", type=int, default=None, help="with --recompute: first N test samples")
    parser.add_argument("--repeats", type=int, default=None, help="with --recompute: latency repeats (default 50)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="accuracy points for the recommendation (default: the file's, else 0.5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        args.recompute = True
        args.models = args.models or "digits-mlp"
        args.depths = args.depths or "4,32"  # 32: digits-mlp's own depth
        args.schemes = args.schemes or "euler"
        args.repeats = args.repeats or 3
    models = (args.models or ",".join(MODELS)).split(",")
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    results: dict[str, dict] = {}
    for model in models:
        if args.recompute:
            res = recompute(model, [int(d) for d in args.depths.split(",")] if args.depths else None,
                            args.schemes.split(",") if args.schemes else None, args.limit, args.repeats or 50,
                            args.tolerance if args.tolerance is not None else 0.5, args.results_dir)
            res["origin"] = f"recomputed by check_model ({res['seconds']} s)"
            (args.out / f"{NAME}-{model}.json").write_text(json.dumps(res, indent=1))
        else:
            res = committed(model, args.results_dir)
            if res is None:
                raise SystemExit(f"{args.results_dir}/check-{model}.json is missing; run with --recompute")
            res["origin"] = os.path.relpath((args.results_dir / f"check-{model}.json").resolve(), ROOT)
        tol = args.tolerance if args.tolerance is not None else res.get("tolerance", 0.5)
        res["tolerance"] = tol
        res["recommended"] = recommend(res["rows"], res["source_accuracy"], tol)
        for row, flag in zip(res["rows"], pareto_front(res["rows"])):
            row["on_front"] = flag
        results[model] = res
        print(f"{model}: {len(res['rows'])} rows from {res['origin']}", flush=True)

    csv_path, png_path, md_path = (args.out / f"{NAME}.{ext}" for ext in ("csv", "png", "md"))
    fields = ["model", "depth", "scheme", "accuracy", "latency_ms_b1", "latency_ms_b256", "bytes",
              "max_rel_deviation", "source_accuracy", "on_front", "recommended"]
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for model, res in results.items():
            rec = res["recommended"] or {}
            for r in res["rows"]:
                writer.writerow({"model": model, **{k: r.get(k) for k in fields[1:8]},
                                 "source_accuracy": res["source_accuracy"], "on_front": r["on_front"],
                                 "recommended": (r["depth"], r["scheme"]) == (rec.get("depth"), rec.get("scheme"))})
    plot(results, png_path)
    total = time.perf_counter() - start  # reading or recomputing, CSV and PNG

    sections, verdicts, summary_lines = [], [], []
    for model, res in results.items():
        rows, src_acc = res["rows"], res["source_accuracy"]
        rec = res["recommended"]
        src_depth, src_scheme = res["source_depth"], res["source_scheme"]
        native = next((r for r in rows if r["scheme"] == src_scheme and r["depth"] == src_depth[0]
                       and len(set(src_depth)) == 1), None)
        rec_row = next((r for r in rows if rec and (r["depth"], r["scheme"]) == (rec["depth"], rec["scheme"])), None)
        front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["latency_ms_b1"])
        table = ["| depth | scheme | accuracy | Δ vs source (points) | batch-1 ms | batch-256 ms | on front |",
                 "|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: r["latency_ms_b1"]):
            mark = " ← recommended" if r is rec_row else (" ← source discretization" if r is native else "")
            table.append(f"| {r['depth']} | {r['scheme']} | {100 * r['accuracy']:.2f} % | "
                         f"{100 * (r['accuracy'] - src_acc):+.2f} | {r['latency_ms_b1']:.4g} | "
                         f"{r['latency_ms_b256']:.4g} | {'**yes**' if r['on_front'] else 'no'}{mark} |")
        ok_front = rec_row is not None and rec_row["on_front"]
        ok_fast = rec_row is not None and native is not None and rec_row["latency_ms_b1"] <= native["latency_ms_b1"]
        verdicts.append(ok_front and ok_fast)
        if rec_row and native:
            s1 = native["latency_ms_b1"] / rec_row["latency_ms_b1"]
            s256 = native["latency_ms_b256"] / rec_row["latency_ms_b256"]
            speed = (f"{s1:.2f}× faster at batch 1 and {s256:.2f}× at batch 256 than the source discretization "
                     f"({native['scheme']} {native['depth']}: {native['latency_ms_b1']:.4g} ms, "
                     f"{100 * native['accuracy']:.2f} %)")
        else:
            speed = "no row of the source discretization to compare with (not swept)"
        rec_text = (f"{rec_row['scheme']} depth {rec_row['depth']}: {100 * rec_row['accuracy']:.2f} % "
                    f"({100 * (rec_row['accuracy'] - src_acc):+.2f} points), {rec_row['latency_ms_b1']:.4g} ms; "
                    f"on the front: {'yes' if ok_front else 'no'}; {speed}" if rec_row else
                    f"none (no row within {res['tolerance']} points)")
        front_text = ", ".join(f"{r['scheme']} {r['depth']} ({100 * r['accuracy']:.2f} %, {r['latency_ms_b1']:.4g} ms)"
                               for r in front)
        summary_lines.append(f"{model}: source {100 * src_acc:.2f} %; front ({len(front)}/{len(rows)} rows): {front_text}\n"
                             f"  recommended: {rec_text}")
        sections.append(f"""### {model}

Rows: {res['origin']}; {res['test_samples']} test samples; source model {'+'.join(map(str, src_depth))} steps
{src_scheme}, accuracy {100 * src_acc:.2f} %.

Pareto front ({len(front)} of {len(rows)} rows): {front_text}.

Recommendation (fastest within {res['tolerance']} points): {rec_text}.

{chr(10).join(table)}
""")
    agree = all(verdicts)
    command = " ".join(["OMP_NUM_THREADS=1", "python", "experiments/deployment_pareto.py", *sys.argv[1:]])
    md = f"""# Deployment trade-off: accuracy against onnxruntime latency{' (smoke run)' if args.smoke else ''}

**Claim** (resode's premise, Sander et al. 2022; README "Export: `resode export` and `resode check`"):
the shipped models' weights are smooth curves in depth, so they can be deployed re-discretized at another
depth and scheme; `resode check` recommends the lowest batch-1 latency depth × scheme whose accuracy stays
within the tolerance of the source model's. Checked here: that recommendation lies on the accuracy–latency
Pareto front (no row at least as fast and as accurate) and is faster than the model's own discretization.

**Measured** (a row is on the front when no other row is at least as fast and at least as accurate, and
strictly better in one; latencies are medians on one onnxruntime thread):

{chr(10).join(sections)}
**Command** ({total:.1f} s):

```
{command}
```

**Agreement**: {'yes' if agree else 'NO'} ({', '.join(f'{m}: {"yes" if v else "no"}' for m, v in zip(results, verdicts))}):
the recommendation is on the front and at least as fast as the source discretization.
"""
    md_path.write_text(md)
    print()
    print("\n".join(summary_lines))
    print(f"\nagreement: {'yes' if agree else 'NO'}  (total {total:.1f} s)")
    print(f"wrote {csv_path}, {png_path}, {md_path}")


if __name__ == "__main__":
    main()
