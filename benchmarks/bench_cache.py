"""The teacher-feature cache against live teachers on the demo's recipe (MNIST-LT, rho 100, 4 teachers,
150 student epochs): CBD_ENS student-stage wall time and accuracy, per seed, the variants one after another.

    cd /work/main && .venv/bin/python benchmarks/bench_cache.py                 # 3 seeds, V in 4 16 64 + balanced 16
    .venv/bin/python benchmarks/bench_cache.py --seeds 0 --views 4 --epochs 3   # smoke test

Per seed: the 4 teachers are trained once (as `fastcbd demo` does; reused from --work when there), then
  ce_balanced   the class-balanced CE student (the time a plain student costs),
  live          the CBD_ENS student with the teachers run in every step,
  cache_V       the CBD_ENS student from a cache of V views per image (build_s: building it; student_s: the
                student stage reusing it), for each --views,
  cache_V_bal   V x N views allotted per class by class-balanced draws (--balanced),
each with the demo's seeds (the student seed is the same for every CBD_ENS variant). --student-teachers 1
compares CBD (the first teacher; from the cache, its columns of the four-teacher cache) in the same way. Rows go to
benchmarks/results/cache.csv; the summary prints mean +/- std over the seeds and the time ratios the issue
sets targets for: reuse = student_s / ce_balanced student_s, with_build = (build_s + student_s) / live.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks.harness import append_rows, print_table
from fastcbd.train.baselines import run_baseline
from fastcbd.train.checkpoint import file_hash, load_model
from fastcbd.train.config import load_config
from fastcbd.train.metrics import evaluate
from fastcbd.train.pipeline import BASELINE_SEEDS, load_data, teacher_cache, teacher_names, train_teachers
from fastcbd.train.stages import Context, train_student


def teachers_of(ctx, folder: str):
    """The seed's teachers: trained into `folder` once, loaded from it afterwards."""
    names = teacher_names(ctx.cfg.teacher.kinds)
    paths = [os.path.join(folder, n, "model.pt") for n in names]
    t0 = time.perf_counter()
    if not all(os.path.exists(p) for p in paths):
        paths = [p for _, p in train_teachers(ctx, folder)]
    models = [ctx.place(load_model(p, ctx.device)[0]).eval() for p in paths]
    return models, [{"path": p, "sha256": file_hash(p)} for p in paths], time.perf_counter() - t0


