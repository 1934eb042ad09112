"""Property-based tests (hypothesis): whatever the command-line arguments, checkpoint headers or flipped bits,
resode exits with 0 or 2, never with a traceback, and bad input is one line on stderr.

Examples are derandomized and few by default, so CI runs the same quick cases every time;
``RESODE_HYPOTHESIS=thorough`` draws many more, at random.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from resode_export import io as rio
from resode_export import train as train_module
from resode_export.cli import main
from resode_export.data import load_data
from resode_export.errors import ResodeError
from resode_export.io import load_checkpoint, save_checkpoint, write_safetensors
from resode_export.network import ODENet, ODENetConfig
from resode_export.train import TrainOptions, state_path, train

THOROUGH = os.environ.get("RESODE_HYPOTHESIS") == "thorough"


def _settings(examples: int):
    return settings(max_examples=examples * (20 if THOROUGH else 1), deadline=None, derandomize=not THOROUGH,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _run(args: list[str]) -> tuple[int, str, str]:
    """``resode ARGS`` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        main([str(a) for a in args])
    return done.value.code, out.getvalue(), err.getvalue()


def _assert_clean(code: int, out: str, err: str, as_json: bool, progress_lines: bool = False) -> None:
    """Exit 0 or 2; no traceback; exit 2 ends in exactly one error line (train may print epoch lines first)."""
    assert code in (0, 2), (code, out, err[-3000:])
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.strip().splitlines()
    if code == 2:
        assert lines and lines[-1].startswith("error: ") and sum(ln.startswith("error: ") for ln in lines) == 1, err
        if not progress_lines:
            assert len(lines) == 1, err
    elif as_json:
        json.loads(out)  # exactly one JSON object


GARBAGE = st.sampled_from(["", "-1", "0", "nan", "inf", "-inf", "1e309", "x", "1,2,3", ",", "9" * 30, "ünï", "--json",
                           "0x10", " 4", "4.5", "-0"])
FLAG = st.just(None)  # an option that takes no value


@st.composite
def options(draw, spec: dict) -> list[str]:
    """Some options of ``spec`` (name → (valid values, invalid values), FLAG for a flag), all of them valid,
    or one of them invalid or garbage, or an unknown token among them."""
    names = draw(st.lists(st.sampled_from(list(spec)), unique=True, max_size=6))
    args = {n: draw(spec[n][0]) for n in names}
    mode = draw(st.sampled_from(["valid", "valid", "invalid", "garbage", "unknown"]))
    valued = [n for n in names if spec[n][1] is not None]
    if mode in ("invalid", "garbage") and valued:
        name = draw(st.sampled_from(valued))
        args[name] = draw(spec[name][1] if mode == "invalid" else GARBAGE)
    out = [a for n, v in args.items() for a in ([n] if v is None else [n, v])]
    if mode == "unknown":
        out.insert(draw(st.integers(0, len(out))), draw(st.sampled_from(["--bogus", "-x", "extra", "--depth"])))
    return out


def _ints(lo: int, hi: int):
    return st.integers(lo, hi).map(str)


