"""The resume contract through the CLI, per loader and stage: a run killed (SIGKILL), stopped (SIGTERM) or
interrupted (Ctrl-C: SIGINT to the whole process group, DataLoader workers included) at a random step,
then run again with the same command, ends with the same weights, bit for bit, as an unbroken run.

- teachers (2 stages) with the torch DataLoader over JPEG files, 2 workers (crops made in the workers):
  SIGKILL, then Ctrl-C;
- the CBD student against 2 teachers on in-memory data, with fp16 autocast + GradScaler, EMA and
  gradient accumulation: SIGTERM;
- an aug teacher with DALI's CPU pipeline over JPEG files (skipped without DALI): SIGKILL.
(tests/train/test_resume.py: SIGKILL and SIGTERM of an in-memory teacher.)

The kill steps come from a seeded RNG (each test's own), so a failure names a step that reproduces it.
"""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "data"))
from data_files import write_jpegs, write_list
from test_resume import _npz

from fastcbd.train.checkpoint import load_model, save_model

TINY = ["model.width=4", "threads=1", "checkpoint.every=1", "checkpoint.keep=2", "log_every=1"]
DELAY = 0.15  # seconds after each step of the interrupted runs (FASTCBD_STEP_DELAY), so a signal lands mid-run


def _jpeg_list(root) -> list[str]:
    """A 4-class long-tailed list-file dataset of 20x24 JPEGs (28 training images): data.* overrides."""
    write_list(root / "train.txt", write_jpegs(root, [14, 8, 4, 2], "train", size=(20, 24)))
    write_list(root / "test.txt", write_jpegs(root, [2] * 4, "val", size=(20, 24)))
    return ["data.dataset=imagenet-lt", f"data.root={root}", "data.train_list=train.txt", "data.test_list=test.txt",
            "data.image_size=16", "data.batch_size=4", "aug.flip=true"]


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "fastcbd", *args]


def _newest_step(folder) -> int:
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return max((int(n[5:13]) for n in names if n.startswith("step_") and n.endswith(".pt")), default=0)


def _start(cmd, log, delay=0.0):
    env = dict(os.environ, FASTCBD_STEP_DELAY=str(delay))
    with open(log, "w") as f:  # a file, not a pipe: nobody reads while the run goes on
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)


def _finish(proc, log, timeout=300) -> str:
    proc.wait(timeout=timeout)
    with open(log) as f:
        return f.read()


def _interrupt(cmd, out, stage_dirs, at, how, log):
    """Start `cmd` into `out` (slowed by DELAY), wait until stage `at[0]` has checkpointed step `at[1]`,
    then signal it: SIGKILL or SIGTERM to the process, SIGINT to its process group (Ctrl-C)."""
    proc = _start(cmd, log, DELAY)
    stage, step = at
    folder = os.path.join(out, stage_dirs[stage], "checkpoints")
    t0 = time.time()
    try:
        while _newest_step(folder) < step:
            assert proc.poll() is None, f"the run ended before {folder} step {step}:\n{_finish(proc, log)[-3000:]}"
            assert time.time() - t0 < 180, f"no checkpoint of step {step} in {folder} after 180 s"
            time.sleep(0.02)
        if how == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(how)
        err = _finish(proc, log, timeout=120)
    finally:
        if proc.poll() is None:  # a failed wait: do not leave the run behind
            proc.kill()
    name = signal.Signals(how).name
    if how == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, err[-3000:]
    else:  # a clean stop: a checkpoint after the current step, the exit status 128 + signal, no traceback
        assert proc.returncode == 128 + how, f"{name}: exit {proc.returncode}\n{err[-3000:]}"
        assert f"{name} received: stopped after step" in err and "Traceback" not in err, err[-3000:]
    return err


