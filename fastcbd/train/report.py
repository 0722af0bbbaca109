"""Results of a run: results.json, results.md (the many / medium / few table) and per_class.png."""
from __future__ import annotations

import json
import math
import os

import numpy as np


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def results_table(results: dict) -> str:
    lines = ["| method | all | many | medium | few |", "|---|---|---|---|---|"]
    for name, r in results["methods"].items():
        lines.append(f"| {name} | {_fmt(r['all'])} | {_fmt(r['many'])} | {_fmt(r['medium'])} | {_fmt(r['few'])} |")
    return "\n".join(lines)


def json_safe(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_results(out_dir: str, results: dict, title: str) -> None:
    """results: {dataset, rho, seed, class_counts, methods: {name: {all, many, medium, few, per_class}}}.
    Under torchrun only rank 0 writes."""
    from fastcbd.train.distributed import is_main

    if not is_main():
        return
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(json_safe(results), f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "results.json"))
    counts = results["class_counts"]
    md = [f"# {title}", "", f"dataset: {results['dataset']}, seed {results['seed']}, "
          f"training images per class: {counts}", "",
          f"Top-1 accuracy (%) on the balanced {results.get('split', 'test')} split; many > 100, medium 20-100, "
          "few < 20 training images.",
          "", results_table(results), ""]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md))
    plot_per_class(os.path.join(out_dir, "per_class.png"), results)
    stages = read_epochs(os.path.join(out_dir, "metrics.jsonl"))
    if stages:
        plot_loss_curves(os.path.join(out_dir, "loss_curves.png"), stages)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(md + stage_table(stages)) + "\n")


def plot_per_class(path: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(results["class_counts"])
    order = np.argsort(-counts, kind="stable")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in results["methods"].items():
        acc = np.asarray(r["per_class"], dtype=float)[order]
        teacher = name.startswith("teacher")  # teachers thin and dashed: the methods are the point
        ax.plot(np.arange(len(order)), acc, marker="o", ms=2 if teacher else 3, lw=0.8 if teacher else 1.6,
                ls="--" if teacher else "-", label=f"{name} ({_fmt(r['all'])})")
    ax.set_xticks(np.arange(len(order)))
    ax.set_xticklabels([f"{c}\n({counts[c]})" for c in order] if len(order) <= 20 else [""] * len(order))
    ax.set_xlabel("class (training images), most frequent first")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(f"Per-class accuracy: {results['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize_runs(runs: list[dict]) -> dict:
    """Mean and std over runs (seeds) of each method's all / many / medium / few accuracy."""
    names = [n for n in runs[0]["methods"] if all(n in r["methods"] for r in runs)]
    out = {}
    for name in names:
        out[name] = {}
        for key in ("all", "many", "medium", "few"):
            vals = np.array([np.nan if r["methods"][name][key] is None else r["methods"][name][key] for r in runs],
                            dtype=float)
            out[name][key] = float(np.mean(vals))
            out[name][key + "_std"] = float(np.std(vals))
    return out


def summary_table(runs: list[dict]) -> str:
    stats = summarize_runs(runs)
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines = [f"Mean ± std over {len(runs)} runs (seeds {seeds}), top-1 % on the balanced test split.", "",
             "| method | all | many | medium | few |", "|---|---|---|---|---|"]
    for name, s in stats.items():
        cells = [f"{_fmt(s[k])} ± {_fmt(s[k + '_std'])}" for k in ("all", "many", "medium", "few")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_epochs(path: str) -> dict:
    """metrics.jsonl -> {stage: [epoch records]} (per-step records are left out)."""
    stages: dict = {}
    if not os.path.exists(path):
        return stages
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") != "step" and "epoch" in r:
                stages.setdefault(r["stage"], []).append(r)
    return stages


def stage_table(stages: dict) -> list[str]:
    """Markdown lines: per stage the epochs, images/s and the final loss."""
    if not stages:
        return []
    lines = ["## Training", "", "| stage | epochs | images/s | final loss |", "|---|---|---|---|"]
    for name, recs in stages.items():
        secs, imgs = sum(r["seconds"] for r in recs), sum(r["images"] for r in recs)
        lines.append(f"| {name} | {len(recs)} | {imgs / max(secs, 1e-9):.0f} | {recs[-1].get('loss', float('nan')):.4f} |")
    return ["", *lines, "", "Loss curves: loss_curves.png; per-class accuracy against class frequency: per_class.png."]


def plot_loss_curves(path: str, stages: dict) -> None:
    """The mean training loss of each epoch, one line per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, recs in stages.items():
        ax.plot([r["epoch"] + 1 for r in recs], [r.get("loss", float("nan")) for r in recs], marker="o", ms=2,
                label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (epoch mean)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
