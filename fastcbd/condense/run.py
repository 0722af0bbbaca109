"""`fastcbd condense`: distil a long-tailed dataset with DM / DSA / MTT / RLDD (optionally hierarchically),
evaluate against the random-real and full-data baselines over seeds, with hard labels and (--relabel) with a
teacher's soft labels, and write the outputs (outputs.py)."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from fastcbd.condense.dm import DMConfig, distill_dm
from fastcbd.condense.dsa import DSA, DSAConfig
from fastcbd.condense.eta import RunClock, plan
from fastcbd.condense.evaluate import EvalConfig, predict, summarize, train_classifiers
from fastcbd.condense.gm import GMConfig, distill_gm
from fastcbd.condense.grouping import (
    class_means,
    groups_by_frequency,
    groups_by_kmeans,
    groups_by_shots,
    inter_class_bias,
)
from fastcbd.condense.hierarchical import distill_hierarchical, relabel_by_group, train_two_stage
from fastcbd.condense.mtt import MTTConfig, distill_mtt, train_experts
from fastcbd.condense.outputs import save_grid, save_synthetic, write_results
from fastcbd.condense.pool import RealPool, channel_stats, to_tensor
from fastcbd.condense.relabel import auto_settings, auto_teacher, load_labeler
from fastcbd.condense.rldd import RLDDConfig, distill_rldd
from fastcbd.condense.synthetic import SyntheticSet, class_budget
from fastcbd.train.metrics import shot_accuracy

log = logging.getLogger("fastcbd")
METHODS = ("dm", "dsa", "mtt", "rldd")


@dataclass
class CondenseConfig:
    methods: tuple = ("dm",)
    dataset: str = "mnist-lt"  # mnist-lt | cifar10-lt | cifar100-lt
    data_root: str | None = None
    rho: float = 100.0
    data_seed: int = 0
    ipc: int = 10
    hierarchical: bool = False
    groups: int = 2
    grouping: str = "frequency"  # frequency | shots | kmeans
    group_ipc: int = 0  # images per group at the group level; 0: ipc x the group's classes
    seeds: int = 1
    soft_labels: bool = False
    baselines: bool = True
    full_baseline: bool = True  # the whole long-tailed set as a baseline (with baselines)
    threads: int = 0
    device: str = "cpu"
    preset: str = "paper"  # the --preset applied (auto resolved: fastcbd.condense.presets.choose_preset)
    preset_why: str = ""  # why that preset (logged, and in results.json)
    matching: str = "auto"  # DM / DSA: batched (all classes per call) | loop (per class) | auto: batched on a GPU,
    # loop on the CPU, where the batched forms measured slower (benchmarks/bench_condense.py)
    relabel: str = ""  # "" | a fastcbd model file | auto (balanced-softmax teacher, cached); rldd: auto by default
    relabel_tau: float = 2.0  # chosen on the MNIST-LT validation split (docs/condense.md)
    relabel_calibrate: bool = False  # also evaluate with the ADSA-style calibrated soft labels (relabel.py)
    teacher_steps: int = 10000  # --relabel auto: the teacher's SGD steps of 128 images (relabel.train_auto_teacher)
    teacher_width: int = 128  # --relabel auto: the teacher's ConvNet-3 width
    dm: DMConfig = field(default_factory=DMConfig)
    gm: GMConfig = field(default_factory=GMConfig)
    mtt: MTTConfig = field(default_factory=MTTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dsa: DSAConfig = field(default_factory=DSAConfig)
    rldd: RLDDConfig = field(default_factory=RLDDConfig)


def load_splits(cfg: CondenseConfig):
    if cfg.dataset == "mnist-lt":
        from fastcbd.data.arrays import mnist_lt

        return mnist_lt(cfg.rho, seed=cfg.data_seed)
    if cfg.dataset in ("cifar10-lt", "cifar100-lt"):
        k = 10 if cfg.dataset == "cifar10-lt" else 100
        if not cfg.data_root:
            raise ValueError(f"--dataset {cfg.dataset} needs --data-root (the folder of the CIFAR-{k} python batches)")
        from fastcbd.data.arrays import ArraySplits
        from fastcbd.data.cifar import cifar_lt

        tr = cifar_lt(cfg.data_root, k, cfg.rho, cfg.data_seed, train=True)
        te = cifar_lt(cfg.data_root, k, cfg.rho, cfg.data_seed, train=False)
        return ArraySplits(tr.name, tr.images, tr.labels, te.images, te.labels, k)
    raise ValueError(f"--dataset {cfg.dataset!r}: expected mnist-lt, cifar10-lt or cifar100-lt")


def matching_mode(matching: str, device: torch.device) -> str:
    """DM / DSA class matching: "batched" (all classes per call) or "loop" (one class per call). auto: the
    loop on the CPU, where it measured faster (benchmarks/bench_condense.py), batched on a GPU."""
    if matching not in ("auto", "batched", "loop"):
        raise ValueError(f"matching={matching!r}: expected auto, batched or loop")
    if matching != "auto":
        return matching
    return "batched" if device.type == "cuda" else "loop"


class Runner:
    """One seed's worth of state: data tensors, augmentation, and the evaluation runs it collects."""

    def __init__(self, cfg: CondenseConfig, splits, out_dir: str, progress: bool):
        self.cfg, self.out_dir, self.progress = cfg, out_dir, progress
        self.num_classes = splits.num_classes
        self.counts = splits.class_counts
        self.mean, self.std = channel_stats(splits.x_train)
        dev = torch.device(cfg.device)
        self.x_train = to_tensor(splits.x_train, self.mean, self.std).to(dev)
        self.y_train = torch.from_numpy(splits.y_train).to(dev)
        self.x_test = to_tensor(splits.x_test, self.mean, self.std).to(dev)
        self.y_test = splits.y_test
        self.pool = RealPool(self.x_train, self.y_train, self.num_classes)
        self.runs: dict[str, list] = defaultdict(list)
        self.times: dict[str, float] = defaultdict(float)
        self.images: dict[str, int] = {}
        self.groups = None
        self.clock = None  # a RunClock (eta.py) once the run is planned
        self.labeler = None  # relabel.SoftLabeler with --relabel (or rldd)
        self.stage_times: dict[str, float] = defaultdict(float)  # seconds per stage, summed over seeds

    def timed(self, stage: str):
        """A context manager adding its block's seconds to stage_times[stage]."""
        runner = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                runner.stage_times[stage] += time.perf_counter() - self.t0
        return _T()

    def bar(self, total: int, desc: str, kind: str | None = None, weight: float = 1.0):
        """A progress bar; with `kind`, its updates are also timed by the run's clock (eta.py)."""
        bar = tqdm(total=total, desc=desc, leave=False, disable=not self.progress, dynamic_ncols=True)
        return self.clock.track(bar, kind, weight) if (kind and self.clock is not None) else bar

    def record(self, name: str, pred: np.ndarray) -> None:
        m = shot_accuracy(pred, self.y_test, self.counts)
        m.update(inter_class_bias(pred, self.y_test, self.counts, self.groups))
        self.runs[name].append(m)

    def evaluate(self, name: str, x, t, seed: int, aug: DSA, keep_first: bool = False, relabel: bool = True):
        """Hard-label evaluation of (x, t) recorded as `name`; with a teacher (and relabel) also relabeled,
        as `name@relabel`, and with --relabel-calibrate calibrated, as `name@calibrated`."""
        ecfg, first = self.cfg.eval, None
        kinds = [("", None)]
        if self.labeler is not None and relabel:
            kinds.append(("@relabel", self.labeler))
            if self.cfg.relabel_calibrate:
                kinds.append(("@calibrated", self.labeler))
        for suffix, teacher in kinds:
            with self.timed(f"{name}: evaluation{suffix or ' (hard labels)'}"), \
                    self.bar(ecfg.repeats * ecfg.steps, f"eval {name}{suffix} seed {seed}", "eval",
                             min(ecfg.batch, len(x))) as bar:
                if suffix == "@calibrated":
                    self.labeler.calibrate(x, aug)
                try:
                    seeds = [seed * 100 + r for r in range(ecfg.repeats)]
                    for net in train_classifiers(x, t, self.num_classes, ecfg, seeds, aug, bar, teacher):
                        self.record(name + suffix, predict(net, self.x_test))
                        first = first if first is not None else net
                finally:
                    if teacher is not None:
                        teacher.bias = None
        return first if keep_first else None

    def evaluate_two_stage(self, name: str, group_x, group_t, class_sets, seed: int, aug: DSA) -> None:
        ecfg = self.cfg.eval
        n_nets = (len(self.groups) > 1) + sum(s is not None for s in class_sets)
        sizes = ([len(group_x)] if len(self.groups) > 1 and group_x is not None else []) + \
            [len(s[0]) for s in class_sets if s is not None]
        weight = sum(min(ecfg.batch, n) for n in sizes) / max(len(sizes), 1)
        for suffix, teacher in [("", None)] + ([("@relabel", self.labeler)] if self.labeler is not None else []):
            with self.timed(f"{name}: evaluation{suffix or ' (hard labels)'}"), \
                    self.bar(ecfg.repeats * ecfg.steps * n_nets, f"eval {name}{suffix} seed {seed}", "eval",
                             weight) as bar:
                for r in range(ecfg.repeats):
                    ts = train_two_stage(self.groups, group_x, group_t, class_sets, ecfg, seed * 100 + r, aug, bar,
                                         teacher)
                    self.record(name + suffix, ts.predict(self.x_test))

    def distiller(self, method: str, seed: int, aug: DSA):
        cfg = self.cfg
        loop = matching_mode(cfg.matching, torch.device(cfg.device)) == "loop"

        def distill(pool, syn, s, tag):
            if method == "dm":
                with self.bar(cfg.dm.iterations, f"dm {tag} seed {seed}", "dm", pool.num_labels) as bar:
                    distill_dm(pool, syn, cfg.dm, aug, s, bar, loop=loop)
            elif method == "dsa":
                with self.bar(cfg.gm.iterations, f"dsa {tag} seed {seed}", "dsa", pool.num_labels) as bar:
                    distill_gm(pool, syn, cfg.gm, aug, s, bar, loop=loop)
            elif method == "rldd":
                # the relabel teacher scores the crops of the class-level set; a group-level or within-group
                # pool (hierarchical) has other labels, and its own observer scores them
                scorer = self.labeler.probs if (self.labeler is not None and tag == "all") else None
                embed = self.labeler.features if (scorer is not None and self.labeler.has_features) else None
                with self.bar(cfg.rldd.iterations, f"rldd {tag} seed {seed}", "rldd", len(syn.labels)) as bar:
                    sub = {}
                    distill_rldd(pool, syn, cfg.rldd, aug, s, bar, scorer, sub, embed)
                for k, v in sub.items():
                    self.stage_times[f"rldd: {k}" + ("" if tag == "all" else f" ({tag})")] += v
            elif method == "mtt":
                with self.bar(cfg.mtt.num_experts, f"mtt experts {tag}", "mtt experts", len(pool.y)) as bar:
                    paths = train_experts(pool, cfg.mtt, os.path.join(self.out_dir, "experts", tag), aug, 0, bar)
                with self.bar(cfg.mtt.iterations, f"mtt {tag} seed {seed}", "mtt", len(syn.labels)) as bar:
                    distill_mtt(pool, syn, cfg.mtt, aug, s, paths, bar)
            else:
                raise ValueError(f"--method {method!r}: expected one of {METHODS}")
        return distill

    def make_groups(self, full_net) -> list[list[int]]:
        cfg = self.cfg
        if cfg.grouping == "frequency":
            return groups_by_frequency(self.counts, cfg.groups)
        if cfg.grouping == "shots":
            return groups_by_shots(self.counts)
        if cfg.grouping == "kmeans":
            means = class_means(full_net.embed, self.x_train, self.y_train, self.num_classes)
            return groups_by_kmeans(means, cfg.groups, seed=cfg.data_seed)
        raise ValueError(f"--grouping {cfg.grouping!r}: expected frequency, shots or kmeans")

    def save(self, name: str, seed: int, blob: dict, grid_x, grid_y) -> None:
        save_synthetic(os.path.join(self.out_dir, "synthetic", f"{name}_seed{seed}.pt"),
                       {**blob, "mean": self.mean, "std": self.std, "method": name, "seed": seed})
        if seed == 0:
            save_grid(os.path.join(self.out_dir, f"{name}.png"), grid_x, grid_y, self.mean, self.std, self.num_classes)

    def run_seed(self, seed: int) -> None:
        cfg = self.cfg
        aug = DSA(cfg.dsa, seed)
        gen = torch.Generator().manual_seed(seed)
        full_net = None
        if (cfg.baselines and cfg.full_baseline) or cfg.grouping == "kmeans":
            t0 = time.perf_counter()
            self.groups = None
            full_net = self.evaluate("full_lt", self.x_train, self.y_train, seed, aug, keep_first=True)
            self.times["full_lt"] += time.perf_counter() - t0
            self.images["full_lt"] = len(self.y_train)
        self.groups = self.make_groups(full_net)
        if cfg.baselines:
            t0 = time.perf_counter()
            rand = SyntheticSet.from_real(self.pool, cfg.ipc, gen)
            self.evaluate("random_real", rand.images.detach(), rand.labels, seed, aug)
            self.times["random_real"] += time.perf_counter() - t0
            self.images["random_real"] = len(rand.labels)
        for method in cfg.methods:
            distill = self.distiller(method, seed, aug)
            t0 = time.perf_counter()
            syn = SyntheticSet.from_real(self.pool, cfg.ipc, gen, cfg.soft_labels)
            with self.timed(f"{method}: distillation"):
                distill(self.pool, syn, seed, "all")
            self.evaluate(method, syn.images.detach(), syn.targets().detach(), seed, aug)
            self.times[method] += time.perf_counter() - t0
            self.images[method] = len(syn.labels)
            self.save(method, seed, syn.export(), syn.images, syn.labels)
            if not cfg.hierarchical:
                continue
            t0 = time.perf_counter()
            group_t, sets = relabel_by_group(syn.images.detach(), syn.labels, self.groups, self.num_classes)
            self.evaluate_two_stage(f"{method}+2stage", syn.images.detach(), group_t, sets, seed, aug)
            self.times[f"{method}+2stage"] += time.perf_counter() - t0
            self.images[f"{method}+2stage"] = len(syn.labels)
            t0 = time.perf_counter()
            with self.timed(f"{method}+hier: distillation"):
                hs = distill_hierarchical(self.pool, self.groups, cfg.ipc, distill, seed,
                                          [cfg.group_ipc] * len(self.groups) if cfg.group_ipc else None,
                                          cfg.soft_labels)
            gs = hs["group"]
            class_sets = [None if s is None else (s.images.detach(), s.targets().detach()) for s in hs["classes"]]
            self.evaluate_two_stage(f"{method}+hier", gs.images.detach() if gs is not None else None,
                                    gs.targets().detach() if gs is not None else None, class_sets, seed, aug)
            self.times[f"{method}+hier"] += time.perf_counter() - t0
            n = (len(gs.labels) if gs is not None else 0) + sum(len(s.labels) for s in hs["classes"] if s is not None)
            self.images[f"{method}+hier"] = n
            self._save_hier(f"{method}+hier", seed, hs)

    def _save_hier(self, name: str, seed: int, hs: dict) -> None:
        blob = {"groups": self.groups, "group": hs["group"].export() if hs["group"] is not None else None,
                "classes": [s.export() if s is not None else None for s in hs["classes"]]}
        xs, ys = [], []
        for members, s in zip(self.groups, hs["classes"]):
            if s is not None:
                xs.append(s.images.detach())
                ys.append(torch.tensor(members)[s.labels])
        if xs:
            self.save(name, seed, blob, torch.cat(xs), torch.cat(ys))
        if hs["group"] is not None and seed == 0:
            g = hs["group"]
            save_grid(os.path.join(self.out_dir, f"{name}_groups.png"), g.images, g.labels, self.mean, self.std,
                      len(self.groups))


