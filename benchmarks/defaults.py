"""What `resode train` reaches with its default options (the commands of issue 15, item 6).

    python benchmarks/defaults.py --json > benchmarks/results/defaults.json

1. ``resode train --arch mlp --data digits --depth 64 --scheme heun --epochs 5`` (and with --adjoint);
2. ``resode train --arch conv --data X.npz --depth 32 --scheme heun --adjoint --epochs 3`` on an MNIST-like
   .npz of uint8 images: the first 4000 Fashion-MNIST training images and the first 1000 test images, as
   stored by Debian (raw 0-255 pixels; resode scales integer pixels to [0, 1]).

Every other option at its default. Each runs in a subprocess (the CLI itself), on this machine's CPU.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FASHION = Path(os.environ.get("RESODE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def _idx(name: str) -> np.ndarray:
    with gzip.open(FASHION / f"{name}.gz") as fh:
        raw = fh.read()
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3])]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(dims)


def mnist_like(path: Path) -> Path:
    x, y = _idx("train-images-idx3-ubyte"), _idx("train-labels-idx1-ubyte")
    xt, yt = _idx("t10k-images-idx3-ubyte"), _idx("t10k-labels-idx1-ubyte")
    np.savez(path, x_train=x[:4000, None], y_train=y[:4000].astype(np.int64), x_test=xt[:1000, None],
             y_test=yt[:1000].astype(np.int64))
    return path


def run(args: list[str], folder: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "resode_export", "train", *args, "--out", str(folder / "m.safetensors"),
                           "--json"], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"resode train {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    result = json.loads(proc.stdout)
    log = [json.loads(line) for line in (folder / "m.log.jsonl").read_text().splitlines()]
    return {"command": "resode train " + " ".join(args), "test_accuracy": result["test_accuracy"],
            "test_accuracy_per_epoch": [r["test_accuracy"] for r in log], "loss_per_epoch": [r["loss"] for r in log],
            "seconds": round(time.perf_counter() - start, 1), "device": result["device"],
            "warnings": [line for line in proc.stderr.splitlines() if line.startswith(("warning", "note"))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-conv", action="store_true", help="only the digits commands (seconds, not minutes)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        commands = [["--arch", "mlp", "--data", "digits", "--depth", "64", "--scheme", "heun", "--epochs", "5"],
                    ["--arch", "mlp", "--data", "digits", "--depth", "64", "--scheme", "heun", "--epochs", "5",
                     "--adjoint"]]
        if not args.skip_conv:
            data = mnist_like(tmp / "X.npz")
            commands.append(["--arch", "conv", "--data", str(data), "--depth", "32", "--scheme", "heun", "--adjoint",
                             "--epochs", "3"])
        for i, command in enumerate(commands):
            folder = tmp / str(i)
            folder.mkdir()
            rows.append(run(command, folder))
            rows[-1]["command"] = rows[-1]["command"].replace(str(tmp / "X.npz"), "X.npz")
    result = {"rows": rows, "machine": f"{platform.machine()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for r in rows:
        print(f"{100 * r['test_accuracy']:.2f} %  {r['seconds']} s  {r['command']}")


if __name__ == "__main__":
    main()
