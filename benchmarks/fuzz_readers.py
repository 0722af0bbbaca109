"""Fuzzing the input readers: does anything but the documented user-error type escape?

    cd /work/main && .venv/bin/python benchmarks/fuzz_readers.py                 # 10,000 inputs per reader (~7 min, 2 cores)
    .venv/bin/python benchmarks/fuzz_readers.py --inputs 300 --csv ''            # smoke test, seconds
    .venv/bin/python benchmarks/fuzz_readers.py --only coco,npz --save /tmp/esc  # keep the first input of each escape

A seeded mutation fuzzer over valid seed files, one per reader: the list-file reader (`read_list`), the
COCO-JSON reader (`read_coco`), a CIFAR pickle batch (`cifar.read_batches`), a user `.npz` (`load_npz`),
a config file with overrides (`load_config`) and a model file (`checkpoint.load_model`). Each input is a
valid seed with 1-4 mutations: structural ones that keep the format (a JSON / YAML / pickle / npz / model
field replaced by a value of another type, a huge, negative or non-integer number, a key dropped or added,
an array of another dtype or rank, a label token such as `99999999999999999999`, `٣` or `1_0`, another
text encoding) and byte-level ones (bit flips, inserted `\\xff` / NUL / newline bytes, deleted, repeated
or truncated ranges).

Each input ends as one of:
  accepted    the reader returned a well-formed result (labels int64 in [0, C), config values of the
              defaults' types, a model in eval mode, ...)
  documented  it raised the documented user error: fastcbd.errors.UserError (BadInputError for data files,
              ConfigError for configs) or FileNotFoundError; `fastcbd` prints these as one line, exit 2
  escape      anything else: another exception type (the CLI shows a traceback, exit 1, as for a bug), a
              documented error whose message is not one line, or an accepted result that is not
              well-formed ("invalid result")
An input may take --timeout seconds (a hang is an escape, "timeout") and the process --memory-gb of address
space (an allocation bomb is a MemoryError escape, not a machine brought down). `non_value` counts the
escapes that are not even a ValueError (what crashed the CLI before #12 §3, when it turned every ValueError
into one line). Before fastcbd.errors existed, the documented type was fastcbd.data.files.BadInputError. One row per reader is appended to results/fuzz.csv (harness.append_rows).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import append_rows, print_table
from fastcbd.data.files import BadInputError

# fastcbd.errors.UserError; before #12 §3 (no fastcbd.errors) the documented type was files.BadInputError
DOCUMENTED = next((c for c in BadInputError.__mro__ if c.__name__ == "UserError"), BadInputError)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fuzz.csv")
READERS = ("list", "coco", "cifar", "npz", "config", "checkpoint")


class Invalid(Exception):
    """An accepted input whose result breaks the reader's contract."""


class Timeout(Exception):
    """An input that kept the reader busy for more than --timeout seconds."""


def _alarm(signum, frame):
    raise Timeout()


# --- generic mutations ---------------------------------------------------------------------------------

INTERESTING_BYTES = [b"\xff", b"\x00", b"\n", b"\r", b"\r\n", b" ", b"\t", b"-", b"9" * 20, b'"', b"{", b"[", b"]",
                     b"}", b":", b",", b"\xc3", b"\xe2\x80\xa8", b"\xef\xbb\xbf", b"0", b"\x80", b"\x7f",
                     b"9" * 5000]  # int() and str() refuse integers of more than 4300 digits


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        n = len(b)
        op = rng.randrange(7)
        if op == 0 and n:  # flip a bit
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # set a byte
            b[rng.randrange(n)] = rng.randrange(256)
        elif op == 2:  # insert an interesting run
            i = rng.randint(0, n)
            b[i:i] = rng.choice(INTERESTING_BYTES)
        elif op == 3 and n:  # delete a range
            i = rng.randrange(n)
            del b[i : i + rng.randint(1, 16)]
        elif op == 4 and n:  # repeat a range
            i = rng.randrange(n)
            b[i:i] = b[i : i + rng.randint(1, 32)]
        elif op == 5 and n:  # truncate
            del b[rng.randrange(n):]
        elif n:  # swap two chunks
            i, j = sorted(rng.randrange(n) for _ in range(2))
            k = rng.randint(1, 8)
            b[i : i + k], b[j : j + k] = b[j : j + k], b[i : i + k]
    return bytes(b)


