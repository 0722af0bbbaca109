"""The `fastcbd` command end to end, a few steps each: demo's results.json schema, the stage commands,
and errors that name the bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

QUICK = ["teacher.optim.epochs=1", "student.optim.epochs=1", "crt.epochs=1", "model.width=8", "threads=1"]
METHODS = ["teacher_vanilla_1", "teacher_vanilla_2", "teacher_aug_1", "teacher_aug_2", "ce_balanced", "crt", "cbd",
           "cbd_ens"]


def fastcbd(*args, ok=True):
    proc = subprocess.run([sys.executable, "-m", "fastcbd", *args], capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, f"fastcbd {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc


def test_demo_writes_results(tmp_path):
    out = tmp_path / "demo"
    fastcbd("demo", "--out", str(out), "--seed", "1", "--rho", "50", "--no-progress", *QUICK)
    r = json.loads((out / "results.json").read_text())
    assert r["dataset"].startswith("mnist-lt") and r["rho"] == 50.0 and r["seed"] == 1
    assert len(r["class_counts"]) == 10 and r["class_counts"][0] == 400 and r["class_counts"][-1] == 8
    for name in METHODS:
        m = r["methods"][name]
        assert set(m) >= {"all", "many", "medium", "few", "per_class"}, f"{name}: {sorted(m)}"
        assert len(m["per_class"]) == 10 and all(0 <= a <= 100 for a in m["per_class"])
        assert 0 <= m["all"] <= 100
        assert abs(m["all"] - np.mean(m["per_class"])) < 1e-6, f"{name}: balanced test, all = mean per class"
    for f in ("results.md", "per_class.png", "config.yaml", "log.txt", "metrics.jsonl"):
        assert (out / f).stat().st_size > 0, f"{f} is missing or empty"
    assert "| cbd_ens |" in (out / "results.md").read_text()


def _npz(tmp_path, y_train=None):
    rng = np.random.default_rng(0)
    y = np.array([0] * 30 + [1] * 10 + [2] * 4) if y_train is None else y_train
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=rng.integers(0, 255, (len(y), 12, 12, 3), dtype=np.uint8), y_train=y,
             x_test=rng.integers(0, 255, (9, 12, 12, 3), dtype=np.uint8), y_test=np.arange(9) % 3)
    return str(path)


def test_stage_commands_on_user_npz(tmp_path):
    data = _npz(tmp_path)
    common = ["--data", data, *QUICK, "teacher.kinds=[vanilla,aug]", "data.batch_size=16"]
    fastcbd("train-teachers", "--out", str(tmp_path / "t"), *common)
    assert sorted(os.listdir(tmp_path / "t")) == ["config.yaml", "log.txt", "metrics.jsonl", "teacher_aug_1",
                                                   "teacher_vanilla_1"]
    fastcbd("train-student", "--teachers", str(tmp_path / "t"), "--out", str(tmp_path / "s"), *common)
    fastcbd("evaluate", "--models", str(tmp_path / "s" / "model.pt"), str(tmp_path / "t" / "teacher_aug_1" / "model.pt"),
            "--out", str(tmp_path / "e"), *common)
    r = json.loads((tmp_path / "e" / "results.json").read_text())
    assert set(r["methods"]) == {"cbd", "teacher_aug_1"} and r["class_counts"] == [30, 10, 4]


@pytest.mark.parametrize("args,match", [
    (["demo", "seed=x"], "config key 'seed': expected a number"),
    (["demo", "student.gamma=1"], "unknown config key 'student.gamma'"),
    (["train-teachers", "--data", "/nonexistent.npz"], "/nonexistent.npz: no such file"),
])
def test_cli_errors(tmp_path, args, match):
    proc = fastcbd(*args, "--out", str(tmp_path / "o"), ok=False)
    assert proc.returncode == 2 and match in proc.stderr, proc.stderr[-2000:]


def test_npz_without_a_class_is_refused(tmp_path):
    data = _npz(tmp_path, y_train=np.array([0] * 30 + [2] * 14))
    proc = fastcbd("train-teachers", "--data", data, "--out", str(tmp_path / "o"), ok=False)
    assert proc.returncode == 2 and "'y_train' has no image of class(es) [1]" in proc.stderr, proc.stderr[-2000:]


def test_summarize_averages_seeds(tmp_path):
    for seed, acc in ((0, 80.0), (1, 90.0)):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        m = {"all": acc, "many": 99.0, "medium": acc - 5, "few": None, "per_class": [acc] * 3}
        (d / "results.json").write_text(json.dumps({"seed": seed, "methods": {"cbd": m}}))
    fastcbd("summarize", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "sum"))
    s = json.loads((tmp_path / "sum" / "summary.json").read_text())["methods"]["cbd"]
    assert s["all"] == 85.0 and s["all_std"] == 5.0 and s["medium"] == 80.0 and s["many_std"] == 0.0
    assert "| cbd | 85.00 ± 5.00 |" in (tmp_path / "sum" / "summary.md").read_text()


@pytest.fixture(scope="module")
def one_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoupled")
    data = _npz(root)
    common = ["--data", data, *QUICK, "teacher.kinds=[vanilla]", "data.batch_size=16"]
    fastcbd("train-teachers", "--out", str(root / "t"), *common)
    return root, common


@pytest.mark.parametrize("method", ["lws", "tau_norm", "logit_adj_posthoc"])
def test_decoupled_baselines_from_the_command_line(one_teacher, method):
    """train-student --method on one teacher writes a model file that `evaluate` rebuilds to the same
    accuracy (the wrapper around the teacher is recorded in arch.head)."""
    root, common = one_teacher
    teacher, out = str(root / "t" / "teacher_vanilla_1" / "model.pt"), root / method
    fastcbd("train-student", "--method", method, "--teachers", teacher, "--out", str(out), *common)
    trained = json.loads((out / "results.json").read_text())["methods"][method]
    fastcbd("evaluate", "--models", str(out / "model.pt"), "--out", str(root / f"e_{method}"), *common)
    again = json.loads((root / f"e_{method}" / "results.json").read_text())["methods"][method]
    assert again["per_class"] == trained["per_class"]
    proc = fastcbd("train-student", "--method", method, "--teachers", teacher, teacher, "--out", str(root / "x"),
                   *common, ok=False)
    assert proc.returncode != 0 and f"--method {method} re-balances the classifier of one" in proc.stderr
