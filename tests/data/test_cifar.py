"""CIFAR-10/100 pickle batches -> CIFAR-LT: the profile, the balanced test split, seeding, bad files."""
import os
import pickle

import numpy as np
import pytest
from data_files import write_cifar

from fastcbd.data import BadInputError, cifar_lt, cifar_lt_splits, long_tail_counts


@pytest.mark.parametrize("num_classes,rho", [(10, 10.0), (100, 5.0)])
def test_cifar_lt_profile_and_balanced_test(tmp_path, num_classes, rho):
    per_class = 60 if num_classes == 10 else 20
    write_cifar(tmp_path, num_classes, per_class_train=per_class, per_class_test=4)
    tr = cifar_lt(str(tmp_path), num_classes, rho=rho, seed=0)
    te = cifar_lt(str(tmp_path), num_classes, rho=rho, train=False)
    assert tr.class_counts == long_tail_counts(per_class, num_classes, rho)
    assert te.class_counts == [4] * num_classes
    assert tr.images.shape[1:] == (32, 32, 3) and tr.images.dtype == np.uint8 and tr.labels.dtype == np.int64
    # every image is filled with its label (write_cifar): images and labels stayed paired
    assert (tr.images[:, 0, 0, 0] == tr.labels).all() and (te.images[:, 5, 7, 2] == te.labels).all()
    assert tr.shots["few"].sum() == np.sum(np.asarray(tr.class_counts) < 20)


def test_cifar10_default_rho_many_medium_few(tmp_path):
    write_cifar(tmp_path, 10, per_class_train=500, per_class_test=2)
    d = cifar_lt_splits(str(tmp_path / "cifar-10-batches-py"), 10, rho=100.0)
    assert d.class_counts == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert [int(d.shots[k].sum()) for k in ("many", "medium", "few")] == [4, 3, 3]


def test_cifar_lt_subset_is_seeded(tmp_path):
    folder = write_cifar(tmp_path, 10, per_class_train=60)
    # mark each image uniquely so the chosen subset is visible
    for i in range(1, 6):
        path = os.path.join(folder, f"data_batch_{i}")
        with open(path, "rb") as f:
            b = pickle.load(f)
        k = (i - 1) * len(b[b"labels"]) + np.arange(len(b[b"labels"]))  # a global id in pixels (0, 1), (0, 2)
        b[b"data"][:, 1], b[b"data"][:, 2] = k % 256, k // 256
        with open(path, "wb") as f:
            pickle.dump(b, f)
    a, b, c = (cifar_lt(str(tmp_path), rho=10, seed=s).images[:, 0, 1:3, 0] for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_cifar_errors_name_file_and_field(tmp_path):
    folder = write_cifar(tmp_path, 10, per_class_train=10)
    with pytest.raises(FileNotFoundError, match="no data_batch_1"):
        cifar_lt(str(tmp_path / "nowhere"))
    path = os.path.join(folder, "data_batch_3")
    with open(path, "rb") as f:
        b = pickle.load(f)
    with open(path, "wb") as f:
        pickle.dump({b"data": b[b"data"]}, f)
    with pytest.raises(BadInputError, match=r"data_batch_3: no 'labels' field"):
        cifar_lt(str(tmp_path))
    with open(path, "wb") as f:
        pickle.dump({b"data": b[b"data"], b"labels": [11] + b[b"labels"][1:]}, f)
    with pytest.raises(BadInputError, match=r"data_batch_3: field 'labels'\[0\] = 11 is outside \[0, 10\)"):
        cifar_lt(str(tmp_path))
    with open(path, "wb") as f:
        f.write(b"\x80\x04truncated")
    with pytest.raises(BadInputError, match="data_batch_3: not a readable CIFAR pickle"):
        cifar_lt(str(tmp_path))


def test_cifar_lt_val_split_is_held_out_of_the_training_pool(tmp_path):
    folder = write_cifar(tmp_path, 10, per_class_train=60)
    for i in range(1, 6):  # a unique id per training image in pixels (0, 1) and (0, 2)
        path = os.path.join(folder, f"data_batch_{i}")
        with open(path, "rb") as f:
            b = pickle.load(f)
        k = (i - 1) * len(b[b"labels"]) + np.arange(len(b[b"labels"]))
        b[b"data"][:, 1], b[b"data"][:, 2] = k % 256, k // 256
        with open(path, "wb") as f:
            pickle.dump(b, f)
    os.remove(os.path.join(folder, "test_batch"))  # split=val never reads the test images
    d = cifar_lt_splits(folder, 10, rho=10.0, seed=3, split="val")
    assert d.name.endswith("[val]") and d.class_counts == long_tail_counts(54, 10, 10.0)
    assert np.bincount(d.y_test, minlength=10).tolist() == [6] * 10  # a tenth of each class's 60
    ids = lambda x: set((x[:, 0, 1, 0].astype(int) + 256 * x[:, 0, 2, 0].astype(int)).tolist())  # noqa: E731
    assert not ids(d.x_train) & ids(d.x_test), "a validation image is also a training image"
    assert (d.x_train[:, 0, 0, 0] == d.y_train).all() and (d.x_test[:, 0, 0, 0] == d.y_test).all()
    with pytest.raises(ValueError, match="split='dev'"):
        cifar_lt_splits(folder, 10, split="dev")
