"""GPU JPEG decode without DALI: torchvision's batched nvJPEG decode, then crops, then batched augmentation.

One batch: read the files' bytes (a small thread pool, a few batches ahead of the decode) -> one
`decode_jpeg(list, device=...)` call (nvJPEG on a CUDA device, libjpeg-turbo on the CPU) -> per image,
a random-resized crop (+ flip) to a fixed size, or for evaluation the short side resized then a centre
crop, into one uint8 batch on the device -> the aug teachers' colour jitter / grayscale and the
normalisation as batched tensor ops. The same samplers, batch format and checkpoint as the torch and
DALI loaders; the crop boxes and flips are drawn from the loader's own CPU generator, which the
checkpoint holds, so a resumed run gets the same batches, pixel for pixel.

One bad file fails a whole batched decode, so a failed batch is decoded again file by file to name the
file; a file nvJPEG refuses (CMYK, an unusual JPEG) or that is not a JPEG is decoded on the CPU
(`fastcbd.data.decode.decode_rgb`, PIL fallback) before it is called bad.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from fastcbd.data.augment import AugmentConfig, normalize_, photometric
from fastcbd.data.batch_resize import resized_crops
from fastcbd.data.decode import JPEG_SOI, check_bytes, decode_rgb
from fastcbd.data.files import BadInputError, ImageFiles
from fastcbd.data.samplers import SampledLoader
from fastcbd.data.torch_loader import substitutes

log = logging.getLogger("fastcbd")
ATTEMPTS = 10  # random-resized-crop draws per image before the centre-crop fallback (torchvision's count)
SKIP_HINT = " (data.skip_bad=true skips such items)"


def read_encoded(path: str) -> torch.Tensor:
    """(N,) uint8 CPU tensor of the file's bytes (writable, no copy); BadInputError naming `path` for an
    unreadable, empty or truncated file (fastcbd.data.decode.check_bytes)."""
    try:
        with open(path, "rb") as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            n = f.readinto(buf)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror})") from exc
    if n != len(buf):  # the file changed size while being read
        del buf[n:]
    check_bytes(buf, path)
    return torch.frombuffer(buf, dtype=torch.uint8)


def decode_jpegs(datas: list[torch.Tensor], device) -> list[torch.Tensor]:
    """One batched decode_jpeg call: (N_i,) uint8 CPU tensors -> (3, H_i, W_i) uint8 RGB on `device`
    (nvJPEG for cuda). Raises RuntimeError if any image fails: no partial result."""
    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision 0.29 deprecates its codecs for torchcodec (not installed); silenced here only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=torch.device(device))


def decode_one(data: torch.Tensor, path: str, device) -> torch.Tensor:
    """(3, H, W) uint8 on `device`: the device decoder, else the CPU one (PIL fallback included);
    BadInputError naming `path` when neither can decode it."""
    if bytes(data[:2].numpy()) == JPEG_SOI:
        try:
            return decode_jpegs([data], device)[0]
        except (RuntimeError, ValueError):
            pass
    return decode_rgb(bytes(data.numpy()), path).to(device)


def decode_batch(datas: list[torch.Tensor], paths: list[str], device) -> list[torch.Tensor | BadInputError]:
    """Decode a batch on `device`: one batched call for the JPEGs; if it fails, file by file. Returns, in
    order, (3, H_i, W_i) uint8 images, with a BadInputError naming the file in place of each bad one."""
    out: list[torch.Tensor | BadInputError | None] = [None] * len(datas)
    jpegs = [k for k, d in enumerate(datas) if bytes(d[:2].numpy()) == JPEG_SOI]
    if jpegs:
        try:
            for k, img in zip(jpegs, decode_jpegs([datas[k] for k in jpegs], device)):
                out[k] = img
        except (RuntimeError, ValueError):
            pass  # which file? the loop below finds out
    for k, img in enumerate(out):
        if img is None:
            try:
                img = decode_one(datas[k], paths[k], device)
            except BadInputError as exc:
                img = exc
        if isinstance(img, torch.Tensor) and img.numel() == 0:  # a zero-sized header, should a decoder take it
            img = BadInputError(f"{paths[k]}: empty image {tuple(img.shape)}")
        out[k] = img
    return out


def crop_boxes(sizes: torch.Tensor, aug: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Random-resized-crop boxes and flips of n images: sizes (n, 2) int64 (H, W) -> (n, 5) int64 rows
    (top, left, h, w, flip). torchvision's RandomResizedCrop.get_params per image (ATTEMPTS tries of a
    scale and log-uniform ratio, else the centre crop clamped to the ratio range), vectorised, with a
    fixed number of draws from `gen` (a CPU generator) per image whatever the image sizes."""
    n = len(sizes)
    u = torch.rand((n, ATTEMPTS, 4), generator=gen, dtype=torch.float64)
    flip = torch.rand(n, generator=gen, dtype=torch.float64) < 0.5
    H, W = sizes[:, :1].double(), sizes[:, 1:].double()
    (s0, s1), (r0, r1) = aug.crop_scale, aug.crop_ratio
    area = H * W * (s0 + u[..., 0] * (s1 - s0))
    ratio = torch.exp(math.log(r0) + u[..., 1] * (math.log(r1) - math.log(r0)))
    w, h = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.to(torch.int8).argmax(1, keepdim=True)  # the first valid try (argmax returns the first maximum)
    h, w, uy, ux = (t.gather(1, first).squeeze(1) for t in (h, w, u[..., 2], u[..., 3]))
    H, W = H.squeeze(1), W.squeeze(1)
    top, left = torch.floor(uy * (H - h + 1)), torch.floor(ux * (W - w + 1))
    # no valid try: the whole image, cut to the nearest ratio in range, centred
    lo, hi = min(aug.crop_ratio), max(aug.crop_ratio)
    fw = torch.where(W / H > hi, torch.round(H * hi), W)
    fh = torch.where(W / H < lo, torch.round(W / lo), H)
    none = ~ok.any(1)
    h, w = torch.where(none, fh, h), torch.where(none, fw, w)
    top = torch.where(none, torch.div(H - h, 2, rounding_mode="floor"), top)
    left = torch.where(none, torch.div(W - w, 2, rounding_mode="floor"), left)
    return torch.stack([top, left, h, w, flip.double() if aug.flip else torch.zeros(n, dtype=torch.float64)], 1).long()