JSON_VALUES = [None, True, False, 0, 1, -1, 2, 3, 2**31, 2**63, 2**70, -(2**70), 10**400, 1.5, -0.0, float("nan"),
               float("inf"), "", "0", "x", "3", "a/b.jpg", "\u0663", [], [1], ["x"], {}, {"id": 1}, {"a": [None]}]


def random_value(rng: random.Random):
    v = rng.choice(JSON_VALUES)
    return json.loads(json.dumps(v)) if isinstance(v, (list, dict)) else v


def mutate_tree(rng: random.Random, node, depth: int = 0):
    """A copy of a JSON-like tree with one node replaced, dropped, added or duplicated."""
    if isinstance(node, dict) and node and rng.random() < 0.8:
        node = dict(node)
        key = rng.choice(list(node))
        op = rng.randrange(5)
        if op == 0:
            node.pop(key)
        elif op == 1:
            node[rng.choice(["extra", "id", "file_name", "image_id", "category_id", key + "_"])] = random_value(rng)
        elif op == 2:
            node[key] = random_value(rng)
        else:
            node[key] = mutate_tree(rng, node[key], depth + 1)
        return node
    if isinstance(node, list) and node and rng.random() < 0.8:
        node = list(node)
        i = rng.randrange(len(node))
        op = rng.randrange(5)
        if op == 0:
            node.pop(i)
        elif op == 1:
            node.insert(i, node[i])  # a duplicate (ids, files)
        elif op == 2:
            node[i] = random_value(rng)
        else:
            node[i] = mutate_tree(rng, node[i], depth + 1)
        return node
    return random_value(rng)


# --- the readers -----------------------------------------------------------------------------------------

class Target:
    name = ""

    def __init__(self, work: str):
        self.work = work

    def make(self, rng: random.Random) -> tuple[bytes, dict]:
        """One input (file bytes) and the call's arguments."""
        raise NotImplementedError

    def run(self, path: str, args: dict):
        raise NotImplementedError


def _images(root: str, n: int) -> list[str]:
    rels = []
    for i in range(n):
        rel = os.path.join("img", f"c{i % 3}", f"{i}.jpg")
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(b"\xff\xd8not decoded by the readers\xff\xd9")
        rels.append(rel)
    return rels


def _check_split(split, c_max: int | None = None):
    y = split.labels
    if y.dtype != np.int64 or y.ndim != 1 or len(y) != len(split.paths) or len(y) == 0:
        raise Invalid(f"labels {y.dtype} {y.shape} for {len(split.paths)} paths")
    if y.min() < 0 or y.max() >= split.num_classes or (c_max and split.num_classes > c_max):
        raise Invalid(f"label range [{y.min()}, {y.max()}] with C={split.num_classes}")
    if not all(isinstance(p, str) and os.path.isfile(p) for p in split.paths):
        raise Invalid("a path that is not an existing file")


LABEL_TOKENS = ["-1", "3", "99999999999999999999", "1e3", "1.0", "\uff10", "\u0663", "+2", "1_0", "0x1", "nan",
                "-0", str(2**63), str(2**64), "\u00b2", "2\u00a0", "0\x00", "1\u2028", "07", "1 2", "9" * 5000]


