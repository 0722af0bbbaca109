"""bench_loss.py and memcheck_ops.py on the CPU: the roofline arithmetic, and the two scripts' dry runs as
`make gpu-check` calls them without a GPU (each must finish in seconds and exit 0)."""
from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a package at the repository root, not an installed one
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_loss as bl  # noqa: E402
from benchmarks import memcheck_ops as mc  # noqa: E402

CASES = {c.name: c for c in bl.CASES}
# Ceilings of the order DESIGN.md §4 quotes for an H200: 4.3 TB/s copy, ~790 TFLOP/s bf16; fp32 50 TFLOP/s.
H200 = {"copy_bytes_per_s": 4.3e12, "matmul_flops": {"fp32": 50e12, "bf16": 790e12}}


def test_case_work_imagenet_lt():
    w = bl.case_work(CASES["imagenet_lt"], "fp32")
    B, D, C = 256, 4 * 2048, 1000
    assert w["gemm_flop"] == 6 * B * C * D == 12_582_912_000
    # p, W, teachers read; target (int64) read; grad_p and grad_w written
    assert w["ideal_bytes"] == 4 * (B * D + C * D + B * D) + 8 * B + 4 * (B * D + C * D) == 90_703_872
    w16 = bl.case_work(CASES["imagenet_lt"], "bf16")
    assert w16["gemm_flop"] == w["gemm_flop"] and w16["ideal_bytes"] == (w["ideal_bytes"] - 8 * B) // 2 + 8 * B
    assert bl.case_work(CASES["distill"], "fp32") == {"gemm_flop": 0, "ideal_bytes": 4 * 3 * 256 * 8192}
    assert bl.case_work(CASES["logit_kd"], "bf16") == {"gemm_flop": 0, "ideal_bytes": 2 * 6 * 256 * 8142}


def test_roofline_floor_and_percent():
    # GEMM-bound: 12.58 GFLOP at 50 TFLOP/s = 0.2517 ms > 90.7 MB at 4.3 TB/s = 0.0211 ms
    floor, bound = bl.roofline_floor_ms(12_582_912_000, 90_703_872, 50e12, 4.3e12)
    assert bound == "gemm" and floor == pytest.approx(12_582_912_000 / 50e12 * 1e3)
    # memory-bound: no GEMM at all
    floor, bound = bl.roofline_floor_ms(0, 25_165_824, 50e12, 4.3e12)
    assert bound == "memory" and floor == pytest.approx(25_165_824 / 4.3e12 * 1e3)
    assert bl.pct_of_roofline(0.25, 1.0) == pytest.approx(25.0)
    assert bl.pct_of_roofline(0.5, 0.5) == pytest.approx(100.0)
    assert math.isnan(bl.pct_of_roofline(math.nan, 1.0)) and math.isnan(bl.pct_of_roofline(1.0, 0.0))


def test_flop_rate_takes_the_faster_of_the_dtype_and_fp32():
    assert bl.flop_rate("bf16", {"fp32": 1.0, "bf16": 5.0}) == 5.0
    assert bl.flop_rate("bf16", {"fp32": 3.0, "bf16": 2.0}) == 3.0  # a CPU without fast bf16 GEMMs
    assert bl.flop_rate("fp32", {"fp32": 3.0, "bf16": 9.0}) == 3.0


def test_add_roofline_to_rows():
    rows = [{"variant": "eager", "median_ms": 1.0}, {"variant": "triton", "median_ms": 0.05}]
    bl.add_roofline(rows, CASES["inat18"], "bf16", H200)
    flops = 6 * 256 * 8142 * 8192
    want = flops / 790e12 * 1e3  # 0.128 ms, above the memory time of ~0.13 GB at 4.3 TB/s (0.030 ms)
    for r in rows:
        assert r["roofline_bound"] == "gemm" and r["roofline_ms"] == pytest.approx(want), r
        assert r["pct_roofline"] == pytest.approx(100 * want / r["median_ms"]), r
        assert r["gemm_flop"] == flops


