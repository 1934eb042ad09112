"""Test accuracy of models trained with the memory-free adjoint against backprop, by depth.

    python benchmarks/adjoint_accuracy.py --json > benchmarks/results/adjoint_accuracy-digits.json

Each row trains the same architecture from the same smooth initialization and seed with one
gradient method (the ``resode train`` defaults otherwise), so the rows differ only by the gradient.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time

import torch

from resode_export.data import load_data
from resode_export.network import ODENet, ODENetConfig
from resode_export.train import TrainOptions, train

ARCHS = {
    "mlp": dict(arch="mlp", widths=(32,), hidden=64, activation="gelu"),
    "conv": dict(arch="conv", widths=(16, 32), stem_stride=2, activation="relu"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--arch", default="mlp", choices=list(ARCHS))
    parser.add_argument("--depths", default="16,64,256")
    parser.add_argument("--schemes", default="euler,heun")
    parser.add_argument("--methods", default="backprop,adjoint")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    data = load_data(args.data)
    rows = []
    for scheme in args.schemes.split(","):
        for depth in (int(d) for d in args.depths.split(",")):
            for method in args.methods.split(","):
                n_stages = len(ARCHS[args.arch]["widths"])
                config = ODENetConfig(**ARCHS[args.arch], in_shape=data.in_shape, num_classes=data.num_classes,
                                      depths=(depth,) * n_stages, scheme=scheme, grad=method)
                start = time.perf_counter()
                _, record = train(ODENet(config, seed=0), data, TrainOptions(
                    epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device), show_progress=False)
                rows.append({"data": args.data, "arch": args.arch, "scheme": scheme, "depth": depth, "grad": method,
                             "test_accuracy": record["metrics"]["test_accuracy"],
                             "train_loss": record["metrics"]["train_loss"],
                             "seconds": round(time.perf_counter() - start, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    gpu = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else None
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "device": gpu or "cpu", "command": "python " + shlex.join(sys.argv),
                          "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for r in rows:
        print(f"{r['scheme']:>6} depth {r['depth']:>4} {r['grad']:>9}: test accuracy {100 * r['test_accuracy']:.2f} %")


if __name__ == "__main__":
    main()