def run_seed(args, seed: int) -> list[dict]:
    cfg = load_config(None, [f"seed={seed}", f"student.optim.epochs={args.epochs}", f"teacher.optim.epochs={args.epochs}",
                             f"threads={args.threads}"] + args.overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = load_data(cfg)
    work = os.path.join(args.work, f"s{seed}")
    ctx = Context(cfg, splits, progress=False)
    test, counts = ctx.test_loader(), splits.class_counts
    teachers, ids, teacher_s = teachers_of(ctx, os.path.join(work, "teachers"))
    k = args.student_teachers or len(teachers)  # CBD: the first teacher; CBD_ENS: all (the cache holds all)
    desc, student_seed = ("cbd_ens", seed * 100 + 53) if k > 1 else ("cbd", seed * 100 + 52)
    rows = []

    def row(variant, model, student_s, build_s=0.0, views=0, allot="", cache=None):
        m = evaluate(model, test, counts)
        r = {"seed": seed, "variant": variant, "views": views, "allot": allot,
             "rows": cache.meta["rows"] if cache is not None else 0, "build_s": round(build_s, 2),
             "student_s": round(student_s, 2), "total_s": round(build_s + student_s, 2), "epochs": args.epochs,
             "student": desc if variant != "ce_balanced" else "ce_balanced", "k": k,
             **{k: round(m[k], 2) for k in ("all", "many", "medium", "few")}, "load1_start": load_start[0]}
        rows.append(r)
        print(f"seed {seed} {variant:14s} all {r['all']:.2f} few {r['few']:.2f} build {r['build_s']:.1f}s "
              f"student {r['student_s']:.1f}s", flush=True)

    load_start = [round(os.getloadavg()[0], 2)]
    if not args.no_ce:
        t0 = time.perf_counter()
        ce = run_baseline(ctx, "ce_balanced", None, seed * 100 + BASELINE_SEEDS["ce_balanced"])
        row("ce_balanced", ce, time.perf_counter() - t0)

    load_start[0] = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    live = train_student(ctx, teachers[:k], student_seed, desc=desc)
    row("live", live, time.perf_counter() - t0)

    for views, allot in [(v, "uniform") for v in args.views] + [(v, "balanced") for v in args.balanced]:
        folder = os.path.join(work, f"cache_{views}_{allot}")
        shutil.rmtree(folder, ignore_errors=True)  # built afresh: its time is part of the row
        cfg.student.teacher_cache, cfg.student.cache_allot, cfg.student.cache_dir = views, allot, folder
        load_start[0] = round(os.getloadavg()[0], 2)
        t0 = time.perf_counter()
        cache = teacher_cache(ctx, teachers, ids, folder)
        build_s = time.perf_counter() - t0
        from fastcbd.cache.store import weights_hash

        t0 = time.perf_counter()
        student = train_student(ctx, [], student_seed, desc=desc, cache=cache,
                                teacher_ids=[{**i, "weights": weights_hash(t)} for i, t in zip(ids, teachers)][:k])
        name = f"cache_{views}" + ("_bal" if allot == "balanced" else "")
        row(name, student, time.perf_counter() - t0, build_s, views, allot, cache)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    for r in rows:
        r["teachers_s"] = round(teacher_s, 2)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    ce = {r["seed"]: r["student_s"] for r in by.get("ce_balanced", [])}
    live = {r["seed"]: r["student_s"] for r in by.get("live", [])}
    out = []
    for variant, rs in by.items():
        def ms(key, rs=rs):
            xs = [float(r[key]) for r in rs]
            return statistics.mean(xs), statistics.pstdev(xs)  # as fastcbd summarize (np.std)

        a, few = ms("all"), ms("few")
        reuse = statistics.mean([r["student_s"] / ce[r["seed"]] for r in rs if r["seed"] in ce] or [math.nan])
        with_build = statistics.mean(r["total_s"] / live[r["seed"]] for r in rs if r["seed"] in live)
        out.append({"variant": variant, "seeds": len(rs), "all": f"{a[0]:.2f} ± {a[1]:.2f}",
                    "few": f"{few[0]:.2f} ± {few[1]:.2f}", "build_s": ms("build_s")[0], "student_s": ms("student_s")[0],
                    "x_ce_reuse": reuse, "x_live_with_build": with_build})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--views", type=int, nargs="*", default=[4, 16, 64])
    ap.add_argument("--balanced", type=int, nargs="*", default=[16], help="views for the balanced allotment")
    ap.add_argument("--epochs", type=int, default=150, help="teacher and student epochs (the demo's: 150)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_cache"), help="teachers and caches go here")
    ap.add_argument("--keep", action="store_true", help="keep the caches")
    ap.add_argument("--student-teachers", type=int, default=0,
                    help="the student's teachers: the first N of the cache's 4 (1: CBD; default all: CBD_ENS)")
    ap.add_argument("--no-ce", action="store_true", help="skip the class-balanced CE student")
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "cache.csv"))
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value) for every stage")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    rows = []
    for seed in args.seeds:
        new = run_seed(args, seed)
        if args.csv:
            append_rows(args.csv, new)  # after each seed: a long run keeps what it measured
        rows += new
    print_table(rows, ["seed", "variant", "views", "rows", "build_s", "student_s", "all", "few", "load1_start"])
    print()
    print_table(summary(rows), ["variant", "seeds", "all", "few", "build_s", "student_s", "x_ce_reuse",
                                "x_live_with_build"])


if __name__ == "__main__":
    main()
