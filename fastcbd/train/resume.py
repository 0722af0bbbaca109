"""What a resume may and may not change, and the records written after the checkpoint it resumes from.

A resumed run continues bit-exactly only with the settings its checkpoint was written with. A setting that
changes the result (anything but logging and checkpoint cadence) refuses the resume, naming the keys,
unless the user passes `--allow-config-change` (then it is logged). `trim_records` drops what a killed run
appended to metrics.jsonl after its last checkpoint, so a resumed run writes each record once.
"""
from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("fastcbd")

# keys that cannot change a result: logging and checkpoint cadence (output paths are not config keys)
NEUTRAL = ("log_every", "checkpoint.every", "checkpoint.keep", "student.cache_dir")  # a cache is checked by its key


class ConfigChanged(ValueError):
    """A resume whose config differs from its checkpoint's in a key that changes the result."""


def diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(key, old, new) for every leaf that differs between two nested config dicts (tuples = lists)."""
    old, new = json.loads(json.dumps(old or {})), json.loads(json.dumps(new or {}))
    return _diff(old, new, prefix)


def _diff(old: dict, new: dict, prefix: str) -> list:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


def check_config(old: dict, new: dict, where: str, allow: bool = False) -> None:
    """Refuse (ConfigChanged) a resume of `where` whose config `new` differs from `old` in a key that changes
    the result; with allow=True log it instead. Neutral keys are logged at info level."""
    changes = diff(_with_defaults(old or {}, new or {}), new)
    neutral = [c for c in changes if c[0] in NEUTRAL]
    blocking = [c for c in changes if c[0] not in NEUTRAL]
    if neutral:
        log.info("%s: resuming with other %s", where, _fmt(neutral))
    if not blocking:
        return
    if allow:
        log.warning("%s: resuming with a different config (--allow-config-change; the result will differ from an "
                    "uninterrupted run): %s", where, _fmt(blocking))
        return
    raise ConfigChanged(f"{where} was written with a different config: {_fmt(blocking)}. Resume with the same "
                        "settings, use a new --out folder, or pass --allow-config-change")


def _with_defaults(old: dict, new: dict) -> dict:
    """`old` with the keys of `new` that it lacks filled in with their defaults: an older run's config has no
    key a newer fastcbd added, which is no change when the new value is the default."""
    from fastcbd.train.config import Config, to_dict

    def fill(o, n, d):
        out = dict(o)
        for k, v in n.items():
            if k not in o and k in d:
                out[k] = d[k]
            elif isinstance(v, dict) and isinstance(o.get(k), dict) and isinstance(d.get(k), dict):
                out[k] = fill(o[k], v, d[k])
        return out

    return fill(old, new, to_dict(Config()))


def _fmt(changes) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:12]) + (" ..." if len(changes) > 12 else "")


def trim_records(path: str | None, stage: str, step: int, epoch: int, epoch_done: bool) -> int:
    """Drop the records of `stage` that a run wrote to `path` (metrics.jsonl) after its checkpoint at
    `step` (in `epoch`, finished or not): step records after `step`, epoch records of later epochs (and of
    `epoch` itself when the checkpoint was taken mid-epoch). Returns how many were dropped."""
    if not path or not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            keep.append(line)  # not ours to judge (a partial last line is dropped below)
            continue
        if isinstance(rec, dict) and rec.get("stage") == stage and _after(rec, step, epoch, epoch_done):
            continue
        keep.append(line)
    if keep and not keep[-1].endswith("\n"):  # a line cut by the kill
        keep.pop()
    dropped = len(lines) - len(keep)
    if dropped:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
        log.info("%s: %d record(s) of %s written after its checkpoint at step %d removed", path, dropped, stage, step)
    return dropped


def _after(rec: dict, step: int, epoch: int, epoch_done: bool) -> bool:
    if rec.get("kind") == "step":
        return int(rec.get("step", 0)) > step
    e = int(rec.get("epoch", -1))
    return e > epoch or (e == epoch and not epoch_done)
