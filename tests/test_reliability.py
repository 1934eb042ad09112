"""Reliability: faults (SIGKILL mid-training, mid-write, mid-export), untrusted files, numerical faults.

Nothing a user hands resode may run code or end in a traceback: bad input is one line on stderr and
exit code 2. No fault may leave a truncated file under a target's name. docs/reliability.md lists
these tests.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from resode_export import io as rio
from resode_export import train as train_module
from resode_export.data import digits, load_data
from resode_export.errors import ResodeError
from resode_export.io import load_checkpoint, save_checkpoint, temporaries, write_safetensors
from resode_export.network import ODENet, ODENetConfig
from resode_export.train import TrainingDiverged, TrainOptions, state_path, train

from .helpers import run_cli

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _refused(code: int, out: str, err: str, *hints: str) -> None:
    """Bad input: exit 2, one line on stderr that starts with "error: ", no traceback, the hints in it."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for hint in hints:
        assert hint.lower() in err.lower(), (hint, err)


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118


def _assert_bit_identical(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def _python(code: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=timeout)


# --- faults: SIGKILL mid-epoch, between writes, mid-write, mid-export ------------------------------

TRAIN_ARGS = ["train", "--depth", "16", "--width", "16", "--hidden", "16", "--epochs", "2", "--batch-size", "8",
              "--lr", "3e-3", "--seed", "3", "--device", "cpu", "--json"]
RUN_CLI = "import sys, torch; torch.set_num_threads(1); from resode_export.cli import main; main(sys.argv[1:])"


def _resode(*args) -> subprocess.CompletedProcess:
    return _python(RUN_CLI, *args)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted run (CPU, one thread, fixed seed) in its own process."""
    out = tmp_path_factory.mktemp("reference") / "ref.safetensors"
    done = _resode(*TRAIN_ARGS, "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _log_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sigkill_mid_epoch_then_resume_gives_bit_identical_weights(tmp_path, reference_run):
    out = tmp_path / "run.safetensors"
    state, log = state_path(out), tmp_path / "run.log.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", RUN_CLI, *TRAIN_ARGS, "--out", str(out)], env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not state.exists():  # epoch 1 is done once its training state is in place (written last)
            assert proc.poll() is None, "the run ended before it finished epoch 1"
            assert time.monotonic() < deadline, "epoch 1 took too long"
            time.sleep(0.002)
        epoch_seconds = _log_rows(log)[0]["seconds"]
        time.sleep(0.3 * epoch_seconds)  # into epoch 2, well before its end
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run was not killed: it had already finished"
    assert len(load_checkpoint(out)[1]["training"]["history"]) == 1, "killed after epoch 2 was written, not during it"
    assert [r["epoch"] for r in _log_rows(log)] == [1]

    done = _resode(*TRAIN_ARGS, "--resume", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_bit_identical(reference_run, out)
    rows, ref_rows = _log_rows(log), _log_rows(reference_run.with_name("ref.log.jsonl"))
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]  # the same run, bit for bit
    assert temporaries(out) == [] and temporaries(state) == []


KILL_BEFORE_STATE = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from resode_export import train
from resode_export.cli import main
save_state = train._save_state
def killed(path, optimizer, meta):
    if meta["epoch"] == 2:  # epoch 2's checkpoint and log line are written, its training state is not
        os.kill(os.getpid(), signal.SIGKILL)
    save_state(path, optimizer, meta)
train._save_state = killed
main(sys.argv[1:])
"""


def test_sigkill_between_the_checkpoint_and_its_training_state_still_resumes_exactly(tmp_path, reference_run):
    out = tmp_path / "run.safetensors"
    log = tmp_path / "run.log.jsonl"
    done = _python(KILL_BEFORE_STATE, *TRAIN_ARGS, "--out", out)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert len(load_checkpoint(out)[1]["training"]["history"]) == 2  # the checkpoint is one epoch ahead
    with log.open("a") as fh:
        fh.write('{"epoch": 3, "lo')  # and a log line cut off mid-write
    done = _resode(*TRAIN_ARGS, "--resume", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_bit_identical(reference_run, out)
    assert [r["epoch"] for r in _log_rows(log)] == [1, 2]


def _small_config(**kw) -> ODENetConfig:
    return ODENetConfig(**{"arch": "mlp", "in_shape": (64,), "num_classes": 10, "widths": (8,), "depths": (4,),
                           "hidden": 8, **kw})


KILL_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
import torch
import resode_export.io as rio
from resode_export.network import ODENet, ODENetConfig
save_file = rio.save_file
def half_then_killed(tensors, tmp, metadata):
    save_file(tensors, tmp, metadata=metadata)
    data = Path(tmp).read_bytes()
    Path(tmp).write_bytes(data[: len(data) // 2])  # half of the file is on disk
    os.kill(os.getpid(), signal.SIGKILL)
rio.save_file = half_then_killed
config = ODENetConfig(arch="mlp", in_shape=(64,), num_classes=10, widths=(8,), depths=(4,), hidden=8)
rio.save_checkpoint(sys.argv[1], ODENet(config, init="iid", seed=1))
"""


@pytest.mark.parametrize("previous", [True, False], ids=["over-a-previous-file", "new-file"])
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_file_or_none(tmp_path, previous):
    out = tmp_path / "m.safetensors"
    if previous:
        save_checkpoint(out, ODENet(_small_config(), init="iid", seed=0), {"data": {"name": "digits"}})
        before = out.read_bytes()
    done = _python(KILL_WHILE_WRITING, out)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    left = temporaries(out)
    assert len(left) == 1 and left[0].stat().st_size > 0  # the killed writer's half file, under another name
    if previous:
        assert out.read_bytes() == before
        load_checkpoint(out)
    else:
        assert not out.exists()
    save_checkpoint(out, ODENet(_small_config(), init="iid", seed=2))  # the next write clears the dead one's file
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    load_checkpoint(out)


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    out = tmp_path / "m.safetensors"
    live = tmp_path / f".m.safetensors.{os.getpid()}-abc123.tmp"  # this process is alive
    dead = tmp_path / ".m.safetensors.999999999-abc123.tmp"  # above any pid Linux hands out
    live.write_bytes(b"half")
    dead.write_bytes(b"half")
    save_checkpoint(out, ODENet(_small_config()))
    assert live.exists() and not dead.exists()


KILL_DURING_EXPORT = """
import os, signal, sys
import torch
torch.set_num_threads(1)
import resode_export.export as export
from resode_export.io import load_checkpoint
def killed(*args, **kwargs):  # the graph is in its temporary file, not yet verified or renamed
    os.kill(os.getpid(), signal.SIGKILL)
export.verify = killed
export.export_model(load_checkpoint(sys.argv[1])[0], sys.argv[2], sys.argv[3])
"""


@pytest.mark.parametrize("fmt, previous", [("onnx", True), ("torchscript", False)])
def test_sigkill_during_an_export_leaves_the_previous_file_or_none(tmp_path, fmt, previous):
    from resode_export.export import export_model

    ckpt = save_checkpoint(tmp_path / "m.safetensors", ODENet(_small_config(), init="iid", seed=0))
    out = tmp_path / f"m.{fmt}"
    if previous:
        export_model(load_checkpoint(ckpt)[0], fmt, out)
        before = out.read_bytes()
    done = _python(KILL_DURING_EXPORT, ckpt, fmt, out)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    if previous:
        assert out.read_bytes() == before
    else:
        assert not out.exists()


# --- untrusted files -----------------------------------------------------------------------------


class _ShellPayload:
    """Unpickling this runs ``touch MARKER``: the marker file is the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


class _ExecPayload(_ShellPayload):
    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({self.marker!r}).touch()",)


def _payload_files(folder: Path, marker: Path) -> dict[str, Path]:
    files = {}
    files["torch.save .pt"] = folder / "evil.pt"
    torch.save({"weight": torch.zeros(3), "bias": _ShellPayload(marker)}, files["torch.save .pt"])
    files["pickle .pth"] = folder / "evil.pth"
    files["pickle .pth"].write_bytes(pickle.dumps({"weight": _ExecPayload(marker)}, protocol=2))
    files["protocol-0 pickle .pkl"] = folder / "evil.pkl"
    files["protocol-0 pickle .pkl"].write_bytes(pickle.dumps(_ExecPayload(marker), protocol=0))
    files["pickle named .safetensors"] = folder / "evil.safetensors"
    files["pickle named .safetensors"].write_bytes(pickle.dumps(_ShellPayload(marker), protocol=4))
    return files


PAYLOADS = ["torch.save .pt", "pickle .pth", "protocol-0 pickle .pkl", "pickle named .safetensors"]


def test_the_payloads_do_run_when_unpickled(tmp_path):
    """The refusals below can fail: unpickled, each payload file creates its marker."""
    for i, kind in enumerate(PAYLOADS):
        folder, marker = tmp_path / str(i), tmp_path / f"ran-{i}"
        folder.mkdir()
        path = _payload_files(folder, marker)[kind]
        if kind == "torch.save .pt":
            torch.load(path, weights_only=False)
        else:
            pickle.loads(path.read_bytes())
        assert marker.exists(), kind


@pytest.mark.parametrize("kind", PAYLOADS)
def test_pickle_payloads_are_refused_by_the_checkpoint_loader(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = _payload_files(tmp_path, marker)[kind]
    with pytest.raises(ResodeError, match="never unpickles"):
        load_checkpoint(path)
    assert not marker.exists()


COMMANDS = {
    "convert": lambda f, tmp: ["convert", f, "--out", tmp / "out.safetensors"],
    "inspect": lambda f, tmp: ["inspect", f],
    "export": lambda f, tmp: ["export", f, "--out", tmp / "out.onnx"],
    "check": lambda f, tmp: ["check", f, "--depths", "2", "--repeats", "3"],
    "train (fine-tune)": lambda f, tmp: ["train", f, "--epochs", "1", "--out", tmp / "out.safetensors"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", PAYLOADS)
def test_pickle_payloads_are_refused_by_every_command(capsys, tmp_path, kind, command):
    marker = tmp_path / "pwned"
    path = _payload_files(tmp_path, marker)[kind]
    before = set(tmp_path.iterdir())
    code, out, err = run_cli(capsys, *COMMANDS[command](path, tmp_path))
    _refused(code, out, err, "pickle")
    assert not marker.exists()
    assert set(tmp_path.iterdir()) == before, "nothing written"


def test_a_pickle_named_as_the_checkpoint_to_resume_is_refused(capsys, tmp_path):
    marker = tmp_path / "pwned"
    path = _payload_files(tmp_path, marker)["pickle named .safetensors"]
    code, out, err = run_cli(capsys, "train", "--resume", "--out", path)
    _refused(code, out, err, "never unpickles")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["torch.save .pt", "pickle .pth"])
def test_torch_load_weights_only_refuses_the_payloads(tmp_path, kind):
    """The torchvision importer reads .pt/.pth with torch.load(weights_only=True): the payload never runs."""
    marker = tmp_path / "pwned"
    path = _payload_files(tmp_path, marker)[kind]
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)
    assert not marker.exists()
    from resode_export.importers.torchvision import read_state_dict

    with pytest.raises(ResodeError, match="pickled"):
        read_state_dict(path)
    assert not marker.exists()


def _small_checkpoint(folder: Path) -> Path:
    return save_checkpoint(folder / "good.safetensors", ODENet(_small_config(), init="iid", seed=0),
                           {"data": {"name": "digits"}})


def test_the_small_checkpoint_converts(capsys, tmp_path):
    """The control for the refusals below: the unchanged file is fine."""
    code, out, err = run_cli(capsys, "convert", _small_checkpoint(tmp_path), "--limit", "8", "--json")
    assert code == 0 and json.loads(out)["max_rel_deviation"] == 0.0, err


@pytest.mark.parametrize("cut", [0, 4, 8, 9, 64, 0.5, -1])
def test_truncated_checkpoints_are_refused(capsys, tmp_path, cut):
    good = _small_checkpoint(tmp_path)
    data = good.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: int(cut * len(data)) if isinstance(cut, float) else cut])
    code, out, err = run_cli(capsys, "convert", bad, "--limit", "8")
    _refused(code, out, err, "cut.safetensors")


def _offsets(path: Path) -> dict[str, int]:
    """Byte offsets of interesting places in a checkpoint."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return {"header length": 0, "header length msb": 7, "json start": 8, "tensor name": data.index(b"head.bias"),
            "dtype": data.index(b'"F32"') + 2, "resode metadata": data.index(b"format_version") + 2,
            "config depth": data.index(b"depths") + 12, "checksum": data.index(rio.DIGEST_KEY.encode()) + 20,
            "checksum key": data.index(rio.DIGEST_KEY.encode()) + 3, "first weight": 8 + length,
            "middle weight": 8 + length + (len(data) - 8 - length) // 2, "last byte": len(data) - 1}


@pytest.mark.parametrize("where", ["header length", "header length msb", "json start", "tensor name", "dtype",
                                   "resode metadata", "config depth", "checksum", "checksum key", "first weight",
                                   "middle weight", "last byte"])
@pytest.mark.parametrize("bit", [0, 6])
def test_bit_flipped_checkpoints_are_refused(capsys, tmp_path, where, bit):
    good = _small_checkpoint(tmp_path)
    data = bytearray(good.read_bytes())
    data[_offsets(good)[where]] ^= 1 << bit
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    code, out, err = run_cli(capsys, "convert", bad, "--limit", "8")
    _refused(code, out, err, "flipped.safetensors")


def _rewrite(good: Path, dst: Path, change) -> Path:
    """Rewrite ``good`` with ``change(header, tensors)`` applied (it may return the metadata text), checksum valid."""
    tensors, metadata = rio.read_safetensors(good)
    header = json.loads(metadata["resode"])
    text = change(header, tensors)
    return write_safetensors(dst, tensors, {"resode": text if isinstance(text, str) else json.dumps(header)})


def _set_config(**kw):
    def change(header, tensors):
        header["config"].update(kw)
    return change


def _poison(name, value):
    def change(header, tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value
    return change


BAD_HEADERS = {
    "invalid JSON": (lambda h, t: '{"format_version": 1, "config": {', "corrupt resode metadata"),
    "JSON list": (lambda h, t: "[1, 2, 3]", "corrupt resode metadata"),
    "no config": (lambda h, t: h.pop("config", None) and None, "no config"),
    "future format": (lambda h, t: h.update(format_version=7), "format 7"),
    "depth 10^9": (_set_config(depths=[10**9]), "depth must be an integer from 1 to 65536"),
    "infinite depth": (_set_config(depths=[float("inf")]), "invalid config"),
    "depth as text": (_set_config(depths="deep"), "invalid config"),
    "knots 10^9 (a terabyte)": (_set_config(knots=[10**9]), "shape"),
    "hidden 10^12": (_set_config(hidden=10**12), "shape"),
    "in_shape 10^9": (_set_config(in_shape=[10**9]), "shape"),
    "empty in_shape": (_set_config(in_shape=[]), "in_shape needs at least one dimension"),
    "image in_shape for the 64-feature mlp": (_set_config(in_shape=[1, 8, 9]), "shape"),
    "widths disagree": (_set_config(widths=[9]), "shape"),
    "classes disagree": (_set_config(num_classes=3), "shape"),
    "unknown scheme": (_set_config(scheme="rk45"), "scheme"),
    "unknown config key": (_set_config(layers=12), "unknown config keys"),
    "config value of the wrong type": (_set_config(n_basis=[]), "n_basis must be an integer or null"),
    "NaN weights": (_poison("blocks.0.curve.knots.W", float("nan")), "NaN or infinite"),
    "Inf weights": (_poison("head.bias", float("inf")), "NaN or infinite"),
    "-Inf weights": (_poison("stem.weight", float("-inf")), "NaN or infinite"),
    "integer weights": (lambda h, t: t.update({"head.bias": t["head.bias"].long()}), "torch.int64"),
    "missing tensor": (lambda h, t: t.pop("stem.bias", None) is None, "missing"),
    "extra tensor": (lambda h, t: t.update({"evil": torch.zeros(2)}), "unexpected"),
    "data set name not text": (lambda h, t: h.update(data={"name": 5}), "data set"),
    "data not an object": (lambda h, t: h.update(data="digits"), "corrupt resode metadata"),
    "import record not an object": (lambda h, t: h.update(imported=True), "corrupt resode metadata"),
    "checksum removed": (lambda h, t: None, "checksum"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_checkpoint_headers_are_refused(capsys, tmp_path, case):
    change, hint = BAD_HEADERS[case]
    good = _small_checkpoint(tmp_path)
    bad = _rewrite(good, tmp_path / "bad.safetensors", change)
    if case == "checksum removed":
        tensors, metadata = rio.read_safetensors(bad)
        save_file(tensors, str(bad), metadata={k: v for k, v in metadata.items() if k != rio.DIGEST_KEY})
    start = time.perf_counter()
    code, out, err = run_cli(capsys, "convert", bad, "--limit", "8", "--out", tmp_path / "out.safetensors")
    _refused(code, out, err, hint)
    assert time.perf_counter() - start < 20, "an absurd header must cost neither time nor memory"
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_headers_are_refused_on_resume_too(capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(capsys, "train", "--depth", "2", "--width", "4", "--hidden", "4", "--epochs", "2", "--out",
                           out)
    assert code == 0, err
    resumable = out.read_bytes()
    for change, hint in [(lambda h, t: h.pop("training") and None, "no training record"),
                         (lambda h, t: h["training"].update(history="long"), "no training record"),
                         (_set_config(depths=[10**9]), "depth")]:
        out.write_bytes(resumable)
        _rewrite(out, out, change)
        code, stdout, err = run_cli(capsys, "train", "--depth", "2", "--width", "4", "--hidden", "4", "--epochs", "3",
                                    "--resume", "--out", out)
        _refused(code, stdout, err, hint)
    out.write_bytes(resumable)
    state = state_path(out)
    data = bytearray(state.read_bytes())
    data[-3] ^= 0x10  # a flipped bit in the optimizer state
    state.write_bytes(bytes(data))
    code, stdout, err = run_cli(capsys, "train", "--depth", "2", "--width", "4", "--hidden", "4", "--epochs", "3",
                                "--resume", "--out", out)
    _refused(code, stdout, err, "checksum")


def test_an_import_record_without_its_fields_is_refused(capsys, tmp_path):
    bad = _rewrite(_small_checkpoint(tmp_path), tmp_path / "bad.safetensors", lambda h, t: h.update(imported={"x": 1}))
    code, out, err = run_cli(capsys, "convert", bad, "--limit", "8")
    assert code in (0, 2) and "Traceback" not in err, err


def _foreign_onnx(path: Path, metadata: dict | None = None) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "foreign",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def _onnx_files(folder: Path) -> dict[str, tuple[Path, str]]:
    from resode_export.export import export_model

    exported = export_model(ODENet(_small_config(), init="iid", seed=0), "onnx", folder / "resode.onnx")["path"]
    data = Path(exported).read_bytes()
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (folder / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "empty.onnx").write_bytes(b"")
    return {"foreign graph": (_foreign_onnx(folder / "foreign.onnx"), "not made by resode"),
            "truncated resode export": (folder / "truncated.onnx", "onnx"),
            "random bytes": (folder / "random.onnx", "not a readable ONNX file"),
            "empty file": (folder / "empty.onnx", "onnx")}


@pytest.mark.parametrize("case", ["foreign graph", "truncated resode export", "random bytes", "empty file"])
def test_onnx_files_not_made_by_resode_are_refused_by_check(capsys, tmp_path, case):
    path, hint = _onnx_files(tmp_path)[case]
    code, out, err = run_cli(capsys, "check", path, "--data", "digits", "--depths", "2", "--repeats", "3",
                             "--limit", "8")
    _refused(code, out, err, hint)
    code, out, err = run_cli(capsys, "convert", path)  # not a checkpoint either
    _refused(code, out, err, path.name)


@pytest.mark.parametrize("forged", [{"resode.scheme": "euler", "resode.data": "digits"},
                                    {"resode.scheme": "euler", "resode.data": "digits", "resode.depths": "many",
                                     "resode.dynamic_depth": "false"}])
def test_onnx_files_with_forged_resode_metadata_are_refused(capsys, tmp_path, forged):
    code, out, err = run_cli(capsys, "check", _foreign_onnx(tmp_path / "forged.onnx", forged), "--depths", "2",
                             "--repeats", "3", "--limit", "8")
    _refused(code, out, err)


def _npz_arrays(**kw) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = {"x_train": rng.normal(size=(40, 5)).astype(np.float32), "y_train": rng.integers(0, 3, 40),
            "x_test": rng.normal(size=(10, 5)).astype(np.float32), "y_test": rng.integers(0, 3, 10)}
    return {**base, **kw}


def _bad_npz_files(folder: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    files = {}
    path = folder / "objects.npz"
    np.savez(path, **_npz_arrays(x_train=np.array([_ShellPayload(marker)] * 40, dtype=object)))
    files["pickled object array"] = (path, "pickled")
    path = folder / "pickle.npz"
    path.write_bytes(pickle.dumps(_ExecPayload(marker), protocol=2))
    files["a pickle named .npz"] = (path, "pickled")
    path = folder / "truncated.npz"
    np.savez(path, **_npz_arrays())
    path.write_bytes(path.read_bytes()[:300])
    files["truncated"] = (path, "cannot read")
    path = folder / "labels.npz"
    np.savez(path, **_npz_arrays(y_train=np.full(40, 10**12)))
    files["absurd label"] = (path, "labels must be below")
    path = folder / "text.npz"
    np.savez(path, **_npz_arrays(x_test=np.array([["a"] * 5] * 10)))
    files["text features"] = (path, "real numbers")
    path = folder / "inf.npz"
    np.savez(path, **_npz_arrays(x_test=np.full((10, 5), np.inf)))
    files["infinite features"] = (path, "finite")
    return files


def test_the_npz_payload_does_run_when_unpickled(tmp_path):
    marker = tmp_path / "ran"
    path = _bad_npz_files(tmp_path, marker)["pickled object array"][0]
    with np.load(path, allow_pickle=True) as fh:
        fh["x_train"]
    assert marker.exists()


@pytest.mark.parametrize("case", ["pickled object array", "a pickle named .npz", "truncated", "absurd label",
                                  "text features", "infinite features"])
def test_bad_npz_data_files_are_refused(capsys, tmp_path, case):
    marker = tmp_path / "pwned"
    path, hint = _bad_npz_files(tmp_path, marker)[case]
    code, out, err = run_cli(capsys, "train", "--data", path, "--epochs", "1", "--out", tmp_path / "m.safetensors")
    _refused(code, out, err, hint)
    assert not marker.exists() and not (tmp_path / "m.safetensors").exists()
    with pytest.raises(ResodeError, match=hint):
        load_data(str(path))


# --- numerical faults ----------------------------------------------------------------------------


class _InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class _Faulty:
    """torch.nn.functional for train.py, with chosen training steps (1-based cross_entropy calls) made faulty:
    a NaN loss, a finite loss with infinite gradients, or (after the loss) infinite weights."""

    def __init__(self, kind: str, steps, model: ODENet | None = None):
        self.kind, self.steps, self.model, self.calls = kind, set(steps), model, 0

    def __getattr__(self, name):
        return getattr(F, name)

    def cross_entropy(self, *args, **kwargs):
        self.calls += 1
        loss = F.cross_entropy(*args, **kwargs)
        if self.calls not in self.steps:
            return loss
        if self.kind == "loss":
            return loss * float("nan")
        if self.kind == "gradient":
            return _InfiniteGradient.apply(loss)
        self.model.stem.weight.data.fill_(float("inf"))  # the loss is finite, the step keeps the weight infinite
        return loss


@pytest.fixture(scope="module")
def data():
    return digits()


def _model(seed=0, **kw):
    return ODENet(ODENetConfig(**{"arch": "mlp", "in_shape": (64,), "widths": (16,), "depths": (4,), "hidden": 16,
                                  **kw}), seed=seed)


def _opts(**kw):
    return TrainOptions(**{"epochs": 3, "batch_size": 64, "lr": 3e-3, "device": "cpu", **kw})


STEPS = -(-1347 // 64)  # digits: 22 batches of 64 per epoch


def _snapshots(monkeypatch) -> list[bytes]:
    """The checkpoint's bytes after each of train's writes."""
    written, save = [], train_module.save_checkpoint

    def recording(path, *args, **kwargs):
        result = save(path, *args, **kwargs)
        written.append(Path(path).read_bytes())
        return result

    monkeypatch.setattr(train_module, "save_checkpoint", recording)
    return written


@pytest.mark.parametrize("kind, step, message", [
    ("loss", STEPS + 5, "the loss became non-finite at epoch 2, step 27"),
    ("gradient", STEPS + 5, "the gradient became non-finite at epoch 2, step 27"),
    ("weights", 2 * STEPS, "the weights became non-finite during epoch 2"),
])
def test_non_finite_values_stop_training_and_keep_the_last_good_checkpoint(data, tmp_path, monkeypatch, kind, step,
                                                                           message):
    out = tmp_path / "m.safetensors"
    model = _model()
    written = _snapshots(monkeypatch)
    monkeypatch.setattr(train_module, "F", _Faulty(kind, [step], model))
    with pytest.raises(TrainingDiverged, match=message) as failure:
        train(model, data, _opts(), out=out, show_progress=False)
    assert f"the last good checkpoint is {str(out)!r} (epoch 1)" in str(failure.value)
    assert len(written) == 1 and out.read_bytes() == written[0]  # epoch 1's file, untouched
    assert len(load_checkpoint(out)[1]["training"]["history"]) == 1
    assert json.loads(rio.read_safetensors(state_path(out))[1]["resode-train-state"])["epoch"] == 1
    assert temporaries(out) == [] and temporaries(state_path(out)) == []


def _adam_steps(out: Path) -> int:
    return int(rio.read_safetensors(state_path(out))[0]["0.step"])


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_skip_nonfinite_skips_and_counts_the_batch(data, tmp_path, monkeypatch, kind):
    out, log = tmp_path / "m.safetensors", tmp_path / "m.log.jsonl"
    monkeypatch.setattr(train_module, "F", _Faulty(kind, [3, STEPS + 7, STEPS + 9]))
    model, record = train(_model(), data, _opts(epochs=2, skip_nonfinite=True), out=out, log=log, show_progress=False)
    assert [r["skipped_batches"] for r in _log_rows(log)] == [1, 2]
    assert [r["skipped_batches"] for r in load_checkpoint(out)[1]["training"]["history"]] == [1, 2]
    assert record["training"]["skipped_batches"] == 3 and record["training"]["skip_nonfinite"] is True
    assert _adam_steps(out) == 2 * STEPS - 3  # no optimizer step for a skipped batch
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_nonfinite_still_stops_when_too_many_batches_fail(data, tmp_path, monkeypatch):
    out = tmp_path / "m.safetensors"
    written = _snapshots(monkeypatch)
    monkeypatch.setattr(train_module, "F", _Faulty("loss", range(STEPS + 1, STEPS + 4)))  # 3 of epoch 2's 22
    with pytest.raises(TrainingDiverged, match="3 of epoch 2's 22 batches had a non-finite loss or gradient"):
        train(_model(), data, _opts(skip_nonfinite=True), out=out, show_progress=False)
    assert len(written) == 1 and out.read_bytes() == written[0]


def test_skip_nonfinite_stops_when_a_whole_epoch_fails(data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "F", _Faulty("gradient", [1]))
    with pytest.raises(TrainingDiverged, match="1 of epoch 1's 1 batches"):  # one batch per epoch: all of it
        train(_model(), data, _opts(batch_size=2048, skip_nonfinite=True), show_progress=False)


def test_cli_skip_nonfinite(capsys, tmp_path, monkeypatch):
    args = ["train", "--depth", "4", "--width", "16", "--hidden", "16", "--epochs", "1", "--batch-size", "64"]
    monkeypatch.setattr(train_module, "F", _Faulty("loss", [2]))
    code, out, err = run_cli(capsys, *args, "--out", tmp_path / "a.safetensors")
    _refused(code, out, err, "the loss became non-finite at epoch 1, step 2", "--skip-nonfinite")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(train_module, "F", _Faulty("loss", [2]))
    code, out, err = run_cli(capsys, *args, "--skip-nonfinite", "--out", tmp_path / "b.safetensors", "--json")
    assert code == 0, err
    assert [r["skipped_batches"] for r in _log_rows(tmp_path / "b.log.jsonl")] == [1]
    assert load_checkpoint(tmp_path / "b.safetensors")[1]["training"]["skipped_batches"] == 1


def test_an_exploding_adjoint_reconstruction_error_is_reported(data, capsys, tmp_path):
    rough = _model(grad="adjoint", depths=(2,))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for knots in rough.blocks[0].curve.knots.values():
            knots.copy_(torch.randn(knots.shape, generator=gen))  # rough, large weights at depth 2
    log = tmp_path / "log.jsonl"
    train(rough, data, _opts(epochs=1, lr=1e-4), log=log, show_progress=False)
    error = _log_rows(log)[0]["reconstruction_error"][0]
    err = capsys.readouterr().err
    assert error > 1 and f"warning: epoch 1: the adjoint's reconstruction error in block 0 is {error:.3g}" in err
    assert "--grad symplectic" in err

    smooth = _model(grad="adjoint", depths=(16,), scheme="heun")  # the control: a small error, no warning
    train(smooth, data, _opts(epochs=1), log=log, show_progress=False)
    assert 0 < _log_rows(log)[-1]["reconstruction_error"][0] < 1e-3
    assert "warning" not in capsys.readouterr().err


def test_a_non_finite_reconstruction_error_is_reported(capsys):
    train_module._warn_reconstruction(4, [1e-6, float("nan")])
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "block 1 is nan" in err


# --- interruptions: Ctrl-C and SIGTERM say so, exit 130 / 143, and leave no temporary folders -----


def _interrupt_when(args: list[str], ready, sig: int, env: dict) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-c", RUN_CLI, *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not ready():
            assert proc.poll() is None, "the command ended before it could be interrupted"
            assert time.monotonic() < deadline, "the command took too long to start its work"
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, err


def test_ctrl_c_mid_training_says_how_to_continue(tmp_path):
    out = tmp_path / "run.safetensors"
    args = ["train", "--depth", "16", "--width", "16", "--hidden", "16", "--epochs", "500", "--batch-size", "8",
            "--device", "cpu", "--out", out]  # many epochs: interrupted after the first
    code, err = _interrupt_when(args, lambda: state_path(out).exists(), signal.SIGINT, ENV)
    assert code == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted") and "--resume" in err and "Traceback" not in err
    assert load_checkpoint(out)[1]["training"]["history"], "the last finished epoch is kept"


def test_sigterm_mid_check_removes_its_temporary_graphs(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**ENV, "TMPDIR": str(scratch)}
    args = ["check", "digits-mlp", "--depths", "2,4,8,16,32,64,128", "--schemes", "euler,heun,rk4", "--json"]
    def graphs():  # check's own temporary folder (torch leaves files of its own in TMPDIR too)
        return [p for p in scratch.iterdir() if p.is_dir() and p.name.startswith("tmp")]

    code, err = _interrupt_when(args, lambda: any(any(d.glob("*.onnx")) for d in graphs()), signal.SIGTERM, env)
    assert code == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: terminated (SIGTERM)") and "Traceback" not in err
    assert graphs() == [], "the temporary ONNX graphs are removed"
