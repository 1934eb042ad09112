"""Batched inference and the numbers every command reports."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

stderr = Console(stderr=True)


def progress_bar(disable: bool = False) -> Progress:
    """A rich progress bar on stderr (stdout stays free for tables and JSON)."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr, transient=True, disable=disable or not stderr.is_terminal,
    )


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 500, progress: Progress | None = None,
            description: str = "evaluating") -> Tensor:
    """Logits of ``model`` on x (N, *in_shape) → (N, classes), in eval mode, on x's device."""
    model.eval()
    task = progress.add_task(description, total=len(x)) if progress else None
    out = []
    for i in range(0, len(x), batch_size):
        out.append(model(x[i : i + batch_size]))
        if progress:
            progress.advance(task, len(out[-1]))
    if progress:
        progress.remove_task(task)
    return torch.cat(out)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose argmax is the label."""
    return float((logits.argmax(dim=1) == labels.to(logits.device)).double().mean())


def relative_deviation(output: Tensor, reference: Tensor) -> Tensor:
    """Per-sample ‖output − reference‖ / ‖reference‖ over the trailing dimensions: (N,)."""
    diff = (output.double() - reference.double()).flatten(1).norm(dim=1)
    return diff / reference.double().flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
