"""Images/s of one full CBD_ENS student step (data, K teachers forward, student forward + backward, loss,
optimizer step), built up part by part so that a reader sees what each part buys: a plain eager PyTorch
implementation of the same recipe (written here: a Python loop over the teachers under no_grad, the
unfused loss in PyTorch ops, a DataLoader with per-image torchvision crops) in fp32 and bf16, fastcbd's
engine in fp32 and bf16, and fastcbd bf16 plus each of torch.compile, vmapped teachers and a teacher cache.
Then a per-component profile of every variant, and the MFU on a GPU.

    cd /work/main && .venv/bin/python benchmarks/bench_train.py            # resnet18 + cnn, CPU, 2 threads
    .venv/bin/python benchmarks/bench_train.py --only cnn --compile --compile-budget 300
    .venv/bin/python benchmarks/bench_train.py --quick --only cnn --csv /tmp/t.csv   # smoke test (dry shape)
    .venv/bin/python benchmarks/bench_train.py --only resnet50 --device cuda --compile   # the GPU run
    .venv/bin/python benchmarks/bench_train.py --only resnet50 --device cpu --quick --csv /tmp/x.csv  # its dry run

Cases (default: resnet18 and cnn on the CPU, all three on a GPU):
  resnet18  3 x 112 x 112 crops of 128 px images, batch 64, 4 teachers, 100 classes
  cnn       the demo's small_cnn on 28 x 28 gray digits, batch 128, 4 teachers, 10 classes
  resnet50  ImageNet-LT shape: 224 px, batch 256, 4 ResNet-50 teachers, 1000 classes. Data: synthetic
            uint8 images resident on the device; each step gathers a random batch and normalises it (no
            decode, no crop: the step is measured, not the input pipeline), the same for every variant
            but the cache one (which also applies its stored crop, see below).
  --quick on the CPU runs every case at a DRY SHAPE (tiny model, batch, images; labelled in the rows) so
  that every code path runs in seconds; its numbers mean nothing.
Variants (each has its own student and optimizer; the variants of a case share its frozen teachers):
  plain_fp32     fp32, teachers in a loop under no_grad, the loss in PyTorch ops, torch.optim.SGD;
                 data: DataLoader + torchvision v2 RandomResizedCrop per image (resnet18, cnn)
  plain_bf16     the same under bf16 autocast (resnet50: and channels_last, the tuned eager baseline)
  fastcbd_fp32   fastcbd's engine in fp32: channels_last, teachers under inference_mode, the fused cbd_loss
                 (fastcbd.functional), make_optimizer's SGD; data: DeviceLoader (uint8 images resident,
                 batched on-device crops)
  fastcbd_bf16   the same under bf16 autocast: fastcbd's default step
  fastcbd_vmap   fastcbd_bf16 + the teachers stacked into one vmapped module (teacher.batched=on)
  fastcbd_cache  fastcbd_bf16 + the teacher cache of issue #13 (fastcbd.cache): the K teachers are not run
                 in the step. Before timing, V views per image (--views) are drawn once (draw_crop: (N x V,
                 5) float32 crop parameters, on the CPU), the teachers run once over them (bf16 autocast,
                 inference_mode, channels_last, on DeviceLoader.view's pixels) and their features are
                 stored as fp16 (fastcbd.cache.store, a temporary folder; fastcbd.cache.build_cache's loop,
                 written out here because it needs a pipeline context). Each step is a batch of
                 fastcbd.cache.CachedLoader: the class-balanced sampler picks the images, the loader's
                 generator a stored view of each, the stored parameters cut the images and the features
                 are gathered (resident on the device). Its one-time build is timed on its own
                 (cache_build_s column; break_even_steps = build / (fastcbd_bf16 step - cache step)), and
                 one batch is checked against the live teachers on the same pixels (cache_loss_err).
  fastcbd_compile (--compile) fastcbd_bf16 + torch.compile of teachers + student forward + loss (backward
                 through AOTAutograd). It runs in a subprocess bounded by --compile-budget seconds (startup,
                 compile, warm-up and timed steps together; past it the subprocess is killed and the row
                 says `skipped`), so it is NOT interleaved with the others: its steps are timed back to back
                 in that subprocess (same threads, same warm-up/repeats), and compile_s is its first call
                 (compile + one step), not timed.
Timing: every variant's steps are interleaved in one run (after each variant's warm-up, one step of each
per round, the order rotating; each step timed between device synchronisations, the garbage collector
off), so that load from other processes hits all variants alike; --sequential times them back to back.
Thread/worker budget: the same for every variant: --threads torch intra-op threads (default 2) and NO
DataLoader workers (--workers 0): the plain variants' per-image crops run in the main process inside
their timed step, as the DeviceLoader's batched crops do. DataLoader workers would prefetch in the
background while the other variants' steps are being timed (taking their cores and hiding their own
cost); --workers N > 0 gives the plain variants N workers and then times the variants back to back
(interleaved=0 in the rows), which is the only honest way to time a prefetching loader.
Profile (--profile-rounds R, default 5; 0 = off): every variant but compile, R more interleaved rounds of a
step split into components, each timed between synchronisations: data (next batch on the device; for
fastcbd_cache with its gathered features, which CachedLoader yields with the images), teachers (the K
forwards; ~0 for fastcbd_cache), student_fwd (student.features), loss (the loss forward
+ backward to the features and the classifier weight, torch.autograd.grad), student_bwd (the rest of the
backward, features.backward(grad)), optimizer (step + scheduler). The split adds synchronisations and
splits the backward in two, so the components add up to about, not exactly, the step (sum_ms beside
step_ms in the rows). Rows go to benchmarks/results/train_profile.csv.
On CUDA cudnn.benchmark is on (its autotuning falls in the warm-up) and PyTorch's default precision flags
are kept (cuDNN convolutions may use TF32 in fp32; matmuls do not).
MFU: model FLOPs per image = 3 x student forward + K x teacher forward, counted once with
torch.utils.flop_counter.FlopCounterMode on the meta device (2 FLOPs per multiply-add), over the bf16
matmul rate measured in the same call. fp32 rows are divided by the same bf16 rate. The cache variant's
row keeps the same model FLOPs (the teachers' work moved into the build, not removed).
Ratios in the rows (median over median, same run): x_plain (over plain_fp32), x_plain_bf16 (over
plain_bf16), x_equal_precision (fp32 variants over plain_fp32, bf16 ones over plain_bf16: what fastcbd
buys at the same precision) and x_fastcbd_bf16 (over fastcbd_bf16: what compile, vmap and the cache add).
Rows go to benchmarks/results/train.csv, with the load average (load1) of the machine at the time.
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
from fastcbd.data.augment import AugmentConfig, draw_crop
from fastcbd.data.device_loader import DeviceLoader
from fastcbd.data.samplers import build_sampler
from fastcbd.functional import cbd_loss
from fastcbd.models import Student, Teacher
from fastcbd.train.config import OptimConfig
from fastcbd.train.ensemble import ensemble
from fastcbd.train.loop import autocast_context, make_optimizer

ALPHA, BETA, SIGMA = 0.4, 100.0, 20.0
VARIANTS = ("plain_fp32", "plain_bf16", "fastcbd_fp32", "fastcbd_bf16", "fastcbd_vmap", "fastcbd_cache")
PRECISION = {"plain_fp32": "fp32", "plain_bf16": "bf16", "fastcbd_fp32": "fp32", "fastcbd_bf16": "bf16",
             "fastcbd_vmap": "bf16", "fastcbd_cache": "bf16", "fastcbd_compile": "bf16"}
COMPONENTS = ("data", "teachers", "student_fwd", "loss", "student_bwd", "optimizer")
CROP = AugmentConfig(crop_scale=(0.6, 1.0), crop_ratio=(0.75, 4 / 3), flip=False)  # torchvision's RRC scale here
CASES = {  # backbone, width, channels, stored size, crop, batch, images, classes, teachers
    "resnet18": {"backbone": "resnet18", "width": 0, "c": 3, "size": 128, "crop": 112, "batch": 64, "n": 1024,
                 "classes": 100, "k": 4, "shape": "ResNet-18, 112 px, batch 64, 4 teachers"},
    "cnn": {"backbone": "small_cnn", "width": 16, "c": 1, "size": 28, "crop": 28, "batch": 128, "n": 2048, "classes": 10,
            "k": 4, "shape": "small CNN, 28 px, batch 128, 4 teachers"},
    # resident: uint8 images on the device, random gathers; no loader, no augmentation (see the docstring)
    "resnet50": {"backbone": "resnet50", "width": 0, "c": 3, "size": 224, "crop": 224, "batch": 256, "n": 512,
                 "classes": 1000, "k": 4, "resident": True,
                 "shape": "ResNet-50, 224 px, batch 256, 4 ResNet-50 teachers, 1000 classes"},
}
DRY = {  # --quick on the CPU: the same code paths on shapes that run in seconds
    "resnet18": {**CASES["resnet18"], "size": 40, "crop": 32, "batch": 8, "n": 32, "classes": 5, "k": 2,
                 "shape": "DRY SHAPE (not the resnet18 case): ResNet-18, 32 px, batch 8, 2 teachers, 5 classes"},
    "cnn": {**CASES["cnn"], "width": 4, "size": 16, "crop": 16, "batch": 8, "n": 32, "classes": 4, "k": 2,
            "shape": "DRY SHAPE (not the cnn case): small CNN width 4, 16 px, batch 8, 2 teachers, 4 classes"},
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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _channels_last(x, on: bool):
    return x.contiguous(memory_format=torch.channels_last if on else torch.contiguous_format)


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
        return _channels_last(x, channels_last), self.y.index_select(0, idx)


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


def cbd_loss_fused(p, w, y, t_feats):
    return cbd_loss(p, w, y, t_feats, alpha=ALPHA, beta=BETA, sigma=SIGMA)


def _forever(dl, sampler):
    for epoch in itertools.count():  # a new epoch of the sampler each pass (its draw is per epoch)
        sampler.set_epoch(epoch)
        yield from dl


def loader_batches(case, device, workers):
    """The plain input (resnet18/cnn): DataLoader + per-image torchvision RandomResizedCrop, forever.
    workers = 0: the crops run in the main process, inside the timed step."""
    import torchvision.transforms.v2 as T
    from torch.utils.data import DataLoader, Dataset

    x, y = data(case)
    tf = T.Compose([T.RandomResizedCrop(case["crop"], scale=CROP.crop_scale, ratio=CROP.crop_ratio, antialias=True),
                    T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * case["c"], [0.25] * case["c"])])

    class DS(Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return tf(torch.from_numpy(x[i]).permute(2, 0, 1)), int(y[i])

    smp = build_sampler("balanced", y, seed=0)
    dl = DataLoader(DS(), batch_size=case["batch"], sampler=smp, num_workers=workers, drop_last=True,
                    persistent_workers=workers > 0)
    batches = _forever(dl, smp)
    return lambda: tuple(t.to(device) for t in next(batches)) + (None,)


def _stored_at_crop_size(case):
    """The case's images, resized once to the crop size when they are stored larger (DeviceLoader's and
    the cache's crops keep the stored size): uint8 (N, H, W, C) numpy, labels."""
    x, y = data(case)
    if case["crop"] != case["size"]:
        x = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float(), size=case["crop"], mode="bilinear",
                          antialias=True).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return x, y


