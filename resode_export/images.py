"""Folders of image files (torchvision ImageFolder style) as data sets, read with Pillow.

Two layouts:

* ``DIR/train/<class>/*`` and ``DIR/test/<class>/*``: that split; the classes are train's, and
  test's class folders must be among them.
* ``DIR/<class>/*``: a deterministic stratified split, 20 % of each class to test (at least one test
  and one train image per class of two or more images; a class of one image goes to train).

Classes are the sorted sub-folder names, numbered 0..C-1. Image files (.png .jpg .jpeg .bmp .gif
.webp, any case) are found in a class folder and its sub-folders; hidden files and folders (a leading
dot) and other files are ignored, and so is anything in DIR beside train/ and test/ in the first
layout. A class folder with no images is reported (a ResodeError), not skipped: skipping it would
renumber the classes after it. EXIF orientation is not applied (torchvision's ImageFolder does not either).

Images are read as grayscale (1 channel) when none has colour (modes 1, L, LA, I, I;16 and
palettes of grays), else as RGB (3 channels: gray images repeated, alpha dropped); an animated GIF
gives its first frame. They are resized with bilinear interpolation to ``input_size`` (height, width)
when given; without it they must all have one size. Pixels are divided by 255 (16-bit images by 65535)
into float32 tensors (N, C, H, W).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import ResodeError, one_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"}
_WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}  # 16-bit gray: pixels / 65535


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _subfolders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_under(folder: Path) -> list[Path]:
    """Image files in ``folder`` and its sub-folders (hidden ones skipped), sorted by relative path."""
    found = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(here) / f for f in files if is_image(Path(f))]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _class_files(folder: Path, where: str) -> dict[str, list[Path]]:
    """Class name → its image files, for the class folders of ``folder``."""
    classes = {c.name: _images_under(c) for c in _subfolders(folder)}
    if not any(classes.values()):
        loose = [p for p in folder.iterdir() if p.is_file() and is_image(p)]
        hint = (f"it has {len(loose)} loose image(s) but no class sub-folders: put each class's images in "
                f"{where}/<class>/" if loose else
                f"put each class's images ({' '.join(IMAGE_EXTENSIONS)}) in {where}/<class>/")
        idx = " (nor MNIST-style IDX files)" if where == "DIR" else ""
        raise ResodeError(f"{str(folder)!r} has no images in class sub-folders{idx}; {hint}")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise ResodeError(f"class {empty[0]!r} (folder {str(folder / empty[0])!r}) has no images "
                          f"({' '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
    return classes


def _two_classes(folder: Path, classes: dict) -> None:
    if len(classes) < 2:
        raise ResodeError(f"{str(folder)!r} has one class ({next(iter(classes))!r}); a classifier needs at least two "
                          "class sub-folders of images")


def _stratified(folder: Path, classes: dict[str, list[Path]]) -> tuple[list, list, str]:
    train, test = [], []
    for label, files in enumerate(classes.values()):
        n = len(files)
        n_test = 0 if n < 2 else min(n - 1, max(1, round(TEST_FRACTION * n)))
        chosen = set(np.random.default_rng(SPLIT_SEED).permutation(n)[:n_test].tolist())
        for i, f in enumerate(files):
            (test if i in chosen else train).append((f, label))
    if not test:
        raise ResodeError(f"every class in {str(folder)!r} has a single image, so none is left to test on; add images, "
                          "or give train/<class>/ and test/<class>/ folders")
    split = (f"stratified per class: {round(100 * TEST_FRACTION)} % of each class's images to test (at least one test "
             f"and one train image per class of two or more), numpy default_rng(seed {SPLIT_SEED}).permutation of each "
             f"class's files sorted by name: {len(train)} train, {len(test)} test")
    return train, test, split


def _layout(folder: Path) -> tuple[tuple[str, ...], list, list, str]:
    """(class names, [(file, label)] train, [(file, label)] test, split description)."""
    has_train, has_test = (folder / "train").is_dir(), (folder / "test").is_dir()
    if has_train and has_test:
        train_classes = _class_files(folder / "train", "train")
        _two_classes(folder / "train", train_classes)
        test_classes = _class_files(folder / "test", "test")
        foreign = [c for c in test_classes if c not in train_classes]
        if foreign:
            raise ResodeError(f"{str(folder / 'test')!r} has class folder(s) {', '.join(map(repr, foreign[:5]))} that "
                              f"{str(folder / 'train')!r} lacks; every test class needs training images in train/<class>/")
        index = {c: i for i, c in enumerate(train_classes)}
        train = [(f, index[c]) for c, files in train_classes.items() for f in files]
        test = [(f, index[c]) for c, files in test_classes.items() for f in files]
        split = f"folders: train/ ({len(train)} images) and test/ ({len(test)} images)"
        return tuple(train_classes), train, test, split
    for part, other in (("train", "test"), ("test", "train")):
        if (folder / part).is_dir() and _subfolders(folder / part):
            raise ResodeError(f"{str(folder)!r} has {part}/ but no {other}/; add {other}/<class>/ images, or put the "
                              "class folders directly in the folder (resode then splits them)")
    classes = _class_files(folder, "DIR")
    _two_classes(folder, classes)
    train, test, split = _stratified(folder, classes)
    return tuple(classes), train, test, split


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}×{size[1]}"


def _has_colour(image) -> bool:
    if image.mode in _GRAY_MODES:
        return False
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        return any(not (palette[i] == palette[i + 1] == palette[i + 2]) for i in range(0, len(palette) - 2, 3))
    return True


def _unreadable(f: Path, exc: Exception) -> ResodeError:
    text = one_line(str(exc).replace(f" {str(f)!r}", "") or type(exc).__name__)
    return ResodeError(f"cannot read image {str(f)!r} ({text}); fix or remove the file")


def _probe(files: list[Path]) -> tuple[bool, dict[tuple[int, int], Path], bool]:
    """Read the headers only: (any colour image, (height, width) → an example file, any 16-bit image)."""
    from PIL import Image

    colour, sizes, wide = False, {}, False
    for f in files:
        try:
            with Image.open(f) as image:
                colour = colour or _has_colour(image)
                wide = wide or image.mode in _WIDE_MODES
                sizes.setdefault((image.height, image.width), f)
        except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds (OSError, SyntaxError, ValueError...)
            raise _unreadable(f, exc) from None
    return colour, sizes, wide


def _pixels(f: Path, colour: bool, size: tuple[int, int] | None) -> np.ndarray:
    """One image as float32 (C, H, W) in [0, 1], resized (bilinear) to ``size`` (height, width) if given."""
    from PIL import Image

    try:
        with Image.open(f) as image:
            image.load()
            if image.mode in _WIDE_MODES:  # 16-bit gray: scale in float, where Pillow resizes bilinearly too
                gray = Image.fromarray(np.asarray(image, dtype=np.float32) / 65535.0)  # mode F
                if size is not None and (gray.height, gray.width) != size:
                    gray = gray.resize(size[::-1], Image.BILINEAR)
                x = np.asarray(gray, dtype=np.float32)[None]
                return np.repeat(x, 3, axis=0) if colour else x
            image = image.convert("RGB" if colour else "L")
            if size is not None and (image.height, image.width) != size:
                image = image.resize(size[::-1], Image.BILINEAR)
            x = np.asarray(image, dtype=np.float32) / 255.0
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file fails only when decoded
        raise _unreadable(f, exc) from None
    return x.transpose(2, 0, 1) if colour else x[None]


def image_folder(folder: str | os.PathLike, input_size: tuple[int, int] | None = None, name: str | None = None):
    """The image folder ``folder`` as a :class:`~resode_export.data.Dataset` (see the module's docstring).

    ``input_size`` is (height, width); the data set is named ``name`` (default: the folder's absolute path).
    """
    from .data import Dataset

    whole = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
    if input_size is not None and (len(input_size) != 2 or not all(whole(v) for v in input_size)):
        raise ResodeError(f"an input size is (height, width) in pixels, both positive; got {input_size!r}")
    folder = Path(folder).resolve()
    classes, train, test, split = _layout(folder)
    colour, sizes, wide = _probe([f for f, _ in train + test])
    if input_size is None and len(sizes) > 1:
        (s1, f1), (s2, f2) = list(sizes.items())[:2]
        raise ResodeError(f"the images in {str(folder)!r} have {len(sizes)} different sizes (e.g. {str(f1)!r} is "
                          f"{_size(s1)}, {str(f2)!r} is {_size(s2)}, height×width); give --input-size H,W to resize "
                          "them all")
    size = tuple(int(v) for v in input_size) if input_size is not None else next(iter(sizes))
    resized = input_size is not None and any(s != size for s in sizes)
    channels = 3 if colour else 1

    def tensors(items):
        x = np.empty((len(items), channels, *size), dtype=np.float32)
        for i, (f, _) in enumerate(items):
            x[i] = _pixels(f, colour, size if resized else None)
        return torch.from_numpy(x), torch.tensor([label for _, label in items], dtype=torch.int64)

    (x_train, y_train), (x_test, y_test) = tensors(train), tensors(test)
    preprocessing = ("Pillow " + ("RGB (3 channels; gray images repeated, alpha dropped)" if colour
                                  else "grayscale (1 channel)")
                     + (f", resized to {_size(size)} bilinear" if resized else f", all {_size(size)} (not resized)")
                     + ", pixels / 255" + (" (16-bit images / 65535)" if wide else "")
                     + f"; shape ({channels}, {_size(size).replace('×', ', ')})")
    return Dataset(name or str(folder), x_train, y_train, x_test, y_test, preprocessing=preprocessing, split=split,
                   classes=classes)
