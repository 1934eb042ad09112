"""Data sets that need no download: scikit-learn's digits and Fashion-MNIST's local IDX files.

Each comes with a fixed train/test split and a recorded preprocessing, so a checkpoint can
name its data set and every command re-creates the same test split.
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import ResodeError, one_line

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
DATASETS = ("digits", "digits-images", "fashion-mnist")
NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
MAX_CLASSES = 100_000  # a label beyond this is a mistake, not a class: the head would not fit in memory


@dataclass
class Dataset:
    name: str
    x_train: Tensor  # (N, *in_shape) float32
    y_train: Tensor  # (N,) int64
    x_test: Tensor
    y_test: Tensor
    preprocessing: str
    split: str

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, "preprocessing": self.preprocessing,
                "train_size": len(self.y_train), "test_size": len(self.y_test)}


def check_samples(shape, expected, data: str = "test data", model: str = "the model") -> None:
    """Raise a ResodeError, saying which data would fit, unless samples of ``shape`` are ``expected``'s."""
    shape, expected = tuple(shape), tuple(expected)
    if shape == expected:
        return
    if len(expected) == 3 and len(shape) != 3:
        fix = "this model takes images: give image data (--data digits-images, fashion-mnist, or an .npz of images)"
    elif len(expected) == 1 and len(shape) != 1:
        fix = "this model takes flat samples: give --data digits or an .npz of flat samples"
    else:
        fix = "give --data whose samples have the model's shape"
    raise ResodeError(f"{data} has samples of shape {shape}, {model} expects {expected}; {fix}")


def digits(images: bool = False) -> Dataset:
    """scikit-learn's 8×8 digits (1797 images), flattened to 64 features in [0, 1]; with ``images``
    (data set ``digits-images``) the same samples as (1, 8, 8) images, for conv models."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    shape = (-1, 1, 8, 8) if images else (-1, 64)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32).reshape(shape)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return Dataset("digits-images" if images else "digits", as_x(xtr), as_y(ytr), as_x(xte), as_y(yte),
                   preprocessing="pixels / 16 (range [0, 1]), "
                                 + ("as (1, 8, 8) images" if images else "flattened to 64 features"),
                   split="sklearn train_test_split(test_size=0.25, random_state=0, stratify=y): 1347 train, 450 test")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, ValueError, IndexError, EOFError) as exc:
        raise ResodeError(f"cannot read IDX file {str(path)!r}: {exc}") from None


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise ResodeError(f"{str(folder)!r} has no {stem}[.gz]; give a folder with the four Fashion-MNIST IDX files")


def fashion_mnist(folder: str | os.PathLike | None = None, name: str = "fashion-mnist") -> Dataset:
    """Fashion-MNIST from local IDX files (Debian's ``dataset-fashion-mnist``, or ``folder``).

    The official split (60 000 train, 10 000 test); pixels / 255, standardized, shape (1, 28, 28).
    """
    if folder is None:
        candidates = [os.environ.get("RESODE_FASHION_MNIST"), *FASHION_MNIST_DIRS]
        found = [Path(c) for c in candidates if c and Path(c).is_dir()]
        if not found:
            raise ResodeError("Fashion-MNIST not found; install it with `apt-get install dataset-fashion-mnist` "
                              "or set RESODE_FASHION_MNIST to a folder with its IDX files")
        folder = found[0]
    folder = Path(folder)
    if not folder.is_dir():
        raise ResodeError(f"data folder {str(folder)!r} does not exist")

    def images(stem):
        x = _read_idx(_find_idx(folder, stem)).astype(np.float32) / 255.0
        return torch.from_numpy((x - FASHION_MEAN) / FASHION_STD).unsqueeze(1)

    def labels(stem):
        return torch.from_numpy(_read_idx(_find_idx(folder, stem)).astype(np.int64))

    ds = Dataset(name,
                 images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte"),
                 images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"),
                 preprocessing=f"pixels / 255, then (x - {FASHION_MEAN}) / {FASHION_STD}; shape (1, 28, 28)",
                 split="official: 60000 train (train-*), 10000 test (t10k-*)")
    if len(ds.x_train) != len(ds.y_train) or len(ds.x_test) != len(ds.y_test):
        raise ResodeError(f"IDX files in {str(folder)!r} disagree on the number of samples")
    return ds


def npz(path: str | os.PathLike) -> Dataset:
    """A ``.npz`` file with arrays ``x_train, y_train, x_test, y_test`` (read without pickle)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ResodeError(f"{str(path)!r} is a single .npy array, not an .npz archive of named arrays")
        with loaded as fh:
            present = list(fh.files)
            arrays = {k: fh[k] for k in NPZ_ARRAYS if k in present}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        if "pickle" in str(exc):
            raise ResodeError(f"cannot read {str(path)!r}: it holds pickled (object) arrays and resode never unpickles "
                              "data; save numeric arrays, e.g. np.savez(path, x_train=x.astype(np.float32), ...)") from None
        text = one_line(str(exc))
        raise ResodeError(f"cannot read {str(path)!r} as .npz ({text}); give an .npz of numeric arrays x_train, "
                          "y_train, x_test, y_test") from None
    missing = [k for k in NPZ_ARRAYS if k not in arrays]
    if missing:
        raise ResodeError(f"{str(path)!r} lacks the array(s) {', '.join(missing)}; it needs x_train, y_train, x_test, "
                          f"y_test (it has {', '.join(present) or 'none'})")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 2 or y.ndim != 1 or len(x) == 0:
            raise ResodeError(f"{str(path)!r}: x_{split} must be (samples, features...) and y_{split} (samples,), non-empty")
        if len(x) != len(y) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
            raise ResodeError(f"{str(path)!r}: x_{split} and y_{split} must have the same length, labels integers >= 0")
        if y.max() >= MAX_CLASSES:
            raise ResodeError(f"{str(path)!r}: y_{split} has label {y.max()}; labels must be below {MAX_CLASSES} "
                              "(number the classes 0, 1, 2, ...)")
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)) or not np.isfinite(x).all():
            raise ResodeError(f"{str(path)!r}: x_{split} must be real numbers, all finite (no NaN or infinity)")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ResodeError(f"{str(path)!r}: train and test samples have different shapes")
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    return Dataset(str(path), t["x_train"].float(), t["y_train"].long(), t["x_test"].float(), t["y_test"].long(),
                   preprocessing="as stored in the file", split="x_train/y_train and x_test/y_test as stored")


def load_data(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """``digits`` (flat) or ``digits-images``, ``fashion-mnist`` (from ``data_dir`` if given), a folder of
    MNIST-style IDX files, or a .npz."""
    if not isinstance(name, str) or not name:
        raise ResodeError(f"no data set named {name!r}; use one of {', '.join(DATASETS)}, a folder of IDX files or a .npz")
    if name in ("digits", "digits-images"):
        return digits(images=name == "digits-images")
    if name == "fashion-mnist":
        return fashion_mnist(data_dir)
    # a folder or file is named by its absolute path, which a checkpoint records: later commands run
    # from another folder still find it
    if Path(name).is_dir():
        return fashion_mnist(name, name=str(Path(name).resolve()))
    if name.endswith(".npz"):
        if not Path(name).is_file():
            raise ResodeError(f"no such file: {name!r}")
        return npz(Path(name).resolve())
    raise ResodeError(f"unknown data set {name!r}; use one of {', '.join(DATASETS)}, a folder of IDX files or a .npz")
