"""Image-file datasets (list files, iNat JSON, ImageFolder): paths + int64 labels, read without decoding.

Every format reader builds an `ImageFiles` per split through a `Problems` collector: a bad item (a
missing file, a label that is not an integer or is >= C, a class with no image) raises a
`BadInputError` (fastcbd.errors) naming the file and the line or field, or, with `skip_bad=True`, is
skipped, counted and logged. A file that cannot be read as its format at all (not JSON, no usable line)
raises BadInputError with or without skip_bad.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from fastcbd.data.profile import LabelledSplit
from fastcbd.errors import BadInputError

log = logging.getLogger("fastcbd")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The most classes a dataset may have (iNat18 has 8,142): a label or category count above it is a typo or
# a corrupt file, and would otherwise size the per-class arrays.
MAX_CLASSES = 1 << 20


class Problems:
    """Raises on the first bad item, or (skip_bad) records it; `report()` logs what was skipped."""

    def __init__(self, skip_bad: bool = False):
        self.skip_bad = skip_bad
        self.items: list[str] = []

    def __call__(self, where: str, message: str) -> None:
        if not self.skip_bad:
            raise BadInputError(f"{where}: {message} (data.skip_bad=true skips such items)")
        self.items.append(f"{where}: {message}")

    def report(self, what: str) -> None:
        if self.items:
            shown = "\n  ".join(self.items[:10]) + ("\n  ..." if len(self.items) > 10 else "")
            log.warning("%s: skipped %d bad item(s):\n  %s", what, len(self.items), shown)


def read_bytes(path: str, what: str) -> bytes:
    """The whole file: FileNotFoundError naming `what` when it is not there, BadInputError when it cannot
    be read."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror})") from exc


def resolve(root: str, path: str) -> str:
    """An image path: absolute as given, else under `root`."""
    return path if os.path.isabs(path) or not root else os.path.join(root, path)


def resolve_index(root: str, path: str) -> str:
    """A list / JSON file or split folder: as given when it exists (absolute or from the working
    directory), else under `root`."""
    return path if os.path.exists(path) or not root else os.path.join(root, path)


@dataclass
class ImageFiles(LabelledSplit):
    """One split of an image-file dataset: absolute paths and int64 labels in [0, num_classes)."""

    name: str
    paths: list[str]
    labels: np.ndarray
    num_classes: int
    skipped: list[str] = field(default_factory=list)  # "file:line: why" of each item left out

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()


def make_split(name: str, source: str, paths: list[str], labels: list[int], num_classes: int, problems: Problems,
               train: bool) -> ImageFiles:
    """Finish a split: every class of a training split needs an image (else a bad item naming it)."""
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        raise BadInputError(f"{source}: no usable image in this split")
    split = ImageFiles(name, list(paths), y, int(num_classes), problems.items)
    if train:
        empty = np.flatnonzero(np.bincount(y, minlength=num_classes) == 0)
        if len(empty) > 10:  # one item for many (a typo in one label can leave thousands of classes empty)
            problems(source, f"{len(empty)} classes have no image: {', '.join(map(str, empty[:10].tolist()))}, ...")
        for c in empty if len(empty) <= 10 else ():
            problems(source, f"class {int(c)} has no image")
    problems.report(source)
    return split


@dataclass
class FileSplits:
    """Train (long-tailed) and test (balanced) image-file splits; mirrors ArraySplits' interface."""

    name: str
    train: ImageFiles
    test: ImageFiles
    num_classes: int
    image_size: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @property
    def y_train(self) -> np.ndarray:
        return self.train.labels

    @property
    def y_test(self) -> np.ndarray:
        return self.test.labels

    @property
    def class_counts(self) -> list[int]:
        return self.train.class_counts

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one training crop."""
        return 3, self.image_size, self.image_size
