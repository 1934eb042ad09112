"""Model cards: ``<checkpoint>.md`` beside every checkpoint resode train and distill write."""

from __future__ import annotations

from pathlib import Path

from .io import atomic_write
from .network import ODENet


def fmt_depths(depths: list[int]) -> str:
    """8 for a depth every stage shares, else 2,8,8,2."""
    return str(depths[0]) if len(set(depths)) == 1 else ",".join(map(str, depths))


_INIT_TEXT = {
    "smooth": "a smooth-in-depth initialization (Marion et al. 2024: the same weights at every step, zero output layers)",
    "tied": "a tied initialization (one set of weights per stage, zero output layers; Sander et al. 2022)",
    "iid": "an i.i.d. initialization (an independent draw per step)",
}


def _robust_rows(training: dict, record: dict) -> list[str]:
    """The card's rows for a depth-robust run: what it drew from, and its last epoch's accuracy at the extremes."""
    if not training.get("depths"):
        return []
    depths = ", ".join(fmt_depths(d) for d in training["depths"])
    rows = [f"| depth-robust training | each batch at depth {depths}; scheme "
            f"{', '.join(training.get('schemes') or ['the model’s'])} |"]
    at = (training.get("history") or [{}])[-1].get("test_accuracy_at") or []
    if at:
        rows.append("| test accuracy at the ends | " + ", ".join(
            f"{r['scheme'] or 'native scheme'} depth {fmt_depths(r['depths'])}: {100 * r['accuracy']:.2f} %" for r in at) + " |")
    return rows


def _normalization(values) -> str:
    c = len(values) // 2
    return (f"; then, inside the model (and every export), (x − mean) / std with mean {list(values[:c])} and std "
            f"{list(values[c:])} (--normalize)")


def write_model_card(checkpoint, model: ODENet, record: dict, command: str) -> Path:
    """Write ``<checkpoint>.md``: data, split, preprocessing, architecture, accuracy, command, time."""
    path = Path(checkpoint).with_suffix(".md")
    cfg, data, tr = model.config, record["data"], record["training"]
    init = tr.get("init", "smooth")
    size = Path(checkpoint).stat().st_size
    lines = [
        f"# {Path(checkpoint).stem}",
        "",
        f"An ODENet ({cfg.arch}) trained by resode ({tr['method']} gradients), "
        f"{init if str(init).startswith(('fine-tuned', 'distilled')) else 'from ' + _INIT_TEXT.get(init, init)}.",
        "",
        "| | |",
        "|---|---|",
        f"| data | {data['name']} |",
        f"| split | {data['split']} |",
        f"| preprocessing | {data['preprocessing']}" + (_normalization(cfg.normalize) if cfg.normalize else "") + " |",
        f"| architecture | widths {list(cfg.widths)}, {cfg.field or cfg.arch} fields, {cfg.activation}"
        + (f", hidden {cfg.hidden}" if cfg.arch == "mlp" else f", stem stride {cfg.stem_stride}") + " |",
        f"| depth | {list(cfg.depths)} (knots {list(cfg.knots)}) |",
        f"| scheme | {cfg.scheme} |",
        f"| interpolation | {cfg.interp} |",
        f"| parameters | {sum(p.numel() for p in model.parameters())} ({size / 1e6:.2f} MB file) |",
        f"| test accuracy | {100 * record['metrics']['test_accuracy']:.2f} % ({data['test_size']} test samples) |",
        f"| train accuracy | {100 * record['metrics']['train_accuracy']:.2f} % (running, during the last epoch) |",
        f"| training | {tr['epochs']} epochs, batch {tr['batch_size']}, {tr['optimizer']} lr {tr['lr']} ({tr['schedule']}"
        + (f", {100 * tr['warmup']:g} % warm-up" if tr.get("warmup") else "") + "),"
        f" weight decay {tr['weight_decay']}, seed {tr['seed']}"
        + (", random shifts and flips" if tr.get("augment") else "")
        + (f", gradient norm clipped at {tr['clip_grad']:g}" if tr.get("clip_grad") else "") + " |",
        *_robust_rows(tr, record),
        f"| time and device | {tr['seconds']} s on {tr['device']}, {tr['processes']} process(es), torch {tr['torch']} |",
        "",
        "Trained with:",
        "",
        "```",
        command,
        "```",
        "",
    ]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    return path


__all__ = ["fmt_depths", "write_model_card"]
