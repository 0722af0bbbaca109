"""torchrun --nproc_per_node=2 on CPU with gloo: parameters are equal on both ranks, and equal (within
tolerance) to one process with the same global batch; metrics are all-reduced, rank 0 logs and saves."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import ddp_script
import pytest
import torch
from test_stages import tiny_splits

from fastcbd.train.config import load_config
from fastcbd.train.stages import Context, train_crt


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(
    not torch.distributed.is_available() or not shutil.which("torchrun", path=os.path.dirname(sys.executable)),
    reason="torch.distributed / torchrun not available")


def _torchrun(*args, delay=0.0):
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTCBD_STEP_DELAY=str(delay))
    return subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node=2", ddp_script.__file__, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@needs_torchrun
def test_torchrun_two_ranks_match_one_process(tmp_path):
    proc = _torchrun(tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for part in ("teacher", "crt"):
        for name, v in r0[part].items():
            assert torch.equal(v, r1[part][name]), f"{part}.{name} differs between the ranks"
    # rank 0 alone wrote the checkpoints and the log; epochs count both ranks' images
    assert sorted(os.listdir(tmp_path / "ck")) == ["crt", "teacher"]
    records = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r.get("kind") != "step"]
    assert [r["stage"] for r in records] == ["teacher", "teacher", "crt", "crt"], records
    assert all(r["images"] == 48 for r in records), [r["images"] for r in records]  # 3 steps x 2 ranks x 8

    # one process, global batch 16, from the same teacher: the cRT classifier (frozen eval-mode backbone,
    # so no batch-norm statistics differ) matches the two-rank run
    torch.set_num_threads(1)
    ctx = Context(load_config(None, ddp_script.OVERRIDES), tiny_splits(), progress=False)
    teacher = train_crt.__globals__["Teacher"]("small_cnn", 3, 1, 20.0, 4)
    teacher.load_state_dict(r0["teacher"])
    single = train_crt(ctx, ctx.place(teacher).eval(), 2).state_dict()
    w1, w2 = single["classifier.weight"], r0["crt"]["classifier.weight"]
    assert torch.allclose(w1, w2, rtol=1e-4, atol=1e-6), f"max |diff| {(w1 - w2).abs().max():.3g}"


@needs_torchrun
def test_torchrun_sigterm_then_resume_is_bit_exact(tmp_path):
    """Both ranks stop after the same step on SIGTERM, rank 0 saves every rank's RNG and loader state,
    and the resumed two-rank run ends with the parameters of an unbroken one, bit for bit."""
    a, b = tmp_path / "a", tmp_path / "b"
    straight = _torchrun(a, "resume")
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-4000:]

    run = _torchrun(b, "resume", delay=0.3)  # 12 steps of 0.3 s; SIGTERM once step 4 is saved
    t0, first = time.time(), b / "ck" / "teacher" / "step_00000004.pt"
    while not first.exists():
        assert run.poll() is None, run.communicate()[1][-4000:]
        assert time.time() - t0 < 120, "no checkpoint at step 4 within 120 s"
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    _, err = run.communicate(timeout=120)
    assert run.returncode != 0, err[-4000:]
    stops = re.findall(r"rank (\d): SIGTERM received: stopped after step (\d+)", err)
    assert sorted(r for r, _ in stops) == ["0", "1"], err[-4000:]
    step = {s for _, s in stops}
    assert len(step) == 1 and int(step.pop()) < 12, stops
    assert not (b / "rank0.pt").exists()

    resumed = _torchrun(b, "resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resumed from" in err, err[-4000:]
    ra, rb0, rb1 = (torch.load(p, weights_only=True)["teacher"] for p in (a / "rank0.pt", b / "rank0.pt", b / "rank1.pt"))
    for name, v in ra.items():
        assert torch.equal(v, rb0[name]), f"{name}: the resumed run differs from the unbroken one"
        assert torch.equal(rb0[name], rb1[name]), f"{name} differs between the ranks"



def test_sync_batch_norm_only_with_several_gpu_ranks(monkeypatch):
    """The conversion keeps the very parameter and buffer objects (the optimizer's and the step's
    references stay valid); it is skipped for one rank and on CPU, where SyncBatchNorm cannot run."""
    from fastcbd.models import Teacher
    from fastcbd.train import distributed as D

    model = Teacher("small_cnn", 3, 1, 20.0, 4)
    params = {n: p for n, p in model.named_parameters()}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not D.sync_batch_norm(model, torch.device("cuda"))  # one rank
    monkeypatch.setattr(D, "world_size", lambda: 2)
    assert not D.sync_batch_norm(model, torch.device("cpu"))
    assert D.sync_batch_norm(model, torch.device("cuda"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == len(bns)
    assert all(p is params[n] for n, p in model.named_parameters())
