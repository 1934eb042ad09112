"""Checkpoints: one ``.safetensors`` file, the config as JSON in its metadata.

Loading never unpickles: a pickle or ``torch.save`` file is refused with a clear message.
Every write goes to a temporary name in the target folder, is flushed to disk and renamed into
place, so a failed or killed write never leaves a half-written file under the target's name
(a killed writer's temporary file is removed by the next write to the same path). Every file
resode writes carries a SHA-256 checksum of its metadata and tensors, so truncation and bit
flips are refused on loading instead of silently changing the weights.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ResodeError, one_line
from .network import ODENet, ODENetConfig

FORMAT_VERSION = 1
METADATA_KEY = "resode"
DIGEST_KEY = "resode.sha256"  # safetensors metadata: checksum of the other metadata and every tensor
CHECKSUM = "sha256"  # a header's "checksum" entry: the file must carry DIGEST_KEY (older files do not)
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol ≥ 2; torch.save's zip container
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early, before any work, if ``path`` cannot be written as a file; return the path to write.

    A symbolic link is written through (its target is replaced, the link kept); anything at ``path``
    that is not a regular file (a device, a pipe, a socket) is refused rather than replaced; the
    folder is probed with a real temporary file, so a read-only or special folder fails here.
    """
    given = Path(path)
    try:
        path = given.resolve(strict=False) if given.is_symlink() else given
    except (RuntimeError, OSError) as exc:  # a symlink loop
        raise ResodeError(f"output path {str(given)!r} cannot be resolved ({one_line(str(exc))}); "
                          "choose another output path") from None
    if path.parent.exists() and not path.parent.is_dir():
        raise ResodeError(f"output folder {str(path.parent)!r} is a file, not a folder; choose another output path")
    if not path.parent.is_dir():
        raise ResodeError(f"output folder {str(path.parent)!r} does not exist; create it or choose another output path")
    if path.is_dir():
        raise ResodeError(f"output path {str(given)!r} is a folder; give a file name inside it")
    if path.exists() and not path.is_file():
        raise ResodeError(f"output path {str(given)!r} is not a regular file (a device, pipe or socket); "
                          "choose a file path")
    try:
        os.unlink(new_temporary(path))
    except OSError as exc:
        raise ResodeError(f"cannot write in folder {str(path.parent)!r} ({exc.strerror or exc}); "
                          "choose another output path") from None
    return path


