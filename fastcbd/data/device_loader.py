"""A loader for data that fits in memory: the whole uint8 set lives on the device, batches are index
gathers, augmentation is batched tensor ops. No DataLoader, no workers.
"""
from __future__ import annotations

import numpy as np
import torch

from fastcbd.data.augment import AugmentConfig, apply_crop, draw_crop, photometric
from fastcbd.data.samplers import SampledLoader


class DeviceLoader(SampledLoader):
    """Yields (images (B, C, H, W) float32 normalised, labels (B,) int64) on `device`.

    images: uint8 (N, H, W, C) numpy; sampler: a fastcbd.data.samplers sampler (its epoch is advanced
    by the caller with set_epoch); aug: None for evaluation (no augmentation, sequential order).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *, sampler=None,
                 aug: AugmentConfig | None = None, mean=None, std=None, device="cpu", seed: int = 0,
                 drop_last: bool = False, channels_last: bool = False):
        self.device = torch.device(device)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(self.device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        self.batch_size, self.sampler, self.aug, self.drop_last = int(batch_size), sampler, aug, drop_last
        c = self.images.shape[1]
        if mean is None:
            x = self.images.float() / 255
            mean, std = x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()
        self.mean = torch.tensor(mean, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, c, 1, 1)
        self.mean255, self.std255 = self.mean * 255, self.std * 255  # normalise uint8-range values in place
        self.seed = seed
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)

    def __iter__(self):
        order = self._order()
        self._seed_generator()
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        for start in range(0, stop, self.batch_size):
            idx = torch.from_numpy(order[start : start + self.batch_size]).to(self.device)
            batch = self.batch(idx)
            if self.sampler is not None:
                self.sampler.advance(len(idx))
            yield batch

    def batch(self, idx: torch.Tensor):
        """(images, labels) of the images idx (on the device)."""
        return self.augmented(idx), self.labels.index_select(0, idx)

    def _seed_generator(self) -> None:
        """A checkpoint's generator state taken mid-epoch (exact resume), else a seed from the epoch."""
        if self._resume_gen is not None:
            self.gen.set_state(self._resume_gen)
            self._resume_gen = None
        elif self.sampler is not None:
            self.gen.manual_seed(hash((self.seed, self.sampler.epoch, self.sampler.consumed)) % (2**62))

    def augmented(self, idx: torch.Tensor) -> torch.Tensor:
        """The images idx (on the device) augmented with the next draws of the generator (none: as they are)."""
        aug = self.aug
        if aug is None:
            return self.view(idx, None)
        params = draw_crop(len(idx), aug, self.gen, self.device)
        if aug.color_jitter > 0 or aug.grayscale_p > 0:
            return self.view(idx, params, lambda x: photometric(x, aug, self.gen))
        return self.view(idx, params)

    def view(self, idx: torch.Tensor, params: torch.Tensor | None, photo=None) -> torch.Tensor:
        """Images idx cut with draw_crop parameters (None: uncut), then `photo` on [0, 1] floats, normalised,
        in the loader's memory format. The teacher cache cuts its stored views with this same function."""
        x = self.images.index_select(0, idx)
        if params is not None and self.aug.pad > 0:
            x = apply_crop(x, params, self.aug)  # on uint8: a quarter of the bytes
            x = photo(x.float().div_(255)).mul_(255) if photo else x.float()
            x = x.sub_(self.mean255).div_(self.std255)
        else:  # [0, 1] floats, as the resized crop and the published runs' numbers were computed
            x = x.float().div_(255)
            if params is not None:
                x = apply_crop(x, params, self.aug)
                x = photo(x) if photo else x
            x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)