def case_loader(case, device, resident=None):
    """fastcbd's DeviceLoader over the case's images (batched on-device crops, class-balanced sampler,
    channels_last): the loader cases' images stored at the crop size (its crops keep the stored size);
    resident: ResidentData's images and labels (normalised by DeviceLoader: mean 0.5, std 0.25 of [0, 1])."""
    if resident is not None:
        x, y = resident.x.permute(0, 2, 3, 1).cpu().numpy(), resident.y.cpu().numpy()
    else:
        x, y = _stored_at_crop_size(case)
    smp = build_sampler("balanced", y, seed=0, allow_empty=True)  # resident: random labels, some classes empty
    return DeviceLoader(x, y, case["batch"], sampler=smp, aug=CROP, mean=[0.5] * case["c"], std=[0.25] * case["c"],
                        device=device, drop_last=True, channels_last=True)


def device_loader_batches(case, device):
    """fastcbd's input (resnet18/cnn): DeviceLoader with batched on-device random-resized crops, forever."""
    loader = case_loader(case, device)
    it = _forever(loader, loader.sampler)
    return lambda: next(it) + (None,)


class BuiltCache:
    """A teacher cache built with fastcbd.cache in a temporary folder, and the student's CachedLoader over it.

    The store is fastcbd.cache.store's (crop parameters (R, 5) float32 drawn once on the CPU, features
    (R, sum D_k) fp16 memory-mapped, R = N x views) and the loader fastcbd.cache.CachedLoader (the features
    copied to the device once, a view per image from the loader's generator, the images cut by
    DeviceLoader.view with the stored parameters). fastcbd.cache.build_cache needs a pipeline context (a
    config and dataset splits), so its loop is written out here: the same steps (batches of rows, the
    teachers under inference_mode and `amp` autocast on loader.view(...), fp16 rows into the store).
    build_s: the build's wall time (parameters, teachers over every view, writing the store, loading it)."""

    def __init__(self, case, device, teachers, views, resident=None, amp="bf16"):
        from fastcbd.cache import CachedLoader, TeacherCache, store

        base = case_loader(case, device, resident)
        self.tmp = tempfile.TemporaryDirectory(prefix="bench_train_cache_")
        folder, n, self.views = self.tmp.name, len(base.labels), int(views)
        _sync(device)
        t0 = time.perf_counter()
        weights = [store.weights_hash(t) for t in teachers]
        dims = [int(t.out_features) for t in teachers]
        offsets = np.arange(n + 1, dtype=np.int64) * self.views
        params = draw_crop(n * self.views, CROP, torch.Generator().manual_seed(0), "cpu").numpy()
        key = store.make_key(teachers=weights, dataset=f"bench_train synthetic {case['shape']}",
                             image_shape=tuple(base.images.shape[1:]), aug=CROP, amp=amp, views=self.views,
                             allot="uniform")
        store.create(folder, key, [{"path": "", "sha256": "", "weights": w, "dim": d} for w, d in zip(weights, dims)],
                     offsets, params, seed=0)
        cache = TeacherCache(folder, mode="r+")
        rows = torch.arange(n * self.views)
        with torch.inference_mode(), autocast_context(device, amp):
            for chunk in rows.split(max(case["batch"], 256)):
                x = base.view((chunk // self.views).to(device), torch.from_numpy(params[chunk.numpy()]).to(device))
                f = torch.cat([t.features(x).float() for t in teachers], 1)
                cache.features[int(chunk[0]) : int(chunk[-1]) + 1] = f.to(torch.float16).cpu().numpy()
        cache.features.flush()
        cache.done[:] = 1
        cache.done.flush()
        store.write_json(f"{folder}/cache.json", dict(cache.meta, complete=True))
        self.loader = CachedLoader.over(base, TeacherCache(folder), weights)
        _sync(device)
        self.build_s = time.perf_counter() - t0
        self.mb = n * self.views * sum(dims) * 2 / 2**20
        self.n = n
        self._it = _forever(self.loader, self.loader.sampler)

    def batch(self):
        """(x (B, C, H, W) float32 normalised channels_last, y (B,), K teacher features (B, D_k) float32)."""
        (x, feats), y = next(self._it)
        return x, y, feats


class Variant:
    """One variant's step, built from its parts so that the profile can time them one by one.

    data() -> (x, y, rows); teachers(x, rows) -> K (B, D_k); student; loss(p, w, y, t_feats) -> scalar;
    opt (+ sched); amp. step() is the plain training step; profiled_step() the same work split into
    COMPONENTS, each timed between synchronisations."""

    def __init__(self, name, data, teachers, student, loss, opt, sched, amp, device, compile_backend=""):
        self.name, self.data, self.teachers, self.student, self.loss = name, data, teachers, student, loss
        self.opt, self.sched, self.amp, self.device = opt, sched, amp, device

        def forward_loss(x, y, rows):
            t_feats = self.teachers(x, rows)
            return self.loss(self.student.features(x), self.student.classifier.weight, y, t_feats)

        self.forward_loss = torch.compile(forward_loss, backend=compile_backend) if compile_backend else forward_loss

    def step(self):
        x, y, rows = self.data()
        self.opt.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.amp):
            loss = self.forward_loss(x, y, rows)
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        return loss

    def profiled_step(self) -> dict:
        out, t0 = {}, [time.perf_counter()]

        def lap(name):
            _sync(self.device)
            t = time.perf_counter()
            out[name + "_ms"] = (t - t0[0]) * 1e3
            t0[0] = t

        _sync(self.device)
        t0[0] = time.perf_counter()
        x, y, rows = self.data()
        lap("data")
        self.opt.zero_grad(set_to_none=True)
        w = self.student.classifier.weight
        with autocast_context(self.device, self.amp):
            t_feats = self.teachers(x, rows)
            lap("teachers")
            p = self.student.features(x)
            lap("student_fwd")
            loss = self.loss(p, w, y, t_feats)
        g_p, g_w = torch.autograd.grad(loss, [p, w])
        lap("loss")
        p.backward(g_p)
        w.grad = g_w
        lap("student_bwd")
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        lap("optimizer")
        return out


def _plain_teachers(teachers):
    def run(x, rows):
        with torch.no_grad():
            return [t.features(x) for t in teachers]
    return run


def build_variant(case, name, device, workers=0, resident=None, shared=None, views=4, compile_backend=""):
    """The Variant `name` of a case (see the module docstring). shared: see models(); for fastcbd_cache
    it also keeps the built TeacherCache under "cache" (built once per case)."""
    shared = {} if shared is None else shared
    amp = "none" if PRECISION[name] == "fp32" else "bf16"
    if name.startswith("plain"):
        channels_last = resident is not None and amp != "none"  # resnet50's plain bf16: the tuned eager baseline
        data_fn = (lambda: resident.batch(channels_last) + (None,)) if resident is not None else \
            loader_batches(case, device, workers)
        teachers, student = models(case, device, channels_last, shared)
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=2.5e-4)
        return Variant(name, data_fn, _plain_teachers(teachers), student, cbd_loss_plain, opt, None, amp, device)
    teachers, student = models(case, device, True, shared)
    opt, sched = make_optimizer(list(student.parameters()), OptimConfig(lr=0.1), case["batch"], 10**6)
    if name == "fastcbd_cache":  # the features come with the batch (CachedLoader): `rows` is that list
        cache = shared.get("cache") or BuiltCache(case, device, teachers, views, resident)
        shared["cache"] = cache
        return Variant(name, cache.batch, lambda x, feats: feats, student, cbd_loss_fused, opt, sched, amp, device)
    data_fn = (lambda: resident.batch(True) + (None,)) if resident is not None else device_loader_batches(case, device)
    run = ensemble(teachers, "on" if name == "fastcbd_vmap" else "off")
    return Variant(name, data_fn, lambda x, rows: run(x), student, cbd_loss_fused, opt, sched, amp, device,
                   compile_backend if name == "fastcbd_compile" else "")


