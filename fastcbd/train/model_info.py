"""What a model file records beside its weights for `fastcbd predict` and `fastcbd export`: the input
(channels, size, normalisation, the evaluation resize) and the class names, when the dataset has them."""
from __future__ import annotations

import os
import pickle

import numpy as np

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_meta(root: str, num_classes: int) -> list[str] | None:
    sub, meta, key = (("cifar-10-batches-py", "batches.meta", b"label_names") if num_classes == 10
                      else ("cifar-100-python", "meta", b"fine_label_names"))
    for folder in (root, os.path.join(root, sub)):
        try:
            with open(os.path.join(folder, meta), "rb") as f:
                names = pickle.load(f, encoding="bytes")[key]
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        except (OSError, KeyError, TypeError, pickle.UnpicklingError, EOFError, ValueError):
            continue
    return CIFAR10_NAMES if num_classes == 10 else None


def class_names(cfg, num_classes: int) -> list[str] | None:
    """The dataset's class names in label order: ImageFolder's sub-folder names, CIFAR's label names, an
    .npz file's `class_names` array; None where the dataset has only numbers (MNIST-LT, list files)."""
    d = cfg.data
    names = None
    if d.dataset == "imagefolder":
        from fastcbd.data.files import resolve

        folder = resolve(d.root, d.train_list or "train")
        names = sorted(e.name for e in os.scandir(folder) if e.is_dir()) if os.path.isdir(folder) else None
    elif d.dataset in ("cifar10-lt", "cifar100-lt") and d.root:
        names = _cifar_meta(d.root, 10 if d.dataset == "cifar10-lt" else 100)
    elif d.dataset == "npz" and d.path:
        with np.load(d.path, allow_pickle=False) as z:
            names = [str(n) for n in z["class_names"].tolist()] if "class_names" in z.files else None
    return names if names is not None and len(names) == num_classes else None


def input_info(ctx) -> dict:
    """{'input': {channels, size [H, W], mean, std, resize}, 'class_names': [...] | None} of a Context.

    resize: image files are resized (short side) to it and centre-cropped to size for evaluation;
    None for in-memory arrays, whose images are used at their own size."""
    from fastcbd.data.arrays import ArraySplits

    splits = ctx.splits
    c, h, w = splits.image_shape
    resize = None if isinstance(splits, ArraySplits) else round(splits.image_size * 256 / 224)
    return {"input": {"channels": int(c), "size": [int(h), int(w)], "mean": [float(m) for m in ctx.mean],
                      "std": [float(s) for s in ctx.std], "resize": resize},
            "class_names": class_names(ctx.cfg, splits.num_classes)}
