"""--preset auto (the paper protocol on a GPU, the CPU preset without one) and the whole-run time estimate
(fastcbd/condense/eta.py): its arithmetic on a fake clock, and its plan against the work a run does."""
import logging

import pytest

from fastcbd.condense import eta
from fastcbd.condense.presets import apply_preset, choose_preset
from fastcbd.condense.run import CondenseConfig, run_condense


@pytest.mark.parametrize("requested,device,name,why", [
    ("auto", "cpu", "cpu", "no CUDA GPU"),
    ("auto", "cuda", "paper", "the paper protocol"),
    ("paper", "cpu", "paper", "takes hours"),
    ("cpu", "cuda", "cpu", "--preset cpu on cuda"),
])
def test_choose_preset(requested, device, name, why):
    got, reason = choose_preset(requested, device)
    assert got == name and why in reason, (got, reason)


class FakeBar:
    def __init__(self):
        self.n = 0

    def update(self, n=1):
        self.n += n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_clock_estimates_the_whole_run_from_the_first_steps(monkeypatch, caplog):
    now = [0.0]
    monkeypatch.setattr(eta.time, "perf_counter", lambda: now[0])
    clock = eta.RunClock({"eval": 1000, "dm": 40})
    caplog.set_level(logging.INFO, logger="fastcbd")
    with clock.track(FakeBar(), "eval", weight=10) as bar:  # 100 steps of 10 images, 2 s a step
        for i in range(5):
            now[0] += 9.0 if i == 0 else 2.0  # the first step carries the warm-up: not timed
            bar.update()
    assert "at least 3 min for eval 3 min, plus dm" in caplog.text, caplog.text
    with clock.track(FakeBar(), "dm", weight=4) as bar:  # 10 iterations over 4 labels, 6 s each
        for _ in range(5):
            now[0] += 6.0
            bar.update()
    assert "the whole run ~4 min (eval 3 min, dm 60 s)" in caplog.text, caplog.text
    assert clock.record()["estimate_s"] == pytest.approx(200 + 60)
    assert clock.record()["units_done"] == {"eval": 50, "dm": 20}


@pytest.mark.parametrize("hierarchical", [False, True])
def test_plan_is_the_work_the_run_does(tmp_path, hierarchical):
    """The planned units per kind equal those the progress bars report on a tiny MNIST-LT run."""
    cfg = CondenseConfig(methods=("dm",), ipc=10, hierarchical=hierarchical, seeds=1, threads=1)
    apply_preset(cfg, "cpu")
    cfg.dm.iterations, cfg.dm.width, cfg.eval.width, cfg.eval.repeats, cfg.eval.steps = 2, 4, 4, 1, 2
    r = run_condense(cfg, str(tmp_path), progress=False)
    units = r["time_estimate"]
    assert set(units["units_done"]) == set(units["units_planned"]) == {"eval", "dm"}
    for kind, planned in units["units_planned"].items():
        assert units["units_done"][kind] == pytest.approx(planned, rel=0.05), (kind, units)
    assert r["preset"]["name"] == "paper", "CondenseConfig's own default; the command line resolves --preset auto"
