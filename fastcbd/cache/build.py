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
from fastcbd.data.arrays import ArraySplits
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


def view_loader(ctx):
    """The student's training loader (vanilla augmentation) that cuts the stored views: the DeviceLoader
    (in-memory arrays) or the torch DataLoader over image files; the others are refused with the reason."""
    from fastcbd.train.stages import augment_config

    return servable(ctx, ctx._loader(True, 1, aug=augment_config(ctx.cfg, "vanilla")))


def servable(ctx, loader):
    """`loader` if the cache can serve it (DeviceLoader, or TorchLoader over image files), else the reason."""
    from fastcbd.data.torch_loader import FileImages, TorchLoader

    if ctx.cfg.data.skip_bad:
        raise ConfigError("student.teacher_cache with data.skip_bad=true: a cached view belongs to its own image, "
                          "so bad images cannot be stood in for; remove them (fastcbd data-stats --verify lists them)")
    if isinstance(loader, DeviceLoader) or (isinstance(loader, TorchLoader) and isinstance(loader.dataset, FileImages)):
        return loader
    hint = ("data.loader=torch for image files" if not isinstance(ctx.splits, ArraySplits) else
            "data.loader=device for in-memory arrays")
    raise ConfigError(f"student.teacher_cache: the cache works with in-memory data (device loader) and image files "
                      f"(torch loader); data.loader={ctx.cfg.data.loader!r} gives {type(loader).__name__} here: "
                      f"set {hint}, or student.teacher_cache=0")


def _views(ctx, loader, cache, batch_size: int):
    """(chunk, rows (a range), views (B, C, H, W) normalised on the device, boxes drawn or None) for every
    batch of this rank's unfinished chunks, in row order; a batch never straddles two chunks."""
    image_of_row = np.repeat(np.arange(len(cache.offsets) - 1), np.diff(cache.offsets))
    chunk, total = int(cache.meta["chunk_rows"]), int(cache.meta["rows"])
    todo = [range(r0, min(r0 + batch_size, (c + 1) * chunk, total))
            for c in range(D.rank(), len(cache.done), D.world_size()) if not cache.done[c]
            for r0 in range(c * chunk, min((c + 1) * chunk, total), batch_size)]
    if isinstance(loader, DeviceLoader):
        for rows in todo:
            idx = torch.from_numpy(image_of_row[rows.start : rows.stop]).to(ctx.device)
            x = loader.view(idx, torch.from_numpy(np.array(cache.params[rows.start : rows.stop])).to(ctx.device))
            yield rows.start // chunk, rows, x, None
        return
    from fastcbd.cache.files import StoredViews, view_batches

    views = StoredViews(loader.dataset, None, int(cache.meta["seed"]))
    batches = [[(int(image_of_row[r]), r) for r in rows] for rows in todo]
    for rows, (x, _, got, boxes) in zip(todo, view_batches(loader, views, batches, int(cache.meta["seed"]))):
        assert got[0] == rows.start and got[-1] == rows.stop - 1
        yield rows.start // chunk, rows, x, boxes


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
    exists = os.path.exists(os.path.join(folder, "cache.json"))
    _barrier()  # every rank has looked before rank 0 may lay a new cache out: they all take the same branch
    if exists:
        cache = store.TeacherCache(folder, mode="r+")
        diff = store.key_differences(cache.key, key) + (
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
            from fastcbd.train.stages import augment_config

            if isinstance(loader, DeviceLoader):  # image files: each worker draws its row's box as it decodes
                params = draw_crop(rows, augment_config(ctx.cfg, "vanilla"), torch.Generator().manual_seed(int(seed)),
                                   "cpu").numpy()
            else:
                params = np.zeros((rows, 5), np.float32)
            store.create(folder, key, [{**t, "dim": d} for t, d in zip(teacher_ids, dims)], offsets, params, seed,
                         chunk_rows)
        _barrier()
        cache = store.TeacherCache(folder, mode="r+")

    t0 = time.perf_counter()
    run = ensemble(teachers, ctx.cfg.teacher.batched)
    delay = float(os.environ.get("FASTCBD_STEP_DELAY", "0") or 0)
    for c, rows, x, boxes in _views(ctx, loader, cache, batch_size):
        with autocast_context(ctx.device, ctx.cfg.amp):
            feats = torch.cat([f.float() for f in run(x)], 1)
        cache.features[rows.start : rows.stop] = feats.to(torch.float16).cpu().numpy()
        if boxes is not None:
            cache.params[rows.start : rows.stop] = boxes.numpy().astype(np.float32)
        if rows.stop == min((c + 1) * cache.meta["chunk_rows"], cache.meta["rows"]):  # the chunk's last batch
            cache.features.flush()
            cache.params.flush()
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
