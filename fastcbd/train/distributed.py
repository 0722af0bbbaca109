"""Data-parallel training through torchrun: nccl on GPUs, gloo on CPU.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `init()` joins the process group once. Each rank
draws a disjoint share of the samplers' global sequence (fastcbd.data.samplers) with
batch_size / world_size images per step, so the global batch and the lr are those of one process.
Gradients are averaged by DistributedDataParallel, metrics are all-reduced, rank 0 logs and saves.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group if launched by torchrun; returns (rank, world_size)."""
    if not launched():
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(name: str) -> torch.device:
    """auto / cuda under torchrun -> this rank's GPU (LOCAL_RANK)."""
    if launched() and torch.cuda.is_available() and name in ("auto", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def all_reduce_sum(values: dict, device: torch.device) -> dict:
    """{name: tensor or number} summed over the ranks (one collective for all of them)."""
    if world_size() == 1 or not values:
        return values
    keys = list(values)
    flat = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
    dist.all_reduce(flat)
    return {k: flat[i] for i, k in enumerate(keys)}


_control = None


def _control_group():
    """A gloo group for the loop's small CPU decisions (stop flags), so that agreeing on them never
    synchronises a GPU stream; the default group where that is gloo already."""
    global _control
    if _control is None:
        _control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _control


def agree_max(value: int) -> int:
    """The largest of every rank's `value` (all ranks must call it at the same point)."""
    if world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group())
    return int(t)


def gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank (picklable objects; all ranks must call it)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_control_group())
    return out


def broadcast_buffers(model: nn.Module) -> None:
    """Every rank takes rank 0's buffers (batch-norm running statistics)."""
    for buf in model.buffers():
        dist.broadcast(buf, 0)


def sync_batch_norm(model: nn.Module, device: torch.device) -> bool:
    """Turn the batch norms of `model` into SyncBatchNorm in place (same parameters and buffers) when
    training with several ranks on GPUs; False where it does not apply (one rank, or CPU, where
    PyTorch's SyncBatchNorm cannot run)."""
    if world_size() == 1 or device.type != "cuda":
        return False
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            sync_batch_norm(child, device)
    return True


class StepModule(nn.Module):
    """Wraps `step_fn(x, y) -> (loss, logs)` as a module holding the trained model, so that
    DistributedDataParallel sees the forward it must synchronise (the step may call model.features,
    the classifier weight, frozen teachers ...), and only the parameters that require grad."""

    def __init__(self, model: nn.Module, step_fn):
        super().__init__()
        self.model, self.step_fn = model, step_fn

    def forward(self, x, y):
        return self.step_fn(x, y)


def wrap(model: nn.Module, step_fn, device: torch.device):
    """(run(x, y) -> (loss, logs), ddp module or None): DDP over the step when world_size > 1."""
    if world_size() == 1:
        return step_fn, None
    ddp = nn.parallel.DistributedDataParallel(StepModule(model, step_fn),
                                              device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, ddp
