"""Training: any gradient method through the ODE blocks, checkpoints every epoch, exact resume, DDP.

Models start smooth in depth (tied weights, zero output layers; Marion et al. 2024), so the
trained ResNet stays a discretization of its limit ODE and can be re-discretized. Everything a
run depends on is a function of the seed and the epoch (the data order) or is saved after every
epoch (weights, optimizer state, step count), so ``resume`` ends with the same weights as an
uninterrupted run. Under ``torchrun`` each process takes an equal share of every global batch and
DistributedDataParallel averages the gradients (gloo on CPU, NCCL on GPU).

Numerical faults: a non-finite loss or gradient stops training (:class:`TrainingDiverged`) before
the epoch's checkpoint is written, so the file on disk stays the last good epoch; with
``skip_nonfinite`` such a batch is skipped instead (no optimizer step) and counted, and training
still stops when more than a tenth of an epoch's batches are skipped. Weights are checked to be
finite before every checkpoint write. An adjoint reconstruction error above
``RECONSTRUCTION_WARNING`` (or non-finite) is reported on stderr every epoch it happens.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .cards import fmt_depths
from .data import Dataset, check_samples
from .errors import ResodeError, check_choice, one_line
from .evaluate import accuracy, predict, progress_bar
from .gradients import reconstruction_error
from .io import atomic_write, load_checkpoint, save_checkpoint
from .network import ODENet, check_depth
from .robust import draw, extremes
from .schemes import SCHEMES
from .train_state import _load_state, _log_record, _resume_log_lines, _save_state, state_path  # noqa: F401 - tests patch _save_state here

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "step", "constant")
MAX_SKIPPED_FRACTION = 0.1  # --skip-nonfinite: an epoch may skip this fraction of its batches (at least one)
MAX_RATE = 1e6  # learning rate and weight decay: larger values overflow float32 in the optimizer's step
RECONSTRUCTION_WARNING = 0.1  # an adjoint reconstruction error ‖x̃_0 − x_0‖ / ‖x_0‖ above this is reported


class TrainingDiverged(ResodeError):
    """The loss, a gradient or the weights became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainOptions:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" (AdamW) or "sgd" (momentum 0.9, Nesterov)
    schedule: str = "cosine"  # "cosine" to 0, "step" (×0.1 at 50 % and 75 %), "constant"
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    skip_nonfinite: bool = False  # skip a batch whose loss or gradient is non-finite instead of stopping
    depths: list[list[int]] | None = None  # depth-robust training: each batch draws one per-stage depth list
    schemes: list[str] | None = None  # … and one scheme (robust.draw)
    warmup: float = 0.0  # fraction of the steps over which the learning rate rises linearly from 0
    augment: bool = False  # images: a random crop (2-pixel padding) and horizontal flip per sample (augment())
    clip_grad: float | None = None  # rescale the gradient to at most this norm (None: no clipping)

    def __post_init__(self):
        if self.depths is not None:
            self.depths = [[check_depth(int(d)) for d in entry] for entry in self.depths]
            if not self.depths:
                raise ResodeError("--depths is empty; give a comma list such as 4,8,16,32")
        if self.schemes is not None:
            self.schemes = [check_choice("scheme", s, SCHEMES) for s in self.schemes]
            if not self.schemes:
                raise ResodeError("--schemes is empty; give a comma list such as euler,heun")
        if self.clip_grad is not None and not 0 < self.clip_grad < math.inf:
            raise ResodeError(f"--clip-grad must be a positive number, got {self.clip_grad:g}")
        if not 0 <= self.warmup < 1:
            raise ResodeError(f"--warmup is a fraction of the training steps in [0, 1), got {self.warmup:g}")
        check_choice("optimizer", self.optimizer, dict.fromkeys(OPTIMIZERS))
        check_choice("schedule", self.schedule, dict.fromkeys(SCHEDULES))
        if self.epochs < 1 or self.batch_size < 1:
            raise ResodeError(f"--epochs and --batch-size must be at least 1, got {self.epochs} and {self.batch_size}")
        # NaN fails every comparison, so it lands here too; beyond MAX_RATE optimizer steps overflow float32
        if not 0 < self.lr <= MAX_RATE:
            raise ResodeError(f"--lr must be a number in (0, {MAX_RATE:g}], got {self.lr:g}")
        if not 0 <= self.weight_decay <= MAX_RATE:
            raise ResodeError(f"--weight-decay must be a number in [0, {MAX_RATE:g}], got {self.weight_decay:g}")
        if not 0 <= self.seed < 2**32:
            raise ResodeError(f"--seed must be an integer from 0 to {2**32 - 1}, got {self.seed}")

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) out of ``total``."""
        warm = math.ceil(self.warmup * total)
        if step < warm:
            return self.lr * (step + 1) / warm
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        if self.schedule == "step":
            return self.lr * (0.1 ** ((step >= total // 2) + (step >= 3 * total // 4)))
        return self.lr


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


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_writer() -> bool:
    """True in the process that writes files: the only one, or rank 0 under torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def _distributed(device: torch.device) -> tuple[torch.device, int, int]:
    """(device, rank, world size); starts the process group under torchrun, one GPU per local rank."""
    world = world_size()
    if world == 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world


