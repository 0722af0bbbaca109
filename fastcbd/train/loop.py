"""One lean training loop: SGD + momentum, cosine schedule per step, optional autocast, checkpoints.

`step_fn(x, y) -> (loss, logs)` computes the loss of one (micro-)batch; the loop owns the optimiser,
schedule, precision, gradient accumulation, clipping, checkpoints and progress. `.item()` is only
called when a progress line is shown, a checkpoint is written or an epoch ends.

Checkpoints (`ckpt`, a CheckpointManager) hold model, optimizer, scheduler, scaler, sampler, loader
generator and RNG states, the step, the config and the caller's `meta` (e.g. the teachers' paths and
hashes); with `resume=True` the newest readable one is loaded and the run continues bit-exactly.
SIGTERM / SIGINT write a checkpoint after the current step and raise TrainingInterrupted.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time

import torch
from tqdm import tqdm

from fastcbd.errors import ConfigError
from fastcbd.ops._common import trusted_targets
from fastcbd.train import distributed as D
from fastcbd.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from fastcbd.train.config import OptimConfig
from fastcbd.train.resume import check_config, trim_records

log = logging.getLogger("fastcbd")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingInterrupted(Exception):
    """SIGTERM / SIGINT arrived; a checkpoint was written (path) and the run can be resumed."""

    def __init__(self, signum: int, step: int, path: str | None):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step}; checkpoint {path or '(none: no checkpoint folder)'}")


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


def autocast_context(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ConfigError(f"amp={amp!r}: expected none, bf16 or fp16")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def make_optimizer(params, cfg: OptimConfig, batch_size: int, total_steps: int):
    """SGD with the linear lr scaling rule and a per-step cosine decay to 0 (no warm-up)."""
    lr = cfg.lr * batch_size / 256
    kind = getattr(cfg, "optimizer", "sgd")
    if kind == "apex":
        try:
            from apex.optimizers import FusedSGD
        except ImportError as exc:
            raise ImportError(f"optimizer=apex needs NVIDIA apex with its CUDA extensions ({exc}); use optimizer=sgd") from exc
        opt = FusedSGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay / 2)
    elif kind == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay / 2)
    else:
        raise ConfigError(f"optimizer={kind!r}: expected sgd or apex")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    )
    return opt, sched


@contextlib.contextmanager
def _catch_signals(enabled: bool):
    """While enabled (and in the main thread), SIGTERM / SIGINT only set a flag the loop checks per step."""
    caught: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield caught
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in old:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _write(path: str | None, record: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _tensorboard(folder: str, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # the tensorboard package is an install requirement, but keep training without it
        log.warning("no TensorBoard scalars (%s); pip install tensorboard", exc)
        return None
    return SummaryWriter(folder, purge_step=purge_step)


def _loader_state(loader) -> dict:
    return loader.state_dict() if hasattr(loader, "state_dict") else {}


def fit(model: torch.nn.Module, step_fn, loader, sampler, cfg: OptimConfig, *, params=None, amp: str = "none",
        desc: str = "train", log_path: str | None = None, show_progress: bool = True,
        train_modules=None, ckpt: CheckpointManager | None = None, resume: bool = False,
        meta: dict | None = None, config: dict | None = None, compile: str = "", log_every: int = 0,
        tb_dir: str | None = None, sync_bn: bool = True, allow_config_change: bool = False) -> list[dict]:
    """Train for cfg.epochs epochs of `loader`; returns the per-epoch logs (also appended to log_path).

    train_modules: the modules put in train mode each epoch (default: the whole model); frozen parts
    (a cRT backbone, the teachers) stay in eval mode. cfg.accum micro-batches (of loader.batch_size)
    make one optimizer step; each micro-batch loss is divided by the number of micro-batches of its step.
    cfg.ema > 0: an EMA of the weights (and buffers) is kept, checkpointed, and copied into `model` at the end.
    compile: a torch.compile backend for the step (compiled before the DDP wrap); "" = eager.
    sync_bn: under torchrun on GPUs, SyncBatchNorm in `model` (fastcbd.train.distributed.sync_batch_norm).
    log_every > 0: a {"kind": "step", ...} record (loss, lr) every log_every steps in log_path;
    tb_dir: TensorBoard scalars (per logged step and per epoch, both against the optimizer step) there.
    Rank 0 only. A resume refuses a checkpoint whose config differs in a key that changes the result
    (fastcbd.train.resume; allow_config_change=True logs it instead) and drops the records written after
    the checkpoint from log_path and TensorBoard, so each is written once.
    """
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    device = next(model.parameters()).device
    accum = max(int(getattr(cfg, "accum", 1)), 1)
    micro_per_epoch = len(loader)
    steps_per_epoch = -(-micro_per_epoch // accum)
    total_steps = cfg.epochs * steps_per_epoch
    world, main = D.world_size(), D.is_main()
    opt, sched = make_optimizer(params, cfg, loader.batch_size * accum * world, total_steps)
    if sync_bn:
        D.sync_batch_norm(model, device)
    if compile:
        step_fn = torch.compile(D.StepModule(model, step_fn), backend=compile)
    run_step, ddp = D.wrap(model, step_fn, device)  # DDP over the step when launched by torchrun
    ema = None
    if getattr(cfg, "ema", 0) > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    log_path = log_path if main else None
    show_progress = show_progress and main
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    delay = float(os.environ.get("FASTCBD_STEP_DELAY", "0") or 0)  # seconds after each step (signal tests)
    history: list[dict] = []
    step, start_epoch, micro = 0, 0, 0
    sums: dict[str, torch.Tensor] = {}
    n_images, epoch_seconds = 0, 0.0
    last_good: str | None = None

    if resume and ckpt is not None:
        path, blob = ckpt.latest()
        if blob is not None:
            if blob.get("desc") != desc:
                raise ConfigError(f"checkpoint {path} is of stage {blob.get('desc')!r}, not {desc!r}")
            mine, theirs = (meta or {}).get("teachers"), (blob.get("meta") or {}).get("teachers")
            if mine is not None and theirs is not None and mine != theirs:
                raise ConfigError(f"checkpoint {path} was trained with teachers {theirs}, this run has {mine}: "
                                 "resume with the same teachers or start a new run folder")
            check_config(blob.get("config") or {}, config or {}, f"{desc}: checkpoint {path}", allow_config_change)
            model.load_state_dict(blob["model"])
            opt.load_state_dict(blob["optimizer"])
            sched.load_state_dict(blob["scheduler"])
            if scaler is not None and blob.get("scaler"):
                scaler.load_state_dict(blob["scaler"])
            if ema is not None:
                ema.load_state_dict(blob["ema"])
            sampler.load_state_dict(blob["sampler"])  # refuses a different world size
            mine_state = blob["ranks"][D.rank()] if blob.get("ranks") else blob
            step, micro, history = blob["step"], blob["micro"], list(blob["history"])
            sums = {k: v.to(device) for k, v in blob["sums"].items()}
            n_images, epoch_seconds = blob["images"], blob["epoch_seconds"]
            start_epoch = blob["epoch"] + (1 if blob["epoch_done"] else 0)
            if not blob["epoch_done"] and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(mine_state["loader"])
            set_rng_state(mine_state["rng"])
            last_good = path
            trim_records(log_path, desc, step, blob["epoch"], blob["epoch_done"])
            log.info("%s: resumed from %s (step %d of %d)", desc, path, step, total_steps)
    # purge_step: TensorBoard drops the events a killed run wrote after the checkpoint
    tb = _tensorboard(tb_dir, purge_step=step + 1 if step else None) if tb_dir and main else None

    def save(epoch: int, epoch_done: bool) -> str | None:
        if ckpt is None:
            return None
        # every rank's own RNG and loader-generator states (collective: all ranks save at the same step)
        ranks = D.gather_objects({"rng": rng_state(), "loader": _loader_state(loader)}) if world > 1 else None
        if not main:
            return None
        state = {"desc": desc, "ranks": ranks, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {},
                 "ema": ema.state_dict() if ema is not None else {},
                 "sampler": sampler.state_dict(), "loader": _loader_state(loader), "rng": rng_state(),
                 "micro": micro, "epoch": epoch, "epoch_done": epoch_done, "history": history,
                 "sums": {k: v.detach().cpu() for k, v in sums.items()}, "images": n_images,
                 "epoch_seconds": epoch_seconds, "config": config or {}, "meta": meta or {}}
        return ckpt.save(step, state)

    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite step (1-based), kept on device

    def check_finite(epoch: int) -> None:
        bad = int(first_bad)
        if world > 1:  # all ranks stop together (-1 = finite everywhere)
            bad = D.agree_max(bad)
        if bad >= 0:
            raise NonFiniteLoss(f"{desc}: the loss is NaN or inf at step {bad} (epoch {epoch}); stopped. "
                                f"Last good checkpoint: {last_good or 'none'}")

    def stop_requested() -> int:
        """The signal to stop on (0: none). Under torchrun the ranks agree after every step, so that
        they all stop, and save, after the same one."""
        mine = caught[0] if caught else 0
        return D.agree_max(mine) if world > 1 and ckpt is not None else mine

    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not show_progress, leave=False, dynamic_ncols=True)
    with _catch_signals(ckpt is not None) as caught:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            for m in train_modules if train_modules is not None else [model]:
                m.train()
            if micro == 0:
                sums, n_images, epoch_seconds = {}, 0, 0.0
            t0 = time.perf_counter()
            for x, y in loader:
                group = min(accum, micro_per_epoch - (micro // accum) * accum)  # micro-batches in this step
                if micro % accum == 0:
                    opt.zero_grad(set_to_none=True)
                last_micro = (micro + 1) % accum == 0 or micro + 1 >= micro_per_epoch
                with ddp.no_sync() if ddp is not None and not last_micro else contextlib.nullcontext():
                    with autocast_context(device, amp), trusted_targets(device.type == "cuda"):
                        loss, logs = run_step(x, y)
                    scaled = loss / group if group > 1 else loss
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                micro += 1
                bs = y.shape[0]
                n_images += bs
                for k, v in {"loss": loss, **logs}.items():
                    sums[k] = sums.get(k, 0) + v.detach().float() * bs
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step + 1, first_bad)
                if micro % accum and micro < micro_per_epoch:
                    continue
                if scaler is not None:
                    scaler.unscale_(opt)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                if ema is not None:
                    ema.update_parameters(model)
                step += 1
                bar.update(1)
                if bar.n % 20 == 0 and show_progress:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.3g}")
                if log_every and step % log_every == 0 and (log_path or tb):
                    rec = {"kind": "step", "stage": desc, "step": step, "epoch": epoch, "loss": loss.item(),
                           "lr": sched.get_last_lr()[0]}
                    _write(log_path, rec)
                    if tb is not None:
                        tb.add_scalar(f"{desc}/loss", rec["loss"], step)
                        tb.add_scalar(f"{desc}/lr", rec["lr"], step)
                if delay:
                    time.sleep(delay)
                end_of_epoch = micro >= micro_per_epoch
                stop = stop_requested()
                if not end_of_epoch and ((ckpt is not None and ckpt.every and step % ckpt.every == 0) or stop):
                    check_finite(epoch)
                    epoch_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    last_good = save(epoch, False)
                    if stop:
                        raise TrainingInterrupted(stop, step, last_good)
            epoch_seconds += time.perf_counter() - t0
            totals = D.all_reduce_sum({"images": n_images, **sums}, device)  # every rank's images
            images = int(totals.pop("images"))
            record = {"stage": desc, "epoch": epoch, "lr": sched.get_last_lr()[0], "images": images,
                      "seconds": round(epoch_seconds, 3)}
            record.update({k: float(v) / max(images, 1) for k, v in totals.items()})
            check_finite(epoch)
            if not all(math.isfinite(record[k]) for k in sums):
                raise NonFiniteLoss(f"{desc}: non-finite loss in epoch {epoch}: {record}")
            history.append(record)
            _write(log_path, record)
            if tb is not None:
                for k in ("lr", "seconds", *totals):
                    tb.add_scalar(f"{desc}/epoch_{k}", record[k], step)
                tb.flush()
            micro = 0
            last_epoch = epoch == cfg.epochs - 1
            stop = stop_requested()
            if ckpt is not None and ((ckpt.every and step % ckpt.every == 0) or last_epoch or stop):
                last_good = save(epoch, True)
            if stop and not last_epoch:
                raise TrainingInterrupted(stop, step, last_good)
    bar.close()
    if tb is not None:
        tb.close()
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    if ddp is not None:  # batch-norm statistics of the last step differ per rank: keep rank 0's everywhere
        D.broadcast_buffers(model)
    return history
