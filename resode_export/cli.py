"""The ``resode`` command: thin Typer commands over the library.

Tables go to stdout, progress to stderr; ``--json`` prints exactly one JSON object instead.
Exit codes: 0 success, 2 bad input (one line on stderr), 1 any other failure.
"""

from __future__ import annotations

import json
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
from .data import DATASETS
from .errors import ResodeError
from .fields import ACTIVATIONS
from .gradients import GRADIENTS
from .network import ARCHS, INITS, MAX_DEPTH
from .schemes import SCHEMES

SchemeName = Enum("SchemeName", {k: k for k in SCHEMES}, type=str)
InterpName = Enum("InterpName", {k: k for k in INTERPOLATIONS}, type=str)
ArchName = Enum("ArchName", {k: k for k in ARCHS}, type=str)
InitName = Enum("InitName", {k: k for k in INITS}, type=str)
ActivationName = Enum("ActivationName", {k: k for k in ACTIVATIONS}, type=str)
GradName = Enum("GradName", {k: k for k in GRADIENTS}, type=str)
DeviceName = Enum("DeviceName", {k: k for k in ("auto", "cpu", "cuda")}, type=str)

_invocation: list[str] = []  # the arguments main() was given, recorded in model cards

app = typer.Typer(
    help="Turn deep ResNets into continuous-depth models (neural ODEs) and back.",
    add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)

