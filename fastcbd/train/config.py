"""Run configuration: dataclass defaults < YAML file (--config) < dotted overrides (train.lr=0.1).

An unknown key, a value of the wrong type and a file that is not a YAML mapping raise ConfigError
(fastcbd.errors) naming the file and the key; the resolved config is written next to the outputs.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import yaml

from fastcbd.errors import ConfigError


@dataclass
class DataConfig:
    dataset: str = "mnist-lt"  # mnist-lt | npz | cifar10-lt | cifar100-lt | imagenet-lt | places-lt | inat18 | imagefolder
    path: str = ""  # the .npz file when dataset = npz
    root: str = ""  # CIFAR pickle batches, or the folder image paths are relative to
    train_list: str = ""  # list file (imagenet-lt, places-lt), COCO JSON (inat18) or folder (imagefolder: train)
    test_list: str = ""  # the same for the test split (imagefolder: val, else test)
    num_classes: int = 0  # list files: C; 0 = max training label + 1
    rho: float = 100.0  # imbalance factor of MNIST-LT and CIFAR-LT
    split: str = "test"  # test | val (mnist-lt, cifar*-lt: held out of the training pool, for tuning)
    batch_size: int = 128
    image_size: int = 224  # image files: training crop and evaluation centre crop (after resizing to 256/224 of it)
    loader: str = "auto"  # auto | dali | device | torch | nvjpeg (auto: arrays device; GPU dali, else nvjpeg; CPU torch)
    workers: int = -1  # DataLoader workers / DALI threads; -1 = the CPU cores this process may use
    skip_bad: bool = False  # skip (count and log) bad images and list lines instead of stopping


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"  # small_cnn | convnet3 | resnet32 | resnet18 | resnet50 | timm:<name> (fastcbd[timm])
    sigma: float = 20.0  # cosine-classifier scale
    width: int = 16  # small_cnn (16 -> 64 features) or convnet3 channel width
    timm_kwargs: dict = field(default_factory=dict)  # timm:<name>: more timm.create_model arguments, e.g.
    # '{patch_size: 7, embed_dim: 192, depth: 6}' (in_chans and img_size follow the data)
    weights: str = ""  # timm:<name>: local initial weights (.safetensors or a state dict); never downloaded


@dataclass
class AugConfig:
    crop_scale: tuple = (0.6, 1.0)  # area fraction; 28x28 digits lose their identity below ~0.5
    crop_ratio: tuple = (0.75, 1.3333333)
    pad: int = 0  # > 0: random crop with this zero padding instead of the resized crop (CIFAR: 4)
    flip: bool = False  # digits are not mirror-symmetric; set true for natural images (CIFAR, ImageNet)
    color_jitter: float = 1.0  # strength of the aug teachers' SimCLR jitter (p = 0.8)
    grayscale_p: float = 0.2  # aug teachers' grayscale probability (no-op on gray images)


@dataclass
class OptimConfig:
    epochs: int = 150
    lr: float = 0.2  # base lr for a batch of 256: lr = lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 5e-4  # applied as PyTorch weight_decay = wd / 2 (DESIGN.md §1.1)
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    accum: int = 1  # micro-batches of data.batch_size per optimizer step (lr scales with the whole batch)
    ema: float = 0.0  # > 0: keep an exponential moving average of the weights (this decay) and return it
    optimizer: str = "sgd"  # sgd | apex (NVIDIA apex's FusedSGD, GPU, only where apex is installed)


@dataclass
class TeacherConfig:
    kinds: tuple = ("vanilla", "vanilla", "aug", "aug")
    optim: OptimConfig = field(default_factory=OptimConfig)
    batched: str = "auto"  # the student's teachers: on = one vmapped module (one architecture), off = a loop,
    # auto = off (the loop; see fastcbd/train/ensemble.py and benchmarks/results/train.csv)


@dataclass
class StudentConfig:
    alpha: float = 0.4
    beta: float = 100.0
    sampler: str = "balanced"  # balanced (CBD) | sqrt | progressive (instance -> balanced over the epochs) | instance
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher_cache: int = 16  # V > 0: the teachers run once over V stored views per image (fastcbd.cache) and the
    # students train from the stored features; 0 = live teachers in every step. The demo's 16 (balanced) matched
    # live teachers' accuracy in 0.65x their student-stage time (benchmarks/results/cache.csv); the published
    # recipes (configs/*/cbd_ens.yaml) keep live teachers
    cache_allot: str = "balanced"  # uniform: V views per image; balanced: N V views allotted per class in
    # proportion to class-balanced sampling's draws (1 / n_c)
    cache_dir: str = ""  # where the cache is built or found; "" = <out>/teacher_cache


@dataclass
class BaselineConfig:
    methods: tuple = ("ce_balanced", "crt")  # the demo's baselines; add lws, tau_norm, balanced_softmax,
    # logit_adj_loss, logit_adj_posthoc, cb_ce (fastcbd/train/baselines.py)
    tau: float = 1.0  # tau-normalisation: w_c / ||w_c||^tau
    logit_tau: float = 1.0  # logit adjustment (loss and post hoc): z + / - tau log pi
    cb_beta: float = 0.9999  # class-balanced CE: weights (1 - beta) / (1 - beta^n_c)


@dataclass
class CheckpointConfig:
    every: int = 500  # optimizer steps between checkpoints (and one at the end of each stage); 0 = only at the end
    keep: int = 3  # the newest checkpoints kept per stage


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "bf16"  # none | bf16 | fp16 (autocast; GradScaler only for fp16)
    channels_last: bool = True
    log_every: int = 20  # steps between per-step records (metrics.jsonl, TensorBoard); 0 = per epoch only
    compile: str = ""  # torch.compile backend of the training step and the teachers ("inductor", ...); "" = eager
    threads: int = 0  # torch CPU threads; 0 = torch's default
    sync_bn: bool = True  # under torchrun on GPUs: SyncBatchNorm (statistics of the global batch). PyTorch's
    # SyncBatchNorm runs on CUDA only, so on CPU (gloo) each rank normalises its own share of the batch
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    crt: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=30))
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _show(value) -> str:
    """A value as a message shows it (one line, short)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, int) and not -(10**60) < value < 10**60:  # repr() refuses ints of > 4300 digits
        return "an integer of more than 60 digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse(value: str, key: str):
    """An override's string as YAML reads it ('3' -> 3, '[a, b]' -> list, 'true' -> True)."""
    try:
        return yaml.safe_load(value)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer of > 4300 digits
        raise ConfigError(f"config key '{key}': cannot read {_show(value)} ({_yaml_problem(exc)})") from exc