class NvjpegLoader(SampledLoader):
    """Yields (images (B, 3, S, S) float32 normalised, labels (B,) int64) on `device`.

    files: an ImageFiles split; sampler=None: sequential order (evaluation). train: random-resized crop
    (+ flip) to `size` with `aug`'s crop ranges, its photometric part batched on the device; eval: short
    side to `resize`, centre crop `size`. workers: threads reading files ahead (0: read in the loop).
    skip_bad: a bad file is logged and replaced by another image of its class (train) or dropped (eval);
    without it the first bad file raises BadInputError naming it.
    """

    def __init__(self, files: ImageFiles, batch_size: int, *, sampler=None, train: bool = True,
                 aug: AugmentConfig | None = None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 device="cpu", seed: int = 0, drop_last: bool = False, channels_last: bool = False,
                 workers: int = 2, skip_bad: bool = False, size: int = 224, resize: int = 256, prefetch: int = 2):
        self.files, self.labels = files, np.asarray(files.labels)
        self.batch_size, self.sampler, self.train, self.drop_last = int(batch_size), sampler, train, drop_last
        self.aug, self.crop = aug, aug or AugmentConfig()
        self.device = torch.device(device)
        self.size, self.resize, self.seed = int(size), int(resize), seed
        self.workers, self.prefetch, self.skip_bad = int(workers), max(int(prefetch), 1), skip_bad
        self.mean = torch.tensor(mean, device=self.device) * 255
        self.std = torch.tensor(std, device=self.device) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.gen = torch.Generator(device=self.device)  # photometric draws, on the device
        self.crop_gen = torch.Generator()  # crop boxes and flips, on the CPU (their values index the images)
        self._resume_crop = None
        self.others = substitutes(self.labels) if skip_bad and train else None
        self.bad: dict[str, str] = {}  # path -> why, so a later epoch does not decode a known bad file again
        self.skipped: list[str] = []

    def state_dict(self) -> dict:
        """Both generators' states (taken between batches): resuming replays the same crops."""
        return {"gen": self.gen.get_state(), "crop_gen": self.crop_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._resume_gen, self._resume_crop = state["gen"], state.get("crop_gen")

    def _seed(self) -> None:
        state = (self.seed, self.sampler.epoch, self.sampler.consumed) if self.sampler is not None else (self.seed,)
        self.gen.manual_seed(hash(state) % (2**62))
        self.crop_gen.manual_seed(hash(state + (1,)) % (2**62))
        if self._resume_gen is not None:  # a checkpoint's generator states, taken mid-epoch
            self.gen.set_state(self._resume_gen)
            if self._resume_crop is not None:
                self.crop_gen.set_state(self._resume_crop)
            self._resume_gen = self._resume_crop = None

    def _read(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        path = self.files.paths[i]
        if path in self.bad:
            return None, self.bad[path]
        try:
            return read_encoded(path), None
        except BadInputError as exc:
            return None, str(exc)

    def _bad(self, path: str, why: str) -> None:
        if not self.skip_bad:
            raise BadInputError(why + SKIP_HINT)
        if path not in self.bad:
            self.bad[path] = why
            self.skipped.append(why)
            log.warning("skipped a bad image: %s", why)

    def _stand_in(self, i: int, why: str) -> torch.Tensor | None:
        """Bad image i: another decodable image of its class (train), or None (eval, or none left)."""
        self._bad(self.files.paths[i], why)
        for j in self.others(i) if self.others else []:
            data, why = self._read(j)
            if why is None:
                img = decode_batch([data], [self.files.paths[j]], self.device)[0]
                if isinstance(img, torch.Tensor):
                    return img
                why = str(img)
            self._bad(self.files.paths[j], why)
        return None

    def _transform(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(3, H_i, W_i) uint8 images -> (n, 3, S, S) float32 normalised batch."""
        s = self.size
        shape, fmt = (len(images), 3, s, s), self.memory_format
        if self.train:
            boxes = crop_boxes(torch.tensor([img.shape[-2:] for img in images]), self.crop, self.crop_gen)
            if self.device.type == "cuda":  # a few batched GEMMs, not ~6 launches an image (batch_resize.py)
                x = torch.empty(shape, dtype=torch.float32, device=self.device, memory_format=fmt)
                resized_crops(images, boxes, s, x)
            else:  # on the CPU torchvision's per-image kernels are the faster
                x = torch.empty(shape, dtype=torch.uint8, device=self.device, memory_format=fmt)
                for k, (img, (top, left, h, w, flip)) in enumerate(zip(images, boxes.tolist())):
                    img = TF.resized_crop(img, top, left, h, w, [s, s], antialias=True)
                    x[k].copy_(img.flip(-1) if flip else img)
        else:
            x = torch.empty(shape, dtype=torch.uint8, device=self.device, memory_format=fmt)
            for k, img in enumerate(images):
                x[k].copy_(TF.center_crop(TF.resize(img, self.resize, antialias=True), [s, s]))
        x = x.float()
        aug = self.aug
        if self.train and aug is not None and (aug.color_jitter > 0 or aug.grayscale_p > 0):
            x = photometric(x / 255, aug, self.gen) * 255
        return normalize_(x.contiguous(memory_format=self.memory_format), self.mean, self.std)

    def _batch(self, idx: np.ndarray, reads) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        images: list[torch.Tensor | None] = [None] * len(idx)
        todo = []
        for k, (data, why) in enumerate(reads):
            if why is None:
                todo.append(k)
            else:
                images[k] = self._stand_in(int(idx[k]), why)
        if todo:
            paths = [self.files.paths[int(idx[k])] for k in todo]
            for k, img in zip(todo, decode_batch([reads[k][0] for k in todo], paths, self.device)):
                images[k] = img if isinstance(img, torch.Tensor) else self._stand_in(int(idx[k]), str(img))
        keep = [k for k, img in enumerate(images) if img is not None]
        if not keep:
            return None, None
        y = torch.from_numpy(self.labels[idx[keep]]).to(self.device, non_blocking=True)
        return self._transform([images[k] for k in keep]), y

    def _batches(self) -> list[np.ndarray]:
        order = self._order()
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        return [order[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def __iter__(self):
        self._seed()
        batches = deque(self._batches())
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fastcbd-read") if self.workers > 0 else None
        ahead: deque = deque()  # (indices, futures of (bytes, why)) of the batches being read

        def read_next():
            if batches:
                idx = batches.popleft()
                ahead.append((idx, [pool.submit(self._read, int(i)) for i in idx]))

        try:
            if pool is not None:
                for _ in range(self.prefetch):
                    read_next()
            while ahead or batches:
                if pool is None:
                    idx = batches.popleft()
                    reads = [self._read(int(i)) for i in idx]
                else:
                    idx, futures = ahead.popleft()
                    read_next()
                    reads = [f.result() for f in futures]
                x, y = self._batch(idx, reads)
                if self.sampler is not None:
                    self.sampler.advance(len(idx))
                if x is not None:
                    yield x, y
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
