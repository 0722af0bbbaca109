"""The fallback loader: a torch DataLoader over the same samplers, decoding with torchvision.io.decode_jpeg.

Workers do what must be done per image (read, decode, random-resized crop + flip to a fixed size, or
resize + centre crop for evaluation) on uint8 tensors; the batch is then moved to the device once, and
what can be batched (the aug teachers' colour jitter and grayscale, normalisation) runs there as
tensor ops. Batches are yielded in the sampler's order; the sampler is advanced as each batch is
handed to the trainer, so a checkpoint taken between batches resumes exactly. A worker's crop and flip
come from a generator of the sample's own, seeded from (loader seed, epoch, position in the epoch's
order) (fastcbd.data.samplers.sample_seeds), never from the global RNG: a resumed run, whatever the
worker count, cuts every image as the unbroken run did.
"""
from __future__ import annotations

import functools
import logging
import math
import signal

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset

from fastcbd.data.augment import AugmentConfig, augment, normalize_, photometric
from fastcbd.data.decode import load_rgb
from fastcbd.data.files import BadInputError, ImageFiles
from fastcbd.data.samplers import SampledLoader, sample_seeds

log = logging.getLogger("fastcbd")
ATTEMPTS = 10  # random-resized-crop tries per image before the centre-crop fallback (torchvision's count)


def substitutes(labels: np.ndarray):
    """i -> the other images of i's class in a fixed cyclic order (stand-ins for a bad image)."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.empty(len(labels), np.int64)
    pos[order] = np.arange(len(labels))

    def others(i: int, limit: int = 8):
        c = labels[i]
        n, k = counts[c], pos[i] - starts[c]
        return [int(order[starts[c] + (k + j) % n]) for j in range(1, min(n, limit + 1))]

    return others


def crop_box(height: int, width: int, aug: AugmentConfig, gen: torch.Generator) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) of a random-resized crop of a height x width image: torchvision's
    RandomResizedCrop.get_params (ATTEMPTS tries of an area fraction and a log-uniform ratio, else the
    whole image cut to the ratio range, centred), plus the flip, from 4 * ATTEMPTS + 1 draws of `gen`
    (a CPU generator) whatever the image's size."""
    u = torch.rand(4 * ATTEMPTS + 1, generator=gen, dtype=torch.float64).tolist()
    (s0, s1), (r0, r1) = aug.crop_scale, aug.crop_ratio
    area, log_r0, log_r1 = height * width, math.log(r0), math.log(r1)
    for k in range(0, 4 * ATTEMPTS, 4):
        target, ratio = area * (s0 + u[k] * (s1 - s0)), math.exp(log_r0 + u[k + 1] * (log_r1 - log_r0))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(u[k + 2] * (height - h + 1)), int(u[k + 3] * (width - w + 1))
            break
    else:
        lo, hi = min(r0, r1), max(r0, r1)
        w, h = width, height
        if width / height < lo:
            h = round(width / lo)
        elif width / height > hi:
            w = round(height * hi)
        top, left = (height - h) // 2, (width - w) // 2
    return top, left, h, w, aug.flip and u[-1] < 0.5


class FileImages(Dataset):
    """Item (i, seed) -> ((3, S, S) uint8, label, bad paths). train: random-resized crop (+ flip) to
    `size`, drawn from a generator seeded with `seed` (TorchLoader passes the seed of the sample's
    position in the epoch; a bare index i is its own seed); eval: short side to `resize`, centre crop
    `size`. With skip_bad a bad file is replaced by another image of its class (train, same seed) or
    dropped (eval, image None); its path is returned for the log."""

    def __init__(self, files: ImageFiles, train: bool, size: int = 224, resize: int = 256,
                 aug: AugmentConfig | None = None, skip_bad: bool = False):
        self.files, self.train, self.size, self.resize, self.skip_bad = files, train, size, resize, skip_bad
        self.aug = aug or AugmentConfig()
        self.others = substitutes(files.labels) if skip_bad and train else None

    def __len__(self) -> int:
        return len(self.files)

    def _transform(self, img: torch.Tensor, seed: int) -> torch.Tensor:
        s = self.size
        if not self.train:
            img = TF.resize(img, self.resize, antialias=True)
            return TF.center_crop(img, [s, s])
        return self.cut(img, crop_box(img.shape[-2], img.shape[-1], self.aug, torch.Generator().manual_seed(seed)))

    def cut(self, img: torch.Tensor, box) -> torch.Tensor:
        """The (top, left, h, w, flip) box of img resized to size x size (flipped if flip): a training crop."""
        top, left, h, w, flip = (int(v) for v in box)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        return img.flip(-1) if flip else img

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, item)
        label, bad = int(self.files.labels[i]), []
        for j in [i] + (self.others(i) if self.others else []):
            try:
                return self._transform(load_rgb(self.files.paths[j]), seed), label, bad
            except BadInputError as exc:
                if not self.skip_bad:  # in a worker too: the DataLoader re-raises it as a BadInputError of this message
                    raise BadInputError(f"{exc} (data.skip_bad=true skips such items)") from exc
                bad.append(str(exc))
                if not self.train:
                    break
        return None, label, bad


def _stopping_workers(dl: DataLoader):
    """Iterate `dl`; when that ends with an error (a bad image in a worker) or is abandoned, shut its workers
    down at once. They ignore SIGTERM (ignore_stop_signals), so leaving them to the interpreter's exit would
    hang it: multiprocessing's exit handler SIGTERMs and joins them. torch has no public close."""
    batches = iter(dl)
    try:
        yield from batches
    finally:
        getattr(batches, "_shutdown_workers", lambda: None)()


