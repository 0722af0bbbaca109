"""One place that picks and builds the loader: `loader: auto | dali | device | torch | nvjpeg`.

auto chooses by what is true of the data and the machine (benchmarks/README.md, "Data loading"):
in-memory arrays -> the device-resident loader (no workers at all); image files with a GPU and DALI
installed -> DALI with nvJPEG decode on the GPU; image files with a GPU and no DALI -> `nvjpeg`
(torchvision's batched nvJPEG decode, fastcbd.data.nvjpeg); image files on a CPU -> the torch
DataLoader with decode_jpeg (on 2 CPU cores it beats DALI's CPU pipeline, and PIL by ~1.5x).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from fastcbd.data.arrays import ArraySplits
from fastcbd.data.augment import AugmentConfig
from fastcbd.data.device_loader import DeviceLoader
from fastcbd.errors import ConfigError

LOADERS = ("auto", "dali", "device", "torch", "nvjpeg")


def resolve_loader(name: str, splits, device: torch.device) -> str:
    """The concrete loader for `name`; an explicit choice that cannot run raises with the reason."""
    from fastcbd.data import dali

    if name not in LOADERS:
        raise ConfigError(f"data.loader={name!r}: expected one of {', '.join(LOADERS)}")
    in_memory = isinstance(splits, ArraySplits)
    if name == "auto":
        if in_memory:
            return "device"
        if device.type != "cuda":
            return "torch"
        return "dali" if dali.available() else "nvjpeg"
    if name == "device" and not in_memory:
        raise ConfigError("data.loader=device needs in-memory arrays (mnist-lt, npz, cifar*-lt); "
                         f"{splits.name} is image files: use dali, nvjpeg or torch")
    if name == "nvjpeg" and in_memory:
        raise ConfigError(f"data.loader=nvjpeg decodes image files; {splits.name} is in-memory arrays: use device or torch")
    if name == "dali":
        if in_memory:
            raise ConfigError(f"data.loader=dali reads image files; {splits.name} is in-memory arrays: use device or torch")
        dali.import_dali()  # raises with the install command
    return name


def channel_stats(splits) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1]: measured on in-memory training images, else the dataset's."""
    if isinstance(splits, ArraySplits):
        x = splits.x_train.astype(np.float32) / 255
        return x.mean(axis=(0, 1, 2)).tolist(), np.maximum(x.std(axis=(0, 1, 2)), 1e-3).tolist()
    return list(splits.mean), list(splits.std)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS)
        return os.cpu_count() or 1


def build_loader(splits, train: bool, *, batch_size: int, sampler=None, aug: AugmentConfig | None = None, mean, std,
                 device, seed: int = 0, drop_last: bool = False, channels_last: bool = False, loader: str = "auto",
                 workers: int = -1, skip_bad: bool = False, eval_resize: int | None = None):
    """The train (sampler + aug) or test (sequential) loader of `splits` (ArraySplits or FileSplits).

    Every loader yields (images (B, C, H, W) float normalised, labels (B,) int64) on `device`, has
    len() and batch_size, and advances `sampler` as batches are handed out (exact resume).
    """
    device = torch.device(device)
    kind = resolve_loader(loader, splits, device)
    workers = default_workers() if workers < 0 else workers
    common = dict(sampler=sampler, mean=mean, std=std, device=device, drop_last=drop_last, channels_last=channels_last)
    aug = aug if train else None
    if isinstance(splits, ArraySplits):
        x, y = (splits.x_train, splits.y_train) if train else (splits.x_test, splits.y_test)
        if kind == "device":
            return DeviceLoader(x, y, batch_size, aug=aug, seed=seed, **common)
        from fastcbd.data.torch_loader import ArrayImages, TorchLoader

        return TorchLoader(ArrayImages(x, y), y, batch_size, aug=aug, seed=seed, workers=workers, **common)
    files = splits.train if train else splits.test
    eval_resize = eval_resize or round(splits.image_size * 256 / 224)  # 224 -> 256, the standard eval resize
    if kind == "dali":
        from fastcbd.data.dali import DaliLoader

        return DaliLoader(files, batch_size, train=train, aug=aug, seed=seed, num_threads=max(workers, 1),
                          skip_bad=skip_bad, size=splits.image_size, resize=eval_resize, **common)
    if kind == "nvjpeg":
        from fastcbd.data.nvjpeg import NvjpegLoader

        return NvjpegLoader(files, batch_size, train=train, aug=aug, seed=seed, workers=workers, skip_bad=skip_bad,
                            size=splits.image_size, resize=eval_resize, **common)
    from fastcbd.data.torch_loader import FileImages, TorchLoader

    dataset = FileImages(files, train, splits.image_size, eval_resize, aug, skip_bad)
    return TorchLoader(dataset, files.labels, batch_size, aug=aug, seed=seed, workers=workers, **common)