def _coerce(value, template, key: str):
    """`value` (from YAML, or an override's string) as the type of the default `template`: bool, int, float,
    str, a mapping (str keys), or a tuple of the default's element type (numeric pairs keep their length).
    ConfigError naming the key otherwise: a mapping or list where a scalar is expected, a non-integer for an
    int, NaN or inf, null."""
    if isinstance(value, str) and not isinstance(template, str):
        value = _parse(value, key)
    if isinstance(template, bool):
        if isinstance(value, str) and value.lower() in BOOLS:
            return BOOLS[value.lower()]
        if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
            return bool(value)
        raise ConfigError(f"config key '{key}': expected a boolean, got {_show(value)}")
    if isinstance(template, (int, float)):
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}': expected a finite number, got {value}")
        if ok and isinstance(template, int):
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"config key '{key}': expected a number (an integer), got {value}")
            if not -(2**63) <= value < 2**63:
                raise ConfigError(f"config key '{key}': {_show(value)} is too large")
            return int(value)
        if ok and abs(value) < 2.0**1023:
            return float(value)
        raise ConfigError(f"config key '{key}': expected a number" + (" that fits a float" if ok else "")
                          + f", got {_show(value)}")
    if isinstance(template, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {_show(value)}")
        if template and not isinstance(template[0], str) and len(value) != len(template):
            raise ConfigError(f"config key '{key}': expected a list of {len(template)} numbers, got {_show(value)}")
        return tuple(_coerce(v, template[0], f"{key}[{i}]") for i, v in enumerate(value)) if template else tuple(value)
    if isinstance(template, dict):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key '{key}': expected a mapping of names to values, got {_show(value)}")
        return dict(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML `path: 2024`
        return str(value)
    hint = " (YAML reads on/off/yes/no as booleans: quote it)" if isinstance(value, bool) else ""
    raise ConfigError(f"config key '{key}': expected a string, got {_show(value)}{hint}")


def _default(f: dataclasses.Field, current):
    """A field's default: the type `_coerce` casts to (the current value may be a tuple emptied by an override)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else current


def merge(cfg, updates: dict, prefix: str = ""):
    """Apply a nested dict of updates to a dataclass in place; ConfigError naming the key for an unknown key,
    a value where a section is expected or a value of the wrong type."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for key, value in (updates or {}).items():
        path = f"{prefix}{key}"
        if not isinstance(key, str) or key not in fields:
            raise ConfigError(f"unknown config key {path!r} (known at this level: {', '.join(sorted(fields))})")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' is a section; give its fields, got {_show(value)}")
            merge(current, value, path + ".")
        else:
            setattr(cfg, key, _coerce(value, _default(fields[key], current), path))
    return cfg


KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII)


def parse_overrides(items) -> dict:
    """['train.lr=0.1', 'seed=3'] -> {'train': {'lr': '0.1'}, 'seed': '3'}; a later override of a key wins.
    ConfigError for an item that is not `dotted.key=value`, or that sets a key inside one an earlier item set."""
    out: dict = {}
    for item in items or []:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {_show(item)} must look like key.sub=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not KEY.fullmatch(key):
            raise ConfigError(f"override {_show(item)}: {key!r} is not a config key (dotted names, e.g. teacher.optim.lr)")
        node = out
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {_show(item)}: an earlier override gives "
                                  f"'{'.'.join(parts[: i + 1])}' a value, so it has no keys")
        node[parts[-1]] = value
    return out


