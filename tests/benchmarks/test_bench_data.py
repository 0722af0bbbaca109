"""Smoke test of bench_data.py's decode case in its dry mode (the CPU run `make gpu-check` makes without a GPU)."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_data_decode_dry_run(tmp_path):
    out = tmp_path / "data.csv"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), "--only", "decode", "--device", "cpu",
           "--quick", "--csv", str(out), "--folder", str(tmp_path / "jpegs")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench_data failed:\n{proc.stdout}\n{proc.stderr}"
    rows = list(csv.DictReader(out.open()))
    got = {(r["case"], r["variant"]) for r in rows}
    want = {("decode_jpeg", "cpu_per_image"), ("decode_jpeg", "cpu_thread_pool"), ("decode_jpeg", "batched"),
            ("loader_rrc224", "nvjpeg_loader"), ("bad_retry", "clean_batch"), ("bad_retry", "one_bad_file")}
    assert got == want, f"rows {sorted(got)}"
    assert all(r["bench"] == "data" and r["device"] == "cpu" and r["on"] == "cpu" for r in rows), rows
    for r in rows:
        assert float(r["img_per_s"]) > 0 and float(r["median_ms"]) > 0, r
        assert int(r["images"]) == (32 if r["case"] == "bad_retry" else 64), r
    retry = next(r for r in rows if r["variant"] == "one_bad_file")
    assert float(retry["retry_x"]) > 0 and float(next(r for r in rows if r["variant"] == "batched")["x_cpu_best"]) > 0
    assert "| decode_jpeg | batched | cpu |" in proc.stdout, proc.stdout
