"""Forward + backward time and peak memory of the fused losses against eager, torch.compile and the roofline.

    cd /work/main && .venv/bin/python benchmarks/bench_loss.py                   # all cases, CPU, fp32, 2 threads
    .venv/bin/python benchmarks/bench_loss.py --quick --dtype fp32 bf16 --csv /tmp/x.csv   # smoke test, seconds
    .venv/bin/python benchmarks/bench_loss.py --device cuda --dtype fp32 bf16    # on a GPU (eager, compile,
                                                                                 #  triton, cuda, floor)

Variants, each timed as one forward + backward (torch.autograd.grad of the loss w.r.t. the
differentiable inputs, so the gradients are materialised and counted in the memory):
  eager    <op>_ref, plain PyTorch autograd (the definition), in the inputs' dtype
  compile  torch.compile(<op>_ref) (default mode, fwd + bwd through AOTAutograd); its first call,
           compile included, is reported separately as compile_s and never timed
  cpu      fastcbd with FASTCBD_BACKEND=cpu (the compiled C++ kernels)      [CPU]
  torch    fastcbd with FASTCBD_BACKEND=torch (the fused algorithm in PyTorch ops) [CPU]
  triton / cuda   fastcbd with that backend                                [GPU]
  floor    cbd_loss: the three GEMMs alone (S = P W^T, S W, S^T P) in the dtype the fused path runs them
           in (fastcbd.ops.cosine_ce.gemm_dtype: fp32, or bf16 with fp32 accumulation on CUDA);
           distillation terms: one read of the inputs (a sum over each input tensor)
Ceilings, measured first in the same run (rows with case "ceiling"): a large device-to-device copy
(bytes read + written / time) and a large square matmul in fp32 and in each --dtype (FLOP / time). Each case
gets a roofline floor = max(GEMM FLOPs / matmul rate, ideal bytes / copy rate), the ideal bytes being one
read of every input and one write of every gradient; pct_roofline = 100 x floor / median.
Variants are timed round-robin (one call each per round, order rotating) so that load from other
processes hits them alike; --sequential times each variant's repeats back to back.
Ratios: x_eager = eager median / median (speed-up), x_compile likewise, x_floor = median / floor median
(>= 1: how far above the floor), mem_vs_eager = peak / eager peak. Rows go to benchmarks/results/loss.csv,
appended after each case, so a run stopped by a deadline keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

_T_PROCESS = time.perf_counter()  # before torch's import: --budget-s counts from here

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: `python benchmarks/bench_loss.py`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.harness import append_rows, machine_info, measure, print_table, summarize  # noqa: E402
from fastcbd.ops import backend as fc_backend  # noqa: E402
from fastcbd.ops import cosine_ce as ce_mod  # noqa: E402
from fastcbd.ops.cbd_loss import cbd_loss, cbd_loss_ref  # noqa: E402
from fastcbd.ops.cosine_distill import cosine_distill, cosine_distill_ref  # noqa: E402
from fastcbd.ops.multi_teacher_kd import multi_teacher_kd, multi_teacher_kd_ref  # noqa: E402

DEFAULT_CSV = ROOT / "benchmarks" / "results" / "loss.csv"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # cbd_loss | cosine_distill | multi_teacher_kd
    B: int
    K: int
    Dk: int = 0  # teacher feature width (cbd_loss, cosine_distill)
    C: int = 0  # classes (cbd_loss, multi_teacher_kd)
    tau: float = 4.0

    @property
    def shape(self) -> str:
        if self.op == "cbd_loss":
            return f"B={self.B} K={self.K} Dk={self.Dk} C={self.C}"
        if self.op == "cosine_distill":
            return f"B={self.B} K={self.K} Dk={self.Dk}"
        return f"B={self.B} K={self.K} C={self.C} tau={self.tau:g}"

    def quick(self) -> Case:
        """The --quick shape: B <= 32, D_k <= 128, C / 8 (a smoke test of the script, seconds on 2 cores)."""
        return replace(self, B=min(self.B, 32), Dk=min(self.Dk, 128), C=max(1, self.C // 8) if self.C else 0)


CASES = [
    Case("imagenet_lt", "cbd_loss", B=256, K=4, Dk=2048, C=1000),
    Case("inat18", "cbd_loss", B=256, K=4, Dk=2048, C=8142),
    Case("cifar100", "cbd_loss", B=128, K=4, Dk=64, C=100),
    Case("distill", "cosine_distill", B=256, K=4, Dk=2048),
    Case("logit_kd", "multi_teacher_kd", B=256, K=4, C=8142, tau=4.0),
]
# On a GPU the launch-bound CIFAR case goes last, so that a deadline cuts it first.
CUDA_ORDER = ["imagenet_lt", "inat18", "distill", "logit_kd", "cifar100"]

# Targets of issue #4 (CPU, fp32, 2 threads), checked against the fastcbd kernel row of each case.
TARGETS = {
    "imagenet_lt": {"max_x_floor": 1.15, "min_x_compile": 1.0, "max_mem_vs_eager": 0.50},
    "inat18": {"max_x_floor": 1.15, "min_x_compile": 1.0, "max_mem_vs_eager": 0.50},
    "distill": {"min_x_eager": 5.0, "min_x_compile": 1.5},
    "logit_kd": {"min_x_eager": 2.5, "min_x_compile": 1.3, "max_mem_vs_eager": 0.40},
}


# ---------------------------------------------------------------------------------------------------------
# Roofline: pure functions of the case and the measured ceilings (unit-tested without a device).

def case_work(case: Case, dtype: str) -> dict:
    """GEMM FLOPs and ideal bytes of one forward + backward: every input read once, every gradient written
    once, both in the inputs' dtype (targets int64)."""
    es = torch.finfo(DTYPES[dtype]).bits // 8
    if case.op == "cbd_loss":
        D = case.K * case.Dk
        flops = 6 * case.B * case.C * D  # S = P W^T, S W, S^T P
        nbytes = es * (case.B * D + case.C * D + case.B * D) + 8 * case.B + es * (case.B * D + case.C * D)
    elif case.op == "cosine_distill":
        D = case.K * case.Dk
        flops, nbytes = 0, es * 3 * case.B * D  # p and the teachers in, grad_p out
    else:
        flops, nbytes = 0, es * (case.K + 2) * case.B * case.C  # z and K teachers in, grad_z out
    return {"gemm_flop": flops, "ideal_bytes": nbytes}


