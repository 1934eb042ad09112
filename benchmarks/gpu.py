"""Peak GPU memory and step time of each gradient method against depth (issue 3's workload).

    python benchmarks/gpu.py --json > benchmarks/results/gpu-<device>.json

One ODE stage of a 64-channel conv field on 32×32 inputs, batch 128, depths 8..512 (one knot per
step: a ResNet of that depth). For each method: ``torch.cuda.max_memory_allocated`` over one
forward + backward (after a warm-up), and the median time of ``--repeats`` CUDA-synchronized
forward + backward steps; beside them torchdiffeq's ``odeint_adjoint`` (fixed-step Euler on the
same field and weights) where torchdiffeq is installed. Every row also gives the weights' bytes and
``peak_above_weights_bytes`` = peak − 2 × weights: what the method holds beyond the weights and
their gradients, which every method has and which grow with depth in any ResNet (one knot per
step); that is the figure that must stay flat. ``step_peak_bytes`` = peak − bytes allocated before
the step, read while the previous step's gradients are still held (the step frees them first): the
step's own working memory for methods that allocate the gradients before their peak (the adjoints,
reversible); for backprop it understates by at most the weights' bytes. Each row is measured alone
(the previous row's model freed).
Before the first row, one matrix product forward and backward: cuBLAS allocates a workspace through
PyTorch's allocator for each thread's handle on first use (the caller's and autograd's backward
thread: 32 MiB each on an H100) and keeps it for the process, so it is counted in every row rather
than only from the first row whose method multiplies matrices (``cublas_workspace_bytes``).
``--device cpu`` with small sizes is a smoke test of the script itself (memory is then not measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
from torch import nn

from resode_export.curves import Curve
from resode_export.fields import ConvField
from resode_export.network import ODEBlock

METHODS = ("backprop", "checkpoint", "adjoint", "adjoint_fast", "symplectic", "reversible")


class _TorchdiffeqField(nn.Module):
    """f(t, x) for torchdiffeq: the same field, weights sampled from the same curve at t."""

    def __init__(self, block: ODEBlock):
        super().__init__()
        self.block = block

    def forward(self, t, x):
        return self.block.field(x, self.block.curve(float(t.detach())))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, device, repeats: int) -> tuple[int | None, int | None, float]:
    """(peak bytes during one step, bytes allocated before it, median seconds per step)."""
    step()  # warm-up (kernels, allocator)
    _sync(device)
    peak = before = None
    if device.type == "cuda":
        step()  # a second one, so that the gradients' buffers exist as in training
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return peak, before, statistics.median(times)


def _row(method, scheme, depth, module, measured):
    peak, before, seconds = measured
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    return {"method": method, "scheme": scheme, "depth": depth, "peak_bytes": peak, "param_bytes": params,
            # what a method holds beyond the weights and their gradients (which every method has): flat or not
            "peak_above_weights_bytes": None if peak is None else peak - 2 * params,
            "step_peak_bytes": None if peak is None else peak - before,
            "resident_before_step_bytes": before, "step_ms": round(1000 * seconds, 3)}


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="8,32,128,512")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-torchdiffeq", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    field = ConvField(args.channels, groups=8, activation="relu")
    rows = []
    workspace = None
    if device.type == "cuda":  # cuBLAS's workspaces, allocated on first use and kept: in every row, not some
        before = torch.cuda.memory_allocated(device)
        a = torch.ones(8, 8, device=device, requires_grad=True)
        (a @ a).sum().backward()  # one handle (and workspace) for this thread, one for autograd's backward thread
        del a
        _sync(device)
        workspace = torch.cuda.memory_allocated(device) - before
    for depth in (int(d) for d in args.depths.split(",")):
        gen = torch.Generator().manual_seed(depth)
        one = field.init(gen)
        knots = {k: (v.expand(depth, *v.shape) + 0.01 * torch.randn(depth, *v.shape, generator=gen, dtype=v.dtype)).float()
                 for k, v in one.items()}
        x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
        for method in args.methods.split(","):
            scheme = "reversible_heun" if method == "reversible" else "euler"
            block = ODEBlock(field, Curve({k: v.clone() for k, v in knots.items()}), depth, scheme, method).to(device)

            def step(block=block, x=x):
                block.zero_grad(set_to_none=True)
                block(x).square().mean().backward()

            rows.append(_row(method, scheme, depth, block, measure(step, device, args.repeats)))
            del block, step
            _release(device)
        if not args.no_torchdiffeq:
            try:
                from torchdiffeq import odeint_adjoint
            except ImportError:
                continue
            func = _TorchdiffeqField(ODEBlock(field, Curve({k: v.clone() for k, v in knots.items()}), depth,
                                              "euler")).to(device)
            t = torch.tensor([0.0, 1.0], device=device)

            def step(func=func, t=t, x=x, depth=depth):
                func.zero_grad(set_to_none=True)
                y = odeint_adjoint(func, x, t, method="euler", options={"step_size": 1.0 / depth})[-1]
                y.square().mean().backward()

            rows.append(_row("torchdiffeq.odeint_adjoint", "euler", depth, func, measure(step, device, args.repeats)))
            del func, step
            _release(device)
        del x
        _release(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "cublas_workspace_bytes": workspace, "workload": {
        "channels": args.channels, "size": args.size, "batch": args.batch, "repeats": args.repeats}, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for r in rows:
            peak = f"{r['peak_bytes'] / 2**20:.0f} MiB" if r["peak_bytes"] is not None else "-"
            above = f"{r['peak_above_weights_bytes'] / 2**20:.0f} MiB" if r["peak_bytes"] is not None else "-"
            print(f"{r['method']:>28} depth {r['depth']:>4}: peak {peak:>10} ({above:>9} above weights + grads), "
                  f"{r['step_ms']:.1f} ms")


if __name__ == "__main__":
    main()