@pytest.fixture(scope="module")
def folder():
    """A scratch folder with a tiny data set, a pickle, and a resumable run of a small model on that data."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        np.savez(tmp / "toy.npz", x_train=rng.normal(size=(40, 5)).astype(np.float32), y_train=rng.integers(0, 3, 40),
                 x_test=rng.normal(size=(10, 5)).astype(np.float32), y_test=rng.integers(0, 3, 10))
        (tmp / "evil.pt").write_bytes(b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
        data = load_data(str(tmp / "toy.npz"))
        model = ODENet(ODENetConfig(arch="mlp", in_shape=(5,), num_classes=3, widths=(4,), depths=(3,), hidden=4))
        save_state = train_module._save_state

        def stop_after_epoch_1(path, optimizer, meta):
            save_state(path, optimizer, meta)
            raise KeyboardInterrupt

        train_module._save_state = stop_after_epoch_1
        try:
            with pytest.raises(KeyboardInterrupt):
                train(model, data, TrainOptions(epochs=2, batch_size=16, device="cpu"), out=tmp / "run.safetensors",
                      show_progress=False)
        finally:
            train_module._save_state = save_state
        yield tmp


def _scratch(folder: Path) -> Path:
    scratch = folder / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    return scratch


# --- command-line arguments ------------------------------------------------------------------------

OUTS = st.sampled_from(["m.safetensors"] * 4 + ["missing/m.safetensors", ".", "m.md", "m"])
def _values(*values):
    return st.sampled_from(values)


CONVERT = options({
    "--depth": (st.one_of(_ints(1, 12), _values("2,", "4")), _values("0", "-3", "65537", "1000000000", "2,2")),
    "--depth-scale": (_values("0.25", "0.5", "1", "2"), _values("0", "-1", "1e9", "nan", "inf", "0.3")),
    "--scheme": (_values("euler", "heun", "rk4", "midpoint", "reversible_heun"), _values("rk45", "Euler")),
    "--interp": (_values("constant", "linear", "cubic", "smooth"), _values("spline")),
    "--n-basis": (_ints(1, 4), _ints(-2, 40)),
    "--limit": (_ints(1, 16), _ints(-2, 0)),
    "--json": (FLAG, None),
})


@_settings(40)
@given(model=st.sampled_from([None, "digits-mlp", "run.safetensors"] * 2 + ["missing.safetensors", "evil.pt", "toy.npz"]),
       args=CONVERT, out=st.one_of(st.none(), OUTS))
def test_convert_arguments(folder, model, args, out):
    scratch = _scratch(folder)
    as_json = "--json" in args
    args = ["convert"] + ([str(folder / model)] if model and model != "digits-mlp" else [model] if model else []) + args
    args += ["--out", str(scratch / out)] if out else []
    code, stdout, err = _run(args)
    _assert_clean(code, stdout, err, as_json)
    if code == 2:
        assert list(scratch.rglob("*")) == [], "bad input writes nothing"


TRAIN = options({
    "--arch": (_values("mlp"), _values("conv", "resnet")),
    "--depth": (_ints(1, 6), _values("0", "65537", "1000000000", "2,2")),
    "--width": (_values("4", "8", "4,4"), _values("0", "x", "3,0", "-2", "4,")),
    "--hidden": (_ints(1, 8), _ints(-1, 0)),
    "--scheme": (_values("euler", "heun", "rk4", "midpoint", "reversible_heun"), _values("rk45")),
    "--interp": (_values("constant", "linear", "cubic", "smooth"), _values("spline")),
    "--activation": (_values("relu", "gelu", "tanh"), _values("swish")),
    "--init": (_values("smooth", "tied", "iid"), _values("zeros")),
    "--grad": (_values("backprop", "checkpoint", "adjoint", "symplectic", "reversible", "auto", "adjoint_fast"),
               _values("exact")),
    "--adjoint": (FLAG, None),
    "--optimizer": (_values("adam", "sgd"), _values("lbfgs")),
    "--schedule": (_values("cosine", "step", "constant"), _values("linear")),
    "--epochs": (_ints(1, 2), _ints(-1, 0)),
    "--batch-size": (_ints(1, 64), _ints(-1, 0)),
    "--lr": (_values("1e-3", "0.5", "1e6"), _values("0", "-1", "nan", "inf", "1e300")),
    "--weight-decay": (_values("0", "0.1", "1e6"), _values("-1", "nan", "inf", "1e300")),
    "--seed": (_ints(0, 5), _values("-1", str(2**32), str(2**70))),
    "--device": (_values("auto", "cpu"), _values("cuda", "tpu")),
    "--resume": (FLAG, None),
    "--skip-nonfinite": (FLAG, None),
    "--json": (FLAG, None),
})


@_settings(60)
@example(data="toy.npz", args=["--depth", "1", "--width", "4", "--lr", "1e300"], out="m.safetensors", log=None)
@given(data=st.sampled_from(["toy.npz"] * 6 + ["missing.npz", "evil.pt", "imagenet", "."]),
       args=TRAIN, out=OUTS, log=st.one_of(st.none(), st.sampled_from(["log.jsonl", "missing/log.jsonl", "."])))
def test_train_arguments(folder, data, args, out, log):
    if torch.cuda.is_available() and "cuda" in args:
        args = [a if a != "cuda" else "cpu" for a in args]  # keep the examples on the CPU
    scratch = _scratch(folder)
    as_json = "--json" in args
    args = ["train", "--data", str(folder / data) if "." in data else data, *args, "--out", str(scratch / out)]
    args += ["--log", str(scratch / log)] if log else []
    code, stdout, err = _run(args)
    _assert_clean(code, stdout, err, as_json, progress_lines=True)


# --- checkpoint headers ----------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.sampled_from([0, -1, 10**9, 2**63, 10**30, 2**31]),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
              st.sampled_from(["digits", "mlp", "conv", "euler", "rk4", "smooth", "gelu", "adjoint", "fold"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=5,
)
CONFIG_KEYS = [f for f in ODENetConfig.__dataclass_fields__] + ["bogus"]
TOP_KEYS = ["format_version", "config", "data", "metrics", "training", "checksum", "converted_from", "imported"]


@st.composite
def mutated_headers(draw, header: dict) -> str:
    """The header's JSON text after one drawn mutation: set or delete a key, replace it all, or edit its text."""
    header = json.loads(json.dumps(header))
    kind = draw(st.sampled_from(["set config", "delete config", "set top", "delete top", "set data", "replace",
                                 "edit text"]))
    if kind == "set config":
        header["config"][draw(st.sampled_from(CONFIG_KEYS))] = draw(JSON_VALUES)
    elif kind == "delete config":
        header["config"].pop(draw(st.sampled_from(CONFIG_KEYS)), None)
    elif kind == "set top":
        header[draw(st.sampled_from(TOP_KEYS))] = draw(JSON_VALUES)
    elif kind == "delete top":
        header.pop(draw(st.sampled_from(TOP_KEYS)), None)
    elif kind == "set data":
        header.setdefault("data", {})["name"] = draw(st.one_of(JSON_VALUES, st.sampled_from(["digits", "fashion-mnist"])))
    elif kind == "replace":
        header = draw(JSON_VALUES)
    text = json.dumps(header)
    if kind == "edit text":
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 3))
        text = text[:at] + draw(st.text(max_size=3)) + text[at + cut:]
    return text


