"""Smoke test of benchmarks/bench_condense.py (the dry command of `make gpu-check`), and the check that its
`auto_picks` label states the library's `matching: auto` rule."""
from __future__ import annotations

import contextlib
import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a package at the repository root, not an installed one
    sys.path.insert(0, str(ROOT))


def test_bench_condense_quick_cpu(tmp_path):
    out = tmp_path / "condense.csv"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_condense.py"), "--device", "cpu", "--quick", "--csv", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"bench_condense failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    rows = list(csv.DictReader(out.open()))
    assert [(r["algo"], r["variant"]) for r in rows] == [("dm", "loop"), ("dm", "batched"), ("dsa", "loop"),
                                                         ("dsa", "batched")], rows
    for loop, batched in zip(rows[::2], rows[1::2]):
        for r in (loop, batched):
            assert r["device"] == "cpu" and r["dataset"] == "mnist" and r["quick"] == "1", r
            assert float(r["median_ms"]) > 0 and r["auto_picks"] == "loop", r
        ratio = float(loop["median_ms"]) / float(batched["median_ms"])
        assert math.isclose(float(batched["x_loop"]), ratio, rel_tol=1e-6), (loop, batched)
        assert batched["faster"] == loop["faster"] == ("batched" if ratio > 1 else "loop"), (loop, batched)
    assert "`matching: auto` runs loop here" in proc.stdout, proc.stdout


@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["on_cpu", "on_gpu"])  # no GPU needed: keep "cuda" out of the id
def test_auto_picks_is_the_library_rule(monkeypatch, device):
    """Runner.distiller's `loop` flag under matching=auto is the rule the benchmark labels its rows with,
    captured without running anything (or a GPU)."""
    import torch

    from benchmarks.bench_condense import auto_matching
    from fastcbd.condense import run

    seen = {}
    monkeypatch.setattr(run, "distill_dm", lambda *a, loop, **k: seen.setdefault("loop", loop))
    runner = run.Runner.__new__(run.Runner)  # only cfg and bar are used by distiller
    runner.cfg = run.CondenseConfig(device=device, matching="auto")
    runner.bar = lambda *a, **k: contextlib.nullcontext()
    pool = type("Pool", (), {"num_labels": 3})()
    runner.distiller("dm", 0, None)(pool, None, 0, "all")
    assert seen == {"loop": auto_matching(torch.device(device)) == "loop"}, (device, seen)
    assert auto_matching(torch.device(device)) == ("batched" if device == "cuda" else "loop")


def test_ablate_condense_writes_a_row_per_set_and_label_kind(tmp_path):
    """benchmarks/ablate_condense.py at a tiny size: the teacher's row, then one per (seed, set, labels) with
    accuracies in range; a teacher_div set holds real images of each class."""
    from benchmarks import ablate_condense

    out = tmp_path / "ablation.csv"
    ablate_condense.main(["--teacher", "4:2", "--sets", "random", "teacher_div", "--labels", "hard", "kl2",
                          "--repeats", "1", "--eval-steps", "2", "--csv", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [(r["set"], r["labels"]) for r in rows] == [("teacher", ""), ("random", "hard"), ("random", "kl2"),
                                                       ("teacher_div", "hard"), ("teacher_div", "kl2")], rows
    for r in rows:
        assert 0 <= float(r["all"]) <= 100 and r["split"] == "test" and r["eval_steps"] == "2", r
    d = ablate_condense.Data("test")
    syn = ablate_condense.build_set(d, "teacher_div", 0, ablate_condense.train_teacher(d, 4, 1))
    for img, label in zip(syn.images.detach(), syn.labels):
        assert (d.x[d.y == label] - img).flatten(1).abs().sum(1).min() == 0


def test_ablate_condense_workers_give_the_same_rows(tmp_path):
    """--workers 2 trains a set's models in threads: every accuracy equals the one-after-another run's."""
    from benchmarks import ablate_condense

    rows = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.csv"
        ablate_condense.main(["--teacher", "4:2", "--sets", "random", "--labels", "hard", "kl2", "--repeats", "2",
                              "--eval-steps", "3", "--workers", str(workers), "--csv", str(out)])
        rows[workers] = [{k: r[k] for k in ("set", "labels", "all", "many", "medium", "few")}
                         for r in csv.DictReader(out.open())]
    assert rows[1] == rows[2] and len(rows[1]) == 3, rows


def test_ablate_condense_headroom_sets_are_real_and_balanced():
    """The headroom sets: real40 holds min(40, n_c) real images of each class, pool every real image; _bal
    repeats each class's rows to the largest class's count, every image of a class within one of the others."""
    import torch

    from benchmarks import ablate_condense

    d = ablate_condense.Data("test")
    real40 = ablate_condense.build_set(d, "real40", 0, None)
    assert real40.counts == [min(40, n) for n in d.counts], real40.counts
    pool = ablate_condense.build_set(d, "pool", 0, None)
    assert pool.counts == list(d.counts)
    x, y = ablate_condense.balance_by_repeat(real40.images.detach(), real40.labels)
    assert torch.bincount(y).tolist() == [40] * d.k
    for c in range(d.k):
        own = real40.images.detach()[real40.labels == c]
        hits = (x[y == c].flatten(1)[:, None] == own.flatten(1)[None]).all(-1).sum(0)  # uses of each image
        assert int(hits.max() - hits.min()) <= 1 and int(hits.min()) >= 1, (c, hits)


def test_ablate_condense_dm_set_moves_the_random_subset():
    """The dm set starts from the random set of the same seed (same labels) and DM moves every image."""
    from benchmarks import ablate_condense

    d = ablate_condense.Data("test")
    start = ablate_condense.build_set(d, "random", 0, None, ipc=1)
    dm = ablate_condense.build_set(d, "dm", 0, None, ipc=1)
    assert dm.labels.tolist() == start.labels.tolist() == list(range(d.k))
    moved = (dm.images.detach() - start.images.detach()).flatten(1).abs().amax(1)
    assert (moved > 1e-3).all(), moved
