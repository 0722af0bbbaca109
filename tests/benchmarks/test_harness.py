"""Smoke tests of the benchmark harness (CPU, seconds); bench_loss.py has test_bench_loss.py."""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a package at the repository root, not an installed one
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import append_rows, machine_info, measure, print_table  # noqa: E402


def test_measure_trivial_fn():
    x = torch.ones(256, 1024)  # 1 MiB input: not counted (alive before the call)
    calls = []

    def setup():
        calls.append("setup")
        return x

    def fn(t):
        calls.append("fn")
        return t * 2.0  # one new 1 MiB tensor

    res = measure(fn, warmup=2, repeats=7, setup=setup)
    assert calls == ["setup", "fn"] * (2 + 7 + 1), f"setup/fn call order: {calls}"  # +1: the memory call
    assert res["repeats"] == 7
    assert 0 < res["min_ms"] <= res["p10_ms"] <= res["median_ms"] <= res["p90_ms"] <= res["max_ms"], res
    assert res["median_ms"] < 1000, res
    assert res["mem_method"] == "cpu_profiler_alloc_peak"
    assert math.isclose(res["peak_mem_mb"], 1.0, rel_tol=0.05), f"peak {res['peak_mem_mb']} MiB, expected 1"


def test_measure_without_setup_or_memory():
    res = measure(lambda: None, warmup=0, repeats=3, memory=False)
    assert res["median_ms"] >= 0 and math.isnan(res["peak_mem_mb"]) and res["mem_method"] == "none"


def test_peak_memory_counts_temporaries_alive_together():
    x = torch.ones(256, 1024)

    def fn():
        a = x + 1  # 1 MiB
        b = a * 2  # 1 MiB, both alive: 2 MiB
        del a
        return b.sum()  # a freed before the end: the peak, not the final, is reported

    res = measure(fn, warmup=1, repeats=3)
    assert math.isclose(res["peak_mem_mb"], 2.0, rel_tol=0.05), res


def test_machine_info_fields():
    info = machine_info()
    for key in ("cpu", "cores", "torch", "triton", "threads", "gpu", "commit", "load1"):
        assert key in info, f"machine_info lacks {key}: {info}"
    assert info["threads"] == torch.get_num_threads()


def test_append_rows_header_once_then_appends(tmp_path):
    path = tmp_path / "sub" / "r.csv"
    append_rows(path, [{"case": "a", "median_ms": 1.5}])
    append_rows(path, [{"case": "b", "median_ms": 2.5}, {"case": "c", "median_ms": 3.5}])
    lines = path.read_text().splitlines()
    assert sum(line.startswith("timestamp,") for line in lines) == 1, lines
    rows = list(csv.DictReader(path.open()))
    assert [r["case"] for r in rows] == ["a", "b", "c"]
    assert all(r["timestamp"] and r["cpu"] and r["torch"] == torch.__version__ for r in rows), rows
    # a new column widens the header once; old rows keep their cells and get an empty one
    append_rows(path, [{"case": "d", "median_ms": 4.5, "extra": "x"}])
    rows = list(csv.DictReader(path.open()))
    assert [r["case"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["extra"] for r in rows] == ["", "", "", "x"]
    assert sum(line.startswith("timestamp,") for line in path.read_text().splitlines()) == 1


def test_print_table_markdown(capsys):
    text = print_table([{"a": 1.23456, "b": "x"}, {"a": float("nan")}], ["a", ("b", "B")])
    assert text.splitlines() == ["| a | B |", "|---|---|", "| 1.23 | x |", "| - | - |"]
    assert capsys.readouterr().out.strip() == text

