"""`make gpu-check`: the prepared check of everything fastcbd promises on a GPU, in one short call.

    python3 benchmarks/gpu_check.py [--dry] [--steps build,tests,...] [--fresh] [--deadline S] [--out DIR]

Written for the GPU machine as it is (one H200, its own python3 with torch 2.11 / Triton 3.6, nvcc and
compute-sanitizer, no DALI, no package registry). Seven steps in priority order, each with its own time
limit, under one global deadline (GPU_CHECK_DEADLINE seconds, default 480):

    build     fastcbd._C in place for sm_90 (FASTCBD_REQUIRE_CUDA=1), then assert its CUDA ops are registered
    tests     every GPU test (FASTCBD_GPU_ONLY=1: the `gpu`-marked and `cuda` cases) of ops/csrc/data/train
    memcheck  compute-sanitizer memcheck (and racecheck) over benchmarks/memcheck_ops.py
    loss      bench_loss.py --device cuda, fp32 and bf16, against eager, compile and the measured roofline
    decode    bench_data.py --only decode: batched nvJPEG against the CPU decode
    train     bench_train.py --only resnet50: the CBD_ENS step, plain fp32/bf16 against fastcbd, MFU
    condense  bench_condense.py: class-batched DM/DSA against the per-class loop on the GPU

A second invocation on the same machine reuses the build and runs only what is not done yet (or whose
code changed). State, logs and CSVs live in --work (runs/gpu_check); the report (summary.md, report.json,
gpu_check.log and the step CSVs, 7 files) is copied to $OUT when set. Without a GPU (or with --dry) every
step runs a dry version of its command on the CPU at tiny sizes and is reported `skipped` with the reason;
a dry command that fails makes the step `fail`, so the script cannot rot between GPU windows.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stepper import Cmd, Result, Runner, Skip, Step, exit_codes_judge, last_line, pytest_counts  # noqa: E402

PY = sys.executable
OPS = ("cosine_distill", "cosine_ce", "multi_teacher_kd", "cbd_loss")
REQUIRED = ("torch", "triton", "torchvision", "numpy", "pytest", "tqdm", "yaml")
OPTIONAL = ("mlxtend", "hypothesis", "xdist")
CSVS = ("loss", "data", "train", "condense")
NO_GPU = "no CUDA GPU here"


def source_key(*parts: str) -> str:
    """A hash of the files under `parts` (paths relative to the repo), results CSVs and caches excluded."""
    h = hashlib.sha256()
    for part in parts:
        base = ROOT / part
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for p in files:
            if "results" in p.parts or "__pycache__" in p.parts or p.suffix in (".so", ".pyc", ".csv"):
                continue
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_key() -> str:  # one hash per invocation, shared by the six steps keyed on the code
    return source_key("fastcbd", "csrc", "benchmarks", "tests", "setup.py")


def build_key() -> str:
    import torch

    built = any((ROOT / "fastcbd").glob("_C*.so"))
    return f"{source_key('csrc', 'setup.py')}-torch{torch.__version__}-{'built' if built else 'none'}"


class Check:
    """The seven steps; `work` holds state, logs and the CSVs the benchmarks append to."""

    def __init__(self, work: Path, dry: bool):
        self.work, self.dry = work, dry
        self.results = work / ("results-dry" if dry else "results")
        self.results.mkdir(parents=True, exist_ok=True)

    def csv(self, name: str) -> str:
        return str(self.results / f"{name}.csv")

    def steps(self) -> list[Step]:
        return [
            Step("build", "build fastcbd._C for sm_90 and check its CUDA ops", 150, self.build_cmds,
                 self.build_judge, build_key),
            Step("tests", "GPU tests (tests/ops, csrc, data, train)", 180, self.test_cmds, self.test_judge, code_key),
            Step("memcheck", "compute-sanitizer memcheck + racecheck over every kernel", 150, self.memcheck_cmds,
                 self.memcheck_judge, code_key),
            self.bench("loss", "fused losses: fp32/bf16 vs eager, compile, roofline", 150,
                       ["benchmarks/bench_loss.py", "--dtype", "fp32", "bf16"], ["--quick"],
                       gpu_extra=["--budget-s", "120"]),
            self.bench("decode", "nvJPEG batched decode vs CPU decode", 75,
                       ["benchmarks/bench_data.py", "--only", "decode"], ["--quick"], csv="data"),
            # no compile variant on the GPU: the first H200 run spent 86 s on it and timed nothing (its budget
            # ran out), which left condense out of the call; the dry run still exercises its subprocess
            self.bench("train", "ResNet-50 CBD_ENS step: plain vs fastcbd, MFU", 180,
                       ["benchmarks/bench_train.py", "--only", "resnet50"],
                       ["--quick", "--compile", "--compile-budget", "5"], gpu_extra=["--time-budget", "165"]),
            self.bench("condense", "class-batched DM/DSA vs the per-class loop", 75,
                       ["benchmarks/bench_condense.py"], ["--quick"], gpu_extra=["--time-budget", "60"]),
        ]

    # (1) build -----------------------------------------------------------------------------------------
    def build_cmds(self, dry: bool) -> list[Cmd]:
        cmds = [Cmd([PY, __file__, "--preflight"])]
        wheels = sorted((ROOT / ".whl").glob("*.whl"))
        if wheels and not dry:  # pure-Python packages the machine lacks (make gpu-wheels), carried in .whl/
            cmds.insert(0, Cmd([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                "--upgrade", "--target", str(self.work / "site"), *map(str, wheels)]))
        if dry:
            return cmds + [Cmd([PY, __file__, "--verify-ext"])]
        env = {"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"), "FASTCBD_REQUIRE_CUDA": "1",
               "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 8))}
        return cmds + [Cmd([PY, "setup.py", "-q", "build_ext", "--inplace"], env),
                       Cmd([PY, __file__, "--verify-ext", "--require-cuda"])]

    def build_judge(self, rcs, out, dry):
        status, detail = exit_codes_judge(rcs, out, dry)
        return self._dry(status, detail, dry)

    # (2) tests -----------------------------------------------------------------------------------------
    def test_cmds(self, dry: bool) -> list[Cmd]:
        args = [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/ops", "tests/csrc", "tests/data",
                "tests/train"]
        env = {"FASTCBD_GPU_ONLY": "1", "FASTCBD_BACKEND": "auto"}
        if dry:
            return [Cmd(args + ["--collect-only"], env)]
        workers = os.environ.get("GPU_CHECK_TEST_WORKERS", "4")
        if workers != "0" and importlib.util.find_spec("xdist") is not None:
            args += ["-n", workers]
        return [Cmd(args, env)]

    def test_judge(self, rcs, out, dry):
        c = pytest_counts(out)
        if dry:
            if rcs != [0] or not c.get("collected"):
                return "fail", f"collecting the GPU tests failed (exit {rcs}): {last_line(out)}"
            return self._dry("pass", f"{c['collected']} GPU tests collected", dry)
        if rcs != [0]:
            return "fail", f"{c.get('failed', 0)} failed, {c.get('error', 0)} errors, {c.get('passed', 0)} passed"
        if not c.get("passed"):
            return "fail", f"no GPU test ran: {last_line(out)}"
        return "pass", f"{c['passed']} passed, {c.get('skipped', 0)} skipped (reasons in the log)"

    # (3) memcheck --------------------------------------------------------------------------------------
    def memcheck_cmds(self, dry: bool) -> list[Cmd]:
        driver = [PY, "benchmarks/memcheck_ops.py", "--device", "cpu" if dry else "cuda"]
        if dry:
            return [Cmd(driver)]
        tool = shutil.which("compute-sanitizer") or next(
            (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
        if tool is None:
            raise Skip("compute-sanitizer not found on PATH or in /usr/local/cuda/bin")
        env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # else an overrun inside a cached block stays invisible
        # racecheck sees shared memory only: the hand-written CUDA reductions use it; Triton's own barriers are
        # the compiler's (the global-memory race a Triton kernel can have needs tests/ops/test_gpu.py instead)
        return [Cmd([tool, "--tool", "memcheck", "--error-exitcode", "86", "--print-limit", "20", *driver,
                     "--budget-s", "60"], env),
                Cmd([tool, "--tool", "racecheck", "--error-exitcode", "86", "--print-limit", "20", *driver,
                     "--backends", "cuda", "--budget-s", "30"], env)]

    def memcheck_judge(self, rcs, out, dry):
        if dry:
            status, detail = exit_codes_judge(rcs, out, dry)
            return self._dry(status, detail, dry)
        refused = ("Device not supported", "Unable to find injection", "unsupported", "error 999")
        if any(r in out for r in refused) and "memcheck driver:" not in out:
            return "unsupported", f"compute-sanitizer refused the device: {last_line(out)}"
        summaries = [ln.strip() for ln in out.splitlines() if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln
                     or ln.startswith("memcheck driver:")]
        if rcs != [0] * len(rcs) or len(rcs) < 2:
            return "fail", "; ".join(summaries) or f"exit {rcs}: {last_line(out)}"
        return "pass", "; ".join(summaries) or last_line(out)

    # (4)-(7) benchmarks ----------------------------------------------------------------------------------
    def bench(self, name, title, limit, args, dry_extra, csv=None, gpu_extra=()) -> Step:
        csv = csv or name

        def cmds(dry: bool) -> list[Cmd]:
            extra = [*dry_extra, "--device", "cpu"] if dry else [*gpu_extra, "--device", "cuda"]
            return [Cmd([PY, *args, *extra, "--csv", self.csv(csv)])]

        def judge(rcs, out, dry):
            status, detail = exit_codes_judge(rcs, out, dry)
            return self._dry(status, detail, dry)

        return Step(name, title, limit, cmds, judge, code_key)

    def _dry(self, status: str, detail: str, dry: bool) -> tuple[str, str]:
        """A GPU step's dry run: `skipped` (with why) when its command ran, `fail` when it did not."""
        if not dry or status != "pass":
            return status, detail
        return "skipped", f"{NO_GPU}; dry run ok: {detail}"


