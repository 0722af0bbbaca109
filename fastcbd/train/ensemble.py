"""K frozen teachers' features in one call: a Python loop, or one batched module when the teachers share
an architecture (stacked weights, torch.func.functional_call under vmap: the convolutions become
grouped/batched kernels). Both run in eval mode under inference_mode, in the caller's autocast dtype.
benchmarks/bench_train.py measures both; `teacher.batched` picks (auto = the measured faster: loop)."""
from __future__ import annotations

import copy

import torch

from fastcbd.errors import ConfigError


def same_architecture(modules) -> bool:
    first = modules[0]
    shapes = [(n, p.shape, p.dtype) for n, p in first.state_dict().items()]
    return all(type(m) is type(first) and [(n, p.shape, p.dtype) for n, p in m.state_dict().items()] == shapes
               for m in modules[1:])


class LoopTeachers:
    """[t.features(x) for t in teachers] -> list of K (B, D_k)."""

    def __init__(self, teachers):
        self.teachers = list(teachers)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [t.features(x) for t in self.teachers]


class StackedTeachers:
    """The K teachers' backbones as one vmapped functional call: (B, C, H, W) -> list of K (B, D)."""

    def __init__(self, teachers):
        teachers = list(teachers)
        backbones = [t.backbone for t in teachers]
        if not same_architecture(backbones):
            raise ConfigError("teacher.batched=on needs teachers of one architecture (and shapes); these differ "
                              "(e.g. timm:resnet50 and timm:vit_small_patch16_224): use teacher.batched=off")
        for b in backbones:
            b.eval()
        self.params, self.buffers = torch.func.stack_module_state(backbones)
        self.base = copy.deepcopy(backbones[0]).to("meta").eval()

        def one(params, buffers, x):
            return torch.func.functional_call(self.base, (params, buffers), (x,))

        self.fn = torch.vmap(one, in_dims=(0, 0, None))

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.fn(self.params, self.buffers, x).unbind(0))


def ensemble(teachers, batched: str = "auto"):
    """batched: on | off | auto (auto = off: the loop was the faster on the 2-core CPU and on the H200, where
    4 ResNet-50 teachers ran at 2,055 img/s looped against 958 vmapped; benchmarks/results/train.csv)."""
    teachers = list(teachers)
    if batched == "on" and len(teachers) > 1:
        return StackedTeachers(teachers)
    if batched not in ("on", "off", "auto"):
        raise ConfigError(f"teacher.batched={batched!r}: expected on, off or auto")
    return LoopTeachers(teachers)