def collate(items, channels_last: bool = False):
    """-> images (B, 3, S, S) uint8 (channels_last when asked: the layout the trainer wants, made here
    on uint8 rather than on the 4x larger float batch), labels (B,) int64, messages of the bad files,
    items consumed."""
    kept = [(x, y) for x, y, _ in items if x is not None]
    bad = [m for _, _, msgs in items for m in msgs]
    if not kept:
        return None, None, bad, len(items)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty((len(kept), *kept[0][0].shape), dtype=torch.uint8, memory_format=fmt)
    for i, (img, _) in enumerate(kept):
        x[i].copy_(img)
    return x, torch.tensor([y for _, y in kept]), bad, len(items)


class ArrayImages(Dataset):
    """In-memory uint8 (N, H, W, C) arrays; a whole batch is one gather (`__getitems__`)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, idx):
        idx = np.asarray(idx)
        x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).contiguous()
        return [(x, torch.from_numpy(self.labels[idx]), [], len(idx))]


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: Ctrl-C (SIGINT to the terminal's whole process group) and a SIGTERM to
    the group (a scheduler) are the trainer's to act on: it finishes the step, checkpoints and stops. A
    worker that died of them first would leave the trainer waiting on a batch that never comes, then
    failing. A worker whose trainer is gone still exits (the DataLoader's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TorchLoader(SampledLoader):
    """Yields (images (B, C, S, S) float32 normalised, labels (B,) int64) on `device`.

    dataset: FileImages (crops made in the workers; `aug` applies its photometric part on the device)
    or ArrayImages (the whole of `aug` runs batched on the device). sampler=None: sequential order.
    Checkpoints hold the on-device generator (state_dict); a FileImages item is (index, seed of its
    position in the epoch), so the crops made in the workers are those of an unbroken run too.
    """

    def __init__(self, dataset: Dataset, labels, batch_size: int, *, sampler=None, aug: AugmentConfig | None = None,
                 mean, std, device="cpu", seed: int = 0, drop_last: bool = False, channels_last: bool = False,
                 workers: int = 2, prefetch: int = 4):
        self.dataset, self.labels = dataset, np.asarray(labels)
        self.batch_size, self.sampler, self.aug, self.drop_last = int(batch_size), sampler, aug, drop_last
        self.device = torch.device(device)
        self.workers, self.prefetch, self.seed = int(workers), int(prefetch), seed
        self.mean = torch.tensor(mean, device=self.device) * 255
        self.std = torch.tensor(std, device=self.device) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.gen = torch.Generator(device=self.device)
        self.skipped: list[str] = []

    def _batches(self, seeded: bool) -> list:
        """The rest of this epoch's batches: index arrays, or with `seeded` lists of (index, seed) pairs,
        the seed that of the index's position in the epoch's order (sample_seeds)."""
        order = self._order()
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        if seeded:
            start, epoch = (self.sampler.consumed, self.sampler.epoch) if self.sampler is not None else (0, 0)
            seeds = sample_seeds(self.seed, epoch, np.arange(start, start + len(order)))
            order = list(zip(order.tolist(), seeds.tolist()))
        return [order[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def _seed_generator(self) -> int:
        """Seed the on-device generator for this epoch (or restore a checkpoint's mid-epoch state); returns
        the epoch's seed, also the DataLoader's base seed."""
        state = (self.seed, self.sampler.epoch, self.sampler.consumed) if self.sampler is not None else (self.seed,)
        seed = hash(state) % (2**62)
        self.gen.manual_seed(seed)
        if self._resume_gen is not None:  # a checkpoint's generator state, taken mid-epoch
            self.gen.set_state(self._resume_gen)
            self._resume_gen = None
        return seed

    def __iter__(self):
        seed = self._seed_generator()
        arrays = isinstance(self.dataset, ArrayImages)
        dl = self._dataloader(self._batches(seeded=not arrays), seed, (lambda items: items[0]) if arrays else
                              functools.partial(collate, channels_last=self.memory_format == torch.channels_last))
        for x, y, bad, consumed in _stopping_workers(dl):
            for message in bad:
                log.warning("skipped a bad image: %s", message)
            self.skipped += bad
            if self.sampler is not None:
                self.sampler.advance(consumed)
            if x is None:
                continue
            x = x.to(self.device, non_blocking=True).float()
            if self.aug is not None and arrays:
                x = augment(x / 255, self.aug, self.gen) * 255
            elif self.aug is not None and (self.aug.color_jitter > 0 or self.aug.grayscale_p > 0):
                x = photometric(x / 255, self.aug, self.gen) * 255
            yield self._normalize(x), y.to(self.device, non_blocking=True)

    def _dataloader(self, batches: list, seed: int, collate_fn) -> DataLoader:
        loader_gen = torch.Generator()
        loader_gen.manual_seed(seed)  # the DataLoader's base seed, drawn from here rather than the global RNG
        return DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers, collate_fn=collate_fn,
                          generator=loader_gen, pin_memory=self.device.type == "cuda",
                          prefetch_factor=self.prefetch if self.workers else None, worker_init_fn=ignore_stop_signals)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """A float batch of 0..255 values, normalised in place in the loader's memory format."""
        # in place: a fresh (B, 3, 224, 224) float batch per op costs more than the op (page faults)
        return normalize_(x.contiguous(memory_format=self.memory_format), self.mean, self.std)
