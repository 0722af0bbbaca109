"""Run by test_distributed.py under `torchrun --nproc_per_node=2` (gloo on CPU); each rank writes its
parameters to OUT/rank<r>.pt.

    ddp_script.py OUT           a teacher and a cRT stage in DDP
    ddp_script.py OUT resume    an aug teacher with checkpoints every 2 steps, resuming from OUT/ck when
                                there are some; SIGTERM stops every rank after the same step (exit 143)
"""
import logging
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), "..", "..")]
from test_stages import tiny_splits

from fastcbd.train import distributed as D
from fastcbd.train.config import load_config
from fastcbd.train.loop import TrainingInterrupted
from fastcbd.train.stages import Context, train_crt, train_teacher

OVERRIDES = ["teacher.optim.epochs=2", "crt.epochs=2", "data.batch_size=16", "model.width=4", "amp=none",
             "aug.crop_scale=[1,1]", "aug.crop_ratio=[1,1]", "device=cpu"]
RESUME = ["teacher.optim.epochs=4", "data.batch_size=16", "model.width=4", "device=cpu", "checkpoint.every=2",
          "checkpoint.keep=2"]

if __name__ == "__main__":
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format=f"rank {os.environ.get('RANK')}: %(message)s")
    out, mode = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "stages")
    resume = mode == "resume"
    ctx = Context(load_config(None, RESUME if resume else OVERRIDES), tiny_splits(), progress=False,
                  log_path=os.path.join(out, "metrics.jsonl"), ckpt_dir=os.path.join(out, "ck", "{stage}"),
                  resume=resume)
    assert D.world_size() == 2, D.world_size()
    if resume:
        try:
            teacher = train_teacher(ctx, "aug", 1, desc="teacher")  # colour jitter draws from each rank's generator
        except TrainingInterrupted as exc:
            print(f"rank {D.rank()}: {exc}", file=sys.stderr, flush=True)
            sys.exit(128 + exc.signum)
        torch.save({"teacher": teacher.state_dict()}, os.path.join(out, f"rank{D.rank()}.pt"))
    else:
        teacher = train_teacher(ctx, "vanilla", 1, desc="teacher")
        crt = train_crt(ctx, teacher, 2)
        torch.save({"teacher": teacher.state_dict(), "crt": crt.state_dict()}, os.path.join(out, f"rank{D.rank()}.pt"))
