"""The teacher-feature cache on disk: the K frozen teachers' features of V stored views of every training image.

A cache is a folder:
  cache.json    format, key (what the features depend on), teachers (path, sha256 of the file, weights
                hash, dim), rows, seed, whether it is complete, and the seconds it took to build
  offsets.npy   (N + 1,) int64: image i's views are rows offsets[i] .. offsets[i + 1] - 1
  params.npy    (R, 5) float32: each row's crop parameters, drawn on the CPU: in-memory images
                fastcbd.data.augment.draw_crop's (drawn once), image files the pixel box (top, left, h,
                w, flip) of fastcbd.cache.files (drawn by the worker that decodes the image). Parameters,
                not seeds, so a view is the same on every device
  features.npy  (R, sum D_k) float16, memory-mapped: the teachers' features of each view, side by side in
                the teachers' order
  done.npy      (chunks,) uint8: which chunks of rows are written (a half-built cache resumes from it)

The key holds what the features depend on: the teachers' weights hashes, the dataset's fingerprint, the image
shape, the student augmentation, the precision (amp) and how many views each image has. A student that asks for a
cache built otherwise gets a ConfigError naming each field that differs; a student may use a subset of its
teachers (CBD with the first teacher of the CBD_ENS cache).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from fastcbd.errors import BadInputError, ConfigError

FORMAT = 1
CHUNK_ROWS = 4096  # rows per resumable unit of the build
FILES = ("offsets.npy", "params.npy", "features.npy", "done.npy")


def dataset_fingerprint(splits) -> str:
    """sha256 of the training images and labels (in-memory arrays), or of the training files' paths, sizes
    and labels and the crop size (image files)."""
    h = hashlib.sha256()
    if not hasattr(splits, "x_train"):
        files = splits.train
        h.update(f"size {splits.image_size}\n".encode())
        for path, label in zip(files.paths, files.labels):
            h.update(f"{path}\t{os.path.getsize(path) if os.path.exists(path) else -1}\t{int(label)}\n".encode())
        return h.hexdigest()
    for a in (splits.x_train, splits.y_train):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def weights_hash(model) -> str:
    """sha256 (16 hex digits) of a module's weights and buffers, in name order: a teacher's identity whatever
    file it was saved in (a retrained, bit-identical teacher keeps it)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def allot_views(labels: np.ndarray, num_classes: int, views: int, allot: str) -> np.ndarray:
    """(N,) int64 views per image. uniform: V each. balanced: in proportion to how often class-balanced
    sampling draws the image (1 / n_c per class), N V in all, at least one each: a rare class's images get
    many views, a frequent class's one or a few."""
    if views < 1:
        raise ConfigError(f"student.teacher_cache={views}: views per image must be >= 1 (0 turns the cache off)")
    labels = np.asarray(labels, np.int64)
    if allot == "uniform":
        return np.full(len(labels), views, np.int64)
    if allot != "balanced":
        raise ConfigError(f"student.cache_allot={allot!r}: expected uniform or balanced")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = int((counts > 0).sum())
    per_class = np.where(counts > 0, views * len(labels) / (present * np.maximum(counts, 1)), 0)
    return np.maximum(np.rint(per_class[labels]), 1).astype(np.int64)


def make_key(*, teachers: list[str], dataset: str, image_shape, aug, amp: str, views: int, allot: str) -> dict:
    aug = dataclasses.asdict(aug) if dataclasses.is_dataclass(aug) else dict(aug)
    return {"teachers": list(teachers), "dataset": dataset, "image_shape": [int(v) for v in image_shape],
            "aug": {k: list(v) if isinstance(v, tuple) else v for k, v in aug.items()}, "amp": amp,
            "views": int(views), "allot": allot}


def key_differences(built: dict, wanted: dict) -> list[str]:
    """What differs between a cache's key and a run's, one phrase each (teachers: the run's must be among
    the cache's)."""
    out = []
    missing = [t[:12] for t in wanted["teachers"] if t not in built["teachers"]]
    if missing:
        out.append(f"teachers: weights {', '.join(missing)} not in the cache (it holds "
                   f"{', '.join(t[:12] for t in built['teachers'])})")
    for field in ("dataset", "image_shape", "amp"):
        if built.get(field) != wanted[field]:
            out.append(f"{field}: cache {built.get(field)!r}, this run {wanted[field]!r}")
    for k, v in wanted["aug"].items():
        if (built.get("aug") or {}).get(k) != v:
            out.append(f"aug.{k}: cache {(built.get('aug') or {}).get(k)!r}, this run {v!r}")
    for field in ("views", "allot"):
        if built.get(field) != wanted[field]:
            out.append(f"{field}: cache {built.get(field)!r}, this run {wanted[field]!r}")
    return out


