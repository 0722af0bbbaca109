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


class CachedLoader(DeviceLoader):
    """A DeviceLoader (same sampler, generator, images, normalisation) whose batches carry cached features."""

    @classmethod
    def over(cls, base: DeviceLoader, cache: TeacherCache, weights: list[str], resident_bytes: int = RESIDENT_BYTES):
        """`base`'s state, shared (not copied), with the features of the teachers `weights` (hashes) from `cache`."""
        self = cls.__new__(cls)
        self.__dict__.update(base.__dict__)
        if len(cache.offsets) - 1 != len(self.labels):
            raise ValueError(f"teacher cache {cache.folder}: {len(cache.offsets) - 1} images, the loader has {len(self.labels)}")
        self.spans = cache.columns(weights)
        self.offsets = torch.from_numpy(np.asarray(cache.offsets)).to(self.device)
        self.params = torch.from_numpy(np.array(cache.params)).to(self.device)
        cols = np.concatenate([np.arange(a, b) for a, b in self.spans])
        contiguous = bool(np.all(np.diff(cols) == 1))
        self.memmap, self.cols = cache.features, cols
        size = cache.features.shape[0] * len(cols) * 2
        self.resident = None
        if size <= resident_bytes:
            f = cache.features[:, cols[0] : cols[-1] + 1] if contiguous else cache.features[:, cols]
            self.resident = torch.from_numpy(np.array(f)).to(self.device)  # a writable copy in memory
        return self

    @property
    def dims(self) -> list[int]:
        return [b - a for a, b in self.spans]

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """One stored view of each image idx, uniformly among its views, from the loader's generator."""
        start = self.offsets.index_select(0, idx)
        count = self.offsets.index_select(0, idx + 1) - start
        u = torch.rand(len(idx), generator=self.gen, device=self.device)
        return start + torch.minimum((u * count).long(), count - 1)

    def features(self, rows: torch.Tensor) -> list[torch.Tensor]:
        if self.resident is not None:
            f = self.resident.index_select(0, rows)
        else:
            r = rows.cpu().numpy()
            order = np.argsort(r)  # read the file in row order, then put the rows back in the batch's order
            f = np.empty((len(r), len(self.cols)), np.float16)
            f[order] = self.memmap[r[order]][:, self.cols]
            f = torch.from_numpy(f)
            f = f.to(self.device, non_blocking=True)
        return list(f.float().split(self.dims, 1))

    def __iter__(self):
        order = self._order()
        self._seed_generator()
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        for start in range(0, stop, self.batch_size):
            idx = torch.from_numpy(order[start : start + self.batch_size]).to(self.device)
            rows = self.rows(idx)
            x = self.view(idx, self.params.index_select(0, rows))
            if self.sampler is not None:
                self.sampler.advance(len(idx))
            yield (x, self.features(rows)), self.labels.index_select(0, idx)