def cache_check(case, device, views=2, amp="bf16", shared=None) -> dict:
    """One batch of the cache variant against the live teachers on the same pixels: the first batch of the
    sampler's order, a stored view of each image (CachedLoader.rows), the images cut with its parameters;
    the cached features against the teachers run now on those pixels (both under `amp`), and cbd_loss of
    one student's features with each. Returns feat_max_rel_err (max |cached - live| / max |live|, worst
    teacher), loss_live, loss_cache, loss_rel_err; and wrong_view_err, the same error for another stored
    view of each image (what a mis-indexed cache would give)."""
    shared = {} if shared is None else shared
    teachers, student = models(case, device, True, shared)
    cache = shared.get("cache") or BuiltCache(case, device, teachers, views, None, amp)
    ld = cache.loader
    idx = torch.from_numpy(ld.sampler.indices()[: case["batch"]]).to(device)
    rows = ld.rows(idx)
    wrong = ld.offsets[idx] + (rows - ld.offsets[idx] + 1) % cache.views
    x = ld.view(idx, ld.params.index_select(0, rows))
    y = ld.labels.index_select(0, idx)
    with torch.inference_mode(), autocast_context(device, amp):
        live = [t.features(x).float() for t in teachers]
        cached, other = ld.features(rows), ld.features(wrong)
        p = student.features(x)
        loss_live = float(cbd_loss_fused(p, student.classifier.weight, y, live))
        loss_cache = float(cbd_loss_fused(p, student.classifier.weight, y, cached))

    def err(fs):
        return max(float((f - lv).abs().max() / lv.abs().max().clamp_min(1e-30)) for f, lv in zip(fs, live))

    return {"feat_max_rel_err": err(cached), "wrong_view_err": err(other), "loss_live": loss_live,
            "loss_cache": loss_cache, "loss_rel_err": abs(loss_cache - loss_live) / max(abs(loss_live), 1e-30)}


