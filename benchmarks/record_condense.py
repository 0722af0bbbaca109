"""Append the rows of a `fastcbd condense` results.json to a results CSV (benchmarks/harness.append_rows: the
machine, versions, commit and load average come with them), one row per method and label kind: hard
(the stored labels), relabel (the teacher's soft labels), calibrated (the ADSA-style calibrated soft labels)
and the teacher's own accuracy; plus the seconds per seed of each stage.

    .venv/bin/python benchmarks/record_condense.py runs/condense_relabel/results.json \\
        --csv benchmarks/results/condense_relabel.csv --command "fastcbd condense ..." [--note "..."]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import append_rows

KEYS = ("all", "many", "medium", "few")


def rows(results: dict, command: str, note: str) -> list[dict]:
    cfg = results["config"]
    common = {"command": command, "note": note, "dataset": results["dataset"], "ipc": results["ipc"],
              "seeds": results["seeds"], "evals": results["evals"], "eval_steps": cfg["eval"]["steps"],
              "preset": results.get("preset", {}).get("name", ""), "relabel_tau": cfg.get("relabel_tau", ""),
              "total_time_s": round(results["total_time_s"], 1)}
    out = []
    teacher = results.get("teacher")
    if teacher:
        acc = teacher["accuracy"]
        out.append({**common, "method": "teacher", "labels": "teacher", "images": "",
                    **{k: round(acc[k], 2) for k in KEYS}, "std": "", "time_s": round(teacher["seconds"], 1),
                    "teacher_path": teacher["path"], "teacher_reused": teacher["reused"]})
    for name, m in results["methods"].items():
        for kind, r in (("hard", m), ("relabel", m.get("relabel")), ("calibrated", m.get("calibrated"))):
            if not r:
                continue
            out.append({**common, "method": name, "labels": kind, "images": m.get("images", ""),
                        **{k: round(r[k], 2) for k in KEYS}, "std": round(r.get("std", 0.0), 2),
                        **{f"std_{k}": round(r.get(f"std_{k}", 0.0), 2) for k in KEYS[1:]},
                        "time_s": round(m.get("time_s", 0.0), 1) if kind == "hard" else ""})
    for stage, seconds in results.get("stage_times_s", {}).items():
        out.append({**common, "method": "stage", "labels": stage, "time_s": round(seconds, 1)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a results.json of fastcbd condense")
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "condense_relabel.csv"))
    p.add_argument("--command", required=True, help="the command that produced it (recorded verbatim)")
    p.add_argument("--note", default="", help="e.g. the machine's load while it ran")
    args = p.parse_args()
    with open(args.results) as f:
        results = json.load(f)
    path = append_rows(args.csv, rows(results, args.command, args.note))
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
