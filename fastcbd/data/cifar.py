"""CIFAR-10 / CIFAR-100 from the python pickle batches, and CIFAR-LT by the standard profile.

CIFAR-10: `data_batch_1..5`, `test_batch` with `data` (N, 3072) uint8 and `labels`; CIFAR-100:
`train`, `test` with `data` and `fine_labels`. `root` is the folder holding them, or its parent
(`cifar-10-batches-py`, `cifar-100-python`). The pickles are read with encoding="bytes", so both the
original (Python 2) files and re-pickled ones load.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

from fastcbd.data.arrays import ArraySplits, ImageArray
from fastcbd.data.files import BadInputError
from fastcbd.data.profile import long_tail_counts

LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    100: ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def _folder(root: str, num_classes: int) -> str:
    sub, train_files, _, _ = LAYOUT[num_classes]
    for folder in (root, os.path.join(root, sub)):
        if os.path.exists(os.path.join(folder, train_files[0])):
            return folder
    raise FileNotFoundError(f"CIFAR-{num_classes}: no {train_files[0]} in {root} or {os.path.join(root, sub)}")


def _field(batch: dict, key: str, path: str):
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    have = ", ".join(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
    raise BadInputError(f"{path}: no '{key}' field (has {have})")


def read_batches(folder: str, names: list[str], label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) int64 of the named pickle batches."""
    xs, ys = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{path}: no such CIFAR batch file") from exc
        except Exception as exc:  # truncated or not a pickle
            raise BadInputError(f"{path}: not a readable CIFAR pickle batch ({exc!r})") from exc
        if not isinstance(batch, dict):
            raise BadInputError(f"{path}: expected a dict with 'data' and '{label_key}'")
        x = np.asarray(_field(batch, "data", path))
        y = np.asarray(_field(batch, label_key, path))
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
            raise BadInputError(f"{path}: field 'data' must be N x 3072 uint8, got {x.shape} {x.dtype}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise BadInputError(f"{path}: field '{label_key}' must hold {len(x)} integer labels, got {y.shape} {y.dtype}")
        bad = np.flatnonzero((y < 0) | (y >= num_classes))
        if len(bad):
            raise BadInputError(f"{path}: field '{label_key}'[{bad[0]}] = {y[bad[0]]} is outside [0, {num_classes})")
        xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(y.astype(np.int64))
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _long_tail(y: np.ndarray, num_classes: int, rho: float, seed: int, val_per_class: int = 0):
    """(training indices of the long tail, indices of the held-out balanced validation set): each class's
    pool is permuted with `seed`; its first val_per_class images are held out, and class i keeps
    int(n_max * (1/rho)^(i/(C-1))) of the rest, n_max = min pool - val_per_class."""
    per_class = np.bincount(y, minlength=num_classes)
    if not 0 <= val_per_class < per_class.min():
        raise ValueError(f"val_per_class={val_per_class}: expected 0 <= it < {per_class.min()} (images per class)")
    keep = long_tail_counts(int(per_class.min()) - val_per_class, num_classes, rho)
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in range(num_classes)]
    train = np.concatenate([p[val_per_class : val_per_class + keep[c]] for c, p in enumerate(pools)])
    return train, np.concatenate([p[:val_per_class] for p in pools])


def cifar_lt(root: str, num_classes: int = 10, rho: float = 100.0, seed: int = 0, train: bool = True) -> ImageArray:
    """CIFAR-10-LT / CIFAR-100-LT: class i keeps int(n_max * (1/rho)^(i/(C-1))) training images, a
    seeded subset (n_max = 5000 / 500). train=False gives the full, balanced test split."""
    if num_classes not in LAYOUT:
        raise ValueError(f"cifar_lt num_classes={num_classes}: expected 10 or 100")
    folder = _folder(root, num_classes)
    _, train_files, test_files, key = LAYOUT[num_classes]
    x, y = read_batches(folder, train_files if train else test_files, key, num_classes)
    if not train:
        return ImageArray(f"cifar{num_classes}[test]", x, y, num_classes)
    idx, _ = _long_tail(y, num_classes, rho, seed)
    return ImageArray(f"cifar{num_classes}-lt(rho={rho:g})", x[idx], y[idx], num_classes)


def cifar_lt_splits(root: str, num_classes: int = 10, rho: float = 100.0, seed: int = 0,
                    split: str = "test") -> ArraySplits:
    """The long-tailed training split and the balanced test split, for the device-resident loader.

    split="val" is for tuning a recipe without looking at the test images: a tenth of each class's
    training pool (500 / 50 images) is held out as the balanced evaluation set, the tail is drawn from
    the rest (n_max = 4500 / 450), and the test batches are not read."""
    if split == "test":
        tr = cifar_lt(root, num_classes, rho, seed, train=True)
        te = cifar_lt(root, num_classes, rho, seed, train=False)
        return ArraySplits(tr.name, tr.images, tr.labels, te.images, te.labels, num_classes)
    if split != "val":
        raise ValueError(f"cifar_lt_splits split={split!r}: expected 'test' or 'val'")
    if num_classes not in LAYOUT:
        raise ValueError(f"cifar_lt num_classes={num_classes}: expected 10 or 100")
    _, train_files, _, key = LAYOUT[num_classes]
    x, y = read_batches(_folder(root, num_classes), train_files, key, num_classes)
    tr, va = _long_tail(y, num_classes, rho, seed, int(np.bincount(y).min()) // 10)
    return ArraySplits(f"cifar{num_classes}-lt(rho={rho:g})[val]", x[tr], y[tr], x[va], y[va], num_classes)