def _mutated_checkpoint(folder: Path, scratch: Path, data) -> Path:
    """The trained checkpoint with a mutated header, rewritten with a valid checksum: the header speaks."""
    tensors, metadata = rio.read_safetensors(folder / "run.safetensors")
    text = data.draw(mutated_headers(json.loads(metadata["resode"])))
    return write_safetensors(scratch / "m.safetensors", tensors, {"resode": text})


@_settings(60)
@given(data=st.data())
def test_mutated_checkpoint_headers(folder, data):
    scratch = _scratch(folder)
    bad = _mutated_checkpoint(folder, scratch, data)
    code, stdout, err = _run(["convert", bad, "--limit", "8", "--json", "--out", scratch / "out.safetensors"])
    _assert_clean(code, stdout, err, True)
    if code == 0:
        load_checkpoint(scratch / "out.safetensors")  # what it wrote is a checkpoint


@_settings(30)
@given(data=st.data())
def test_mutated_headers_on_resume(folder, data):
    scratch = _scratch(folder)
    bad = _mutated_checkpoint(folder, scratch, data)
    shutil.copy(state_path(folder / "run.safetensors"), state_path(bad))
    code, stdout, err = _run(["train", "--resume", "--epochs", "2", "--batch-size", "16", "--device", "cpu",
                              "--out", bad, "--json"])
    _assert_clean(code, stdout, err, True, progress_lines=True)


@pytest.fixture(scope="module")
def checkpoint_bytes(folder) -> bytes:
    return save_checkpoint(folder / "small.safetensors", ODENet(ODENetConfig(
        arch="mlp", in_shape=(5,), num_classes=3, widths=(4,), depths=(3,), hidden=4), init="iid"),
        {"data": {"name": str(folder / "toy.npz")}}).read_bytes()


@_settings(300)
@given(data=st.data())
def test_every_single_bit_flip_is_refused(folder, checkpoint_bytes, data):
    """A flipped bit anywhere (length, JSON, metadata, checksum, weights) is a ResodeError, never a quiet load."""
    flipped = bytearray(checkpoint_bytes)
    bit = data.draw(st.integers(0, 8 * len(flipped) - 1))
    flipped[bit // 8] ^= 1 << (bit % 8)
    path = _scratch(folder) / "flipped.safetensors"
    path.write_bytes(bytes(flipped))
    with pytest.raises(ResodeError):
        load_checkpoint(path)


@_settings(40)
@given(data=st.data())
def test_truncated_checkpoints_are_refused_wherever_they_end(folder, checkpoint_bytes, data):
    path = _scratch(folder) / "cut.safetensors"
    path.write_bytes(checkpoint_bytes[: data.draw(st.integers(0, len(checkpoint_bytes) - 1))])
    with pytest.raises(ResodeError):
        load_checkpoint(path)
