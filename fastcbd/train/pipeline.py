"""End-to-end CBD runs: teachers, baselines and students, evaluated in one table."""
from __future__ import annotations

import logging
import os
import time

from fastcbd.data import cifar_lt_splits, imagefolder_splits, inat_splits, list_splits, load_npz, mnist_lt
from fastcbd.data.arrays import ArraySplits
from fastcbd.data.files import FileSplits
from fastcbd.errors import ConfigError
from fastcbd.train.baselines import BASELINES, run_baseline
from fastcbd.train.checkpoint import file_hash, load_model, save_model
from fastcbd.train.config import Config, save_config
from fastcbd.train.metrics import evaluate
from fastcbd.train.report import results_table, write_results
from fastcbd.train.stages import Context, train_student, train_teacher

log = logging.getLogger("fastcbd")


DATASETS = ("mnist-lt", "npz", "cifar10-lt", "cifar100-lt", "imagenet-lt", "places-lt", "inat18", "imagefolder")


def load_data(cfg: Config) -> ArraySplits | FileSplits:
    """In-memory arrays (mnist-lt, npz, cifar*-lt) or image files (list files, iNat JSON, ImageFolder)."""
    d = cfg.data
    if d.split not in ("test", "val"):
        raise ConfigError(f"data.split={d.split!r}: expected test or val")
    if d.split == "val" and d.dataset not in ("mnist-lt", "cifar10-lt", "cifar100-lt"):
        where = ("give the validation images as x_test / y_test" if d.dataset == "npz" else
                 "point data.test_list at the dataset's validation list (ImageNet_LT_val.txt, Places_LT_val.txt, "
                 "iNaturalist val2018.json, or a val folder)")
        raise ConfigError(f"data.split=val holds images out of the training pool for mnist-lt and cifar*-lt only; "
                         f"for {d.dataset}, {where}")
    if d.dataset == "mnist-lt":
        return mnist_lt(rho=d.rho, seed=cfg.seed, split=d.split)
    if d.dataset == "npz":
        if not d.path:
            raise ConfigError("data.dataset=npz needs data.path (or --data FILE.npz)")
        return load_npz(d.path)
    if d.dataset in ("cifar10-lt", "cifar100-lt"):
        if not d.root:
            raise ConfigError(f"data.dataset={d.dataset} needs data.root (the folder of the CIFAR pickle batches)")
        return cifar_lt_splits(d.root, 10 if d.dataset == "cifar10-lt" else 100, d.rho, cfg.seed, split=d.split)
    if d.dataset in ("imagenet-lt", "places-lt"):
        return list_splits(d.root, d.train_list, d.test_list, num_classes=d.num_classes, name=d.dataset,
                           image_size=d.image_size, skip_bad=d.skip_bad)
    if d.dataset == "inat18":
        return inat_splits(d.root, d.train_list, d.test_list, image_size=d.image_size, skip_bad=d.skip_bad)
    if d.dataset == "imagefolder":
        return imagefolder_splits(d.root, d.train_list, d.test_list, image_size=d.image_size, skip_bad=d.skip_bad)
    raise ConfigError(f"data.dataset={d.dataset!r}: expected one of {', '.join(DATASETS)}")


BASELINE_SEEDS = {"ce_balanced": 50, "crt": 51, "lws": 54, "tau_norm": 55, "balanced_softmax": 56,
                  "logit_adj_loss": 57, "logit_adj_posthoc": 0, "cb_ce": 58}  # + 100 x seed


def teacher_names(kinds) -> list[str]:
    """('vanilla', 'vanilla', 'aug', 'aug') -> teacher_vanilla_1, teacher_vanilla_2, teacher_aug_1, ..."""
    seen: dict[str, int] = {}
    names = []
    for kind in kinds:
        seen[kind] = seen.get(kind, 0) + 1
        names.append(f"teacher_{kind}_{seen[kind]}")
    return names


def teacher_seed(cfg: Config, index: int) -> int:
    return cfg.seed * 100 + index + 1


def train_teachers(ctx: Context, out_dir: str) -> list[tuple[str, str]]:
    """Train cfg.teacher.kinds teachers, each saved as out_dir/<name>/model.pt; returns (name, path)."""
    cfg, made = ctx.cfg, []
    for i, (name, kind) in enumerate(zip(teacher_names(cfg.teacher.kinds), cfg.teacher.kinds)):
        path = os.path.join(out_dir, name, "model.pt")
        t0 = time.perf_counter()
        model = train_teacher(ctx, kind, teacher_seed(cfg, i), desc=name)
        save_model(path, model, ctx.arch("teacher"), {"name": name, "kind": kind, "seed": teacher_seed(cfg, i),
                                                      "seconds": round(time.perf_counter() - t0, 2)}, ctx.info())
        log.info("%s: trained in %.1fs -> %s", name, time.perf_counter() - t0, path)
        made.append((name, path))
    return made


