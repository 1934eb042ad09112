import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from resode_export import io
from resode_export.errors import ResodeError
from resode_export.io import atomic_write, load_checkpoint, save_checkpoint
from resode_export.network import ODENet

from .helpers import mlp_config


@pytest.fixture
def checkpoint(tmp_path):
    model = ODENet(mlp_config(), init="iid")
    return save_checkpoint(tmp_path / "m.safetensors", model, {"data": {"name": "digits"}, "metrics": {"a": 1}}), model


def test_round_trip_keeps_weights_config_and_header(checkpoint):
    path, model = checkpoint
    loaded, header = load_checkpoint(path)
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert header["metrics"] == {"a": 1} and header["format_version"] == io.FORMAT_VERSION
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"], "no temporary file left"


def test_failed_write_leaves_nothing_behind(tmp_path):
    def explode(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "out.safetensors", explode)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_replaced_only_when_the_write_succeeds(checkpoint):
    path, _ = checkpoint
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        atomic_write(path, lambda tmp: (_ for _ in ()).throw(RuntimeError("boom")))
    assert path.read_bytes() == before


def _expect(path, match):
    with pytest.raises(ResodeError, match=match):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.safetensors", "no such file")
    _expect(tmp_path, "not a file")


def test_truncated_and_garbage_files(checkpoint, tmp_path):
    path, _ = checkpoint
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _expect(truncated, "truncated or corrupt")
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"hello world, not a model")
    _expect(garbage, "truncated or corrupt")
    empty = tmp_path / "e.safetensors"
    empty.write_bytes(b"")
    _expect(empty, "truncated or corrupt")


def test_pickles_are_never_loaded(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Boom()))
    _expect(evil, "never unpickles")
    pt = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(2)}, pt)
    _expect(pt, "never unpickles")


def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    """Header lengths 0x80, 0x280… begin with the pickle protocol byte; the layout decides."""
    for pad in range(0, 300):
        path = tmp_path / "m.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata={"resode": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no header length starting with 0x80 was produced")
    _expect(path, "corrupt resode metadata")  # read as safetensors, not refused as a pickle


def test_foreign_safetensors_files(tmp_path, checkpoint):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    _expect(foreign, "not a resode checkpoint")
    bad_json = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad_json), metadata={"resode": "{not json"})
    _expect(bad_json, "corrupt resode metadata")
    future = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(2)}, str(future), metadata={"resode": json.dumps({"format_version": 99})})
    _expect(future, "format 99")
    bad_config = tmp_path / "cfg.safetensors"
    header = {"format_version": 1, "config": {"arch": "transformer"}}
    save_file({"w": torch.zeros(2)}, str(bad_config), metadata={"resode": json.dumps(header)})
    _expect(bad_config, "invalid config")


def _tamper(path, tmp_path, change):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    change(tensors)
    out = tmp_path / "tampered.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return out


def test_tensors_must_match_the_config(checkpoint, tmp_path):
    path, _ = checkpoint
    _expect(_tamper(path, tmp_path, lambda t: t.pop("head.bias")), "missing")
    _expect(_tamper(path, tmp_path, lambda t: t.update({"head.bias": torch.zeros(7)})), "shape")


def test_non_finite_weights_are_refused(checkpoint, tmp_path):
    path, _ = checkpoint

    def poison(t):
        t["blocks.0.curve.knots.W"][3, 0, 0] = float("nan")

    _expect(_tamper(path, tmp_path, poison), "NaN")


def test_output_folder_must_exist(tmp_path):
    with pytest.raises(ResodeError, match="does not exist"):
        save_checkpoint(tmp_path / "missing" / "m.safetensors", ODENet(mlp_config()))
    with pytest.raises(ResodeError, match="is a folder"):
        save_checkpoint(tmp_path, ODENet(mlp_config()))


def test_special_outputs_are_refused_and_links_written_through(tmp_path):
    """A device, pipe or socket at the output path is refused, never replaced by a file; a symbolic link
    is written through (its target replaced, the link kept); a file where the folder should be is named."""
    import os

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ResodeError, match="not a regular file"):
        save_checkpoint(fifo, ODENet(mlp_config()))
    assert fifo.is_fifo()
    with pytest.raises(ResodeError, match="not a regular file"):
        io.check_output_path("/dev/null")
    (tmp_path / "real").mkdir()
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "real" / "m.safetensors")
    model = ODENet(mlp_config(), init="iid")
    save_checkpoint(link, model)
    assert link.is_symlink() and (tmp_path / "real" / "m.safetensors").is_file()
    assert torch.equal(load_checkpoint(link)[0].state_dict()["stem.weight"], model.state_dict()["stem.weight"])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ResodeError, match="is a file, not a folder"):
        io.check_output_path(tmp_path / "afile" / "m.safetensors")


def test_a_symlink_loop_at_the_output_is_one_clear_error(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ResodeError, match="cannot be resolved"):
        io.check_output_path(tmp_path / "a")


def test_an_unwritable_folder_is_found_before_any_work():
    """The folder is probed with a real file, so even root learns up front that /proc takes no files."""
    with pytest.raises(ResodeError, match=r"cannot write in folder '/proc'"):
        io.check_output_path("/proc/m.safetensors")


def test_a_failed_write_is_one_clear_error(tmp_path):
    def fail(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(ResodeError, match="No space left on device"):
        atomic_write(tmp_path / "m.bin", fail)
    assert list(tmp_path.iterdir()) == []


def test_metadata_of_the_wrong_shape(tmp_path):
    for i, header in enumerate([[1, 2], {"format_version": 1, "config": {}, "data": "digits"}]):
        path = tmp_path / f"odd{i}.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata={"resode": json.dumps(header)})
        _expect(path, "corrupt resode metadata")
    bad_knots = tmp_path / "knots.safetensors"
    header = {"format_version": 1, "config": {"knots": [-1], "depths": [4], "widths": [4]}}
    save_file({"w": torch.zeros(2)}, str(bad_knots), metadata={"resode": json.dumps(header)})
    _expect(bad_knots, "positive")
