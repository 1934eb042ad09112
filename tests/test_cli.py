import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from resode_export import __version__
from resode_export.io import load_checkpoint

from .helpers import run_cli

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits-mlp.safetensors"
FASHION = REPO / "models" / "fashion-conv.safetensors"
JSON_KEYS = {"source_depth", "source_scheme", "depth", "scheme", "interp", "source_accuracy", "accuracy",
             "max_rel_deviation", "mean_rel_deviation", "seconds"}


def test_help_lists_the_commands(capsys):
    code, out, err = run_cli(capsys, "--help")
    assert code == 0 and all(c in out for c in ("convert", "train", "export", "check", "inspect")), err
    code, out, _ = run_cli(capsys)  # no arguments: help, not an error
    assert code == 0 and "convert" in out
    code, out, _ = run_cli(capsys, "convert", "--help")
    assert code == 0 and "euler|midpoint|heun|ralston|rk4|rk38" in out and "constant|linear|cubic|smooth" in out


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"resode {__version__}"


def test_python_dash_m_runs_in_a_subprocess():
    done = subprocess.run([sys.executable, "-m", "resode_export", "--version"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0 and __version__ in done.stdout, done.stderr


def test_convert_default_model_json(capsys):
    code, out, err = run_cli(capsys, "convert", "--depth", "16", "--scheme", "heun", "--json")
    assert code == 0, err
    result = json.loads(out)  # exactly one JSON object on stdout
    assert set(result) >= JSON_KEYS
    assert result["model"].endswith("digits-mlp.safetensors")
    assert (result["source_depth"], result["source_scheme"], result["depth"], result["scheme"]) == (16, "euler", 16,
                                                                                                    "heun")
    assert 0.9 <= result["source_accuracy"] <= 1 and 0.9 <= result["accuracy"] <= 1
    assert 0 < result["mean_rel_deviation"] <= result["max_rel_deviation"] < 1
    assert result["test_samples"] == 450


def test_convert_at_native_depth_is_exact(capsys):
    code, out, err = run_cli(capsys, "convert", str(DIGITS), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["max_rel_deviation"] == 0.0 and result["accuracy"] == result["source_accuracy"]


@pytest.mark.parametrize("model", [DIGITS, FASHION], ids=["digits-mlp", "fashion-conv"])
def test_convert_each_shipped_model_and_write_it(capsys, tmp_path, model):
    out_path = tmp_path / "converted.safetensors"
    code, out, err = run_cli(capsys, "convert", model.stem, "--depth", "8", "--scheme", "rk4", "--interp", "constant",
                             "--limit", "200", "--out", out_path, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["out"] == str(out_path) and result["test_samples"] == 200
    assert result["accuracy"] > 0.5 and result["source_accuracy"] > 0.5
    converted, header = load_checkpoint(out_path)
    assert set(converted.config.depths) == {8} and converted.config.scheme == "rk4"
    assert converted.config.interp == "constant" and header["converted_from"]["scheme"] == "euler"
    code, out, err = run_cli(capsys, "convert", out_path, "--limit", "200", "--json")  # the result is a model too
    assert code == 0 and json.loads(out)["source_depth"] == 8, err


def test_convert_table_output(capsys):
    code, out, err = run_cli(capsys, "convert", "--depth", "8", "--scheme", "midpoint")
    assert code == 0, err
    for label in ("source", "converted", "source accuracy", "converted accuracy", "max rel. deviation", "wall time"):
        assert label in out
    assert "depth 16, euler" in out and "depth 8, midpoint" in out


def test_depth_lists_and_scales(capsys):
    code, out, err = run_cli(capsys, "convert", "--depth-scale", "0.5", "--json", "--limit", "50")
    assert code == 0 and json.loads(out)["depth"] == 8, err
    code, out, err = run_cli(capsys, "convert", "--depth", "12", "--json", "--limit", "50")
    assert code == 0 and json.loads(out)["depth"] == 12, err


def _bad_files(tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(DIGITS.read_bytes()[:5000])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": __import__("torch").zeros(3)}, str(foreign))
    pickled = tmp_path / "model.pkl"
    pickled.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    return {"missing": tmp_path / "missing.safetensors", "truncated": truncated, "foreign": foreign,
            "pickle": pickled}


BAD_ARGS = {
    "unknown scheme": (["--scheme", "rk45"], "euler"),
    "unknown interp": (["--interp", "spline"], "cubic"),
    "depth 0": (["--depth", "0"], "depth"),
    "negative depth": (["--depth", "-3"], "depth"),
    "absurd depth": (["--depth", "1000000000"], "65536"),
    "non-integer depth": (["--depth", "deep"], "integer"),
    "too many depths": (["--depth", "4,4,4"], "stages"),
    "depth and scale": (["--depth", "4", "--depth-scale", "2"], "not both"),
    "fractional scale": (["--depth-scale", "0.3"], "whole depths"),
    "too many basis functions": (["--interp", "smooth", "--n-basis", "64"], "n_basis"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_fail_cleanly(capsys, tmp_path, case):
    args, hint = BAD_ARGS[case]
    out_path = tmp_path / "out.safetensors"
    code, out, err = run_cli(capsys, "convert", *args, "--out", out_path)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and hint in err, err
    assert "Traceback" not in err and out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case, hint", [("missing", "no such file"), ("truncated", "truncated or corrupt"),
                                        ("foreign", "not a resode checkpoint"), ("pickle", "never unpickles")])
def test_bad_files_fail_cleanly(capsys, tmp_path, case, hint):
    path = _bad_files(tmp_path)[case]
    before = set(tmp_path.iterdir())
    code, out, err = run_cli(capsys, "convert", path, "--out", tmp_path / "out.safetensors")
    assert code == 2 and len(err.strip().splitlines()) == 1 and hint in err, err
    assert set(tmp_path.iterdir()) == before, "nothing written"


def test_output_in_a_missing_folder(capsys, tmp_path):
    code, out, err = run_cli(capsys, "convert", "--out", tmp_path / "nope" / "m.safetensors")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "nope").exists()


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run(["resode", "convert", "--scheme", "nope"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


def test_train_writes_a_checkpoint_and_card(capsys, tmp_path):
    out_path = tmp_path / "tiny.safetensors"
    code, out, err = run_cli(capsys, "train", "--depth", "4", "--width", "16", "--hidden", "16", "--epochs", "10",
                             "--lr", "3e-3", "--out", out_path, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["test_accuracy"] > 0.8 and result["depth"] == 4
    card = (tmp_path / "tiny.md").read_text()
    assert "digits" in card and "resode train" in card and f"{100 * result['test_accuracy']:.2f} %" in card
    model, header = load_checkpoint(out_path)
    assert header["training"]["epochs"] == 10 and model.config.depths == (4,)


def test_train_bad_input(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data", "imagenet", "--out", tmp_path / "m.safetensors")
    assert code == 2 and "unknown data set" in err
    code, _, err = run_cli(capsys, "train", "--width", "8,x", "--out", tmp_path / "m.safetensors")
    assert code == 2 and "--width" in err
    assert list(tmp_path.iterdir()) == []


def test_convert_leaves_a_training_method_that_cannot_run_the_new_scheme(capsys, tmp_path):
    trained = tmp_path / "rev.safetensors"
    code, _, err = run_cli(capsys, "train", "--depth", "4", "--width", "8", "--hidden", "8", "--epochs", "1",
                           "--scheme", "reversible_heun", "--grad", "reversible", "--out", trained)
    assert code == 0, err
    out_path = tmp_path / "heun.safetensors"
    code, out, err = run_cli(capsys, "convert", trained, "--scheme", "heun", "--out", out_path, "--json")
    assert code == 0 and json.loads(out)["scheme"] == "heun", err
    assert load_checkpoint(out_path)[0].config.grad == "backprop"


@pytest.mark.parametrize("args, hint", [
    (["convert", "--depth-scale", "inf"], "finite"),
    (["convert", "--depth-scale", "1e308"], "maximum"),
    (["train", "--arch", "conv", "--width", "12"], "multiples of groups"),
    (["train", "--width", "0"], "positive"),
    (["train", "--lr", "nan"], "--lr must be a number in (0, 1e+06], got nan"),
    (["train", "--weight-decay", "nan"], "--weight-decay must be a number in [0, 1e+06], got nan"),
    (["train", "--epochs", "0"], "'--epochs': Input should be greater than or equal to 1"),
])
def test_more_bad_arguments(capsys, tmp_path, args, hint):
    code, out, err = run_cli(capsys, *args, "--out", tmp_path / "m.safetensors")
    assert code == 2 and hint in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_conv_on_digits_takes_images_and_later_commands_find_them(capsys, tmp_path, monkeypatch):
    """--arch conv on the default data trains on digits as (1, 8, 8) images (digits-images), and the
    checkpoint's data set loads again for convert and check."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "train", "--arch", "conv", "--width", "8", "--depth", "2", "--epochs", "1",
                             "--out", "m.safetensors", "--json")
    assert code == 0 and "digits-images" in err, err
    _, header = load_checkpoint(tmp_path / "m.safetensors")
    assert header["data"]["name"] == "digits-images" and header["config"]["in_shape"] == [1, 8, 8]
    code, out, err = run_cli(capsys, "convert", "m.safetensors", "--depth", "4", "--json")
    assert code == 0 and json.loads(out)["test_samples"] == 450, err


def test_an_npz_data_set_is_found_from_another_folder(capsys, tmp_path, monkeypatch):
    """A checkpoint records its .npz by absolute path: convert from another folder measures on it; a
    vanished .npz is named, with --data as the fix."""
    import numpy as np

    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    np.savez(tmp_path / "a" / "toy.npz", x_train=rng.normal(size=(40, 6)).astype(np.float32),
             y_train=rng.integers(0, 3, 40), x_test=rng.normal(size=(10, 6)).astype(np.float32),
             y_test=rng.integers(0, 3, 10))
    monkeypatch.chdir(tmp_path / "a")
    code, _, err = run_cli(capsys, "train", "--data", "toy.npz", "--width", "4", "--depth", "2", "--epochs", "1",
                           "--out", "m.safetensors")
    assert code == 0, err
    monkeypatch.chdir(tmp_path / "b")
    code, out, err = run_cli(capsys, "convert", "../a/m.safetensors", "--depth", "3", "--json")
    assert code == 0 and json.loads(out)["test_samples"] == 10, err
    (tmp_path / "a" / "toy.npz").unlink()
    code, out, err = run_cli(capsys, "convert", "../a/m.safetensors", "--depth", "3")
    assert code == 2 and "named in its checkpoint" in err and "give --data" in err and len(err.strip().splitlines()) == 1


def test_files_of_the_wrong_kind_are_named_for_what_they_are(capsys, tmp_path):
    import numpy as np

    np.savez(tmp_path / "data.npz", x_train=np.zeros((3, 2), np.float32))
    (tmp_path / "graph.onnx").write_bytes(b"\x08\x07")
    cases = [(["train", tmp_path / "data.npz"], "is a data archive (.npz), not a model; pass it as --data"),
             (["inspect", tmp_path / "graph.onnx"], "is an exported graph, not a checkpoint"),
             (["convert", tmp_path / "graph.onnx", "--depth", "3"], "is an exported graph, not a checkpoint"),
             (["train", "--data", tmp_path / "data.npz"], "lacks the array(s) y_train, x_test, y_test"),
             (["convert", "--out", tmp_path / "data.npz" / "m.safetensors"], "is a file, not a folder")]
    for args, hint in cases:
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and hint in err and len(err.strip().splitlines()) == 1, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "graph.onnx"]


def test_check_tolerance_and_repeated_depths(capsys):
    code, out, err = run_cli(capsys, "check", DIGITS, "--tolerance", "nan")
    assert code == 2 and "--tolerance must be a finite number of accuracy points >= 0, got nan" in err
    code, out, err = run_cli(capsys, "check", DIGITS, "--depths", "4,4", "--schemes", "euler,euler", "--limit", "20",
                             "--repeats", "3", "--json")
    assert code == 0, err
    assert [(r["depth"], r["scheme"]) for r in json.loads(out)["rows"]] == [(4, "euler")]


def test_outputs_named_for_another_form_are_refused(capsys, tmp_path):
    """An output whose name claims another file form, the source itself, or an option that would be ignored."""
    src = tmp_path / "m.safetensors"
    src.write_bytes(DIGITS.read_bytes())
    cases = [(["export", src, "--format", "onnx", "--out", tmp_path / "a.pt"], "--format onnx writes a .onnx file"),
             (["export", src, "--format", "torchscript", "--out", tmp_path / "a.onnx"], "but --out ends in .onnx"),
             (["export", src, "--format", "pt2", "--out", tmp_path / "a.pt"], "--format pt2 writes a .pt2 file"),
             (["convert", src, "--out", tmp_path / "a.onnx"], "convert writes a .safetensors checkpoint"),
             (["convert", src, "--out", src], "is the model being converted"),
             (["convert", src, "--n-basis", "3"], "add --interp smooth or drop --n-basis")]
    for args, hint in cases:
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and hint in err and len(err.strip().splitlines()) == 1, (args, err)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert src.read_bytes() == DIGITS.read_bytes()


def test_fine_tuning_refuses_options_it_would_ignore(capsys, tmp_path):
    src = tmp_path / "m.safetensors"
    src.write_bytes(DIGITS.read_bytes())
    out = tmp_path / "ft.safetensors"
    cases = [(["train", src, "--arch", "conv"], "--arch only applies to a new model and fine-tuning keeps"),
             (["train", src, "--width", "16", "--init", "iid"], "--width, --init only apply to a new model"),
             (["train", "--untie"], "--untie fine-tunes a tied checkpoint")]
    for args, hint in cases:
        code, _, err = run_cli(capsys, *args, "--epochs", "1", "--out", out)
        assert code == 2 and hint in err and len(err.strip().splitlines()) == 1, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_data_of_the_wrong_shape_says_which_data_fits(capsys, tmp_path):
    code, _, err = run_cli(capsys, "convert", DIGITS, "--data", "digits-images")
    assert code == 2 and "this model takes flat samples: give --data digits" in err and len(err.strip().splitlines()) == 1


def test_fine_tuned_model_card_reads_plainly(capsys, tmp_path):
    src = tmp_path / "m.safetensors"
    src.write_bytes(DIGITS.read_bytes())
    code, _, err = run_cli(capsys, "train", src, "--depth", "4", "--epochs", "1", "--out", tmp_path / "ft.safetensors")
    assert code == 0, err
    card = (tmp_path / "ft.md").read_text()
    assert f"gradients), fine-tuned from {src}." in card and "from fine-tuned" not in card


def test_resume_into_another_log_is_refused(capsys, tmp_path):
    out = tmp_path / "run.safetensors"
    args = ["train", "--depth", "2", "--width", "4", "--hidden", "4", "--epochs", "2", "--out", out]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    code, _, err = run_cli(capsys, *args, "--resume", "--log", tmp_path / "other.jsonl")
    assert code == 2 and "would split its history" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "other.jsonl").exists()


def test_resume_of_a_conv_run_on_digits_finds_its_images(capsys, tmp_path):
    """`--arch conv --data digits` trains on digits-images; the same command with --resume does too."""
    args = ["train", "--arch", "conv", "--data", "digits", "--width", "8", "--depth", "2", "--epochs", "1",
            "--out", tmp_path / "c.safetensors"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 2 and "already finished" in err, err


def test_errors_of_other_ranks_are_marked_not_hidden(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, "convert", "missing.safetensors")
    assert code == 2 and err.startswith("[rank 1] error: ") and len(err.strip().splitlines()) == 1, err


def test_checkpoint_names_are_safetensors(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "m.pt")
    assert code == 2 and "train writes a .safetensors checkpoint" in err, err
    code, _, err = run_cli(capsys, "export", DIGITS, "--out", tmp_path / "m.safetensors")
    assert code == 2 and "a .safetensors name is for resode checkpoints" in err, err
    assert list(tmp_path.iterdir()) == []


def test_resume_without_the_runs_custom_log_is_refused(capsys, tmp_path):
    """The training state records the run's log: resuming a run that logged to a custom file, without
    naming it, would start a second history in the default log."""
    out, custom = tmp_path / "run.safetensors", tmp_path / "custom.jsonl"
    args = ["train", "--depth", "2", "--width", "4", "--hidden", "4", "--epochs", "2", "--out", out]
    code, _, err = run_cli(capsys, *args, "--log", custom)
    assert code == 0, err
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 2 and "resume with the run's own log" in err and str(custom) in err, err
    assert not (tmp_path / "run.log.jsonl").exists()
    code, _, err = run_cli(capsys, *args, "--log", custom, "--resume")
    assert code == 2 and "already finished" in err, err
