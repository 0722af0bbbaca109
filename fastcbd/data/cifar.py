"""CIFAR-10 / CIFAR-100 from the python pickle batches, and CIFAR-LT by the standard profile.

CIFAR-10: `data_batch_1..5`, `test_batch` with `data` (N, 3072) uint8 and `labels`; CIFAR-100:
`train`, `test` with `data` and `fine_labels`. `root` is the folder holding them, or its parent
(`cifar-10-batches-py`, `cifar-100-python`). The pickles are read with encoding="bytes", so both the
original (Python 2) files and re-pickled ones load.

Unpickling runs whatever callable a file names, so a batch is read by an unpickler that allows only what a
batch holds (dicts, lists, bytes, strings, numbers, numpy arrays, dtypes and scalars): a file naming any
other callable is refused (BadInputError), never run.
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


# (module, name) of every callable a CIFAR batch may name: numpy's array / dtype / scalar reconstructors
# (numpy.core in files pickled before numpy 2, numpy._core after) and _codecs.encode (bytes, protocol 2)
SAFE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (f"numpy.{core}.{mod}", name) for core in ("core", "_core")
    for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}


class BatchUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only SAFE_GLOBALS (anything else: UnpicklingError, nothing is run)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}; a CIFAR batch holds only dicts, lists, "
                                         "numbers and numpy arrays")
        if module.startswith("numpy.core."):  # numpy 2 keeps numpy.core only as a deprecated alias
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _describe(value) -> str:
    return f"a {value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__


def _field(batch: dict, key: str, path: str):
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    have = ", ".join(repr(k.decode(errors="replace") if isinstance(k, bytes) else k)[:40] for k in list(batch)[:10])
    raise BadInputError(f"{path}: no '{key}' field (has {have or 'none'})")


def _labels(y, n: int, path: str, key: str, num_classes: int) -> np.ndarray:
    """(n,) int64 labels in [0, num_classes) from a list of ints or a 1-D integer array (BadInputError else)."""
    if isinstance(y, (list, tuple)):
        for i, v in enumerate(y):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise BadInputError(f"{path}: field '{key}'[{i}] must be an integer label, got {_describe(v)}")
            if not 0 <= v < num_classes:
                shown = v if -(10**30) < v < 10**30 else "an integer of over 30 digits"  # str() refuses > 4300
                raise BadInputError(f"{path}: field '{key}'[{i}] = {shown} is outside [0, {num_classes})")
    elif isinstance(y, np.ndarray) and y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        bad = np.flatnonzero((y < 0) | (y >= num_classes))
        if len(bad):
            raise BadInputError(f"{path}: field '{key}'[{bad[0]}] = {y[bad[0]]} is outside [0, {num_classes})")
    else:
        raise BadInputError(f"{path}: field '{key}' must be a list or 1-D integer array of labels, got {_describe(y)}")
    if len(y) != n:
        raise BadInputError(f"{path}: field '{key}' has {len(y)} labels for {n} images")
    return np.asarray(y, dtype=np.int64)


def read_batches(folder: str, names: list[str], label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) int64 of the named pickle batches; every class needs an
    image. A file that is not such a batch raises BadInputError naming it and the field."""
    xs, ys = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                batch = BatchUnpickler(f, encoding="bytes").load()
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{path}: no such CIFAR batch file") from exc
        except Exception as exc:  # truncated, not a pickle, or a refused callable: a bad file
            raise BadInputError(f"{path}: not a readable CIFAR pickle batch ({type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:200]})") from exc
        if not isinstance(batch, dict):
            raise BadInputError(f"{path}: expected a dict with 'data' and '{label_key}', got {_describe(batch)}")
        x = _field(batch, "data", path)
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
            raise BadInputError(f"{path}: field 'data' must be an N x 3072 uint8 array, got {_describe(x)}")
        ys.append(_labels(_field(batch, label_key, path), len(x), path, label_key, num_classes))
        xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    y = np.concatenate(ys)
    empty = np.flatnonzero(np.bincount(y, minlength=num_classes) == 0)
    if len(empty):
        raise BadInputError(f"{os.path.join(folder, names[0])}{' ...' if len(names) > 1 else ''}: no image of "
                            f"class(es) {empty[:10].tolist()}{' ...' if len(empty) > 10 else ''} in field '{label_key}'")
    return np.ascontiguousarray(np.concatenate(xs)), y


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