def flop_rate(dtype: str, matmul_flops: dict) -> float:
    """The GEMM ceiling a dtype's floor uses: its own matmul rate, or fp32's when faster (a bf16 problem
    may run fp32 GEMMs, as the CPU path does)."""
    return max(matmul_flops.get(dtype, 0.0), matmul_flops.get("fp32", 0.0))


def roofline_floor_ms(flops: float, nbytes: float, flops_per_s: float, bytes_per_s: float) -> tuple[float, str]:
    """(floor in ms, the bound: "gemm" or "memory") = max(flops / FLOP rate, bytes / bandwidth)."""
    t_gemm = flops / flops_per_s if flops and flops_per_s > 0 else 0.0
    t_mem = nbytes / bytes_per_s if bytes_per_s > 0 else math.nan
    return (max(t_gemm, t_mem) * 1e3, "gemm" if t_gemm >= t_mem else "memory")


def pct_of_roofline(floor_ms: float, median_ms: float) -> float:
    """100 x floor / measured time: 100 % = at the roofline, 25 % = four times slower than it."""
    return 100.0 * floor_ms / median_ms if median_ms > 0 and not math.isnan(floor_ms) else math.nan


def add_roofline(rows: list[dict], case: Case, dtype: str, ceilings: dict) -> None:
    work = case_work(case, dtype)
    floor_ms, bound = roofline_floor_ms(work["gemm_flop"], work["ideal_bytes"],
                                        flop_rate(dtype, ceilings["matmul_flops"]), ceilings["copy_bytes_per_s"])
    for r in rows:
        r.update(work, roofline_ms=floor_ms, roofline_bound=bound,
                 pct_roofline=pct_of_roofline(floor_ms, r["median_ms"]))