# report ------------------------------------------------------------------------------------------------
def write_report(results: list[Result], check: Check, out: Path | None, meta: dict) -> tuple[str, str]:
    """summary.md and report.json in the work folder and `out`, plus the combined log and the CSVs in `out`;
    returns (the status table, the last lines of each benchmark's output) for the console."""
    rows = ["| step | status | s | detail |", "|---|---|---|---|"]
    for r in results:
        note = " (earlier run)" if r.reused else ""
        rows.append(f"| {r.name} | {r.status}{note} | {r.seconds:.0f} | {r.detail.replace('|', '/')} |")
    table = "\n".join(rows)
    head = f"# gpu-check {'(dry: no GPU)' if check.dry else ''}\n\n{json.dumps(meta)}\n\n"
    tails, short = [], []
    for r in results:
        log = check.work / "logs" / f"{r.name}.log"
        if log.exists() and r.name in ("tests", "loss", "decode", "train", "condense"):
            lines = [ln[:200] for ln in log.read_text(errors="replace").splitlines()]
            tails.append(f"## {r.name} (last lines)\n```\n" + "\n".join(lines[-25:]) + "\n```")
            if not r.reused:
                short.append(f"--- {r.name}\n" + "\n".join(lines[-8:]))
    summary = head + table + "\n\n" + "\n\n".join(tails) + "\n"
    report = {"meta": meta, "steps": [r.__dict__ for r in results]}
    for dest in filter(None, (check.work, out)):
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "summary.md").write_text(summary)
        (dest / "report.json").write_text(json.dumps(report, indent=1))
    if out is not None:
        with open(out / "gpu_check.log", "w") as f:
            for r in results:
                log = check.work / "logs" / f"{r.name}.log"
                if log.exists():
                    f.write(f"\n===== {r.name}: {r.status} =====\n{log.read_text(errors='replace')}")
        for name in CSVS:
            src = check.results / f"{name}.csv"
            if src.exists():
                shutil.copyfile(src, out / f"{name}.csv")
    return table, "\n".join(short)


