"""Build a teacher-feature cache: the K frozen teachers run once over V stored views of every training image.

Batched, in eval mode under inference_mode, in the run's autocast precision and memory format (the same
numerics as the live teachers of a student step), written as fp16 rows into the memory-mapped store. The
rows are built in chunks; each finished chunk is flushed and marked in done.npy, so an interrupted build
continues where it stopped. Under torchrun rank r builds chunks r, r + world, ... of the same folder.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from fastcbd.cache import store
from fastcbd.data.augment import draw_crop
from fastcbd.data.device_loader import DeviceLoader
from fastcbd.errors import ConfigError
from fastcbd.train import distributed as D
from fastcbd.train.ensemble import ensemble

log = logging.getLogger("fastcbd")


def cache_key(ctx, weights: list[str], views: int, allot: str) -> dict:
    """The key of a cache of these teachers (weights hashes) under this run's data, student augmentation
    and precision."""
    from fastcbd.train.stages import augment_config

    return store.make_key(teachers=weights, dataset=store.dataset_fingerprint(ctx.splits),
                          image_shape=ctx.splits.image_shape, aug=augment_config(ctx.cfg, "vanilla"),
                          amp=ctx.cfg.amp, views=views, allot=allot)


def view_loader(ctx) -> DeviceLoader:
    """The student's training loader (vanilla augmentation), whose view() cuts the stored crops."""
    from fastcbd.train.stages import augment_config

    loader = ctx._loader(True, 1, aug=augment_config(ctx.cfg, "vanilla"))
    if not isinstance(loader, DeviceLoader):
        raise ConfigError(f"student.teacher_cache: the cache works with in-memory data and the device loader; "
                          f"{ctx.splits.name} gives data.loader={ctx.cfg.data.loader!r} -> {type(loader).__name__} "
                          "(set data.loader=device for in-memory arrays, or student.teacher_cache=0 for image files)")
    return loader


def _barrier() -> None:
    if D.world_size() > 1:
        torch.distributed.barrier()


def build_cache(ctx, teachers, teacher_ids: list[dict], views: int, folder: str, allot: str = "uniform",
                seed: int = 0, batch_size: int = 512, chunk_rows: int = store.CHUNK_ROWS) -> store.TeacherCache:
    """The complete cache of `teachers` (modules, in eval mode) in `folder`: reused if it is there with the
    same key, finished if half-built, built otherwise. teacher_ids: [{'path', 'sha256'}] in the same order
    (each gets its weights hash, store.weights_hash, in cache.json). chunk_rows: rows per resumable unit
    (a half-built cache keeps the chunking it was laid out with)."""
    from fastcbd.train.loop import autocast_context

    loader = view_loader(ctx)  # refuses data the cache cannot serve before anything is written
    teacher_ids = [{**t, "weights": store.weights_hash(m)} for t, m in zip(teacher_ids, teachers)]
    key = cache_key(ctx, [t["weights"] for t in teacher_ids], views, allot)
    if os.path.exists(os.path.join(folder, "cache.json")):
        cache = store.TeacherCache(folder, mode="r+")
        diff = store.key_differences(cache.key, key, views_fixed=True) + (
            ["teachers: the cache holds others (or in another order)"] if cache.key["teachers"] != key["teachers"] else [])
        if diff:
            raise ConfigError(f"teacher cache {folder} holds a cache built for other settings: {'; '.join(diff)}. "
                              "Use an empty folder for a new cache")
        if cache.complete:
            log.info("teacher cache %s: reused (%d views of %d images)", folder, cache.meta["rows"], len(cache.offsets) - 1)
            return store.TeacherCache(folder)
        log.info("teacher cache %s: half-built, %d of %d chunks done; continuing", folder, int(cache.done.sum()), len(cache.done))
    else:
        labels = ctx.splits.y_train
        counts = store.allot_views(labels, ctx.splits.num_classes, views, allot)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        dims = [int(t.out_features) for t in teachers]
        rows = int(offsets[-1])
        log.info("teacher cache %s: %d images x %s views x %d features (fp16) = %.3f GiB", folder, len(labels),
                 views if allot == "uniform" else f"{rows / len(labels):.1f} (balanced)", sum(dims),
                 store.required_bytes(rows, sum(dims)) / 2**30)
        if D.is_main():
            gen = torch.Generator().manual_seed(int(seed))
            from fastcbd.train.stages import augment_config

            params = draw_crop(rows, augment_config(ctx.cfg, "vanilla"), gen, "cpu").numpy()
            store.create(folder, key, [{**t, "dim": d} for t, d in zip(teacher_ids, dims)], offsets, params, seed,
                         chunk_rows)
        _barrier()
        cache = store.TeacherCache(folder, mode="r+")

    t0 = time.perf_counter()
    run = ensemble(teachers, ctx.cfg.teacher.batched)
    image_of_row = np.repeat(np.arange(len(cache.offsets) - 1), np.diff(cache.offsets))
    chunk, delay = int(cache.meta["chunk_rows"]), float(os.environ.get("FASTCBD_STEP_DELAY", "0") or 0)
    for c in range(D.rank(), len(cache.done), D.world_size()):
        if cache.done[c]:
            continue
        for r0 in range(c * chunk, min((c + 1) * chunk, len(image_of_row)), batch_size):
            r1 = min(r0 + batch_size, (c + 1) * chunk, len(image_of_row))
            idx = torch.from_numpy(image_of_row[r0:r1]).to(ctx.device)
            x = loader.view(idx, torch.from_numpy(np.array(cache.params[r0:r1])).to(ctx.device))
            with autocast_context(ctx.device, ctx.cfg.amp):
                feats = torch.cat([f.float() for f in run(x)], 1)
            cache.features[r0:r1] = feats.to(torch.float16).cpu().numpy()
        cache.features.flush()
        cache.done[c] = 1
        cache.done.flush()
        if delay:
            time.sleep(delay)
    _barrier()
    if D.is_main():
        meta = dict(cache.meta, complete=True,
                    build_seconds=round(float(cache.meta.get("build_seconds", 0)) + time.perf_counter() - t0, 2))
        store.write_json(os.path.join(folder, "cache.json"), meta)
    _barrier()
    log.info("teacher cache %s: built in %.1f s", folder, time.perf_counter() - t0)
    return store.TeacherCache(folder)
