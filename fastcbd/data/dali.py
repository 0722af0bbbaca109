"""NVIDIA DALI pipelines: decode and augment on the GPU (nvJPEG, `device="mixed"`) or on the CPU.

The sampler stays ours: `fn.external_source` is fed batch by batch with the file bytes and labels of
this rank's share of the sampler's draw (class-balanced, sqrt, ...), so the draw, the distributed
sharding and the exact mid-epoch resume are those of `fastcbd.data.samplers`. DALI is imported
lazily: nothing here is needed to import fastcbd.

Train: decode the random-resized crop window (the fused `decoders.image_slice` decodes only that
window) -> resize -> for the aug teachers, colour jitter (p) and grayscale (p) in one `color_twist` ->
crop_mirror_normalize (flip, mean/std) to NCHW float32 or float16. Eval: decode -> resize the short
side to 256 -> centre crop 224 -> normalise.

The pipeline draws nothing itself: each sample's crop tries, flip and colour factors come through the
external source, drawn from the seed of its position in the epoch's order
(fastcbd.data.samplers.sample_seeds). A pipeline rebuilt after a bad file, a new epoch or a resume
therefore augments every sample as an unbroken run does, and the loader needs no state beyond the
sampler's position: resume is exact by construction, on the CPU and the GPU alike.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from fastcbd.data.augment import AugmentConfig
from fastcbd.data.decode import load_rgb, read_bytes
from fastcbd.data.files import BadInputError, ImageFiles
from fastcbd.data.samplers import sample_seeds, sample_uniforms
from fastcbd.data.torch_loader import ATTEMPTS, substitutes

log = logging.getLogger("fastcbd")
INSTALL = "pip install 'fastcbd[dali]' (the nvidia-dali-cuda130 wheel)"


def import_dali():
    """(dali, fn, types); ImportError naming the install command if DALI is missing."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError as exc:
        raise ImportError(f"loader=dali needs NVIDIA DALI: {INSTALL} ({exc})") from exc
    return dali, fn, types


def available() -> bool:
    try:
        import_dali()
    except ImportError:
        return False
    return True


def _twists(aug: AugmentConfig) -> bool:
    return aug.color_jitter > 0 or aug.grayscale_p > 0


def sample_draws(seeds, aug: AugmentConfig) -> list[np.ndarray]:
    """Each sample's random draws, from its seed alone, as the pipeline's external source takes them:
    the crop tries (4 arrays (n, ATTEMPTS) float32: area * ratio, area / ratio, top and left uniforms;
    area the fraction of the image in crop_scale, ratio log-uniform in crop_ratio; _crop_window), the
    flip (n,) int32 0/1 and, for the aug teachers, colour (n, 4) float32: color_twist brightness,
    contrast, saturation, hue (degrees), 1, 1, 1, 0 where the jitter (p) and grayscale (p) are off."""
    u = sample_uniforms(seeds, 4 * ATTEMPTS + 7)
    tries, n = u[:, : 4 * ATTEMPTS].reshape(-1, ATTEMPTS, 4), len(u)  # (area, ratio, top, left) per try
    (s0, s1), (r0, r1) = aug.crop_scale, aug.crop_ratio
    area = s0 + tries[..., 0] * (s1 - s0)
    ratio = np.exp(math.log(r0) + tries[..., 1] * (math.log(r1) - math.log(r0)))
    crop = [area * ratio, area / ratio, tries[..., 2], tries[..., 3]]
    flip = (u[:, 4 * ATTEMPTS] < 0.5) & aug.flip
    v = u[:, 4 * ATTEMPTS + 1 :]
    colour = np.tile(np.array([1.0, 1.0, 1.0, 0.0]), (n, 1))
    s = aug.color_jitter
    if s > 0:
        on = v[:, 0] < aug.color_jitter_p
        lo, hi = max(0.0, 1 - 0.8 * s), 1 + 0.8 * s
        colour[:, :3] = np.where(on[:, None], lo + v[:, 1:4] * (hi - lo), 1.0)
        colour[:, 3] = np.where(on, (v[:, 4] * 2 - 1) * 0.2 * s * 360, 0.0)
    if aug.grayscale_p > 0:
        colour[:, 2] *= v[:, 5] >= aug.grayscale_p
    out = [c.astype(np.float32) for c in crop] + [flip.astype(np.int32)]
    return out + [colour.astype(np.float32)] if _twists(aug) else out


