"""TorchScript and ``torch.export`` forms of an ODENet: the solve unrolled with materialized weights.

:class:`FrozenODENet` holds each block's weights sampled at its stage times as buffers (what the
PyTorch model samples on every forward pass), and runs the same stepper; tracing it gives a
graph of plain tensor operations that ``torch.jit.load`` / ``torch.export.load`` run without
this package.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from ..network import ODENet, normalization
from ..schemes import solve, stage_grid


class FrozenODENet(nn.Module):
    """An ODENet at fixed depths and scheme with per-stage-time weights as buffers."""

    def __init__(self, model: ODENet):
        super().__init__()
        self.stem = copy.deepcopy(model.stem)
        self.transitions = copy.deepcopy(model.transitions)
        self.head = copy.deepcopy(model.head)
        self.order = model.order()
        norm = normalization(model.config)
        self.normalized = norm is not None
        if norm is not None:
            self.register_buffer("input_mean", norm[0].float())
            self.register_buffer("input_std", norm[1].float())
        self.plan = []
        for i, block in enumerate(model.blocks):
            times, _ = stage_grid(block.scheme, block.depth)
            with torch.no_grad():
                sampled = block.curve.sample(times)
            names = {}
            for k, v in sampled.items():
                names[k] = f"block{i}_{k}"
                self.register_buffer(names[k], v.detach().clone().contiguous())
            self.plan.append((block.field, block.scheme, block.depth, names))

    def forward(self, x: Tensor) -> Tensor:
        if self.normalized:
            x = (x - self.input_mean) / self.input_std
        x = self.stem(x)
        for kind, i in self.order:
            if kind == "transition":
                x = self.transitions[i](x)
            else:
                field, scheme, depth, names = self.plan[i]
                x = solve(field, x, {k: getattr(self, n) for k, n in names.items()}, scheme, depth)
        return self.head(x)


def example_input(model: ODENet, batch: int = 2) -> Tensor:
    return torch.randn(batch, *model.config.in_shape, generator=torch.Generator().manual_seed(0))


def torchscript(model: ODENet) -> torch.jit.ScriptModule:
    """Traced (every step unrolled). TorchScript is deprecated upstream; ``pt2`` is its successor."""
    frozen = FrozenODENet(model).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices, and GroupNorm's batch-size check traced as a constant
        return torch.jit.trace(frozen, example_input(model), check_trace=False)


def exported_program(model: ODENet):
    frozen = FrozenODENet(model).eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with torch.no_grad():
        return torch.export.export(frozen, (example_input(model),), dynamic_shapes=({0: batch},), strict=False)


__all__ = ["FrozenODENet", "exported_program", "torchscript"]
