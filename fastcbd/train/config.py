"""Run configuration: dataclass defaults < YAML file (--config) < dotted overrides (train.lr=0.1).

An unknown key is an error that names it; the resolved config is written next to the outputs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import yaml


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
    backbone: str = "small_cnn"  # small_cnn | resnet32 | resnet18 | resnet50
    sigma: float = 20.0  # cosine-classifier scale
    width: int = 16  # small_cnn channel width (16 -> 64 features)


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


def _coerce(value, current, key: str):
    """Cast `value` to the type of the default `current` (YAML and the command line give strings/lists)."""
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"config key '{key}': expected a boolean, got {value!r}")
        return bool(value)
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        try:
            v = yaml.safe_load(value) if isinstance(value, str) else value
            return type(current)(v) if not (isinstance(current, int) and isinstance(v, float) and v != int(v)) else v
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config key '{key}': expected a number, got {value!r}") from exc
    if isinstance(current, tuple):
        v = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"config key '{key}': expected a list, got {value!r}")
        return tuple(v)
    return value if not isinstance(value, str) or isinstance(current, str) else yaml.safe_load(value)


def merge(cfg, updates: dict, prefix: str = ""):
    """Apply a nested dict of updates to a dataclass in place; unknown keys raise naming the key."""
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in (updates or {}).items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ValueError(f"unknown config key '{path}' (known at this level: {', '.join(sorted(names))})")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key '{path}' is a section; give its fields, got {value!r}")
            merge(current, value, path + ".")
        else:
            setattr(cfg, key, _coerce(value, current, path))
    return cfg


def parse_overrides(items) -> dict:
    """['train.lr=0.1', 'seed=3'] -> {'train': {'lr': '0.1'}, 'seed': '3'}."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | None = None, overrides=None, base: Config | None = None) -> Config:
    cfg = base or Config()
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ValueError(f"--config {path}: cannot read ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {path}: invalid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"--config {path}: expected a mapping at the top level")
        try:
            merge(cfg, data)
        except ValueError as exc:
            raise ValueError(f"--config {path}: {exc}") from exc
    merge(cfg, parse_overrides(overrides))
    check_choices(cfg)
    return cfg


CHOICES = {("amp",): ("none", "bf16", "fp16"), ("data", "loader"): ("auto", "dali", "device", "torch", "nvjpeg"),
           ("student", "sampler"): ("balanced", "sqrt", "progressive", "instance")}


def check_choices(cfg) -> None:
    """A config key with a fixed set of values names the key and the values when it has another one."""
    for path, allowed in CHOICES.items():
        node = cfg
        for part in path:
            node = getattr(node, part, None)
        if node is not None and node not in allowed:
            raise ValueError(f"config key '{'.'.join(path)}': {node!r} is not one of {', '.join(allowed)}")


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
