"""Smoke tests of benchmarks/bench_train.py at its dry shapes: every variant's row and ratio columns, the
per-component profile, the teacher cache against the live teachers, the ResNet-50 dry command that
`make gpu-check` runs on a machine without a GPU, the compile budget, and the FLOP count behind the MFU."""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a package at the repository root, not an installed one
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import ALPHA, BETA, COMPONENTS, DRY, VARIANTS

BENCH = ROOT / "benchmarks" / "bench_train.py"


def _run(args, out):
    cmd = [sys.executable, str(BENCH), *args, "--csv", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"bench_train failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The resnet50 dry command plus --compile with a 1 s budget (too short even to import torch in the
    subprocess), shared by the assertions below."""
    out = tmp_path_factory.mktemp("bench_train") / "train.csv"
    proc = _run(["--only", "resnet50", "--device", "cpu", "--quick", "--compile", "--compile-budget", "1"], out)
    return proc, list(csv.DictReader(out.open()))


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """The cnn case at its dry shape, loaders and all: (stdout, step rows, profile rows)."""
    out = tmp_path_factory.mktemp("bench_train_cnn") / "train.csv"
    proc = _run(["--only", "cnn", "--quick", "--profile-rounds", "2"], out)
    return proc, list(csv.DictReader(out.open())), list(csv.DictReader((out.parent / "train_profile.csv").open()))


def test_every_variant_measured(dry_run):
    proc, rows = dry_run
    by = {r["variant"]: r for r in rows}
    assert list(by) == list(VARIANTS) + ["fastcbd_compile"], [r["variant"] for r in rows]
    for v in VARIANTS:
        r = by[v]
        assert r["case"] == "resnet50" and r["status"] == "ok" and r["quick"] == "1", r
        assert float(r["img_per_s"]) > 0 and float(r["median_ms"]) > 0, r
        assert math.isclose(float(r["img_per_s"]), int(r["batch"]) / float(r["median_ms"]) * 1e3, rel_tol=1e-3), r
        assert r["interleaved"] == "1", r
    assert math.isclose(float(by["plain_fp32"]["x_plain"]), 1.0), by["plain_fp32"]
    assert math.isclose(float(by["plain_bf16"]["x_plain_bf16"]), 1.0), by["plain_bf16"]
    assert "| resnet50 | fastcbd_bf16 |" in proc.stdout, proc.stdout


def test_loader_case_rows_and_ratios(cnn_run):
    """Every variant of a loader case, interleaved, with no DataLoader workers (the same budget for all),
    and the ratio columns computed from the medians of the same run."""
    _, rows, _ = cnn_run
    by = {r["variant"]: r for r in rows}
    assert list(by) == list(VARIANTS), list(by)
    med = {v: float(r["median_ms"]) for v, r in by.items()}
    for v, r in by.items():
        assert r["status"] == "ok" and r["dry"] == "1" and "DRY SHAPE" in r["shape"] and r["data"] == "loaders", r
        assert r["interleaved"] == "1" and r["workers"] == "0" and r["threads"] == "1", r
        assert r["load1"] != "", r  # the harness records the load average with every row
        same = "plain_fp32" if r["precision"] == "fp32" else "plain_bf16"
        assert r["precision"] == ("fp32" if v.endswith("fp32") else "bf16"), r
        for col, base in (("x_plain", "plain_fp32"), ("x_plain_bf16", "plain_bf16"), ("x_equal_precision", same),
                          ("x_fastcbd_bf16", "fastcbd_bf16")):
            assert math.isclose(float(r[col]), med[base] / med[v], rel_tol=2e-3, abs_tol=2e-3), (col, r)
    cache = by["fastcbd_cache"]
    assert cache["cache_views"] == "4" and float(cache["cache_build_s"]) > 0, cache
    assert float(cache["cache_loss_err"]) < 1e-2, cache  # one batch: cached features vs the live teachers (bf16)
    saved = med["fastcbd_bf16"] - med["fastcbd_cache"]
    if saved > 0:
        assert math.isclose(float(cache["break_even_steps"]), float(cache["cache_build_s"]) * 1e3 / saved,
                            rel_tol=1e-2), cache
    else:
        assert cache["break_even_steps"] == "inf", cache


def test_component_profile(cnn_run):
    proc, rows, prof = cnn_run
    step = {r["variant"]: float(r["median_ms"]) for r in rows}
    assert [r["variant"] for r in prof] == list(VARIANTS), [r["variant"] for r in prof]
    for r in prof:
        parts = [float(r[c + "_ms"]) for c in COMPONENTS]
        assert all(p > 0 for p in parts), r
        assert math.isclose(float(r["sum_ms"]), sum(parts), rel_tol=1e-3), r
        assert math.isclose(float(r["step_ms"]), step[r["variant"]], rel_tol=1e-3), r
        assert r["rounds"] == "2", r
    assert "sum_ms is not the step" in proc.stdout, proc.stdout


def test_cache_matches_live_teachers():
    """The cache variant's teacher features and loss on a batch (fastcbd.cache's store and CachedLoader)
    against the teachers run live on the same pixels (fp32 teachers, so the only difference is the fp16
    store): features within fp16 rounding, the loss within what that rounding can move it; and another
    stored view of the same images (what a mis-indexed cache would hand out) is far off."""
    import torch

    from benchmarks.bench_train import BuiltCache, cache_check, models

    torch.manual_seed(0)
    case, cpu = DRY["cnn"], torch.device("cpu")
    shared = {}
    teachers, _ = models(case, cpu, True, shared)
    shared["cache"] = BuiltCache(case, cpu, teachers, views=3, amp="none")
    chk = cache_check(case, cpu, amp="none", shared=shared)
    fp16 = 2.0**-11  # fp16's unit roundoff
    assert chk["feat_max_rel_err"] <= fp16 + 1e-5, chk
    # the distillation term alpha beta (1 - cos) moves by at most ~2 x the features' relative error
    assert abs(chk["loss_cache"] - chk["loss_live"]) <= ALPHA * BETA * 2 * fp16, chk
    assert chk["wrong_view_err"] > 20 * fp16, chk


def test_dry_shape_is_labelled(dry_run):
    _, rows = dry_run
    for r in rows:
        assert r["dry"] == "1" and "DRY SHAPE" in r["shape"], r
        assert "resident" in r["data"] and "no decode" in r["data"], r
        assert (r["batch"], r["teachers"], r["crop"]) == ("4", "2", "32"), r


def test_mfu_columns(dry_run):
    _, rows = dry_run
    for r in rows:
        if r["status"] != "ok":
            continue
        tflops, gflop, mfu = float(r["matmul_bf16_tflops"]), float(r["step_gflop_per_img"]), float(r["mfu"])
        assert tflops > 0 and gflop > 0 and mfu > 0, r
        expect = float(r["img_per_s"]) * gflop / (tflops * 1e3)
        assert math.isclose(mfu, expect, rel_tol=0.01), f"mfu {mfu} != img/s x GFLOP / rate = {expect}: {r}"


def test_compile_over_budget_is_skipped_not_hung(dry_run):
    proc, rows = dry_run
    r = rows[-1]
    assert r["variant"] == "fastcbd_compile" and r["status"] == "skipped", r
    assert "1 s budget" in r["reason"] and "killed" in r["reason"], r
    assert r["img_per_s"] == "nan" and r["mfu"] == "nan", r
    assert "fastcbd_compile  skipped" in proc.stdout, proc.stdout


def test_model_flops_resnet50_counted_not_hard_coded():
    from benchmarks.bench_train import CASES, model_flops

    f = model_flops(CASES["resnet50"])
    # torchvision ResNet-50 at 224 px: 4.09 G multiply-adds = 8.18 GFLOP (FlopCounterMode: 2 per multiply-add)
    assert 8.1 < f["teacher_gflop"] < 8.25, f
    # the student adds its projection (2048 -> 8192) and cosine classifier (8192 -> 1000): +50 MFLOP at most
    assert 0 < f["student_gflop"] - f["teacher_gflop"] < 0.06, f
    assert math.isclose(f["step_gflop_per_img"], 3 * f["student_gflop"] + 4 * f["teacher_gflop"], rel_tol=1e-9), f
    d = model_flops(DRY["resnet50"])
    assert math.isclose(d["step_gflop_per_img"], 3 * d["student_gflop"] + 2 * d["teacher_gflop"], rel_tol=1e-9), d