class Feed:
    """external_source callback: BatchInfo -> (encoded images, (1,) int64 labels) of batch `iteration`
    of `batches`, and with `draws` (training) each sample's sample_draws.

    batches: (indices, seeds) pairs, the seeds those of the samples' positions in the epoch's order, so
    what a batch holds never depends on where the pipeline (re)started. A bad file (unreadable, empty,
    truncated JPEG, or one DALI failed on: `bad`) raises naming it, or with skip_bad is replaced by
    another image of its class (with the same draws) and logged."""

    def __init__(self, files: ImageFiles, skip_bad: bool = False, draws: AugmentConfig | None = None):
        self.files, self.skip_bad, self.draws = files, skip_bad, draws
        self.batches: list[tuple[np.ndarray, np.ndarray]] = []
        self.bad: dict[str, str] = {}  # path -> why
        self.others = substitutes(files.labels) if skip_bad else None
        self.skipped: list[str] = []

    def _read(self, i: int) -> bytes:
        path = self.files.paths[i]
        if path in self.bad:
            raise BadInputError(self.bad[path])
        return read_bytes(path)

    def _sample(self, i: int):
        candidates = [i] + (self.others(i) if self.others else [])
        for j in candidates:
            try:
                data = self._read(j)
            except BadInputError as exc:
                if not self.skip_bad:
                    raise
                if str(exc) not in self.skipped:
                    log.warning("skipped a bad image: %s", exc)
                    self.skipped.append(str(exc))
                continue
            return np.frombuffer(data, dtype=np.uint8), np.array([self.files.labels[i]], dtype=np.int64)
        raise BadInputError(f"{self.files.paths[i]}: no readable image of class {self.files.labels[i]} to stand in")

    def __call__(self, info):
        if info.iteration >= len(self.batches):
            raise StopIteration
        idx, seeds = self.batches[info.iteration]
        samples = [self._sample(int(i)) for i in idx]
        out = [[s[0] for s in samples], [s[1] for s in samples]]
        return out + sample_draws(seeds, self.draws) if self.draws is not None else out


class PositionDraws:
    """external_source callback for DALI's own reader (which has no sampler): the sample_draws of
    positions iteration * batch_size + k of epoch `epoch_idx`."""

    def __init__(self, aug: AugmentConfig, seed: int, batch_size: int):
        self.aug, self.seed, self.batch_size = aug, seed, batch_size

    def __call__(self, info):
        first = info.iteration * self.batch_size
        seeds = sample_seeds(self.seed, info.epoch_idx, np.arange(first, first + self.batch_size))
        return sample_draws(seeds, self.aug)


def _crop_window(fn, types, jpegs, crop, aug: AugmentConfig):
    """(anchor, shape) of each image's random-resized crop, relative, in "WH" order, from its crop tries
    (sample_draws): torchvision's rule in relative coordinates. The first of the ATTEMPTS tries that fits
    inside the image (relative width sqrt(area * ratio / aspect) and height sqrt(area / ratio * aspect)
    both <= 1), placed by its top and left uniforms; if none fits, the whole image cut to the ratio
    range, centred. The aspect ratio W / H comes from the encoded header (EXIF orientation applied, as the
    decoder does). Vectorised over the tries: a handful of DALI operators, whatever ATTEMPTS is."""
    from nvidia.dali import math as dmath

    area_ratio, area_per_ratio, top, left = crop
    hw = fn.peek_image_shape(jpegs, dtype=types.FLOAT)
    aspect = hw[1] / hw[0]
    w, h = dmath.sqrt(area_ratio / aspect), dmath.sqrt(area_per_ratio * aspect)  # (ATTEMPTS,) each
    rank = types.Constant(np.arange(ATTEMPTS, 0, -1, dtype=np.float32), device="cpu")  # the first try ranks highest
    score = ((w <= 1.0) & (h <= 1.0)) * rank
    best = fn.reductions.max(score)
    pick = (score == best) & (best > 0)  # one-hot of the first fitting try; all false when none fits
    lo, hi = min(aug.crop_ratio), max(aug.crop_ratio)
    fw, fh = dmath.min(hi / aspect, 1.0), dmath.min(aspect / lo, 1.0)
    none = best == 0
    w_, h_ = fn.reductions.sum(pick * w) + none * fw, fn.reductions.sum(pick * h) + none * fh
    x = fn.reductions.sum(pick * left * (1 - w)) + none * (1 - fw) * 0.5
    y = fn.reductions.sum(pick * top * (1 - h)) + none * (1 - fh) * 0.5
    return fn.stack(x, y), fn.stack(w_, h_)


