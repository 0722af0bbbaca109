"""The `fastcbd` command: demo, train-teachers, train-student, evaluate, data-stats, doctor, condense, predict,
export."""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time

import yaml

log = logging.getLogger("fastcbd")


def _setup_logging(out_dir: str | None) -> None:
    handlers = [logging.StreamHandler(sys.stderr)]
    main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 logs; the others only warn
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if out_dir and main:
        handlers.append(logging.FileHandler(os.path.join(out_dir, "log.txt")))
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers, force=True)


def _config(args):
    import torch

    from fastcbd.train.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides += ["data.dataset=npz", f"data.path={args.data}"]
    for flag in ("seed", "rho", "loader"):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{'data.' if flag in ('rho', 'loader') else ''}{flag}={value}")
    cfg = load_config(args.config, overrides)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return cfg


def _common(p: argparse.ArgumentParser, out_default: str | None = None) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--data", metavar="FILE.npz", help="your own data: x_train, y_train, x_test, y_test arrays")
    p.add_argument("--out", default=out_default, required=out_default is None, help="output folder")
    p.add_argument("--loader", choices=["auto", "dali", "device", "torch", "nvjpeg"], help="data loader (default: data.loader)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. teacher.optim.epochs=10")


def cmd_demo(args) -> None:
    from fastcbd.train.pipeline import run_cbd

    cfg = _config(args)
    t0 = time.perf_counter()
    run_cbd(cfg, args.out, progress=not args.no_progress)
    log.info("demo finished in %.1f s; results in %s/results.md", time.perf_counter() - t0, args.out)


def cmd_train_teachers(args) -> None:
    from fastcbd.train.config import save_config
    from fastcbd.train.pipeline import load_data, train_teachers
    from fastcbd.train.stages import Context

    cfg = _config(args)
    _check_resume(args, os.path.join(args.out, "*", "checkpoints", "step_*.pt"), cfg)
    save_config(cfg, os.path.join(args.out, "config.yaml"))
    ctx = Context(cfg, load_data(cfg), log_path=os.path.join(args.out, "metrics.jsonl"),
                  ckpt_dir=os.path.join(args.out, "{stage}", "checkpoints"), resume=True,
                  tb_dir=os.path.join(args.out, "{stage}", "tb"), require_resume=args.resume,
                  allow_config_change=args.allow_config_change)
    for name, path in train_teachers(ctx, args.out):
        print(path)


def _check_resume(args, pattern: str, cfg) -> None:
    """Stages always continue from the checkpoints in --out (auto-resume); --resume insists there are some.
    With checkpoints there, the config must be the one --out/config.yaml was written with (up to the keys
    that cannot change a result; --allow-config-change overrides, logged): checked before config.yaml is
    rewritten, and again against each checkpoint when its stage resumes."""
    from fastcbd.train.config import to_dict
    from fastcbd.train.resume import check_config

    found = glob.glob(pattern)
    if getattr(args, "resume", False) and not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {args.out} ({pattern})")
    if not found:
        return
    log.info("%s: %d checkpoint(s) found; finished stages are kept and unfinished ones continue", args.out, len(found))
    saved = os.path.join(args.out, "config.yaml")
    try:
        with open(saved) as f:
            old = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        log.warning("%s: cannot read the previous run's config (%s); each stage checks its checkpoint's", saved, exc)
        return
    if isinstance(old, dict):
        check_config(old, to_dict(cfg), saved, args.allow_config_change)


def _teacher_paths(items) -> list[str]:
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*", "model.pt"))) or sorted(glob.glob(os.path.join(item, "model.pt")))
            if not found:
                raise SystemExit(f"--teachers {item}: no model.pt in this folder or its sub-folders")
            paths += found
        else:
            paths.append(item)
    return paths


DECOUPLED = ("crt", "lws", "tau_norm", "logit_adj_posthoc")