class ListFile(Target):
    name = "list"

    def __init__(self, work):
        super().__init__(work)
        self.rels = _images(work, 6)

    def make(self, rng):
        lines = [f"{rel} {i % 3}" for i, rel in enumerate(self.rels)]
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(lines)) if lines else 0
            op = rng.randrange(9)
            if not lines:
                lines.append("")
            elif op == 0:
                lines[i] = lines[i].rsplit(" ", 1)[0] + " " + rng.choice(LABEL_TOKENS)  # path kept
            elif op == 1:
                lines[i] = lines[i].rsplit(" ", 1)[-1]  # no path
            elif op == 2:
                lines.insert(i, rng.choice(["", "   ", "\t", "#", "\ufeff"]))
            elif op == 3:
                lines[i] = rng.choice(["img/none.jpg 0", "/abs/none.jpg 1", "img\x00/c0/0.jpg 0", " 0", "img 0"])
            elif op == 4:
                lines.pop(i)
            elif op == 5:
                lines = []
            elif op == 6:
                lines[i] = lines[i].rsplit(" ", 1)[0]  # no label
            else:
                lines[i] = lines[i].replace(" ", rng.choice(["\t", "  ", "\u3000", " \x0b "]), 1)
        text = rng.choice(["\n", "\r\n", "\r"]).join(lines) + rng.choice(["", "\n"])
        enc = rng.choice(["utf-8"] * 6 + ["utf-8-sig", "utf-16", "latin-1"])
        data = text.encode(enc, errors="replace")
        if rng.random() < 0.5:
            data = mutate_bytes(rng, data)
        c = rng.choice([0, 0, 3, 5])
        return data, {"num_classes": c, "train": c == 0 or rng.random() < 0.5, "skip_bad": rng.random() < 0.5}

    def run(self, path, args):
        from fastcbd.data.listfile import read_list

        _check_split(read_list(path, self.work, args["num_classes"], train=args["train"], skip_bad=args["skip_bad"]))


class CocoJson(Target):
    name = "coco"

    def __init__(self, work):
        super().__init__(work)
        rels = _images(work, 6)
        self.seed = {
            "images": [{"id": 100 + i, "file_name": rel, "width": 48} for i, rel in enumerate(rels)],
            "annotations": [{"id": i, "image_id": 100 + i, "category_id": i % 3} for i in range(len(rels))],
            "categories": [{"id": c, "name": f"c{c}"} for c in range(3)],
        }

    def make(self, rng):
        tree = self.seed
        for _ in range(rng.randint(1, 3)):
            tree = mutate_tree(rng, tree)
        data = json.dumps(tree).encode(rng.choice(["utf-8"] * 8 + ["utf-16", "utf-32"]))
        if rng.random() < 0.3:
            data = mutate_bytes(rng, data)
        return data, {"categories": rng.choice([None, None, {0: 0, 1: 1, 2: 2}]), "train": rng.random() < 0.7,
                      "skip_bad": rng.random() < 0.5}

    def run(self, path, args):
        from fastcbd.data.inat import read_coco

        split, cats = read_coco(path, self.work, args["categories"], train=args["train"], skip_bad=args["skip_bad"])
        _check_split(split)
        if not isinstance(cats, dict) or len(cats) != split.num_classes:
            raise Invalid(f"category map of {len(cats)} for C={split.num_classes}")


