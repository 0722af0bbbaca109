"""The training engine on a CUDA GPU (run by `make gpu-check`; skipped without a GPU): teachers and a
CBD_ENS student end to end through the command line with bf16 autocast and with fp16 + GradScaler, the
device-resident loader and the compiled C++/CUDA or Triton loss, learning a task a CPU run learns."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _npz(tmp_path):
    """3 classes, 36/20/8 images of 12x12: a bright patch whose place names the class (easy to learn)."""
    rng = np.random.default_rng(0)
    y = np.array([0] * 36 + [1] * 20 + [2] * 8)
    x = rng.integers(0, 60, (len(y), 12, 12, 3), dtype=np.uint8)
    for c in range(3):
        x[y == c, 2 + 3 * c: 5 + 3 * c, 3:9] = 250
    yt = np.arange(30) % 3
    xt = rng.integers(0, 60, (30, 12, 12, 3), dtype=np.uint8)
    for c in range(3):
        xt[yt == c, 2 + 3 * c: 5 + 3 * c, 3:9] = 250
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    return str(path)


def _fastcbd(*args):
    proc = subprocess.run([sys.executable, "-m", "fastcbd", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"fastcbd {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_teachers_and_cbd_ens_student_on_cuda(tmp_path, amp):
    data = _npz(tmp_path)
    common = ["--data", data, "device=cuda", f"amp={amp}", "data.loader=device", "teacher.kinds=[vanilla,aug]",
              "teacher.optim.epochs=6", "student.optim.epochs=6", "data.batch_size=16", "model.width=8"]
    _fastcbd("train-teachers", "--out", str(tmp_path / "t"), *common)
    _fastcbd("train-student", "--teachers", str(tmp_path / "t"), "--out", str(tmp_path / "s"), *common)
    r = json.loads((tmp_path / "s" / "results.json").read_text())
    acc = next(iter(r["methods"].values()))
    assert np.isfinite(acc["all"]) and acc["all"] > 60.0, f"{amp} student on cuda: {acc}"
    lines = [json.loads(ln) for ln in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    losses = [ln["loss"] for ln in lines if "loss" in ln]
    assert losses and all(np.isfinite(losses)), f"non-finite losses: {losses[:10]}"
