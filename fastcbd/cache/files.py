"""The teacher cache over image files (the torch DataLoader path): a view is an explicit crop box.

A stored view of an image file is its pixel box (top, left, h, w, flip) in the decoded image, kept as the
row's parameters. Building, a worker decodes the image and draws the box from the row's own seed (the
random-resized-crop rule of fastcbd.data.torch_loader.crop_box on a CPU generator); training, a worker cuts
the stored box. Both resize the box with FileImages.cut, so the student sees the pixels the teachers saw.
The student's view of an image is chosen by the sample's position seed (sample_seeds of loader seed, epoch,
position: the torch loader's per-sample randomness), so a resumed run picks the same views, whatever the
number of workers.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from fastcbd.cache.loader import FeatureRows, adopt
from fastcbd.cache.store import TeacherCache
from fastcbd.data.decode import load_rgb
from fastcbd.data.files import BadInputError
from fastcbd.data.samplers import sample_seeds
from fastcbd.data.torch_loader import FileImages, TorchLoader, _stopping_workers, crop_box


class StoredViews(Dataset):
    """Item (i, row) -> (crop (3, S, S) uint8, i, row, box (5,) int64): image i cut with row's stored box,
    or (boxes None: building) with a box drawn from the row's seed."""

    def __init__(self, images: FileImages, boxes: np.ndarray | None = None, seed: int = 0):
        self.images, self.boxes, self.seed = images, boxes, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        i, row = item
        path = self.images.files.paths[i]
        try:
            img = load_rgb(path)
        except BadInputError as exc:  # no stand-in image: a cached view belongs to its own file
            raise BadInputError(f"{exc} (the teacher cache needs every training image readable: fix or remove it)") from exc
        if self.boxes is not None:
            box = tuple(int(v) for v in self.boxes[row])
        else:
            seed = int(sample_seeds(self.seed, 0, np.array([row]))[0])
            box = crop_box(img.shape[-2], img.shape[-1], self.images.aug, torch.Generator().manual_seed(seed))
        return self.images.cut(img, box), i, row, torch.tensor([int(v) for v in box])


def collate_views(items, channels_last: bool = False):
    """-> crops (B, 3, S, S) uint8, images (B,), rows (B,), boxes (B, 5) int64."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty((len(items), *items[0][0].shape), dtype=torch.uint8, memory_format=fmt)
    for k, (img, *_) in enumerate(items):
        x[k].copy_(img)
    return x, torch.tensor([it[1] for it in items]), torch.tensor([it[2] for it in items]), torch.stack([it[3] for it in items])


def view_batches(loader: TorchLoader, dataset: StoredViews, batches: list, seed: int):
    """(crops as normalised floats on the device, images, rows, boxes) per batch of (i, row) pairs."""
    import functools

    loader.dataset = dataset
    dl = loader._dataloader(batches, seed, functools.partial(collate_views,
                                                             channels_last=loader.memory_format == torch.channels_last))
    for x, images, rows, boxes in _stopping_workers(dl):
        yield loader._normalize(x.to(loader.device, non_blocking=True).float()), images, rows, boxes


class CachedFileLoader(TorchLoader):
    """A TorchLoader over FileImages whose batches are ((stored views, teachers' features), labels)."""

    @classmethod
    def over(cls, base: TorchLoader, cache: TeacherCache, weights: list[str]):
        self = adopt(cls, base, cache)
        self.views = StoredViews(base.dataset, np.array(cache.params))
        self.offsets = np.asarray(cache.offsets)
        self.features = FeatureRows(cache, weights, self.device)
        self.labels_t = torch.from_numpy(self.labels.astype(np.int64))
        return self

    @property
    def dims(self) -> list[int]:
        return self.features.dims

    def __iter__(self):
        seed = self._seed_generator()
        starts, counts = self.offsets[:-1], np.diff(self.offsets)
        batches = [[(i, int(starts[i] + s % counts[i])) for i, s in b] for b in self._batches(seeded=True)]
        for x, images, rows, _ in view_batches(self, self.views, batches, seed):
            if self.sampler is not None:
                self.sampler.advance(len(rows))
            yield (x, self.features(rows)), self.labels_t[images].to(self.device, non_blocking=True)
