"""Smoke tests of benchmarks/bench_train.py's ResNet-50 case: the dry command `make gpu-check` runs on a
machine without a GPU (the dry shape on the CPU), the compile budget, and the FLOP count behind the MFU."""
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

EAGER = ["plain_fp32", "plain_bf16", "fastcbd", "fastcbd_vmap"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One run of the dry command plus --compile with a 1 s budget (too short even to import torch in the
    subprocess), shared by the assertions below."""
    out = tmp_path_factory.mktemp("bench_train") / "train.csv"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--only", "resnet50", "--device", "cpu",
           "--quick", "--compile", "--compile-budget", "1", "--csv", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"bench_train failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, list(csv.DictReader(out.open()))


def test_every_variant_measured(dry_run):
    proc, rows = dry_run
    by = {r["variant"]: r for r in rows}
    assert list(by) == EAGER + ["fastcbd_compile"], [r["variant"] for r in rows]
    for v in EAGER:
        r = by[v]
        assert r["case"] == "resnet50" and r["status"] == "ok" and r["quick"] == "1", r
        assert float(r["img_per_s"]) > 0 and float(r["median_ms"]) > 0, r
        assert math.isclose(float(r["img_per_s"]), int(r["batch"]) / float(r["median_ms"]) * 1e3, rel_tol=1e-3), r
        assert r["interleaved"] == "1", r
    assert math.isclose(float(by["plain_fp32"]["x_plain"]), 1.0), by["plain_fp32"]
    assert math.isclose(float(by["plain_bf16"]["x_plain_bf16"]), 1.0), by["plain_bf16"]
    assert "| resnet50 | fastcbd |" in proc.stdout, proc.stdout


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
    from benchmarks.bench_train import CASES, DRY, model_flops

    f = model_flops(CASES["resnet50"])
    # torchvision ResNet-50 at 224 px: 4.09 G multiply-adds = 8.18 GFLOP (FlopCounterMode: 2 per multiply-add)
    assert 8.1 < f["teacher_gflop"] < 8.25, f
    # the student adds its projection (2048 -> 8192) and cosine classifier (8192 -> 1000): +50 MFLOP at most
    assert 0 < f["student_gflop"] - f["teacher_gflop"] < 0.06, f
    assert math.isclose(f["step_gflop_per_img"], 3 * f["student_gflop"] + 4 * f["teacher_gflop"], rel_tol=1e-9), f
    d = model_flops(DRY["resnet50"])
    assert math.isclose(d["step_gflop_per_img"], 3 * d["student_gflop"] + 2 * d["teacher_gflop"], rel_tol=1e-9), d
