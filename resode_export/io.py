"""Checkpoints: one ``.safetensors`` file, the config as JSON in its metadata.

Loading never unpickles: a pickle or ``torch.save`` file is refused with a clear message.
Every write goes to a temporary name in the target folder and is renamed into place, so a
failed or interrupted write never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ResodeError
from .network import ODENet, ODENetConfig

FORMAT_VERSION = 1
METADATA_KEY = "resode"
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol ≥ 2; torch.save's zip container


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early, before any work, if ``path`` cannot be written as a file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ResodeError(f"output folder {str(path.parent)!r} does not exist; create it or choose another output path")
    if path.is_dir():
        raise ResodeError(f"output path {str(path)!r} is a folder; give a file name inside it")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_name)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | os.PathLike, model: ODENet, info: dict | None = None) -> Path:
    """Write ``model`` and ``info`` (data set, metrics, training record) to ``path`` atomically."""
    header = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(), **(info or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(header)}))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the string metadata of a safetensors file; ResodeError if it is corrupt."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:  # safetensors raises its own error types for every corruption
        raise ResodeError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    return tensors, metadata


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
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
    tensors, metadata = read_safetensors(path)
    if METADATA_KEY not in metadata:
        raise ResodeError(f"{str(path)!r} is a safetensors file but not a resode checkpoint (no {METADATA_KEY!r} metadata)")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ResodeError(f"{str(path)!r} has corrupt resode metadata: {exc}") from None
    if not isinstance(header, dict) or not all(isinstance(header.get(k, {}), dict) for k in ("config", "data")):
        raise ResodeError(f"{str(path)!r} has corrupt resode metadata: expected a JSON object with config and data objects")
    return tensors, header


def load_checkpoint(path: str | os.PathLike) -> tuple[ODENet, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns:
        the model (float32, eval mode) and the header dict (``config``, ``data``, ``metrics``…).
    Raises:
        ResodeError: missing, corrupt, pickled, foreign or inconsistent files, non-finite weights.
    """
    path = Path(path)
    tensors, header = _read(path)
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ResodeError(f"{str(path)!r} has checkpoint format {version!r}; this resode reads format {FORMAT_VERSION}")
    try:
        config = ODENetConfig.from_dict(header["config"])
        model = ODENet(config)
    except ResodeError as exc:
        raise ResodeError(f"{str(path)!r} has an invalid config: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ResodeError(f"{str(path)!r} has an invalid config: {exc!r}") from None
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ResodeError(f"{str(path)!r} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, value in tensors.items():
        if value.shape != expected[name].shape:
            raise ResodeError(
                f"{str(path)!r}: tensor {name!r} has shape {tuple(value.shape)}, config needs {tuple(expected[name].shape)}"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ResodeError(f"{str(path)!r}: tensor {name!r} holds NaN or infinite values; retrain or restore the file")
    model.load_state_dict(tensors)
    return model.eval(), header