def cmd_train_student(args) -> None:
    from fastcbd.train.checkpoint import file_hash, load_model, save_model
    from fastcbd.train.config import save_config
    from fastcbd.train.metrics import evaluate
    from fastcbd.train.pipeline import load_data
    from fastcbd.train.stages import Context, train_crt, train_student

    cfg = _config(args)
    splits = load_data(cfg)
    _check_resume(args, os.path.join(args.out, "checkpoints", "step_*.pt"), cfg)
    save_config(cfg, os.path.join(args.out, "config.yaml"))
    ctx = Context(cfg, splits, log_path=os.path.join(args.out, "metrics.jsonl"),
                  ckpt_dir=os.path.join(args.out, "checkpoints"), resume=True, tb_dir=os.path.join(args.out, "tb"),
                  require_resume=args.resume, allow_config_change=args.allow_config_change)
    paths = _teacher_paths(args.teachers or [])
    if args.teacher_cache and args.method != "cbd":
        raise SystemExit(f"--teacher-cache is for --method cbd, not {args.method}")
    teachers = []
    for p in paths:
        model, blob = load_model(p, ctx.device)
        if blob["arch"]["num_classes"] != splits.num_classes:
            raise SystemExit(f"{p}: teacher has {blob['arch']['num_classes']} classes, the data has {splits.num_classes}")
        teachers.append(ctx.place(model))
    seed = cfg.seed * 100 + 52
    if args.method in ("ce_balanced", "balanced_softmax", "logit_adj_loss", "cb_ce"):
        from fastcbd.train.baselines import run_baseline

        model, arch = run_baseline(ctx, args.method, None, seed), ctx.arch("teacher")
    elif args.method in DECOUPLED:
        if len(teachers) != 1:
            raise SystemExit(f"--method {args.method} re-balances the classifier of one instance-sampled teacher; "
                             f"got {len(teachers)} --teachers")
        if args.method == "crt":
            model = train_crt(ctx, teachers[0], seed)
        else:
            from fastcbd.train.baselines import run_baseline

            model = run_baseline(ctx, args.method, teachers[0], seed)
        head = {} if args.method == "crt" else {"head": args.method, "tau": cfg.baselines.logit_tau}
        arch = ctx.arch("teacher", **head)
    else:
        ids = [{"path": os.path.abspath(p), "sha256": file_hash(p)} for p in paths]
        cache, ids = _student_cache(args, ctx, teachers, ids)
        if not ids:
            raise SystemExit("--method cbd needs --teachers (model.pt files or folders of them) or --teacher-cache")
        model = train_student(ctx, teachers, seed, desc=args.method, teacher_ids=ids, cache=cache)
        arch = ctx.arch("student", proj_dim=model.out_features)
    out = os.path.join(args.out, "model.pt")
    teacher_meta = ids if args.method == "cbd" else [{"path": os.path.abspath(p), "sha256": file_hash(p)} for p in paths]
    save_model(out, model, arch, {"method": args.method, "teachers": teacher_meta}, ctx.info())
    metrics = evaluate(model, ctx.test_loader(), splits.class_counts)
    log.info("%s: all %.2f many %.2f medium %.2f few %.2f -> %s", args.method, metrics["all"], metrics["many"],
             metrics["medium"], metrics["few"], out)
    from fastcbd.train.report import write_results

    write_results(args.out, {"dataset": splits.name, "split": cfg.data.split, "rho": float(cfg.data.rho),
                             "seed": int(cfg.seed), "class_counts": [int(c) for c in splits.class_counts],
                             "methods": {args.method: metrics}}, f"fastcbd train-student ({args.method})")


def _student_cache(args, ctx, teachers, ids):
    """(cache or None, teacher ids) of a CBD student: --teacher-cache DIR (its teachers, or the --teachers
    among them; its views as built), else student.teacher_cache=V > 0 builds one in student.cache_dir or
    --out/teacher_cache."""
    from fastcbd.cache import TeacherCache, build_cache, cache_key
    from fastcbd.cache.store import weights_hash

    sc = ctx.cfg.student
    if args.teacher_cache:
        cache = TeacherCache(args.teacher_cache)
        if teachers:
            ids = [{**i, "weights": weights_hash(t)} for i, t in zip(ids, teachers)]
        else:
            ids = [{k: t[k] for k in ("path", "sha256", "weights")} for t in cache.meta["teachers"]]
        cache.check(cache_key(ctx, [t["weights"] for t in ids], cache.key["views"], cache.key["allot"]))
        return cache, ids
    if sc.teacher_cache > 0 and teachers:
        cache = build_cache(ctx, teachers, ids, sc.teacher_cache, sc.cache_dir or os.path.join(args.out, "teacher_cache"),
                            allot=sc.cache_allot, seed=ctx.cfg.seed * 100 + 60)
        return cache, [{**i, "weights": weights_hash(t)} for i, t in zip(ids, teachers)]
    return None, ids