def teacher_cache(ctx: Context, teachers, ids: list[dict], default_dir: str):
    """The run's teacher cache (student.teacher_cache views per image), built, finished or reused in
    student.cache_dir (default `default_dir`)."""
    from fastcbd.cache import build_cache

    sc = ctx.cfg.student
    return build_cache(ctx, teachers, ids, sc.teacher_cache, sc.cache_dir or default_dir, allot=sc.cache_allot,
                       seed=ctx.cfg.seed * 100 + 60)


def run_cbd(cfg: Config, out_dir: str, splits: ArraySplits | None = None, progress: bool = True) -> dict:
    """Teachers, class-balanced CE, cRT, CBD (one teacher) and CBD_ENS (all teachers), one results table."""
    unknown = [m for m in cfg.baselines.methods if m not in BASELINES]
    if unknown:
        raise ConfigError(f"baselines.methods: unknown {unknown}; expected some of {', '.join(BASELINES)}")
    os.makedirs(out_dir, exist_ok=True)
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    splits = splits or load_data(cfg)
    ctx = Context(cfg, splits, log_path=os.path.join(out_dir, "metrics.jsonl"), progress=progress,
                  tb_dir=os.path.join(out_dir, "tb", "{stage}"))
    test, counts = ctx.test_loader(), splits.class_counts
    log.info("%s: %d training images, per class %s; %d test images; device %s",
             splits.name, len(splits.y_train), counts, len(splits.y_test), ctx.device)
    methods, seconds = {}, {}

    def record(name, model, t0):
        seconds[name] = round(time.perf_counter() - t0, 2)
        methods[name] = evaluate(model, test, counts)
        log.info("%-18s all %.2f  many %.2f  medium %.2f  few %.2f  (%.1fs)", name, methods[name]["all"],
                 methods[name]["many"], methods[name]["medium"], methods[name]["few"], seconds[name])

    teachers = []
    for name, path in train_teachers(ctx, os.path.join(out_dir, "teachers")):
        model, blob = load_model(path, ctx.device)
        ctx.place(model)
        seconds[name] = blob["meta"]["seconds"]
        methods[name] = evaluate(model, test, counts)
        log.info("%-18s all %.2f  many %.2f  medium %.2f  few %.2f", name, methods[name]["all"],
                 methods[name]["many"], methods[name]["medium"], methods[name]["few"])
        teachers.append((name, path, model))

    for name in cfg.baselines.methods:  # default: ce_balanced, crt
        t0 = time.perf_counter()
        record(name, run_baseline(ctx, name, teachers[0][2], cfg.seed * 100 + BASELINE_SEEDS[name]), t0)
    ids = [{"path": p, "sha256": file_hash(p)} for _, p, _ in teachers]
    cache = None
    if cfg.student.teacher_cache > 0:  # the teachers run once, both students train from the store
        from fastcbd.cache.store import weights_hash

        t0 = time.perf_counter()
        cache = teacher_cache(ctx, [t[2] for t in teachers], ids, os.path.join(out_dir, "teacher_cache"))
        ids = [{**i, "weights": weights_hash(t[2])} for i, t in zip(ids, teachers)]
        seconds["teacher_cache"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    cbd = train_student(ctx, [teachers[0][2]], cfg.seed * 100 + 52, desc="cbd", teacher_ids=ids[:1], cache=cache)
    save_model(os.path.join(out_dir, "cbd", "model.pt"), cbd, ctx.arch("student", proj_dim=cbd.out_features),
               {"teachers": ids[:1]}, ctx.info())
    record("cbd", cbd, t0)
    if len(teachers) > 1:
        t0 = time.perf_counter()
        ens = train_student(ctx, [t[2] for t in teachers], cfg.seed * 100 + 53, desc="cbd_ens", teacher_ids=ids,
                            cache=cache)
        save_model(os.path.join(out_dir, "cbd_ens", "model.pt"), ens, ctx.arch("student", proj_dim=ens.out_features),
                   {"teachers": ids}, ctx.info())
        record("cbd_ens", ens, t0)

    results = {"dataset": splits.name, "split": cfg.data.split, "rho": float(cfg.data.rho), "seed": int(cfg.seed),
               "class_counts": [int(c) for c in counts], "methods": methods, "seconds": seconds}
    write_results(out_dir, results, "fastcbd: CBD on " + splits.name)
    log.info("results (%s):\n%s", out_dir, results_table(results))
    return results
