"""Helpers the experiment scripts share (each script runs as ``python experiments/<script>.py``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x)."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def run_footer(seconds: float, files: list[str], command: str) -> list[str]:
    """The closing lines of an experiment's markdown: run time, files written, the command that reproduces it."""
    return ["", f"Run time: {seconds:.0f} s on CPU ({torch.get_num_threads()} thread, torch {torch.__version__}). "
            f"Files: {', '.join(f'`{f}`' for f in files)}.", "", "Command:", "", "```", command, "```", ""]


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Rows of dicts to a CSV file, the first row's keys as the header."""
    with Path(path).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