def time_variants(variants: dict, device, warmup: int, repeats: int, memory: bool, interleave: bool) -> dict:
    """{name: measure()-style dict}. interleave: after each variant's warm-up, `repeats` rounds of one
    step per variant, the order rotating, so that anything else on the machine hits all variants alike
    (each step timed between device synchronisations, the garbage collector off during the rounds)."""
    if not interleave:
        return {name: measure(v.step, warmup=warmup, repeats=repeats, device=device, memory=memory)
                for name, v in variants.items()}
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name].step()
    times = _rounds({n: v.step for n, v in variants.items()}, device, repeats, lambda fn: _timed(fn, device))
    out = {}
    for name in names:
        mem = measure(variants[name].step, warmup=0, repeats=1, device=device) if memory else \
            {"peak_mem_mb": math.nan, "mem_method": "none"}
        out[name] = {**summarize(times[name]), "peak_mem_mb": mem["peak_mem_mb"], "mem_method": mem["mem_method"]}
    return out


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _rounds(fns: dict, device, repeats: int, call) -> dict:
    """`repeats` rounds of call(fn) for each fn, the order rotating by one each round; GC off."""
    names = list(fns)
    out = {name: [] for name in names}
    _sync(device)
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                out[name].append(call(fns[name]))
    finally:
        gc.enable()
    return out


