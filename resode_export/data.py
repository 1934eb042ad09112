"""Data sets that need no download: scikit-learn's digits, Fashion-MNIST's local IDX files, folders of
images (see :mod:`resode_export.images`) and .npz files.

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
NPZ_PIXEL_SCALES = {"uint8": 255, "uint16": 65535}  # integer pixels in an .npz are divided by these
WARN_ABS, WARN_PEAK, WARN_NONNEGATIVE = 20.0, 1000.0, 2.0  # data_warning's thresholds
UNLABELLED = -1  # the label of a sample that has none (distillation's unlabelled .npz)
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
    classes: tuple[str, ...] | None = None  # class names by label, where the data name them (image folders)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def describe(self) -> dict:
        info = {"name": self.name, "split": self.split, "preprocessing": self.preprocessing,
                "train_size": len(self.y_train), "test_size": len(self.y_test)}
        if self.classes:
            info["classes"] = list(self.classes)
        return info


def check_samples(shape, expected, data: str = "test data", model: str = "the model") -> None:
    """Raise a ResodeError, saying which data would fit, unless samples of ``shape`` are ``expected``'s."""
    shape, expected = tuple(shape), tuple(expected)
    if shape == expected:
        return
    if len(expected) == 3 and len(shape) != 3:
        fix = ("this model takes images: give image data (--data digits-images, fashion-mnist, an image folder "
               "or an .npz of images)")
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


def npz(path: str | os.PathLike, unlabelled_ok: bool = False) -> Dataset:
    """A ``.npz`` file with arrays ``x_train, y_train, x_test, y_test`` (read without pickle).

    Pixels stored as uint8 are divided by 255, uint16 by 65535; other numbers are taken as stored.
    With ``unlabelled_ok`` (distillation) ``x_train, x_test`` alone are enough: the labels are then -1,
    for the caller to fill (with the teacher's predictions).
    """
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
    if unlabelled_ok and "x_train" in arrays and "x_test" in arrays and not {"y_train", "y_test"} & set(arrays):
        arrays["y_train"] = np.full(len(arrays["x_train"]), UNLABELLED, dtype=np.int64)
        arrays["y_test"] = np.full(len(arrays["x_test"]), UNLABELLED, dtype=np.int64)
    missing = [k for k in NPZ_ARRAYS if k not in arrays]
    if missing:
        raise ResodeError(f"{str(path)!r} lacks the array(s) {', '.join(missing)}; it needs x_train, y_train, x_test, "
                          f"y_test (it has {', '.join(present) or 'none'})")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 2 or y.ndim != 1 or len(x) == 0:
            raise ResodeError(f"{str(path)!r}: x_{split} must be (samples, features...) and y_{split} (samples,), non-empty")
        if len(x) != len(y) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y < UNLABELLED).any() or (
                not unlabelled_ok and (y < 0).any()):
            raise ResodeError(f"{str(path)!r}: x_{split} and y_{split} must have the same length, labels integers >= 0")
        if y.max() >= MAX_CLASSES:
            raise ResodeError(f"{str(path)!r}: y_{split} has label {y.max()}; labels must be below {MAX_CLASSES} "
                              "(number the classes 0, 1, 2, ...)")
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)) or not np.isfinite(x).all():
            raise ResodeError(f"{str(path)!r}: x_{split} must be real numbers, all finite (no NaN or infinity)")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ResodeError(f"{str(path)!r}: train and test samples have different shapes")
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    done = {}
    for k in ("x_train", "x_test"):
        scale = NPZ_PIXEL_SCALES.get(arrays[k].dtype.name)
        t[k] = t[k].float() / scale if scale else t[k].float()
        done[k] = f"{arrays[k].dtype.name} pixels / {scale}" if scale else "as stored in the file"
    preprocessing = (done["x_train"] if done["x_train"] == done["x_test"]
                     else f"x_train: {done['x_train']}; x_test: {done['x_test']}")
    return Dataset(str(path), t["x_train"], t["y_train"].long(), t["x_test"], t["y_test"].long(),
                   preprocessing=preprocessing, split="x_train/y_train and x_test/y_test as stored")


def data_warning(ds: Dataset) -> str | None:
    """One line warning that ``ds``'s inputs look unnormalized, or None.

    It fires when the 99.9th percentile of |x| is over 20 or |x| reaches 1000 (standardized data stay far
    below), or when no value is negative and the 99.9th percentile is over 2 (data in [0, 1] stay below;
    one stray value does not count). Digits (pixels / 16), Fashion-MNIST (standardized, up to 2.02) and
    image folders (pixels / 255) never fire. The line has no "warning:" prefix.
    """
    parts = [x.reshape(-1) for x in (ds.x_train, ds.x_test) if x.numel() and x.is_floating_point()]
    if not parts:
        return None
    # a strided sample of each split keeps the percentile fast on large data
    sample = np.concatenate([x[:: max(1, x.numel() // 500_000)].double().numpy() for x in parts])
    high = float(np.quantile(np.abs(sample), 0.999))
    low, peak = min(float(x.min()) for x in parts), max(float(x.abs().max()) for x in parts)
    if not (high > WARN_ABS or peak > WARN_PEAK or (low >= 0 and high > WARN_NONNEGATIVE)):
        return None
    mean, std = float(sample.mean()), float(sample.std()) or 1.0
    return (f"the inputs of {ds.name!r} look unnormalized (values from {low:.4g} to {peak:.4g}, 99.9 % of |x| up "
            f"to {high:.4g}; preprocessing: {ds.preprocessing}); rescale them to about [0, 1] (e.g. pixels / 255) "
            f"or standardize with --normalize MEAN,STD (here about --normalize {mean:.4g},{std:.4g})")


def is_idx_folder(folder: Path) -> bool:
    """Whether ``folder`` holds MNIST-style IDX files (``*-idx1-ubyte``, ``*-idx3-ubyte``, maybe .gz)."""
    return any(p.is_file() and "-idx" in p.name and "-ubyte" in p.name and not p.name.startswith(".")
               for p in folder.iterdir())


def load_data(name: str, data_dir: str | os.PathLike | None = None, input_size: tuple[int, int] | None = None,
              unlabelled_ok: bool = False) -> Dataset:
    """``digits`` (flat) or ``digits-images``, ``fashion-mnist`` (from ``data_dir`` if given), a folder of
    MNIST-style IDX files, a folder of images (:mod:`resode_export.images`), or a .npz.

    ``input_size`` (height, width) resizes an image folder's images; the other data sets come at their
    own size and ignore it (a model's fit to them is checked where the model meets the data).
    """
    if not isinstance(name, str) or not name:
        raise ResodeError(f"no data set named {name!r}; use one of {', '.join(DATASETS)}, a folder of images or IDX "
                          "files, or a .npz")
    if name in ("digits", "digits-images"):
        return digits(images=name == "digits-images")
    if name == "fashion-mnist":
        return fashion_mnist(data_dir)
    # a folder or file is named by its absolute path, which a checkpoint records: later commands run
    # from another folder still find it
    if Path(name).is_dir():
        folder = Path(name).resolve()
        if is_idx_folder(folder):
            return fashion_mnist(folder, name=str(folder))
        from .images import image_folder

        return image_folder(folder, input_size, name=str(folder))
    if name.endswith(".npz"):
        if not Path(name).is_file():
            raise ResodeError(f"no such file: {name!r}")
        return npz(Path(name).resolve(), unlabelled_ok)
    raise ResodeError(f"unknown data set {name!r}; use one of {', '.join(DATASETS)}, a folder of images or IDX files, "
                      "or a .npz")
