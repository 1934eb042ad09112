"""Training: AdamW with a cosine learning rate, gradients through the ODE blocks by any method.

Models start smooth in depth (tied weights, zero output layers; Marion et al. 2024), so the
trained ResNet stays a discretization of its limit ODE and can be re-discretized.
"""

from __future__ import annotations

import platform
import time

import torch
import torch.nn.functional as F

from .data import Dataset
from .errors import ResodeError
from .evaluate import accuracy, predict, progress_bar
from .network import ODENet, ODENetConfig


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ResodeError("--device cuda asked for, but this torch build sees no CUDA GPU; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise ResodeError(f"unknown device {device!r}; valid devices are: auto, cpu, cuda")
    return torch.device(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train(
    config: ODENetConfig,
    data: Dataset,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    device: str = "auto",
    seed: int = 0,
    init: str = "smooth",
    show_progress: bool = True,
) -> tuple[ODENet, dict]:
    """Train an ODENet on ``data`` (AdamW, cosine learning rate, no warm-up).

    The ODE blocks' backward pass is ``config.grad`` (see ``gradients.GRADIENTS``).

    Returns:
        the model (on the CPU, eval mode) and a record for the checkpoint header:
        ``data``, ``metrics`` (test accuracy, final train loss) and ``training``.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0 or not weight_decay >= 0:
        raise ResodeError("epochs and batch size must be at least 1, the learning rate positive, weight decay >= 0")
    if tuple(data.in_shape) != tuple(config.in_shape):
        raise ResodeError(f"data has samples of shape {data.in_shape}, the model expects {config.in_shape}")
    dev = resolve_device(device)
    model = ODENet(config, init=init, seed=seed).to(dev)
    x_train, y_train = data.x_train.to(dev), data.y_train.to(dev)
    steps_per_epoch = -(-len(x_train) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = time.perf_counter()
    history = []
    switched: set[int] = set()
    with progress_bar(disable=not show_progress) as bar:
        task = bar.add_task("training", total=epochs * steps_per_epoch)
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(x_train), generator=gen).to(dev)
            total, count = 0.0, 0
            for i in range(0, len(x_train), batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                if not torch.isfinite(loss):
                    raise RuntimeError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total, count = total + loss.item() * len(idx), count + len(idx)
                bar.update(task, advance=1, description=f"epoch {epoch + 1}/{epochs} loss {total / count:.4f}")
            history.append(total / count)
            for i, block in enumerate(model.blocks):
                if block.monitor is not None and block.monitor.switched_at is not None and i not in switched:
                    switched.add(i)
                    error = block.monitor.history[-1][1]
                    bar.console.print(f"block {i}: adjoint reconstruction error {error:.2e} > "
                                      f"{block.monitor.tolerance:g}; switched to symplectic")
            if show_progress:
                bar.console.print(f"epoch {epoch + 1}/{epochs}: train loss {history[-1]:.4f}, "
                                  f"{time.perf_counter() - start:.0f} s")
        seconds = time.perf_counter() - start
        test_acc = accuracy(predict(model, data.x_test.to(dev), progress=bar), data.y_test)
    record = {
        "data": data.describe(),
        "metrics": {"test_accuracy": test_acc, "train_loss": history[-1]},
        "training": {
            "method": config.grad, "optimizer": "AdamW + cosine schedule", "init": init, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed, "seconds": round(seconds, 1),
            "device": _device_name(dev), "torch": torch.__version__, "loss_history": history,
        },
    }
    monitors = [{"block": i, "every": b.monitor.every, "tolerance": b.monitor.tolerance,
                 "switched_at_step": b.monitor.switched_at, "checks": b.monitor.history}
                for i, b in enumerate(model.blocks) if b.monitor is not None]
    if monitors:
        record["training"]["reconstruction_monitor"] = monitors
    return model.cpu().eval(), record


def write_model_card(checkpoint, model: ODENet, record: dict):
    """Write ``<checkpoint>.md``: data, split, preprocessing, architecture, accuracy, command, time."""
    from pathlib import Path

    from .io import atomic_write

    path = Path(checkpoint).with_suffix(".md")
    cfg, data, tr = model.config, record["data"], record["training"]
    size = Path(checkpoint).stat().st_size
    lines = [
        f"# {Path(checkpoint).stem}",
        "",
        f"An ODENet ({cfg.arch}) trained by resode ({tr['method']} gradients) from a {tr['init']} initialization"
        " (Marion et al. 2024: tied weights, zero output layers).",
        "",
        "| | |",
        "|---|---|",
        f"| data | {data['name']} |",
        f"| split | {data['split']} |",
        f"| preprocessing | {data['preprocessing']} |",
        f"| architecture | widths {list(cfg.widths)}, {cfg.field or cfg.arch} fields, {cfg.activation}"
        + (f", hidden {cfg.hidden}" if cfg.arch == "mlp" else f", stem stride {cfg.stem_stride}") + " |",
        f"| depth | {list(cfg.depths)} (knots {list(cfg.knots)}) |",
        f"| scheme | {cfg.scheme} |",
        f"| interpolation | {cfg.interp} |",
        f"| parameters | {sum(p.numel() for p in model.parameters())} ({size / 1e6:.2f} MB file) |",
        f"| test accuracy | {100 * record['metrics']['test_accuracy']:.2f} % ({data['test_size']} test samples) |",
        f"| final train loss | {record['metrics']['train_loss']:.4f} |",
        f"| training | {tr['epochs']} epochs, batch {tr['batch_size']}, lr {tr['lr']}, weight decay {tr.get('weight_decay', 0)},"
        f" {tr['optimizer']}, seed {tr['seed']} |",
        f"| time and device | {tr['seconds']} s on {tr['device']}, torch {tr['torch']} |",
        "",
        "Trained with:",
        "",
        "```",
        tr.get("command", "resode train"),
        "```",
        "",
    ]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    return path
