"""Distillation: a trained ResNet → a student whose weights are a smooth curve, fitted to the function.

A ResNet trained as a ResNet is not a discretization of one ODE: its neighbouring blocks are not
samples of a smooth curve, so the weight-space fit (``--interp smooth``) changes its function and
re-solving it at another depth loses accuracy. Distillation keeps the function instead:

1. The student has the teacher's architecture (stem, transitions, head copied) and a curve of K
   knots per stage, piecewise linear in depth, initialized by the least-squares fit of the teacher's
   step weights (with K equal to the native depth and euler it *is* the teacher). Cubic curves were
   tried and distilled far worse: on rough knots the not-a-knot spline swings wildly past the last
   knot, where heun's final stage samples it (digits teacher, 30 epochs: 51-76 % against 88-90 %).
2. Stage-local matching (``local_epochs``): each student ODE block, given the teacher's input to
   that stage, matches the teacher's output of the stage, ‖S_i(x_i) − T_i(x_i)‖² / ‖T_i(x_i) − x_i‖²
   summed over stages. Cheap and label-free.
3. End to end on the teacher's logits: T² KL(softmax(t/T) ‖ softmax(s/T)) (Hinton et al. 2015),
   plus ``label_weight`` × cross-entropy on the labels (0: unlabelled inputs suffice).

Every batch is solved at a depth and scheme drawn from lists (robust.py), so the student is
accurate across them, not only at one. Training itself (checkpoints, resume, logs, any gradient
method) is :func:`resode_export.train.train` with this objective.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .curves import INTERPOLATIONS, Curve
from .data import Dataset
from .errors import ResodeError
from .evaluate import accuracy, predict
from .network import ODEBlock, ODENet

DEFAULT_MAX_KNOTS = 4
STUDENT_INTERP = "linear"  # measured: cubic students extrapolate rough knots wildly past the last knot (heun's t = 1)


def default_knots(teacher: ODENet) -> tuple[int, ...]:
    """Each stage's native depth, capped at 4."""
    return tuple(min(d, DEFAULT_MAX_KNOTS) for d in teacher.config.depths)


def fit_curve(block: ODEBlock, num_knots: int, interp: str = STUDENT_INTERP) -> Curve:
    """The K-knot curve (``interp``) closest in least squares to the block's weights at its native steps.

    The teacher's step n at depth N uses θ(n/N); the fit solves min_W ‖B W − Θ‖ with B (N × K) the
    interpolation's weights at t_n = n/N. With K ≥ N the knots are the teacher's curve at t_k = k/K
    (with K = N, every step's weights).
    """
    if num_knots < 1:
        raise ResodeError(f"--knots must be at least 1, got {num_knots}")
    n = block.depth
    ts = np.arange(n) / n
    if num_knots >= n:  # as many knots as steps or more: the teacher's own curve at the new knots' times
        with torch.no_grad():
            return Curve({k: v.clone() for k, v in block.curve.sample(np.arange(num_knots) / num_knots).items()},
                         interp)
    with torch.no_grad():
        theta = block.curve.sample(ts)  # name → (N, *shape)
        basis = torch.from_numpy(INTERPOLATIONS[interp](ts * num_knots, num_knots))  # (N, K), float64
        pinv = torch.linalg.pinv(basis)  # (K, N)
        knots = {k: (pinv @ v.double().reshape(n, -1)).reshape(num_knots, *v.shape[1:]).to(v.dtype)
                 for k, v in theta.items()}
    return Curve(knots, interp)


def make_student(teacher: ODENet, knots: tuple[int, ...] | None = None, interp: str = STUDENT_INTERP) -> ODENet:
    """The teacher's architecture with a smooth curve of ``knots[i]`` knots in stage i (a copy; teacher untouched)."""
    knots = tuple(knots) if knots is not None else default_knots(teacher)
    if len(knots) != len(teacher.blocks):
        raise ResodeError(f"--knots lists {len(knots)} values but the teacher has {len(teacher.blocks)} stages")
    if min(knots) < 1:
        raise ResodeError(f"--knots must be at least 1 in every stage, got {list(knots)}")
    config = replace(teacher.config, knots=knots, interp=interp, n_basis=None)
    blocks = [ODEBlock(b.field, fit_curve(b, k, interp), b.depth, b.scheme, b.grad) for b, k in zip(teacher.blocks, knots)]
    return teacher._with_blocks(config, blocks)


