"""A deadline-driven, resumable runner of check steps (the engine of benchmarks/gpu_check.py).

Each step is a list of commands run one after another, each in its own process group with the step's time
limit, all under one global deadline. A step ends as

    pass | fail | skipped | unsupported | not reached

with a one-line reason. A failing step never stops the rest. The state (one record per step, with the key of
the inputs it ran on) is saved after every step, so a second invocation on the same machine runs only the
steps that are not yet done or whose inputs changed, and the report is rewritten after every step, so an
interrupted or killed run still leaves one.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DONE = ("pass", "unsupported")  # not run again while their key holds


class Skip(Exception):
    """Raised by a step's `commands` to skip it with the reason."""


@dataclass
class Cmd:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ok_codes: tuple[int, ...] = (0,)


@dataclass
class Step:
    """name: short id; limit_s: its own time limit; commands(dry) -> [Cmd] (or raises Skip);
    judge(rcs, output, dry) -> (status, detail) decides once the commands ran (default: all exit 0);
    key(): a string naming the inputs, so a changed input runs a passed step again."""

    name: str
    title: str
    limit_s: float
    commands: Callable[[bool], list[Cmd]]
    judge: Callable[[list[int], str, bool], tuple[str, str]] | None = None
    key: Callable[[], str] = lambda: ""


@dataclass
class Result:
    name: str
    title: str
    status: str
    detail: str
    seconds: float = 0.0
    when: str = ""
    key: str = ""
    reused: bool = False


def exit_codes_judge(rcs: list[int], output: str, dry: bool) -> tuple[str, str]:
    bad = [rc for rc in rcs if rc != 0]
    if bad:
        return "fail", f"exit code {bad[0]}: {last_line(output)}"
    return "pass", last_line(output)


def last_line(text: str, width: int = 160) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:width] if lines else ""


