"""Accuracy and output deviation of the shipped models re-discretized at depth × scheme.

    python benchmarks/convert_sweep.py --json > benchmarks/results/convert_sweep.json

Each row is what ``resode convert MODEL --depth D --scheme S --json`` reports (full test split
unless --limit), so the numbers can be checked one by one with the CLI.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from rich.console import Console
from rich.table import Table

from resode_export.convert import compare, dataset_for, load_model
from resode_export.evaluate import progress_bar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits-mlp,fashion-conv")
    parser.add_argument("--depths", default="8,16,32,64,128")
    parser.add_argument("--schemes", default="euler,heun,rk4")
    parser.add_argument("--limit", type=int, default=None, help="first N test samples only")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    rows = []
    with progress_bar() as bar:
        for name in args.models.split(","):
            source, header, path = load_model(name)
            data = dataset_for(header)
            for scheme in args.schemes.split(","):
                for depth in (int(d) for d in args.depths.split(",")):
                    start = time.perf_counter()
                    report = compare(source, source.discretize(depth, scheme), data, args.limit, progress=bar)
                    rows.append({"model": name, "source_depth": list(source.config.depths),
                                 "source_scheme": source.config.scheme, "depth": depth, "scheme": scheme,
                                 "interp": source.config.interp, **report,
                                 "seconds": round(time.perf_counter() - start, 2)})
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    table = Table("model", "depth", "scheme", "source acc.", "acc.", "max rel. dev.", "mean rel. dev.", "s")
    for r in rows:
        table.add_row(r["model"], str(r["depth"]), r["scheme"], f"{100 * r['source_accuracy']:.2f}",
                      f"{100 * r['accuracy']:.2f}", f"{r['max_rel_deviation']:.2e}", f"{r['mean_rel_deviation']:.2e}",
                      f"{r['seconds']}")
    Console().print(table)


if __name__ == "__main__":
    main()
