"""Model files: written atomically (temp file + os.replace), loaded with weights_only=True."""
from __future__ import annotations

import hashlib
import os

import torch

from fastcbd.models import Student, Teacher
from fastcbd.models.cbd import backbone_kwargs
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


def save_model(path: str, model: torch.nn.Module, arch: dict, meta: dict | None = None,
               info: dict | None = None) -> None:
    """arch: what rebuilds the network: role (teacher | student), backbone, num_classes, in_channels,
    sigma, image_size, timm_kwargs (timm backbones), and proj_dim for a student. info (Context.info()):
    'input' {channels, size, mean, std, resize} and 'class_names', what predict and export need; plain
    lists, numbers and strings, so the file stays loadable with weights_only=True. Under torchrun only
    rank 0 writes (pass the unwrapped model)."""
    from fastcbd.train.distributed import is_main

    if not is_main():
        return
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    extra = {k: v for k, v in (info or {}).items() if k in ("input", "class_names")}
    atomic_save({"format": FORMAT, "arch": dict(arch), "state_dict": state, "meta": dict(meta or {}), **extra}, path)


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
    """(model in eval mode, the file's dict without the weights). A file that is not a fastcbd model file
    (unreadable, another format, fields of the wrong type, weights that do not fit the arch) raises
    fastcbd.errors.BadInputError naming it and the field."""
    from fastcbd.errors import BadInputError

    def show(value, n: int = 40) -> str:
        try:
            return repr(value)[:n]
        except ValueError:  # an int of > 4300 digits
            return f"a {type(value).__name__} too large to print"

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a zip, refused by weights_only: not a model file
        raise BadInputError(f"{path}: not a readable fastcbd model file ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise BadInputError(f"{path}: not a fastcbd model file (format "
                            f"{show(blob.get('format')) if isinstance(blob, dict) else None})")
    # The arch's fields are checked before a network is built from them: a wrong type would fail deep in a
    # constructor, and a num_classes, proj_dim or depth the weights do not have would allocate (or build) a
    # network of that size first.
    for key in ("arch", "state_dict", "meta"):
        if not isinstance(blob.get(key), dict):
            raise BadInputError(f"{path}: field '{key}' must be a dict, got {type(blob.get(key)).__name__}")
    arch, state = blob["arch"], blob["state_dict"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise BadInputError(f"{path}: field 'state_dict' must map parameter names to tensors")
    student = arch.get("role") == "student"
    if arch.get("role") not in ("teacher", "student") or not isinstance(arch.get("backbone"), str):
        raise BadInputError(f"{path}: field 'arch' needs role (teacher or student) and backbone (a name), got "
                            f"{show(arch.get('role'))}, {show(arch.get('backbone'))}")
    depth = arch["backbone"][6:] if arch["backbone"].startswith("resnet") else ""
    if depth.isascii() and depth.isdigit() and (len(depth) > 4 or int(depth) > 1202):  # He et al. 2016's deepest
        raise BadInputError(f"{path}: field 'arch.backbone' {arch['backbone'][:40]!r} is deeper than resnet1202")
    for key, low in (("num_classes", 1), ("in_channels", 1), ("width", 0), *((("proj_dim", 1),) if student else ())):
        value = arch.get(key, 0) if key == "width" else arch.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 1 << 20:
            raise BadInputError(f"{path}: field 'arch.{key}' must be an integer in [{low}, {1 << 20}], "
                                f"got {show(value)}")
    for key in ("sigma", "tau"):
        value = arch.get(key, 1.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not abs(value) < 1e300:
            raise BadInputError(f"{path}: field 'arch.{key}' must be a finite number, got {show(value)}")
    if arch.get("head") not in (None, "", "lws", "tau_norm", "logit_adj_posthoc"):
        raise BadInputError(f"{path}: field 'arch.head' {show(arch['head'])}: expected lws, tau_norm or "
                            "logit_adj_posthoc")
    heads = [v.shape for k, v in state.items() if k.endswith("classifier.weight") and v.ndim == 2]
    if not any(h[0] == arch["num_classes"] and (not student or h[1] == arch["proj_dim"]) for h in heads):
        raise BadInputError(f"{path}: field 'arch' says {arch['num_classes']} classes"
                            + (f" on {arch['proj_dim']} features" if student else "")
                            + f", the classifier weights are {[tuple(h) for h in heads] or 'missing'}")
    convs = [v.shape[1] for v in state.values() if v.ndim == 4]
    if convs and arch["in_channels"] not in convs:
        raise BadInputError(f"{path}: field 'arch.in_channels' is {arch['in_channels']}, no convolution of the "
                            "weights has that many input channels")
    try:
        if arch["role"] == "student":
            model = Student(arch["backbone"], arch["num_classes"], arch["proj_dim"], arch["in_channels"], arch["sigma"],
                            arch.get("width", 0), **backbone_kwargs(arch))
        else:
            model = Teacher(arch["backbone"], arch["num_classes"], arch["in_channels"], arch["sigma"],
                            arch.get("width", 0), **backbone_kwargs(arch))
            if arch.get("head"):
                model = wrap_head(model, arch)
    except (KeyError, TypeError, ValueError) as exc:  # e.g. an unknown backbone name: the file's arch
        raise BadInputError(f"{path}: field 'arch' {show(arch, 300)} does not describe a fastcbd model "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise BadInputError(f"{path}: weights do not match the architecture {show(arch, 300)}: "
                            f"{' '.join(str(exc).split())[:300]}") from exc
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