def preflight() -> int:
    """Versions of what the steps need; exit 1 naming what is missing."""
    missing = []
    for name in REQUIRED + OPTIONAL:
        try:
            mod = importlib.import_module(name)
            print(f"{name} {getattr(mod, '__version__', '?')}")
        except Exception as exc:  # an import that fails for any reason counts as missing
            print(f"{name} MISSING ({exc!r})")
            if name in REQUIRED:
                missing.append(name)
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"gpu {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB, cuda {torch.version.cuda}")
    print(f"nvcc {shutil.which('nvcc') or 'not on PATH'}; compute-sanitizer {shutil.which('compute-sanitizer')}")
    if missing:
        print(f"preflight: missing required packages: {', '.join(missing)}")
        return 1
    print("preflight: ok")
    return 0


def verify_ext(require_cuda: bool) -> int:
    """fastcbd._C imports and registers each op's CPU (and, with require_cuda, CUDA) kernel."""
    import torch

    from fastcbd import _ext

    if not _ext.available():
        print(f"verify-ext: fastcbd._C does not import: {_ext.IMPORT_ERROR!r}")
        return 1
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    missing = [f"{op}_fwd[{key}]" for op in OPS for key in ("CPU", "CUDA") if (key == "CPU" or require_cuda)
               and not has(f"fastcbd_C::{op}_fwd", key)]
    print(f"verify-ext: fastcbd._C imports; CUDA kernels compiled in: {'yes' if _ext.with_cuda() else 'no'}")
    if missing:
        print(f"verify-ext: kernels not registered: {', '.join(missing)}")
        return 1
    print(f"verify-ext: ok, {len(OPS)} ops registered{' on CPU and CUDA' if require_cuda else ' on CPU'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="the dry mode even where a GPU is present")
    ap.add_argument("--steps", default=os.environ.get("GPU_CHECK_STEPS", ""),
                    help="comma-separated steps to (re)run; the others keep their earlier record")
    ap.add_argument("--fresh", action="store_true", help="forget the earlier state: run every step again")
    ap.add_argument("--deadline", type=float, default=float(os.environ.get("GPU_CHECK_DEADLINE", 480)),
                    help="global deadline in seconds (GPU_CHECK_DEADLINE, default 480)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "gpu_check"), help="state, logs and CSVs")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="where the report goes too ($OUT)")
    ap.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--verify-ext", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--require-cuda", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.preflight:
        return preflight()
    if args.verify_ext:
        return verify_ext(args.require_cuda)
    import torch

    dry = args.dry or not torch.cuda.is_available()
    work = Path(args.work).resolve()
    out = Path(args.out).resolve() if args.out else None
    check = Check(work, dry)
    steps = check.steps()
    only = [s for s in args.steps.split(",") if s]
    unknown = set(only) - {s.name for s in steps}
    if unknown:
        ap.error(f"--steps: unknown step(s) {', '.join(sorted(unknown))}; known: {', '.join(s.name for s in steps)}")
    meta = {"dry": dry, "deadline_s": args.deadline, "python": sys.version.split()[0], "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if not dry else None}
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_CACHE_DIR=str(work / "triton-cache"),
               TORCHINDUCTOR_CACHE_DIR=str(work / "inductor-cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), str(work / "site"), os.environ.get("PYTHONPATH")])))
    if "CUDA_HOME" not in env and os.path.exists("/usr/local/cuda/bin/nvcc"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    table = []
    runner = Runner(steps, work, deadline_s=args.deadline, dry=dry, cwd=ROOT, env=env, only=only,
                    fresh=args.fresh, report=lambda res: table.append(write_report(res, check, out, meta)))
    results = runner.run()
    table_text, tails = table[-1]
    print(f"\n{tails}\n\ngpu-check {'dry run (no GPU)' if dry else 'on ' + str(meta['gpu'])}: report in {out or work}\n")
    print(table_text)
    return 1 if any(r.status == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