def write_json(path: str, obj: dict) -> None:
    """Atomically (temp file, fsync, rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TeacherCache:
    """An open cache folder (read-only unless mode='r+'): meta, offsets, params, features, done."""

    def __init__(self, folder: str, mode: str = "r"):
        self.folder = folder
        path = os.path.join(folder, "cache.json")
        try:
            with open(path) as f:
                self.meta = json.load(f)
            if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
                raise ValueError(f"not a format-{FORMAT} teacher cache")
            self.offsets = np.load(os.path.join(folder, "offsets.npy"))
            self.params = np.load(os.path.join(folder, "params.npy"), mmap_mode=mode)
            self.features = np.load(os.path.join(folder, "features.npy"), mmap_mode=mode)
            self.done = np.load(os.path.join(folder, "done.npy"), mmap_mode=mode)
            rows, dim = int(self.meta["rows"]), sum(int(t["dim"]) for t in self.meta["teachers"])
            if (self.offsets.ndim != 1 or int(self.offsets[-1]) != rows or self.params.shape != (rows, 5)
                    or self.features.shape != (rows, dim) or self.features.dtype != np.float16):
                raise ValueError("its arrays do not match cache.json (rows, teachers' dims)")
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise BadInputError(f"teacher cache {folder}: unreadable ({exc}); rebuild it with fastcbd cache-teachers "
                                "into an empty folder") from exc

    @property
    def key(self) -> dict:
        return self.meta["key"]

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def check(self, wanted: dict) -> None:
        diff = key_differences(self.key, wanted)
        if diff:
            raise ConfigError(f"teacher cache {self.folder} was built for other settings: {'; '.join(diff)}. "
                              "Use another folder (or delete this one) to build a new cache")
        if not self.complete:
            raise ConfigError(f"teacher cache {self.folder} is half-built ({int(np.sum(self.done))} of "
                              f"{len(self.done)} chunks); run fastcbd cache-teachers again to finish it")

    def columns(self, weights: list[str]) -> list[tuple[int, int]]:
        """The feature columns (start, stop) of the teachers with these weights hashes, in that order."""
        spans, start = {}, 0
        for t in self.meta["teachers"]:
            spans[t["weights"]] = (start, start + int(t["dim"]))
            start += int(t["dim"])
        return [spans[w] for w in weights]


def required_bytes(rows: int, dim: int) -> int:
    return rows * (2 * dim + 5 * 4) + 64 * 1024


def create(folder: str, key: dict, teachers: list[dict], offsets: np.ndarray, params: np.ndarray, seed: int,
           chunk_rows: int = CHUNK_ROWS) -> None:
    """Lay out an empty cache (features zero, no chunk done); refuses a folder without the space for it."""
    rows, dim = int(offsets[-1]), sum(int(t["dim"]) for t in teachers)
    os.makedirs(folder, exist_ok=True)
    need, free = required_bytes(rows, dim), _free_bytes(folder)
    if need > free:
        raise ConfigError(f"teacher cache {folder}: needs {need / 2**30:.2f} GiB ({len(offsets) - 1} images, {rows} "
                          f"views, {dim} features each as fp16), the file system has {free / 2**30:.2f} GiB free: "
                          "fewer views (student.teacher_cache) or another folder")
    np.save(os.path.join(folder, "offsets.npy"), offsets.astype(np.int64))
    np.save(os.path.join(folder, "params.npy"), params.astype(np.float32))
    np.lib.format.open_memmap(os.path.join(folder, "features.npy"), mode="w+", dtype=np.float16, shape=(rows, dim)).flush()
    np.save(os.path.join(folder, "done.npy"), np.zeros(-(-rows // chunk_rows), np.uint8))
    write_json(os.path.join(folder, "cache.json"), {"format": FORMAT, "key": key, "teachers": teachers, "rows": rows,
                                                    "chunk_rows": int(chunk_rows), "seed": int(seed), "complete": False})


def _free_bytes(folder: str) -> int:
    import shutil

    return shutil.disk_usage(folder).free