ModelArg = Annotated[
    Optional[str],
    typer.Argument(help="A resode .safetensors checkpoint or a shipped model's name "
                        "(digits-mlp, fashion-conv). Default: digits-mlp.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]


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
    as_json: JsonOpt = False,
):
    """Re-discretize a model at another depth, scheme or interpolation, and measure what changes."""
    from .convert import compare, dataset_for, load_model, parse_depths
    from .evaluate import progress_bar
    from .io import check_output_path, save_checkpoint

    start = time.perf_counter()
    if out is not None:
        check_output_path(out)
    source, header, path = load_model(model)
    depths = parse_depths(depth, depth_scale, source.config.depths)
    target = source.discretize(depths, scheme and scheme.value, interp and interp.value, n_basis)
    data = dataset_for(header)
    with progress_bar() as bar:
        report = compare(source, target, data, limit, progress=bar)
    src_cfg, cfg = source.config, target.config
    result = {
        "model": str(path),
        "source_depth": _fmt_depths(src_cfg.depths), "source_scheme": src_cfg.scheme, "source_interp": src_cfg.interp,
        "depth": _fmt_depths(cfg.depths), "scheme": cfg.scheme, "interp": cfg.interp,
        **report, "out": None, "seconds": None,
    }
    if out is not None:
        info = {k: v for k, v in header.items() if k not in ("format_version", "config")}
        info["converted_from"] = {"path": str(path), "depths": list(src_cfg.depths), "scheme": src_cfg.scheme,
                                  "interp": src_cfg.interp}
        if limit is None:
            info["metrics"] = {**header.get("metrics", {}), "test_accuracy": report["accuracy"]}
        result["out"] = str(save_checkpoint(out, target, info))
    result["seconds"] = round(time.perf_counter() - start, 3)
    _emit(result, as_json, f"resode convert: {path.name}", [
        ("source", f"depth {result['source_depth']}, {src_cfg.scheme}, {src_cfg.interp}"),
        ("converted", f"depth {result['depth']}, {cfg.scheme}, {cfg.interp}"),
        ("test samples", str(report["test_samples"])),
        ("source accuracy", f"{100 * report['source_accuracy']:.2f} %"),
        ("converted accuracy", f"{100 * report['accuracy']:.2f} %"),
        ("max rel. deviation", f"{report['max_rel_deviation']:.3e}"),
        ("mean rel. deviation", f"{report['mean_rel_deviation']:.3e}"),
        ("written to", result["out"] or "-"),
        ("wall time", f"{result['seconds']:.2f} s"),
    ])


@app.command()
def train(
    arch: Annotated[ArchName, typer.Option(help="mlp (vectors) or conv (images).")] = ArchName.mlp,
    data: Annotated[str, typer.Option(help=f"{', '.join(DATASETS)}, or a folder of MNIST-style IDX files.")] = "digits",
    depth: Annotated[str, typer.Option(help="Steps of every ODE block, or a comma list per stage.")] = "32",
    width: Annotated[str, typer.Option(help="Width (mlp) or channels (conv) of each stage, comma list.")] = "32",
    hidden: Annotated[int, typer.Option(min=1, help="Hidden width of the perceptron field.")] = 64,
    scheme: Annotated[SchemeName, typer.Option(help="Runge–Kutta scheme.")] = SchemeName.euler,
    interp: Annotated[InterpName, typer.Option(help="Interpolation of weights in depth.")] = InterpName.linear,
    activation: Annotated[ActivationName, typer.Option(help="Activation of the fields.")] = ActivationName.gelu,
    stem_stride: Annotated[int, typer.Option(min=1, help="Stride of the conv stem.")] = 1,
    init: Annotated[InitName, typer.Option(help="smooth (tied weights, Marion et al.) or iid.")] = InitName.smooth,
    grad: Annotated[Optional[GradName], typer.Option(
        help="How gradients go through the ODE blocks. adjoint: memory-free, approximate (Sander et al.); "
             "symplectic, checkpoint: exact, low memory.  [default: backprop]")] = None,
    adjoint: Annotated[bool, typer.Option("--adjoint", help="Shorthand for --grad adjoint.")] = False,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="AdamW's decoupled weight decay.")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[DeviceName, typer.Option(help="auto picks cuda when there is one.")] = DeviceName.auto,
    out: Annotated[Path, typer.Option(help="Checkpoint to write; a model card is written beside it (.md).")] = Path(
        "model.safetensors"),
    as_json: JsonOpt = False,
):
    """Train an ODENet from a smooth-in-depth initialization."""
    from .convert import parse_depths
    from .data import load_data
    from .io import check_output_path, save_checkpoint
    from .network import ODENetConfig
    from .train import train as run_training
    from .train import write_model_card

    check_output_path(out)
    if adjoint and grad not in (None, GradName.adjoint):
        raise ResodeError(f"--adjoint conflicts with --grad {grad.value}; give one of them")
    method = "adjoint" if adjoint else (grad.value if grad else "backprop")
    try:
        widths = tuple(int(w) for w in width.split(","))
    except ValueError:
        raise ResodeError(f"--width must be an integer or a comma list of integers, got {width!r}") from None
    depths = parse_depths(depth, None, (1,) * len(widths))
    dataset = load_data(data)
    config = ODENetConfig(
        arch=arch.value, in_shape=dataset.in_shape, num_classes=dataset.num_classes, widths=widths,
        depths=depths, hidden=hidden, activation=activation.value, scheme=scheme.value, interp=interp.value,
        stem_stride=stem_stride, grad=method,
    )
    model, record = run_training(config, dataset, epochs, batch_size, lr, weight_decay, device.value, seed,
                                 init.value)
    record["training"]["command"] = "resode " + shlex.join(_invocation)
    save_checkpoint(out, model, record)
    card = write_model_card(out, model, record)
    result = {"out": str(out), "card": str(card), "test_accuracy": record["metrics"]["test_accuracy"],
              "train_loss": record["metrics"]["train_loss"], "seconds": record["training"]["seconds"],
              "device": record["training"]["device"], "depth": _fmt_depths(depths), "scheme": scheme.value,
              "grad": method,
              "parameters": sum(p.numel() for p in model.parameters())}
    _emit(result, as_json, "resode train", [
        ("checkpoint", str(out)), ("model card", str(card)),
        ("test accuracy", f"{100 * result['test_accuracy']:.2f} %"), ("final train loss", f"{result['train_loss']:.4f}"),
        ("gradient method", method), ("parameters", str(result["parameters"])),
        ("time", f"{result['seconds']} s on {result['device']}"),
    ])


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every error into one line on stderr and an exit code."""
    global _invocation
    args = sys.argv[1:] if argv is None else list(argv)
    _invocation = args
    try:
        code = app(args=args or ["--help"], prog_name="resode", standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except ResodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except (typer.Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:  # noqa: BLE001 - the boundary: no traceback for users
        if hasattr(exc, "format_message"):  # click's usage errors (typer may vendor its own click)
            print(f"error: {' '.join(exc.format_message().split())}", file=sys.stderr)
            code = 2
        else:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
    sys.exit(code if isinstance(code, int) else 0)