def build_pipeline(source, *, train: bool, batch_size: int, device_id: int | None, num_threads: int = 2,
                   seed: int = 0, size: int = 224, resize: int = 256, aug: AugmentConfig | None = None,
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), fp16: bool = False, fused: bool = True,
                   layout: str = "CHW", prefetch: int = 2, reader: dict | None = None):
    """A DALI pipeline yielding (images (B, 3, size, size) in `layout`, labels (B, 1) int64).

    source: an external_source callback (Feed; for training, one made with `draws=aug`), or None with
    `reader` = kwargs of fn.readers.file (DALI's own reader: files, labels, shard_id, num_shards,
    random_shuffle; instance sampling only; the draws then come from PositionDraws(aug, seed)).
    device_id None: CPU only (decoding on the CPU); else "mixed" decode on that GPU. fused: decode only
    the crop window (decoders.image_slice) instead of the whole image, then slice.
    """
    dali, fn, types = import_dali()
    aug = aug or AugmentConfig()
    decode_on = "cpu" if device_id is None else "mixed"
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                         prefetch_queue_depth=prefetch)
    dtypes = [types.UINT8, types.INT64]
    draws = [types.FLOAT] * 4 + [types.INT32] + ([types.FLOAT] if _twists(aug) else []) if train else []
    with pipe:
        if reader is not None:
            jpegs, labels = fn.readers.file(name="reader", **reader)
            drawn = fn.external_source(source=PositionDraws(aug, seed, batch_size), num_outputs=len(draws),
                                       batch=True, batch_info=True, dtype=draws) if train else []
        else:
            jpegs, labels, *drawn = fn.external_source(source=source, num_outputs=len(dtypes + draws), batch=True,
                                                       batch_info=True, dtype=dtypes + draws)
        if train:
            crop, (flip, *colour) = drawn[:4], drawn[4:]
        common = dict(device=decode_on, output_type=types.RGB)
        cmn = dict(dtype=types.FLOAT16 if fp16 else types.FLOAT, output_layout=layout, crop=(size, size),
                   mean=[m * 255 for m in mean], std=[s * 255 for s in std])
        if not train:
            images = fn.resize(fn.decoders.image(jpegs, **common), resize_shorter=resize, antialias=True)
        else:
            anchor, shape = _crop_window(fn, types, jpegs, crop, aug)
            if fused:
                images = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="WH", **common)
            else:
                images = fn.slice(fn.decoders.image(jpegs, **common), anchor, shape, axis_names="WH")
            images = fn.resize(images, resize_x=size, resize_y=size, antialias=True)
            if colour:
                c = colour[0]
                images = fn.color_twist(images, brightness=c[0], contrast=c[1], saturation=c[2], hue=c[3])
            cmn["mirror"] = flip
        images = fn.crop_mirror_normalize(images, **cmn)
        pipe.set_outputs(images, labels)
    pipe.build()
    return pipe