def _check_resumable(options: TrainOptions, state: dict, checkpoint_epochs: int) -> None:
    """A resumed run must use the options it started with, and its two files must agree.

    The checkpoint is written before the state, so it may be one epoch ahead (killed between the
    two writes); a state that holds the weights resumes from its own epoch then.
    """
    saved = state.get("options", {})
    changed = [f"--{k.replace('_', '-')} {saved[k]} (given {v})" for k, v in asdict(options).items()
               if k != "device" and k in saved and saved[k] != v]
    if changed:
        raise ResodeError("resume with the run's own options: " + ", ".join(changed))
    agree = (state["epoch"], state["epoch"] + 1) if state.get("weights") else (state["epoch"],)
    if checkpoint_epochs not in agree:
        raise ResodeError(f"the checkpoint has {checkpoint_epochs} epochs but its training state {state['epoch']}; "
                          "they come from different runs: start the run again")
    if state["epoch"] >= options.epochs:
        raise ResodeError(f"the run already finished its {options.epochs} epochs; nothing to resume")


def _restore_monitors(model: ODENet, saved: list[dict]) -> None:
    for entry in saved:
        monitor = model.blocks[entry["block"]].monitor
        if monitor is not None:
            monitor.every, monitor.tolerance = entry["every"], entry["tolerance"]
            monitor.calls, monitor.switched_at = entry.get("calls", 0), entry["switched_at_step"]
            monitor.history = [tuple(c) for c in entry["checks"]]


def _resume_record(path, saved: dict) -> tuple[int, list[dict]]:
    """(epochs done, reconstruction monitors) from a checkpoint's training record."""
    try:
        training = saved["training"]
        epochs, monitors = len(training["history"]), training.get("reconstruction_monitor", [])
        if not isinstance(training["history"], list) or not isinstance(monitors, list):
            raise TypeError("history and reconstruction_monitor must be lists")
    except (KeyError, TypeError, AttributeError) as exc:
        raise ResodeError(f"cannot resume: {str(path)!r} holds no training record ({exc!r}); it was not written by "
                          "resode train: start a new run, or fine-tune it by naming it as MODEL") from None
    return epochs, monitors


def augment(x: torch.Tensor, seed: int, step: int, pad: int = 2) -> torch.Tensor:
    """Images (N, C, H, W): each shifted by up to ``pad`` pixels (the border filled with the batch's smallest
    value, the background of standardized images) and flipped left-right with probability 1/2. A function of
    the seed and the step, so a resumed run sees the same batches."""
    gen = torch.Generator().manual_seed(seed * 1_000_033 + step)
    n, _, h, w = x.shape
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    padded = F.pad(x, (pad,) * 4, value=float(x.min()))
    rows = (torch.arange(h)[None, :] + shifts[:, :1]).to(x.device)  # (N, H)
    cols = (torch.arange(w)[None, :] + shifts[:, 1:]).to(x.device)  # (N, W)
    cols = torch.where(flips[:, None].to(x.device), cols.flip(1), cols)
    out = padded.gather(2, rows[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad))
    return out.gather(3, cols[:, None, None, :].expand(n, x.shape[1], h, w))


