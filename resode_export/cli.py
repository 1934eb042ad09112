"""The ``resode`` command: thin Typer commands over the library.

Tables go to stdout, progress to stderr; ``--json`` prints exactly one JSON object instead.
Exit codes: 0 success, 2 bad input (one line on stderr), 1 any other failure.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .curves import INTERPOLATIONS
from .data import DATASETS, check_samples
from .errors import ResodeError
from .fields import ACTIVATIONS, BN_FORMS
from .gradients import GRADIENTS, compatible
from .importers.torchvision import SOURCES
from .io import check_output_path
from .network import ARCHS, INITS, MAX_DEPTH, check_depth
from .schemes import SCHEMES
from .train import OPTIMIZERS, SCHEDULES

SchemeName = Enum("SchemeName", {k: k for k in SCHEMES}, type=str)
InterpName = Enum("InterpName", {k: k for k in INTERPOLATIONS}, type=str)
ArchName = Enum("ArchName", {k: k for k in ARCHS if k != "resnet"}, type=str)  # resnet: imported, not trained new
SourceName = Enum("SourceName", {k: k for k in SOURCES}, type=str)
BnName = Enum("BnName", {k: k for k in BN_FORMS}, type=str)
ActivationName = Enum("ActivationName", {k: k for k in ACTIVATIONS}, type=str)
GradName = Enum("GradName", {k: k for k in GRADIENTS}, type=str)
TrainInitName = Enum("TrainInitName", {k: k for k in (*INITS, "tied")}, type=str)
OptimizerName = Enum("OptimizerName", {k: k for k in OPTIMIZERS}, type=str)
ScheduleName = Enum("ScheduleName", {k: k for k in SCHEDULES}, type=str)
DeviceName = Enum("DeviceName", {k: k for k in ("auto", "cpu", "cuda")}, type=str)

_invocation: list[str] = []  # the arguments main() was given, recorded in model cards

app = typer.Typer(
    help="Turn deep ResNets into continuous-depth models (neural ODEs) and back.",
    add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)

ModelArg = Annotated[
    Optional[str],
    typer.Argument(help="A resode .safetensors checkpoint, a shipped model's name (digits-mlp, fashion-conv), "
                        "or a torchvision-style ResNet state dict (.pth/.pt, imported). Default: digits-mlp.",
                   show_default=False),
]
FromOpt = Annotated[SourceName, typer.Option(
    "--from", help="Imports: the architecture the state dict must be (auto: recognize it from the keys).")]
InputSizeOpt = Annotated[Optional[str], typer.Option(
    help="Imports: input height[,width] in pixels the model is meant for.  [default: 224]", show_default=False)]
BnOpt = Annotated[Optional[BnName], typer.Option(
    "--bn", help="Imports: BatchNorm folded into the convs, or kept frozen as scale and shift (trainable).  "
                 "[default: fold; frozen for train]", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
NormalizeOpt = Annotated[Optional[str], typer.Option(
    help="New models and imports: the input normalization MEAN,STD (or each channel's mean, then each one's std), "
         "recorded in the checkpoint and applied before the stem by every command and in exported graphs.",
    show_default=False)]
DepthsOpt = Annotated[Optional[str], typer.Option(
    help="Depth-robust training: each batch is solved at a depth drawn from this comma list (steps in every stage, "
         "or factors of the native depths such as 0.5x,1x,2x).", show_default=False)]
SchemesOpt = Annotated[Optional[str], typer.Option(
    help="Each batch is solved with a scheme drawn from this comma list (e.g. euler,heun).", show_default=False)]
WarmupOpt = Annotated[float, typer.Option(help="Fraction of the steps over which the learning rate rises from 0.")]
ClipOpt = Annotated[Optional[float], typer.Option(
    help="Rescale each batch's gradient to at most this norm.", show_default=False)]
AugmentOpt = Annotated[bool, typer.Option(
    "--augment", help="Images: shift each by up to 2 pixels and flip it left-right at random, per batch.")]


def _version(value: bool):
    if value:
        print(f"resode {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
):
    pass


def _emit(result: dict, as_json: bool, title: str, rows: list[tuple[str, str]]) -> None:
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def _import_record(header: dict) -> dict | None:
    """The ``imported`` record of an import (or of a checkpoint converted from one), if it is an object."""
    record = header.get("imported")
    return record if isinstance(record, dict) and record else None


def _fmt_depths(depths) -> int | list[int]:
    depths = list(depths)
    return depths[0] if len(set(depths)) == 1 else depths


@app.command()
def convert(
    model: ModelArg = None,
    depth: Annotated[Optional[str], typer.Option(
        help=f"Steps of every ODE block (1..{MAX_DEPTH}), or a comma list with one per stage. Default: native.")] = None,
    depth_scale: Annotated[Optional[float], typer.Option(
        help="Multiply each block's native depth by this factor.")] = None,
    scheme: Annotated[Optional[SchemeName], typer.Option(help="Runge–Kutta scheme. Default: native.")] = None,
    interp: Annotated[Optional[InterpName], typer.Option(
        help="How weights are interpolated in depth. Default: the model's.")] = None,
    n_basis: Annotated[Optional[int], typer.Option(
        min=1, help="B-splines of --interp smooth (fewer than the knots). Default: √(knots), rounded up.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the converted checkpoint here.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Measure on the first N test samples only.")] = None,
    data: Annotated[Optional[str], typer.Option(
        help="Measure on this data set's test split.  [default: the model's own; random inputs for imports]",
        show_default=False)] = None,
    source_arch: FromOpt = SourceName.auto,
    input_size: InputSizeOpt = None,
    bn: BnOpt = None,
    normalize: NormalizeOpt = None,
    as_json: JsonOpt = False,
):
    """Import a ResNet or re-discretize a model at another depth, scheme or interpolation; measure what changes."""
    from .convert import (
        apply_normalize,
        compare,
        dataset_for,
        fit_input,
        image_size,
        is_foreign,
        load_model,
        parse_depths,
        parse_input_size,
        parse_normalize,
    )
    from .data import load_data
    from .evaluate import progress_bar
    from .io import save_checkpoint

    start = time.perf_counter()
    if out is not None:
        _checkpoint_out(out, "convert")
    norm = parse_normalize(normalize)
    source, header, path = load_model(model, source_arch.value, parse_input_size(input_size), bn and bn.value)
    source = apply_normalize(source, norm, is_foreign(path))
    if out is not None and out.resolve() == path.resolve():
        raise ResodeError(f"--out {str(out)!r} is the model being converted; write the converted one to another file")
    if n_basis is not None and (interp.value if interp else source.config.interp) != "smooth":
        raise ResodeError("--n-basis sets the B-splines of --interp smooth; add --interp smooth or drop --n-basis")
    depths = parse_depths(depth, depth_scale, source.config.depths)
    new_scheme = scheme.value if scheme else source.config.scheme
    imported = _import_record(header)
    if data:
        data = load_data(data, input_size=image_size(source))
        fit_input(source, data)
    else:
        data = None if imported else dataset_for(header)
    grad = source.config.grad if compatible(source.config.grad, new_scheme) else "backprop"  # training-only setting
    target = source.discretize(depths, new_scheme, interp and interp.value, n_basis, grad=grad)
    with progress_bar() as bar:
        report = compare(source, target, data, limit, progress=bar)
    src_cfg, cfg = source.config, target.config
    result = {
        "model": str(path),
        "source_depth": _fmt_depths(src_cfg.depths), "source_scheme": src_cfg.scheme, "source_interp": src_cfg.interp,
        "depth": _fmt_depths(cfg.depths), "scheme": cfg.scheme, "interp": cfg.interp,
        **report, "out": None, "seconds": None,
    }
    if imported:
        result["imported"] = imported
    if out is not None:
        info = {k: v for k, v in header.items() if k not in ("format_version", "config")}
        if data is not None:  # the metrics below were measured on it
            info["data"] = data.describe()
        info["converted_from"] = {"path": str(path), "depths": list(src_cfg.depths), "scheme": src_cfg.scheme,
                                  "interp": src_cfg.interp}
        if limit is None and report["accuracy"] is not None:
            info["metrics"] = {"test_accuracy": report["accuracy"]}
        else:  # measured on part of the test split only: claim nothing
            info.pop("metrics", None)
        result["out"] = str(save_checkpoint(out, target, info))
    result["seconds"] = round(time.perf_counter() - start, 3)
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f} %"

    rows = []
    if imported:
        dev = imported.get("max_rel_deviation")
        rows += [("imported", f"{imported.get('layout', '?')}, BatchNorm {imported.get('bn', '?')}"),
                 ("import vs original", f"{dev:.3e} max rel. deviation ({imported.get('probe', '?')})"
                  if isinstance(dev, (int, float)) else "-")]
    _emit(result, as_json, f"resode convert: {path.name}", rows + [
        ("source", f"depth {result['source_depth']}, {src_cfg.scheme}, {src_cfg.interp}"),
        ("converted", f"depth {result['depth']}, {cfg.scheme}, {cfg.interp}"),
        ("test samples", str(report["test_samples"]) if report["test_samples"] else
         f"none: {report['probe_samples']} random normal inputs"),
        ("source accuracy", pct(report["source_accuracy"])),
        ("converted accuracy", pct(report["accuracy"])),
        ("max rel. deviation", f"{report['max_rel_deviation']:.3e}"),
        ("mean rel. deviation", f"{report['mean_rel_deviation']:.3e}"),
        ("written to", result["out"] or "-"),
        ("wall time", f"{result['seconds']:.2f} s"),
    ])


@app.command()
def train(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(
        help="Fine-tune this checkpoint instead of training a new model.", show_default=False)] = None,
    arch: Annotated[ArchName, typer.Option(help="mlp (vectors) or conv (images).")] = ArchName.mlp,
    data: Annotated[Optional[str], typer.Option(
        help=f"{', '.join(DATASETS)}, a folder of MNIST-style IDX files or of images (DIR/<class>/*, ImageFolder "
             "style), or a .npz with x_train, y_train, x_test, "
             "y_test.  [default: digits, or the model's own data]", show_default=False)] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder with Fashion-MNIST's IDX files.")] = None,
    depth: Annotated[Optional[str], typer.Option(
        help="Steps of every ODE block, or a comma list per stage.  [default: 32, or the model's]")] = None,
    width: Annotated[Optional[str], typer.Option(
        help="Width (mlp) or channels (conv) of each stage, comma list.  [default: 32 (mlp), 16,32 (conv)]",
        show_default=False)] = None,
    hidden: Annotated[int, typer.Option(min=1, help="Hidden width of the perceptron field.")] = 64,
    scheme: Annotated[Optional[SchemeName], typer.Option(help="Runge–Kutta scheme.  [default: euler, or the model's]")] = None,
    interp: Annotated[InterpName, typer.Option(help="Interpolation of weights in depth.")] = InterpName.linear,
    activation: Annotated[ActivationName, typer.Option(help="Activation of the fields.")] = ActivationName.gelu,
    stem_stride: Annotated[Optional[int], typer.Option(
        min=1, help="Stride of the conv stem.  [default: 2 for images of 16 pixels a side or more, else 1]",
        show_default=False)] = None,
    knots: Annotated[Optional[str], typer.Option(
        help="Knots of each stage's weight curve, or a comma list per stage.  [default: the depth; the smallest of "
             "--depths]", show_default=False)] = None,
    depths: DepthsOpt = None,
    schemes: SchemesOpt = None,
    input_size: Annotated[Optional[str], typer.Option(
        help="Image folders: resize images to height[,width] pixels; imports: the input size.", show_default=False)] = None,
    init: Annotated[TrainInitName, typer.Option(
        help="smooth: the same weights at every step, zero output layers (Marion et al.); tied: one set of weights "
             "per stage (Sander et al.); iid: an independent draw per step.")] = TrainInitName.smooth,
    untie: Annotated[bool, typer.Option("--untie", help="Fine-tuning: give a tied model one knot per step.")] = False,
    grad: Annotated[Optional[GradName], typer.Option(
        help="How gradients go through the ODE blocks. adjoint: memory-free, approximate (Sander et al.); "
             "auto: adjoint, switching to symplectic if its reconstruction drifts; symplectic, checkpoint: exact; "
             "reversible: exact, memory flat in depth, with --scheme reversible_heun.  [default: backprop]")] = None,
    adjoint: Annotated[bool, typer.Option("--adjoint", help="Shorthand for --grad adjoint.")] = False,
    optimizer: Annotated[OptimizerName, typer.Option(
        help="adam (AdamW) or sgd (Nesterov momentum 0.9).")] = OptimizerName.adam,
    schedule: Annotated[ScheduleName, typer.Option(help="Learning-rate schedule.")] = ScheduleName.cosine,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="Global batch size (split across torchrun processes).")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate, > 0.")] = 1e-2,
    warmup: WarmupOpt = 0.05,
    augment: AugmentOpt = False,
    clip_grad: ClipOpt = None,
    normalize: NormalizeOpt = None,
    weight_decay: Annotated[float, typer.Option(help="Decoupled weight decay, >= 0.")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[DeviceName, typer.Option(help="auto picks cuda when there is one.")] = DeviceName.auto,
    out: Annotated[Path, typer.Option(
        help="Checkpoint, written after every epoch; its optimizer state (.train-state.safetensors) and a model "
             "card (.md) go beside it.")] = Path("model.safetensors"),
    log: Annotated[Optional[Path], typer.Option(
        help="JSON lines of per-epoch metrics.  [default: beside --out, .log.jsonl]", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run whose checkpoint is --out.")] = False,
    skip_nonfinite: Annotated[bool, typer.Option(
        "--skip-nonfinite", help="Skip a batch whose loss or gradient is NaN or infinite (no optimizer step; counted "
                                 "in the log) instead of stopping; training still stops when more than a tenth of an "
                                 "epoch's batches are skipped.")] = False,
    as_json: JsonOpt = False,
):
    """Train an ODENet (from a smooth-in-depth start) or fine-tune a checkpoint."""
    from .cards import write_model_card
    from .convert import parse_input_size, parse_normalize, resolve_model
    from .data import data_warning
    from .io import save_checkpoint
    from .newmodel import training_model
    from .robust import parse_schemes
    from .train import TrainOptions, is_writer
    from .train import train as run_training

    _checkpoint_out(out, "train")
    _distinct_outputs(out, log, {"MODEL": None if resume or model is None else resolve_model(model), "--data": data})
    if adjoint and grad not in (None, GradName.adjoint):
        raise ResodeError(f"--adjoint conflicts with --grad {grad.value}; give one of them")
    method = "adjoint" if adjoint else (grad.value if grad else None)
    if model is not None and not resume:  # fine-tuning keeps the checkpoint's architecture: options that build
        # another would be ignored. (--resume is the run's own command line again, which names them.)
        given = _given(ctx, "arch", "width", "hidden", "activation", "init", "interp", "stem_stride", "knots")
        if given:
            one = len(given) == 1
            raise ResodeError(f"{', '.join(given)} only appl{'ies' if one else 'y'} to a new model and fine-tuning "
                              f"keeps the checkpoint's architecture: drop {'it' if one else 'them'} (--depth, "
                              "--scheme and --grad do apply)")
    elif untie and not resume:
        raise ResodeError("--untie fine-tunes a tied checkpoint: give it as MODEL (resode train MODEL --untie)")
    scheme_list = parse_schemes(schemes) if schemes is not None else None
    net, dataset, choices = training_model(
        model, resume=resume, out=out, data=data, data_dir=data_dir, input_size=parse_input_size(input_size),
        normalize=parse_normalize(normalize), depth=depth, depths=depths, scheme=scheme and scheme.value,
        schemes=scheme_list, grad=method, untie=untie, arch=arch.value, width=width, knots=knots,
        stem_stride=stem_stride, init=init.value, hidden=hidden, activation=activation.value, interp=interp.value,
        seed=seed)
    options = TrainOptions(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer.value,
                           schedule=schedule.value, weight_decay=weight_decay, seed=seed, device=device.value,
                           skip_nonfinite=skip_nonfinite, depths=choices, schemes=scheme_list, warmup=warmup,
                           augment=augment, clip_grad=clip_grad)
    warning = data_warning(dataset) if net.config.normalize is None else None
    if warning and is_writer():
        print(f"warning: {warning}", file=sys.stderr)
    log_path = log if log is not None else out.with_name(out.stem + ".log.jsonl")
    if log is not None:
        check_output_path(log)  # a resumed run's own log is checked against its training state
    net, record = run_training(net, dataset, options, out=out, resume=resume, log=log_path, new_log=True)
    record["training"]["init"] = "fine-tuned from " + str(model) if model else init.value
    command = "resode " + shlex.join(_invocation)
    if not is_writer():
        return
    save_checkpoint(out, net, {**record, "training": {**record["training"], "command": command}})
    card = write_model_card(out, net, record, command)
    cfg = net.config
    result = {"checkpoint": str(out), "card": str(card), "log": str(log_path),
              "test_accuracy": record["metrics"]["test_accuracy"], "train_accuracy": record["metrics"]["train_accuracy"],
              "train_loss": record["metrics"]["train_loss"], "epochs": epochs, "grad": cfg.grad, "scheme": cfg.scheme,
              "depth": _fmt_depths(cfg.depths), "seconds": record["training"]["seconds"],
              "device": record["training"]["device"], "parameters": sum(p.numel() for p in net.parameters())}
    _emit(result, as_json, "resode train", [
        ("checkpoint", str(out)), ("model card", str(card)), ("log", str(log_path)),
        ("test accuracy", f"{100 * result['test_accuracy']:.2f} %"),
        ("train accuracy", f"{100 * result['train_accuracy']:.2f} %"),
        ("model", f"depth {result['depth']}, {cfg.scheme}, {cfg.grad} gradients, {result['parameters']} parameters"),
        ("time", f"{result['seconds']} s on {result['device']}"),
    ])


@app.command()
def distill(
    teacher: Annotated[Optional[str], typer.Argument(
        help="The model to distil: a resode checkpoint, a shipped model's name, or a torchvision-style ResNet "
             "state dict (.pth/.pt/.safetensors; give --data and, for imports, --input-size).", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option(
        help="Inputs to distil on (labels optional: --label-weight 0 ignores them).  [default: the teacher's data]",
        show_default=False)] = None,
    knots: Annotated[Optional[str], typer.Option(
        help="Knots of each stage's smooth curve, or a comma list per stage.  [default: native depth, at most 4]",
        show_default=False)] = None,
    depths: Annotated[str, typer.Option(
        help="Each batch runs at a depth drawn from this list: steps in every stage, or factors of the native "
             "depths (0.5x).")] = "0.5x,1x,2x",
    schemes: Annotated[str, typer.Option(help="Each batch runs with a scheme drawn from this list.")] = "euler,heun",
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    local_epochs: Annotated[int, typer.Option(
        min=0, help="First epochs matching each stage's output to the teacher's, given its input (no labels).")] = 1,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (Adam, cosine), > 0.")] = 1e-3,
    warmup: WarmupOpt = 0.05,
    augment: AugmentOpt = False,
    clip_grad: ClipOpt = 1.0,
    normalize: NormalizeOpt = None,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the logit matching.")] = 4.0,
    label_weight: Annotated[float, typer.Option(
        help="Weight of cross-entropy on the labels; 0: unlabelled inputs (the teacher's logits only).")] = 0.5,
    grad: Annotated[GradName, typer.Option(help="How gradients go through the student's ODE blocks.")] = GradName.backprop,
    weight_decay: Annotated[float, typer.Option(help="Decoupled weight decay, >= 0.")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[DeviceName, typer.Option(help="auto picks cuda when there is one.")] = DeviceName.auto,
    out: Annotated[Path, typer.Option(help="The student checkpoint, written after every epoch.")] = Path(
        "student.safetensors"),
    log: Annotated[Optional[Path], typer.Option(
        help="JSON lines of per-epoch metrics.  [default: beside --out, .log.jsonl]", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run whose checkpoint is --out.")] = False,
    source_arch: FromOpt = SourceName.auto,
    input_size: InputSizeOpt = None,
    bn: BnOpt = None,
    as_json: JsonOpt = False,
):
    """Distil a trained ResNet into a student whose weights are a smooth curve, accurate across depths."""
    from .convert import resolve_model
    from .distill import run_distillation

    _checkpoint_out(out, "distill")
    if log is not None:
        check_output_path(log)
    _distinct_outputs(out, log, {"TEACHER": resolve_model(teacher), "--data": data})
    result = run_distillation(
        teacher, data=data, knots=knots, depths=depths, schemes=schemes, epochs=epochs, local_epochs=local_epochs,
        batch_size=batch_size, lr=lr, warmup=warmup, augment=augment, clip_grad=clip_grad,
        temperature=temperature, label_weight=label_weight,
        grad=grad.value, weight_decay=weight_decay, seed=seed, device=device.value, out=out, log=log,
        resume=resume, source=source_arch.value, input_size=input_size, bn=bn and bn.value, normalize=normalize,
        command="resode " + shlex.join(_invocation))
    if result is None:  # a torchrun rank other than 0
        return
    rows = [(f"{r['scheme']} depth {r['depth']}", f"{100 * r['accuracy']:.2f} % (plain conversion "
             f"{100 * r['conversion_accuracy']:.2f} %)") for r in result["rows"]]
    _emit(result, as_json, f"resode distill: {Path(result['teacher']).name}", [
        ("teacher", f"{100 * result['teacher_accuracy']:.2f} % at depth {result['teacher_depth']}, "
                    f"{result['teacher_scheme']}"),
        ("student knots", str(result["knots"])), *rows,
        ("checkpoint", result["checkpoint"]), ("time", f"{result['seconds']:.1f} s on {result['device']}"),
    ])


FormatName = Enum("FormatName", {k: k for k in ("onnx", "torchscript", "pt2", "torchvision")}, type=str)


@app.command()
def export(
    model: ModelArg = None,
    fmt: Annotated[FormatName, typer.Option("--format", help="onnx, torchscript, pt2 (torch.export), or torchvision "
                                            "(a ResNet state dict .pth; imported models, Euler).")] = FormatName.onnx,
    depth: Annotated[Optional[str], typer.Option(
        help=f"Steps of every ODE block (1..{MAX_DEPTH}), or one per stage. Default: native.")] = None,
    depth_scale: Annotated[Optional[float], typer.Option(help="Multiply each block's native depth by this.")] = None,
    scheme: Annotated[Optional[SchemeName], typer.Option(help="Runge–Kutta scheme. Default: native.")] = None,
    interp: Annotated[Optional[InterpName], typer.Option(help="Interpolation in depth. Default: the model's.")] = None,
    dynamic_depth: Annotated[bool, typer.Option(
        "--dynamic-depth", help="ONNX only: one graph with the depth as an int64 input 'depth'.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Output file. Default: <model>-<depth>-<scheme>.<ext> here.")] = None,
    source_arch: FromOpt = SourceName.auto,
    input_size: InputSizeOpt = None,
    bn: BnOpt = None,
    as_json: JsonOpt = False,
):
    """Export a model to ONNX, TorchScript, torch.export or torchvision, verified before it is written."""
    from .convert import dataset_for, load_model, parse_depths, parse_input_size
    from .export import FORMATS, export_model
    from .resources import check_static_export

    if out is not None:
        check_output_path(out)
        suffix, own = out.suffix.lower(), FORMATS[fmt.value]
        if suffix == ".safetensors":
            raise ResodeError("a .safetensors name is for resode checkpoints (resode convert and train write them); "
                              f"--format {fmt.value} writes a {own} file")
        claimed = {".onnx": "onnx", ".pt2": "pt2"}  # names only one form takes
        if claimed.get(suffix, fmt.value) != fmt.value or (own in claimed and suffix != own):
            raise ResodeError(f"--format {fmt.value} writes a {own} file, but --out ends in {suffix or 'no suffix'}; "
                              f"name it *{own} or give the matching --format")
    if dynamic_depth and (depth is not None or depth_scale is not None):
        raise ResodeError("--dynamic-depth takes the depth at run time (input 'depth'); drop --depth/--depth-scale")
    source, header, path = load_model(model, source_arch.value, parse_input_size(input_size), bn and bn.value)
    new_scheme = scheme.value if scheme else source.config.scheme
    fits = None if dynamic_depth else (lambda d: check_static_export(source, d, new_scheme))
    depths = parse_depths(depth, depth_scale, source.config.depths, fits)
    target = source.discretize(depths, scheme and scheme.value, interp and interp.value, grad="backprop")
    note = None
    try:
        data = dataset_for(header)
    except ResodeError as exc:  # verification still runs on random inputs; said once the export succeeded
        note = f"note: verified on random inputs only: {str(exc).removesuffix('; give --data')}"
        data = None
    if out is None:
        tag = "dyn" if dynamic_depth else "-".join(str(d) for d in sorted(set(depths)))
        out = Path.cwd() / f"{path.stem}-{tag}-{target.config.scheme}{FORMATS[fmt.value]}"
    meta = {"resode.source": path.name, "resode.data": header.get("data", {}).get("name", "")}
    result = export_model(target, fmt.value, out, dynamic_depth=dynamic_depth, data=data, metadata=meta)
    if note:
        print(note, file=sys.stderr)
    _emit(result, as_json, f"resode export: {path.name}", [
        ("file", result["path"]), ("format", fmt.value + (" (dynamic depth)" if dynamic_depth else "")),
        ("depth", "input 'depth'" if dynamic_depth else str(result["depth"])), ("scheme", result["scheme"]),
        ("size", f"{result['bytes'] / 2**20:.2f} MiB"),
        ("max relative deviation", f"{result['max_rel_deviation']:.2e}" + (
            f" (depths {', '.join(map(str, result['checked_depths']))})" if dynamic_depth else "")),
        ("time", f"{result['seconds']} s export, {result['verify_seconds']} s verification"),
    ])


@app.command()
def check(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(
        help="A resode checkpoint, a shipped model's name, or a .onnx file from resode export. Default: digits-mlp.",
        show_default=False)] = None,
    depths: Annotated[str, typer.Option(help="Comma list of depths to sweep.")] = "2,4,8,16,32,64,128",
    schemes: Annotated[str, typer.Option(
        help="Comma list of schemes (resode models; a .onnx file has its own).")] = "euler,heun,rk4",
    data: Annotated[Optional[str], typer.Option(
        help="digits, fashion-mnist, a folder of IDX files or of images, or an .npz. Default: the model's own.")] = None,
    tolerance: Annotated[float, typer.Option(help="Accuracy points a recommendation may lose, >= 0.")] = 0.5,
    plot: Annotated[Optional[Path], typer.Option(help="Draw accuracy and latency against depth to this PNG.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use the first N test samples only.")] = None,
    repeats: Annotated[int, typer.Option(min=3, help="Latency: timed calls at batch 1 (a tenth at batch 256).")] = 50,
    stage_search: Annotated[bool, typer.Option(
        "--stage-search", help="Search a depth per stage instead of sweeping --depths: from the native depths, halve "
                               "one stage at a time, keeping the fastest graph (onnxruntime, batch 1) whose accuracy "
                               "stays within --tolerance points of the native one; prints the depths for export "
                               "--depth a,b,c. Uses the first of --schemes when given, else the model's.")] = False,
    as_json: JsonOpt = False,
):
    """Accuracy, deviation from PyTorch and onnxruntime latency against depth × scheme; recommends the cheapest."""
    from .check import check_model, check_onnx
    from .check import plot as draw
    from .convert import dataset_for, fit_input, image_size, load_model
    from .data import load_data
    from .evaluate import progress_bar
    from .export import require_onnx
    from .newmodel import int_list
    from .robust import parse_schemes

    start = time.perf_counter()
    if plot is not None:
        check_output_path(plot)
        if plot.suffix.lower() != ".png":
            raise ResodeError(f"--plot writes a PNG: give a path ending in .png, got {str(plot)!r}")
    if not tolerance >= 0 or tolerance == float("inf"):
        raise ResodeError(f"--tolerance must be a finite number of accuracy points >= 0, got {tolerance:g}")
    depth_list = list(dict.fromkeys(check_depth(d) for d in int_list(depths, "--depths")))  # once each, in order
    require_onnx()
    scheme_list = parse_schemes(schemes)
    if model is not None and model.lower().endswith(".onnx"):
        path = Path(model)
        if stage_search:
            raise ResodeError("--stage-search exports graphs at each per-stage depth, so it needs the model: give the "
                              ".safetensors checkpoint the .onnx file was exported from")
        if not path.is_file():
            raise ResodeError(f"{path} does not exist; give a .onnx file from resode export")
        from .check import _onnx_metadata

        meta = _onnx_metadata(path)
        name = data or meta.get("resode.data")
        if not name:
            raise ResodeError(f"{path.name} names no data set: give --data")
        given = _given(ctx, "depths", "schemes")
        if "--depths" in given and meta.get("resode.dynamic_depth") != "true":
            print(f"note: {path.name} is a fixed-depth graph (depth {meta.get('resode.depths')}), so --depths is "
                  "ignored; export with --dynamic-depth to sweep depths", file=sys.stderr)
        if "--schemes" in given:
            print(f"note: {path.name} runs the scheme it was exported with ({meta.get('resode.scheme')}), so --schemes "
                  "is ignored; check the checkpoint to compare schemes", file=sys.stderr)
        with progress_bar() as bar:
            result = check_onnx(path, load_data(name), depth_list, tolerance, repeats, limit, progress=bar)
    else:
        source, header, path = load_model(model)
        dataset = load_data(data, input_size=image_size(source)) if data else dataset_for(header)
        source = fit_input(source, dataset)
        if stage_search:
            _stage_search(ctx, source, dataset, scheme_list, tolerance, repeats, limit, path, as_json)
            return
        if "--depths" not in _given(ctx, "depths"):  # the depths a depth-robust model was trained at join the sweep
            trained = (header.get("training") or {}).get("depths") or []
            depth_list = sorted({*depth_list, *(d[0] for d in trained if len(set(d)) == 1)})
        with progress_bar() as bar:
            result = check_model(source, dataset, depth_list, scheme_list, tolerance, repeats, limit, progress=bar)
    result["model"] = str(path)
    result["plot"] = str(draw(result, plot, f"resode check: {path.name}")) if plot is not None else None
    result["seconds"] = round(time.perf_counter() - start, 3)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"resode check: {path.name} (source accuracy {100 * result['source_accuracy']:.2f} %, "
                        f"reference: {result['reference']})")
    for col in ("depth", "scheme", "accuracy %", "max rel. deviation", "ms (batch 1)", "ms (batch 256)", "MiB"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        dev = "-" if r["max_rel_deviation"] is None else f"{r['max_rel_deviation']:.1e}"
        table.add_row(str(r["depth"]), r["scheme"], f"{100 * r['accuracy']:.2f}", dev, f"{r['latency_ms_b1']:.3f}",
                      f"{r['latency_ms_b256']:.2f}", f"{r['bytes'] / 2**20:.2f}")
    Console().print(table)
    rec = result["recommended"]
    if rec:
        print(f"recommended: depth {rec['depth']} with {rec['scheme']}: {100 * rec['accuracy']:.2f} % at "
              f"{rec['latency_ms_b1']:.3f} ms per sample (within {tolerance} points of {result['reference']})")
    else:
        print(f"no depth × scheme here stays within {tolerance} points of {result['reference']}; try deeper depths")
    if result["plot"]:
        print(f"plot: {result['plot']}")


def _stage_search(ctx, source, dataset, schemes, tolerance, repeats, limit, path, as_json) -> None:
    from .check import search_stage_depths
    from .evaluate import progress_bar

    if _given(ctx, "depths", "plot"):
        raise ResodeError("--stage-search searches the depths itself and draws no plot: drop --depths and --plot")
    scheme = schemes[0] if "--schemes" in _given(ctx, "schemes") else None
    with progress_bar() as bar:
        result = search_stage_depths(source, dataset, tolerance, scheme, repeats=repeats, limit=limit, progress=bar)
    result["model"] = str(path)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"resode check --stage-search: {path.name} ({result['scheme']}, reference "
                        f"{100 * result['reference_accuracy']:.2f} % at depths {result['start_depths']})")
    for col in ("depths", "accuracy %", "ms (batch 1)", "kept"):
        table.add_column(col, justify="right")
    for r in result["tried"]:
        table.add_row(",".join(map(str, r["depths"])), f"{100 * r['accuracy']:.2f}", f"{r['latency_ms_b1']:.3f}",
                      "yes" if r["kept"] else "")
    Console().print(table)
    rec = result["recommended"]
    speed = f", {rec['speedup']:.2f}× faster" if rec.get("speedup") else ""
    print(f"recommended: --depth {','.join(map(str, rec['depths']))} --scheme {result['scheme']}: "
          f"{100 * rec['accuracy']:.2f} % at {rec['latency_ms_b1']:.3f} ms per sample{speed}")


@app.command()
def inspect(
    model: ModelArg = None,
    data: Annotated[Optional[str], typer.Option(
        help="digits, fashion-mnist, a folder of IDX files or of images, or an .npz. Default: the model's own.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Test samples to measure on.")] = 256,
    tolerance: Annotated[float, typer.Option(
        help="Relative logit deviation from the limit ODE that a re-discretization may have.")] = 0.05,
    input_size: InputSizeOpt = None,
    bn: BnOpt = None,
    as_json: JsonOpt = False,
):
    """Is this ResNet ODE-like? Smoothness in depth, distance to its limit ODE, convergence, safe depths."""
    from .convert import dataset_for, fit_input, image_size, load_model, parse_input_size, probe_inputs
    from .data import load_data
    from .diagnose import inspect_model
    from .evaluate import progress_bar

    start = time.perf_counter()
    if not tolerance > 0 or tolerance != tolerance:
        raise ResodeError(f"--tolerance must be a positive number, got {tolerance}")
    net, header, path = load_model(model, input_size=parse_input_size(input_size), bn=bn and bn.value)
    imported = _import_record(header)
    if data or not imported:
        dataset = load_data(data, input_size=image_size(net)) if data else dataset_for(header)
        net = fit_input(net, dataset)
        x = dataset.x_test[:limit]
    else:  # an import carries no data set: how ODE-like it is does not need labels
        x = probe_inputs(net, min(limit, 16))
        print(f"note: measuring on {len(x)} random normal inputs of shape {tuple(net.config.in_shape)} "
              "(give --data for real ones)", file=sys.stderr)
    check_samples(x.shape[1:], net.config.in_shape)
    with progress_bar() as bar:
        result = {"model": str(path), **inspect_model(net, x, tolerance, progress=bar)}
    if imported:
        result["note"] = (
            f"imported ({imported.get('layout', 'a torchvision-style ResNet')}): ResNets trained as "
            "ResNets are usually rough in depth (Sander et al. 2022), their blocks unrelated steps of no single "
            "ODE, so expect 'not ODE-like' (or 'cannot judge', with one step a stage); to make one "
            "re-discretizable without losing its function, distil it: resode distill MODEL --data D (a weight-space "
            "fit, convert --interp smooth, loses most of its accuracy)")
    result["seconds"] = round(time.perf_counter() - start, 3)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"resode inspect: {path.name}")
    for col in ("stage", "depth", "knots", "parameters", "N·max‖Δθ‖/max‖θ‖", "N·mean‖Δθ‖/max‖θ‖",
                "distance to limit ODE"):
        table.add_column(col, justify="right")
    for st in result["stages"]:
        table.add_row(str(st["stage"]), str(st["depth"]), str(st["knots"]), str(st["parameters"]),
                      f"{st['roughness_max']:.3g}", f"{st['roughness_mean']:.3g}", f"{st['distance_to_limit_ode']:.3g}")
    Console().print(table)
    orders = ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in result["convergence_order"].items())
    depths = ", ".join(f"{k} {v if v is not None else '> ' + str(4 * max(net.config.depths))}"
                       for k, v in result["min_depth"].items())
    print(f"observed convergence order under re-discretization: {orders}")
    print(f"smallest depth within {tolerance:g} of the limit ODE ({result['reference']}): {depths}")
    print(result["verdict"])
    if result.get("note"):
        print(f"note: {result['note']}")


def _given(ctx: typer.Context, *names: str) -> list[str]:
    """The options among ``names`` that the command line gave (not their defaults), as --flags."""
    return [f"--{name.replace('_', '-')}" for name in names
            if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"]


def _distinct_outputs(out: Path, log: Path | None, inputs: dict) -> None:
    """--out, its training state and log (given or beside it) must not be an input or one another."""
    from .io import check_distinct
    from .train import state_path

    check_distinct({"--out": out, "--log": log if log is not None else out.with_name(out.stem + ".log.jsonl"),
                    "the training state": state_path(out)}, inputs)


def _checkpoint_out(out: Path, command: str) -> None:
    check_output_path(out)
    if out.suffix.lower() != ".safetensors":
        raise ResodeError(f"{command} writes a .safetensors checkpoint: give --out a name ending in .safetensors, got "
                          f"{str(out)!r} (resode export writes ONNX, TorchScript and pt2 files)")


UNFINISHED = ("files are written only when complete (a training run keeps its last finished epoch: run the same "
              "command with --resume to continue)")


class _Terminated(BaseException):
    """SIGTERM, raised where the program is, so that context managers clean up (temporary folders)."""


def _terminate_as_exception():
    """Turn SIGTERM into :class:`_Terminated` while the CLI runs (main thread, default handler only);
    return a function that puts the previous handler back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return lambda: None

    def raise_terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        raise _Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every error into one line on stderr and an exit code."""
    global _invocation
    args = sys.argv[1:] if argv is None else list(argv)
    _invocation = args
    # under torchrun every rank prints its own error; a rank other than 0 marks its line
    rank = os.environ.get("RANK", "0")
    tag = f"[rank {rank}] " if rank != "0" and os.environ.get("WORLD_SIZE", "1") != "1" else ""

    def say(text: str) -> None:
        print(f"{tag}error: {text}", file=sys.stderr)

    restore = _terminate_as_exception()
    try:
        code = app(args=args or ["--help"], prog_name="resode", standalone_mode=False)  # 130 for Ctrl-C, as typer has it
    except typer.Exit as exc:
        code = exc.exit_code
    except ResodeError as exc:
        say(str(exc))
        code = 2
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except _Terminated:
        say(f"terminated (SIGTERM); {UNFINISHED}")
        code = 143
    except Exception as exc:  # noqa: BLE001 - the boundary: no traceback for users
        if hasattr(exc, "format_message"):  # click's usage errors (typer may vendor its own click)
            say(" ".join(exc.format_message().split()).replace("Value error, ", ""))  # typer's enum validation
            code = 2
        else:
            say(f"{type(exc).__name__}: {exc}")
            code = 1
    finally:
        restore()
    if code == 130:
        say(f"interrupted; {UNFINISHED}")
    sys.exit(code if isinstance(code, int) else 0)
