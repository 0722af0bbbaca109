"""Images/s, model FLOP utilisation and peak memory of one full CBD_ENS student step: data, K teachers
forward, student forward + backward, loss, optimizer step. fastcbd's engine against a plain eager PyTorch
implementation of the same recipe written here (a Python loop over the teachers under no_grad, the
unfused loss in PyTorch ops).

    cd /work/main && .venv/bin/python benchmarks/bench_train.py            # resnet18 + cnn, CPU, 2 threads
    .venv/bin/python benchmarks/bench_train.py --quick --only cnn           # smoke test
    .venv/bin/python benchmarks/bench_train.py --only resnet50 --device cuda --compile   # the GPU run
    .venv/bin/python benchmarks/bench_train.py --only resnet50 --device cpu --quick --csv /tmp/x.csv  # its dry run
    .venv/bin/python benchmarks/bench_train.py --profile --only resnet18     # where a step's time goes

Cases (default: resnet18 and cnn on the CPU, all three on a GPU):
  resnet18  3 x 112 x 112 crops of 128 px images, batch 64, 4 teachers; data through the loaders below
  cnn       the demo's small_cnn on 28 x 28 gray digits, batch 128, 4 teachers; loaders below
  resnet50  ImageNet-LT shape: 224 px, batch 256, 4 ResNet-50 teachers, 1000 classes, bf16. Data:
            synthetic uint8 images resident on the device; each step gathers a random batch and
            normalises it (no decode, no crop: the step is measured, not the input pipeline), the same
            for every variant. --quick on the CPU runs a dry shape instead (ResNet-18 stand-in, 32 px,
            batch 4, 2 teachers, 10 classes) so that every variant's code path runs once in seconds.
Variants:
  plain_fp32   fp32, the teachers in a loop under no_grad, the unfused loss, torch.optim.SGD; resnet18/cnn
               feed it with a DataLoader(workers) + torchvision v2 RandomResizedCrop per image
  plain_bf16   the same under bf16 autocast (resnet50: and channels_last)
  fastcbd      bf16 autocast, channels_last, the teachers in a loop under inference_mode, the fused
               cbd_loss (fastcbd.functional); resnet18/cnn: DeviceLoader (batched on-device augmentation)
  fastcbd_fp32 the same without autocast (resnet18, cnn)
  fastcbd_vmap the same with the teachers stacked into one vmapped module (teacher.batched=on)
  fastcbd_compile (--compile) the same with torch.compile of the loss function (teachers, student forward,
               loss; backward through AOTAutograd). It runs in a subprocess bounded by --compile-budget
               seconds (startup, compile, warm-up and timed steps together): past it the subprocess is
               killed and the row says `skipped` with the reason, so the script never hangs on a compile.
Timing: resnet50 interleaves its variants (one step each per round, order rotating; --sequential: back to
back); resnet18/cnn time each variant's steps back to back (their DataLoader workers would prefetch while
other variants run). On CUDA cudnn.benchmark is on (its autotuning falls in the warm-up) and PyTorch's
default precision flags are kept (cuDNN convolutions may use TF32 in fp32; matmuls do not).
MFU: model FLOPs per image = 3 x student forward + K x teacher forward (forward + backward of the
student ~ 3 forwards), counted once with torch.utils.flop_counter.FlopCounterMode on the meta device
(2 FLOPs per multiply-add: ResNet-50 at 224 px counts 8.2 GFLOP, the 4.1 G often quoted is
multiply-adds), over the bf16 matmul rate measured in the same call (n x n x n bf16 GEMMs timed with
CUDA events, or perf_counter on the CPU). fp32 rows are divided by the same bf16 rate.
Autocast is bf16 on the CPU and on a GPU (it was fp16 on a GPU before the resnet50 case). The variants of
a case share its frozen teachers (one set per memory format); each has its own student and optimizer.
Rows go to benchmarks/results/train.csv; x_plain = plain_fp32 median / median, x_plain_bf16 likewise.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness import append_rows, measure, print_table, summarize
from fastcbd.data.augment import AugmentConfig
from fastcbd.data.device_loader import DeviceLoader
from fastcbd.data.samplers import build_sampler
from fastcbd.functional import cbd_loss
from fastcbd.models import Student, Teacher
from fastcbd.train.config import OptimConfig
from fastcbd.train.ensemble import ensemble
from fastcbd.train.loop import autocast_context, make_optimizer

ALPHA, BETA, SIGMA = 0.4, 100.0, 20.0
LOADER_VARIANTS = ("plain_fp32", "plain_bf16", "fastcbd", "fastcbd_fp32", "fastcbd_vmap")
RESIDENT_VARIANTS = ("plain_fp32", "plain_bf16", "fastcbd", "fastcbd_vmap")
CASES = {  # backbone, width, channels, stored size, crop, batch, images, classes, teachers
    "resnet18": {"backbone": "resnet18", "width": 0, "c": 3, "size": 128, "crop": 112, "batch": 64, "n": 1024,
                 "classes": 100, "k": 4, "variants": LOADER_VARIANTS, "shape": "ResNet-18, 112 px, batch 64, 4 teachers"},
    "cnn": {"backbone": "small_cnn", "width": 16, "c": 1, "size": 28, "crop": 28, "batch": 128, "n": 2048, "classes": 10,
            "k": 4, "variants": LOADER_VARIANTS, "shape": "small CNN, 28 px, batch 128, 4 teachers"},
    # resident: uint8 images on the device, random gathers; no loader, no augmentation (see the docstring)
    "resnet50": {"backbone": "resnet50", "width": 0, "c": 3, "size": 224, "crop": 224, "batch": 256, "n": 512,
                 "classes": 1000, "k": 4, "variants": RESIDENT_VARIANTS, "resident": True,
                 "shape": "ResNet-50, 224 px, batch 256, 4 ResNet-50 teachers, 1000 classes"},
}
DRY = {  # --quick on the CPU: the same code paths on a shape that runs in seconds
    "resnet50": {**CASES["resnet50"], "backbone": "resnet18", "size": 32, "crop": 32, "batch": 4, "n": 16, "classes": 10,
                 "k": 2, "shape": "DRY SHAPE (not ResNet-50): ResNet-18 stand-in, 32 px, batch 4, 2 teachers, 10 classes"},
}
DEFAULT_CASES = {"cpu": ("resnet18", "cnn"), "cuda": ("resnet18", "cnn", "resnet50")}


def data(case, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (case["n"], case["size"], case["size"], case["c"]), dtype=np.uint8)
    y = np.minimum(rng.geometric(0.05, case["n"]) - 1, case["classes"] - 1)  # long-tailed labels
    y[: case["classes"]] = np.arange(case["classes"])  # every class has an image
    return x, y


class ResidentData:
    """Synthetic uint8 images (N, C, H, W) and labels resident on the device. batch(channels_last) gathers
    `batch` random images and normalises them as DeviceLoader does: (B, C, H, W) float32, (B,) int64."""

    def __init__(self, case, device):
        self.device, self.batch_size = device, case["batch"]
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(0)
        n, c, s = case["n"], case["c"], case["size"]
        self.x = torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, device=device, generator=self.gen)
        self.y = torch.randint(0, case["classes"], (n,), device=device, generator=self.gen)

    def batch(self, channels_last: bool):
        idx = torch.randint(len(self.x), (self.batch_size,), device=self.device, generator=self.gen)
        x = self.x.index_select(0, idx).float().sub_(127.5).div_(64.0)
        return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), \
            self.y.index_select(0, idx)


def models(case, device, channels_last, shared=None):
    """K frozen teachers (eval, no grad) and a fresh student, in the memory format asked. shared: a dict
    in which the teachers are kept per memory format, so that variants of one case share them (the same
    weights for all; fewer ResNet-50s to initialise and hold)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    init = torch.device(device) if torch.device(device).type == "cuda" else contextlib.nullcontext()
    shared = {} if shared is None else shared
    with init:  # initialise on the GPU: 5 x 25 M parameters of ResNet-50
        if fmt not in shared:
            torch.manual_seed(0)
            teachers = [Teacher(case["backbone"], case["classes"], case["c"], SIGMA, case["width"]) for _ in range(case["k"])]
            shared[fmt] = [t.to(device, memory_format=fmt).eval().requires_grad_(False) for t in teachers]
        teachers = shared[fmt]
        torch.manual_seed(1)
        proj = sum(t.out_features for t in teachers)
        student = Student(case["backbone"], case["classes"], proj, case["c"], SIGMA, case["width"])
    return teachers, student.to(device, memory_format=fmt)