def _settings(cfg: CondenseConfig) -> str:
    iters = {"dm": cfg.dm.iterations, "dsa": cfg.gm.iterations, "mtt": cfg.mtt.iterations, "rldd": cfg.rldd.iterations}
    return (", ".join(f"{m} {iters[m]} iterations" for m in cfg.methods)
            + f"; evaluation {cfg.eval.repeats} x {cfg.eval.steps} steps; ConvNet width {cfg.eval.width}; "
            f"{cfg.seeds} seed(s)")


def run_condense(cfg: CondenseConfig, out_dir: str, progress: bool = True) -> dict:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    for m in cfg.methods:
        if m not in METHODS:
            raise ValueError(f"--method {m!r}: expected one of {METHODS}")
    splits = load_splits(cfg)
    if cfg.dataset == "mnist-lt":
        cfg.dsa.flip = False  # a mirrored digit is another symbol (the DSA reference drops flip on MNIST)
    os.makedirs(out_dir, exist_ok=True)
    runner = Runner(cfg, splits, out_dir, progress)
    teacher = setup_teacher(cfg, runner, splits, out_dir, progress)
    budget, tail = class_budget(runner.counts, cfg.ipc)
    if tail:
        log.info("tail rule: class(es) %s have fewer real images than IPC %d; using all of them (%s)",
                 sorted(tail), cfg.ipc, tail)
    groups = groups_by_frequency(runner.counts, cfg.groups) if cfg.grouping == "frequency" else (
        groups_by_shots(runner.counts) if cfg.grouping == "shots" else None)
    runner.clock = RunClock(plan(cfg, runner.counts, budget, groups))
    log.info("preset %s on %s: %s", cfg.preset, cfg.device, _settings(cfg))
    t0 = time.perf_counter()
    for seed in range(cfg.seeds):
        runner.run_seed(seed)
        log.info("seed %d done (%.0f s)", seed, time.perf_counter() - t0)
        if seed + 1 < cfg.seeds:
            runner.clock.report()
    methods = {}
    for name, runs in runner.runs.items():
        kind = name.partition("@")[2]
        if kind:
            continue
        methods[name] = {**summarize(runs), "images": runner.images[name], "time_s": runner.times[name] / cfg.seeds}
        for k in ("relabel", "calibrated"):
            if f"{name}@{k}" in runner.runs:
                methods[name][k] = summarize(runner.runs[f"{name}@{k}"])
    results = {"dataset": splits.name, "rho": cfg.rho, "ipc": cfg.ipc, "seeds": cfg.seeds,
               "evals": cfg.eval.repeats, "split": "test", "class_counts": runner.counts, "budget": budget,
               "tail_rule": {str(k): v for k, v in tail.items()}, "groups": runner.groups, "grouping": cfg.grouping,
               "config": dataclasses.asdict(cfg), "methods": methods,
               "preset": {"name": cfg.preset, "why": cfg.preset_why, "device": cfg.device},
               "time_estimate": runner.clock.record(), "total_time_s": time.perf_counter() - t0,
               "teacher": teacher, "stage_times_s": {k: v / cfg.seeds for k, v in runner.stage_times.items()}}
    write_results(out_dir, results)
    return results


