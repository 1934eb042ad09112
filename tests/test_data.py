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
    with pytest.raises(ResodeError, match="has no train-images"):
        load_data(str(tmp_path))
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
