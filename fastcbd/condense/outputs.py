"""What `fastcbd condense` writes: the synthetic sets (.pt), PNG grids, results.json and results.md."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from fastcbd.train.report import json_safe


def save_synthetic(path: str, blob: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(blob, tmp)
    os.replace(tmp, path)


def save_grid(path: str, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              num_classes: int) -> None:
    """One row per class, its synthetic images left to right (de-normalised, clipped to [0, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = (images.detach().cpu() * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).clamp(0, 1)
    x = x.permute(0, 2, 3, 1).numpy()
    c, h, w = images.shape[1], images.shape[2], images.shape[3]
    rows = [np.flatnonzero(labels.cpu().numpy() == k) for k in range(num_classes)]
    cols = max(1, max(len(r) for r in rows))
    grid = np.ones(((h + 2) * num_classes, (w + 2) * cols, c), dtype=np.float32)
    for k, idx in enumerate(rows):
        for j, i in enumerate(idx):
            grid[k * (h + 2) + 1:k * (h + 2) + 1 + h, j * (w + 2) + 1:j * (w + 2) + 1 + w] = x[i]
    grid = grid[..., 0] if c == 1 else grid
    plt.imsave(path, grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1)


def _f(v, std=None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if std is None else f"{v:.2f} ± {std:.2f}"


def results_markdown(results: dict) -> str:
    lines = [f"# fastcbd condense: {results['dataset']}, IPC {results['ipc']}", "",
             (f"Training images per class: {results['class_counts']}; synthetic images per class: "
              f"{results['budget']}."), ""]
    if results.get("preset"):
        p = results["preset"]
        lines += [f"Preset: {p['name']} ({p['why']}).", ""]
    if results["tail_rule"]:
        lines += [(f"Tail rule: class(es) {sorted(results['tail_rule'])} have fewer real images than the IPC "
                   f"and use all of them ({results['tail_rule']})."), ""]
    if results.get("groups"):
        lines += [f"Class groups ({results['grouping']}): {results['groups']}.", ""]
    lines += [(f"Top-1 accuracy (%) on the balanced test split, mean ± std over {results['seeds']} seed(s) x "
               f"{results['evals']} evaluation model(s); many > 100, medium 20-100, few < 20 training images. "
               "tail->head: share of medium/few-shot test images predicted as a many-shot class; cross-group: "
               "share of test images predicted into another group."), "",
              "| method | images | all | many | medium | few | tail->head | cross-group | time (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["methods"].items():
        lines.append(f"| {name} | {r.get('images', '-')} | {_f(r['all'], r.get('std'))} | "
                     f"{_f(r['many'], r.get('std_many'))} | {_f(r['medium'], r.get('std_medium'))} | "
                     f"{_f(r['few'], r.get('std_few'))} | {_f(r.get('tail_to_head'))} | {_f(r.get('cross_group'))} | "
                     f"{_f(r.get('time_s'))} |")
    if results.get("teacher"):
        lines += ["", *relabel_markdown(results)]
    if results.get("stage_times_s"):
        lines += ["", "Seconds per seed by stage: " + "; ".join(f"{k} {v:.1f}" for k, v in
                                                            results["stage_times_s"].items()) + "."]
    return "\n".join(lines) + "\n"


def _cells(r: dict | None) -> str:
    if not r:
        return "- | - | - | -"
    return " | ".join(_f(r[k], r.get("std" if k == "all" else f"std_{k}")) for k in ("all", "many", "medium", "few"))


def relabel_markdown(results: dict) -> list[str]:
    """The hard-label and relabeled results side by side, the teacher's own accuracy in the first row."""
    t = results["teacher"]
    calibrated = any(r.get("calibrated") for r in results["methods"].values())
    head = "| method | hard labels: all | relabeled: all | many | medium | few |" + \
        (" calibrated: all | many | medium | few |" if calibrated else "")
    lines = [(f"Relabeled with {t['path']} (tau {t['tau']:g}{', reused from the cache' if t.get('reused') else ''}): "
              "the evaluation models learn the teacher's soft labels on each augmented batch. The teacher's own "
              "accuracy is the first row (a relabeled set is not better than its teacher unless it beats that row)."),
             "", head, "|---" * (head.count("|") - 1) + "|"]
    acc = t["accuracy"]
    lines.append(f"| teacher | {_f(acc['all'])} | " + " | ".join(_f(acc[k]) for k in ("all", "many", "medium", "few"))
                 + (" | - | - | - | -" if calibrated else "") + " |")
    for name, r in results["methods"].items():
        if not r.get("relabel"):
            continue
        lines.append(f"| {name} | {_f(r['all'], r.get('std'))} | {_cells(r['relabel'])} |"
                     + (f" {_cells(r.get('calibrated'))} |" if calibrated else ""))
    return lines


def write_results(out_dir: str, results: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(json_safe(results), f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(results_markdown(results))