class CifarBatch(Target):
    name = "cifar"
    N = 12

    def _value(self, rng, n):
        """A replacement for 'data' or 'labels'."""
        return rng.choice([
            lambda: np.zeros((n, 3072), rng.choice([np.int64, np.float32, np.int8, np.uint16, bool])),
            lambda: np.zeros(rng.choice([(n, 3071), (n,), (n, 32, 32, 3), (0, 3072), (n, 3072, 1), ()]), np.uint8),
            lambda: np.array([object()] * n, dtype=object) if rng.random() < 0.1 else np.arange(n, dtype=object),
            lambda: [[0] * 3072] * n, lambda: b"\x00" * 3072 * n, lambda: None, lambda: "labels",
            lambda: np.arange(n) % 10, lambda: (np.arange(n) % 10).astype(np.float64),
            lambda: [rng.choice([0, 9, 10, -1, 2**70, 10**5000, "1", None, 1.0, True, np.int64(3), [1]]) for _ in range(n)],
            lambda: list(range(n + rng.choice([-1, 1]))), lambda: [[1]] * n, lambda: {1: 2}, lambda: 10**30,
        ])()

    def make(self, rng):
        n = self.N
        batch = {b"data": np.repeat((np.arange(n) % 10).astype(np.uint8)[:, None], 3072, 1),
                 b"labels": [i % 10 for i in range(n)], b"batch_label": b"training batch 1 of 5"}
        for _ in range(rng.randint(1, 2)):
            op = rng.randrange(6)
            key = rng.choice([b"data", b"labels"])
            if not isinstance(batch, dict):
                break
            if op == 0:
                batch.pop(key, None)
            elif op == 1:
                batch[key.decode()] = batch.pop(key, None)  # str keys (re-pickled under Python 3)
            elif op in (2, 3):
                batch[key] = self._value(rng, n)
            elif op == 4:
                batch = rng.choice([[1, 2], (batch,), 7, "data", np.zeros(3), {1, 2}, None])
            else:
                batch[rng.choice([b"extra", 5, ("t",)])] = 1
        protocol = rng.choice([0, 2, 2, 4, 5])
        try:
            data = pickle.dumps(batch, protocol=protocol)
        except ValueError:  # protocol 0 writes ints as text: not one of > 4300 digits
            data = pickle.dumps(batch, protocol=2)
        if rng.random() < 0.3:
            data = mutate_bytes(rng, data)
        return data, {}

    def run(self, path, args):
        from fastcbd.data.cifar import read_batches

        x, y = read_batches(os.path.dirname(path), [os.path.basename(path)], "labels", 10)
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3) or y.dtype != np.int64 or len(x) != len(y):
            raise Invalid(f"x {x.dtype} {x.shape}, y {y.dtype} {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= 10):
            raise Invalid(f"labels in [{y.min()}, {y.max()}]")


class Npz(Target):
    name = "npz"

    def _array(self, rng, key, n):
        if key.startswith("x"):
            return rng.choice([
                lambda: np.zeros((n, 8, 8), rng.choice([np.float32, np.int64, np.int8, bool, np.uint16])),
                lambda: np.zeros(rng.choice([(n, 8), (n,), (n, 8, 8, 3, 1), (0, 8, 8), (n, 0, 8), (n, 8, 8, 0), ()]),
                                 np.uint8),
                lambda: np.array([b"x"] * n), lambda: np.array(["x"] * n), lambda: np.zeros((n, 8, 8), ">u1"),
                lambda: np.arange(n, dtype=object),
            ])()
        return rng.choice([
            lambda: np.array([rng.choice([-1, 3, 2**40, 2**62]) for _ in range(n)]),
            lambda: np.array([2**63 + 5] * n, dtype=np.uint64), lambda: np.arange(n, dtype=np.float32) % 3,
            lambda: np.arange(n + rng.choice([-1, 1])) % 3, lambda: (np.arange(n) % 3).reshape(n, 1),
            lambda: np.array([True] * n), lambda: np.arange(n, dtype=object) % 3, lambda: np.array(["0"] * n),
            lambda: np.zeros(n, np.int8), lambda: np.array(5), lambda: np.arange(n, dtype=">i8") % 3,
        ])()

    def make(self, rng):
        arrays = {"x_train": np.zeros((6, 8, 8), np.uint8), "y_train": np.array([0, 0, 1, 1, 2, 2]),
                  "x_test": np.zeros((3, 8, 8, 1), np.uint8), "y_test": np.array([0, 1, 2])}
        for _ in range(rng.randint(1, 2)):
            key = rng.choice(list(arrays) or ["x_train"])
            op = rng.randrange(4)
            if op == 0:
                arrays.pop(key, None)
            elif op == 1:
                arrays["extra"] = np.zeros(2)
            else:
                arrays[key] = self._array(rng, key, 6 if key.endswith("train") else 3)
        buf = io.BytesIO()
        (np.savez_compressed if rng.random() < 0.3 else np.savez)(buf, **arrays)
        data = buf.getvalue()
        r = rng.random()
        if r < 0.15:  # a header that claims a huge shape
            i = data.find(b"'shape': (")
            if i >= 0:
                j = i + len(b"'shape': (")
                data = data[:j] + rng.choice([b"999999999", b"99999999999999", b"-5", b"4611686018427387904"]) + data[j:]
        elif r < 0.45:
            data = mutate_bytes(rng, data)
        return data, {}

    def run(self, path, args):
        from fastcbd.data.arrays import load_npz

        d = load_npz(path)
        for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
            if x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int64 or len(x) != len(y) or len(y) == 0:
                raise Invalid(f"x {x.dtype} {x.shape}, y {y.dtype} {y.shape}")
            if y.min() < 0 or y.max() >= d.num_classes:
                raise Invalid(f"labels in [{y.min()}, {y.max()}], C={d.num_classes}")


YAML_VALUES = ["null", "~", "true", "on", "no", "1", "-1", "0", "1e3", "1.5e-3", "0x10", "1_000", ".inf", ".nan",
               "-.inf", "[1, 2]", "[]", "{a: 1}", "{}", "x", "'3'", "99999999999999999999999", "[0.5, 1.0]",
               "[vanilla, aug]", "[[1]]", "9" * 400, "9" * 5000, "", "!!binary aGk=", "&a [*a]", "[", "]", "{", ":", "- 1",
               "a: b: c"]


class ConfigFile(Target):
    name = "config"

    def __init__(self, work):
        super().__init__(work)
        import yaml

        from fastcbd.train.config import Config, to_dict

        root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
        self.seeds = []
        for sub in sorted(os.listdir(root)):
            for name in sorted(os.listdir(os.path.join(root, sub))):
                with open(os.path.join(root, sub, name)) as f:
                    self.seeds.append(yaml.safe_load(f))
        self.defaults = to_dict(Config())
        self.keys = list(_leaves(self.defaults))

    def make(self, rng):
        import yaml

        tree = rng.choice(self.seeds)
        for _ in range(rng.randint(0, 3)):
            tree = mutate_tree(rng, tree)
            if rng.random() < 0.3 and isinstance(tree, dict):  # a YAML-only value at a known key
                node, parts = tree, rng.choice(self.keys).split(".")
                for p in parts[:-1]:
                    node = node.setdefault(p, {}) if isinstance(node, dict) else {}
                if isinstance(node, dict):
                    try:
                        node[parts[-1]] = yaml.safe_load(rng.choice(YAML_VALUES))
                    except (yaml.YAMLError, ValueError):
                        pass
        try:
            data = yaml.safe_dump(tree, sort_keys=False).encode()
        except (yaml.YAMLError, ValueError):
            data = b"{}"
        if rng.random() < 0.3:
            data = mutate_bytes(rng, data)
        overrides = []
        for _ in range(rng.randint(0, 3)):
            key = rng.choice(self.keys)
            if rng.random() < 0.2:
                key = rng.choice([key + ".x", key.rsplit(".", 1)[0], "." + key, key + ".", key.replace(".", ".."),
                                  "", " " + key, key.upper(), "data", "data.path.x"])
            overrides.append(rng.choice([f"{key}={rng.choice(YAML_VALUES)}", key, f"{key}=={rng.choice(YAML_VALUES)}"]
                                        if rng.random() < 0.2 else [f"{key}={rng.choice(YAML_VALUES)}"]))
        return data, {"overrides": overrides, "file": rng.random() < 0.8}

    def run(self, path, args):
        from fastcbd.train.config import load_config, to_dict

        cfg = to_dict(load_config(path if args["file"] else None, args["overrides"]))
        for key, default in _leaves(self.defaults).items():
            value = _get(cfg, key)
            if not _same_type(value, default):
                raise Invalid(f"{key} = {value!r} ({type(value).__name__}), default {default!r}")


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _get(tree: dict, key: str):
    for p in key.split("."):
        tree = tree[p]
    return tree


def _same_type(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, float) and math.isfinite(value)
    if isinstance(default, list):
        return isinstance(value, list) and all(_same_type(v, default[0]) for v in value) if default else True
    return isinstance(value, type(default))


class ModelFile(Target):
    name = "checkpoint"

    def __init__(self, work):
        super().__init__(work)
        import torch

        from fastcbd.models import Student, Teacher

        torch.manual_seed(0)
        t = Teacher("small_cnn", 3, in_channels=1, width=2)
        s = Student("small_cnn", 3, proj_dim=4, in_channels=1, width=2)
        self.blobs = [
            {"format": "fastcbd.model/1", "arch": {"role": "teacher", "backbone": "small_cnn", "num_classes": 3,
             "in_channels": 1, "sigma": 20.0, "width": 2}, "state_dict": t.state_dict(), "meta": {"name": "t"}},
            {"format": "fastcbd.model/1", "arch": {"role": "student", "backbone": "small_cnn", "num_classes": 3,
             "in_channels": 1, "sigma": 20.0, "width": 2, "proj_dim": 4}, "state_dict": s.state_dict(),
             "meta": {"method": "cbd"}},
        ]

    def make(self, rng):
        import torch

        blob = dict(rng.choice(self.blobs))
        arch, state = dict(blob["arch"]), dict(blob["state_dict"])
        for _ in range(rng.randint(1, 2)):
            op = rng.randrange(7)
            if not isinstance(blob, dict):
                break
            if op == 0:
                arch[rng.choice(list(arch) + ["head", "proj_dim"])] = rng.choice(
                    [None, -1, 0, 2**40, 10**5000, 1.5, "x", "resnet18", "resnet9999998", "resnet" + "9" * 5000, "lws",
                     "tau_norm", True, [3], {}])
            elif op == 1:
                arch.pop(rng.choice(list(arch)))
            elif op == 2:
                key = rng.choice(list(state))
                old = state[key]
                state[key] = rng.choice([torch.zeros(3), old.double(), 5, "w", old.t() if old.ndim == 2 else None])
            elif op == 3:
                state.pop(rng.choice(list(state)))
            elif op == 4:
                blob[rng.choice(["format", "arch", "meta", "state_dict"])] = rng.choice(
                    [None, "fastcbd.model/0", 3, [1], {}, torch.zeros(2)])
            elif op == 5:
                blob.pop(rng.choice(list(blob)))
            else:
                blob = rng.choice([[1], torch.zeros(3), "x", None, {"format": "fastcbd.model/1"}])
        if isinstance(blob, dict):
            blob = {**blob, **({"arch": arch} if isinstance(blob.get("arch"), dict) else {}),
                    **({"state_dict": state} if isinstance(blob.get("state_dict"), dict) else {})}
        buf = io.BytesIO()
        torch.save(blob, buf)
        data = buf.getvalue()
        if rng.random() < 0.25:
            data = mutate_bytes(rng, data)
        return data, {}

    def run(self, path, args):
        import torch

        from fastcbd.train.checkpoint import load_model

        model, blob = load_model(path)
        if not isinstance(model, torch.nn.Module) or model.training or not isinstance(blob.get("arch"), dict) \
                or not isinstance(blob.get("meta"), dict) or "state_dict" in blob:
            raise Invalid(f"model {type(model).__name__} (training={model.training}), "
                          + ", ".join(f"{k}: {type(v).__name__}" for k, v in blob.items()))


TARGETS = {t.name: t for t in (ListFile, CocoJson, CifarBatch, Npz, ConfigFile, ModelFile)}


def fuzz(name: str, inputs: int, seed: int, save: str | None = None, timeout: int = 10) -> dict:
    work = tempfile.mkdtemp(prefix=f"fuzz_{name}_")
    try:
        target = TARGETS[name](work)
        rng = random.Random(f"{name}:{seed}")
        counts = {"accepted": 0, "documented": 0, "escapes": 0, "non_value": 0}
        first: dict[str, str] = {}
        path = os.path.join(work, "input")
        t0 = time.perf_counter()
        for k in range(inputs):
            data, args = target.make(rng)
            with open(path, "wb") as f:
                f.write(data)
            signal.alarm(timeout)  # a hang in Python code ends here; one in C code when it returns
            try:
                target.run(path, args)
                counts["accepted"] += 1
                continue
            except (DOCUMENTED, FileNotFoundError) as exc:
                if "\n" not in str(exc):
                    counts["documented"] += 1
                    continue
                kind, text, value_error = "multi-line message", repr(str(exc)[:160]), True
            except Invalid as exc:
                kind, text, value_error = "invalid result", str(exc), False
            except Timeout:
                kind, text, value_error = "timeout", f"more than {timeout} s", False
            except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                kind = type(exc).__name__
                text = f"{' '.join(str(exc).split())[:160]} (at {os.path.basename(frame.filename)}:{frame.lineno})"
                value_error = isinstance(exc, ValueError)
            finally:
                signal.alarm(0)
            counts["escapes"] += 1
            counts["non_value"] += not value_error
            if kind not in first:
                first[kind] = f"input {k}: {text}"
                if save:
                    os.makedirs(save, exist_ok=True)
                    with open(os.path.join(save, f"{name}_{kind.replace(' ', '_')}"), "wb") as f:
                        f.write(data)
                    with open(os.path.join(save, f"{name}_{kind.replace(' ', '_')}.args.json"), "w") as f:
                        json.dump({k2: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()})
                                   for k2, v in args.items()}, f)
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"reader": name, "inputs": inputs, **counts, "escape_types": len(first), "seconds": round(seconds, 1),
            "seed": seed, "documented_type": f"{DOCUMENTED.__module__}.{DOCUMENTED.__name__}", "first": first}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inputs", type=int, default=10_000, help="generated inputs per reader (default 10,000)")
    p.add_argument("--only", default=",".join(READERS), help=f"comma-separated readers ({','.join(READERS)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="write the first input of each escape type here")
    p.add_argument("--timeout", type=int, default=10, help="seconds one input may take (a hang is an escape)")
    p.add_argument("--memory-gb", type=float, default=8, help="address-space limit: an allocation bomb becomes a "
                   "MemoryError (an escape) instead of taking the machine down")
    p.add_argument("--csv", default=RESULTS, help="results CSV ('' = do not write)")
    p.add_argument("--label", default="", help="a note for the CSV rows (e.g. which code was fuzzed)")
    args = p.parse_args(argv)
    import logging

    logging.getLogger("fastcbd").setLevel(logging.ERROR)  # skip_bad logs every skipped item
    if args.memory_gb > 0:
        limit = int(args.memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    for name in args.only.split(","):
        r = fuzz(name, args.inputs, args.seed, args.save, args.timeout)
        rows.append(r)
        print(f"{name}: {r['inputs']} inputs, {r['accepted']} accepted, {r['documented']} documented errors, "
              f"{r['escapes']} escapes ({r['non_value']} not a ValueError) in {r['seconds']} s", flush=True)
        for kind, example in r["first"].items():
            print(f"    {kind}: {example}", flush=True)
    print()
    print_table(rows, ["reader", "inputs", "accepted", "documented", "escapes", "non_value", "escape_types", "seconds"])
    if args.csv:
        append_rows(args.csv, [{k: v for k, v in r.items() if k != "first"} | {"label": args.label,
            "first_escapes": " | ".join(f"{k}: {v}" for k, v in r["first"].items())[:2000]} for r in rows])
        print(f"\nappended {len(rows)} rows to {args.csv}")
    return 1 if any(r["escapes"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
