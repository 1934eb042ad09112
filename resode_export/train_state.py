"""A run's training state beside its checkpoint: optimizer, weights, history and log, for an exact --resume."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .errors import ResodeError, one_line
from .io import CHECKSUM, read_safetensors, verify_digest, write_safetensors


def state_path(checkpoint: str | os.PathLike) -> Path:
    """Where the optimizer state of a run writing ``checkpoint`` lives."""
    p = Path(checkpoint)
    return p.with_name(p.stem + ".train-state.safetensors")


def _save_state(path: Path, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """The optimizer state, ``meta`` (epoch, history, …) and the model's weights (``meta["weights"]``).

    With the weights in it, this one file is all a resume needs: a run killed between the
    checkpoint's write and this one's resumes from the previous epoch and repeats the last.
    """
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    for name, value in (meta.get("weights") or {}).items():
        tensors[f"model.{name}"] = value.detach().cpu().contiguous()
    meta = {k: v for k, v in meta.items() if k != "weights"}
    header = {**meta, "param_groups": sd["param_groups"], "scalars": scalars, "checksum": CHECKSUM}
    write_safetensors(path, tensors, {"resode-train-state": json.dumps(header)})


def _load_state(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    if not path.is_file():
        raise ResodeError(f"cannot resume: {str(path)!r} is missing; start without --resume")
    tensors, metadata = read_safetensors(path)
    try:
        header = json.loads(metadata["resode-train-state"])
        verify_digest(path, tensors, metadata, required=header.get("checksum") is not None)
        weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        state: dict[int, dict] = {}
        for key, value in [*tensors.items(), *header["scalars"].items()]:
            if key.startswith("model."):
                continue
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
        if not (isinstance(header["epoch"], int) and isinstance(header["history"], list)
                and isinstance(header["seconds"], (int, float)) and isinstance(header.get("options", {}), dict)):
            raise TypeError("epoch, history, seconds or options of the wrong type")
    except ResodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any inconsistency of the file is bad input
        text = one_line(repr(exc))
        raise ResodeError(f"cannot resume: {str(path)!r} holds no usable training state ({text}); "
                          "start the run again without --resume") from None
    if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
        raise ResodeError(f"cannot resume: {str(path)!r} holds non-finite weights; start the run again")
    return {**header, "weights": weights}


def _resume_log_lines(log: Path, run_log: Path | None, state: dict) -> list[str]:
    """The lines a resumed run's log keeps: its finished epochs (a line of an epoch that did not finish
    goes). The log must be the run's own: the one its training state records while that exists, and in
    any case one whose finished epochs are the state's history; a log that is missing starts from that
    history. So the run's history is never split or mixed with another's."""
    if run_log is not None and log.resolve() != run_log and run_log.exists():
        raise ResodeError(f"resume with the run's own log, --log {run_log} (given {log}): another would split "
                          "its history")
    history = state["history"]
    if not log.is_file():
        return [json.dumps(row) for row in history]
    done, kept = state["epoch"], []
    for line in log.read_text().splitlines():
        epoch = _log_epoch(line)
        if math.isfinite(epoch) and epoch > done + 1:  # (done + 1: written just before the run was stopped)
            raise ResodeError(f"{str(log)!r} records epoch {epoch:g}, past the {done} epochs of this run's training "
                              "state: it is the log of another continuation of the run; give a new --log")
        if epoch <= done:
            kept.append(line)
    canonical = lambda rows: [json.dumps(row, sort_keys=True) for row in rows]  # noqa: E731
    if canonical(json.loads(line) for line in kept) != canonical(history):
        raise ResodeError(f"{str(log)!r} is not this run's log (its epochs differ from the training state's history); "
                          "give a new --log, which starts with the run's history")
    return kept


def _log_record(log: Path | None, state: Path) -> str | None:
    """The log's path as the training state records it: relative to the state's folder when the log lies
    in it (the default, beside the checkpoint), so that a run folder moved elsewhere still resumes."""
    if log is None:
        return None
    log, folder = log.resolve(), state.resolve().parent
    return str(log.relative_to(folder)) if log.is_relative_to(folder) else str(log)


def _log_epoch(line: str) -> float:
    """The epoch of a log line; a line that is not a finished epoch's record (cut off) sorts last."""
    try:
        return float(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return math.inf


__all__ = ["state_path"]
