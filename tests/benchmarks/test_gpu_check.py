"""`make gpu-check`: the step runner's rules (deadline, limits, resume, report) on fake steps, and the real
script's dry mode end to end, so it cannot rot between GPU windows."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.stepper import Cmd, Runner, Skip, Step, pytest_counts

ROOT = Path(__file__).resolve().parents[2]


def py(code: str) -> Cmd:
    return Cmd([sys.executable, "-c", code])


def make_runner(tmp_path, steps, *, deadline=60.0, reports=None, **kw):
    reports = reports if reports is not None else []
    return Runner(steps, tmp_path / "work", deadline_s=deadline, dry=False, cwd=tmp_path, env={},
                  report=lambda res: reports.append([(r.name, r.status) for r in res]), echo=lambda *a, **k: None,
                  **kw)


def test_a_failing_step_does_not_stop_the_rest_and_each_gets_a_reason(tmp_path):
    def skip(dry):
        raise Skip("no such tool")

    steps = [Step("a", "fails", 10, lambda d: [py("import sys; print('boom'); sys.exit(3)")]),
             Step("b", "passes", 10, lambda d: [py("print('fine')")]),
             Step("c", "skips", 10, skip),
             Step("d", "set-up raises", 10, lambda d: 1 / 0)]
    reports = []
    res = {r.name: r for r in make_runner(tmp_path, steps, reports=reports).run()}
    assert (res["a"].status, res["a"].detail) == ("fail", "exit code 3: boom")
    assert (res["b"].status, res["b"].detail) == ("pass", "fine")
    assert (res["c"].status, res["c"].detail) == ("skipped", "no such tool")
    assert res["d"].status == "fail" and "ZeroDivisionError" in res["d"].detail
    # the report is rewritten before the first step and after every step
    assert len(reports) >= 5 and reports[0] == [(n, "pending") for n in "abcd"]
    assert (tmp_path / "work" / "logs" / "a.log").read_text().endswith("\nboom\n")


def test_step_limit_kills_the_whole_process_group(tmp_path):
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    steps = [Step("slow", "sleeps", 2.0, lambda d: [py(child)]), Step("next", "runs", 10, lambda d: [py("pass")])]
    res = make_runner(tmp_path, steps).run()
    assert res[0].status == "fail" and "timed out after its limit of 2 s" in res[0].detail, res[0].detail
    assert res[0].seconds < 15 and res[1].status == "pass"


def test_global_deadline_leaves_later_steps_not_reached_and_a_rerun_continues(tmp_path):
    steps = [Step("a", "quick", 5, lambda d: [py("pass")]),
             Step("b", "eats the deadline", 30, lambda d: [py("import time; time.sleep(30)")]),
             Step("c", "never starts", 20, lambda d: [py("pass")])]
    res = make_runner(tmp_path, steps, deadline=3.0, min_share=0.05).run()
    assert [r.status for r in res] == ["pass", "not reached", "not reached"], [(r.status, r.detail) for r in res]
    assert "cut at the global deadline" in res[1].detail and "global deadline" in res[2].detail
    # second invocation, more time: a is kept from the first run, b and c run now
    steps[1] = Step("b", "now quick", 30, lambda d: [py("pass")])
    res2 = make_runner(tmp_path, steps, deadline=60.0).run()
    assert [(r.status, r.reused) for r in res2] == [("pass", True), ("pass", False), ("pass", False)]


def test_resume_reruns_failed_steps_and_passed_steps_whose_inputs_changed(tmp_path):
    key = {"v": "1"}
    marker = tmp_path / "ran"
    steps = [Step("keyed", "depends on v", 10, lambda d: [py(f"open({str(marker)!r}, 'a').write('x')")],
                  key=lambda: key["v"]),
             Step("flaky", "fails first", 10, lambda d: [py(f"import os, sys; sys.exit(0 if os.path.exists({str(marker)!r} + '2') else 1)")])]
    assert [r.status for r in make_runner(tmp_path, steps).run()] == ["pass", "fail"]
    (tmp_path / "ran2").write_text("")
    res = make_runner(tmp_path, steps).run()
    assert [(r.status, r.reused) for r in res] == [("pass", True), ("pass", False)] and marker.read_text() == "x"
    key["v"] = "2"
    make_runner(tmp_path, steps).run()
    assert marker.read_text() == "xx"
    make_runner(tmp_path, steps, fresh=True).run()
    assert marker.read_text() == "xxx"
    res = make_runner(tmp_path, steps, only=["flaky"]).run()  # explicit --steps: run those even if passed
    assert [(r.status, r.reused) for r in res] == [("pass", True), ("pass", False)] and marker.read_text() == "xxx"


def test_pytest_counts_reads_the_summary_line():
    assert pytest_counts("...\n== 2 failed, 30 passed, 4 skipped, 1 error in 3.2s ==\n") == {
        "failed": 2, "passed": 30, "skipped": 4, "error": 1}
    assert pytest_counts("x\n41/610 tests collected (569 deselected) in 2.1s\n") == {"collected": 41, "deselected": 569}
    assert pytest_counts("no summary") == {}


def test_verify_ext_names_a_missing_cuda_kernel(monkeypatch, capsys):
    from fastcbd import _ext

    if not _ext.with_cuda():
        pytest.skip(f"fastcbd._C without CUDA kernels here ({_ext.IMPORT_ERROR!r})")
    assert gpu_check.verify_ext(require_cuda=True) == 0
    import torch

    real = torch._C._dispatch_has_kernel_for_dispatch_key
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                        lambda name, key: False if (name, key) == ("fastcbd_C::cbd_loss_fwd", "CUDA") else real(name, key))
    assert gpu_check.verify_ext(require_cuda=True) == 1
    assert "cbd_loss_fwd[CUDA]" in capsys.readouterr().out


def test_dry_mode_runs_every_step_and_reports_them_skipped(tmp_path):
    """The real script without a GPU: each step's dry command runs; all seven end `skipped` with the reason,
    exit 0, at most 8 files in the report folder, the status table printed last."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry", "--work", str(tmp_path / "work"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}\n{log[-4000:]}"
    report = json.loads((out / "report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["build", "tests", "memcheck", "loss", "decode", "train", "condense"]
    for name, s in steps.items():
        assert s["status"] == "skipped" and "no CUDA GPU here; dry run ok" in s["detail"], (name, s)
    assert "GPU tests collected" in steps["tests"]["detail"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.md", "report.json", "gpu_check.log", "loss.csv"} <= set(files), files
    last = proc.stdout.strip().splitlines()
    assert last[-1].startswith("| condense | skipped") and last[-9].startswith("| step | status"), last[-10:]