def check_distinct(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse an output path that is an input (a model, a data file) or another output: it would be destroyed.

    ``outputs`` and ``inputs`` map an option's name (``--out``) to its path (None: not given).
    """
    def key(p):
        try:
            return Path(p).resolve()
        except (OSError, RuntimeError):
            return Path(p).absolute()

    seen: dict[Path, str] = {}
    for name, p in inputs.items():
        if p is not None and Path(p).exists():
            seen.setdefault(key(p), name)
    for name, p in outputs.items():
        if p is None:
            continue
        other = seen.get(key(p))
        if other is not None:
            raise ResodeError(f"{name} {str(p)!r} is also {other}: writing it would destroy it; give {name} another "
                              "path")
        seen[key(p)] = name


def new_temporary(path: Path) -> str:
    """A new empty file beside ``path``, named as :func:`temporaries` finds it (``.NAME.PID-XXXX.tmp``)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def write_failed(path: Path, exc: OSError) -> ResodeError:
    """The one error line for a write that failed (a full disk, say): nothing was written."""
    return ResodeError(f"could not write {str(path)!r} ({exc.strerror or one_line(str(exc))}); "
                       "free space or choose another output path")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_name)`` on a temporary file beside ``path``, flush it to disk, rename it to ``path``.

    ``path`` then holds either its previous content or the complete new one, even if the process is
    killed or the machine loses power; an exception removes the temporary file. Temporary files of
    writers to ``path`` that were killed (their process is gone) are removed first.
    """
    path = check_output_path(path)
    _remove_stale_temporaries(path)
    tmp = new_temporary(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_failed(path, exc) from None
        raise
    _fsync(path.parent)  # the rename itself
    return path


def temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files of :func:`atomic_write` calls to ``path`` (live or killed writers)."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"\d+-[A-Za-z0-9_]+\.tmp")
    return sorted(p for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if pattern.fullmatch(p.name))


def _remove_stale_temporaries(path: Path) -> None:
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX
        return
    for tmp in temporaries(path):
        pid = int(tmp.name[len(path.name) + 2 :].split("-", 1)[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:  # its writer is gone: the file can never be completed
            tmp.unlink(missing_ok=True)
        except OSError:  # alive (another user's process) or unknown: leave it
            pass


def _fsync(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync folders
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | os.PathLike, model: ODENet, info: dict | None = None) -> Path:
    """Write ``model`` and ``info`` (data set, metrics, training record) to ``path`` atomically."""
    header = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(), **(info or {}), "checksum": CHECKSUM}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return write_safetensors(path, tensors, {METADATA_KEY: json.dumps(header)})


def digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of the metadata (except the checksum itself) and of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != DIGEST_KEY):
        h.update(json.dumps([key, metadata[key]]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write tensors and string metadata, with their checksum, atomically to ``path``."""
    metadata = {**metadata, DIGEST_KEY: digest(tensors, metadata)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path: Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the string metadata of a safetensors file; ResodeError if it is corrupt.

    A file written by resode carries a checksum, which must match (files from elsewhere have none);
    ``verify=False`` leaves that to a later :func:`verify_digest`.
    """
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:  # safetensors raises its own error types for every corruption
        text = one_line(str(exc))
        raise ResodeError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {text}; "
                          "restore it from a backup or write it again") from None
    if verify:
        verify_digest(path, tensors, metadata)
    return tensors, metadata


def verify_digest(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], required: bool = False) -> None:
    """ResodeError if the file carries a checksum that its metadata and tensors do not match, or none when
    ``required`` (its header says it was written with one)."""
    if required and DIGEST_KEY not in metadata:
        raise ResodeError(f"{str(path)!r} is corrupt: its header says it carries a checksum, but the checksum is gone; "
                          "restore it from a backup or write it again")
    if DIGEST_KEY in metadata and metadata[DIGEST_KEY] != digest(tensors, metadata):
        raise ResodeError(f"{str(path)!r} is corrupt: its contents do not match the checksum resode wrote with it "
                          "(a flipped bit or a partial copy?); restore it from a backup or write it again")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    if not path.exists():
        raise ResodeError(f"no such file: {str(path)!r}; give the path of a resode .safetensors checkpoint")
    if not path.is_file():
        raise ResodeError(f"{str(path)!r} is not a file; give the path of a resode .safetensors checkpoint")
    with path.open("rb") as fh:
        head = fh.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header. Its first byte can be
    # 0x80 like a pickle's, so a file is called a pickle only when it is not laid out as safetensors.
    laid_out = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8
    if not laid_out and head.startswith(_PICKLE_MAGIC):
        raise ResodeError(
            f"{str(path)!r} is a pickle/torch.save file; resode never unpickles files: "
            "give a resode .safetensors checkpoint"
        )
    if not laid_out and path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ResodeError(
            f"{str(path)!r} is not a safetensors file (a {path.suffix} pickle?); resode never unpickles files: "
            "give a resode .safetensors checkpoint"
        )
    tensors, metadata = read_safetensors(path, verify=False)  # specific complaints first, the checksum last
    if METADATA_KEY not in metadata:
        raise ResodeError(f"{str(path)!r} is a safetensors file but not a resode checkpoint (no {METADATA_KEY!r} metadata)")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ResodeError(f"{str(path)!r} has corrupt resode metadata: {exc}") from None
    if not isinstance(header, dict) or not all(isinstance(header.get(k, {}), dict) for k in _OBJECT_ENTRIES):
        raise ResodeError(f"{str(path)!r} has corrupt resode metadata: expected a JSON object whose "
                          f"{', '.join(_OBJECT_ENTRIES)} entries are objects")
    return tensors, header, metadata


_OBJECT_ENTRIES = ("config", "data", "metrics", "training", "converted_from", "imported")
_SIMPLE_TYPES = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
                 "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                 "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool), "None": lambda v: v is None,
                 "tuple[int, ...]": lambda v: isinstance(v, (list, tuple))
                 and all(isinstance(i, int) and not isinstance(i, bool) for i in v)}

_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "text", "bool": "true or false", "None": "null",
               "tuple[int, ...]": "a list of integers"}


def _config_type_errors(config: dict) -> list[str]:
    """Config entries whose JSON value does not have their field's type (fields of other types are not checked)."""
    errors = []
    for f in fields(ODENetConfig):
        if f.name not in config or not isinstance(f.type, str):
            continue
        kinds = [k.strip() for k in f.type.split("|")]
        if all(k in _SIMPLE_TYPES for k in kinds) and not any(_SIMPLE_TYPES[k](config[f.name]) for k in kinds):
            wanted = " or ".join(_TYPE_NAMES[k] for k in kinds)
            errors.append(f"{f.name} must be {wanted}, not {json.dumps(config[f.name])[:40]}")
    return errors


def load_checkpoint(path: str | os.PathLike) -> tuple[ODENet, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    The config is checked against the file's tensors before the model is built, so a header that
    claims an absurd size costs no memory.

    Returns:
        the model (float32, eval mode) and the header dict (``config``, ``data``, ``metrics``…).
    Raises:
        ResodeError: missing, corrupt, pickled, foreign or inconsistent files, non-finite weights.
    """
    path = Path(path)
    tensors, header, metadata = _read(path)
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ResodeError(f"{str(path)!r} has checkpoint format {version!r}; this resode reads format {FORMAT_VERSION}")
    if "config" not in header:
        raise ResodeError(f"{str(path)!r} has no config in its resode metadata; restore the file or write it again")
    wrong = _config_type_errors(header["config"])
    if wrong:
        raise ResodeError(f"{str(path)!r} has an invalid config: {'; '.join(wrong[:3])}")
    try:
        config = ODENetConfig.from_dict(header["config"])
        expected = _expected_tensors(config)
    except ResodeError as exc:
        raise ResodeError(f"{str(path)!r} has an invalid config: {exc}") from None
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise ResodeError(f"{str(path)!r} has an invalid config: {one_line(repr(exc))}") from None
    if expected is not None:
        _check_tensors(path, tensors, expected)
    try:
        model = ODENet(config)
    except (ResodeError, KeyError, TypeError, ValueError, ArithmeticError, RuntimeError) as exc:
        raise ResodeError(f"{str(path)!r} has an invalid config: {one_line(repr(exc))}") from None
    if expected is None:
        _check_tensors(path, tensors, {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()})
    verify_digest(path, tensors, metadata, required=header.pop("checksum", None) is not None)
    model.load_state_dict(tensors)
    return model.eval(), header


def _expected_tensors(config: ODENetConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]] | None:
    """Name → (shape, dtype) of the model ``config`` describes, built on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            skeleton = ODENet(config)
    except (ResodeError, KeyError, TypeError, ValueError, ArithmeticError):
        raise
    except Exception:  # noqa: BLE001 - a part that cannot be built on the meta device: check the real model
        return None
    return {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict) -> None:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ResodeError(f"{str(path)!r} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                          "restore the file or write it again")
    for name, value in tensors.items():
        shape, dtype = expected[name]
        if tuple(value.shape) != shape:
            raise ResodeError(f"{str(path)!r}: tensor {name!r} has shape {tuple(value.shape)}, its config needs {shape}; "
                              "restore the file or write it again")
        if dtype.is_floating_point and not value.is_floating_point():
            raise ResodeError(f"{str(path)!r}: tensor {name!r} holds {value.dtype} values, its config needs {dtype}; "
                              "restore the file or write it again")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ResodeError(f"{str(path)!r}: tensor {name!r} holds NaN or infinite values; retrain or restore the file")