# ---------------------------------------------------------------------------------------------------------
# Ceilings, measured in the same run.

def _best_ms(fn, device: torch.device, warmup: int, repeats: int, inner: int) -> dict:
    """Per-call times (ms) of `inner` back-to-back calls, `repeats` times: CUDA events on a GPU (no host
    overhead in the interval), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    return summarize(times)


def measure_ceilings(device: torch.device, dtypes: list[str], quick: bool, log) -> tuple[list[dict], dict]:
    """A large copy (GB/s) and a large square matmul per dtype (TFLOP/s); the best of the repeats counts."""
    cuda = device.type == "cuda"
    copy_mib = (256 if quick else 1024) if cuda else (64 if quick else 256)
    n = (4096 if quick else 8192) if cuda else (512 if quick else 2048)
    repeats = 3 if quick else (10 if cuda else 5)
    rows, out = [], {"matmul_flops": {}}

    def row(op, shape, dtype, res, **rate):  # the columns in the order of the case rows, then the rate
        keep = ("median_ms", "p10_ms", "p90_ms", "min_ms", "max_ms", "repeats")
        return {"case": "ceiling", "op": op, "shape": shape, "dtype": dtype, "device": device.type,
                "variant": "ceiling", "interleaved": 0, **{k: res[k] for k in keep}, "peak_mem_mb": math.nan,
                "mem_method": "none", **rate}

    src = torch.empty(copy_mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    res = _best_ms(functools.partial(dst.copy_, src), device, warmup=2, repeats=repeats, inner=5 if cuda else 1)
    out["copy_bytes_per_s"] = 2 * src.numel() / (res["min_ms"] * 1e-3)  # read + write
    rows.append(row("copy", f"{copy_mib} MiB", "u8", res, ceiling_gbps=out["copy_bytes_per_s"] / 1e9))
    log(f"  ceiling  copy {copy_mib} MiB: {out['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write)")
    src = dst = None  # freed before the matmuls
    g = torch.Generator(device=device).manual_seed(0)
    for dt in dict.fromkeys(["fp32", *dtypes]):
        a, b = (torch.randn(n, n, device=device, generator=g).to(DTYPES[dt]) for _ in range(2))
        res = _best_ms(functools.partial(torch.mm, a, b), device, warmup=2, repeats=repeats, inner=3 if cuda else 1)
        rate = 2 * n**3 / (res["min_ms"] * 1e-3)
        out["matmul_flops"][dt] = rate
        rows.append(row("matmul", f"n={n}", dt, res, ceiling_tflops=rate / 1e12))
        log(f"  ceiling  matmul {dt} n={n}: {rate / 1e12:.2f} TFLOP/s")
    return rows, out


# ---------------------------------------------------------------------------------------------------------
# The cases.

def make_inputs(case: Case, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Inputs of the case in `dtype`: (differentiable tensors, ref fn, fused fn, floor fn, inputs)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    if case.op in ("cbd_loss", "cosine_distill"):
        D = case.K * case.Dk
        p = randn(case.B, D).relu_().requires_grad_()  # the student projection comes out of a ReLU
        teachers = [randn(case.B, case.Dk).relu_() for _ in range(case.K)]  # pooled (post-ReLU) features
        if case.op == "cosine_distill":
            params = [p]

            def ref():
                return cosine_distill_ref(p, teachers)

            def fused():
                return cosine_distill(p, teachers)

            def floor():  # one read of the inputs
                return [p.detach().sum()] + [t.sum() for t in teachers]

            return params, ref, fused, floor, (p, teachers)
        w = randn(case.C, D, scale=0.02).requires_grad_()
        target = torch.randint(0, case.C, (case.B,), generator=g).to(device)
        params = [p, w]

        def ref():
            return cbd_loss_ref(p, w, target, teachers)

        def fused():
            return cbd_loss(p, w, target, teachers)

        gd = ce_mod.gemm_dtype(p, w)  # the fused path's GEMM dtype; an upcast copy is not part of the floor
        pd, wd = p.detach().to(gd), w.detach().to(gd)

        def floor():  # the three GEMMs of the cosine classifier, fresh fp32 outputs as the fused path has
            s = torch.empty(case.B, case.C, device=device)
            ce_mod._mm_f32(pd, wd.t(), s)
            sg = s.to(gd)
            gp, gw = torch.empty(case.B, D, device=device), torch.empty(case.C, D, device=device)
            ce_mod._mm_f32(sg, wd, gp)
            ce_mod._mm_f32(sg.t(), pd, gw)
            return gp, gw

        return params, ref, fused, floor, (p, w, target, teachers)

    z = randn(case.B, case.C, scale=3.0).requires_grad_()
    teachers = [randn(case.B, case.C, scale=3.0) for _ in range(case.K)]
    params = [z]

    def ref():
        return multi_teacher_kd_ref(z, teachers, tau=case.tau)

    def fused():
        return multi_teacher_kd(z, teachers, tau=case.tau)

    def floor():
        return [z.detach().sum()] + [t.sum() for t in teachers]

    return params, ref, fused, floor, (z, teachers)


def fwd_bwd(loss_fn, params):
    def run():
        loss = loss_fn()
        return torch.autograd.grad(loss, params)

    return run


@contextlib.contextmanager
def fastcbd_backend(name: str):
    old = os.environ.get("FASTCBD_BACKEND")
    os.environ["FASTCBD_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTCBD_BACKEND", None)
        else:
            os.environ["FASTCBD_BACKEND"] = old


def compiled_ref(case: Case, inputs):
    """torch.compile of the reference with the case's inputs bound as graph inputs; returns a closure."""
    if case.op == "cbd_loss":
        fn = torch.compile(cbd_loss_ref, dynamic=False)
        p, w, target, teachers = inputs
        return lambda: fn(p, w, target, teachers)
    if case.op == "cosine_distill":
        fn = torch.compile(cosine_distill_ref, dynamic=False)
        p, teachers = inputs
        return lambda: fn(p, teachers)
    fn = torch.compile(multi_teacher_kd_ref, dynamic=False)
    z, teachers = inputs
    return lambda: fn(z, teachers, tau=case.tau)


