"""Checkpoints and resume: a SIGKILLed and a SIGTERMed run continue bit-exactly (CPU); a corrupt
checkpoint is reported by name and the previous one is used; a NaN loss stops naming the step."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_stages import tiny_ctx

from fastcbd.train.checkpoint import CheckpointManager, load_model
from fastcbd.train.config import OptimConfig
from fastcbd.train.loop import NonFiniteLoss, fit


def _npz(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([0] * 36 + [1] * 20 + [2] * 8)  # 64 images: 4 steps of 16 per epoch
    x = rng.integers(0, 60, (len(y), 12, 12, 3), dtype=np.uint8)
    for c in range(3):
        x[y == c, 2 + 3 * c : 5 + 3 * c, 3:9] = 250
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:9], y_test=y[:9])
    return str(path)


def _cmd(data, out):
    # aug teachers: colour jitter and grayscale draw from the loader's generator mid-epoch
    return [sys.executable, "-m", "fastcbd", "train-teachers", "--data", data, "--out", str(out), "teacher.kinds=[aug]",
            "teacher.optim.epochs=4", "data.batch_size=16", "model.width=4", "threads=1", "checkpoint.every=3",
            "checkpoint.keep=2", "log_every=1"]


def _start(cmd, delay):
    env = dict(os.environ, FASTCBD_STEP_DELAY=str(delay))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.stderr.read()[-2000:]}"
        assert time.time() - t0 < timeout, f"{path} did not appear in {timeout}s"
        time.sleep(0.05)


def test_sigkill_and_sigterm_then_resume_is_bit_exact(tmp_path):
    data = _npz(tmp_path)
    straight = subprocess.run(_cmd(data, tmp_path / "a"), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "b"
    ckpts = out / "teacher_aug_1" / "checkpoints"
    proc = _start(_cmd(data, out), delay=0.2)  # 16 steps; killed after the mid-epoch checkpoint of step 9
    _wait_for(ckpts / "step_00000009.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "teacher_aug_1" / "model.pt").exists()

    proc = _start(_cmd(data, out), delay=0.2)  # resumes at 9; SIGTERM after step 12 is checkpointed
    _wait_for(ckpts / "step_00000012.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "resumed from" in err and "SIGTERM received: stopped after step" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]

    resumed = subprocess.run(_cmd(data, out), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, _ = load_model(str(tmp_path / "a" / "teacher_aug_1" / "model.pt"))
    b, _ = load_model(str(out / "teacher_aug_1" / "model.pt"))
    diff = [n for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()) if not torch.equal(x, y)]
    assert not diff, f"resumed run differs from the straight run in {diff}"
    assert sorted(os.listdir(ckpts)) == ["step_00000015.pt", "step_00000016.pt"]  # keep=2, one at the end
    # the records written after each checkpoint were dropped on resume: each step and epoch once, as straight
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    straight_records = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    key = lambda r: (r.get("kind", "epoch"), r.get("step") if r.get("kind") == "step" else r["epoch"])  # noqa: E731
    assert sorted(map(key, records)) == sorted(map(key, straight_records)), sorted(map(key, records))
    assert [r["loss"] for r in records if r.get("kind") == "step"] == [
        r["loss"] for r in straight_records if r.get("kind") == "step"]


def _params(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_corrupt_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog):
    from fastcbd.train.stages import train_teacher

    over = {"checkpoint.every": 2}
    straight = _params(train_teacher(tiny_ctx(tmp_path, **over), "aug", 1, desc="t"))  # 3 epochs x 3 steps
    ctx = tiny_ctx(tmp_path, **over)
    ctx.ckpt_dir, ctx.resume = str(tmp_path / "ck"), True
    first = _params(train_teacher(ctx, "aug", 1, desc="t"))
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names == ["step_00000006.pt", "step_00000008.pt", "step_00000009.pt"], names
    with open(tmp_path / "ck" / names[-1], "r+b") as f:  # truncate the newest
        f.truncate(100)
    with caplog.at_level(logging.WARNING, logger="fastcbd"):
        again = _params(train_teacher(ctx, "aug", 1, desc="t"))  # resumes from step 8, redoes step 9
    assert any("step_00000009.pt is unreadable" in r.getMessage() for r in caplog.records), caplog.text
    for n in straight:
        assert torch.equal(straight[n], first[n]), f"checkpointing changed the result ({n})"
        assert torch.equal(straight[n], again[n]), f"resume from the previous checkpoint differs ({n})"


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from fastcbd.data.device_loader import DeviceLoader
    from fastcbd.data.samplers import build_sampler

    y = np.arange(64) % 4
    smp = build_sampler("instance", y, seed=0)
    loader = DeviceLoader(np.random.default_rng(0).integers(0, 255, (64, 4, 4, 1), dtype=np.uint8), y, 8, sampler=smp, drop_last=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    calls = []

    def step(x, y):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        return (loss * float("nan") if len(calls) == 7 else loss), {}

    ck = CheckpointManager(str(tmp_path / "ck"), every=4, keep=5)
    with pytest.raises(NonFiniteLoss, match=r"step 7 \(epoch 0\).*step_00000004\.pt"):
        fit(model, step, loader, smp, OptimConfig(epochs=2), desc="nan", show_progress=False, ckpt=ck)
    assert sorted(os.listdir(tmp_path / "ck")) == ["step_00000004.pt"]


def test_resume_with_other_teachers_is_refused(tmp_path):
    from fastcbd.train.stages import train_student, train_teacher

    ctx = tiny_ctx(tmp_path, **{"student.optim.epochs": 1})
    t = train_teacher(ctx, "vanilla", 1)
    ctx.ckpt_dir, ctx.resume = str(tmp_path / "ck"), True
    train_student(ctx, [t], 2, teacher_ids=[{"path": "a.pt", "sha256": "1"}])
    with pytest.raises(ValueError, match="trained with teachers"):
        train_student(ctx, [t], 2, teacher_ids=[{"path": "a.pt", "sha256": "2"}])


def test_resume_flag_without_checkpoints_is_an_error(tmp_path):
    proc = subprocess.run(_cmd(_npz(tmp_path), tmp_path / "empty") + ["--resume"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2 and "--resume: no checkpoint in" in proc.stderr, proc.stderr[-2000:]