def profile_variants(variants: dict, device, rounds: int) -> dict:
    """{name: {component_ms: median over `rounds` interleaved profiled steps, sum_ms}} (see the docstring)."""
    laps = _rounds({n: v.profiled_step for n, v in variants.items()}, device, rounds, lambda fn: fn())
    out = {}
    for name, rs in laps.items():
        med = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
        out[name] = {**med, "sum_ms": sum(med.values())}
    return out


def compile_worker(args, case, device, warmup, repeats, out_path):
    """In the subprocess: build the compiled step, time its first call (compile + one step) as compile_s,
    then the usual warm-up and timed steps; the result goes to out_path as JSON."""
    resident = ResidentData(case, device) if case.get("resident") else None
    v = build_variant(case, "fastcbd_compile", device, args.workers, resident, compile_backend=args.compile_backend)
    t0 = time.perf_counter()
    v.step()
    _sync(device)
    compile_s = time.perf_counter() - t0
    res = measure(v.step, warmup=max(warmup - 1, 0), repeats=repeats, device=device, memory=not args.quick)
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


def add_ratios(case_rows, new_rows):
    """The ratio columns of new_rows, against the baselines among case_rows (median over median)."""
    by = {r["variant"]: r for r in case_rows if r["status"] == "ok"}
    for r in new_rows:
        same = "plain_fp32" if PRECISION.get(r["variant"]) == "fp32" else "plain_bf16"
        for col, base in (("x_plain", "plain_fp32"), ("x_plain_bf16", "plain_bf16"), ("x_equal_precision", same),
                          ("x_fastcbd_bf16", "fastcbd_bf16")):
            ok = r["status"] == "ok" and base in by
            r[col] = round(by[base]["median_ms"] / r["median_ms"], 3) if ok else math.nan