def setup_teacher(cfg: CondenseConfig, runner: Runner, splits, out_dir: str, progress: bool) -> dict | None:
    """Load (or with auto train, or reuse from the cache) the relabel teacher into runner.labeler; rldd
    without --relabel uses auto. Returns what results.json records of it: path, whether reused, seconds,
    and its own accuracy on the test split."""
    source = cfg.relabel or ("auto" if "rldd" in cfg.methods else "")
    if not source:
        return None
    t0 = time.perf_counter()
    reused = None
    if source == "auto":
        settings = auto_settings(cfg.dataset, cfg.rho, cfg.data_seed, cfg.data_root, cfg.teacher_steps,
                                 cfg.teacher_width, dataclasses.asdict(cfg.dsa))
        with runner.bar(settings["steps"], "relabel teacher") as bar:
            path, reused = auto_teacher(settings, os.path.join(out_dir, "teachers"), runner.x_train, runner.y_train,
                                        runner.counts, runner.mean, runner.std, bar)
    else:
        path = source
    runner.labeler = load_labeler(path, runner.num_classes, tuple(runner.x_train.shape[1:]), runner.mean, runner.std,
                                  cfg.relabel_tau, cfg.device)
    seconds = time.perf_counter() - t0
    # once per run; scaled so that the per-seed figure of results.json (total / seeds) is its whole time
    runner.stage_times["teacher, once per run" + (" (reused from the cache)" if reused else "")] += seconds * cfg.seeds
    acc = shot_accuracy(runner.labeler.predict(runner.x_test), runner.y_test, runner.counts)
    log.info("relabel teacher %s: all %.2f  many %.2f  medium %.2f  few %.2f (%.1f s%s)", path, acc["all"],
             acc["many"], acc["medium"], acc["few"], seconds, ", reused" if reused else "")
    return {"path": path, "source": source, "reused": reused, "tau": cfg.relabel_tau, "seconds": seconds,
            "accuracy": {k: acc[k] for k in ("all", "many", "medium", "few", "per_class")}}