def _yaml_problem(exc: Exception) -> str:
    """One line of a YAML error: where and what."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    context = getattr(exc, "context", None)
    return f"{where}{what}" + (f", {context}" if context else "")


def load_config(path: str | None = None, overrides=None, base: Config | None = None) -> Config:
    """Defaults (or `base`) < the YAML file at `path` < `overrides`; ConfigError naming the file and the key."""
    cfg = base or Config()
    if path:
        try:
            with open(path, "rb") as f:  # bytes: PyYAML detects the encoding and names a bad byte
                data = yaml.safe_load(f)
        except OSError as exc:
            raise ConfigError(f"--config {path}: cannot read ({exc.strerror})") from exc
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer of > 4300 digits
            raise ConfigError(f"--config {path}: invalid YAML ({_yaml_problem(exc)})") from exc
        except RecursionError as exc:
            raise ConfigError(f"--config {path}: invalid YAML (nested too deeply)") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: expected a mapping of config keys at the top level, got {_show(data)}")
        try:
            merge(cfg, data)
        except ConfigError as exc:
            raise ConfigError(f"--config {path}: {exc}") from exc
    merge(cfg, parse_overrides(overrides))
    check_choices(cfg)
    return cfg


CHOICES = {("amp",): ("none", "bf16", "fp16"), ("data", "loader"): ("auto", "dali", "device", "torch", "nvjpeg"),
           ("student", "sampler"): ("balanced", "sqrt", "progressive", "instance"),
           ("student", "cache_allot"): ("uniform", "balanced")}


# the smallest value of keys that are counts or factors (checked here, so that a typo is a ConfigError
# naming the key rather than an error deep in a run)
MINIMUM = {("data", "rho"): 1, ("data", "batch_size"): 1, ("data", "image_size"): 1, ("data", "num_classes"): 0,
           ("teacher", "optim", "accum"): 1, ("student", "optim", "accum"): 1, ("crt", "accum"): 1,
           ("student", "teacher_cache"): 0}


def check_choices(cfg) -> None:
    """A config key with a fixed set of values (CHOICES, data.dataset, data.split) or a smallest value
    (MINIMUM) names the key and what it may be (ConfigError) when it has another value."""
    from fastcbd.train.pipeline import DATASETS

    data = {("data", "dataset"): DATASETS, ("data", "split"): ("test", "val")}  # as pipeline.load_data words them
    for path, allowed in {**CHOICES, **data}.items():
        node = cfg
        for part in path:
            node = getattr(node, part, None)
        if node is not None and node not in allowed:
            raise ConfigError(f"config key '{'.'.join(path)}': {node!r}"
                              + (" is not one of " if path in CHOICES else ": expected one of ") + ", ".join(allowed))
    for path, low in MINIMUM.items():
        node = cfg
        for part in path:
            node = getattr(node, part, None)
        if node is not None and node < low:
            raise ConfigError(f"config key '{'.'.join(path)}': {node} is less than {low}")


def to_dict(cfg) -> dict:
    """The config as plain nested dicts and lists (YAML / JSON ready)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def resolved_lrs(cfg) -> dict:
    """The learning rates the loop uses: lr x global batch / 256, global batch = data.batch_size x accum."""
    out = {}
    for name, o in (("teacher", cfg.teacher.optim), ("student", cfg.student.optim), ("crt", cfg.crt)):
        batch = cfg.data.batch_size * o.accum
        out[name] = {"batch": batch, "lr": o.lr * batch / 256}
    return out


def save_config(cfg, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        if isinstance(cfg, Config):  # as comments, so that the file still loads with --config
            f.write("# resolved learning rates (lr x global batch / 256):\n")
            f.writelines(f"#   {name}: batch {r['batch']}, lr {r['lr']:.6g}\n" for name, r in resolved_lrs(cfg).items())
