"""ImageNet-LT / Places-LT list files: one `relative/path.JPEG label` per line, paths under a root folder."""
from __future__ import annotations

import codecs
import os
import re

from fastcbd.data.files import (
    MAX_CLASSES,
    BadInputError,
    FileSplits,
    ImageFiles,
    Problems,
    make_split,
    read_bytes,
    resolve,
    resolve_index,
)
from fastcbd.errors import ConfigError

LABEL = re.compile(r"[+-]?[0-9]+")  # ASCII digits: int() would also take '٣', '１', '1_0'


def read_list(list_path: str, root: str, num_classes: int = 0, *, train: bool = True, skip_bad: bool = False,
              check_files: bool = True, name: str | None = None) -> ImageFiles:
    """Parse a list file; num_classes = 0 takes C = max label + 1 (a training split only).

    UTF-8 text (a BOM is allowed), lines ending in LF, CRLF or CR; blank lines are skipped. Errors name
    `list_path:line`: a line that is not UTF-8 or not `path label`, a label that is not a decimal integer, a
    negative label or one >= C (C <= MAX_CLASSES), a path with a NUL byte, a missing image file
    (check_files); and a class with no image. All raise BadInputError (or are skipped with skip_bad).
    """
    if num_classes <= 0 and not train:
        raise ValueError(f"{list_path}: a test list needs num_classes (from the training list)")
    if num_classes > MAX_CLASSES:
        raise ConfigError(f"data.num_classes={num_classes}: more than the {MAX_CLASSES} classes a dataset may have")
    data = read_bytes(list_path, "list file")
    data = data.removeprefix(codecs.BOM_UTF8)
    limit = num_classes if num_classes > 0 else MAX_CLASSES
    problems = Problems(skip_bad)
    paths, labels = [], []
    for lineno, raw in enumerate(data.splitlines(), 1):
        where = f"{list_path}:{lineno}"
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            problems(where, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
            continue
        if not line:
            continue
        parts = line.rsplit(None, 1)  # the path may contain spaces; the label is the last field
        if len(parts) != 2:
            problems(where, f"expected 'relative/path label', got {line[:200]!r}")
            continue
        rel, label = parts
        if not LABEL.fullmatch(label):
            problems(where, f"label {label[:40]!r} is not an integer")
            continue
        y = int(label) if len(label) <= 30 else limit  # int() refuses > 4300 digits; 30 are out of range anyway
        if y < 0 or y >= limit:
            problems(where, f"label {label[:40]} is outside [0, {num_classes}) (data.num_classes)" if num_classes > 0
                     else f"label {label[:40]} is outside [0, C) (at most {MAX_CLASSES} classes)")
            continue
        if "\x00" in rel:
            problems(where, f"the path {rel[:200]!r} has a NUL byte")
            continue
        path = resolve(root, rel)
        if check_files and not os.path.isfile(path):
            problems(where, f"no such file {path}")
            continue
        paths.append(path)
        labels.append(y)
    if not labels:
        raise BadInputError(f"{list_path}: " + ("empty list file" if not data.strip() else "no usable 'path label' line"))
    c = num_classes if num_classes > 0 else max(labels) + 1
    return make_split(name or os.path.basename(list_path), list_path, paths, labels, c, problems, train)


def list_splits(root: str, train_list: str, test_list: str, *, num_classes: int = 0, name: str = "list",
                image_size: int = 224, skip_bad: bool = False) -> FileSplits:
    """Train and test list files (image paths relative to `root`; a list path that does not exist as given is looked up under `root`)."""
    if not train_list or not test_list:
        raise ConfigError(f"dataset {name}: needs data.train_list and data.test_list (list files)")
    train = read_list(resolve_index(root, train_list), root, num_classes, train=True, skip_bad=skip_bad)
    test = read_list(resolve_index(root, test_list), root, train.num_classes, train=False, skip_bad=skip_bad)
    return FileSplits(name, train, test, train.num_classes, image_size)
