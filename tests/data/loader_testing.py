"""Shared helpers of the loader tests: a small list-file dataset and label <-> colour checks."""
from __future__ import annotations

import numpy as np
import torch
from data_files import write_jpegs, write_list

from fastcbd.data import list_splits

COUNTS = [12, 6, 3, 2]


def small_splits(root, counts=COUNTS, image_size=32, extra_lines=(), skip_bad=False):
    train = write_jpegs(root, counts, "train")
    test = write_jpegs(root, [2] * len(counts), "val")
    write_list(root / "train.txt", train, extra_lines)
    write_list(root / "test.txt", test)
    return list_splits(str(root), "train.txt", "test.txt", image_size=image_size, skip_bad=skip_bad)


def class_colours(num_classes):
    return torch.tensor([[(c * 37) % 256, (c * 91) % 256, (c * 53) % 256] for c in range(num_classes)],
                        dtype=torch.float32)


def labels_from_pixels(x, mean, std, num_classes):
    """The class whose colour is nearest each image's mean colour (data_files.jpeg_bytes encodes it)."""
    m = torch.tensor(mean).view(1, 3, 1, 1) * 255
    s = torch.tensor(std).view(1, 3, 1, 1) * 255
    rgb = (x.float().cpu() * s + m).mean(dim=(2, 3))
    return torch.cdist(rgb, class_colours(num_classes)).argmin(1)


def run_epoch(loader, sampler=None, epoch=0, stop_after=None):
    if sampler is not None:
        sampler.set_epoch(epoch)
    labels, shapes = [], []
    for k, (x, y) in enumerate(loader):
        labels.append(y.cpu())
        shapes.append(tuple(x.shape))
        if stop_after is not None and k + 1 == stop_after:
            break
    return (torch.cat(labels).numpy() if labels else np.zeros(0, np.int64)), shapes


def check_train_epoch(loader, sampler, y_train, mean, std, num_classes, consumed=False):
    """A 23-image epoch of batch 8 follows the sampler's order (labels, batch shapes; consumed: the sampler
    counts the whole epoch as consumed), and a batch of the next epoch is float32 / int64 with each image's
    colour naming its label."""
    sampler.set_epoch(1)
    order = sampler.indices()
    labels, shapes = run_epoch(loader, sampler, epoch=1)
    assert np.array_equal(labels, y_train[order]), f"{labels} != {y_train[order]}"
    assert shapes == [(8, 3, 32, 32)] * 2 + [(7, 3, 32, 32)] and len(loader) == 3
    assert not consumed or sampler.consumed == len(order), (sampler.consumed, len(order))
    sampler.set_epoch(2)
    x, y = next(iter(loader))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(labels_from_pixels(x, mean, std, num_classes), y), "decoded images do not match their labels"