def cmd_cache_teachers(args) -> None:
    from fastcbd.cache import build_cache
    from fastcbd.train.checkpoint import file_hash, load_model
    from fastcbd.train.pipeline import load_data
    from fastcbd.train.stages import Context

    cfg = _config(args)
    splits = load_data(cfg)
    ctx = Context(cfg, splits, progress=False)
    paths = _teacher_paths(args.teachers)
    teachers = []
    for p in paths:
        model, blob = load_model(p, ctx.device)
        if blob["arch"]["num_classes"] != splits.num_classes:
            raise SystemExit(f"{p}: teacher has {blob['arch']['num_classes']} classes, the data has {splits.num_classes}")
        teachers.append(ctx.place(model).eval())
    ids = [{"path": os.path.abspath(p), "sha256": file_hash(p)} for p in paths]
    t0 = time.perf_counter()
    cache = build_cache(ctx, teachers, ids, args.views, args.out, allot=args.allot, seed=cfg.seed * 100 + 60,
                        chunk_rows=args.chunk_rows)
    log.info("teacher cache %s: %d views of %d images, %d teachers (%.1f s); train students from it with "
             "fastcbd train-student --teacher-cache %s", args.out, cache.meta["rows"], len(cache.offsets) - 1,
             len(teachers), time.perf_counter() - t0, args.out)


def cmd_evaluate(args) -> None:
    from fastcbd.train.checkpoint import load_model
    from fastcbd.train.metrics import evaluate
    from fastcbd.train.pipeline import load_data
    from fastcbd.train.report import write_results
    from fastcbd.train.stages import Context

    cfg = _config(args)
    splits = load_data(cfg)
    ctx = Context(cfg, splits, progress=False)
    methods = {}
    for path in args.models:
        model, blob = load_model(path, ctx.device)
        name = blob["meta"].get("name") or blob["meta"].get("method") or os.path.basename(os.path.dirname(path))
        methods[name] = evaluate(ctx.place(model), ctx.test_loader(), splits.class_counts)
    results = {"dataset": splits.name, "rho": float(cfg.data.rho), "seed": int(cfg.seed),
               "class_counts": splits.class_counts, "methods": methods}
    write_results(args.out, results, f"fastcbd evaluate on {splits.name}")
    print(open(os.path.join(args.out, "results.md")).read())


def cmd_summarize(args) -> None:
    from fastcbd.train.report import summarize_runs, summary_table

    runs = []
    for d in args.runs:
        path = os.path.join(d, "results.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no results.json (run `fastcbd demo --out {d}` first)")
        with open(path) as f:
            runs.append(json.load(f))
    table = summary_table(runs)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({"runs": args.runs, "methods": summarize_runs(runs)}, f, indent=1)


