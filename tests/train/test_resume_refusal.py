"""A resume refuses what it cannot honour: no readable checkpoint under --resume (named, nothing deleted),
a config that changes the result (named keys; --allow-config-change overrides); unreadable checkpoints are
moved aside, never deleted; checkpoint writes are fsynced; records written after the checkpoint are
dropped, so a resumed run's metrics.jsonl holds each record once."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from test_resume import _npz

from fastcbd.train import checkpoint as C
from fastcbd.train.resume import ConfigChanged, check_config, trim_records


def _teachers(data, out, *extra):
    cmd = [sys.executable, "-m", "fastcbd", "train-teachers", "--data", data, "--out", str(out), "teacher.kinds=[vanilla]",
           "teacher.optim.epochs=1", "data.batch_size=16", "model.width=4", "threads=1", "checkpoint.every=2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_checkpoint_writes_fsync_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")), real(fd)))
    C.CheckpointManager(str(tmp_path / "ck")).save(3, {"x": torch.ones(2)})
    tmp_file = [p for p in synced if ".tmp." in p]
    assert len(tmp_file) == 1 and str(tmp_path / "ck") in synced, synced
    assert os.listdir(tmp_path / "ck") == ["step_00000003.pt"]


def _two_truncated(folder):
    ck = C.CheckpointManager(str(folder), keep=5)
    for step in (2, 4):
        ck.save(step, {"x": torch.ones(3)})
    for p in ck.paths():
        with open(p, "r+b") as f:
            f.truncate(50)
    return ck


def test_required_resume_with_no_readable_checkpoint_names_each_file_and_touches_nothing(tmp_path):
    ck = _two_truncated(tmp_path / "ck")
    ck.required = True
    with pytest.raises(C.ResumeError) as err:
        ck.latest()
    msg = str(err.value)
    assert "step_00000002.pt" in msg and "step_00000004.pt" in msg and "Nothing was moved" in msg, msg
    assert sorted(os.listdir(tmp_path / "ck")) == ["step_00000002.pt", "step_00000004.pt"]


def test_unreadable_checkpoints_are_moved_aside_not_deleted(tmp_path, caplog):
    ck = _two_truncated(tmp_path / "ck")
    ck.log = logging.getLogger("fastcbd")
    with caplog.at_level(logging.WARNING, logger="fastcbd"):
        assert ck.latest() == (None, None)
    assert os.listdir(tmp_path / "ck") == ["unreadable"]
    assert sorted(os.listdir(tmp_path / "ck" / "unreadable")) == ["step_00000002.pt", "step_00000004.pt"]
    assert "2 unreadable checkpoint(s) moved aside" in caplog.text
    _two_truncated(tmp_path / "ck").latest()  # the same names again: the first ones are kept beside them
    assert len(os.listdir(tmp_path / "ck" / "unreadable")) == 4


def test_check_config_refuses_result_changing_keys_and_allows_neutral_ones(caplog):
    old = {"seed": 0, "log_every": 20, "checkpoint": {"every": 500, "keep": 3}, "aug": {"crop_scale": (0.6, 1.0)}}
    check_config(old, {**old, "log_every": 5, "checkpoint": {"every": 10, "keep": 1}}, "x")  # neutral: fine
    check_config(old, {**old, "aug": {"crop_scale": [0.6, 1.0]}}, "x")  # a tuple read back as a list: the same
    from fastcbd.train.config import Config, to_dict

    full = to_dict(Config())
    older = {k: v for k, v in full.items() if k != "sync_bn"}  # a key a newer version added, at its default
    check_config(older, full, "x")
    with pytest.raises(ConfigChanged, match="sync_bn"):
        check_config(older, {**full, "sync_bn": not full["sync_bn"]}, "x")
    with pytest.raises(ConfigChanged, match=r"seed: 0 -> 1.*--allow-config-change"):
        check_config(old, {**old, "seed": 1}, "x")
    with caplog.at_level(logging.WARNING, logger="fastcbd"):
        check_config(old, {**old, "seed": 1}, "x", allow=True)
    assert "--allow-config-change" in caplog.text and "seed: 0 -> 1" in caplog.text


def test_trim_records_drops_what_was_written_after_the_checkpoint(tmp_path):
    path = tmp_path / "m.jsonl"
    recs = [{"kind": "step", "stage": "a", "step": s, "epoch": s // 4} for s in range(1, 11)]
    recs += [{"stage": "a", "epoch": e} for e in (0, 1)] + [{"stage": "b", "epoch": 5}, {"kind": "step", "stage": "b", "step": 99}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "st')  # a line cut by the kill
    assert trim_records(str(path), "a", step=6, epoch=1, epoch_done=False) == 6  # steps 7-10, epoch 1, the cut line
    left = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert [r["step"] for r in left if r.get("kind") == "step" and r["stage"] == "a"] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in left if "kind" not in r and r["stage"] == "a"] == [0]
    assert {"stage": "b", "epoch": 5} in left and {"kind": "step", "stage": "b", "step": 99} in left


def test_cli_refuses_a_changed_config_before_rewriting_config_yaml(tmp_path):
    data, out = _npz(tmp_path), tmp_path / "t"
    first = _teachers(data, out)
    assert first.returncode == 0, first.stderr[-2000:]
    saved = (out / "config.yaml").read_text()
    changed = _teachers(data, out, "teacher.optim.lr=0.05")
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert "teacher.optim.lr: 0.2 -> 0.05" in changed.stderr and "--allow-config-change" in changed.stderr
    assert "Traceback" not in changed.stderr and (out / "config.yaml").read_text() == saved
    neutral = _teachers(data, out, "log_every=3", "checkpoint.keep=2")
    assert neutral.returncode == 0, neutral.stderr[-2000:]
    allowed = _teachers(data, out, "teacher.optim.lr=0.05", "--allow-config-change")
    assert allowed.returncode == 0 and "--allow-config-change" in allowed.stderr, allowed.stderr[-2000:]
    assert "lr: 0.05" in (out / "config.yaml").read_text()


def test_cli_resume_with_only_unreadable_checkpoints_fails_and_keeps_them(tmp_path):
    data, out = _npz(tmp_path), tmp_path / "t"
    ckpts = out / "teacher_vanilla_1" / "checkpoints"
    ckpts.mkdir(parents=True)
    for step in (2, 4):
        (ckpts / f"step_{step:08d}.pt").write_bytes(b"not a checkpoint")
    refused = _teachers(data, out, "--resume")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "step_00000002.pt" in refused.stderr and "step_00000004.pt" in refused.stderr, refused.stderr[-2000:]
    assert sorted(os.listdir(ckpts)) == ["step_00000002.pt", "step_00000004.pt"]
    fresh = _teachers(data, out)  # without --resume: moved aside, a fresh start
    assert fresh.returncode == 0 and "moved aside" in fresh.stderr, fresh.stderr[-2000:]
    assert sorted(os.listdir(ckpts / "unreadable")) == ["step_00000002.pt", "step_00000004.pt"]
    assert (out / "teacher_vanilla_1" / "model.pt").exists()
