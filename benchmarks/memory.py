"""Bytes saved for backward by each gradient method against depth (CPU), and the peak of a step.

    python benchmarks/memory.py --json > benchmarks/results/memory.json

For a ResNet of depth N (N knots, N steps of --scheme; reversible Heun for ``reversible``):

- ``saved_bytes``: the bytes of every tensor that autograd saves for backward during the forward
  pass (``torch.autograd.graph.saved_tensors_hooks``), once per storage, leaving out the model's
  parameters (held by the model whatever the method).
- ``peak_bytes``: the most bytes live at once during one forward + backward, beyond what was
  allocated before it and beyond the parameters' gradients (which every method allocates): the
  CPU counterpart of ``torch.cuda.max_memory_allocated``, from the allocation events of
  ``torch.profiler`` (``profile_memory=True``). It counts the backward's working memory too,
  which ``saved_bytes`` does not.

Targets (issue 3): ``adjoint`` and ``reversible`` at depth 512 within 1.05× of their depth-8
figure; ``backprop`` grows linearly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from resode_export.gradients import GRADIENTS
from resode_export.network import ODENet, ODENetConfig

ARCHS = {
    "mlp": dict(arch="mlp", in_shape=(64,), widths=(32,), hidden=64),
    "conv": dict(arch="conv", in_shape=(16, 16, 16), widths=(16,), groups=4, activation="relu"),
    # an imported-style torchvision stage: relu-projected bottleneck blocks after a transition block
    "resnet": dict(arch="resnet", in_shape=(3, 64, 64), widths=(32,), block="bottleneck", stem_width=16),
}
BATCH = {"mlp": 64, "conv": 16, "resnet": 8}


def saved_bytes(model: ODENet, x: torch.Tensor) -> tuple[int, float]:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).square().sum()
    loss.backward()
    return sum(seen.values()), time.perf_counter() - start


def peak_bytes(model: ODENet, x: torch.Tensor) -> int:
    """Peak bytes live during one forward + backward, beyond those live before it and the gradients'
    buffers (found by address: the last allocation at each gradient's address, never freed)."""
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x).square().sum().backward()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    events = [e["args"] for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])]
    # the gradients' buffers are the last allocations at their addresses (never freed): left out of the count
    grad_ptrs = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    last = {a["Addr"]: i for i, a in enumerate(events) if a["Bytes"] > 0 and a["Addr"] in grad_ptrs}
    skip = set(last.values())
    live = peak = 0
    for i, a in enumerate(events):
        if i not in skip:
            live += a["Bytes"]
            peak = max(peak, live)
    model.zero_grad(set_to_none=True)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="8,32,128,512")
    parser.add_argument("--methods", default=",".join(GRADIENTS))
    parser.add_argument("--archs", default="mlp,conv,resnet")
    parser.add_argument("--scheme", default="euler")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for arch in args.archs.split(","):
        for depth in (int(d) for d in args.depths.split(",")):
            config = ODENetConfig(**ARCHS[arch], num_classes=10, depths=(depth,), scheme=args.scheme)
            model = ODENet(config, init="iid")
            x = torch.randn(BATCH[arch], *config.in_shape)
            for method in args.methods.split(","):
                if method == "reversible" and arch == "resnet":
                    continue  # the relu projection cannot be undone: no reversible scheme for these blocks
                scheme = "reversible_heun" if method == "reversible" else args.scheme
                discrete = model.discretize(scheme=scheme, grad=method)
                nbytes, seconds = saved_bytes(discrete, x)
                rows.append({"method": method, "arch": arch, "depth": depth, "scheme": scheme,
                             "batch": BATCH[arch], "saved_bytes": nbytes, "peak_bytes": peak_bytes(discrete, x),
                             "seconds": round(seconds, 3)})
    if args.json:
        command = "python benchmarks/memory.py " + " ".join(sys.argv[1:])
        print(json.dumps({"command": command, "torch": torch.__version__, "rows": rows}, indent=1))
        return
    table = Table("arch", "method", "depth", "saved MiB", "peak MiB", "s")
    for r in rows:
        table.add_row(r["arch"], r["method"], str(r["depth"]), f"{r['saved_bytes'] / 2**20:.2f}",
                      f"{r['peak_bytes'] / 2**20:.2f}", str(r["seconds"]))
    Console().print(table)


if __name__ == "__main__":
    main()