def cmd_data_stats(args) -> None:
    from fastcbd.data.stats import describe, format_stats, plot_counts, verify
    from fastcbd.train.pipeline import load_data

    splits = load_data(_config(args))
    stats = describe(splits)
    print(format_stats(stats))
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "class_counts.png")
    plot_counts(stats, png)
    with open(os.path.join(args.out, "data_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(f"histogram: {png}")
    if args.verify and hasattr(splits, "train"):
        for split in (splits.train, splits.test):
            bad = verify(split)
            print(f"{split.name}: {len(split) - len(bad)} of {len(split)} images decode" + "".join(f"\n  {b}" for b in bad))


def cmd_doctor(args) -> None:
    import torch

    from fastcbd import _ext
    from fastcbd.ops import backend

    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), CUDA devices: {torch.cuda.device_count()}")
    print(f"fastcbd._C: {'built, CUDA kernels ' + ('yes' if _ext.with_cuda() else 'no') if _ext.available() else 'missing: ' + repr(_ext.IMPORT_ERROR)}")
    print(f"FASTCBD_BACKEND={backend.requested()}; auto on CPU picks: {backend.select(torch.device('cpu'))}")
    for name, status in backend.report().items():
        print(f"  {name:7s} {status}")


def cmd_condense(args) -> None:
    from fastcbd.condense.presets import apply_preset, choose_preset, resolve_device
    from fastcbd.condense.run import CondenseConfig, run_condense

    device = resolve_device(args.device)
    preset, why = choose_preset(args.preset, device)
    cfg = CondenseConfig(methods=tuple(args.method), dataset=args.dataset, data_root=args.data_root, rho=args.rho,
                         ipc=args.ipc, hierarchical=args.hierarchical, groups=args.groups, grouping=args.grouping,
                         group_ipc=args.group_ipc, seeds=args.seeds, soft_labels=args.soft_labels,
                         baselines=not args.no_baselines, threads=args.threads, device=device,
                         preset=preset, preset_why=why)
    apply_preset(cfg, preset)
    (log.warning if preset == "paper" and device == "cpu" else log.info)("preset %s: %s", preset, why)
    if args.width:
        for section in (cfg.dm, cfg.gm, cfg.mtt, cfg.eval):
            section.width = args.width
    for flag, section, key in (("iterations", cfg.dm, "iterations"), ("iterations", cfg.gm, "iterations"),
                               ("iterations", cfg.mtt, "iterations"), ("iterations", cfg.rldd, "iterations"),
                               ("evals", cfg.eval, "repeats"),
                               ("eval_steps", cfg.eval, "steps"), ("eval_workers", cfg.eval, "workers")):
        if getattr(args, flag) is not None:
            setattr(section, key, getattr(args, flag))
    cfg.mtt.constant_memory = args.constant_memory
    cfg.matching = args.matching
    cfg.mtt.expert_sampling = args.expert_sampling
    cfg.relabel, cfg.relabel_tau, cfg.relabel_calibrate = args.relabel or "", args.relabel_tau, args.relabel_calibrate
    cfg.full_baseline = not args.no_full_baseline
    if not args.relabel_tau > 0:
        from fastcbd.errors import ConfigError

        raise ConfigError(f"--relabel-tau {args.relabel_tau}: must be positive")
    if args.eval_workers is not None and args.eval_workers < 1:
        from fastcbd.errors import ConfigError

        raise ConfigError(f"--eval-workers {args.eval_workers}: must be at least 1")
    t0 = time.perf_counter()
    results = run_condense(cfg, args.out, progress=not args.no_progress)
    from fastcbd.condense.outputs import results_markdown

    print(results_markdown(results))
    log.info("condense finished in %.1f s; results in %s/results.md", time.perf_counter() - t0, args.out)


def cmd_predict(args) -> None:
    from fastcbd.predict import format_text, predict

    result = predict(args.model, args.inputs, topk=args.topk, batch_size=args.batch_size, device=args.device)
    print(json.dumps(result, indent=1) if args.json else format_text(result))
    if result["unreadable"]:
        log.warning("%d unreadable file(s) skipped: %s", len(result["unreadable"]),
                    ", ".join(b["file"] for b in result["unreadable"]))


def cmd_export(args) -> None:
    from fastcbd.export import export_model

    r = export_model(args.model, args.format, args.out_file)
    print(f"{r['out']}: {r['format']}; loaded back and checked on a batch of {r['check_batch']} (exported with "
          f"{r['export_batch']}): max abs logit difference {r['max_abs_diff']:.3g}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcbd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="teachers, baselines, CBD and CBD_ENS on MNIST-LT (or --data), one table")
    _common(p, out_default="runs/demo")
    p.add_argument("--seed", type=int)
    p.add_argument("--rho", type=float, help="imbalance factor of MNIST-LT (default 100)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-teachers", help="train the teacher.kinds teachers (instance sampling)")
    _common(p)
    p.add_argument("--resume", action="store_true", help="require checkpoints in --out to continue from "
                   "(without it a run still continues from them when there are some)")
    p.add_argument("--allow-config-change", action="store_true", help="continue from the checkpoints in --out "
                   "although the config changes the result (logged); without it such a resume is refused")
    p.set_defaults(func=cmd_train_teachers)

    p = sub.add_parser("cache-teachers", help="run the teachers once over V stored views of every training image, "
                       "for students to train from (train-student --teacher-cache)")
    _common(p)
    p.add_argument("--teachers", nargs="+", required=True, help="teacher model.pt files or folders of them")
    p.add_argument("--views", type=int, required=True, help="views per training image (V)")
    p.add_argument("--allot", default="uniform", choices=["uniform", "balanced"],
                   help="uniform: V views per image; balanced: N x V views shared out by class-balanced draws")
    p.add_argument("--chunk-rows", type=int, default=4096, help="views per resumable unit of the build (default 4096)")
    p.set_defaults(func=cmd_cache_teachers)

    p = sub.add_parser("train-student", help="train a CBD student (or a baseline) and evaluate it")
    _common(p)
    p.add_argument("--teachers", nargs="+", help="teacher model.pt files or folders of them")
    p.add_argument("--teacher-cache", metavar="DIR", help="train from a teacher cache (fastcbd cache-teachers) "
                   "instead of running the teachers; --teachers may then be left out (the cache's teachers)")
    p.add_argument("--method", default="cbd",
                   choices=["cbd", "ce_balanced", *DECOUPLED, "balanced_softmax", "logit_adj_loss", "cb_ce"],
                   help="cbd (default); the decoupled baselines (crt, lws, tau_norm, logit_adj_posthoc) take one "
                   "--teachers; the others train from scratch")
    p.add_argument("--resume", action="store_true", help="require checkpoints in --out to continue from "
                   "(without it a run still continues from them when there are some)")
    p.add_argument("--allow-config-change", action="store_true", help="continue from the checkpoints in --out "
                   "although the config changes the result (logged); without it such a resume is refused")
    p.set_defaults(func=cmd_train_student)

    p = sub.add_parser("evaluate", help="overall, many/medium/few and per-class top-1 of model files")
    _common(p)
    p.add_argument("--models", nargs="+", required=True, help="model.pt files")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("summarize", help="mean and std of several runs' results.json (e.g. 3 seeds)")
    p.add_argument("runs", nargs="+", help="run folders holding results.json")
    p.add_argument("--out", help="write summary.md and summary.json here")
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("data-stats", help="class counts, many/medium/few split and a histogram of a dataset")
    _common(p, out_default="runs/data_stats")
    p.add_argument("--verify", action="store_true", help="also decode every image file and list the bad ones")
    p.set_defaults(func=cmd_data_stats)

    p = sub.add_parser("doctor", help="which kernel backends can run here, and why not")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("condense", help="long-tailed dataset distillation (DM / DSA / MTT / RLDD, +/- hierarchical)")
    p.add_argument("--method", nargs="+", default=["dm"], choices=["dm", "dsa", "mtt", "rldd"], help="one or more")
    p.add_argument("--dataset", default="mnist-lt", choices=["mnist-lt", "cifar10-lt", "cifar100-lt"])
    p.add_argument("--data-root", help="cifar10-lt / cifar100-lt: the folder of the CIFAR python batches")
    p.add_argument("--rho", type=float, default=100.0, help="imbalance factor (default 100)")
    p.add_argument("--ipc", type=int, default=10, help="synthetic images per class (default 10)")
    p.add_argument("--hierarchical", action="store_true",
                   help="also two-stage classification and two-stage hierarchical training")
    p.add_argument("--groups", type=int, default=2, help="number of class groups K (default 2)")
    p.add_argument("--grouping", default="frequency", choices=["frequency", "shots", "kmeans"])
    p.add_argument("--group-ipc", type=int, default=0, help="group-level images per group (default IPC x classes)")
    p.add_argument("--seeds", type=int, default=1, help="distillation seeds (default 1)")
    p.add_argument("--evals", type=int, help="evaluation models per synthetic set (preset: paper 5, cpu 2)")
    p.add_argument("--eval-steps", type=int, help="SGD steps of each evaluation model")
    p.add_argument("--eval-workers", type=int,
                   help="evaluation models of a set trained at once, in threads (default 1; with --threads 1, the "
                   "number of cores): the same results as one after another")
    p.add_argument("--iterations", type=int, help="distillation iterations (DM), networks (DSA) or MTT iterations")
    p.add_argument("--width", type=int, help="ConvNet-3 width (preset: paper 128, cpu 32)")
    p.add_argument("--preset", default="auto", choices=["auto", "paper", "cpu"],
                   help="settings (condense/presets.py); auto (default): paper on a GPU, cpu without one")
    p.add_argument("--soft-labels", action="store_true", help="learnable soft labels (DSA, MTT)")
    p.add_argument("--constant-memory", action="store_true", help="MTT: TESLA-style constant-memory gradient")
    p.add_argument("--matching", default="auto", choices=["auto", "batched", "loop"],
                   help="DM / DSA: all classes per call (batched), one class per call (loop), or auto: batched on a "
                   "GPU, loop on the CPU (faster there: benchmarks/bench_condense.py)")
    p.add_argument("--expert-sampling", default="balanced", choices=["balanced", "instance"],
                   help="MTT experts' epochs: label-balanced (default) or instance (the reference)")
    p.add_argument("--relabel", metavar="MODEL.pt|auto",
                   help="also evaluate every set with a teacher's soft labels on each augmented batch: a fastcbd model "
                   "file, or auto (a balanced-softmax teacher trained on the long-tailed set, cached in --out/teachers); "
                   "rldd uses auto without it")
    p.add_argument("--relabel-tau", type=float, default=2.0,
                   help="soft-label temperature (default 2, chosen on the MNIST-LT validation split: docs/condense.md)")
    p.add_argument("--relabel-calibrate", action="store_true",
                   help="also evaluate with the soft labels calibrated for class frequency (ADSA-style)")
    p.add_argument("--no-baselines", action="store_true", help="skip the random-real and full-data baselines")
    p.add_argument("--no-full-baseline", action="store_true", help="skip the full-data baseline (keep random real)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="auto", help="torch device (default auto: cuda when there is a GPU, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_condense)

    p = sub.add_parser("predict", help="top-k classes of images, folders of them and .npz arrays with a model file")
    p.add_argument("--model", required=True, help="a model.pt file")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="JPEG / PNG / ... files, folders, .npz files")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON (predictions and unreadable files)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")
    p.add_argument("--device", default="auto", help="auto (default: cuda when there is a GPU), cpu, cuda, ...")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="a model file as safetensors, a torch.export program (pt2) or ONNX, checked")
    p.add_argument("--model", required=True, help="a model.pt file")
    p.add_argument("--format", required=True, choices=["safetensors", "pt2", "onnx"])
    p.add_argument("--out", dest="out_file", required=True, metavar="FILE", help="the artefact to write")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv=None) -> int:
    """Exit codes: 0 done; 2 a user error, printed as one line `error: ...` (what to fix, naming the file and
    the line or key); 1 an internal error, with its traceback (also in --out/log.txt); 128 + N stopped by
    signal N with a checkpoint written."""
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "out", None))
    from fastcbd.errors import UserError
    from fastcbd.train.checkpoint import ResumeError
    from fastcbd.train.loop import TrainingInterrupted
    from fastcbd.train.resume import ConfigChanged

    # The documented user errors (bad data / model / config files and overrides, a refused resume), a path
    # that is not there or not readable, a NaN/inf loss, and a missing optional package (not a fastcbd
    # module). Anything else, a plain ValueError included, is a bug and keeps its traceback.
    user_errors = (UserError, ConfigChanged, ResumeError, FloatingPointError, FileNotFoundError, PermissionError,
                   IsADirectoryError, NotADirectoryError)
    try:
        args.func(args)
    except TrainingInterrupted as exc:
        log.warning("%s; run the same command again to continue", exc)
        return 128 + exc.signum
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        log.error("error: %s", exc.code)  # raise SystemExit("...") marks a user mistake a command spotted
        return 2
    except Exception as exc:  # sorted into user errors and bugs here, in one place
        missing_package = isinstance(exc, ImportError) and not (exc.name or "").startswith("fastcbd")
        if isinstance(exc, user_errors) or missing_package:
            log.error("error: %s", exc)
            return 2
        log.exception("internal error (a bug in fastcbd: please report it with this traceback)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
