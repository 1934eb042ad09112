"""Export an ODENet to ONNX (static or dynamic depth), TorchScript or ``torch.export`` (pt2).

Every export verifies itself before it lands: the written file is loaded by its own runtime
(onnxruntime on CPU, ``torch.jit.load``, ``torch.export.load``), run on fresh random inputs and
on real test data, and compared with the PyTorch model; above the tolerance the file is removed
and :class:`ExportMismatch` raised. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..data import Dataset
from ..errors import ResodeError, check_choice
from ..evaluate import predict, relative_deviation
from ..io import _remove_stale_temporaries, check_output_path, new_temporary, write_failed
from ..network import ODENet

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2", "torchvision": ".pth"}
TOLERANCE = 1e-4  # max relative deviation from PyTorch (float32)
DYNAMIC_CHECK_DEPTHS = (4, 16, 64, 256)
PROTOBUF_LIMIT = 2**31 - 2**20  # one self-contained .onnx file below 2 GB; above, external data


class ExportMismatch(RuntimeError):
    """The exported file does not reproduce the PyTorch model (exit 1: a bug, not bad input)."""


def onnx_session(path: str | os.PathLike, threads: int = 1):
    require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def require_onnx() -> None:
    """Bad input, not a crash: ONNX export and check need onnx and onnxruntime."""
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise ResodeError(f"{name} is not installed, and resode builds and runs every ONNX file it writes or "
                              "checks with it: pip install onnx onnxruntime") from None


def run_onnx(session, x: np.ndarray, depth: int | None = None, batch_size: int = 500) -> np.ndarray:
    """Logits of an exported graph on x (N, *in_shape), in batches."""
    names = {i.name for i in session.get_inputs()}
    out = []
    for i in range(0, len(x), batch_size):
        feed = {"input": np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)}
        if "depth" in names:
            if depth is None:
                raise ResodeError("this ONNX file takes the depth at run time: give --depth")
            feed["depth"] = np.array(depth, dtype=np.int64)
        out.append(session.run(["logits"], feed)[0])
    return np.concatenate(out)


def _inputs(model: ODENet, data: Dataset | None, limit: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    xs = [torch.randn(3, *model.config.in_shape, generator=gen)]
    if data is not None and tuple(data.x_test.shape[1:]) == tuple(model.config.in_shape):
        xs.append(data.x_test[:limit].float())
    return xs


def _runner(fmt: str, path: str):
    """A function x (Tensor) [, depth] → logits (Tensor), running the file as a user would."""
    if fmt == "onnx":
        session = onnx_session(path)
        return lambda x, depth=None: torch.from_numpy(run_onnx(session, x.numpy(), depth))
    if fmt == "torchvision":  # the state dict as torchvision runs it (an independent forward, BatchNorm in eval)
        from ..importers.torchvision import detect_layout, reference_forward

        sd = torch.load(path, map_location="cpu", weights_only=True)
        layout = detect_layout(sd)
        return lambda x, depth=None: reference_forward(sd, layout, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if fmt == "torchscript":
            module = torch.jit.load(path)
        else:  # from an open file: torch.export.load warns on a path whose name does not end in .pt2 (our temporary)
            with open(path, "rb") as fh:
                module = torch.export.load(fh).module()

    def run(x, depth=None):
        with torch.no_grad():
            return module(x)

    return run


def verify(model: ODENet, fmt: str, path: str, data: Dataset | None, dynamic_depth: bool,
           depths=DYNAMIC_CHECK_DEPTHS) -> float:
    """Max relative deviation of the file's logits from the PyTorch model's."""
    run = _runner(fmt, path)
    worst = 0.0
    cases = [(d, model.discretize(depth=d)) for d in depths] if dynamic_depth else [(None, model)]
    for depth, reference in cases:
        for x in _inputs(model, data, 64 if dynamic_depth else 256):
            got, want = run(x, depth), predict(reference, x)
            if got.shape != want.shape:
                return float("inf")
            dev = relative_deviation(got, want)
            worst = max(worst, float(dev.max()) if torch.isfinite(dev).all() else float("inf"))
    return worst


def default_path(source: Path, fmt: str, model: ODENet, dynamic_depth: bool) -> Path:
    depth = "dyn" if dynamic_depth else "-".join(str(d) for d in sorted(set(model.config.depths)))
    return source.with_name(f"{source.stem}-{depth}-{model.config.scheme}{FORMATS[fmt]}")


def _write_onnx(proto, tmp: str, data: Path) -> bool:
    """One self-contained file below protobuf's 2 GB limit (False); above it, the weights go to ``data`` (True).

    ``data`` has a name of its own for this export (``<out>.<token>.data``): the graph refers to it by
    name, and a failed export removes it without touching the weights of an earlier export.
    """
    import onnx

    if proto.ByteSize() < PROTOBUF_LIMIT:
        onnx.save_model(proto, tmp)
        return False
    print(f"note: the graph holds {proto.ByteSize() / 2**30:.1f} GiB, above protobuf's 2 GB limit for one file: "
          f"its weights go to {data.name} beside it; keep the two files together (or export with --dynamic-depth, "
          "whose size does not grow with depth)", file=sys.stderr)
    onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=0)
    return True


def _stale_data_files(out: Path, keep: Path | None) -> list[Path]:
    """Weights files of earlier exports to ``out`` (replaced by this one)."""
    old = [out.with_name(out.name + ".data"), *out.parent.glob(f"{glob.escape(out.name)}.*.data")]
    return [p for p in old if p.is_file() and p != keep]


def export_model(model: ODENet, fmt: str, out: str | os.PathLike, *, dynamic_depth: bool = False,
                 data: Dataset | None = None, tolerance: float = TOLERANCE, metadata: dict | None = None) -> dict:
    """Export, verify and atomically write ``model``; returns the JSON-ready record.

    Args:
        fmt: ``onnx``, ``torchscript`` or ``pt2``.
        dynamic_depth: ONNX only: one graph taking the depth at run time.
        data: its test split is part of the verification, beside random inputs.
    Raises:
        ResodeError: bad options. ExportMismatch: the file does not reproduce the model (removed).
    """
    check_choice("export format", fmt, FORMATS)
    if dynamic_depth and fmt != "onnx":
        raise ResodeError("--dynamic-depth is an ONNX form; use --format onnx")
    out = check_output_path(out)
    if fmt == "onnx":
        require_onnx()
    if fmt == "torchvision":
        from .torchvision_format import check_exportable

        check_exportable(model)
    if dynamic_depth and len(set(model.config.depths)) > 1:
        print(f"note: the dynamic-depth graph runs every stage at the one depth given at run time; this model's "
              f"stages have depths {list(model.config.depths)}, so no single depth reproduces it (a static export "
              "does)", file=sys.stderr)
    if not dynamic_depth:
        from ..resources import check_static_export

        check_static_export(model, model.config.depths)  # before any copy of the weights
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model keeps its dtype, device and mode
    meta = {"resode.scheme": model.config.scheme, "resode.depths": ",".join(map(str, model.config.depths)),
            "resode.dynamic_depth": str(dynamic_depth).lower(), **{k: str(v) for k, v in (metadata or {}).items()}}
    start = time.perf_counter()
    external = None
    _remove_stale_temporaries(out)  # of exports killed mid-way (their writer is gone)
    tmp = new_temporary(out)
    data_file = out.with_name(f"{out.name}.{Path(tmp).name.split('.')[-2]}.data")  # unique, decided up front
    try:
        if fmt == "onnx":
            from .onnx_graph import dynamic_graph, static_graph

            proto = (dynamic_graph if dynamic_depth else static_graph)(model, meta)
            external = data_file if _write_onnx(proto, tmp, data_file) else None
        elif fmt == "torchvision":
            from .torchvision_format import state_dict

            torch.save(state_dict(model), tmp)
        elif fmt == "torchscript":
            from .torch_graph import torchscript

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.jit.save(torchscript(model), tmp, _extra_files={"resode.json": json.dumps(meta)})
        else:
            from .torch_graph import exported_program

            with open(tmp, "wb") as fh:  # a file object: torch warns on a path not ending in .pt2 (our temporary)
                torch.export.save(exported_program(model), fh)
        seconds = time.perf_counter() - start
        verify_start = time.perf_counter()
        native = sorted(set(model.config.depths))
        checked = sorted(set(DYNAMIC_CHECK_DEPTHS) | (set(native) if len(native) == 1 else set()))
        deviation = verify(model, fmt, tmp, data, dynamic_depth, depths=checked)
        if not deviation <= tolerance:
            raise ExportMismatch(f"the exported {fmt} file deviates from the PyTorch model by {deviation:.2e} "
                                 f"(relative, above {tolerance:.0e}); nothing was written")
        for path in (tmp, external):
            if path is not None:
                os.chmod(path, 0o644)
        os.replace(tmp, out)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        data_file.unlink(missing_ok=True)  # a weights file of this export only, complete or not
        if isinstance(exc, OSError):
            raise write_failed(out, exc) from None
        raise
    for stale in _stale_data_files(out, external):  # the new graph is in place: earlier weights are unused
        stale.unlink(missing_ok=True)
    depths = native
    return {
        "path": str(out), "format": fmt, "dynamic_depth": dynamic_depth,
        "depth": None if dynamic_depth else (depths[0] if len(depths) == 1 else list(model.config.depths)),
        "scheme": model.config.scheme, "max_rel_deviation": deviation,
        "bytes": out.stat().st_size + (external.stat().st_size if external is not None else 0),
        "external_data": str(external) if external is not None else None,
        "checked_depths": checked if dynamic_depth else None,
        "seconds": round(seconds, 3), "verify_seconds": round(time.perf_counter() - verify_start, 3),
    }


__all__ = ["FORMATS", "ExportMismatch", "default_path", "export_model", "onnx_session", "require_onnx", "run_onnx",
           "verify"]