class Distillation:
    """The objective of :func:`~resode_export.train.train` for distillation (see the module's docstring).

    Args:
        teacher: the model to imitate (its own depth and scheme; never trained).
        temperature: of the softened distributions, > 0.
        label_weight: weight of the cross-entropy on labels (0: the labels are not used).
        local_epochs: epochs of stage-local matching before the end-to-end phase.
    """

    def __init__(self, teacher: ODENet, temperature: float = 4.0, label_weight: float = 0.5, local_epochs: int = 1):
        if not 0 < temperature <= 1e3:
            raise ResodeError(f"--temperature must be a number in (0, 1000], got {temperature:g}")
        if not 0 <= label_weight <= 1e3:
            raise ResodeError(f"--label-weight must be a number in [0, 1000], got {label_weight:g}")
        if local_epochs < 0:
            raise ResodeError(f"--local-epochs must be 0 or more, got {local_epochs}")
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.temperature, self.label_weight, self.local_epochs = float(temperature), float(label_weight), local_epochs
        self.settings = {"distillation": {"temperature": self.temperature, "label_weight": self.label_weight,
                                          "local_epochs": local_epochs}}

    def to(self, device) -> Distillation:
        self.teacher = self.teacher.to(device)
        return self

    def __call__(self, net, x: Tensor, y: Tensor, epoch: int) -> tuple[Tensor, Tensor | None]:
        student = getattr(net, "module", net)  # under DistributedDataParallel
        if epoch < self.local_epochs:
            return self.stage_local(student, x), None
        with torch.no_grad():
            target = self.teacher(x)
        logits = net(x)
        t = self.temperature
        loss = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(target / t, dim=1), log_target=True,
                        reduction="sum") * t * t
        if self.label_weight:
            loss = loss + self.label_weight * F.cross_entropy(logits, y, reduction="sum")
        return loss, logits

    def stage_local(self, student: ODENet, x: Tensor) -> Tensor:
        """Σ_i ‖S_i(x_i) − T_i(x_i)‖² / ‖T_i(x_i) − x_i‖² × batch (the train loop divides by the batch)."""
        pairs = []

        def keep(i, block, xi):
            out = block(xi)
            pairs.append((i, xi, out))
            return out

        with torch.no_grad():
            self.teacher.run(x, keep)
        loss = x.new_zeros(())
        for i, xi, out in pairs:
            change = (out - xi).pow(2).sum().clamp_min(torch.finfo(out.dtype).tiny)
            loss = loss + (student.blocks[i](xi) - out).pow(2).sum() / change
        return loss * len(x)


@torch.no_grad()
def depth_rows(student: ODENet, teacher: ODENet, data: Dataset, depths: list[list[int]], schemes: list[str],
               limit: int | None = None, progress=None, device=None) -> list[dict]:
    """Test accuracy of the student, and of the teacher's plain conversion, at every depth × scheme (on ``device``;
    the models move there)."""
    x, y = data.x_test[:limit].to(device), data.y_test[:limit].to(device)
    student, teacher = student.to(device), teacher.to(device)
    rows = []
    task = progress.add_task("measuring", total=len(depths) * len(schemes)) if progress else None
    for scheme in schemes:
        for d in depths:
            row = {"depth": d[0] if len(set(d)) == 1 else list(d), "scheme": scheme}
            for name, model in (("accuracy", student), ("conversion_accuracy", teacher)):
                with model.solving_at(d, scheme):
                    row[name] = accuracy(predict(model, x), y)
            rows.append(row)
            if progress:
                progress.advance(task)
    return rows





def _teacher_and_data(teacher: str | None, data: str | None, source: str, input_size, bn: str | None,
                      normalize: str | None):
    from .convert import (
        apply_normalize,
        dataset_for,
        fit_input,
        image_size,
        is_foreign,
        load_model,
        parse_input_size,
        parse_normalize,
        resolve_model,
    )
    from .data import check_samples, load_data

    size, norm = parse_input_size(input_size), parse_normalize(normalize)
    foreign = is_foreign(resolve_model(teacher))
    net, header, path = load_model(teacher, source, size, bn)
    net = apply_normalize(net, norm, foreign).discretize(grad="backprop")  # the teacher is never trained
    if data:
        dataset = load_data(data, input_size=size or image_size(net), unlabelled_ok=True)
    elif foreign:
        raise ResodeError(f"{path.name} is a state dict with no data set: give --data (its inputs; labels optional "
                          "with --label-weight 0)")
    else:
        dataset = dataset_for(header)
    net = fit_input(net, dataset)
    check_samples(dataset.in_shape, net.config.in_shape, data="--data", model="the teacher")
    net = net.float().eval()
    unlabelled = bool((dataset.y_train < 0).any() or (dataset.y_test < 0).any())
    if unlabelled:  # an unlabelled .npz: the teacher's predictions stand in for labels
        dataset.y_train, dataset.y_test = (predict(net, x).argmax(1) for x in (dataset.x_train, dataset.x_test))
        dataset.split += "; no labels in the file: the teacher's predictions stand in (accuracy = agreement)"
    return net, header, path, dataset, unlabelled