def report(name, case_rows, new_rows, csv_path):
    """Add the ratios to new_rows, print them and append them to the CSV."""
    add_ratios(case_rows, new_rows)
    for r in new_rows:
        if r["status"] == "ok":
            print(f"{name:9s} {r['variant']:16s} {r['img_per_s']:9.1f} img/s  x plain fp32 {r['x_plain']:5.2f}  "
                  f"x same precision {r['x_equal_precision']:5.2f}  (median {r['median_ms']:.0f} ms)"
                  + (f"  compile {r['compile_s']:.1f} s" if "compile_s" in r else "")
                  + (f"  cache build {r['cache_build_s']:.1f} s" if "cache_build_s" in r else ""), flush=True)
        else:
            print(f"{name:9s} {r['variant']:16s} skipped: {r['reason']}", flush=True)
    if csv_path:
        append_rows(csv_path, new_rows)


def make_row(name, vname, case, device, res, flops, peak, quick):
    img_s = case["batch"] / res["median_ms"] * 1e3 if res else math.nan
    row = {"case": name, "variant": vname, "shape": case["shape"], "device": device.type,
           "dry": int(case is DRY.get(name)), "batch": case["batch"], "teachers": case["k"], "crop": case["crop"],
           "precision": PRECISION[vname],
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
    ap.add_argument("--variants", default="", help="comma-separated subset of " + ",".join(VARIANTS) + ",fastcbd_compile")
    ap.add_argument("--quick", action="store_true",
                    help="1 warm-up, 3 timed rounds, 1 profile round, no memory; on the CPU every case at its dry shape")
    ap.add_argument("--repeats", type=int, default=0, help="timed rounds (default 8)")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps (default 2: cuDNN autotuning falls in the first)")
    ap.add_argument("--sequential", action="store_true", help="time variants back to back, not interleaved")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads, every variant (default 2; 1 with --quick on the CPU)")
    ap.add_argument("--workers", type=int, default=0,
                    help="DataLoader workers of the plain variants (default 0; > 0 implies --sequential)")
    ap.add_argument("--views", type=int, default=4, help="stored views per image of fastcbd_cache (default 4)")
    ap.add_argument("--profile-rounds", type=int, default=-1,
                    help="interleaved rounds of the per-component profile (default 5, --quick 1; 0 = none)")
    ap.add_argument("--compile", action="store_true", help="also fastcbd_compile, in a subprocess within --compile-budget")
    ap.add_argument("--compile-budget", type=float, default=90.0,
                    help="seconds for the compile subprocess (startup, compile, warm-up, timed steps); past it: skipped")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of fastcbd_compile")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds for the whole script (0 = none): the compile budget shrinks to what is left - 5 s")
    ap.add_argument("--no-plain-bf16", action="store_true")
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "train.csv"),
                    help="step rows ('' = do not write); the profile rows go to train_profile.csv beside it")
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
    prof_rounds = args.profile_rounds if args.profile_rounds >= 0 else (1 if args.quick else 5)
    interleave = not args.sequential and args.workers == 0

    def case_of(name):
        return DRY[name] if args.quick and not cuda and name in DRY else CASES[name]

    if args.compile_worker:
        _die_with_parent()
        return compile_worker(args, case_of(args.only), device, warmup, repeats, args.compile_worker)

    wanted = [v for v in args.variants.split(",") if v]
    unknown = [v for v in wanted if v not in VARIANTS + ("fastcbd_compile",)]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; expected a subset of {', '.join(VARIANTS)}, fastcbd_compile")
    peak = matmul_tflops(device)
    print(f"bf16 matmul on {device.type}: {peak:.1f} TFLOP/s (measured now; the MFU denominator); load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    rows, prof_rows = [], []
    prof_csv = str(Path(args.csv).with_name("train_profile.csv")) if args.csv else ""
    for name in [args.only] if args.only else DEFAULT_CASES.get(device.type, DEFAULT_CASES["cpu"]):
        case = case_of(name)
        flops = model_flops(case)
        print(f"{name}: {case['shape']}; model FLOPs per image {flops['step_gflop_per_img']:.3g} G "
              f"(student forward {flops['student_gflop']:.3g} G, teacher forward {flops['teacher_gflop']:.3g} G)", flush=True)
        names = [v for v in VARIANTS if not (args.no_plain_bf16 and v == "plain_bf16")]
        names = [v for v in names if not wanted or v in wanted]
        resident = ResidentData(case, device) if case.get("resident") else None
        shared = {}  # the case's teachers (per memory format) and its teacher cache, built once
        variants = {v: build_variant(case, v, device, args.workers, resident, shared, args.views) for v in names}
        extra = {}
        if "fastcbd_cache" in variants:
            chk = cache_check(case, device, shared=shared)
            cache = shared["cache"]
            extra = {"cache_views": cache.views, "cache_build_s": round(cache.build_s, 3), "cache_mb": round(cache.mb, 3),
                     "cache_feat_err": chk["feat_max_rel_err"], "cache_loss_err": chk["loss_rel_err"]}
            print(f"{name}: teacher cache of {cache.views} views x {cache.n} images built in "
                  f"{cache.build_s:.2f} s ({extra['cache_mb']:.1f} MiB fp16); one batch against the live teachers: "
                  f"features max rel. err {chk['feat_max_rel_err']:.2e}, loss {chk['loss_cache']:.5f} vs "
                  f"{chk['loss_live']:.5f}", flush=True)
        results = time_variants(variants, device, warmup, repeats, memory=not args.quick, interleave=interleave)
        case_rows = [{**make_row(name, v, case, device, results[v], flops, peak, args.quick),
                      "interleaved": int(interleave), "workers": args.workers if v.startswith("plain") else 0,
                      **(extra if v == "fastcbd_cache" else {})} for v in names]
        add_ratios(case_rows, case_rows)
        for r in case_rows:
            if r["variant"] == "fastcbd_cache" and r["status"] == "ok" and "fastcbd_bf16" in results:
                saved_ms = results["fastcbd_bf16"]["median_ms"] - r["median_ms"]
                r["break_even_steps"] = round(r["cache_build_s"] * 1e3 / saved_ms, 1) if saved_ms > 0 else math.inf
        report(name, case_rows, case_rows, args.csv)  # before the compile: a run killed during it keeps these
        if prof_rounds:
            prof = profile_variants(variants, device, prof_rounds)
            new = [{"case": name, "variant": v, "shape": case["shape"], "device": device.type,
                    "dry": int(case is DRY.get(name)), "batch": case["batch"], "rounds": prof_rounds,
                    **{k: round(x, 3) for k, x in prof[v].items()}, "step_ms": round(results[v]["median_ms"], 3),
                    "quick": int(args.quick)} for v in names]
            prof_rows += new
            if prof_csv:
                append_rows(prof_csv, new)
        del variants, shared
        if args.compile and (not wanted or "fastcbd_compile" in wanted):
            if cuda:
                torch.cuda.empty_cache()
            budget = args.compile_budget
            if args.time_budget:
                budget = min(budget, args.time_budget - (time.perf_counter() - t_start) - 5)
            res, reason = run_compile_subprocess([a for a in argv if a != "--compile"], name, budget, print)
            row = make_row(name, "fastcbd_compile", case, device, res, flops, peak, args.quick)
            row.update(interleaved=0, workers=0, reason=reason, compile_backend=args.compile_backend)
            case_rows.append(row)
            report(name, case_rows, [row], args.csv)
        rows += case_rows
    print_table(rows, ["case", "variant", "precision", "img_per_s", "x_plain", "x_plain_bf16", "x_equal_precision",
                       "x_fastcbd_bf16", "median_ms", "p10_ms", "p90_ms", "peak_mem_mb", "mfu", "status"])
    if prof_rows:
        print("\nPer-component profile, median ms of each part timed between synchronisations "
              "(sum_ms is not the step: the split adds syncs and splits the backward):")
        print_table(prof_rows, ["case", "variant", *[c + "_ms" for c in COMPONENTS], "sum_ms", "step_ms"])
    for name in dict.fromkeys(r["case"] for r in rows):
        r = next(r for r in rows if r["case"] == name)
        print(f"{name}: {r['shape']}; data: {r['data']}; MFU against {r['matmul_bf16_tflops']:.4g} TFLOP/s bf16 "
              f"(matmul measured in this run), {r['step_gflop_per_img']:.4g} GFLOP per image")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