class CrossEntropy:
    """The default objective: cross-entropy of the logits against the labels."""

    settings: dict = {}

    def __call__(self, net, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = net(x)
        return F.cross_entropy(logits, y, reduction="sum"), logits


@torch.no_grad()
def _accuracy_at(model: ODENet, options: TrainOptions, x: torch.Tensor, y: torch.Tensor) -> list[dict] | None:
    """Test accuracy at the shallowest and deepest depths of a depth-robust run (each scheme)."""
    rows = []
    for depths, scheme in extremes(options.depths, options.schemes):
        with model.solving_at(depths, scheme):
            rows.append({"depths": depths, "scheme": scheme, "accuracy": accuracy(predict(model, x), y)})
    return rows or None


def _gradients_finite(params: list[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _weights_finite(model: ODENet) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def _warn_reconstruction(epoch: int, errors: list[float] | None) -> None:
    for block, error in enumerate(errors or []):
        if not error <= RECONSTRUCTION_WARNING:  # NaN too
            print(f"warning: epoch {epoch}: the adjoint's reconstruction error in block {block} is {error:.3g} "
                  f"(above {RECONSTRUCTION_WARNING}), so its gradients are inaccurate; use --grad symplectic "
                  "(exact) or --grad auto, a greater --depth, or a lower --lr", file=sys.stderr)


@torch.no_grad()
def reconstruction_errors(model: ODENet, x: torch.Tensor) -> list[float] | None:
    """Each block's adjoint reconstruction error ‖x̃_0 − x_0‖ / ‖x_0‖ on x, for adjoint/auto models."""
    if model.config.grad not in ("adjoint", "auto"):
        return None
    return [reconstruction_error(b.field, xi, b.curve, b.scheme, b.depth) for b, xi in zip(model.blocks,
                                                                                       model.block_inputs(x))]


def train(
    model: ODENet,
    data: Dataset,
    options: TrainOptions,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    log: str | os.PathLike | None = None,
    show_progress: bool = True,
    objective=None,
    new_log: bool = False,
) -> tuple[ODENet, dict]:
    """Train ``model`` on ``data``; after each epoch write ``out`` (checkpoint), its optimizer state
    and a JSON line of metrics to ``log``.

    Args:
        model: a fresh or pretrained ODENet; its blocks' gradient method is ``model.config.grad``.
        resume: continue the run whose checkpoint is ``out`` (the model argument is replaced by it).
        new_log: a new run (not ``resume``) replaces an existing ``log``, once every input has been checked.
        objective: ``objective(net, x, y, epoch) -> (summed loss, logits or None)`` of a batch; default
            :class:`CrossEntropy` (distillation passes its own). It runs at the batch's drawn depth and scheme.
    Returns:
        the model (CPU, eval mode) and the record stored in the checkpoint header.
    Raises:
        TrainingDiverged: a non-finite loss, gradient or weight, or with ``options.skip_nonfinite`` too many
            skipped batches (the last good checkpoint stays in place).
    """
    if resume and out is None:
        raise ResodeError("--resume needs the checkpoint of the run to continue (--out)")
    objective = objective or CrossEntropy()
    if world_size() > 1 and not isinstance(objective, CrossEntropy):
        raise ResodeError("distillation runs in one process; start it without torchrun")
    if resume:
        model, saved = load_checkpoint(out)
        checkpoint_epochs, monitors = _resume_record(out, saved)
    check_samples(data.in_shape, model.config.in_shape, data="data")
    if options.augment and len(data.in_shape) != 3:
        raise ResodeError(f"--augment shifts and flips images; the data's samples have shape {data.in_shape}")
    classes = int(max(data.y_train.max(), data.y_test.max())) + 1
    if classes > model.config.num_classes:
        raise ResodeError(f"the data has labels up to {classes - 1}, the model has {model.config.num_classes} classes")
    dev, rank, world = _distributed(resolve_device(options.device))
    if options.batch_size % world:
        raise ResodeError(f"--batch-size {options.batch_size} must be a multiple of the {world} processes")
    if new_log and not resume and log is not None and rank == 0 and Path(log).exists():
        Path(log).unlink()  # a new run starts a new log (checked above: nothing failed before it)
    model = model.to(dev)
    if hasattr(objective, "to"):
        objective.to(dev)
    params = list(model.parameters())
    if options.optimizer == "adam":
        opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=options.lr, momentum=0.9, nesterov=True, weight_decay=options.weight_decay)
    history, start_epoch, elapsed = [], 0, 0.0
    if resume:
        header = _load_state(state_path(out), opt)
        history, start_epoch, elapsed = header["history"], header["epoch"], header["seconds"]
        run_log = header.get("log")  # absent from states written before it was recorded
        if isinstance(run_log, str):  # relative to the state's folder when it lies there: the run can move
            run_log = state_path(out).resolve().parent / run_log
        if log is not None:  # what the resumed run's log keeps, checked to be this run's (written below)
            log_lines = _resume_log_lines(Path(log), run_log if isinstance(run_log, Path) else None, header)
        _check_resumable(options, header, checkpoint_epochs)
        saved = header.get("objective") or {}
        if json.loads(json.dumps(objective.settings)) != saved:
            raise ResodeError(f"resume with the run's own settings: it ran with {saved or 'plain training'}, given "
                              f"{objective.settings or 'plain training'}")
        try:
            if header["weights"]:  # the state's own epoch (the checkpoint may be one ahead)
                model.load_state_dict(header["weights"])
                monitors = header.get("reconstruction_monitor", [])
            _restore_monitors(model, monitors)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            raise ResodeError(f"cannot resume: the training state of {str(out)!r} does not fit its model "
                              f"({one_line(repr(exc))}); start the run again") from None
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    x_train, y_train = data.x_train.to(dev), data.y_train.to(dev)
    x_test, y_test = data.x_test.to(dev), data.y_test.to(dev)
    steps_per_epoch = -(-len(x_train) // options.batch_size)
    total = options.epochs * steps_per_epoch
    writer = rank == 0
    log = Path(log) if log is not None else None
    if resume and log is not None and writer:
        atomic_write(log, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in log_lines)))
    allowed_skips = max(1, int(MAX_SKIPPED_FRACTION * steps_per_epoch))
    start = time.perf_counter() - elapsed
    with progress_bar(disable=not (show_progress and writer)) as bar:
        task = bar.add_task("training", total=total, completed=start_epoch * steps_per_epoch)
        for epoch in range(start_epoch, options.epochs):
            net.train()
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(options.seed * 100_003 + epoch))
            loss_sum, correct, count, skipped = 0.0, 0, 0, 0
            for b, i in enumerate(range(0, len(x_train), options.batch_size)):
                step = epoch * steps_per_epoch + b
                idx = order[i : i + options.batch_size]
                mine = idx[rank::world].to(dev)  # an equal share of the global batch
                xb = augment(x_train[mine], options.seed, step) if options.augment else x_train[mine]
                with model.solving_at(*draw(options.depths, options.schemes, options.seed, step)):
                    loss_sum_local, logits = objective(net, xb, y_train[mine], epoch)
                    loss = loss_sum_local * (world / len(idx))  # DDP averages over processes → global mean
                    finite = torch.isfinite(loss.detach()).double()
                    if world > 1:  # every process stops together, or the others wait in all-reduce forever
                        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                    what = None if finite else "loss"
                    opt.zero_grad(set_to_none=True)
                    if what is None:
                        loss.backward()  # DDP averages the gradients: every process sees the same ones
                        what = None if _gradients_finite(params) else "gradient"
                if what is not None:
                    opt.zero_grad(set_to_none=True)
                    skipped += 1
                    if not options.skip_nonfinite or skipped > allowed_skips or skipped == steps_per_epoch:
                        kept = (f"the last good checkpoint is {str(out)!r} (epoch {epoch})" if out and epoch
                                else "nothing was written")
                        if options.skip_nonfinite:
                            raise TrainingDiverged(
                                f"{skipped} of epoch {epoch + 1}'s {steps_per_epoch} batches had a non-finite loss or "
                                f"gradient (at most {allowed_skips} may be skipped); {kept}; lower --lr")
                        raise TrainingDiverged(f"the {what} became non-finite at epoch {epoch + 1}, step {step + 1}; "
                                               f"{kept}; lower --lr, or pass --skip-nonfinite to skip such batches")
                    bar.update(task, advance=1)
                    continue
                if options.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(params, options.clip_grad)
                for group in opt.param_groups:
                    group["lr"] = options.lr_at(step, total)
                opt.step()
                right = (logits.argmax(1) == y_train[mine]).sum().double() if logits is not None else torch.nan
                stats = torch.stack([loss_sum_local.detach().double(), torch.as_tensor(right, device=dev).double(),
                                     torch.tensor(float(len(mine)), device=dev, dtype=torch.float64)])
                if world > 1:
                    dist.all_reduce(stats)
                loss_sum, correct, count = loss_sum + float(stats[0]), correct + float(stats[1]), count + float(stats[2])
                bar.update(task, advance=1, description=f"epoch {epoch + 1}/{options.epochs} loss {loss_sum / count:.4f}")
            if not _weights_finite(model):  # finite gradients can still step to infinite weights
                kept = f"the last good checkpoint is {str(out)!r} (epoch {epoch})" if out and epoch else "nothing was written"
                raise TrainingDiverged(f"the weights became non-finite during epoch {epoch + 1}; {kept}; lower --lr")
            test_acc = accuracy(predict(model, x_test), y_test)
            train_acc = correct / count if math.isfinite(correct) else None  # None: no logits (stage-local phase)
            row = {"epoch": epoch + 1, "loss": loss_sum / count, "train_accuracy": train_acc,
                   "test_accuracy": test_acc, "test_accuracy_at": _accuracy_at(model, options, x_test, y_test),
                   "seconds": round(time.perf_counter() - start, 2),
                   "peak_memory_bytes": _peak_memory(dev), "lr": options.lr_at(min(total - 1, step), total),
                   "skipped_batches": skipped,
                   "reconstruction_error": reconstruction_errors(model, x_test[:256]),
                   "monitor_switched": [b.monitor.switched_at for b in model.blocks if b.monitor is not None] or None}
            history.append(row)
            if writer:
                _warn_reconstruction(epoch + 1, row["reconstruction_error"])
                record = _record(model, data, options, history, dev, world, objective)
                if out is not None:
                    save_checkpoint(out, model, record)
                if log is not None:
                    with log.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                if out is not None:  # last: the training state marks the epoch as done
                    _save_state(state_path(out), opt, {
                        "epoch": epoch + 1, "history": history, "seconds": row["seconds"], "options": asdict(options),
                        "reconstruction_monitor": record["training"].get("reconstruction_monitor", []),
                        "log": _log_record(log, state_path(out)), "weights": model.state_dict(),
                        "objective": objective.settings})
                if show_progress:
                    train_text = "-" if train_acc is None else f"{100 * train_acc:.2f} %"
                    at = "".join(f", {r['scheme'] or model.config.scheme} {fmt_depths(r['depths'])} {100 * r['accuracy']:.2f} %"
                                 for r in row["test_accuracy_at"] or [])
                    bar.console.print(f"epoch {epoch + 1}/{options.epochs}: loss {row['loss']:.4f}, train {train_text}, "
                                      f"test {100 * test_acc:.2f} %{at}, {row['seconds']:.0f} s")
    return model.cpu().eval(), _record(model, data, options, history, dev, world, objective)


def _record(model: ODENet, data: Dataset, options: TrainOptions, history: list[dict], dev, world: int,
            objective=None) -> dict:
    last = history[-1]
    record = {
        "data": data.describe(),
        "metrics": {"test_accuracy": last["test_accuracy"], "train_accuracy": last["train_accuracy"],
                    "train_loss": last["loss"]},
        "training": {"method": model.config.grad, **asdict(options), "seconds": last["seconds"],
                     "device": _device_name(dev), "processes": world, "torch": torch.__version__,
                     "skipped_batches": sum(row.get("skipped_batches", 0) for row in history), "history": history},
    }
    monitors = [{"block": i, "every": b.monitor.every, "tolerance": b.monitor.tolerance, "calls": b.monitor.calls,
                 "switched_at_step": b.monitor.switched_at, "checks": b.monitor.history}
                for i, b in enumerate(model.blocks) if b.monitor is not None]
    if monitors:
        record["training"]["reconstruction_monitor"] = monitors
    if objective is not None and objective.settings:
        record["training"]["objective"] = objective.settings
    return record
