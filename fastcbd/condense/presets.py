"""Named settings for `fastcbd condense --preset`: the published protocol, and the 2-core CPU demo; `auto`
(the default) picks the paper protocol on a GPU and the CPU preset without one."""
from __future__ import annotations

from fastcbd.errors import ConfigError

# "paper": the reference implementations' settings for ConvNet-3 at IPC 10 (DM: 20k iterations, 256 real
# images per class; DSA: 1000 networks x 10 matching steps, 50 network updates between them; MTT:
# 5000 iterations, 30 unrolled steps over 2 expert epochs; evaluation 1000 epochs, 5 models).
PAPER = {
    "dm": {"iterations": 20000, "batch_real": 256, "lr_img": 1.0},
    "gm": {"iterations": 1000, "outer_loop": 10, "inner_loop": 50, "batch_real": 256, "lr_img": 0.1},
    "mtt": {"num_experts": 10, "expert_epochs_train": 30, "iterations": 5000, "syn_steps": 30, "expert_epochs": 2,
            "max_start_epoch": 20, "lr_img": 100.0},
    "rldd": {"observer_steps": 10000, "observer_batch": 256, "iterations": 1000, "init_rounds": 3},
    "eval": {"repeats": 5, "steps": 1000},
    "teacher": {"teacher_steps": 10000, "teacher_width": 128},  # --relabel auto (relabel.train_auto_teacher)
}

# "cpu": sized so the MNIST-LT demo table (DM and DSA, +/- hierarchical, 3 seeds, baselines) runs in about
# 15 minutes on 2 CPU cores: a narrower ConvNet-3, far fewer iterations and shorter evaluation.
CPU = {
    "width": 32,
    "dm": {"iterations": 100, "batch_real": 32, "lr_img": 1.0},
    "gm": {"iterations": 5, "outer_loop": 4, "inner_loop": 5, "batch_real": 16, "lr_img": 0.1},
    "mtt": {"num_experts": 2, "expert_epochs_train": 6, "iterations": 50, "syn_steps": 10, "expert_epochs": 2,
            "max_start_epoch": 3, "lr_img": 100.0},
    # rldd on 28x28 digits: candidates are the real images (a crop loses strokes), picked for diversity alone
    # (confidence picks the typical ones), without the recovery (it lowered relabeled accuracy in every seed
    # measured; lr_img 0.01 is the gentler rate for --iterations N): the ablation in docs/condense.md
    "rldd": {"observer_steps": 300, "observer_batch": 128, "iterations": 0, "init_rounds": 3, "init_candidates": 0,
             "keep": 1.0, "lr_img": 0.01},
    "eval": {"repeats": 2, "steps": 80, "batch": 128},
    "teacher": {"teacher_steps": 1500, "teacher_width": 32},
}

PRESETS = {"paper": PAPER, "cpu": CPU}


def resolve_device(name: str) -> str:
    """--device auto: the first CUDA GPU when there is one, else the CPU."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available")
    return name


def choose_preset(requested: str, device: str) -> tuple[str, str]:
    """(preset, why): auto is the paper protocol on a GPU and the CPU preset elsewhere, where the paper
    protocol (20k DM iterations, 5 x 1000-step evaluations per set) takes hours."""
    on_gpu = device.startswith("cuda")
    if requested == "auto":
        if on_gpu:
            return "paper", f"--preset auto on {device}: the paper protocol"
        return "cpu", (f"--preset auto on {device} (no CUDA GPU): the CPU preset (narrower ConvNet, fewer iterations "
                       "and evaluation steps); the paper protocol takes hours on a CPU: --preset paper to run it")
    if requested not in PRESETS:
        raise ConfigError(f"--preset {requested!r}: expected auto, {', '.join(PRESETS)}")
    if requested == "paper" and not on_gpu:
        return "paper", f"--preset paper on {device}: the paper protocol without a GPU takes hours (see the estimate)"
    return requested, f"--preset {requested} on {device}"


def apply_preset(cfg, name: str) -> None:
    """Set the preset's values on a CondenseConfig (command-line flags are applied after)."""
    preset = PRESETS[name]
    for section in ("dm", "gm", "mtt", "rldd", "eval"):
        for k, v in preset.get(section, {}).items():
            setattr(getattr(cfg, section), k, v)
    for k, v in preset.get("teacher", {}).items():
        setattr(cfg, k, v)
    if "width" in preset:
        for section in ("dm", "gm", "mtt", "rldd", "eval"):
            getattr(cfg, section).width = preset["width"]
