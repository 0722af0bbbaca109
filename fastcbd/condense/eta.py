"""How long a whole `fastcbd condense` run will take, estimated from its first timed steps.

The run's work is planned in units per kind: evaluation SGD steps weighted by their batch (images per
step), and per method distillation iterations weighted by the labels matched (DM / DSA: the cost of an
iteration grows with the classes of the pool) or the synthetic images unrolled (MTT), and MTT's experts
by the real images they train on. Each kind's seconds per unit come from its first steps as they run (the
first step of a kind, which includes its warm-up, is not timed), and an estimate is logged when a kind is
first timed and at the end of each seed. It is an estimate: the weights are proportional costs, not exact.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict

log = logging.getLogger("fastcbd")


def duration(seconds: float) -> str:
    s = round(seconds)
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def plan(cfg, counts, budget, groups) -> dict[str, float]:
    """Planned units per kind ('eval', 'dm', 'dsa', 'mtt', 'mtt experts') of a whole run of `cfg`."""
    e, n_real, n_syn, c = cfg.eval, sum(counts), sum(budget), len(counts)
    k = len(groups) if groups else max(cfg.groups, 1)
    steps = e.repeats * e.steps
    units: dict[str, float] = defaultdict(float)
    per_seed = 0.0
    if (cfg.baselines and getattr(cfg, "full_baseline", True)) or cfg.grouping == "kmeans":
        per_seed += steps * min(e.batch, n_real)
    if cfg.baselines:
        per_seed += steps * min(e.batch, n_syn)
    iterations = {"dm": cfg.dm.iterations, "dsa": cfg.gm.iterations, "mtt": cfg.mtt.iterations,
                  "rldd": cfg.rldd.iterations}
    # with a relabel teacher every set is also evaluated relabeled (and calibrated: once more)
    relabel = bool(getattr(cfg, "relabel", "")) or "rldd" in cfg.methods
    evals = 1 + relabel * (1 + bool(getattr(cfg, "relabel_calibrate", False)))
    if cfg.baselines:
        per_seed += (evals - 1) * steps * min(e.batch, n_syn)
    for m in cfg.methods:
        per_seed += evals * steps * min(e.batch, n_syn)
        per_syn = m in ("mtt", "rldd")  # their bars' units are images, DM / DSA's classes
        units[m] += cfg.seeds * iterations[m] * (n_syn if per_syn else c)
        if cfg.hierarchical:
            two_stage = steps * (min(e.batch, n_syn) * (k > 1) + k * min(e.batch, max(n_syn // k, 1)))
            per_seed += 2 * two_stage * (1 + relabel)  # +2stage and +hier
            units[m] += cfg.seeds * iterations[m] * (2 * n_syn if per_syn else c + k * (k > 1))
        if m == "mtt":
            units["mtt experts"] += cfg.mtt.num_experts * n_real * (3 if cfg.hierarchical else 1)
    units["eval"] = cfg.seeds * per_seed
    return dict(units)


class RunClock:
    """Times the progress bars' updates per kind and logs the estimate of the whole run."""

    def __init__(self, units: dict[str, float], first: int = 3):
        self.units, self.first = {k: v for k, v in units.items() if v > 0}, first
        self.t0 = time.perf_counter()
        self.done: dict[str, float] = defaultdict(float)
        self.timed: dict[str, float] = defaultdict(float)
        self.seconds: dict[str, float] = defaultdict(float)
        self.ticks: dict[str, int] = defaultdict(int)
        self.reported: set[str] = set()
        self.first_total: float | None = None

    def track(self, bar, kind: str, weight: float = 1.0):
        return _Tracked(bar, self, kind, float(weight))

    def tick(self, kind: str, weight: float, seconds: float) -> None:
        self.ticks[kind] += 1
        self.done[kind] += weight
        if self.ticks[kind] == 1:  # warm-up (first network, allocations): not a rate
            return
        self.timed[kind] += weight
        self.seconds[kind] += seconds
        if kind not in self.reported and self.ticks[kind] > self.first:
            self.reported.add(kind)
            self.report()

    def estimate(self) -> tuple[float, list[str], list[str]]:
        """(seconds of the timed kinds, their 'kind time' parts, the kinds not timed yet)."""
        total, parts, pending = 0.0, [], []
        for kind, units in self.units.items():
            if self.timed[kind] > 0:
                s = units * self.seconds[kind] / self.timed[kind]
                total += s
                parts.append(f"{kind} {duration(s)}")
            else:
                pending.append(kind)
        return total, parts, pending

    def record(self) -> dict:
        """For results.json: the first complete estimate and the planned and done units per kind."""
        return {"estimate_s": self.first_total, "units_planned": dict(self.units), "units_done": dict(self.done)}

    def report(self) -> None:
        total, parts, pending = self.estimate()
        elapsed = duration(time.perf_counter() - self.t0)
        if not pending:
            if self.first_total is None:
                self.first_total = total
            log.info("time estimate: the whole run ~%s (%s); %s so far", duration(total), ", ".join(parts), elapsed)
        else:
            log.info("time estimate: at least %s for %s, plus %s (not timed yet: estimated when it starts); "
                     "%s so far", duration(total), ", ".join(parts), ", ".join(pending), elapsed)


class _Tracked:
    """A progress bar whose update() also reports the time since the previous update (or its creation)."""

    def __init__(self, bar, clock: RunClock, kind: str, weight: float):
        self.bar, self.clock, self.kind, self.weight = bar, clock, kind, weight
        self.last = time.perf_counter()

    def update(self, n: int = 1):
        now = time.perf_counter()
        self.clock.tick(self.kind, self.weight * n, now - self.last)
        self.last = now
        return self.bar.update(n)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.bar, name)
