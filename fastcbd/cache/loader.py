"""The student's loader over a teacher cache: ((images, teachers' features), labels) batches.

The sampler (class-balanced for CBD) picks the image, the loader's checkpointed generator picks which of
its stored views, the view's crop parameters cut the image (DeviceLoader.view, the function the cache was
built with: the student sees exactly the pixels the teachers saw) and the view's row gives the K teachers'
features. The features live on the device when they fit (resident_bytes), else rows are read from the
memory-mapped file per batch.
"""
from __future__ import annotations

import numpy as np
import torch

from fastcbd.cache.store import TeacherCache
from fastcbd.data.device_loader import DeviceLoader

RESIDENT_BYTES = 4 << 30  # features up to this size are copied to the device once


def adopt(cls, base, cache: TeacherCache):
    """A `cls` object sharing (not copying) the state of the loader `base`, which must have the cache's images."""
    if len(cache.offsets) - 1 != len(base.labels):
        raise ValueError(f"teacher cache {cache.folder}: {len(cache.offsets) - 1} images, the loader has {len(base.labels)}")
    self = cls.__new__(cls)
    self.__dict__.update(base.__dict__)
    return self


class FeatureRows:
    """rows (int64 tensor) -> the K teachers' features of those cache rows: list of (B, D_k) float32 on `device`."""

    def __init__(self, cache: TeacherCache, weights: list[str], device, resident_bytes: int = RESIDENT_BYTES):
        self.spans, self.device = cache.columns(weights), torch.device(device)
        self.cols = np.concatenate([np.arange(a, b) for a, b in self.spans])
        self.memmap, self.resident = cache.features, None
        if cache.features.shape[0] * len(self.cols) * 2 <= resident_bytes:
            self.resident = torch.from_numpy(np.array(cache.features[:, self.cols])).to(self.device)

    @property
    def dims(self) -> list[int]:
        return [b - a for a, b in self.spans]

    def __call__(self, rows: torch.Tensor) -> list[torch.Tensor]:
        if self.resident is not None:
            f = self.resident.index_select(0, rows.to(self.device))
        else:
            r = rows.cpu().numpy()
            order = np.argsort(r)  # read the file in row order, then put the rows back in the batch's order
            host = np.empty((len(r), len(self.cols)), np.float16)
            host[order] = self.memmap[r[order]][:, self.cols]
            f = torch.from_numpy(host).to(self.device, non_blocking=True)
        return list(f.float().split(self.dims, 1))


class CachedLoader(DeviceLoader):
    """A DeviceLoader (same sampler, generator, images, normalisation) whose batches carry cached features."""

    @classmethod
    def over(cls, base: DeviceLoader, cache: TeacherCache, weights: list[str], resident_bytes: int = RESIDENT_BYTES):
        """`base`'s state, shared (not copied), with the features of the teachers `weights` (hashes) from `cache`."""
        self = adopt(cls, base, cache)
        self.features = FeatureRows(cache, weights, self.device, resident_bytes)
        self.offsets = torch.from_numpy(np.asarray(cache.offsets)).to(self.device)
        self.params = torch.from_numpy(np.array(cache.params)).to(self.device)
        return self

    @property
    def dims(self) -> list[int]:
        return self.features.dims

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """One stored view of each image idx, uniformly among its views, from the loader's generator."""
        start = self.offsets.index_select(0, idx)
        count = self.offsets.index_select(0, idx + 1) - start
        u = torch.rand(len(idx), generator=self.gen, device=self.device)
        return start + torch.minimum((u * count).long(), count - 1)

    def batch(self, idx: torch.Tensor):
        """((stored views, the teachers' features), labels) of the images idx."""
        rows = self.rows(idx)
        x = self.view(idx, self.params.index_select(0, rows))
        return (x, self.features(rows)), self.labels.index_select(0, idx)