def _student(teacher: ODENet, knots: str | None, scheme: str, grad: str) -> ODENet:
    """The student of ``--knots`` (default: native depths capped at 4), refused up front if it would not fit."""
    from .newmodel import int_list, per_stage
    from .resources import check_training

    stages = len(teacher.config.depths)
    knot_list = per_stage(int_list(knots, "--knots"), stages, "--knots") if knots else default_knots(teacher)
    check_training(replace(teacher.config, knots=knot_list))  # weights, gradients, Adam: before any allocation
    return make_student(teacher, knot_list).discretize(scheme=scheme, grad=grad)


def run_distillation(teacher: str | None, *, data: str | None, knots: str | None, depths: str, schemes: str,
                     epochs: int, local_epochs: int, batch_size: int, lr: float, warmup: float, augment: bool,
                     clip_grad: float | None,
                     temperature: float,
                     label_weight: float, grad: str, weight_decay: float, seed: int, device: str, out, log,
                     resume: bool, source: str = "auto", input_size=None, bn: str | None = None,
                     normalize: str | None = None, command: str = "") -> dict | None:
    """``resode distill``: load the teacher and data, distil (train with :class:`Distillation`), measure, write.

    Returns the result ``--json`` prints (None in a torchrun process that does not write).
    """
    import json
    import sys
    import time
    from pathlib import Path

    from .data import data_warning
    from .gradients import check_compatible
    from .io import digest
    from .robust import parse_depth_choices, parse_schemes
    from .train import TrainOptions, is_writer, train

    start = time.perf_counter()
    net, header, path, dataset, unlabelled = _teacher_and_data(teacher, data, source, input_size, bn, normalize)
    if unlabelled and label_weight and is_writer():
        print(f"note: the data have no labels, so --label-weight {label_weight:g} is 0: the teacher's logits carry "
              "all there is to learn", file=sys.stderr)
    label_weight = 0.0 if unlabelled else label_weight
    warning = data_warning(dataset) if net.config.normalize is None else None
    if warning and is_writer():
        print(f"warning: {warning}", file=sys.stderr)
    if local_epochs >= epochs:
        raise ResodeError(f"--local-epochs {local_epochs} leaves no end-to-end epoch of --epochs {epochs}; "
                          "give more --epochs or fewer --local-epochs")
    native = net.config.depths
    choices = parse_depth_choices(depths, native)
    scheme_list = parse_schemes(schemes)
    for s in scheme_list:
        check_compatible(grad, s)
    student = _student(net, knots, scheme_list[0], grad)
    objective = Distillation(net, temperature, label_weight, local_epochs)
    # a resumed run must distil the same teacher into the same student (train compares the settings)
    objective.settings["distillation"].update(
        teacher=digest(net.state_dict(), {"normalize": json.dumps(net.config.normalize)}),
        knots=list(student.config.knots), grad=grad)
    options = TrainOptions(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                           device=device, depths=choices, schemes=scheme_list, warmup=warmup, augment=augment,
                           clip_grad=clip_grad)
    log_path = Path(log) if log is not None else Path(out).with_name(Path(out).stem + ".log.jsonl")
    student, record = train(student, dataset, options, out=out, resume=resume, log=log_path, objective=objective,
                            new_log=True)
    if not is_writer():
        return None
    result = _measure_and_write(student, net, path, dataset, record, choices, scheme_list, device, out, command)
    return {**result, "log": str(log_path), "seconds": round(time.perf_counter() - start, 3)}


def _measure_and_write(student: ODENet, teacher: ODENet, path, dataset: Dataset, record: dict,
                       choices: list[list[int]], schemes: list[str], device: str, out, command: str) -> dict:
    """The finished student measured against the teacher at every depth × scheme, then its checkpoint and card."""
    from .cards import write_model_card
    from .evaluate import progress_bar
    from .io import save_checkpoint
    from .train import resolve_device

    dev, native = resolve_device(device), list(teacher.config.depths)
    teacher_accuracy = accuracy(predict(teacher.to(dev), dataset.x_test.to(dev)), dataset.y_test)
    with progress_bar() as bar:
        rows = depth_rows(student, teacher, dataset, [native, *[c for c in choices if c != native]], schemes,
                          progress=bar, device=dev)
    student = student.cpu()
    record["training"].update(init=f"distilled from {path}", command=command)
    record["distilled_from"] = {"path": str(path), "depths": native, "scheme": teacher.config.scheme,
                                "test_accuracy": teacher_accuracy}
    save_checkpoint(out, student, record)
    card = write_model_card(out, student, record, command)
    return {"teacher": str(path), "teacher_accuracy": teacher_accuracy, "teacher_depth": native,
            "teacher_scheme": teacher.config.scheme, "knots": list(student.config.knots), "rows": rows,
            "checkpoint": str(out), "card": str(card), "device": record["training"]["device"]}
__all__ = ["Distillation", "default_knots", "depth_rows", "fit_curve", "make_student", "run_distillation"]
