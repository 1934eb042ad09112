"""Kernels per step of each gradient method, by kind: the device-independent side of step time.

    python benchmarks/kernels.py --json > benchmarks/results/kernels.json

On the GPU benchmark's field (``conv3x3 → GroupNorm → ReLU → conv3x3``, Euler, one knot per step),
counts the ATen calls of one forward + backward that read or write a full activation (a tensor of
the state's shape), by kind: convolution forwards, convolution backwards (each computes the input's
and the weights' gradients: two passes), GroupNorm forwards and backwards, and the other
activation-sized kernels (ReLU and its backward, the step's add, the adjoint's reconstruction, ...).
Views (``detach``, ``expand``) are not kernels and are left out. Per step = (count at depth 2N −
count at depth N) / N, so what runs once per solve (the loss, the first gradient) drops out.

``conv_passes`` = forwards + 2 × backwards, the usual first-order model of a conv net's step time
(the H100 rows of ``gpu.py`` sit below the pass ratio: the elementwise kernels weigh too).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from rich.console import Console
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from resode_export.curves import Curve
from resode_export.fields import ConvField
from resode_export.network import ODEBlock

METHODS = ("backprop", "checkpoint", "adjoint", "adjoint_fast", "symplectic", "reversible")
VIEWS = {"detach", "expand", "view", "_unsafe_view", "alias", "select", "slice", "t", "transpose", "as_strided"}
KINDS = {"convolution": "conv_forward", "convolution_backward": "conv_backward", "native_group_norm": "norm_forward",
         "native_group_norm_backward": "norm_backward"}


class _Count(TorchDispatchMode):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape, self.counts = shape, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        # a factory (``new_zeros``) only names its argument for dtype and device: it counts by its output
        looked = (out,) if name.startswith("new_") else (args, kwargs, out)
        touched = [t for t in tree_flatten(looked)[0] if torch.is_tensor(t) and tuple(t.shape) == self.shape]
        if touched and name not in VIEWS:
            self.counts[KINDS.get(name, "elementwise")] += 1
        return out


def count(method: str, depth: int, channels: int, size: int, batch: int) -> Counter:
    field = ConvField(channels, groups=min(8, channels), activation="relu")
    gen = torch.Generator().manual_seed(0)
    knots = {k: (v.expand(depth, *v.shape) + 0.01 * torch.randn(depth, *v.shape, generator=gen, dtype=v.dtype)).float()
             for k, v in field.init(gen).items()}
    scheme = "reversible_heun" if method == "reversible" else "euler"
    block = ODEBlock(field, Curve(knots), depth, scheme, method)
    x = torch.randn(batch, channels, size, size, generator=gen)
    with _Count(tuple(x.shape)) as mode:
        block(x).square().mean().backward()
    return mode.counts


def per_step(method: str, depth: int = 8, channels: int = 8, size: int = 6, batch: int = 2) -> dict:
    low, high = count(method, depth, channels, size, batch), count(method, 2 * depth, channels, size, batch)
    row = {kind: (high[kind] - low[kind]) / depth for kind in ("conv_forward", "conv_backward", "norm_forward",
                                                              "norm_backward", "elementwise")}
    row["conv_passes"] = row["conv_forward"] + 2 * row["conv_backward"]
    row["kernels"] = sum(v for k, v in row.items() if k != "conv_passes")
    return {"method": method, **row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [per_step(m) for m in args.methods.split(",")]
    if args.json:
        print(json.dumps({"field": "conv3x3 → GroupNorm → ReLU → conv3x3, euler (reversible: reversible_heun)",
                          "rows": rows}, indent=1))
        return
    table = Table(title="activation-sized kernels per step (forward + backward)")
    for col in ("method", "conv fwd", "conv bwd", "conv passes", "norm fwd", "norm bwd", "elementwise", "kernels"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"], *(f"{r[k]:g}" for k in ("conv_forward", "conv_backward", "conv_passes",
                                                          "norm_forward", "norm_backward", "elementwise", "kernels")))
    Console().print(table)


if __name__ == "__main__":
    main()