def to_torch(tl, device: torch.device) -> torch.Tensor:
    """Copy a DALI TensorList (uniform shape) into a new torch tensor on `device`."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    t = tl.as_tensor()
    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(t, out, cuda_stream=stream)
    return out


class DaliLoader:
    """Yields (images (B, 3, S, S) float32/float16 normalised, labels (B,) int64) on `device`.

    One rank's loader: its share of the sampler's draw (sampler=None: sequential evaluation order).
    The sampler is advanced as each batch is handed out, and each sample's augmentation is drawn from
    the seed of its position in the epoch (sample_seeds with `seed`), so the sampler's state_dict is all
    a resume needs: the resumed run's batches are those of an unbroken run, bit for bit.
    """

    def __init__(self, files: ImageFiles, batch_size: int, *, sampler=None, train: bool = True,
                 aug: AugmentConfig | None = None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 device="cpu", seed: int = 0, drop_last: bool = False, channels_last: bool = False,
                 num_threads: int = 2, fp16: bool = False, fused: bool = True, skip_bad: bool = False,
                 size: int = 224, resize: int = 256, prefetch: int = 2):
        import_dali()
        self.files, self.batch_size, self.sampler, self.train = files, int(batch_size), sampler, train
        self.device = torch.device(device)
        self.drop_last, self.channels_last = drop_last, channels_last
        self.feed = Feed(files, skip_bad, draws=(aug or AugmentConfig()) if train else None)
        self.prefetch, self.seed = prefetch, seed
        self.options = dict(train=train, batch_size=self.batch_size, num_threads=num_threads, seed=seed, size=size,
                            resize=resize, aug=aug, mean=mean, std=std, fp16=fp16, fused=fused,
                            layout="HWC" if channels_last else "CHW", prefetch=prefetch)
        self.pipe = None

    @property
    def skipped(self) -> list[str]:
        return self.feed.skipped

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.files)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _pipeline(self):
        if self.pipe is None:
            dev = self.device
            device_id = (dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else None
            self.pipe = build_pipeline(self.feed, device_id=device_id, **self.options)
        return self.pipe

    def _culprit(self, k: int) -> str | None:
        """The file of batches k.. (those in flight) that the CPU decoder also rejects, if any."""
        for batch, _ in self.feed.batches[k : k + self.prefetch + 1]:
            for i in batch:
                path = self.files.paths[int(i)]
                try:
                    load_rgb(path)
                except BadInputError as exc:
                    return path, str(exc)
        return None

    def __iter__(self):
        pos = 0  # evaluation order (no sampler): images handed out so far, for a rebuild after a bad file
        while True:
            order = self.sampler.indices() if self.sampler is not None else np.arange(pos, len(self.files))
            stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
            # the seeds of the samples' positions in the epoch: a rebuilt pipeline restarts its iteration
            # count at 0 on the batches from the sampler's position, and augments them as before
            start, epoch = (self.sampler.consumed, self.sampler.epoch) if self.sampler is not None else (pos, 0)
            seeds = sample_seeds(self.seed, epoch, np.arange(start, start + len(order)))
            self.feed.batches = [(order[i : i + self.batch_size], seeds[i : i + self.batch_size])
                                 for i in range(0, stop, self.batch_size)]
            pipe = self._pipeline()
            pipe.reset()
            finished, k = False, 0
            try:
                while True:
                    try:
                        out = pipe.run()
                    except StopIteration:
                        finished = True
                        return
                    except BadInputError:
                        self.pipe = None
                        raise
                    except RuntimeError as exc:  # a decode failure inside DALI: find and name the file
                        self.pipe = None
                        found = self._culprit(k)
                        if found is None:
                            raise RuntimeError(f"DALI failed on a batch of {self.files.name}: {exc}") from exc
                        path, why = found
                        if not self.feed.skip_bad:
                            raise BadInputError(f"{why} (data.skip_bad=true skips such items)") from exc
                        self.feed.bad[path] = why
                        break  # rebuild and resume from the sampler's position: no batch is lost or repeated
                    x = to_torch(out[0], self.device)
                    y = to_torch(out[1], self.device).view(-1)
                    if self.channels_last:
                        x = x.permute(0, 3, 1, 2)  # HWC output: an NCHW view in channels_last memory
                    if self.sampler is not None:
                        self.sampler.advance(len(y))
                    pos += len(y)
                    k += 1
                    yield x, y
            finally:
                if not finished:
                    self.pipe = None  # left mid-epoch: prefetched batches are stale, start afresh next time