def with_backend(name: str, fn):
    def run():
        with fastcbd_backend(name):
            return fn()

    return run


def run_case(case: Case, device: torch.device, variants: list[str], warmup: int, repeats: int,
             interleave: bool, log, dtype: str = "fp32", compile_ok=lambda: True) -> list[dict]:
    """Time every variant of one case in one dtype; returns one row per variant (ratios added).

    interleave=True (the default of the script) times the variants round-robin, one call each per round
    (the order rotating), so that load from other processes on a shared machine hits them alike and the
    ratios stay meaningful; False times each variant's repeats back to back with measure().
    compile_ok(): False skips the compile variant (the deadline is too near for a compile).
    """
    params, ref, fused, floor, inputs = make_inputs(case, device, DTYPES[dtype])
    fns, extra = {}, {}
    for variant in variants:
        if variant == "eager":
            fns["eager"] = fwd_bwd(ref, params)
        elif variant == "compile":
            if not compile_ok():
                log(f"  {case.name:12s} {dtype} compile  skipped: too close to the --budget-s deadline")
                continue
            torch._dynamo.reset()
            run = fwd_bwd(compiled_ref(case, inputs), params)
            t0 = time.perf_counter()
            run()  # compiles forward and backward
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            extra["compile"] = {"compile_s": time.perf_counter() - t0}
            log(f"  {case.name:12s} {dtype} compile  compiled in {extra['compile']['compile_s']:.1f} s")
            fns["compile"] = run
        elif variant == "floor":
            fns["floor"] = floor
        else:  # a fastcbd backend
            reason = fc_backend.why_unavailable(variant, device)
            if reason is not None:
                log(f"  {case.name:12s} {dtype} {variant:8s} skipped: {reason}")
                continue
            fns[variant] = with_backend(variant, fwd_bwd(fused, params))

    results = {}
    if interleave:
        names = list(fns)
        for name in names:
            for _ in range(warmup):
                fns[name]()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # measure() runs gc.collect() before its timed calls; once torch._dynamo is imported (the first
        # custom-op call) a full collection takes ~0.3 s, one per call here. The objects alive now are
        # kept out of its reach until the case is done.
        gc.collect()
        gc.freeze()
        try:
            times = {name: [] for name in names}
            for r in range(repeats):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    res = measure(fns[name], warmup=0, repeats=1, device=device, memory=False)
                    times[name].append(res["median_ms"])
            for name in names:
                mem = measure(fns[name], warmup=0, repeats=1, device=device)
                results[name] = {**summarize(times[name]), "peak_mem_mb": mem["peak_mem_mb"],
                                 "mem_method": mem["mem_method"]}
        finally:
            gc.unfreeze()
    else:
        for name, fn in fns.items():
            results[name] = measure(fn, warmup=warmup, repeats=repeats, device=device)

    rows = []
    for name, res in results.items():
        row = {"case": case.name, "op": case.op, "shape": case.shape, "dtype": dtype, "device": device.type,
               "variant": name, "interleaved": int(interleave),
               **{k: res[k] for k in ("median_ms", "p10_ms", "p90_ms", "min_ms", "max_ms", "repeats",
                                      "peak_mem_mb", "mem_method")}, **extra.get(name, {})}
        rows.append(row)
        log(f"  {case.name:12s} {dtype} {name:8s} median {res['median_ms']:9.3f} ms  "
            f"[p10 {res['p10_ms']:.3f}, p90 {res['p90_ms']:.3f}]  peak {res['peak_mem_mb']:.1f} MiB")
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """x_eager, x_compile, x_floor and mem_vs_eager within the rows of one case and dtype."""
    by = {r["variant"]: r for r in rows}
    eager, comp, floor = by.get("eager"), by.get("compile"), by.get("floor")
    for r in rows:
        m = r["median_ms"]
        r["x_eager"] = eager["median_ms"] / m if eager else math.nan
        r["x_compile"] = comp["median_ms"] / m if comp else math.nan
        r["x_floor"] = m / floor["median_ms"] if floor else math.nan
        base_mem = eager["peak_mem_mb"] if eager else math.nan
        r["mem_vs_eager"] = r["peak_mem_mb"] / base_mem if base_mem else math.nan


