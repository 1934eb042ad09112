"""Shared test helpers: analytic problems, reference ResNets, slope fits, CLI runner."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from resode_export.cli import main
from resode_export.network import ODENet, ODENetConfig


def fitted_slope(steps, errors) -> float:
    """Least-squares slope of log(error) against log(step)."""
    return float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


def reference_resnet(model: ODENet, x: torch.Tensor) -> torch.Tensor:
    """The ResNet x_{n+1} = x_n + (1/N) f(x_n, θ_n) written out by hand from the knots."""
    x = model.stem(x)
    for i, block in enumerate(model.blocks):
        knots = dict(block.curve.knots.items())
        n_steps = block.curve.num_knots
        for n in range(n_steps):
            x = x + (1.0 / n_steps) * block.field(x, {k: v[n] for k, v in knots.items()})
        if i < len(model.transitions):
            x = model.transitions[i](x)
    return model.head(x)


def mlp_config(**kw) -> ODENetConfig:
    base = dict(arch="mlp", in_shape=(6,), num_classes=3, widths=(5, 4), depths=(8, 8), hidden=7)
    return ODENetConfig(**{**base, **kw})


def conv_config(**kw) -> ODENetConfig:
    base = dict(arch="conv", in_shape=(1, 8, 8), num_classes=3, widths=(8, 8), depths=(6, 6), groups=4,
                activation="relu")
    return ODENetConfig(**{**base, **kw})


def smooth_knots_(model: ODENet, scale: float = 1.0, seed: int = 0) -> ODENet:
    """Overwrite every curve's knots with θ(t_k) for a smooth θ(t) = A + B sin(2πt) + C t²."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            k = block.curve.num_knots
            t = torch.arange(k, dtype=torch.float64) / k
            for knots in block.curve.knots.values():
                shape = knots.shape[1:]
                a, b, c = (scale * torch.randn(3, *shape, generator=gen, dtype=torch.float64)
                           / math.sqrt(max(1, shape.numel() // shape[0])))
                tt = t.reshape(-1, *[1] * len(shape))
                knots.copy_((a + b * torch.sin(2 * math.pi * tt) + c * tt**2).to(knots.dtype))
    return model


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``resode ARGS`` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def interrupt_training(monkeypatch, epoch: int | None = None):
    """Make training stop (KeyboardInterrupt, as Ctrl-C) right after it saves epoch ``epoch``'s state (any epoch
    if None); returns a function that puts the normal saving back."""
    from resode_export import train as train_module

    save_state = train_module._save_state

    def interrupted(path, optimizer, meta):
        save_state(path, optimizer, meta)
        if epoch is None or meta["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_state", interrupted)
    return lambda: monkeypatch.setattr(train_module, "_save_state", save_state)