def run_command(cmd: Cmd, log, limit_s: float, base_env: dict[str, str], cwd: Path) -> tuple[int | None, float]:
    """Run one command with its output appended to `log`; (exit code or None if killed at limit_s, seconds)."""
    env = dict(base_env)
    env.update(cmd.env)
    log.write(f"$ {' '.join(cmd.argv)}\n")
    log.flush()
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd.argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        log.write(f"cannot start: {exc}\n")
        return 127, time.monotonic() - t0
    try:
        rc = proc.wait(timeout=max(1.0, limit_s))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        rc = None
    return rc, time.monotonic() - t0


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the command's whole process group (compilers, workers), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Runner:
    """Runs `steps` in order under `deadline_s`; state and logs in `work`; `report(results)` is called after
    every step. `only`: names to run (the others keep their earlier record); `fresh`: ignore the state."""

    def __init__(self, steps: list[Step], work: Path, *, deadline_s: float, dry: bool, cwd: Path,
                 env: dict[str, str], report: Callable[[list[Result]], None], only=(), fresh=False,
                 min_share: float = 0.5, log_cap: int = 4 << 20, echo=print):
        self.steps, self.work, self.deadline_s, self.dry, self.cwd = steps, Path(work), deadline_s, dry, cwd
        self.env, self.report, self.only, self.fresh = env, report, set(only), fresh
        self.min_share, self.log_cap, self.echo = min_share, log_cap, echo
        self.state_path = self.work / ("state-dry.json" if dry else "state.json")
        (self.work / "logs").mkdir(parents=True, exist_ok=True)

    def load_state(self) -> dict:
        if self.fresh or not self.state_path.exists():
            return {}
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def save_state(self, results: list[Result]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({r.name: r.__dict__ for r in results}, indent=1))
        os.replace(tmp, self.state_path)

    def run(self) -> list[Result]:
        t_start = time.monotonic()
        state = self.load_state()
        results = [self._pending(s, state) for s in self.steps]
        self.report(results)
        for i, step in enumerate(self.steps):
            res = results[i]
            if res.status != "pending":
                continue
            left = self.deadline_s - (time.monotonic() - t_start)
            if left < self.min_share * step.limit_s:
                res.status, res.detail = "not reached", (f"global deadline: {left:.0f} s left, the step may need "
                                                          f"{step.limit_s:.0f} s (rerun to continue)")
            else:
                self.echo(f"gpu-check: [{step.name}] {step.title} (limit {min(left, step.limit_s):.0f} s)",
                          flush=True)
                self._run_step(step, res, min(left, step.limit_s), cut_by_deadline=left < step.limit_s)
                self.echo(f"gpu-check: [{step.name}] {res.status}: {res.detail} ({res.seconds:.1f} s)", flush=True)
            self.save_state(results)
            self.report(results)
        for r in results:  # still pending only if something above raised
            if r.status == "pending":
                r.status, r.detail = "not reached", "the runner stopped before it"
        self.save_state(results)
        self.report(results)
        return results

    def _pending(self, step: Step, state: dict) -> Result:
        key = step.key()
        old = state.get(step.name)
        selected = not self.only or step.name in self.only  # --steps runs its steps even if done
        done = old and old.get("status") in DONE and old.get("key") == key
        if old and (not selected or (done and not self.only)):
            r = Result(**{k: v for k, v in old.items() if k in Result.__dataclass_fields__})
            r.reused = True
            return r
        if not selected:
            return Result(step.name, step.title, "skipped", "not selected (--steps)", key=key)
        return Result(step.name, step.title, "pending", "", key=key)

    def log_path(self, step: Step) -> Path:
        return self.work / "logs" / f"{step.name}.log"

    def _run_step(self, step: Step, res: Result, limit_s: float, cut_by_deadline: bool) -> None:
        t0 = time.monotonic()
        res.when = time.strftime("%Y-%m-%d %H:%M:%S")
        res.reused = False
        path = self.log_path(step)
        try:
            cmds = step.commands(self.dry)
        except Skip as why:
            res.status, res.detail = "skipped", str(why)
            path.write_text(f"skipped: {why}\n")
            return
        except Exception as exc:  # a defect in the step's own set-up: report it, go on with the others
            res.status, res.detail = "fail", f"could not prepare the step: {exc!r}"
            path.write_text(f"{res.detail}\n")
            return
        rcs: list[int] = []
        with open(path, "w") as log:
            for cmd in cmds:
                left = limit_s - (time.monotonic() - t0)
                rc, _ = run_command(cmd, log, left, self.env, self.cwd)
                if rc is None:
                    log.write(f"\n[killed after {time.monotonic() - t0:.0f} s]\n")
                    res.seconds = time.monotonic() - t0
                    if cut_by_deadline:
                        res.status, res.detail = "not reached", f"cut at the global deadline after {res.seconds:.0f} s"
                    else:
                        res.status, res.detail = "fail", f"timed out after its limit of {step.limit_s:.0f} s"
                    res.detail += f" in `{' '.join(cmd.argv[:4])}`"
                    break
                rcs.append(0 if rc in cmd.ok_codes else rc)
                if rc not in cmd.ok_codes:
                    break
        cap_log(path, self.log_cap)
        res.seconds = time.monotonic() - t0
        if res.status != "pending":
            return
        judge = step.judge or exit_codes_judge
        try:
            res.status, res.detail = judge(rcs, path.read_text(errors="replace"), self.dry)
        except Exception as exc:
            res.status, res.detail = "fail", f"could not read the step's output: {exc!r}"


def cap_log(path: Path, cap: int) -> None:
    """Keep a log under `cap` bytes: its head and tail, the middle cut with a note."""
    size = path.stat().st_size
    if size <= cap:
        return
    with open(path, "rb") as f:
        head = f.read(cap // 4)
        f.seek(size - (cap - cap // 4))
        tail = f.read()
    path.write_bytes(head + f"\n[... {size - len(head) - len(tail)} bytes cut ...]\n".encode() + tail)


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line ("3 failed, 10 passed, 2 skipped in 4.1s")."""
    counts: dict[str, int] = {}
    for line in reversed(output.splitlines()):
        found = re.findall(r"(\d+)(?:/\d+)? (passed|failed|skipped|errors?|deselected|xfailed|xpassed|"
                           r"tests? collected)", line)
        if found:
            for n, what in found:
                counts["error" if what.startswith("error") else "collected" if "collected" in what else what] = int(n)
            return counts
    return counts