def test_quick_shapes_are_small():
    q = CASES["inat18"].quick()
    assert (q.name, q.B, q.Dk, q.C, q.K) == ("inat18", 32, 128, 1017, 4)
    d = CASES["distill"].quick()
    assert (d.B, d.Dk, d.C) == (32, 128, 0), d


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_dry_mode_bench_loss_fp32_bf16(tmp_path):
    """The dry-mode command of `make gpu-check`: all cases, both dtypes, ceilings, in seconds."""
    out = tmp_path / "loss.csv"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_loss.py"), "--quick", "--device", "cpu",
           "--dtype", "fp32", "bf16", "--csv", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench_loss failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    rows = _rows(out)
    ceilings = [r for r in rows if r["case"] == "ceiling"]
    assert sorted((r["op"], r["dtype"]) for r in ceilings) == [("copy", "u8"), ("matmul", "bf16"), ("matmul", "fp32")]
    assert float(next(r for r in ceilings if r["op"] == "copy")["ceiling_gbps"]) > 0
    assert all(float(r["ceiling_tflops"]) > 0 for r in ceilings if r["op"] == "matmul")
    cases = [r for r in rows if r["case"] != "ceiling"]
    got = {(r["case"], r["dtype"], r["variant"]) for r in cases}
    want = {(c.name, d, v) for c in bl.CASES for d in ("fp32", "bf16") for v in ("eager", "cpu", "torch", "floor")}
    assert got == want, f"missing {sorted(want - got)}, unexpected {sorted(got - want)}"
    for r in cases:
        assert r["quick"] == "1" and r["device"] == "cpu", r
        assert float(r["median_ms"]) > 0 and float(r["peak_mem_mb"]) >= 0, r
        assert r["roofline_bound"] in ("gemm", "memory"), r
        assert 0 < float(r["pct_roofline"]) < math.inf and float(r["roofline_ms"]) > 0, r
        if r["op"] != "cbd_loss":  # no GEMM: the distillation terms' floor is their bytes
            assert r["roofline_bound"] == "memory" and r["gemm_flop"] == "0", r
        if r["variant"] == "floor":
            assert float(r["x_floor"]) == pytest.approx(1.0), r
    assert "% roofline" in proc.stdout and "| ceiling |" in proc.stdout, proc.stdout[-3000:]
    assert f"appended {len(rows)} rows" in proc.stdout


def test_bench_loss_variants_subset_and_budget(tmp_path, monkeypatch):
    """--variants picks the variants; a spent --budget-s skips the cases but keeps the ceilings (in-process)."""
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "a.csv"
        assert bl.main(["--quick", "--only", "cifar100", "--variants", "eager,floor", "--dtype", "bf16",
                        "--csv", str(out)]) == 0
        rows = _rows(out)
        assert [(r["case"], r["variant"]) for r in rows if r["case"] != "ceiling"] == [
            ("cifar100", "eager"), ("cifar100", "floor")]
        assert all(r["dtype"] == "bf16" for r in rows if r["case"] != "ceiling")
        out2 = tmp_path / "b.csv"
        assert bl.main(["--quick", "--only", "cifar100", "--budget-s", "1e-9", "--csv", str(out2)]) == 0
        assert {r["case"] for r in _rows(out2)} == {"ceiling"}
    finally:
        torch.set_num_threads(threads)


def test_memcheck_plan_covers_every_op_backend_dtype_and_awkward_size():
    calls = mc.plan(["triton", "cuda"], list(mc.DTYPES))
    assert {c.op for c in calls} == set(mc.OPS)
    assert {(c.backend, c.grad) for c in calls} == {(b, g) for b in ("triton", "cuda") for g in (False, True)}
    assert {c.dtype for c in calls if c.op == "cosine_distill"} == {"fp32", "bf16"}
    assert {c.dtype for c in calls if c.op == "cbd_loss"} == set(mc.DTYPES)
    assert {s[0] for shapes in mc.SHAPES.values() for s in shapes} == {1, 7, 129}  # B
    assert 1 in {s[1] for s in mc.SHAPES["cosine_ce"]} and 1 in {s[2] for s in mc.SHAPES["cosine_ce"]}  # C, D
    assert 1 in {s[2] for s in mc.SHAPES["multi_teacher_kd"]}
    rounds = [mc.SHAPES[c.op].index(c.shape) for c in calls]
    assert rounds == sorted(rounds), "calls must run in rounds of growing size (a deadline cuts the largest)"
    assert {c.op for c, r in zip(calls, rounds) if r == 0} == set(mc.OPS)


def test_memcheck_refuses_a_backend_that_cannot_run(capsys):
    assert mc.main(["--device", "cpu", "--backends", "cuda"]) == 2
    assert "backend cuda cannot run" in capsys.readouterr().out


def test_dry_mode_memcheck_driver():
    """The dry-mode command of `make gpu-check`: every call on the torch and cpu backends."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memcheck_ops.py"), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"memcheck driver failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    n = len(mc.plan(["torch", "cpu"], list(mc.DTYPES)))
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"memcheck driver: {n} calls ok", last), last
    assert proc.stdout.count(" ok ") == n