def check_targets(rows: list[dict], kernel_variant: str) -> list[dict]:
    """One line per target of issue #4 (fp32 rows): the value, the bound, met or missed."""
    out = []
    for r in rows:
        if r["variant"] != kernel_variant or r["case"] not in TARGETS or r.get("dtype", "fp32") != "fp32":
            continue
        for key, bound in TARGETS[r["case"]].items():
            kind, metric = key.split("_", 1)
            value = r[metric]
            ok = value <= bound if kind == "max" else value >= bound
            out.append({"case": r["case"], "variant": kernel_variant, "metric": metric,
                        "target": f"{'<=' if kind == 'max' else '>='} {bound:g}", "value": value,
                        "status": "met" if ok else "MISSED"})
    return out


def main(argv=None, t_start: float | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small shapes (B <= 32, D_k <= 128, C / 8), 1 warm-up, 3 repeats, 1 thread, no compile "
                         "unless --variants names it: a smoke test of the script, not a measurement")
    ap.add_argument("--only", default="",
                    help="comma-separated case names: " + ", ".join(c.name for c in CASES))
    ap.add_argument("--variants", default="",
                    help="comma-separated subset of eager,compile,<backends>,floor (default: all)")
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES),
                    help="input dtype(s) of every case (default fp32); each case runs in each")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default 2; --quick 1, which a loaded 2-core machine does not "
                         "stall at every parallel region's barrier)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per variant (default 15 on CPU, 30 on CUDA, --quick 3)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls first (default 3 on CPU, 5 on CUDA, --quick 1)")
    ap.add_argument("--sequential", action="store_true",
                    help="time each variant's repeats back to back (default: round-robin, see run_case)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="no new case (nor a compile within 20 s of it) after this many seconds from the process "
                         "start; the rows measured so far are kept (default 90 on CUDA, none on CPU; 0 = none)")
    ap.add_argument("--csv", default=str(DEFAULT_CSV), help="results file to append to ('' = do not write)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter() if t_start is None else t_start

    torch.set_num_threads(args.threads if args.threads is not None else (1 if args.quick else 2))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is available")
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5 if cuda else 3)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 30 if cuda else 15)
    budget = args.budget_s if args.budget_s is not None else (90.0 if cuda else 0.0)
    deadline = t_start + budget if budget > 0 else math.inf
    kernels = ["triton", "cuda"] if cuda else ["cpu", "torch"]
    if args.variants:
        variants = args.variants.split(",")
    else:
        variants = ["eager", *([] if args.quick else ["compile"]), *kernels, "floor"]
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - {c.name for c in CASES}
    if unknown:
        ap.error(f"--only: unknown case(s) {sorted(unknown)}; known: {[c.name for c in CASES]}")
    cases = [c for c in CASES if not names or c.name in names]
    if cuda:
        cases.sort(key=lambda c: CUDA_ORDER.index(c.name))
    if args.quick:
        cases = [c.quick() for c in cases]

    def log(s: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s] {s}", flush=True)

    info = machine_info()
    print(f"# bench_loss  {time.strftime('%Y-%m-%d %H:%M')}  {info['cpu']}, {info['cores']} cores, "
          f"{info['threads']} threads, torch {info['torch']}, triton {info['triton'] or '-'}, "
          f"GPU {info['gpu'] or '-'}, commit {info['commit']}, load {info['load1']}  "
          f"(dtypes {' '.join(args.dtype)}, warmup {warmup}, repeats {repeats}, "
          f"{'sequential' if args.sequential else 'interleaved'}"
          f"{f', budget {budget:g} s' if budget > 0 else ''}{', QUICK' if args.quick else ''})", flush=True)

    n_written = 0

    def save(rows: list[dict]) -> None:
        nonlocal n_written
        for r in rows:
            r["quick"] = int(args.quick)
        if args.csv and rows:
            append_rows(args.csv, rows)
            n_written += len(rows)

    ceiling_rows, ceilings = measure_ceilings(device, args.dtype, args.quick, log)
    save(ceiling_rows)
    rows, skipped = [], []
    for case in cases:
        for dtype in args.dtype:
            if time.perf_counter() > deadline:
                skipped.append(f"{case.name}/{dtype}")
                log(f"  {case.name:12s} {dtype} skipped: past the --budget-s deadline ({budget:g} s)")
                continue
            log(f"{case.name} {dtype} ({case.op}, {case.shape})")
            case_rows = run_case(case, device, variants, warmup, repeats, interleave=not args.sequential,
                                 log=log, dtype=dtype, compile_ok=lambda: time.perf_counter() < deadline - 20)
            add_roofline(case_rows, case, dtype, ceilings)
            save(case_rows)
            rows += case_rows

    print()
    print_table(ceiling_rows, [("op", "ceiling"), ("shape", "size"), ("dtype", "dtype"), ("min_ms", "best ms"),
                               ("ceiling_gbps", "GB/s"), ("ceiling_tflops", "TFLOP/s")])
    print()
    print_table(rows, [("case", "case"), ("dtype", "dtype"), ("variant", "variant"), ("median_ms", "median ms"),
                       ("p10_ms", "p10"), ("p90_ms", "p90"), ("peak_mem_mb", "peak MiB"),
                       ("x_eager", "x eager"), ("x_compile", "x compile"), ("x_floor", "/ floor"),
                       ("pct_roofline", "% roofline"), ("roofline_bound", "bound"),
                       ("mem_vs_eager", "mem/eager"), ("compile_s", "compile s")])
    if not cuda and not args.quick:
        checks = check_targets(rows, "cpu")
        if checks:
            print("\nTargets (issue #4, CPU, fp32):")
            print_table(checks, ["case", "variant", "metric", "target", "value", "status"])
    if skipped:
        print(f"\nskipped past the deadline: {', '.join(skipped)}")
    if args.csv:
        print(f"\nappended {n_written} rows to {args.csv}")
    print(f"bench_loss done in {time.perf_counter() - t_start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(t_start=_T_PROCESS))