def _kill_and_resume(tmp_path, cmd, stage_dirs, steps, kills, seed):
    """Run `cmd` (ending in --out) unbroken into a/ and, alongside, into b/ interrupted by each signal of
    `kills` at a random step (stage, step) drawn from random.Random(seed), later each time; then the same
    command once more in b/. Returns the two run folders and the interruption points."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    straight = _start(cmd + [a], f"{a}.log")
    # global step numbers 1 .. stages * steps - 1, each later than the last by 2 at least (the resumed run
    # gets past the previous point), as (stage, step of the stage)
    total = len(stage_dirs) * steps
    points = sorted(random.Random(seed).sample(range(1, total - 2 * len(kills) + 1), len(kills)))
    at = [((p + 2 * k - 1) // steps, (p + 2 * k - 1) % steps + 1) for k, p in enumerate(points)]
    try:
        for k, (where, how) in enumerate(zip(at, kills)):
            _interrupt(cmd + [b], b, stage_dirs, where, how, f"{b}.{k}.log")
        resumed = subprocess.run(cmd + [b], capture_output=True, text=True, timeout=300, check=False)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    finally:
        err = _finish(straight, f"{a}.log")
    assert straight.returncode == 0, err[-3000:]
    return a, b, at


def _assert_same_weights(a, b, rel, at):
    ma, _ = load_model(os.path.join(a, rel))
    mb, _ = load_model(os.path.join(b, rel))
    sa, sb = ma.state_dict(), mb.state_dict()
    diff = [(n, (sa[n] != sb[n]).sum().item()) for n in sa if not torch.equal(sa[n], sb[n])]
    assert not diff, (f"{rel}: interrupted at (stage, step) {at} and resumed, differs from the unbroken run in "
                      f"{len(diff)} of {len(sa)} tensors, e.g. {diff[:3]} (name, values)")


def test_teachers_with_the_torch_loader_and_workers(tmp_path):
    data = _jpeg_list(tmp_path / "d")
    stages = ["teacher_vanilla_1", "teacher_aug_1"]  # 28 images / 4 = 7 steps a epoch, 2 epochs
    cmd = _cli("train-teachers", "teacher.kinds=[vanilla,aug]", "teacher.optim.epochs=2", "data.loader=torch",
               "data.workers=2", *data, *TINY, "--out")
    a, b, at = _kill_and_resume(tmp_path, cmd, stages, 14, [signal.SIGKILL, signal.SIGINT], seed=1)
    for stage in stages:
        _assert_same_weights(a, b, os.path.join(stage, "model.pt"), at)


def test_student_with_two_teachers_fp16_ema_and_accumulation(tmp_path):
    _npz(tmp_path)  # tmp_path / "d.npz": 3 classes, 36/20/8 images
    from fastcbd.models import Teacher

    teachers = []
    for k in range(2):
        torch.manual_seed(k)
        teachers.append(str(tmp_path / f"t{k}.pt"))
        save_model(teachers[-1], Teacher("small_cnn", 3, 3, 20.0, 4), {"role": "teacher", "backbone": "small_cnn",
                                                                     "num_classes": 3, "in_channels": 3, "sigma": 20.0,
                                                                     "width": 4})
    # 64 images / 8 = 8 micro-batches = 4 steps a epoch, 3 epochs
    cmd = _cli("train-student", "--teachers", *teachers, "--data", str(tmp_path / "d.npz"), "amp=fp16",
               "student.optim.ema=0.9", "student.optim.accum=2", "student.optim.epochs=3", "data.batch_size=8",
               *TINY, "--out")
    a, b, at = _kill_and_resume(tmp_path, cmd, [""], 12, [signal.SIGTERM], seed=2)
    _assert_same_weights(a, b, "model.pt", at)


def test_aug_teacher_with_the_dali_cpu_pipeline(tmp_path):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'fastcbd[dali]')")
    data = _jpeg_list(tmp_path / "d")
    cmd = _cli("train-teachers", "teacher.kinds=[aug]", "teacher.optim.epochs=2", "data.loader=dali", "data.workers=1",
               *data, *TINY, "--out")
    a, b, at = _kill_and_resume(tmp_path, cmd, ["teacher_aug_1"], 14, [signal.SIGKILL], seed=3)
    _assert_same_weights(a, b, os.path.join("teacher_aug_1", "model.pt"), at)
