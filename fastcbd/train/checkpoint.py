"""Model files: written atomically (temp file + os.replace), loaded with weights_only=True."""
from __future__ import annotations

import hashlib
import os

import torch

from fastcbd.models import Student, Teacher
from fastcbd.models.heads import LWS, LinearHead, PostHocAdjusted

FORMAT = "fastcbd.model/1"


def atomic_save(obj, path: str) -> None:
    """Write to a temp file, fsync it, rename it over `path`, fsync the folder: after a crash `path` is
    the old file or the whole new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model(path: str, model: torch.nn.Module, arch: dict, meta: dict | None = None) -> None:
    """arch: what rebuilds the network: role (teacher | student), backbone, num_classes, in_channels,
    sigma, and proj_dim for a student. Under torchrun only rank 0 writes (pass the unwrapped model)."""
    from fastcbd.train.distributed import is_main

    if not is_main():
        return
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"format": FORMAT, "arch": dict(arch), "state_dict": state, "meta": dict(meta or {})}, path)


def wrap_head(teacher: torch.nn.Module, arch: dict) -> torch.nn.Module:
    """The decoupled baselines' models around a teacher: arch["head"] is lws, tau_norm or
    logit_adj_posthoc (the weights, scales and log-prior then come from the state dict)."""
    c = arch["num_classes"]
    if arch["head"] == "lws":
        return LWS(teacher, c)
    if arch["head"] == "tau_norm":
        return LinearHead(teacher.backbone, c)
    if arch["head"] == "logit_adj_posthoc":
        return PostHocAdjusted(teacher, [1] * c, arch.get("tau", 1.0))
    raise ValueError(f"arch.head {arch['head']!r}: expected lws, tau_norm or logit_adj_posthoc")


def load_model(path: str, device="cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, the file's dict without the weights)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable fastcbd model file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fastcbd model file (format {blob.get('format') if isinstance(blob, dict) else None!r})")
    arch = blob["arch"]
    if arch["role"] == "student":
        model = Student(arch["backbone"], arch["num_classes"], arch["proj_dim"], arch["in_channels"], arch["sigma"],
                        arch.get("width", 0))
    else:
        model = Teacher(arch["backbone"], arch["num_classes"], arch["in_channels"], arch["sigma"], arch.get("width", 0))
        if arch.get("head"):
            model = wrap_head(model, arch)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match the architecture {arch}: {exc}") from exc
    model.to(device).eval()
    return model, {k: v for k, v in blob.items() if k != "state_dict"}


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Training checkpoints: everything a stage needs to continue bit-exactly (the loop writes and reads them).

CKPT_FORMAT = "fastcbd.checkpoint/1"


def rng_state() -> dict:
    """torch (CPU and every CUDA device), numpy and python RNG states, as weights_only-loadable values."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    py = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), *np_state[2:]],
            "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


class ResumeError(ValueError):
    """--resume found checkpoints but none it can read."""


class CheckpointManager:
    """`folder/step_00000123.pt`, written atomically every `every` optimizer steps and at the end; the
    newest `keep` are kept. `latest()` loads the newest readable one; an unreadable (truncated, corrupt)
    file is reported by name and the one before it is used. Unreadable files are moved aside to
    `folder/unreadable/` (never deleted), except with required=True (`--resume`) when none is readable:
    that raises ResumeError naming each file and why, and touches nothing."""

    def __init__(self, folder: str, every: int = 0, keep: int = 3, log=None, required: bool = False):
        self.folder, self.every, self.keep = folder, int(every), max(int(keep), 1)
        self.log, self.required = log, required

    def paths(self) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        names = [n for n in os.listdir(self.folder) if n.startswith("step_") and n.endswith(".pt")]
        return [os.path.join(self.folder, n) for n in sorted(names)]

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"step_{step:08d}.pt")

    def save(self, step: int, state: dict) -> str:
        path = self.path(step)
        atomic_save({"format": CKPT_FORMAT, "step": int(step), **state}, path)
        for old in self.paths()[: -self.keep]:
            os.remove(old)
        return path

    @staticmethod
    def read(path: str) -> dict:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != CKPT_FORMAT:
            raise ValueError(f"format {blob.get('format') if isinstance(blob, dict) else type(blob).__name__!r}")
        return blob

    def latest(self) -> tuple[str, dict] | tuple[None, None]:
        bad: list[tuple[str, str]] = []
        found: tuple[str, dict] | tuple[None, None] = (None, None)
        for path in reversed(self.paths()):
            try:
                found = (path, self.read(path))
                break
            except Exception as exc:  # noqa: BLE001 - any unreadable file: fall back to the previous one
                why = f"{type(exc).__name__}: {str(exc)[:200]}"
                bad.append((path, why))
                self._warn(f"checkpoint {path} is unreadable ({why}); trying the previous one")
        if bad and found[0] is None and self.required:
            raise ResumeError(f"--resume: no readable checkpoint in {self.folder}: "
                              + "; ".join(f"{p} ({why})" for p, why in bad) + ". Nothing was moved or deleted")
        if bad:
            self._move_aside([p for p, _ in bad])
        return found

    def _move_aside(self, paths: list[str]) -> None:
        from fastcbd.train.distributed import is_main

        if not is_main():
            return
        aside = os.path.join(self.folder, "unreadable")
        os.makedirs(aside, exist_ok=True)
        for p in paths:
            dest, n = os.path.join(aside, os.path.basename(p)), 1
            while os.path.exists(dest):  # an earlier file of the same name stays too
                dest, n = os.path.join(aside, f"{os.path.basename(p)}.{n}"), n + 1
            os.replace(p, dest)
        self._warn(f"{len(paths)} unreadable checkpoint(s) moved aside to {aside}: "
                   + ", ".join(os.path.basename(p) for p in paths))

    def _warn(self, msg: str) -> None:
        if self.log is not None:
            self.log.warning(msg)
