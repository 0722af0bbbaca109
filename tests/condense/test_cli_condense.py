"""`fastcbd condense` end to end with tiny settings: MNIST-LT (DM, hierarchical) and a generated
CIFAR-10-format folder (DSA, MTT); checks the outputs and the results.json schema."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import torch

TINY = ["--width", "4", "--iterations", "1", "--evals", "1", "--eval-steps", "2", "--threads", "1",
        "--no-progress", "--preset", "cpu"]


def condense(*args):
    proc = subprocess.run([sys.executable, "-m", "fastcbd", "condense", *args], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, f"fastcbd condense {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc


def _check_results(out, methods, num_classes, budget):
    r = json.loads((out / "results.json").read_text())
    assert set(r["methods"]) == set(methods), sorted(r["methods"])
    for name, m in r["methods"].items():
        for key in ("all", "many", "medium", "few", "std"):
            assert key in m, f"{name}: no '{key}' in {sorted(m)}"
        assert 0 <= m["all"] <= 100 and m["std"] >= 0
        assert len(m["per_class"]) == num_classes
        # a balanced test split: overall accuracy is the mean of the per-class accuracies
        assert abs(m["all"] - sum(m["per_class"]) / num_classes) < 1e-6, (name, m["all"], m["per_class"])
    assert r["budget"] == budget
    md = (out / "results.md").read_text()
    assert all(f"| {name} |" in md for name in methods), md
    return r


def test_condense_mnist_lt_hierarchical(tmp_path):
    """The issue's new-user command (no --preset: auto), with tiny iteration counts."""
    out = tmp_path / "mnist"
    proc = condense("--method", "dm", "--dataset", "mnist-lt", "--ipc", "10", "--hierarchical", "--groups", "2",
                    "--out", str(out), *TINY[:-2])
    r = _check_results(out, ["full_lt", "random_real", "dm", "dm+2stage", "dm+hier"], 10,
                       [10, 10, 10, 10, 10, 10, 10, 10, 6, 4])
    expected = "paper" if torch.cuda.is_available() else "cpu"
    assert r["preset"]["name"] == expected and "--preset auto" in r["preset"]["why"], r["preset"]
    assert f"preset {expected}: --preset auto" in proc.stderr and "time estimate: " in proc.stderr, proc.stderr[-2000:]
    assert f"Preset: {expected} (--preset auto" in (out / "results.md").read_text()
    assert r["tail_rule"] == {"8": 6, "9": 4} and r["groups"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert "Tail rule" in (out / "results.md").read_text()
    assert r["methods"]["dm+hier"]["images"] == 90 + 100, "group level (10 per class) + class level"
    blob = torch.load(out / "synthetic" / "dm_seed0.pt", weights_only=True)
    assert blob["images"].shape == (90, 1, 28, 28) and blob["labels"].bincount().tolist()[-2:] == [6, 4]
    for png in ("dm.png", "dm+hier.png", "dm+hier_groups.png"):
        assert (out / png).stat().st_size > 0


def _write_cifar(root, per_class_batch=6, test_per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root)

    def batch(n, path):
        y = np.repeat(np.arange(10), n)
        x = rng.integers(0, 256, (len(y), 3072), dtype=np.uint8)
        x[:, :1024] = (y * 25).astype(np.uint8)[:, None]  # a class-dependent red channel: learnable
        with open(path, "wb") as f:
            pickle.dump({b"data": x, b"labels": y.tolist()}, f)

    for i in range(1, 6):
        batch(per_class_batch, os.path.join(root, f"data_batch_{i}"))
    batch(test_per_class, os.path.join(root, "test_batch"))


def test_condense_cifar10_lt_folder(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar(str(root))
    out = tmp_path / "cifar"
    condense("--method", "dsa", "mtt", "--dataset", "cifar10-lt", "--data-root", str(root), "--rho", "10",
             "--ipc", "5", "--soft-labels", "--constant-memory", "--out", str(out), *TINY)
    # 30 images per class at most: rho 10 keeps int(30 * 0.1^(i/9)) = 30, 23, ..., 3, 3
    counts = [int(30 * 0.1 ** (i / 9)) for i in range(10)]
    budget = [min(5, n) for n in counts]
    r = _check_results(out, ["full_lt", "random_real", "dsa", "mtt"], 10, budget)
    assert r["class_counts"] == counts and r["tail_rule"] == {str(c): n for c, n in enumerate(counts) if n < 5}
    blob = torch.load(out / "synthetic" / "mtt_seed0.pt", weights_only=True)
    n = sum(budget)
    assert blob["images"].shape == (n, 3, 32, 32) and blob["soft_labels"].shape == (n, 10)
    assert len(list((out / "experts" / "all").glob("expert_*.pt"))) == 2