def model_flops(case) -> dict:
    """Forward FLOPs of one image through the student (backbone, projection, classifier) and through one
    teacher's backbone, counted by FlopCounterMode on the meta device (no memory, no compute); and the
    step's model FLOPs per image, 3 x student + K x teacher."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        teacher = Teacher(case["backbone"], case["classes"], case["c"], SIGMA, case["width"])
        student = Student(case["backbone"], case["classes"], case["k"] * teacher.out_features, case["c"], SIGMA,
                          case["width"])
        x = torch.empty(1, case["c"], case["crop"], case["crop"])
    teacher.eval(), student.eval()  # batch norm in training mode refuses one value per channel; same FLOPs

    def count(fn):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(x)
        return counter.get_total_flops()

    f_s, f_t = count(student), count(teacher.features)
    return {"student_gflop": f_s / 1e9, "teacher_gflop": f_t / 1e9, "step_gflop_per_img": (3 * f_s + case["k"] * f_t) / 1e9}


def matmul_tflops(device, n=None, iters=None) -> float:
    """bf16 matmul rate (TFLOP/s) of this device: best of 3 timings of `iters` (n, n) @ (n, n) products
    into a preallocated output, after `iters` warm-up products; CUDA events on a GPU (8192^3: ~1.4 ms each
    at 790 TFLOP/s, ~0.1 s in all), perf_counter on the CPU."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 512)
    iters = iters or (20 if cuda else 5)
    g = torch.Generator(device=device)
    g.manual_seed(0)
    a, b = (torch.randn(n, n, device=device, generator=g).to(torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(iters):  # warm-up: cuBLAS heuristics, and the GPU's clocks ramp up
        torch.mm(a, b, out=c)
    best = math.inf
    for _ in range(3):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(iters):
                torch.mm(a, b, out=c)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                torch.mm(a, b, out=c)
            seconds = time.perf_counter() - t0
        best = min(best, seconds / iters)
    return 2 * n**3 / best / 1e12


def cbd_loss_plain(p, w, y, t_feats):
    """The CBD loss in plain PyTorch ops (DESIGN.md §1.1)."""
    f = F.normalize(p.float(), dim=1)
    t = torch.cat([F.normalize(tk.float(), dim=1) for tk in t_feats], dim=1) / len(t_feats) ** 0.5
    z = SIGMA * f @ F.normalize(w.float(), dim=1).t()
    return (1 - ALPHA) * F.cross_entropy(z, y) + ALPHA * BETA * (1 - (f * t).sum(1)).mean()


def loader_batches(case, device, workers):
    """resnet18/cnn's plain input: DataLoader + per-image torchvision RandomResizedCrop, forever."""
    import torchvision.transforms.v2 as T
    from torch.utils.data import DataLoader, Dataset

    x, y = data(case)
    tf = T.Compose([T.RandomResizedCrop(case["crop"], scale=(0.6, 1.0), antialias=True), T.ToDtype(torch.float32, scale=True),
                    T.Normalize([0.5] * case["c"], [0.25] * case["c"])])

    class DS(Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return tf(torch.from_numpy(x[i]).permute(2, 0, 1)), int(y[i])

    smp = build_sampler("balanced", y, seed=0)
    dl = DataLoader(DS(), batch_size=case["batch"], sampler=smp, num_workers=workers, drop_last=True,
                    persistent_workers=workers > 0)
    batches = itertools.cycle(dl) if workers == 0 else _forever(dl)
    return lambda: tuple(t.to(device) for t in next(batches))


def plain_step_fn(case, device, amp, workers=0, resident=None, shared=None):
    channels_last = resident is not None and amp != "none"  # resnet50's plain bf16 is the tuned eager baseline
    next_batch = (lambda: resident.batch(channels_last)) if resident is not None else loader_batches(case, device, workers)
    teachers, student = models(case, device, channels_last, shared)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=2.5e-4)

    def step():
        xb, yb = next_batch()
        with autocast_context(device, amp):
            with torch.no_grad():
                t_feats = [t.features(xb) for t in teachers]
            loss = cbd_loss_plain(student.features(xb), student.classifier.weight, yb, t_feats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def _forever(dl):
    while True:
        yield from dl


def device_loader_batches(case, device):
    """resnet18/cnn's fastcbd input: DeviceLoader with batched on-device random-resized crops, forever."""
    x, y = data(case)
    smp = build_sampler("balanced", y, seed=0)
    aug = AugmentConfig(crop_scale=(0.6, 1.0), crop_ratio=(0.75, 4 / 3), flip=False)
    if case["crop"] != case["size"]:  # DeviceLoader's crops keep the stored size: store at the crop size
        x = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float(), size=case["crop"], mode="bilinear",
                          antialias=True).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    loader = DeviceLoader(x, y, case["batch"], sampler=smp, aug=aug, mean=[0.5] * case["c"], std=[0.25] * case["c"],
                          device=device, drop_last=True, channels_last=True)

    def batches():
        for epoch in itertools.count():
            smp.set_epoch(epoch)
            yield from loader

    it = batches()
    return lambda: next(it)


def fastcbd_step_fn(case, device, amp, batched, compile_backend="", resident=None, shared=None):
    next_batch = (lambda: resident.batch(True)) if resident is not None else device_loader_batches(case, device)
    teachers, student = models(case, device, True, shared)
    run_teachers = ensemble(teachers, "on" if batched else "off")
    opt, sched = make_optimizer(list(student.parameters()), OptimConfig(lr=0.1), case["batch"], 10**6)

    def loss_fn(xb, yb):
        t_feats = run_teachers(xb)
        return cbd_loss(student.features(xb), student.classifier.weight, yb, t_feats, alpha=ALPHA, beta=BETA, sigma=SIGMA)

    if compile_backend:
        loss_fn = torch.compile(loss_fn, backend=compile_backend)

    def step():
        xb, yb = next_batch()
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, amp):
            loss = loss_fn(xb, yb)
        loss.backward()
        opt.step()
        sched.step()
        return loss

    return step


def build_step(case, variant, device, workers, resident, compile_backend="", shared=None):
    """The step function of one variant (see the module docstring); shared: see models()."""
    if variant in ("plain_fp32", "plain_bf16"):
        return plain_step_fn(case, device, "none" if variant == "plain_fp32" else "bf16", workers, resident, shared)
    if variant == "fastcbd_compile":
        return fastcbd_step_fn(case, device, "bf16", False, compile_backend, resident, shared)
    amp = "none" if variant == "fastcbd_fp32" else "bf16"
    return fastcbd_step_fn(case, device, amp, variant == "fastcbd_vmap", resident=resident, shared=shared)


def profile(case, device, amp, steps=2):
    """torch.profiler table of `steps` fastcbd steps (after 2 warm-up steps), by self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    resident = ResidentData(case, device) if case.get("resident") else None
    step = fastcbd_step_fn(case, device, amp, False, resident=resident)
    for _ in range(2):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with prof(activities=acts) as p:
        for _ in range(steps):
            step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(p.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=48))


def time_variants(steps: dict, device, warmup: int, repeats: int, memory: bool, interleave: bool) -> dict:
    """{variant: measure()-style dict}. interleave: after each variant's warm-up, `repeats` rounds of one
    step per variant, the order rotating, so that anything else on the machine hits all variants alike
    (each step timed between device synchronisations, the garbage collector off during the rounds)."""
    if not interleave or not steps:
        return {name: measure(fn, warmup=warmup, repeats=repeats, device=device, memory=memory)
                for name, fn in steps.items()}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    sync()
    times = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                steps[name]()
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    out = {}
    for name in names:
        mem = measure(steps[name], warmup=0, repeats=1, device=device) if memory else \
            {"peak_mem_mb": math.nan, "mem_method": "none"}
        out[name] = {**summarize(times[name]), "peak_mem_mb": mem["peak_mem_mb"], "mem_method": mem["mem_method"]}
    return out


def compile_worker(args, case, device, warmup, repeats, out_path):
    """In the subprocess: build the compiled step, time its first call (compile + one step) as compile_s,
    then the usual warm-up and timed steps; the result goes to out_path as JSON."""
    resident = ResidentData(case, device) if case.get("resident") else None
    step = build_step(case, "fastcbd_compile", device, args.workers, resident, args.compile_backend)
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - t0
    res = measure(step, warmup=max(warmup - 1, 0), repeats=repeats, device=device, memory=not args.quick)
    Path(out_path).write_text(json.dumps({**res, "compile_s": compile_s}))


def _die_with_parent():
    """In the compile subprocess: get SIGKILL when the parent script dies (e.g. a runner's time-out kills
    it), so that no compile outlives the step; exit at once if the parent is already gone."""
    if sys.platform == "linux":
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != int(os.environ.get("BENCH_TRAIN_PARENT", os.getppid())):
        sys.exit("bench_train: parent gone before the compile subprocess started")


def run_compile_subprocess(argv, name, budget_s, log) -> tuple[dict | None, str]:
    """Run the fastcbd_compile variant of case `name` in a subprocess limited to budget_s seconds.
    Returns (result, '') or (None, the reason it was skipped). The subprocess gets its own process group
    (Inductor's compile workers included) and is killed with it on time-out."""
    if budget_s < 1:
        return None, f"no time left for compile (budget {budget_s:.0f} s)"
    with tempfile.TemporaryDirectory(prefix="bench_train_compile_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--only", name, "--compile-worker", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env={**os.environ, "BENCH_TRAIN_PARENT": str(os.getpid())})
        try:
            output, _ = proc.communicate(timeout=budget_s)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.communicate(timeout=5)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            return None, (f"compile + warm-up + timed steps exceeded the {budget_s:.0f} s budget "
                          f"(--compile-budget; subprocess killed after {time.perf_counter() - t0:.0f} s)")
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.returncode != 0 or not out.exists():
            tail = [ln for ln in (output or "").strip().splitlines() if ln.strip()][-1:] or ["no output"]
            log((output or "")[-3000:])
            return None, f"compile subprocess failed (exit {proc.returncode}): {tail[0][:200]}"
        return json.loads(out.read_text()), ""


def report(name, case_rows, new_rows, csv_path):
    """Add the ratios to new_rows (against the plain baselines among case_rows), print them and append
    them to the CSV."""
    by = {r["variant"]: r for r in case_rows if r["status"] == "ok"}
    for r in new_rows:
        for col, base in (("x_plain", "plain_fp32"), ("x_plain_bf16", "plain_bf16")):
            ok = r["status"] == "ok" and base in by
            r[col] = round(by[base]["median_ms"] / r["median_ms"], 3) if ok else math.nan
        if r["status"] == "ok":
            print(f"{name:9s} {r['variant']:16s} {r['img_per_s']:9.1f} img/s  MFU {100 * r['mfu']:5.1f} %  "
                  f"(median {r['median_ms']:.0f} ms)" + (f"  compile {r['compile_s']:.1f} s" if "compile_s" in r else ""),
                  flush=True)
        else:
            print(f"{name:9s} {r['variant']:16s} skipped: {r['reason']}", flush=True)
    if csv_path:
        append_rows(csv_path, new_rows)


def make_row(name, vname, case, device, res, flops, peak, quick):
    img_s = case["batch"] / res["median_ms"] * 1e3 if res else math.nan
    row = {"case": name, "variant": vname, "shape": case["shape"], "device": device.type,
           "dry": int(case is DRY.get(name)), "batch": case["batch"], "teachers": case["k"], "crop": case["crop"],
           "data": "uint8 resident on device, random gather (no decode)" if case.get("resident") else "loaders",
           "status": "ok" if res else "skipped", "reason": "", "img_per_s": round(img_s, 2),
           "step_gflop_per_img": round(flops["step_gflop_per_img"], 4), "matmul_bf16_tflops": round(peak, 3),
           "mfu": img_s * flops["step_gflop_per_img"] / (peak * 1e3) if res else math.nan, "quick": int(quick)}
    if res:
        row.update({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})
    return row


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", choices=list(CASES))
    ap.add_argument("--variants", default="", help="comma-separated subset of the case's variants (and fastcbd_compile)")
    ap.add_argument("--quick", action="store_true",
                    help="1 warm-up, 3 timed steps, no memory; resnet50 on the CPU: the dry shape")
    ap.add_argument("--repeats", type=int, default=0, help="timed steps (default 8)")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps (default 2: cuDNN autotuning falls in the first)")
    ap.add_argument("--sequential", action="store_true", help="resnet50: time variants back to back, not interleaved")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (default 2; 1 with --quick on the CPU, robust on a loaded machine)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain variants (resnet18, cnn)")
    ap.add_argument("--compile", action="store_true", help="also fastcbd_compile, in a subprocess within --compile-budget")
    ap.add_argument("--compile-budget", type=float, default=90.0,
                    help="seconds for the compile subprocess (startup, compile, warm-up, timed steps); past it: skipped")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of fastcbd_compile")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds for the whole script (0 = none): the compile budget shrinks to what is left - 5 s")
    ap.add_argument("--no-plain-bf16", action="store_true")
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "train.csv"))
    ap.add_argument("--profile", action="store_true", help="print where a fastcbd step's time goes, then stop")
    ap.add_argument("--compile-worker", default="", help=argparse.SUPPRESS)  # internal: the compile subprocess
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads or (1 if args.quick and not cuda else 2))
    if cuda:
        torch.backends.cudnn.benchmark = True
    warmup = 1 if args.quick else (args.warmup or 2)
    repeats = 3 if args.quick else (args.repeats or 8)

    def case_of(name):
        return DRY[name] if args.quick and not cuda and name in DRY else CASES[name]

    if args.profile:
        return profile(case_of(args.only or "resnet18"), device, "bf16")
    if args.compile_worker:
        _die_with_parent()
        return compile_worker(args, case_of(args.only), device, warmup, repeats, args.compile_worker)

    wanted = [v for v in args.variants.split(",") if v]
    peak = matmul_tflops(device)
    print(f"bf16 matmul on {device.type}: {peak:.1f} TFLOP/s (measured now; the MFU denominator)", flush=True)
    rows = []
    for name in [args.only] if args.only else DEFAULT_CASES.get(device.type, DEFAULT_CASES["cpu"]):
        case = case_of(name)
        flops = model_flops(case)
        print(f"{name}: {case['shape']}; model FLOPs per image {flops['step_gflop_per_img']:.3g} G "
              f"(student forward {flops['student_gflop']:.3g} G, teacher forward {flops['teacher_gflop']:.3g} G)", flush=True)
        variants = [v for v in case["variants"] if not (args.no_plain_bf16 and v == "plain_bf16")]
        variants = [v for v in variants if not wanted or v in wanted]
        resident = ResidentData(case, device) if case.get("resident") else None
        shared = {}  # the case's teachers, built once per memory format
        steps = {v: build_step(case, v, device, args.workers, resident, shared=shared) for v in variants}
        results = time_variants(steps, device, warmup, repeats, memory=not args.quick,
                                interleave=bool(case.get("resident")) and not args.sequential)
        del steps, shared
        interleaved = int(bool(case.get("resident")) and not args.sequential)
        case_rows = [{**make_row(name, v, case, device, results[v], flops, peak, args.quick), "interleaved": interleaved}
                     for v in variants]
        report(name, case_rows, case_rows, args.csv)  # before the compile: a run killed during it keeps these
        if args.compile and (not wanted or "fastcbd_compile" in wanted):
            if cuda:
                torch.cuda.empty_cache()
            budget = args.compile_budget
            if args.time_budget:
                budget = min(budget, args.time_budget - (time.perf_counter() - t_start) - 5)
            res, reason = run_compile_subprocess([a for a in argv if a != "--compile"], name, budget, print)
            row = make_row(name, "fastcbd_compile", case, device, res, flops, peak, args.quick)
            row.update(interleaved=0, reason=reason, compile_backend=args.compile_backend)
            case_rows.append(row)
            report(name, case_rows, [row], args.csv)
        rows += case_rows
    print_table(rows, ["case", "variant", "batch", "img_per_s", "x_plain", "x_plain_bf16", "mfu", "median_ms", "p10_ms",
                       "p90_ms", "peak_mem_mb", "status"])
    for name in dict.fromkeys(r["case"] for r in rows):
        r = next(r for r in rows if r["case"] == name)
        print(f"{name}: {r['shape']}; data: {r['data']}; MFU against {r['matmul_bf16_tflops']:.4g} TFLOP/s bf16 "
              f"(matmul measured in this run), {r['step_gflop_per_img']:.4g} GFLOP per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
