import gzip

import pytest
import torch

from resode_export.data import digits, fashion_mnist, load_data
from resode_export.errors import ResodeError


def test_digits_split_is_fixed():
    a, b = digits(), digits()
    assert (len(a.y_train), len(a.y_test)) == (1347, 450)
    assert a.in_shape == (64,) and a.num_classes == 10
    assert a.x_test.equal(b.x_test) and float(a.x_train.max()) <= 1.0


def test_fashion_mnist_from_the_debian_package():
    ds = fashion_mnist()
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and ds.name == "fashion-mnist"
    assert abs(float(ds.x_train[:5000].mean())) < 0.1  # standardized


def test_idx_folder_errors(tmp_path):
    with pytest.raises(ResodeError, match="no images in class sub-folders .nor MNIST-style IDX files"):
        load_data(str(tmp_path))  # an empty folder is neither
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"")  # one IDX file makes it an IDX folder
    with pytest.raises(ResodeError, match="has no train-images"):
        load_data(str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        with gzip.open(tmp_path / f"{stem}.gz", "wb") as fh:
            fh.write(b"\x00\x00\x08\x03\x00\x00\x00\x05")  # claims 5 images, has none
    with pytest.raises(ResodeError, match="cannot read IDX"):
        load_data(str(tmp_path))


def test_unknown_data_set():
    with pytest.raises(ResodeError, match="digits, digits-images, fashion-mnist"):
        load_data("imagenet")


def test_digits_images_are_the_digits_as_8x8():
    from resode_export.data import load_data

    flat, images = load_data("digits"), load_data("digits-images")
    assert images.in_shape == (1, 8, 8) and images.name == "digits-images"
    assert torch.equal(images.x_test.reshape(len(images.x_test), -1), flat.x_test)
    assert torch.equal(images.y_train, flat.y_train)


# --- image folders, integer .npz, data_warning ---------------------------------------------------------


def _png(path, size=(6, 4), color=None, mode="L", value=0):
    """A small image at ``path``: ``size`` is (width, height), as Pillow takes it."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if color is not None else value).save(path)
    return path


def _class_folder(root, counts=None, size=(6, 4)):
    """root/<class>/<i>.png, grayscale, each class a different shade."""
    counts = counts or {"cat": 5, "dog": 3, "emu": 2}
    for k, (name, n) in enumerate(counts.items()):
        for i in range(n):
            _png(root / name / f"{i}.png", size, value=40 * k + i)
    return root


def _write_idx(folder, stem, array):
    import numpy as np

    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(folder / f"{stem}.gz", "wb") as fh:
        fh.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_image_folder_of_class_folders_is_split_per_class(tmp_path):
    root = _class_folder(tmp_path / "shapes")
    (root / ".hidden.png").write_bytes(b"not an image")  # hidden files are ignored
    (root / "cat" / ".DS_Store").write_bytes(b"junk")
    (root / "cat" / "notes.txt").write_text("not an image either")
    ds = load_data(str(root))
    assert ds.name == str(root.resolve()) and ds.classes == ("cat", "dog", "emu") and ds.num_classes == 3
    # 20 % test per class, at least one test and one train image: cat 5 → 1, dog 3 → 1, emu 2 → 1
    assert (len(ds.y_train), len(ds.y_test)) == (7, 3)
    assert ds.y_train.tolist() == [0, 0, 0, 0, 1, 1, 2] and ds.y_test.tolist() == [0, 1, 2]
    assert ds.x_train.shape == (7, 1, 4, 6) and ds.x_train.dtype == torch.float32
    assert "20 %" in ds.split and "seed 0" in ds.split and "7 train, 3 test" in ds.split
    assert "pixels / 255" in ds.preprocessing and "grayscale" in ds.preprocessing
    assert ds.describe()["classes"] == ["cat", "dog", "emu"]
    # shades: class k, image i has value 40k + i, so every pixel is one of them / 255
    assert set(torch.unique(ds.x_train * 255).round().int().tolist()) <= {0, 1, 2, 3, 4, 40, 41, 42, 80, 81}
    again = load_data(str(root))
    assert again.x_test.equal(ds.x_test) and again.y_train.equal(ds.y_train)  # deterministic


def test_image_folder_with_train_and_test(tmp_path):
    root = tmp_path / "ab"
    _class_folder(root / "train", {"a": 3, "b": 2})
    _class_folder(root / "test", {"b": 1})  # test classes are a subset of train's
    ds = load_data(str(root))
    assert ds.classes == ("a", "b") and ds.y_train.tolist() == [0, 0, 0, 1, 1] and ds.y_test.tolist() == [1]
    assert ds.x_test.shape == (1, 1, 4, 6) and "train/" in ds.split and "test/" in ds.split
    _class_folder(root / "test", {"c": 1})
    with pytest.raises(ResodeError, match="'c'.*train"):
        load_data(str(root))


def test_image_folder_resizes_and_goes_rgb_with_one_colour_image(tmp_path):
    root = _class_folder(tmp_path / "mix", {"a": 2, "b": 2})
    _png(root / "b" / "red.PNG", (6, 4), color=(255, 0, 0), mode="RGB")  # extension case does not matter
    ds = load_data(str(root), input_size=(3, 5))
    assert ds.x_train.shape[1:] == (3, 3, 5) and ds.in_shape == (3, 3, 5)
    assert "RGB" in ds.preprocessing and "3×5" in ds.preprocessing and "bilinear" in ds.preprocessing
    x = torch.cat([ds.x_train, ds.x_test])
    red = [s for s in x if float(s[0].min()) == 1.0]
    assert len(red) == 1 and float(red[0][1:].max()) == 0.0  # the red image stays red
    gray = [s for s in x if float(s[0].min()) != 1.0]
    assert all(s[0].equal(s[1]) and s[1].equal(s[2]) for s in gray)  # gray images have three equal channels


def test_image_folder_mixed_sizes_need_input_size(tmp_path):
    root = _class_folder(tmp_path / "sizes", {"a": 2, "b": 2})
    _png(root / "a" / "big.png", (8, 8), value=3)
    with pytest.raises(ResodeError, match="--input-size"):
        load_data(str(root))
    assert load_data(str(root), input_size=(4, 4)).in_shape == (1, 4, 4)


def test_image_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "readme.txt").write_text("x")
    with pytest.raises(ResodeError, match="no images"):
        load_data(str(empty))
    one = _class_folder(tmp_path / "one", {"only": 3})
    with pytest.raises(ResodeError, match="one class"):
        load_data(str(one))
    bad = _class_folder(tmp_path / "bad", {"a": 2, "b": 2})
    (bad / "b" / "x.png").write_bytes(b"\x89PNG garbage, not a picture")
    with pytest.raises(ResodeError, match="x.png") as exc:
        load_data(str(bad))
    assert "\n" not in str(exc.value)
    hollow = _class_folder(tmp_path / "hollow", {"a": 2, "b": 2})
    (hollow / "c").mkdir()
    with pytest.raises(ResodeError, match="'c'.*no images"):
        load_data(str(hollow))
    loose = tmp_path / "loose"
    _png(loose / "a.png")
    _png(loose / "b.png")
    with pytest.raises(ResodeError, match="class sub-folders"):
        load_data(str(loose))


def test_idx_folder_still_loads_as_fashion_mnist(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    _write_idx(tmp_path, "train-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28)))
    _write_idx(tmp_path, "train-labels-idx1-ubyte", np.array([0, 1, 2, 1, 0]))
    _write_idx(tmp_path, "t10k-images-idx3-ubyte", rng.integers(0, 256, (2, 28, 28)))
    _write_idx(tmp_path, "t10k-labels-idx1-ubyte", np.array([2, 0]))
    ds = load_data(str(tmp_path), input_size=(28, 28))
    assert ds.x_train.shape == (5, 1, 28, 28) and ds.y_test.tolist() == [2, 0] and ds.classes is None
    assert ds.name == str(tmp_path.resolve()) and "0.286" in ds.preprocessing


def test_integer_npz_is_scaled(tmp_path):
    import numpy as np

    path = tmp_path / "u8.npz"
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
    np.savez(path, x_train=x, y_train=np.array([0, 1]), x_test=x[:1], y_test=np.array([1]))
    ds = load_data(str(path))
    assert float(ds.x_train.max()) == pytest.approx(230 / 255) and ds.x_train.dtype == torch.float32
    assert "uint8 pixels / 255" in ds.preprocessing
    np.savez(path, x_train=x.astype(np.uint16) * 256, y_train=np.array([0, 1]), x_test=x[:1].astype(np.uint16),
             y_test=np.array([1]))
    ds = load_data(str(path))
    assert float(ds.x_train.max()) == pytest.approx(230 * 256 / 65535) and "uint16 pixels / 65535" in ds.preprocessing
    np.savez(path, x_train=x.astype(np.float32), y_train=np.array([0, 1]), x_test=x[:1].astype(np.float32),
             y_test=np.array([1]))
    ds = load_data(str(path))
    assert float(ds.x_train.max()) == 230.0 and ds.preprocessing == "as stored in the file"


def test_data_warning_on_raw_pixels_only(tmp_path):
    import numpy as np

    from resode_export.data import data_warning

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (20, 1, 8, 8)).astype(np.float32)
    path = tmp_path / "raw.npz"
    np.savez(path, x_train=raw, y_train=np.arange(20) % 2, x_test=raw[:4], y_test=np.arange(4) % 2)
    warning = data_warning(load_data(str(path)))
    assert warning and "--normalize" in warning and "\n" not in warning
    standardized = rng.standard_normal((50, 10)).astype(np.float32)
    np.savez(path, x_train=standardized, y_train=np.arange(50) % 2, x_test=standardized[:4], y_test=np.arange(4) % 2)
    assert data_warning(load_data(str(path))) is None
    assert data_warning(digits()) is None and data_warning(load_data("digits-images")) is None
    assert data_warning(_class_folder_data(tmp_path)) is None


def _class_folder_data(tmp_path):
    return load_data(str(_class_folder(tmp_path / "warn", {"a": 2, "b": 2})))


def test_data_warning_not_on_fashion_mnist():
    from resode_export.data import data_warning

    try:
        ds = fashion_mnist()
    except ResodeError:
        pytest.skip("Fashion-MNIST is not installed")
    assert float(ds.x_train.max()) > 2.0 and data_warning(ds) is None


def test_dataset_for_reloads_an_image_folder_at_the_models_size(tmp_path):
    from resode_export.convert import dataset_for

    root = _class_folder(tmp_path / "sizes", {"a": 2, "b": 2})
    _png(root / "a" / "big.png", (8, 8), value=3)
    header = {"data": {"name": str(root.resolve())}, "config": {"in_shape": [1, 3, 5]}}
    assert dataset_for(header).in_shape == (1, 3, 5)
    assert dataset_for(header, input_size=(2, 2)).in_shape == (1, 2, 2)
    with pytest.raises(ResodeError, match="cannot be loaded here.*--input-size"):
        dataset_for({"data": {"name": str(root.resolve())}, "config": {"in_shape": [4]}})
    # other data sets come at their own size
    assert dataset_for({"data": {"name": "digits-images"}, "config": {"in_shape": [1, 8, 8]}}).in_shape == (1, 8, 8)
    assert dataset_for({"data": {"name": "digits"}, "config": {"in_shape": [64]}}).in_shape == (64,)
